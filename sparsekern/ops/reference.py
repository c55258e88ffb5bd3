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


def prune_grow(weight: Tensor, mask: Tensor, prune_score: Tensor, grow_score: Tensor, n: int,
               state: list[Tensor] = ()) -> Tensor:
    """Drop the n worst active entries by prune_score, grow the n best of the rest by grow_score.

    Mutates weight (0 off the new mask and at newly grown positions) and each state tensor (0 at
    newly grown positions). NaN scores rank lowest; they never raise here.
    """
    old = mask.reshape(-1)
    kept = select(prune_score.reshape(-1), old, int(old.sum()) - n)
    grown = select(grow_score.reshape(-1), ~kept, n)
    new = (kept | grown).view(mask.shape)
    newly_grown = (grown & ~old).view(mask.shape)
    weight.masked_fill_(~new | newly_grown, 0)
    for tensor in state:
        tensor.masked_fill_(newly_grown, 0)
    return new


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
