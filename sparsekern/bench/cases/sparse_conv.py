"""SparseConv1d/2d/3d and SparseConvTranspose2d forward+backward: the convolution on the weight itself,
its gradient masked (what a sparse convolution does while its weights are 0 off the mask), the
convolution on the masked weight (its masked path, for weights that are not), and, in 1-d and 2-d,
lowering to `ops.masked_linear` through im2col (the alternative it was chosen over), with the dense
convolution as the baseline.

Sizes: 1-d, a speech model's convolution blocks over 5 s of 10 ms frames (Jasper-like, kernel 11 and
3); 2-d, ResNet-like stages; 3-d, the first stages of a video network (C3D / R3D-like) on an 8-frame
(16 on CUDA) clip. Every convolution has stride 1 and "same" padding. The transposed convolution is a
DCGAN-like generator's upsampling stage (kernel 4, stride 2, padding 1: twice the spatial size).

Forward+backward takes the gradients of x and weight with `torch.autograd.grad` (no `.grad`
accumulation timed).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from ... import ops
from ...nn import SparseConv1d, SparseConv2d, SparseConv3d, SparseConvTranspose2d
from ..core import Case

OPS = ("sparse conv1d forward+backward", "sparse conv2d forward+backward", "sparse conv3d forward+backward",
       "sparse conv_transpose2d forward+backward")

DENSITY = 0.1
SPARSE = {1: SparseConv1d, 2: SparseConv2d, 3: SparseConv3d}
DENSE = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
# (batch, in_channels, out_channels, spatial size, kernel); the spatial size's length is the dimension.
SIZES = {"cpu": [(8, 256, 256, (500,), 11), (8, 512, 512, (500,), 3),
                 (16, 64, 64, (32, 32), 3), (16, 256, 256, (8, 8), 3), (16, 64, 256, (32, 32), 1),
                 (2, 64, 64, (8, 28, 28), 3), (2, 128, 128, (4, 14, 14), 3)],
         "cuda": [(32, 256, 256, (1000,), 11), (32, 512, 512, (1000,), 3),
                  (64, 64, 64, (56, 56), 3), (64, 256, 256, (14, 14), 3), (64, 256, 1024, (14, 14), 1),
                  (8, 64, 64, (16, 56, 56), 3), (8, 128, 128, (8, 28, 28), 3)]}
QUICK_SIZES = [(2, 8, 8, (12,), 3), (2, 8, 8, (6, 6), 3), (2, 4, 4, (4, 4, 4), 3)]
# (batch, in_channels, out_channels, input size) of a transposed convolution, kernel 4, stride 2, padding 1.
TRANSPOSED_SIZES = {"cpu": [(16, 256, 128, (8, 8)), (16, 128, 64, (16, 16))],
                    "cuda": [(64, 512, 256, (16, 16)), (64, 256, 128, (32, 32))]}
QUICK_TRANSPOSED_SIZES = [(2, 8, 4, (4, 4))]


def im2col_masked_linear(x, weight, mask, padding):
    """A 1-d or 2-d convolution (stride 1, groups 1) as unfold + masked_linear; 1-d as 2-d of height 1.

    (torch has no 3-d unfold; lowering a video convolution would also materialise a 27x larger input.)
    """
    flat = x.dim() == 3
    if flat:
        x, weight, mask = x.unsqueeze(2), weight.unsqueeze(2), mask.unsqueeze(2)
    out_channels, _, kernel_h, kernel_w = weight.shape
    columns = F.unfold(x, (kernel_h, kernel_w), padding=(0, padding) if flat else padding)
    y = ops.masked_linear(columns.transpose(1, 2), weight.reshape(out_channels, -1), mask.reshape(out_channels, -1))
    height = x.shape[2] + (0 if flat else 2 * padding) - kernel_h + 1
    width = x.shape[3] + 2 * padding - kernel_w + 1
    y = y.transpose(1, 2).reshape(x.shape[0], out_channels, height, width)
    return y.squeeze(2) if flat else y


def _forward_backward(function, x, weight, grad_out):
    def run():
        y = function(x, weight)
        return torch.autograd.grad(y, (x, weight), grad_out)
    return run


def _case(device, generator, batch, in_channels, out_channels, spatial, kernel) -> Case:
    n = len(spatial)
    padding = kernel // 2
    layer = SPARSE[n](in_channels, out_channels, kernel, padding=padding, bias=False, device=device)
    layer.set_mask(torch.rand(layer.weight.shape, generator=generator, device=device) < DENSITY)
    masked_path = copy.deepcopy(layer)
    masked_path.zero_off_mask = False
    x = torch.randn(batch, in_channels, *spatial, generator=generator, device=device, requires_grad=True)
    grad_out = torch.randn(batch, out_channels, *spatial, generator=generator, device=device)
    dense = DENSE[n]
    runs = {  # label: (function of (x, weight), the weight it differentiates)
        f"SparseConv{n}d (conv{n}d on the weight, gradient masked)": (lambda x, w: layer(x), layer.weight),
        f"SparseConv{n}d, masked path (conv{n}d on the masked weight)": (lambda x, w: masked_path(x),
                                                                       masked_path.weight),
        f"torch dense conv{n}d": (lambda x, w: dense(x, w, padding=padding), layer.weight),
    }
    if n < 3:
        runs["im2col + masked_linear"] = (lambda x, w: im2col_masked_linear(x, w, layer.mask, padding), layer.weight)
    return Case(f"sparse conv{n}d forward+backward",
                f"{batch}x{in_channels}x{'x'.join(map(str, spatial))} -> {out_channels}, k={kernel}, d={DENSITY}",
                {label: _forward_backward(function, x, weight, grad_out) for label, (function, weight) in runs.items()},
                baseline=f"torch dense conv{n}d")


def _transposed_case(device, generator, batch, in_channels, out_channels, spatial) -> Case:
    options = dict(stride=2, padding=1)
    layer = SparseConvTranspose2d(in_channels, out_channels, 4, bias=False, device=device, **options)
    layer.set_mask(torch.rand(layer.weight.shape, generator=generator, device=device) < DENSITY)
    masked_path = copy.deepcopy(layer)
    masked_path.zero_off_mask = False
    x = torch.randn(batch, in_channels, *spatial, generator=generator, device=device, requires_grad=True)
    grad_out = torch.randn(batch, out_channels, *[2 * size for size in spatial], generator=generator, device=device)
    runs = {
        "SparseConvTranspose2d (on the weight, gradient masked)": (lambda x, w: layer(x), layer.weight),
        "SparseConvTranspose2d, masked path (on the masked weight)": (lambda x, w: masked_path(x), masked_path.weight),
        "torch dense conv_transpose2d": (lambda x, w: F.conv_transpose2d(x, w, **options), layer.weight),
    }
    return Case("sparse conv_transpose2d forward+backward",
                f"{batch}x{in_channels}x{'x'.join(map(str, spatial))} -> {out_channels}, k=4, s=2, d={DENSITY}",
                {label: _forward_backward(function, x, weight, grad_out) for label, (function, weight) in runs.items()},
                baseline="torch dense conv_transpose2d")


def cases(device: torch.device, quick: bool) -> list[Case]:
    generator = torch.Generator(device=device).manual_seed(0)
    sizes = QUICK_SIZES if quick else SIZES.get(device.type, SIZES["cpu"])
    transposed = QUICK_TRANSPOSED_SIZES if quick else TRANSPOSED_SIZES.get(device.type, TRANSPOSED_SIZES["cpu"])
    return ([_case(device, generator, *size) for size in sizes]
            + [_transposed_case(device, generator, *size) for size in transposed])
