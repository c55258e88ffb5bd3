"""The drop-and-grow mask update of a list of layers in Triton (RigL, SET, MEST, ...).

Contract: `sparsekern.ops.prune_grow` and `sparsekern.ops.reference.prune_grow`. Per segment (each
layer, or the whole list) two exact radix selections over every layer at once (`topk_mask.select`,
whose launches do not grow with the number of layers):
  kept  = the (active - n) best active entries by prune score (eligible: mask set; the active count
          is found on the device, in the first histogram round);
  grown = the n best entries not kept by grow score (eligible: kept False);
then `_new_mask_kernel` writes new = kept | grown for every layer in one launch, and
`_zero_kernel` zeroes every written tensor in one launch per element size: weights and `state`
tensors off the new mask and at newly grown entries (new & ~old), `masked` tensors off the new
mask. NaN scores rank below every number and may be taken when nothing better is eligible, as in
the reference. Masks are read as bytes (any non-zero byte is True). Offsets are int64. Nothing is
read back to the host; each launch's table travels in one copy from pinned memory.
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from .topk_mask import WHERE_FALSE, WHERE_TRUE, _pointers, select, to_device

BLOCK = 1024
LIKE_WEIGHT, OFF_MASK = 0, 1  # what a written tensor follows: the weight's zeros, or the new mask's
_BITS = {2: tl.int16, 4: tl.int32, 8: tl.int64}


@triton.jit
def _block_of(block_target_ptr, block_start_ptr, numel_ptr, BLOCK: tl.constexpr):
    """This program's block: (target index, int64 offsets, in bounds)."""
    block = tl.program_id(0)
    target = tl.load(block_target_ptr + block)
    offs = tl.load(block_start_ptr + block) + tl.arange(0, BLOCK)
    return target, offs, offs < tl.load(numel_ptr + target)


@triton.jit
def _new_mask_kernel(block_target_ptr, block_start_ptr, numel_ptr, kept_ptrs, grown_ptrs, new_ptrs,
                     BLOCK: tl.constexpr):
    layer, offs, in_bounds = _block_of(block_target_ptr, block_start_ptr, numel_ptr, BLOCK)
    kept = tl.load(tl.load(kept_ptrs + layer).to(tl.pointer_type(tl.uint8)) + offs, mask=in_bounds, other=0)
    grown = tl.load(tl.load(grown_ptrs + layer).to(tl.pointer_type(tl.uint8)) + offs, mask=in_bounds, other=0)
    new = ((kept != 0) | (grown != 0)).to(tl.uint8)
    tl.store(tl.load(new_ptrs + layer).to(tl.pointer_type(tl.uint8)) + offs, new, mask=in_bounds)


@triton.jit
def _zero_kernel(block_target_ptr, block_start_ptr, numel_ptr, data_ptrs, old_ptrs, new_ptrs, mode_ptr,
                 BITS: tl.constexpr, BLOCK: tl.constexpr):
    target, offs, in_bounds = _block_of(block_target_ptr, block_start_ptr, numel_ptr, BLOCK)
    old = tl.load(tl.load(old_ptrs + target).to(tl.pointer_type(tl.uint8)) + offs, mask=in_bounds, other=0) != 0
    new = tl.load(tl.load(new_ptrs + target).to(tl.pointer_type(tl.uint8)) + offs, mask=in_bounds, other=0) != 0
    # LIKE_WEIGHT: 0 off the new mask and at newly grown entries, i.e. kept only where active before
    # and after; OFF_MASK: 0 off the new mask. All-zero bits are +0.0 in every float format.
    keep = new & (old | (tl.load(mode_ptr + target) == 1))
    data = tl.load(data_ptrs + target).to(tl.pointer_type(BITS))
    zero = tl.zeros((BLOCK,), dtype=BITS)
    tl.store(data + offs, zero, mask=in_bounds & (keep == 0))


def _block_tables(numels: Sequence[int]) -> tuple[Tensor, Tensor]:
    """(target of each block, its first offset) for tensors of these sizes, on the host."""
    blocks = [triton.cdiv(n, BLOCK) for n in numels]
    block_target = torch.repeat_interleave(torch.arange(len(numels)), torch.tensor(blocks, dtype=torch.int64))
    first_block = torch.tensor([0] + blocks).cumsum(0)
    return block_target, (torch.arange(len(block_target)) - first_block[block_target]) * BLOCK


def _launch_over(kernel, tensors_numel: Sequence[int], device: torch.device, columns: Sequence[Tensor], **meta):
    """Launches `kernel` once over every block of every target, with per-target table columns."""
    block_target, block_start = _block_tables(tensors_numel)
    if len(block_target) == 0:
        return
    parts = [block_target, block_start, torch.tensor(list(tensors_numel), dtype=torch.int64), *columns]
    table = to_device(torch.cat([p.to(torch.int64) for p in parts]), device).split([p.numel() for p in parts])
    kernel[(len(block_target),)](*table, BLOCK=BLOCK, **meta)


def _contiguous(tensor: Tensor) -> Tensor:
    return tensor if tensor.is_contiguous() else tensor.contiguous()


def prune_grow(weights: Sequence[Tensor], masks: Sequence[Tensor], prune_scores: Sequence[Tensor],
               grow_scores: Sequence[Tensor], n: Sequence[int], global_scope: bool,
               state: Sequence[Sequence[Tensor]], masked: Sequence[Sequence[Tensor]], active=None,
               prune_abs: bool = False, grow_abs: bool = False, new_masks: Sequence[Tensor] | None = None
               ) -> list[Tensor]:
    """The new masks (into `new_masks` when given); weights, state and masked tensors mutated in
    place (see the module docstring). `active` is not needed: the counts are found on the device."""
    device = weights[0].device
    old = [_contiguous(m) for m in masks]
    new = list(new_masks) if new_masks is not None else [torch.empty(m.shape, dtype=torch.bool, device=device)
                                                         for m in masks]
    if sum(m.numel() for m in old) == 0:
        return new
    segments = [0] * len(weights) if global_scope else list(range(len(weights)))
    swaps = torch.tensor(list(n), dtype=torch.int64)
    # Both selections read every score before anything is written: a score may be a written tensor.
    kept, _ = select([_contiguous(s) for s in prune_scores], swaps, segments, WHERE_TRUE, old, absolute=prune_abs,
                     complement=True)
    grown, _ = select([_contiguous(s) for s in grow_scores], swaps, segments, WHERE_FALSE, kept, absolute=grow_abs)
    _launch_over(_new_mask_kernel, [m.numel() for m in old], device,
                 [_pointers(kept), _pointers(grown), _pointers(new)])
    targets = [(w, layer, LIKE_WEIGHT) for layer, w in enumerate(weights)]
    targets += [(t, layer, LIKE_WEIGHT) for layer, tensors in enumerate(state) for t in tensors]
    targets += [(t, layer, OFF_MASK) for layer, tensors in enumerate(masked) for t in tensors]
    for size, bits in _BITS.items():
        group = [(t, _contiguous(t), layer, mode) for t, layer, mode in targets if t.element_size() == size]
        if not group:
            continue
        _launch_over(_zero_kernel, [work.numel() for _, work, _, _ in group], device,
                     [_pointers([work for _, work, _, _ in group]), _pointers([old[layer] for _, _, layer, _ in group]),
                      _pointers([new[layer] for _, _, layer, _ in group]),
                      torch.tensor([mode for _, _, _, mode in group])], BITS=bits)
        for tensor, work, _, _ in group:
            if work is not tensor:  # worked on a contiguous copy: write the result back in place
                tensor.copy_(work)
    return new
