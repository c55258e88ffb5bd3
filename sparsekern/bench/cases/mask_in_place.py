"""ops.mask_in_place against the torch code it replaces: a weight gradient (or optimizer state) zeroed off its
mask in place, as DST, OptG and broadcast_masks mask them.

Tensors: ResNet-50's 54 weight gradients (one call per tensor, as the algorithms mask them layer by layer), the
three weight gradients of the CLI's digits MLP 64-256-256-10 (small enough that the op's fixed cost per call, its
argument checks, is a visible share: OptG masks them at every step) and one 1M-entry tensor, at density 0.1.
Runs: "torch masked_fill_(~mask, 0)" (the baseline, the code the op replaced, which makes a mask-sized `~mask` at
every call), "torch mul_(mask)" (no temporary on a GPU, but a product: inf or NaN off the mask stays NaN, where
the op's select gives +0.0) and the op. Every call masks the same tensors again: the passes cost the same
whatever the tensors hold.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ... import ops
from ..core import Case
from ..shapes import ONE_MILLION, RESNET50, RESNET50_TINY, describe, random_tensors

OPS = ("mask_in_place",)

DENSITY = 0.1
# The weights of the digits MLP 64-256-256-10 (nn.Linear's (out_features, in_features)).
DIGITS_MLP = [("0", (256, 64)), ("2", (256, 256)), ("4", (10, 256))]


def torch_masked_fill(tensors: list[Tensor], masks: list[Tensor]) -> None:
    for tensor, mask in zip(tensors, masks):
        tensor.masked_fill_(~mask, 0)


def torch_mul(tensors: list[Tensor], masks: list[Tensor]) -> None:
    for tensor, mask in zip(tensors, masks):
        tensor.mul_(mask)


def sparsekern_mask_in_place(tensors: list[Tensor], masks: list[Tensor]) -> None:
    for tensor, mask in zip(tensors, masks):
        ops.mask_in_place(tensor, mask)


IMPLEMENTATIONS = {"torch masked_fill_(~mask, 0)": torch_masked_fill, "torch mul_(mask)": torch_mul,
                   "sparsekern mask_in_place": sparsekern_mask_in_place}


def cases(device: torch.device, quick: bool) -> list[Case]:
    sets = [("resnet50/16" if quick else "resnet50", RESNET50_TINY if quick else RESNET50),
            ("digits MLP", DIGITS_MLP), ("single" if quick else "1M", [("x", (1 << 14,) if quick else ONE_MILLION)])]
    dtypes = [torch.float32] + ([torch.bfloat16] if device.type == "cuda" else [])
    result = []
    for dtype in dtypes:
        for name, shapes in sets:
            generator = torch.Generator(device=device).manual_seed(1)
            masks = [torch.rand(shape, generator=generator, device=device) < DENSITY for _, shape in shapes]
            # Each run its own tensors: the baseline's must not be those another run already zeroed.
            runs = {label: (lambda f=f, tensors=random_tensors(shapes, device, dtype=dtype), masks=masks:
                             f(tensors, masks))
                    for label, f in IMPLEMENTATIONS.items()}
            size = f"{describe(name, masks)}, d={DENSITY}, {str(dtype).removeprefix('torch.')}"
            result.append(Case("mask_in_place", size, runs, baseline="torch masked_fill_(~mask, 0)"))
    return result
