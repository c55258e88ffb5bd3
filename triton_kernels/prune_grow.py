"""One drop-and-grow mask update in Triton (RigL, SET, MEST, ...).

Contract: `sparsekern.ops.prune_grow` and `sparsekern.ops.reference.prune_grow`. Two exact radix
selections (`topk_mask.select`) and one fused update:
  kept  = the (active - n) best active entries by prune_score (eligible: mask True);
  grown = the n best entries not kept by grow_score (eligible: kept False);
  `_apply_kernel` writes new = kept | grown and, in one pass, zeroes weight where ~new or where newly
  grown (grown & ~mask); `_zero_grown_kernel` zeroes each state tensor at newly grown positions.
NaN scores rank below every number and may be taken when nothing better is eligible, as in the
reference. The count `active - n` stays on the device: no host synchronisation.
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from .topk_mask import WHERE_FALSE, WHERE_TRUE, select

BLOCK = 1024


@triton.jit
def _apply_kernel(weight_ptr, old_ptr, kept_ptr, grown_ptr, new_ptr, numel, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_bounds = offs < numel
    old = tl.load(old_ptr + offs, mask=in_bounds, other=0) != 0
    kept = tl.load(kept_ptr + offs, mask=in_bounds, other=0) != 0
    grown = tl.load(grown_ptr + offs, mask=in_bounds, other=0) != 0
    new = kept | grown
    tl.store(new_ptr + offs, new, mask=in_bounds)
    # Only entries active before and after keep their weight (a dropped entry grown back is one);
    # read nothing where it is zeroed.
    keep_weight = new & old
    weight = tl.load(weight_ptr + offs, mask=in_bounds & keep_weight, other=0)
    tl.store(weight_ptr + offs, tl.where(keep_weight, weight, tl.zeros_like(weight)), mask=in_bounds)


@triton.jit
def _zero_grown_kernel(state_ptr, old_ptr, grown_ptr, numel, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_bounds = offs < numel
    newly_grown = ((tl.load(grown_ptr + offs, mask=in_bounds, other=0) != 0)
                   & (tl.load(old_ptr + offs, mask=in_bounds, other=1) == 0))
    zero = tl.zeros((BLOCK,), dtype=state_ptr.dtype.element_ty)
    tl.store(state_ptr + offs, zero, mask=in_bounds & newly_grown)


def _in_place(tensor: Tensor, launch) -> None:
    """Runs `launch` on a contiguous tensor, copying back when `tensor` is not contiguous."""
    work = tensor if tensor.is_contiguous() else tensor.contiguous()
    launch(work)
    if work is not tensor:
        tensor.copy_(work)


def prune_grow(weight: Tensor, mask: Tensor, prune_score: Tensor, grow_score: Tensor, n: int,
               state: Sequence[Tensor] = ()) -> Tensor:
    """Returns the new mask; mutates weight and state in place (see the module docstring)."""
    old = mask.contiguous()
    new = torch.empty(mask.shape, dtype=torch.bool, device=mask.device)
    numel = old.numel()
    if numel == 0:
        return new
    # Kept entries: the active ones minus n, counted on the device.
    keep_count = (old.sum(dtype=torch.int64) - n).reshape(1)
    (kept,), _ = select([prune_score.contiguous()], keep_count, [0], WHERE_TRUE, [old])
    (grown,), _ = select([grow_score.contiguous()], torch.tensor([n]), [0], WHERE_FALSE, [kept])
    grid = (triton.cdiv(numel, BLOCK),)
    _in_place(weight, lambda w: _apply_kernel[grid](w, old, kept, grown, new, numel, BLOCK=BLOCK))
    for tensor in state:
        _in_place(tensor, lambda s: _zero_grown_kernel[grid](s, old, grown, numel, BLOCK=BLOCK))
    return new
