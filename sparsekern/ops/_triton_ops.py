"""The Triton backend of sparsekern's ops, as torch.library custom ops.

`sparsekern.ops` imports this module on the first call that runs on Triton (importing Triton costs
seconds). Each function here has the call signature of the reference implementation it stands in
for; the kernels live in `sparsekern.triton_kernels`. The ops are `torch.library.custom_op`s with
fake implementations rather than `triton_op`s, which fail opcheck under the Triton interpreter.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from . import _masked_linear_op
from ..triton_kernels import masked_linear as _masked_linear
from ..triton_kernels import prune_grow as _prune_grow
from ..triton_kernels import topk_mask as _topk_mask


def _bool_like(t: Tensor) -> Tensor:
    return t.new_empty(t.shape, dtype=torch.bool)


@torch.library.custom_op("sparsekern::topk_mask_triton", mutates_args=())
def _topk_mask_op(scores: list[Tensor], k: int) -> list[Tensor]:
    return _topk_mask.topk_mask(scores, k)


@_topk_mask_op.register_fake
def _(scores, k):
    return [_bool_like(s) for s in scores]


@torch.library.custom_op("sparsekern::topk_mask_per_tensor_triton", mutates_args=())
def _topk_mask_per_tensor_op(scores: list[Tensor], k: list[int]) -> list[Tensor]:
    return _topk_mask.topk_mask_per_tensor(scores, k)


@_topk_mask_per_tensor_op.register_fake
def _(scores, k):
    return [_bool_like(s) for s in scores]


@torch.library.custom_op("sparsekern::prune_grow_triton", mutates_args=("weight", "state"))
def _prune_grow_op(weight: Tensor, mask: Tensor, prune_score: Tensor, grow_score: Tensor, n: int,
                   state: list[Tensor]) -> Tensor:
    return _prune_grow.prune_grow(weight, mask, prune_score, grow_score, n, state)


@_prune_grow_op.register_fake
def _(weight, mask, prune_score, grow_score, n, state):
    return _bool_like(mask)


def topk_mask(scores: list[Tensor], k: int) -> list[Tensor]:
    return list(_topk_mask_op(list(scores), k))


def topk_mask_per_tensor(scores: list[Tensor], k: list[int]) -> list[Tensor]:
    return list(_topk_mask_per_tensor_op(list(scores), list(k)))


def prune_grow(weight: Tensor, mask: Tensor, prune_score: Tensor, grow_score: Tensor, n: int,
               state: Sequence[Tensor] = ()) -> Tensor:
    return _prune_grow_op(weight, mask, prune_score, grow_score, n, list(state))


masked_linear = _masked_linear_op.define(
    "triton", _masked_linear.masked_linear, _masked_linear.masked_linear_grad_input,
    _masked_linear.masked_linear_grad_weight)


def skips_tiles(mask: Tensor) -> bool:
    """Whether the Triton masked_linear skips enough of `mask`'s tiles to be worth running.

    Under torch.compile's tracing the mask holds no values to look at: the answer is no, and the
    traced graph runs the dense kernel."""
    if torch.compiler.is_compiling():
        return False
    return _masked_linear.skips_tiles(mask)
