"""SparseConv2d forward+backward: the convolution on the weight itself, its gradient masked (what
SparseConv2d does while its weights are 0 off the mask), the convolution on the masked weight (its
masked path, for weights that are not), and lowering to `ops.masked_linear` through im2col (the
alternative it was chosen over), with a dense nn.Conv2d as the baseline.

Forward+backward takes the gradients of x and weight with `torch.autograd.grad` (no `.grad`
accumulation timed).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from ... import ops
from ...nn import SparseConv2d
from ..core import Case

OPS = ("sparse conv2d forward+backward",)

DENSITY = 0.1
# (batch, in_channels, out_channels, height = width, kernel): ResNet-like stages.
SIZES = {"cpu": [(16, 64, 64, 32, 3), (16, 256, 256, 8, 3), (16, 64, 256, 32, 1)],
         "cuda": [(64, 64, 64, 56, 3), (64, 256, 256, 14, 3), (64, 256, 1024, 14, 1)]}
QUICK_SIZES = [(2, 8, 8, 6, 3)]


def im2col_masked_linear(x, weight, mask, padding):
    """Convolution (stride 1, groups 1) as unfold + masked_linear."""
    out_channels, _, kernel, _ = weight.shape
    columns = F.unfold(x, kernel, padding=padding)
    y = ops.masked_linear(columns.transpose(1, 2), weight.reshape(out_channels, -1), mask.reshape(out_channels, -1))
    size = x.shape[-1] + 2 * padding - kernel + 1
    return y.transpose(1, 2).reshape(x.shape[0], out_channels, size, size)


def _forward_backward(function, x, weight, grad_out):
    def run():
        y = function(x, weight)
        return torch.autograd.grad(y, (x, weight), grad_out)
    return run


def _case(device, generator, batch, in_channels, out_channels, size, kernel) -> Case:
    padding = kernel // 2
    layer = SparseConv2d(in_channels, out_channels, kernel, padding=padding, bias=False, device=device)
    layer.set_mask(torch.rand(layer.weight.shape, generator=generator, device=device) < DENSITY)
    masked_path = copy.deepcopy(layer)
    masked_path.zero_off_mask = False
    x = torch.randn(batch, in_channels, size, size, generator=generator, device=device, requires_grad=True)
    grad_out = torch.randn(batch, out_channels, size, size, generator=generator, device=device)
    runs = {  # label: (function of (x, weight), the weight it differentiates)
        "SparseConv2d (conv2d on the weight, gradient masked)": (lambda x, w: layer(x), layer.weight),
        "SparseConv2d, masked path (conv2d on the masked weight)": (lambda x, w: masked_path(x), masked_path.weight),
        "im2col + masked_linear": (lambda x, w: im2col_masked_linear(x, w, layer.mask, padding), layer.weight),
        "torch dense conv2d": (lambda x, w: F.conv2d(x, w, padding=padding), layer.weight),
    }
    return Case("sparse conv2d forward+backward",
                f"{batch}x{in_channels}x{size}x{size} -> {out_channels}, k={kernel}, d={DENSITY}",
                {label: _forward_backward(function, x, weight, grad_out) for label, (function, weight) in runs.items()},
                baseline="torch dense conv2d")


def cases(device: torch.device, quick: bool) -> list[Case]:
    generator = torch.Generator(device=device).manual_seed(0)
    sizes = QUICK_SIZES if quick else SIZES.get(device.type, SIZES["cpu"])
    return [_case(device, generator, *size) for size in sizes]
