"""topk_mask against the torch code it replaces: masks of the top 10% of |w|.

Global selection over ResNet-50's 54 weights (one k over 25.5M entries) and over one 1M-entry
tensor, against `torch.cat` + `torch.topk` (the baseline) and `torch.cat` + a `torch.kthvalue`
threshold; per-tensor selection (one k per weight) against one `torch.topk` per layer.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ... import ops
from ..core import Case, sparsekern_runs
from ..shapes import ONE_MILLION, RESNET50, RESNET50_TINY, describe, random_tensors

OPS = ("topk_mask (global)", "topk_mask (per tensor)")

DENSITY = 0.1


def torch_cat_topk(scores: list[Tensor], k: int) -> list[Tensor]:
    flat = torch.cat([s.reshape(-1) for s in scores])
    selected = torch.zeros_like(flat, dtype=torch.bool)
    selected[flat.topk(k, sorted=False).indices] = True
    return _split_like(selected, scores)


def torch_cat_kthvalue(scores: list[Tensor], k: int) -> list[Tensor]:
    flat = torch.cat([s.reshape(-1) for s in scores])
    # The (numel - k + 1)-th smallest is the k-th largest; ties at the threshold may add entries.
    threshold = flat.kthvalue(flat.numel() - k + 1).values
    return _split_like(flat >= threshold, scores)


def torch_per_layer_topk(scores: list[Tensor], k: list[int]) -> list[Tensor]:
    masks = []
    for s, ki in zip(scores, k):
        mask = torch.zeros(s.numel(), dtype=torch.bool, device=s.device)
        mask[s.reshape(-1).topk(ki, sorted=False).indices] = True
        masks.append(mask.view(s.shape))
    return masks


def _split_like(flat: Tensor, scores: list[Tensor]) -> list[Tensor]:
    return [part.view(s.shape) for part, s in zip(flat.split([s.numel() for s in scores]), scores)]


def cases(device: torch.device, quick: bool) -> list[Case]:
    resnet = _abs(RESNET50_TINY if quick else RESNET50, device)
    resnet_name = "resnet50/16" if quick else "resnet50"
    single = _abs([("x", (1 << 14,) if quick else ONE_MILLION)], device)
    return [_global_case(resnet_name, resnet, device),
            _global_case("single" if quick else "1M", single, device),
            _per_tensor_case(resnet_name, resnet, device)]


def _global_case(name: str, scores: list[Tensor], device: torch.device) -> Case:
    k = round(DENSITY * sum(s.numel() for s in scores))
    runs = {"torch cat+topk": lambda: torch_cat_topk(scores, k),
            "torch cat+kthvalue": lambda: torch_cat_kthvalue(scores, k)}
    runs.update(sparsekern_runs("topk_mask", device, lambda: ops.topk_mask(scores, k)))
    return Case("topk_mask (global)", f"{describe(name, scores)}, d={DENSITY}", runs, baseline="torch cat+topk")


def _per_tensor_case(name: str, scores: list[Tensor], device: torch.device) -> Case:
    k = [round(DENSITY * s.numel()) for s in scores]
    runs = {"torch per-layer topk": lambda: torch_per_layer_topk(scores, k)}
    runs.update(sparsekern_runs("topk_mask_per_tensor", device, lambda: ops.topk_mask(scores, k)))
    return Case("topk_mask (per tensor)", f"{describe(name, scores)}, d={DENSITY}", runs,
                baseline="torch per-layer topk")


def _abs(shapes, device) -> list[Tensor]:
    return [t.abs_() for t in random_tensors(shapes, device)]
