"""The specification of every sparsekern op, in short, plain PyTorch.

Every backend must return exactly what these functions return (bit for bit for the mask ops,
within dtype tolerance for the matmuls). They assume valid inputs: argument checks live in
`sparsekern.ops`, which calls these as the `reference` backend.

Selection rule shared by the mask ops: entries are ranked by score, larger first; NaN ranks below
every number (-inf included); equal scores (+0.0 and -0.0 are equal) rank by lower flat position,
counting row-major through the tensors in list order.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def rank(flat: Tensor) -> Tensor:
    """Positions of the 1-D tensor `flat`, best first under the selection rule."""
    is_nan = torch.isnan(flat)
    # Stable sorts keep the earlier position first among equals; the second sort moves NaN
    # behind every number (including -inf) without disturbing either group's order.
    by_score = torch.sort(flat.masked_fill(is_nan, float("-inf")), descending=True, stable=True).indices
    return by_score[torch.sort(is_nan[by_score].to(torch.uint8), stable=True).indices]


def select(flat: Tensor, eligible: Tensor, k: int) -> Tensor:
    """Bool mask of the k best entries of `flat` among those where `eligible` is True."""
    candidates = eligible.nonzero().squeeze(1)
    # candidates are in increasing position order, so ranking the gathered scores keeps the tie rule.
    chosen = candidates[rank(flat[candidates])[:k]]
    selected = torch.zeros_like(eligible)
    selected[chosen] = True
    return selected


def count_numbers(scores: list[Tensor]) -> int:
    """How many entries of `scores` are not NaN (the most any selection may take)."""
    return sum(int((~torch.isnan(s)).sum()) for s in scores)


def check_enough_numbers(scores: list[Tensor], k: int, what: str = "k") -> None:
    available = count_numbers(scores)
    if k > available:
        raise ValueError(f"{what}={k} is more than the {available} non-NaN scores available")


def topk_mask(scores: list[Tensor], k: int) -> list[Tensor]:
    """One global selection: exactly k True entries over all of `scores`."""
    check_enough_numbers(scores, k)
    if not scores:
        return []
    flat = torch.cat([s.reshape(-1) for s in scores])
    selected = select(flat, torch.ones_like(flat, dtype=torch.bool), k)
    return [part.view(s.shape) for part, s in zip(selected.split([s.numel() for s in scores]), scores)]


def topk_mask_per_tensor(scores: list[Tensor], k: list[int]) -> list[Tensor]:
    """Each tensor's own selection of k[i] entries."""
    return [topk_mask([s], ki)[0] for s, ki in zip(scores, k)]


def as_flags(mask: Tensor) -> Tensor:
    """A bool mask as torch reads it: any non-zero byte is True (uint8 data viewed as bool included)."""
    return mask.view(torch.uint8) != 0


def active_counts(masks: list[Tensor]) -> list[int]:
    """True entries of each mask, read once for the whole list (one host read on a GPU)."""
    if not masks:
        return []
    # count_nonzero of the bytes counts what as_flags marks, without making the flags first (5x faster).
    return torch.stack([torch.count_nonzero(m.view(torch.uint8)) for m in masks]).tolist()


def prune_grow(weights: list[Tensor], masks: list[Tensor], prune_scores: list[Tensor], grow_scores: list[Tensor],
               n: list[int], global_scope: bool, state: list[list[Tensor]], masked: list[list[Tensor]],
               active: list[int] | None = None, prune_abs: bool = False, grow_abs: bool = False) -> list[Tensor]:
    """Drop-and-grow over a list of layers; returns the new masks (contiguous bool tensors).

    Selections run per segment: each layer alone (n[i] for layer i), or, with global_scope, the
    whole list as one flat sequence (n[0]). A segment keeps the (active - n) active entries with the
    highest prune score, then grows the n entries with the highest grow score among all it did not
    keep (just-dropped ones included). Scores are ranked as they are, or by |score| with
    prune_abs / grow_abs. NaN scores rank lowest; they never raise here.

    Then, for each layer (old = masks, new = the result, newly grown = new & ~old):
    weights[i] and every tensor of state[i] become 0 off the new mask and at newly grown positions;
    every tensor of masked[i] becomes 0 off the new mask. All selections finish before anything is
    written, so scores may be the very tensors being written. `active`, when given, holds the
    caller's count of active entries per segment and must be right.
    """
    flags = [as_flags(m).reshape(-1) for m in masks]
    segments = [list(range(len(weights)))] if global_scope else [[layer] for layer in range(len(weights))]
    new = [None] * len(weights)
    for segment, (swap, layers) in enumerate(zip(n, segments)):
        old = torch.cat([flags[layer] for layer in layers]) if layers else torch.zeros(0, dtype=torch.bool)
        count = int(old.sum())
        check_swap(swap, count, None if active is None else active[segment], *swap_names(segment, global_scope))
        prune = _flat_scores([prune_scores[layer] for layer in layers], prune_abs)
        grow = _flat_scores([grow_scores[layer] for layer in layers], grow_abs)
        kept = select(prune, old, count - swap)
        grown = select(grow, ~kept, swap)
        sizes = [flags[layer].numel() for layer in layers]
        for layer, part in zip(layers, (kept | grown).split(sizes)):
            new[layer] = part.view(masks[layer].shape)
    apply_masks(weights, masks, new, state, masked)
    return new


def apply_masks(weights: list[Tensor], old: list[Tensor], new: list[Tensor], state: list[list[Tensor]],
                masked: list[list[Tensor]]) -> None:
    """What a mask update does to the tensors of each layer, old masks to new: weights[i] and every
    tensor of state[i] become 0 off the new mask and at newly grown entries (new & ~old); every
    tensor of masked[i] becomes 0 off the new mask."""
    for weight, before, after, zeroed_like_weight, zeroed_off_mask in zip(weights, old, new, state, masked):
        after = as_flags(after)
        off = ~after
        off_or_grown = off | (after & ~as_flags(before))
        weight.masked_fill_(off_or_grown, 0)
        for tensor in zeroed_like_weight:
            tensor.masked_fill_(off_or_grown, 0)
        for tensor in zeroed_off_mask:
            tensor.masked_fill_(off, 0)


def _flat_scores(scores: list[Tensor], absolute: bool) -> Tensor:
    flat = torch.cat([s.reshape(-1) for s in scores]) if scores else torch.zeros(0)
    return flat.abs() if absolute else flat


def swap_names(segment: int, global_scope: bool, single: bool = False) -> tuple[str, str]:
    """How check_swap names a segment's n and its masks, as sparsekern.ops.prune_grow's arguments."""
    if single:
        return "n", "mask has"
    if global_scope:
        return "n", "the masks have"
    return f"n[{segment}]", f"masks[{segment}] has"


def check_swap(swap: int, count: int, claimed: int | None, n_name: str, owner: str) -> None:
    """Raises ValueError unless 0 <= swap <= count, a segment's active count, and the caller's claimed
    count (if any) is that count."""
    if claimed is not None and claimed != count:
        raise ValueError(f"{n_name.replace('n', 'active', 1)} is {claimed} but {owner} {count} active entries")
    if not 0 <= swap <= count:
        raise ValueError(f"{n_name} must be in [0, {count}] ({owner} {count} active entries), got {swap}")


def masked_weight(weight: Tensor, mask: Tensor) -> Tensor:
    """weight where mask is True, else 0 (a select, so inf or NaN off the mask cannot leak)."""
    return torch.where(mask, weight, torch.zeros((), dtype=weight.dtype, device=weight.device))


def masked_linear(x: Tensor, weight: Tensor, mask: Tensor, bias: Tensor | None = None) -> Tensor:
    """y = x @ (weight * mask).T + bias, over any leading batch dims of x."""
    return torch.nn.functional.linear(x, masked_weight(weight, mask), bias)


def rows(t: Tensor) -> Tensor:
    """t as a 2-D (batch rows, features) tensor; reshape(-1, 0) would be ambiguous for 0 features."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


def masked_linear_grad_input(grad_out: Tensor, weight: Tensor, mask: Tensor) -> Tensor:
    """dx = dy @ (weight * mask)."""
    return grad_out @ masked_weight(weight, mask)


def masked_linear_grad_weight(grad_out: Tensor, x: Tensor, mask: Tensor, dense_grad: bool) -> Tensor:
    """dweight = dy.T @ x over all batch rows, times mask unless the dense gradient is asked for."""
    grad = rows(grad_out).T @ rows(x)
    return grad if dense_grad else masked_weight(grad, mask)


# Packed weights for sparse_linear (layout: sparsekern.ops.packing.PackedWeight).
BITS_PER_WORD = 32
WORDS_PER_CHUNK = 32


def pack(weight: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """The bitmap layout of weight where mask: bitmap (int32), values, chunk_offsets (int64)."""
    out_features, in_features = weight.shape
    words = -(-in_features // BITS_PER_WORD)
    padded = torch.nn.functional.pad(mask, (0, words * BITS_PER_WORD - in_features))
    bits = padded.reshape(out_features, words, BITS_PER_WORD).to(torch.int64)
    word_values = (bits << torch.arange(BITS_PER_WORD, device=mask.device)).sum(-1)
    bitmap = torch.where(word_values >= 2**31, word_values - 2**32, word_values).to(torch.int32)
    return {"bitmap": bitmap, "values": weight[mask], "chunk_offsets": chunk_offsets(bitmap)}


def popcount(bitmap: Tensor) -> Tensor:
    """Set bits of each int32 word, as int64 (a SWAR count: torch has no popcount op)."""
    v = bitmap.to(torch.int64) & 0xFFFFFFFF
    v = v - ((v >> 1) & 0x55555555)
    v = (v & 0x33333333) + ((v >> 2) & 0x33333333)
    v = (v + (v >> 4)) & 0x0F0F0F0F
    return ((v * 0x01010101) & 0xFFFFFFFF) >> 24


def chunk_offsets(bitmap: Tensor) -> Tensor:
    """The chunk_offsets of a bitmap: row-major exclusive running count of set bits per 1024-column chunk."""
    out_features, words = bitmap.shape
    chunks = -(-words // WORDS_PER_CHUNK)
    counts = torch.nn.functional.pad(popcount(bitmap), (0, chunks * WORDS_PER_CHUNK - words))
    per_chunk = counts.reshape(out_features, chunks, WORDS_PER_CHUNK).sum(-1).reshape(-1)
    return (torch.cumsum(per_chunk, 0) - per_chunk).reshape(out_features, chunks)


def unpack(bitmap: Tensor, values: Tensor, in_features: int) -> Tensor:
    """The dense weight (zeros off the mask) of a packed one."""
    bit = torch.arange(BITS_PER_WORD, device=bitmap.device, dtype=torch.int32)
    mask = ((bitmap.unsqueeze(-1) >> bit) & 1).bool().reshape(bitmap.shape[0], bitmap.shape[1] * BITS_PER_WORD)[:, :in_features]
    weight = torch.zeros(mask.shape, dtype=values.dtype, device=values.device)
    weight[mask] = values
    return weight


def sparse_linear(x: Tensor, bitmap: Tensor, values: Tensor, chunk_offsets: Tensor,
                  bias: Tensor | None = None) -> Tensor:
    """y = x @ W.T + bias for the packed W, over any leading batch dims of x."""
    return torch.nn.functional.linear(x, unpack(bitmap, values, x.shape[-1]), bias)
