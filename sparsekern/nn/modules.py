"""Sparse layers: nn.Linear and nn.Conv2d whose weight is multiplied by a fixed bool mask.

Each sparse module holds `weight` (Parameter), `bias` (Parameter or None), a bool buffer `mask`
shaped like the weight (all True at construction) and a plain attribute `dense_grad` (False by
default). The forward only ever uses weight * mask: entries off the mask contribute nothing,
whatever they hold. Invariant: `set_mask` sets weight entries off the mask to exactly 0, and the
weight gradient is masked (unless `dense_grad`), so SGD, momentum, weight decay and Adam leave
those zeros alone without any per-step masking loop. (Writing `mask` directly skips the zeroing,
for algorithms such as OptG that keep pruned values.)

With `dense_grad = True` the next backward also gives the gradient at inactive positions (dy.T @ x
for a linear layer), which growth criteria such as RigL's read on mask-update steps. That gradient
is not masked: set `dense_grad` back to False, and mask or consume the gradient, before an
optimizer step, or the step moves inactive weights.

A plain nn.Linear / nn.Conv2d state dict loads into the matching sparse module (its missing
`mask` means all True), and `to_dense()` returns a plain module holding the masked weight.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import ops
from ..ops import reference
from ..ops.packing import PackedWeight


class SparseModule(nn.Module):
    """What SparseLinear and SparseConv2d share: the mask, its invariant and state-dict loading.

    A mixin: subclasses also derive from the dense module they sparsify and call `_init_mask()`
    once `weight` exists.
    """

    mask: Tensor
    dense_grad: bool

    def _init_mask(self) -> None:
        self.register_buffer("mask", torch.ones_like(self.weight, dtype=torch.bool))
        self.dense_grad = False

    @torch.no_grad()
    def set_mask(self, mask: Tensor) -> None:
        """Copies `mask` (bool, shaped like the weight) in and sets the weight to 0 off it."""
        if not isinstance(mask, Tensor):
            raise TypeError(f"mask must be a Tensor, got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
        if mask.shape != self.weight.shape:
            raise ValueError(f"mask must have the weight's shape {tuple(self.weight.shape)}, "
                             f"got {tuple(mask.shape)}")
        self.mask.copy_(mask)
        self.weight.masked_fill_(~self.mask, 0)

    @property
    def nnz(self) -> int:
        """Number of active (masked-in) weights."""
        return int(self.mask.sum())

    @property
    def density(self) -> float:
        """Fraction of the weight that is active."""
        return self.nnz / self.mask.numel()

    def masked_weight(self) -> Tensor:
        """weight where the mask is True, else 0 (a new tensor, not a view)."""
        return reference.masked_weight(self.weight, self.mask)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # load_state_dict hands each module its own copy of the dict, so filling in the mask of a
        # dense checkpoint here does not touch the caller's dict.
        if prefix + "mask" not in state_dict and prefix + "weight" in state_dict:
            weight = state_dict[prefix + "weight"]
            state_dict[prefix + "mask"] = torch.ones(weight.shape, dtype=torch.bool, device=weight.device)
        # Weight values load as saved: a checkpoint of a module that kept the invariant already
        # holds zeros off its mask, and OptG's deliberately kept values off the mask come back.
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        if self.mask.is_meta:  # no values to count
            return super().extra_repr()
        return f"{super().extra_repr()}, density={self.density:.4g}"


_PACKED_FIELDS = ("bitmap", "values", "chunk_offsets")


class SparseLinear(SparseModule, nn.Linear):
    """nn.Linear with a weight mask; forward through `sparsekern.ops.masked_linear`."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_mask()

    def forward(self, input: Tensor) -> Tensor:
        packed = self.packed
        if packed is not None:
            return ops.sparse_linear(input, packed, self.bias)
        return ops.masked_linear(input, self.weight, self.mask, self.bias, dense_grad=self.dense_grad)

    @torch.no_grad()
    def to_inference(self) -> "SparseLinear":
        """Inference mode: packs the masked weight (`sparsekern.ops.pack`) and runs forward through
        `ops.sparse_linear`, which reads only the kept entries at small batch (and multiplies
        densely by itself where that is faster). No gradients flow in this mode.

        The packed tensors are non-persistent buffers (`packed_bitmap`, `packed_values`,
        `packed_chunk_offsets`): they follow `.to(device)` and `.half()`, and the state dict stays
        that of a training module. The pack is a snapshot: call again after changing weight or
        mask, or `to_training()` to go back. Returns self.
        """
        packed = ops.pack(self.weight, self.mask)
        for name in _PACKED_FIELDS:
            self.register_buffer(f"packed_{name}", getattr(packed, name), persistent=False)
        return self

    def to_training(self) -> "SparseLinear":
        """Leaves inference mode: forward goes back to `ops.masked_linear`. Returns self."""
        for name in _PACKED_FIELDS:
            if f"packed_{name}" in self._buffers:
                del self._buffers[f"packed_{name}"]
        self.__dict__.pop("_packed_weight", None)
        return self

    @property
    def packed(self) -> PackedWeight | None:
        """The packed weight of inference mode, or None in training mode."""
        if "packed_values" not in self._buffers:
            return None
        tensors = [self._buffers[f"packed_{name}"] for name in _PACKED_FIELDS]
        # One PackedWeight per set of buffers, so the dense weight it keeps for the dense fallback
        # lasts across calls; .to()/.half() replace the buffers, and a new one is made.
        cached = self.__dict__.get("_packed_weight")
        if cached is None or any(a is not getattr(cached, name) for a, name in zip(tensors, _PACKED_FIELDS)):
            cached = PackedWeight(*tensors, self.in_features)
            self.__dict__["_packed_weight"] = cached
        return cached

    @classmethod
    def from_dense(cls, linear: nn.Linear) -> "SparseLinear":
        """A SparseLinear (mask all True) that shares `linear`'s weight and bias Parameters.

        Sharing keeps an optimizer built on the dense model valid; masking the result later
        therefore also zeroes `linear.weight`.
        """
        sparse = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                     device="meta", dtype=linear.weight.dtype)
        return _adopt_parameters(sparse, linear)

    def to_dense(self) -> nn.Linear:
        """A plain nn.Linear with copies of the masked weight and the bias."""
        dense = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                          device="meta", dtype=self.weight.dtype)
        return _copy_masked_into(dense, self)


class _MaskWeight(torch.autograd.Function):
    """weight * mask whose backward passes the gradient through masked, or dense if asked.

    The gradient that reaches the masked weight is the convolution's full weight gradient, so
    passing it through unmasked is exactly the dense gradient of the contract.
    """

    @staticmethod
    def forward(weight: Tensor, mask: Tensor, dense_grad: bool) -> Tensor:
        return reference.masked_weight(weight, mask)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, mask, dense_grad = inputs
        ctx.dense_grad = dense_grad
        ctx.save_for_backward(mask)

    @staticmethod
    def backward(ctx, grad: Tensor):
        if ctx.dense_grad:
            return grad, None, None
        (mask,) = ctx.saved_tensors
        return reference.masked_weight(grad, mask), None, None


class SparseConv2d(SparseModule, nn.Conv2d):
    """nn.Conv2d with a weight mask (same arguments, string padding and padding modes included).

    The forward masks the weight and runs the ordinary convolution (cuDNN / oneDNN). Lowering to
    `ops.masked_linear` through im2col (F.unfold) was the alternative; forward+backward on CPU at
    10% density it was 1.5x (1x1 kernel) to 9x (3x3, 64 channels, 32x32) slower, because unfold
    materialises a k_h*k_w times larger input and its backward (fold) is slow, while masking the
    weight took 0.95x-1.25x the time of a dense conv (`sparsekern/bench/cases/sparse_conv2d.py`).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 device=None, dtype=None):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         dilation=dilation, groups=groups, bias=bias, padding_mode=padding_mode,
                         device=device, dtype=dtype)
        self._init_mask()

    def forward(self, input: Tensor) -> Tensor:
        return self._conv_forward(input, _MaskWeight.apply(self.weight, self.mask, self.dense_grad),
                                  self.bias)

    @classmethod
    def from_dense(cls, conv: nn.Conv2d) -> "SparseConv2d":
        """A SparseConv2d (mask all True) sharing `conv`'s weight and bias Parameters (see
        SparseLinear.from_dense)."""
        sparse = cls(**_conv_arguments(conv), device="meta", dtype=conv.weight.dtype)
        return _adopt_parameters(sparse, conv)

    def to_dense(self) -> nn.Conv2d:
        """A plain nn.Conv2d with copies of the masked weight and the bias."""
        dense = nn.Conv2d(**_conv_arguments(self), device="meta", dtype=self.weight.dtype)
        return _copy_masked_into(dense, self)


def sparse_modules(model: nn.Module) -> list[tuple[str, SparseModule]]:
    """(qualified name, module) of every sparse module in `model`, in `named_modules()` order."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, SparseModule)]


def _conv_arguments(conv: nn.Conv2d) -> dict:
    return dict(in_channels=conv.in_channels, out_channels=conv.out_channels,
                kernel_size=conv.kernel_size, stride=conv.stride, padding=conv.padding,
                dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
                padding_mode=conv.padding_mode)


def _adopt_parameters(sparse: SparseModule, dense: nn.Module) -> SparseModule:
    # `sparse` was built on the meta device so that nothing is initialised twice.
    sparse.weight = dense.weight
    sparse.bias = dense.bias
    sparse.mask = torch.ones_like(dense.weight, dtype=torch.bool)
    sparse.train(dense.training)
    return sparse


def _copy_masked_into(dense: nn.Module, sparse: SparseModule) -> nn.Module:
    with torch.no_grad():
        dense.weight = nn.Parameter(sparse.masked_weight(), requires_grad=sparse.weight.requires_grad)
        if sparse.bias is not None:
            dense.bias = nn.Parameter(sparse.bias.detach().clone(), requires_grad=sparse.bias.requires_grad)
    dense.train(sparse.training)
    return dense
