"""Argument checks shared by every backend, run before any work so bad input changes nothing.

Type and dtype errors raise TypeError, shape and range errors ValueError; each names the argument.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from . import reference

SCORE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _shape(t: Tensor) -> tuple:
    return tuple(t.shape)


def tensor(value, name: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(value).__name__}")
    return value


def floating(value, name: str) -> Tensor:
    tensor(value, name)
    if value.dtype not in SCORE_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {value.dtype}")
    return value


def integer(value, name: str) -> int:
    # bool is an int subclass, and numpy/torch integer scalars are not ints: accept what indexes like one.
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    return value.__index__()


def in_range(value: int, low: int, high: int, name: str) -> int:
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return value


def same_device(tensors: Sequence[tuple[str, Tensor]]) -> torch.device:
    first_name, first = tensors[0]
    for name, t in tensors[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}")
    return first.device


def bool_mask(mask, name: str, like: Tensor, like_name: str) -> Tensor:
    tensor(mask, name)
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor, got {mask.dtype}")
    same_shape(mask, name, like, like_name)
    return mask


def same_shape(t: Tensor, name: str, like: Tensor, like_name: str) -> None:
    if t.shape != like.shape:
        raise ValueError(f"{name} must have the shape of {like_name} {_shape(like)}, got {_shape(t)}")


def scores_list(scores) -> list[Tensor]:
    """A list of score tensors of one float dtype on one device."""
    if isinstance(scores, Tensor) or not isinstance(scores, Sequence):
        raise TypeError(f"scores must be a list of Tensors, got {type(scores).__name__}")
    scores = list(scores)
    for i, s in enumerate(scores):
        floating(s, f"scores[{i}]")
        if s.dtype != scores[0].dtype:
            raise TypeError(f"scores[{i}] has dtype {s.dtype} but scores[0] has {scores[0].dtype}")
    if scores:
        same_device([(f"scores[{i}]", s) for i, s in enumerate(scores)])
    return scores


def topk_counts(k, scores: list[Tensor]):
    """k as an int (global selection) or a list of ints (one per tensor), each within range."""
    if isinstance(k, Sequence):
        k = list(k)
        if len(k) != len(scores):
            raise ValueError(f"k has {len(k)} entries but scores has {len(scores)} tensors")
        return [in_range(integer(ki, f"k[{i}]"), 0, s.numel(), f"k[{i}]")
                for i, (ki, s) in enumerate(zip(k, scores))]
    return in_range(integer(k, "k"), 0, sum(s.numel() for s in scores), "k")


def prune_grow_args(weight, mask, prune_score, grow_score, n, state) -> tuple[int, list[Tensor]]:
    """Checks prune_grow's arguments; returns n as an int and state as a list."""
    floating(weight, "weight")
    bool_mask(mask, "mask", weight, "weight")
    for name, score in (("prune_score", prune_score), ("grow_score", grow_score)):
        floating(score, name)
        same_shape(score, name, weight, "weight")
    if grow_score.dtype != prune_score.dtype:
        raise TypeError(f"grow_score has dtype {grow_score.dtype} but prune_score has {prune_score.dtype}")
    if isinstance(state, Tensor) or not isinstance(state, Sequence):
        raise TypeError(f"state must be a list of Tensors, got {type(state).__name__}")
    state = list(state)
    for i, s in enumerate(state):
        floating(s, f"state[{i}]")
        same_shape(s, f"state[{i}]", weight, "weight")
    same_device([("weight", weight), ("mask", mask), ("prune_score", prune_score),
                 ("grow_score", grow_score)] + [(f"state[{i}]", s) for i, s in enumerate(state)])
    n = integer(n, "n")
    active = int(mask.sum())
    if not 0 <= n <= min(active, mask.numel() - active):
        raise ValueError(f"n must be in [0, {min(active, mask.numel() - active)}] (mask has {active} active "
                         f"and {mask.numel() - active} inactive entries), got {n}")
    return n, state


def masked_linear_args(x, weight, mask, bias) -> None:
    floating(x, "x")
    floating(weight, "weight")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {_shape(weight)}")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight has dtype {weight.dtype} but x has {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x must end in in_features={weight.shape[1]}, got shape {_shape(x)}")
    bool_mask(mask, "mask", weight, "weight")
    tensors = [("x", x), ("weight", weight), ("mask", mask)]
    if bias is not None:
        floating(bias, "bias")
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {_shape(bias)}")
        if bias.dtype != x.dtype:
            raise TypeError(f"bias has dtype {bias.dtype} but x has {x.dtype}")
        tensors.append(("bias", bias))
    same_device(tensors)


def packed_weight(bitmap, values, chunk_offsets, in_features) -> int:
    """Checks that the three tensors of a packed weight are the layout of sparsekern.ops.packing for
    `in_features` columns, contents included: the kernels index `values` and x by them, so a bitmap
    that disagrees with `values` or `chunk_offsets` would make them read out of bounds. Returns
    in_features as an int. Meta tensors have no contents to check."""
    fields = [("bitmap", bitmap), ("values", values), ("chunk_offsets", chunk_offsets)]
    for name, value in fields:
        tensor(value, name)
        if value.layout != torch.strided:
            raise TypeError(f"{name} must be a dense (strided) tensor, got layout {value.layout}")
    if bitmap.dtype != torch.int32:
        raise TypeError(f"bitmap must be an int32 tensor, got {bitmap.dtype}")
    floating(values, "values")
    if chunk_offsets.dtype != torch.int64:
        raise TypeError(f"chunk_offsets must be an int64 tensor, got {chunk_offsets.dtype}")
    in_features = integer(in_features, "in_features")
    if in_features < 0:
        raise ValueError(f"in_features must be >= 0, got {in_features}")
    words = -(-in_features // reference.BITS_PER_WORD)
    if bitmap.dim() != 2 or bitmap.shape[1] != words:
        raise ValueError(f"bitmap must have shape (out_features, {words}) for in_features={in_features}, "
                         f"got {_shape(bitmap)}")
    if values.dim() != 1:
        raise ValueError(f"values must be 1-D, got shape {_shape(values)}")
    chunks = (bitmap.shape[0], -(-words // reference.WORDS_PER_CHUNK))
    if chunk_offsets.shape != chunks:
        raise ValueError(f"chunk_offsets must have shape {chunks} for bitmap {_shape(bitmap)}, "
                         f"got {_shape(chunk_offsets)}")
    same_device(fields)
    for name, value in fields:
        if not value.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    if bitmap.device.type != "meta":
        _packed_contents(bitmap, values, chunk_offsets, in_features)
    return in_features


def _packed_contents(bitmap: Tensor, values: Tensor, chunk_offsets: Tensor, in_features: int) -> None:
    """Padding bits clear, chunk_offsets the running counts of the bitmap's bits, one value per bit."""
    spare = in_features % reference.BITS_PER_WORD
    if spare and bitmap.numel() and bool((bitmap[:, -1] >> spare).any()):
        row = int((bitmap[:, -1] >> spare).ne(0).nonzero()[0, 0])
        raise ValueError(f"bitmap marks columns past in_features={in_features} (row {row})")
    expected = reference.chunk_offsets(bitmap)
    if not torch.equal(chunk_offsets, expected):
        row, chunk = (int(i) for i in chunk_offsets.ne(expected).nonzero()[0])
        raise ValueError(f"chunk_offsets disagree with bitmap: chunk_offsets[{row}, {chunk}] is "
                         f"{int(chunk_offsets[row, chunk])} but the bitmap marks {int(expected[row, chunk])} "
                         f"entries before that chunk")
    marked = int(reference.popcount(bitmap).sum())
    if values.numel() != marked:
        raise ValueError(f"values has {values.numel()} entries but bitmap marks {marked}")
