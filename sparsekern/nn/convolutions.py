"""Sparse convolutions: SparseConv1d/2d/3d (nn.Conv1d/2d/3d) and SparseConvTranspose1d/2d/3d
(nn.ConvTranspose1d/2d/3d) whose weight is multiplied by a fixed bool mask (see `modules` for what every sparse
module shares: the mask, the zero-off-mask promise, state-dict loading)."""
from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F

from ..ops import _masked_linear_op
from .modules import (DenseClass, SparseModule, _adopt_parameters, _check_adoptable_weight, _check_dtype,
                      _copy_masked_into)


def _layer_doc(dense: type[nn.Module], base: str) -> str:
    """The docstring of the sparse convolution of `dense` on `base` (SparseConvNd or SparseConvTransposeNd), what
    help() shows first: one text for the six classes rather than six copies of it."""
    name, transposed = f"nn.{dense.__name__}", base == "SparseConvTransposeNd"
    if transposed:
        arguments, kernel = "forward's output_size included", "transposed convolution"
        layout = "(in_channels, out_channels / groups, ...)"
        more = "SparseConvTransposeNd (the weight's layout), SparseConvNd (its forward, measured against im2col)"
    else:
        arguments, kernel = "string padding and padding modes included", "convolution"
        layout = "(out_channels, in_channels / groups, ...)"
        more = "SparseConvNd (its forward, measured against im2col)"
    return f"""{name} whose weight is multiplied by a fixed bool `mask`: its output is always weight * mask's.

    Takes {name}'s arguments ({arguments}) and starts dense: its `mask` buffer,
    shaped like the weight {layout}, is all True. `sparsekern.sparsify(model, density)`
    makes a model's layers sparse (masks, per-layer densities, init); `set_mask(mask)` sets one layer's mask,
    zeroing the weight off it.

    * `zero_off_mask`: the layer's promise that every weight off the mask is exactly 0, so forward runs the dense
      {kernel} (oneDNN, cuDNN) on the weight itself and masks only the weight gradient. True after
      `set_mask` and sparsify; set it False (or call `zero_weights_off_mask()`) after writing into the weight off
      the mask, and forward masks the weight first.
    * `dense_grad = True`: the next backward also gives the gradient off the mask (RigL's growth reads it).
    * `from_dense(conv)` shares an {name}'s Parameters; `to_dense()` returns a plain {name} holding
      the masked weight (`sparsekern.densify(model)` turns a whole model back). A plain or torch-pruned
      {name}'s state dict loads into it. `dense_class` is {name}.
    * `nnz`, `density`, `masked_weight()`, `verify_zero_off_mask()`. No inference mode (SparseLinear's
      `to_inference`): forward costs the dense {kernel}'s.

    More: {more}, the docstring of `sparsekern.nn.modules` (the promise, autocast,
    torch.func, loading) and the README's Python API section."""


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
    __doc__ = _layer_doc(nn.Conv1d, "SparseConvNd")
    dense_class = DenseClass(nn.Conv1d)


class SparseConv2d(SparseConvNd, nn.Conv2d):
    __doc__ = _layer_doc(nn.Conv2d, "SparseConvNd")
    dense_class = DenseClass(nn.Conv2d)


class SparseConv3d(SparseConvNd, nn.Conv3d):
    __doc__ = _layer_doc(nn.Conv3d, "SparseConvNd")
    dense_class = DenseClass(nn.Conv3d)


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
    __doc__ = _layer_doc(nn.ConvTranspose1d, "SparseConvTransposeNd")
    dense_class = DenseClass(nn.ConvTranspose1d)


class SparseConvTranspose2d(SparseConvTransposeNd, nn.ConvTranspose2d):
    __doc__ = _layer_doc(nn.ConvTranspose2d, "SparseConvTransposeNd")
    dense_class = DenseClass(nn.ConvTranspose2d)


class SparseConvTranspose3d(SparseConvTransposeNd, nn.ConvTranspose3d):
    __doc__ = _layer_doc(nn.ConvTranspose3d, "SparseConvTransposeNd")
    dense_class = DenseClass(nn.ConvTranspose3d)


def _conv_arguments(conv: nn.Module) -> dict:
    arguments = dict(in_channels=conv.in_channels, out_channels=conv.out_channels,
                     kernel_size=conv.kernel_size, stride=conv.stride, padding=conv.padding,
                     dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
                     padding_mode=conv.padding_mode)
    if conv.transposed:
        arguments["output_padding"] = conv.output_padding
    return arguments
