"""topk_mask at the sizes of the CUDA goals.

On CUDA: a 1e9-entry list (four 250M tensors, float32 and bfloat16) against reading the list once
(a sum over every tensor), so the ratio is how many reads' worth of time the selection costs (goal:
within 4x), and ResNet-50's list in bfloat16 (the float32 one is in topk_mask.py). Elsewhere, and
with quick=True, the same comparison on a small stand-in list (4 x 16K entries).
"""
from __future__ import annotations

import torch

from ... import ops
from ..core import Case, sparsekern_runs
from ..shapes import RESNET50, describe, random_tensors

OPS = ("topk_mask (global)",)

DENSITY = 0.1


def _against_one_read(name: str, tensors: list[torch.Tensor], device: torch.device) -> Case:
    k = round(DENSITY * sum(t.numel() for t in tensors))
    runs = {"read once (sum)": lambda: [t.sum() for t in tensors]}
    runs.update(sparsekern_runs("topk_mask", device, lambda: ops.topk_mask(tensors, k)))
    return Case("topk_mask (global)", f"{describe(name, tensors)} {str(tensors[0].dtype)[6:]}, d={DENSITY}", runs,
                baseline="read once (sum)")


def cases(device: torch.device, quick: bool) -> list[Case]:
    if quick or device.type != "cuda":
        return [_against_one_read("stand-in", random_tensors([(f"part{i}", (1 << 14,)) for i in range(4)], device),
                                  device)]
    resnet = [s.abs() for s in random_tensors(RESNET50, device, dtype=torch.bfloat16)]
    k = round(DENSITY * sum(s.numel() for s in resnet))
    result = [Case("topk_mask (global)", f"{describe('resnet50', resnet)} bfloat16, d={DENSITY}",
                   {"torch cat+topk": lambda: torch.cat([s.reshape(-1) for s in resnet]).topk(k, sorted=False),
                    **sparsekern_runs("topk_mask", device, lambda: ops.topk_mask(resnet, k))},
                   baseline="torch cat+topk")]
    for dtype in (torch.float32, torch.bfloat16):
        parts = [(f"part{i}", (250_000_000,)) for i in range(4)]
        result.append(_against_one_read("1e9", random_tensors(parts, device, dtype=dtype), device))
    return result
