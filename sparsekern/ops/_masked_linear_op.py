"""Defines one backend's masked_linear as three torch.library custom ops with shared autograd.

Each backend (reference, Triton, ...) supplies its forward and its two backward products; this
module turns them into `sparsekern::masked_linear_<backend>` (+ `_grad_input_`, `_grad_weight_`)
with fake impls and the autograd formula of the contract, so every backend differentiates alike.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from . import reference


def define(backend: str, forward: Callable, grad_input: Callable, grad_weight: Callable):
    """Registers the three ops for `backend` and returns the differentiable forward op."""

    @torch.library.custom_op(f"sparsekern::masked_linear_{backend}", mutates_args=())
    def masked_linear(x: Tensor, weight: Tensor, mask: Tensor, bias: Optional[Tensor],
                      dense_grad: bool) -> Tensor:
        return forward(x, weight, mask, bias)

    @masked_linear.register_fake
    def _(x, weight, mask, bias, dense_grad):
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    @torch.library.custom_op(f"sparsekern::masked_linear_grad_input_{backend}", mutates_args=())
    def masked_linear_grad_input(grad_out: Tensor, weight: Tensor, mask: Tensor) -> Tensor:
        return grad_input(grad_out, weight, mask)

    @masked_linear_grad_input.register_fake
    def _(grad_out, weight, mask):
        return grad_out.new_empty((*grad_out.shape[:-1], weight.shape[1]))

    @torch.library.custom_op(f"sparsekern::masked_linear_grad_weight_{backend}", mutates_args=())
    def masked_linear_grad_weight(grad_out: Tensor, x: Tensor, mask: Tensor, dense_grad: bool) -> Tensor:
        return grad_weight(grad_out, x, mask, dense_grad)

    @masked_linear_grad_weight.register_fake
    def _(grad_out, x, mask, dense_grad):
        return grad_out.new_empty(mask.shape)

    def setup_context(ctx, inputs, output):
        x, weight, mask, bias, dense_grad = inputs
        ctx.dense_grad = dense_grad
        # Keep only what the requested gradients read: dx needs the weight, dweight needs x.
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None,
                              weight if ctx.needs_input_grad[0] else None, mask)

    def backward(ctx, grad_out):
        x, weight, mask = ctx.saved_tensors
        grad_x = masked_linear_grad_input(grad_out, weight, mask) if ctx.needs_input_grad[0] else None
        grad_weight_ = (masked_linear_grad_weight(grad_out, x, mask, ctx.dense_grad)
                        if ctx.needs_input_grad[1] else None)
        grad_bias = reference.rows(grad_out).sum(0) if ctx.needs_input_grad[3] else None
        return grad_x, grad_weight_, None, grad_bias, None

    masked_linear.register_autograd(backward, setup_context=setup_context)
    return masked_linear
