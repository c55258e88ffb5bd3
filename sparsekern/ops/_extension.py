"""Loads the compiled extension sparsekern._C, if there is one, and says which kernels it registered.

Loading never fails the import: without the extension every op falls back to the next backend.
"""
from __future__ import annotations

import importlib.util
import logging

import torch

log = logging.getLogger("sparsekern")

try:
    from .. import _C  # noqa: F401  (importing runs the kernels' TORCH_LIBRARY registrations)

    LOAD_ERROR: str | None = None
except ImportError as error:
    _C = None
    LOAD_ERROR = f"{type(error).__name__}: {error}"
    # A build that exists but does not load deserves a warning; a pure-Python install does not.
    if importlib.util.find_spec("sparsekern._C") is not None:
        log.warning("sparsekern._C failed to load, using fallback backends: %s", LOAD_ERROR)
    else:
        log.debug("sparsekern._C is not built: %s", LOAD_ERROR)


def kernel_missing(op: str, device_type: str) -> str | None:
    """Why the extension cannot run `sparsekern::op` on this device type, or None if it can."""
    if _C is None:
        return f"extension not loaded ({LOAD_ERROR})"
    qualified = f"sparsekern::{op}"
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    if key is None:
        return f"no compiled kernels for device type {device_type!r}"
    try:
        registered = torch._C._dispatch_has_kernel_for_dispatch_key(qualified, key)
    except RuntimeError:
        return f"extension defines no op {qualified}"
    return None if registered else f"extension was built without a {key} kernel for {qualified}"


def op_defined(op: str) -> bool:
    """Whether the loaded extension defines `sparsekern::op` (an older build may lack a newer op)."""
    return _C is not None and torch._C._dispatch_has_kernel(f"sparsekern::{op}")


if _C is not None:
    # Shapes and dtypes of the compiled ops' outputs, for torch.compile and meta tensors.
    # The kernels return contiguous masks whatever the inputs' strides, so the fakes must too.
    @torch.library.register_fake("sparsekern::topk_mask")
    def _topk_mask_fake(scores, k):
        return [s.new_empty(s.shape, dtype=torch.bool) for s in scores]

    @torch.library.register_fake("sparsekern::topk_mask_per_tensor")
    def _topk_mask_per_tensor_fake(scores, k):
        return [s.new_empty(s.shape, dtype=torch.bool) for s in scores]

    @torch.library.register_fake("sparsekern::prune_grow")
    def _prune_grow_fake(weights, masks, prune_scores, grow_scores, n, global_scope, state, state_layers,
                         masked, masked_layers, active, prune_abs, grow_abs, new_masks):
        return None

    @torch.library.register_fake("sparsekern::sparse_linear")
    def _sparse_linear_fake(x, bitmap, values, chunk_offsets, bias):
        torch._check(values.dtype == x.dtype, lambda: f"values has dtype {values.dtype} but x has {x.dtype}")
        return x.new_empty((*x.shape[:-1], bitmap.shape[0]))

    @torch.library.register_fake("sparsekern::mask_grad_")
    def _mask_grad_fake(grad, mask):
        return None

    if op_defined("masked_weight"):  # an older build may lack it
        @torch.library.register_fake("sparsekern::masked_weight")
        def _masked_weight_fake(weight, mask):
            return torch.empty_like(weight, memory_format=torch.contiguous_format)
