"""The Triton masked_linear against a dense torch.matmul (the baseline: the goal is <= 1.05x its
time for unstructured masks, and >= 5x faster for 32x32-block masks at density 0.1), mask-then-matmul
and, for block masks, torch's BSR matmul.

GPU sizes are those of the Triton issue: a 4096x4096 weight at 4096 and 8192 tokens, fp16 and bf16,
unstructured densities 0.5 to 0.05, forward+backward; an 8192x8192 weight at 4096 tokens, fp16,
32x32 blocks at density 0.1, forward and forward+backward (BSR forward only: it has no backward here).
On CPU only quick, tiny cases exist (the interpreter's timings say nothing about speed), and the
Triton run is included only where Triton can run (TRITON_INTERPRET=1 on CPU).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ... import ops
from ...ops import _backend
from ..core import Case, forced_backend
from .masked_linear import forward_backward_run, forward_run, zero_off_mask_linear

OPS = ("triton masked_linear forward", "triton masked_linear forward+backward")

UNSTRUCTURED_DENSITIES = (0.5, 0.2, 0.1, 0.05)
BLOCK = (32, 32)
BLOCK_DENSITY = 0.1
DENSE = "torch dense matmul"
# What a sparse module runs: the automatic choice for a weight that is 0 off the mask (cuBLAS on the
# weight for unstructured masks, the Triton kernel for block masks it can skip).
AUTO = "sparsekern[auto, zero off mask]"


def _dense(x: Tensor, weight: Tensor, mask: Tensor, bias: Tensor) -> Tensor:
    return torch.nn.functional.linear(x, weight, bias)


def _mask_then_matmul(x: Tensor, weight: Tensor, mask: Tensor, bias: Tensor) -> Tensor:
    return torch.nn.functional.linear(x, weight * mask, bias)


def _triton(x: Tensor, weight: Tensor, mask: Tensor, bias: Tensor) -> Tensor:
    with forced_backend("triton"):
        return ops.masked_linear(x, weight, mask, bias)


def _triton_zero_off_mask(x: Tensor, weight: Tensor, mask: Tensor, bias: Tensor) -> Tensor:
    with forced_backend("triton"):
        return ops.masked_linear(x, weight, mask, bias, zero_off_mask=True)


def _bsr_forward(x: Tensor, weight: Tensor, mask: Tensor, bias: Tensor):
    """y = x @ W_bsr^T + b with the masked weight stored as BSR once, outside the timing."""
    weight_bsr = (weight * mask).to_sparse_bsr(BLOCK)

    def run():
        with torch.no_grad():
            return (weight_bsr @ x.T).T + bias
    return run


def _block_mask(shape, density, generator, device) -> Tensor:
    rows, cols = -(-shape[0] // BLOCK[0]), -(-shape[1] // BLOCK[1])
    blocks = torch.rand((rows, cols), generator=generator, device=device) < density
    expanded = blocks.repeat_interleave(BLOCK[0], 0).repeat_interleave(BLOCK[1], 1)
    return expanded[:shape[0], :shape[1]].contiguous()


def _cases_for(device, dtype, tokens, in_features, out_features, masks, modes, generator):
    def randn(*shape):
        return torch.randn(shape, generator=generator, device=device).to(dtype)
    x, bias = randn(tokens, in_features), randn(out_features)
    grad_out = randn(tokens, out_features)
    implementations = {DENSE: _dense, "torch mask-then-matmul": _mask_then_matmul}
    implementations[AUTO] = zero_off_mask_linear
    if _backend.triton_missing_with_loaded_loops(device.type) is None:
        implementations["sparsekern[triton]"] = _triton
        implementations["sparsekern[triton, zero off mask]"] = _triton_zero_off_mask
    result = []
    for description, mask, with_bsr in masks:
        # Zero off the mask, so that every implementation, the zero-off-mask ones included, computes the same.
        weight = torch.where(mask, randn(out_features, in_features), 0)
        size = f"{tokens}x{in_features} -> {out_features}, {description}, {str(dtype).removeprefix('torch.')}"
        for mode in modes:
            if mode == "forward":
                runs = {label: forward_run(linear, x, weight, mask, bias) for label, linear in implementations.items()}
                if with_bsr:
                    runs["torch BSR matmul"] = _bsr_forward(x, weight, mask, bias)
            else:
                runs = {label: forward_backward_run(linear, x, weight, mask, bias, grad_out)
                        for label, linear in implementations.items()}
            result.append(Case(f"triton masked_linear {mode}", size, runs, baseline=DENSE))
    return result


def cases(device: torch.device, quick: bool) -> list[Case]:
    generator = torch.Generator(device=device).manual_seed(0)
    if device.type != "cuda":
        if not quick:
            return []
        unstructured = [("d=0.5", torch.rand((80, 96), generator=generator) < 0.5, False)]
        block = [("32x32 blocks d=0.25", _block_mask((64, 96), 0.25, generator, device), False)]
        return (_cases_for(device, torch.float32, 64, 96, 80, unstructured, ("forward+backward",), generator)
                + _cases_for(device, torch.float32, 64, 96, 64, block, ("forward",), generator))
    result = []
    for dtype in (torch.float16, torch.bfloat16):
        for tokens in (4096, 8192):
            masks = [(f"d={density}", torch.rand((4096, 4096), generator=generator, device=device) < density, False)
                     for density in UNSTRUCTURED_DENSITIES]
            result += _cases_for(device, dtype, tokens, 4096, 4096, masks, ("forward+backward",), generator)
    block = [(f"32x32 blocks d={BLOCK_DENSITY}", _block_mask((8192, 8192), BLOCK_DENSITY, generator, device), True)]
    result += _cases_for(device, torch.float16, 4096, 8192, 8192, block, ("forward", "forward+backward"), generator)
    return result
