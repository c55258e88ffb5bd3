"""Exact top-k selection masks in Triton: a radix select on order-preserving keys, no sort.

Contract: `sparsekern.ops.topk_mask` and `sparsekern.ops.reference.select`. Larger scores first; -0.0
equals +0.0; ties go to the lower flat position, counting row-major through the tensors in list
order; NaN ranks below every number and, in `topk_mask`, is never selected.

How
---
Every score becomes an unsigned key whose integer order is the selection order: -0.0 is read as
+0.0, a number with the sign bit clear gets the sign bit set, a negative number has all bits
flipped, and NaN becomes key 0, below every number (no number maps to 0). The keys are never
stored: every pass recomputes them from the scores.

The tensors of a list are visited in one launch each pass, through tables built on the host: a
pointer per tensor and, per block of BLOCK entries, which tensor and where in it. A selection
"segment" is either the whole list (global k) or one tensor (per-tensor k); each has its own
histogram and state, so both variants are the same launches.

For KEY_BITS-bit keys (16 for float16/bfloat16, 32 for float32, 64 for float64) there are
KEY_BITS/8 rounds of
  1. `_histogram_kernel`: per block, a 256-bin histogram of the next 8 key bits among eligible
     entries whose higher bits equal the segment's prefix so far, added to the segment's histogram
     with one atomic per non-empty bin;
  2. `_choose_digit_kernel` (one program per segment): the digit where the count from the top
     reaches the k still to place; it extends the prefix and subtracts the entries above it.
After the rounds the prefix is the k-th best key T, and `remaining` counts the entries equal to T
that must still be taken. `_count_ties_kernel` counts eligible entries equal to T per block, an
exclusive cumulative sum over blocks (torch) gives each block the ties before it in flat order, and
`_write_mask_kernel` selects key > T, plus key == T when the tie's rank in flat order (ties before
the block + its rank inside the block) is below `remaining`. Per selection: one host-to-device copy
of every table, 2*KEY_BITS/8 + 2 kernels, a cumulative sum and a zeroed histogram, whatever the
number of tensors (11 launches for float32); no host synchronisation except `topk_mask`'s check
that k does not exceed the non-NaN count (the reference raises there too).

Expected GPU cost (not measured: no GPU when this was written): each round reads every score once,
so float32 reads the scores 6 times (4 rounds, ties, write) and writes the masks once. For
ResNet-50's 25.5M float32 scores that is ~0.2 ms at 3 TB/s, above the 0.15 ms goal of the issue;
the next steps would be 11-bit digits (3 rounds) and compacting the candidates after round 1 so
later rounds read only the entries in the chosen bin.

Eligibility (`ELIGIBLE`): 0 = every non-NaN entry (`topk_mask`); 1 = entries where a bool tensor
is True; 2 = entries where it is False (prune_grow's two selections, which may take NaN scores,
after every number).
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK = 1024
BINS = 256
_KEY_BITS = {torch.float16: 16, torch.bfloat16: 16, torch.float32: 32, torch.float64: 64}
_TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
             torch.float64: tl.float64}
ALL_NUMBERS, WHERE_TRUE, WHERE_FALSE = 0, 1, 2


@triton.jit
def order_key(x, KEY_BITS: tl.constexpr, ABS: tl.constexpr = False):
    """Unsigned keys whose order is the selection order (NaN -> 0, below every number); of |x| with ABS."""
    if KEY_BITS == 16:
        bits = x.to(tl.uint16, bitcast=True).to(tl.uint32)
        sign = 0x8000
        ones = 0xFFFF
    elif KEY_BITS == 32:
        bits = x.to(tl.uint32, bitcast=True)
        sign = 0x80000000
        ones = 0xFFFFFFFF
    else:
        bits = x.to(tl.uint64, bitcast=True)
        sign = 0x8000000000000000
        ones = 0xFFFFFFFFFFFFFFFF
    if ABS:
        # |x| is x with its sign bit cleared, as the CUDA kernels take it. (tl.abs of fp16 crashes the
        # LLVM of Triton 3.6 on sm_90: "Cannot select v2f16 = scalar_to_vector".)
        bits = bits & (ones ^ sign)
    bits = tl.where(x == 0, tl.zeros_like(bits), bits)  # -0.0 ranks as +0.0
    key = tl.where((bits & sign) != 0, bits ^ ones, bits | sign)
    return tl.where(x != x, tl.zeros_like(key), key)


@triton.jit
def _block_keys(block_tensor_ptr, block_start_ptr, score_ptrs, numel_ptr, segment_ptr, eligible_ptrs,
                SCORE_DTYPE: tl.constexpr, KEY_BITS: tl.constexpr, ELIGIBLE: tl.constexpr,
                BLOCK: tl.constexpr, ABS: tl.constexpr):
    """This program's block: (keys, eligible, flat offsets in its tensor, tensor index, segment)."""
    block = tl.program_id(0)
    tensor = tl.load(block_tensor_ptr + block)
    # int64 offsets: a tensor may hold 2^31 entries or more.
    offs = tl.load(block_start_ptr + block).to(tl.int64) + tl.arange(0, BLOCK)
    in_bounds = offs < tl.load(numel_ptr + tensor)
    scores = tl.load(score_ptrs + tensor).to(tl.pointer_type(SCORE_DTYPE))
    x = tl.load(scores + offs, mask=in_bounds, other=0)
    key = order_key(x, KEY_BITS, ABS)
    if ELIGIBLE == 0:
        eligible = in_bounds & (key != 0)
    else:
        # Flags read as bytes: any non-zero byte of a bool tensor is True, as torch reads it.
        flags = tl.load(tl.load(eligible_ptrs + tensor).to(tl.pointer_type(tl.uint8)) + offs,
                        mask=in_bounds, other=0)
        if ELIGIBLE == 1:
            eligible = in_bounds & (flags != 0)
        else:
            eligible = in_bounds & (flags == 0)
    return key, eligible, offs, tensor, tl.load(segment_ptr + tensor)


@triton.jit
def _segment_threshold(prefix_ptr, segment, KEY_BITS: tl.constexpr):
    """The segment's prefix, as an unsigned key of KEY_BITS bits (32 for 16-bit keys)."""
    prefix = tl.load(prefix_ptr + segment)
    if KEY_BITS == 64:
        threshold = prefix.to(tl.uint64, bitcast=True)
    else:
        threshold = prefix.to(tl.uint32)
    return threshold


@triton.jit
def _histogram_kernel(block_tensor_ptr, block_start_ptr, score_ptrs, numel_ptr, segment_ptr, eligible_ptrs,
                      prefix_ptr, hist_ptr,
                      SHIFT: tl.constexpr, SCORE_DTYPE: tl.constexpr, KEY_BITS: tl.constexpr,
                      ELIGIBLE: tl.constexpr, BLOCK: tl.constexpr, BINS: tl.constexpr, ABS: tl.constexpr):
    key, eligible, offs, tensor, segment = _block_keys(
        block_tensor_ptr, block_start_ptr, score_ptrs, numel_ptr, segment_ptr, eligible_ptrs,
        SCORE_DTYPE, KEY_BITS, ELIGIBLE, BLOCK, ABS)
    if SHIFT + 8 < KEY_BITS:
        prefix = _segment_threshold(prefix_ptr, segment, KEY_BITS)
        eligible = eligible & ((key >> (SHIFT + 8)) == (prefix >> (SHIFT + 8)))
    digit = ((key >> SHIFT) & 0xFF).to(tl.int32)
    counts = tl.histogram(digit, BINS, mask=eligible)
    bins = tl.arange(0, BINS)
    # Scores cluster in few exponents, so most bins are empty: skip their atomics.
    tl.atomic_add(hist_ptr + segment * BINS + bins, counts, mask=counts > 0)


@triton.jit
def _choose_digit_kernel(hist_ptr, prefix_ptr, remaining_ptr, SHIFT: tl.constexpr, BINS: tl.constexpr,
                         COMPLEMENT: tl.constexpr):
    segment = tl.program_id(0)
    bins = tl.arange(0, BINS)
    hist = tl.load(hist_ptr + segment * BINS + bins).to(tl.int64)
    remaining = tl.load(remaining_ptr + segment)
    if COMPLEMENT:  # the first round: `remaining` held how many eligible entries to leave out
        remaining = tl.sum(hist, axis=0) - remaining
    above = tl.sum(hist, axis=0) - tl.cumsum(hist, axis=0)  # entries in bins above each bin
    # The highest digit whose bin reaches `remaining` counting from the top (0 if none can: the
    # caller reports that k exceeds what is eligible).
    digit = tl.maximum(tl.max(tl.where(above + hist >= remaining, bins, -1), axis=0), 0)
    taken = tl.sum(tl.where(bins == digit, above, 0), axis=0)
    tl.store(remaining_ptr + segment, remaining - taken)
    tl.store(prefix_ptr + segment, tl.load(prefix_ptr + segment) | (digit.to(tl.int64) << SHIFT))


@triton.jit
def _count_ties_kernel(block_tensor_ptr, block_start_ptr, score_ptrs, numel_ptr, segment_ptr, eligible_ptrs,
                       prefix_ptr, ties_ptr,
                       SCORE_DTYPE: tl.constexpr, KEY_BITS: tl.constexpr, ELIGIBLE: tl.constexpr,
                       BLOCK: tl.constexpr, ABS: tl.constexpr):
    key, eligible, offs, tensor, segment = _block_keys(
        block_tensor_ptr, block_start_ptr, score_ptrs, numel_ptr, segment_ptr, eligible_ptrs,
        SCORE_DTYPE, KEY_BITS, ELIGIBLE, BLOCK, ABS)
    threshold = _segment_threshold(prefix_ptr, segment, KEY_BITS)
    tl.store(ties_ptr + tl.program_id(0), tl.sum((eligible & (key == threshold)).to(tl.int64), axis=0))


@triton.jit
def _write_mask_kernel(block_tensor_ptr, block_start_ptr, score_ptrs, numel_ptr, segment_ptr, eligible_ptrs,
                       prefix_ptr, remaining_ptr, ties_before_ptr, segment_first_block_ptr, out_ptrs,
                       SCORE_DTYPE: tl.constexpr, KEY_BITS: tl.constexpr, ELIGIBLE: tl.constexpr,
                       BLOCK: tl.constexpr, ABS: tl.constexpr):
    key, eligible, offs, tensor, segment = _block_keys(
        block_tensor_ptr, block_start_ptr, score_ptrs, numel_ptr, segment_ptr, eligible_ptrs,
        SCORE_DTYPE, KEY_BITS, ELIGIBLE, BLOCK, ABS)
    threshold = _segment_threshold(prefix_ptr, segment, KEY_BITS)
    tie = eligible & (key == threshold)
    # Rank of each tie in flat order within its segment.
    tie_rank = (tl.load(ties_before_ptr + tl.program_id(0))
                - tl.load(ties_before_ptr + tl.load(segment_first_block_ptr + segment))
                + tl.cumsum(tie.to(tl.int64), axis=0) - tie.to(tl.int64))
    selected = (eligible & (key > threshold)) | (tie & (tie_rank < tl.load(remaining_ptr + segment)))
    out = tl.load(out_ptrs + tensor).to(tl.pointer_type(tl.uint8))
    tl.store(out + offs, selected.to(tl.uint8), mask=offs < tl.load(numel_ptr + tensor))


def _pointers(tensors: Sequence[Tensor]) -> Tensor:
    """The tensors' data pointers, as a host int64 tensor (kernels cast them back to pointers)."""
    return torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64)


def to_device(table: Tensor, device: torch.device) -> Tensor:
    """A host table on `device`: from pinned memory without waiting on a GPU, as is on the CPU."""
    if device.type != "cuda":
        return table.to(device)
    return table.pin_memory().to(device, non_blocking=True)


def select(scores: Sequence[Tensor], counts: Tensor, segments: Sequence[int],
           eligible_mode: int = ALL_NUMBERS, eligible: Sequence[Tensor] | None = None, absolute: bool = False,
           complement: bool = False) -> tuple[list[Tensor], Tensor]:
    """Bool masks of the best entries of each segment, and how many entries each segment had eligible.

    Args:
        scores: contiguous tensors of one float dtype on one device, read in flat order.
        counts: int64 tensor on the host or that device, entries to select per segment (at most the
            eligible count: the caller checks with the returned counts), or with `complement` the
            eligible entries to leave out (prune_grow's keep step: its eligible count is found on
            the device).
        segments: per tensor, the index of its segment; a segment's tensors must be consecutive.
        eligible_mode, eligible: which entries may be selected (see the module docstring); `eligible`
            holds one contiguous bool tensor per score tensor for modes WHERE_TRUE and WHERE_FALSE
            (read as bytes: any non-zero byte is True).
        absolute: rank |score| instead of score.
    Nothing is read back to the host: the tables travel in one copy (from pinned memory on a GPU).
    """
    device = scores[0].device
    outputs = [torch.empty(s.shape, dtype=torch.bool, device=device) for s in scores]
    key_bits = _KEY_BITS[scores[0].dtype]
    blocks_per_tensor = [triton.cdiv(s.numel(), BLOCK) for s in scores]
    segment_count = max(segments) + 1
    if sum(blocks_per_tensor) == 0:
        return outputs, torch.zeros(segment_count, dtype=torch.int64, device=device)
    # Host-side tables: which tensor and where each block starts; each segment's first block.
    block_tensor = torch.repeat_interleave(torch.arange(len(scores)), torch.tensor(blocks_per_tensor))
    first_block_of_tensor = torch.tensor([0] + blocks_per_tensor).cumsum(0)
    block_start = (torch.arange(len(block_tensor)) - first_block_of_tensor[block_tensor]) * BLOCK
    segment_first_block = torch.zeros(segment_count, dtype=torch.int64)
    for tensor in reversed(range(len(scores))):
        segment_first_block[segments[tensor]] = first_block_of_tensor[tensor]
    # Every table, the prefixes and (when on the host) the counts travel in one host-to-device copy.
    names = ["block_tensor_ptr", "block_start_ptr", "score_ptrs", "numel_ptr", "segment_ptr", "eligible_ptrs",
             "segment_first_block_ptr", "out_ptrs", "prefix"]
    parts = [block_tensor, block_start, _pointers(scores), torch.tensor([s.numel() for s in scores]),
             torch.tensor(list(segments)), _pointers(eligible if eligible is not None else scores),
             segment_first_block, _pointers(outputs), torch.zeros(segment_count, dtype=torch.int64)]
    if counts.device.type == "cpu":
        names.append("remaining")
        parts.append(counts)
    packed = to_device(torch.cat([part.to(torch.int64) for part in parts]), device)
    tables = dict(zip(names, packed.split([part.numel() for part in parts])))
    prefix, segment_first_block, out_ptrs = tables.pop("prefix"), tables.pop("segment_first_block_ptr"), \
        tables.pop("out_ptrs")
    remaining = tables.pop("remaining") if "remaining" in tables else counts.to(torch.int64, copy=True)
    meta = dict(SCORE_DTYPE=_TL_DTYPE[scores[0].dtype], KEY_BITS=key_bits, ELIGIBLE=eligible_mode, BLOCK=BLOCK,
                ABS=absolute)
    grid = (len(block_tensor),)
    rounds = key_bits // 8
    hist = torch.zeros((rounds, segment_count, BINS), dtype=torch.int32, device=device)
    for round_ in range(rounds):
        shift = key_bits - 8 * (round_ + 1)
        _histogram_kernel[grid](**tables, prefix_ptr=prefix, hist_ptr=hist[round_], SHIFT=shift, BINS=BINS, **meta)
        _choose_digit_kernel[(segment_count,)](hist[round_], prefix, remaining, SHIFT=shift, BINS=BINS,
                                               COMPLEMENT=complement and round_ == 0)
    ties = torch.empty(len(block_tensor), dtype=torch.int64, device=device)
    _count_ties_kernel[grid](**tables, prefix_ptr=prefix, ties_ptr=ties, **meta)
    ties_before = ties.cumsum(0) - ties
    _write_mask_kernel[grid](**tables, prefix_ptr=prefix, remaining_ptr=remaining, ties_before_ptr=ties_before,
                             segment_first_block_ptr=segment_first_block, out_ptrs=out_ptrs, **meta)
    return outputs, hist[0].sum(1, dtype=torch.int64)


def _check_available(k: Sequence[int], available: Tensor) -> None:
    for wanted, have in zip(k, available.tolist()):
        if wanted > have:
            raise ValueError(f"k={wanted} is more than the {have} non-NaN scores available")


def topk_mask(scores: Sequence[Tensor], k: int) -> list[Tensor]:
    """Exactly k True entries over all of `scores` together (raises ValueError if k exceeds the
    non-NaN count)."""
    if not scores:
        _check_available([k], torch.zeros(1, dtype=torch.int64))
        return []
    flat = [s.contiguous() for s in scores]
    masks, available = select(flat, torch.tensor([k]), [0] * len(flat))
    _check_available([k], available)
    return masks


def topk_mask_per_tensor(scores: Sequence[Tensor], k: Sequence[int]) -> list[Tensor]:
    """k[i] True entries in each scores[i], selected separately."""
    if not scores:
        return []
    flat = [s.contiguous() for s in scores]
    masks, available = select(flat, torch.tensor(list(k)), list(range(len(flat))))
    _check_available(k, available)
    return masks
