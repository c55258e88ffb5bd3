"""Sparse convolutions: SparseConv1d/2d/3d (nn.Conv1d/2d/3d) and SparseConvTranspose1d/2d/3d
(nn.ConvTranspose1d/2d/3d) whose weight is multiplied by a fixed bool mask (see `modules` for what every sparse
module shares: the mask, the zero-off-mask promise, state-dict loading)."""
from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F

from ..ops import _masked_linear_op
from .modules import SparseModule, _adopt_parameters, _check_adoptable_weight, _check_dtype, _copy_masked_into


class SparseConvNd(SparseModule):
    """What SparseConv1d, SparseConv2d and SparseConv3d share: the arguments of the dense
    convolution they sparsify (string padding and padding modes included), forward, from_dense and
    to_dense. A subclass derives from this and from its dense module, named in `dense_class`.

    The forward runs the ordinary convolution (cuDNN / oneDNN) on the weight itself where it is 0
    off the mask (`zero_off_mask`), else on the masked weight. Lowering to `ops.masked_linear`
    through im2col (F.unfold) was the alternative: unfold materialises a kernel-size times larger
    input and its backward (fold) is slow. Forward+backward at 10% density on one CPU thread
    (`python -m benchmarks --only sparse_conv --threads 1`, sparsekern/bench/cases/sparse_conv.py),
    im2col ran at 0.2x (3x3, 64 channels, 32x32) to 0.8x (1x1) the dense convolution's speed in 2-d
    and at 0.5x-0.7x in 1-d (a speech model's kernels 11 and 3), while the sparse convolution ran at
    0.95x-1.0x of it in 1-d, 2-d and 3-d (a video network's 3x3x3 stages).
    """

    dense_class: type[nn.Module]

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 device=None, dtype=None):
        _check_dtype(dtype)
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         dilation=dilation, groups=groups, bias=bias, padding_mode=padding_mode,
                         device=device, dtype=dtype)
        self._init_mask()

    def forward(self, input: Tensor) -> Tensor:
        weight, mask, bias, zero_off_mask = self._forward_arguments()
        # `ops.weight_for_dense_kernel` without its public wrapper, a call less at every layer call.
        weight = _masked_linear_op.weight_for_dense_kernel(weight, mask, zero_off_mask, self.dense_grad)
        return self._conv_forward(input, weight, bias)

    @classmethod
    def from_dense(cls, conv: nn.Module) -> "SparseConvNd":
        """A sparse convolution (mask all True) sharing `conv`'s weight and bias Parameters (see
        SparseLinear.from_dense); `conv` must be a `dense_class`."""
        if not isinstance(conv, cls.dense_class):
            raise TypeError(f"{cls.__name__}.from_dense takes an nn.{cls.dense_class.__name__}, "
                            f"got {type(conv).__name__}")
        _check_adoptable_weight(cls, conv)
        sparse = cls(**_conv_arguments(conv), device="meta", dtype=conv.weight.dtype)
        return _adopt_parameters(sparse, conv)

    def to_dense(self) -> nn.Module:
        """A plain `dense_class` module with copies of the masked weight and the bias."""
        dense = self.dense_class(**_conv_arguments(self), device="meta", dtype=self.weight.dtype)
        return _copy_masked_into(dense, self)


class SparseConv1d(SparseConvNd, nn.Conv1d):
    """nn.Conv1d with a weight mask (see SparseConvNd)."""

    dense_class = nn.Conv1d


class SparseConv2d(SparseConvNd, nn.Conv2d):
    """nn.Conv2d with a weight mask (see SparseConvNd)."""

    dense_class = nn.Conv2d


class SparseConv3d(SparseConvNd, nn.Conv3d):
    """nn.Conv3d with a weight mask (see SparseConvNd)."""

    dense_class = nn.Conv3d


class SparseConvTransposeNd(SparseConvNd):
    """What SparseConvTranspose1d, SparseConvTranspose2d and SparseConvTranspose3d share (the decoders of
    U-Nets, GAN generators, autoencoders): a transposed convolution multiplying by weight * mask, with the
    arguments, forward (`output_size` included) and weight layout of the dense module it sparsifies.

    The weight, and so the mask, is laid out (in_channels, out_channels / groups, *kernel_size), as in
    nn.ConvTranspose: a weight's output unit is its channel along dim 1 (within its group), which the
    sparsity-aware init counts fans by (`sparsekern.nn.init.fans`). Forward runs the dense transposed
    convolution, on the weight itself or the masked weight, as SparseConvNd's forward runs the convolution.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, output_padding=0,
                 groups: int = 1, bias: bool = True, dilation=1, padding_mode: str = "zeros", device=None,
                 dtype=None):
        # nn.Module's chain, past SparseConvNd's __init__, which takes no output_padding.
        super(SparseConvNd, self).__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                                           output_padding=output_padding, groups=groups, bias=bias,
                                           dilation=dilation, padding_mode=padding_mode, device=device,
                                           dtype=dtype)
        self._init_mask()

    def forward(self, input: Tensor, output_size: list[int] | None = None) -> Tensor:
        if self.padding_mode != "zeros":   # as nn.ConvTranspose's forward checks it: it may be set after __init__
            raise ValueError(f"Only 'zeros' padding mode is supported for {type(self).__name__}")
        weight, mask, bias, zero_off_mask = self._forward_arguments()
        weight = _masked_linear_op.weight_for_dense_kernel(weight, mask, zero_off_mask, self.dense_grad)
        dims = len(self.kernel_size)
        output_padding = self._output_padding(input, output_size, self.stride, self.padding, self.kernel_size,
                                              dims, self.dilation)
        return _CONV_TRANSPOSE[dims](input, weight, bias, self.stride, self.padding, output_padding, self.groups,
                                     self.dilation)


_CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


class SparseConvTranspose1d(SparseConvTransposeNd, nn.ConvTranspose1d):
    """nn.ConvTranspose1d with a weight mask (see SparseConvTransposeNd)."""

    dense_class = nn.ConvTranspose1d


class SparseConvTranspose2d(SparseConvTransposeNd, nn.ConvTranspose2d):
    """nn.ConvTranspose2d with a weight mask (see SparseConvTransposeNd)."""

    dense_class = nn.ConvTranspose2d


class SparseConvTranspose3d(SparseConvTransposeNd, nn.ConvTranspose3d):
    """nn.ConvTranspose3d with a weight mask (see SparseConvTransposeNd)."""

    dense_class = nn.ConvTranspose3d


def _conv_arguments(conv: nn.Module) -> dict:
    arguments = dict(in_channels=conv.in_channels, out_channels=conv.out_channels,
                     kernel_size=conv.kernel_size, stride=conv.stride, padding=conv.padding,
                     dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
                     padding_mode=conv.padding_mode)
    if conv.transposed:
        arguments["output_padding"] = conv.output_padding
    return arguments
