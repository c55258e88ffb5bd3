"""masked_linear against mask-then-matmul (the baseline) and a dense matmul, forward and forward+backward.

Every backend runs the masked path (SPARSEKERN_BACKEND forces it); "sparsekern[auto, zero off mask]"
is what a sparse module runs: the automatic choice on a weight that is 0 off the mask, which is the
dense kernel on the weight itself with the weight gradient masked in place (or, on a GPU, the Triton
kernel where the mask's blocks let it skip tiles).

Forward runs without autograd (inference); forward+backward takes the gradients of x, weight and
bias with `torch.autograd.grad`, so no `.grad` accumulation is timed.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ... import ops
from ...ops import reference
from ..core import Case, forced_backend, sparsekern_runs

OPS = ("masked_linear forward", "masked_linear forward+backward")

DENSITIES = (0.1, 0.5)
# (tokens, in_features, out_features)
SIZES = {"cpu": [(4096, 1024, 1024), (256, 1024, 1024)],
         "cuda": [(8192, 4096, 4096), (4096, 1024, 1024)]}
QUICK_SIZES = [(64, 96, 80)]


def torch_mask_then_matmul(x: Tensor, weight: Tensor, mask: Tensor, bias: Tensor) -> Tensor:
    return torch.nn.functional.linear(x, weight * mask, bias)


def torch_dense(x: Tensor, weight: Tensor, mask: Tensor, bias: Tensor) -> Tensor:
    return torch.nn.functional.linear(x, weight, bias)


def zero_off_mask_linear(x: Tensor, weight: Tensor, mask: Tensor, bias: Tensor) -> Tensor:
    with forced_backend("auto"):
        return ops.masked_linear(x, weight, mask, bias, zero_off_mask=True)


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
                zeroed = reference.masked_weight(weight, mask)  # what a sparse module holds
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
                    runs["sparsekern[auto, zero off mask]"] = wrap(zero_off_mask_linear, x, zeroed, mask, bias, *extra)
                    result.append(Case(f"masked_linear {mode}", size, runs, baseline="torch mask-then-matmul"))
    return result
