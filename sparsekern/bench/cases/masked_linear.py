"""masked_linear against mask-then-matmul (the baseline) and a dense matmul, forward and forward+backward.

Forward runs without autograd (inference); forward+backward takes the gradients of x, weight and
bias with `torch.autograd.grad`, so no `.grad` accumulation is timed.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ... import ops
from ..core import Case, sparsekern_runs

DENSITIES = (0.1, 0.5)
# (tokens, in_features, out_features)
SIZES = {"cpu": [(4096, 1024, 1024), (256, 1024, 1024)],
         "cuda": [(8192, 4096, 4096), (4096, 1024, 1024)]}
QUICK_SIZES = [(64, 96, 80)]


def torch_mask_then_matmul(x: Tensor, weight: Tensor, mask: Tensor, bias: Tensor) -> Tensor:
    return torch.nn.functional.linear(x, weight * mask, bias)


def torch_dense(x: Tensor, weight: Tensor, mask: Tensor, bias: Tensor) -> Tensor:
    return torch.nn.functional.linear(x, weight, bias)


def forward_run(linear, x, weight, mask, bias):
    def run():
        with torch.no_grad():
            return linear(x, weight, mask, bias)
    return run


def forward_backward_run(linear, x, weight, mask, bias, grad_out):
    inputs = [t.detach().requires_grad_() for t in (x, weight, bias)]

    def run():
        y = linear(inputs[0], inputs[1], mask, inputs[2])
        return torch.autograd.grad(y, inputs, grad_out)
    return run


def cases(device: torch.device, quick: bool) -> list[Case]:
    dtypes = [torch.float32] + ([torch.bfloat16] if device.type == "cuda" else [])
    sizes = QUICK_SIZES if quick else SIZES.get(device.type, SIZES["cpu"])
    generator = torch.Generator(device=device).manual_seed(0)
    result = []
    for dtype in dtypes:
        for tokens, in_features, out_features in sizes:
            def randn(*shape):
                return torch.randn(shape, generator=generator, device=device).to(dtype)
            x, weight, bias = randn(tokens, in_features), randn(out_features, in_features), randn(out_features)
            grad_out = randn(tokens, out_features)
            for density in DENSITIES:
                mask = torch.rand(weight.shape, generator=generator, device=device) < density
                size = (f"{tokens}x{in_features} -> {out_features}, d={density}, "
                        f"{str(dtype).removeprefix('torch.')}")
                implementations = {"torch mask-then-matmul": torch_mask_then_matmul,
                                   "torch dense matmul": torch_dense}
                for mode, wrap, extra in (("forward", forward_run, ()),
                                          ("forward+backward", forward_backward_run, (grad_out,))):
                    runs = {label: wrap(linear, x, weight, mask, bias, *extra)
                            for label, linear in implementations.items()}
                    runs.update(sparsekern_runs("masked_linear", device,
                                                wrap(ops.masked_linear, x, weight, mask, bias, *extra)))
                    result.append(Case(f"masked_linear {mode}", size, runs, baseline="torch mask-then-matmul"))
    return result
