"""The Triton backend of sparsekern's ops, as torch.library custom ops.

`sparsekern.ops` imports this module on the first call that runs on Triton (importing Triton costs
seconds). Each function here has the call signature of the reference implementation it stands in
for; the kernels live in `sparsekern.triton_kernels`. The ops are `torch.library.custom_op`s with
fake implementations rather than `triton_op`s, which fail opcheck under the Triton interpreter.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _masked_linear_op, flat_layers, new_masks_like, reference
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


@torch.library.custom_op("sparsekern::prune_grow_triton", mutates_args=("weights", "state", "masked", "new_masks"))
def _prune_grow_op(weights: list[Tensor], masks: list[Tensor], prune_scores: list[Tensor], grow_scores: list[Tensor],
                   n: list[int], global_scope: bool, state: list[Tensor], state_layers: list[int],
                   masked: list[Tensor], masked_layers: list[int], prune_abs: bool, grow_abs: bool,
                   new_masks: list[Tensor]) -> None:
    # The same schema as the compiled op (csrc/ops.cpp); `active` is not needed: Triton counts on the device.
    _prune_grow.prune_grow(weights, masks, prune_scores, grow_scores, n, global_scope,
                           _per_layer(state, state_layers, len(weights)), _per_layer(masked, masked_layers, len(weights)),
                           None, prune_abs, grow_abs, new_masks)


@_prune_grow_op.register_fake
def _(weights, masks, prune_scores, grow_scores, n, global_scope, state, state_layers, masked, masked_layers,
      prune_abs, grow_abs, new_masks):
    return None


def _per_layer(tensors: list[Tensor], layers: list[int], count: int) -> list[list[Tensor]]:
    per_layer = [[] for _ in range(count)]
    for tensor, layer in zip(tensors, layers):
        per_layer[layer].append(tensor)
    return per_layer


def topk_mask(scores: list[Tensor], k: int) -> list[Tensor]:
    return list(_topk_mask_op(list(scores), k))


def topk_mask_per_tensor(scores: list[Tensor], k: list[int]) -> list[Tensor]:
    return list(_topk_mask_per_tensor_op(list(scores), list(k)))


def prune_grow(weights, masks, prune_scores, grow_scores, n, global_scope, state, masked, active, prune_abs,
               grow_abs) -> list[Tensor]:
    if masks[0].device.type == "cpu":
        _check_active_on_host(masks, n, global_scope, active)
    new = new_masks_like(masks)
    _prune_grow_op(list(weights), list(masks), list(prune_scores), list(grow_scores), list(n), global_scope,
                   *flat_layers(state), *flat_layers(masked), prune_abs, grow_abs, new)
    return new


def _check_active_on_host(masks: list[Tensor], n: list[int], global_scope: bool, active: list[int] | None) -> None:
    """n, and the caller's counts if given, checked against the masks as the C++ CPU kernel and the reference check
    them, where that costs no device read (under the interpreter, on CPU tensors): an n above a segment's active
    entries, or a stale count (DST's, after a mask was written unseen), is then refused on every CPU backend alike,
    before anything is written (prune_grow's checks count only on a GPU: the CPU kernels count as they go), rather
    than swapping entries that are not there here alone."""
    counts = reference.active_counts(masks)
    claims = [None] * len(n) if active is None else active
    for segment, (swap, claimed, count) in enumerate(zip(n, claims, [sum(counts)] if global_scope else counts)):
        reference.check_swap(swap, count, claimed, *reference.swap_names(segment, global_scope))


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
