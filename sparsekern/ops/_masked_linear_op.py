"""masked_linear's autograd: one backend's three custom ops, and the dense-kernel path.

`define` turns a backend's forward and its two backward products into the torch.library custom ops
`sparsekern::masked_linear_<backend>` (+ `_grad_input_`, `_grad_weight_`) with fake impls and the
autograd formula of the contract, so every backend differentiates alike, to any order: the
derivatives of each product are again products of the three ops.

`weight_for_dense_kernel` is what a dense kernel (F.linear, a convolution) multiplies by: the weight
itself where it is already 0 off the mask, else the masked weight; its gradient meets the mask.
`masked_linear_dense_kernel` is masked_linear on the dense kernel in one C++ Function, which remakes the
masked weight for backward instead of keeping it.
"""
from __future__ import annotations

import threading
from typing import Callable, Optional

import torch
from torch import Tensor

from . import _extension, _transforms, reference


def define(backend: str, forward: Callable, grad_input: Callable, grad_weight: Callable):
    """Registers the three ops for `backend` and returns the differentiable forward op.

    forward(x, weight, mask, bias, zero_off_mask), grad_input(grad_out, weight, mask, zero_off_mask)
    and grad_weight(grad_out, x, mask, dense_grad) compute y, dx and dweight of the contract;
    `zero_off_mask` tells a backend that weight is 0 wherever mask is False, so it may skip the
    select (the result is the same).
    """

    @torch.library.custom_op(f"sparsekern::masked_linear_{backend}", mutates_args=())
    def masked_linear(x: Tensor, weight: Tensor, mask: Tensor, bias: Optional[Tensor],
                      dense_grad: bool, zero_off_mask: bool) -> Tensor:
        return forward(x, weight, mask, bias, zero_off_mask)

    @masked_linear.register_fake
    def _(x, weight, mask, bias, dense_grad, zero_off_mask):
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    # dense_grad: that of the masked_linear call whose dx this is, for the weight's gradient through dx.
    @torch.library.custom_op(f"sparsekern::masked_linear_grad_input_{backend}", mutates_args=())
    def masked_linear_grad_input(grad_out: Tensor, weight: Tensor, mask: Tensor, zero_off_mask: bool,
                                 dense_grad: bool) -> Tensor:
        return grad_input(grad_out, weight, mask, zero_off_mask)

    @masked_linear_grad_input.register_fake
    def _(grad_out, weight, mask, zero_off_mask, dense_grad):
        return grad_out.new_empty((*grad_out.shape[:-1], weight.shape[1]))

    @torch.library.custom_op(f"sparsekern::masked_linear_grad_weight_{backend}", mutates_args=())
    def masked_linear_grad_weight(grad_out: Tensor, x: Tensor, mask: Tensor, dense_grad: bool) -> Tensor:
        # Contiguous, as the fake says: dy.T @ x of transposed inputs comes out column-major (the
        # reference's), and a tracer that believed the fake's strides would read it wrongly.
        return grad_weight(grad_out, x, mask, dense_grad).contiguous()

    @masked_linear_grad_weight.register_fake
    def _(grad_out, x, mask, dense_grad):
        return grad_out.new_empty(mask.shape)

    def needs(ctx, *indices) -> bool:
        return any(ctx.needs_input_grad[i] for i in indices)

    # y = x @ Wm^T + b, Wm = where(mask, W, 0).
    def setup_context(ctx, inputs, output):
        x, weight, mask, bias, dense_grad, zero_off_mask = inputs
        ctx.dense_grad, ctx.zero_off_mask = dense_grad, zero_off_mask
        # Keep only what the requested gradients read: dx needs the weight, dweight needs x.
        ctx.save_for_backward(x if needs(ctx, 1) else None, weight if needs(ctx, 0) else None, mask)

    def backward(ctx, grad_out):
        x, weight, mask = ctx.saved_tensors
        grad_x = (masked_linear_grad_input(grad_out, weight, mask, ctx.zero_off_mask, ctx.dense_grad)
                  if needs(ctx, 0) else None)
        grad_weight_ = masked_linear_grad_weight(grad_out, x, mask, ctx.dense_grad) if needs(ctx, 1) else None
        grad_bias = reference.rows(grad_out).sum(0) if needs(ctx, 3) else None
        return grad_x, grad_weight_, None, grad_bias, None, None

    # dx = dy @ Wm: d/d(dy) = g @ Wm^T (the forward without bias), d/dW = (dy^T @ g) masked, or whole
    # with dense_grad: the mask passes the weight's derivatives straight through on every path, so
    # that the dense gradient of a loss that holds dx (a gradient penalty) is the dense layer's.
    def setup_grad_input(ctx, inputs, output):
        grad_out, weight, mask, zero_off_mask, dense_grad = inputs
        ctx.zero_off_mask, ctx.dense_grad = zero_off_mask, dense_grad
        ctx.save_for_backward(grad_out if needs(ctx, 1) else None, weight if needs(ctx, 0) else None, mask)

    def backward_grad_input(ctx, g):
        grad_out, weight, mask = ctx.saved_tensors
        d_grad_out = masked_linear(g, weight, mask, None, False, ctx.zero_off_mask) if needs(ctx, 0) else None
        d_weight = masked_linear_grad_weight(grad_out, g, mask, ctx.dense_grad) if needs(ctx, 1) else None
        return d_grad_out, d_weight, None, None, None

    # dW = dy^T @ x over all rows, masked unless dense: d/d(dy) = x @ Gm^T, d/dx = dy @ Gm, where
    # Gm is the incoming gradient masked like dW (the whole of it when dense).
    def setup_grad_weight(ctx, inputs, output):
        grad_out, x, mask, dense_grad = inputs
        ctx.dense_grad = dense_grad
        ctx.save_for_backward(x if needs(ctx, 0) else None, grad_out if needs(ctx, 1) else None, mask)

    def backward_grad_weight(ctx, g):
        x, grad_out, mask = ctx.saved_tensors
        if ctx.dense_grad:
            d_grad_out = torch.nn.functional.linear(x, g) if needs(ctx, 0) else None
            d_x = grad_out @ g if needs(ctx, 1) else None
        else:
            d_grad_out = masked_linear(x, g, mask, None, False, False) if needs(ctx, 0) else None
            d_x = masked_linear_grad_input(grad_out, g, mask, False, False) if needs(ctx, 1) else None
        return d_grad_out, d_x, None, None

    masked_linear.register_autograd(backward, setup_context=setup_context)
    masked_linear_grad_input.register_autograd(backward_grad_input, setup_context=setup_grad_input)
    masked_linear_grad_weight.register_autograd(backward_grad_weight, setup_context=setup_grad_weight)
    return masked_linear


# _WeightForDenseKernel as a C++ autograd Function (csrc/cpu/mask_grad.cpp), which eager calls of the
# convolutions take (SparseLinear's take masked_linear_dense_kernel, below):
# the Python Function's forward and backward calls cost ~17 us more per layer and step on a shared
# core, more than the products of a small layer (a 64-256-256-10 MLP's sparse step: 1.27x the dense
# one's with the Python Function, 1.21x with the C++ one, both masking in C++). torch.compile traces
# the Python Function: its selects as the extension's kernels for a linear layer's weight on CPU, else
# as torch.where, which Inductor fuses (`_traced_select_is_opaque`).
_COMPILED_WEIGHT_FOR_DENSE_KERNEL = (torch.ops.sparsekern.weight_for_dense_kernel.default
                                     if _extension.op_defined("weight_for_dense_kernel") else None)


class _WeightForDenseKernel(torch.autograd.Function):
    """The weight (zero_off_mask) or where(mask, weight, 0); on the way back its gradient is masked
    (left whole if dense_grad)."""

    # forward(ctx, ...) rather than setup_context: Function.apply binds the arguments of a
    # setup_context Function through inspect.signature on every call (tens of microseconds).
    @staticmethod
    def forward(ctx, weight: Tensor, mask: Tensor, zero_off_mask: bool, dense_grad: bool) -> Tensor:
        ctx.dense_grad = dense_grad
        ctx.save_for_backward(mask)
        if zero_off_mask:
            return weight.view_as(weight)
        if torch.compiler.is_compiling():
            if _COMPILED_MASKED_WEIGHT is not None and _traced_select_is_opaque(weight):
                return _COMPILED_MASKED_WEIGHT(weight, mask)
            return reference.masked_weight(weight, _as_held(mask))
        return reference.masked_weight(weight, mask)

    @staticmethod
    def backward(ctx, grad: Tensor):
        if ctx.dense_grad:
            return grad, None, None, None
        (mask,) = ctx.saved_tensors
        if torch.is_grad_enabled() or not grad.is_contiguous():
            # A graph for double backward (or a gradient laid out oddly): the out-of-place select.
            return reference.masked_weight(grad, mask), None, None, None
        # The weight gradient a linear or convolution kernel just wrote, which nothing else holds:
        # masking it where it lies is the one pass this path adds, with no new allocation.
        return _mask_in_place(grad, mask), None, None, None


def _traced_select_is_opaque(t: Tensor) -> bool:
    """Whether torch.compile should trace a select on `t` (a weight or its gradient) as the extension's
    C++ kernel, opaque to Inductor, rather than as torch.where for Inductor to fuse: for a linear
    layer's weight (2-D) on CPU.

    Inductor's C++ kernels load a bool tensor one entry at a time (at::vec::VecMask::from, a scalar
    loop per vector): its fused selects over the three weights of the digits MLP 64-256-256-10 took
    ~57 us a pass, the extension's (the mask's bytes read as integers, vectorized) ~18 us, one
    thread. A compiled training step (`sparsekern bench --only compiled_training_step --threads 1`,
    three runs) then ran at 0.91-0.93x the compiled dense step's speed on the masked path (was
    0.82-0.86x) and 0.95-0.97x static (was 0.94-0.95x); the MLP 1024-2048-2048-10's same steps,
    timed interleaved by a script, at 0.93-0.95x and 0.98x (was 0.88x and 0.94x). A convolution's
    weight keeps the traced select: Inductor gives it channels_last strides, and an opaque kernel's
    contiguous tensors there cost copies (the conv net's masked step fell from 1.00x to 0.72x). On a
    GPU, Triton loads the mask as fast as the rest."""
    return t.device.type == "cpu" and t.dim() == 2


def _as_held(mask: Tensor) -> Tensor:
    """mask itself, read through as_strided with its own sizes and strides, so that Inductor keeps it
    as it is held.

    Inductor's layout optimization (on for every graph whose convolutions oneDNN runs, by a
    heuristic on GPU) gives channels_last strides to each 4-D tensor that leads into a convolution
    and that the forward saves for backward. The mask of the masked path is both: the select feeds
    the convolution, and backward selects the weight gradient with it. So a compiled forward copied
    every mask to channels_last, in a kernel of masked bool tile transposes: 5-12 ms of a 40-90 ms
    training step of the benchmark's conv net 3-32-64-128-256 on one thread, whose compiled masked
    step ran at 0.88x the dense one's (two interleaved runs), and at 0.99-1.01x reading the mask
    this way. The input of an as_strided keeps its strides (its result depends on them), and the
    mask is saved as held. Same results bit for bit: the select reads the same entries.
    """
    return mask.as_strided(mask.shape, mask.stride())


class _MaskStraightThrough(torch.autograd.Function):
    """where(mask, weight, 0) whose derivatives pass the mask unchanged: dense_grad under torch.func
    transforms, where the layer differentiates as the dense layer at the masked weight (the gradient
    dense_grad asks for, and the jvp that is its adjoint, so jacfwd and jacrev agree). setup_context,
    jvp and a generated vmap rule are what torch.func needs of a Function."""

    generate_vmap_rule = True

    @staticmethod
    def forward(weight: Tensor, mask: Tensor) -> Tensor:
        return reference.masked_weight(weight, mask)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None

    @staticmethod
    def jvp(ctx, weight_tangent: Tensor, mask_tangent) -> Tensor:
        return weight_tangent


# On CPU torch.where reads its bool condition entry by entry, and a multiply by the mask would turn
# inf or NaN off it into NaN where the reference's select gives 0. Eager calls with the extension
# mask in the C++ Functions, a select in one vectorized pass (sparsekern::mask_grad_). The Python
# Function here, for builds without it, selects on the bits as that kernel does: one scratch chunk
# per thread and integer type, the mask's bytes converted into it chunk by chunk as all-ones or
# all-zeros, and the gradient's bits ANDed with it (integer ops that vectorize).
_CPU_CHUNK = 1 << 17
_scratch = threading.local()
_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _select_by_bits(grad: Tensor, mask: Tensor) -> Tensor:
    """grad = where(mask, grad, 0) in place, as a GPU does it: the gradient's bits times the mask, as
    integers of their width (an exact select, inf and NaN included), the mask converted as the kernel
    reads it. No allocation: where's 0-dim `other` would be one. (On CPU the mixed-dtype multiply
    would first convert the whole mask, a temporary.)"""
    grad.view(_BITS[grad.element_size()]).mul_(mask)
    return grad


def _mask_in_place(grad: Tensor, mask: Tensor) -> Tensor:
    """grad = where(mask, grad, 0) in place, for a contiguous grad: +0.0 off the mask whatever grad
    held there (inf and NaN included), as the reference's select gives."""
    if torch.compiler.is_compiling():
        # The extension's kernel in place (Inductor keeps it in place: the gradient is its own), or
        # a select that Inductor fuses into the kernel that writes the gradient (`_traced_select_is_opaque`).
        # (Traced, the chunk loop below would be unrolled into the graph, and Dynamo refuses the
        # scratch's first allocation as a side effect of an autograd.Function.)
        if _COMPILED_MASK_GRAD is not None and _traced_select_is_opaque(grad):
            _COMPILED_MASK_GRAD(grad, mask)
            return grad
        return torch.where(mask, grad, 0.0)
    if grad.device.type != "cpu":
        return _select_by_bits(grad, mask)
    bits = _BITS[grad.element_size()]
    flat_grad, flat_mask = grad.view(-1).view(bits), mask.reshape(-1).view(torch.uint8)
    chunks = _scratch.__dict__
    if bits not in chunks:
        chunks[bits] = torch.empty(_CPU_CHUNK, dtype=bits)
    keep = chunks[bits]
    # Last chunks first: the kernel that wrote the gradient wrote them last, so they are still in
    # cache (measured: +0.5-2.5 ms after a 2048x2048 matmul, against +4-6 ms front to back).
    for start in reversed(range(0, flat_grad.numel(), _CPU_CHUNK)):
        chunk = flat_grad[start:start + _CPU_CHUNK]
        # clamp: a True byte other than 1 (uint8 data viewed as bool) still keeps every bit.
        factor = keep[:chunk.numel()].copy_(flat_mask[start:start + _CPU_CHUNK]).clamp_(max=1)
        chunk.bitwise_and_(factor.neg_())
    return grad


def mask_in_place(tensor: Tensor, mask: Tensor) -> Tensor:
    """`ops.mask_in_place` once its arguments have passed its checks (`_checks.maskable_in_place`): the
    C++ select on a contiguous CPU tensor (eager, with the extension), `_mask_in_place` on another
    contiguous one, and torch.where into the tensor itself otherwise (a strided one, e.g. a
    channels_last weight's gradient), whose only temporary is its 0-dim zero; the tensor's version
    counter counts the change."""
    if not tensor.is_contiguous():
        torch.where(mask, tensor, torch.zeros((), dtype=tensor.dtype, device=tensor.device), out=tensor)
    elif _COMPILED_MASK_GRAD is not None and tensor.device.type == "cpu" and not torch.compiler.is_compiling():
        _COMPILED_MASK_GRAD(tensor, mask)
    else:
        masked = _mask_in_place(tensor, mask)
        if masked is not tensor:
            # Traced, it may select into a new tensor (which its autograd caller returns): written back here, where
            # Inductor fuses the copy into the select's kernel.
            tensor.copy_(masked)
    if not tensor.is_inference():   # an inference tensor has no version counter
        torch.autograd.graph.increment_version(tensor)
    return tensor


# masked_linear on the dense kernel as one C++ autograd Function (csrc/cpu/masked_linear.cpp), which
# eager calls take. Measured in one process, one thread, interleaved, a training step at density 0.1:
# - weight not 0 off the mask (OptG's path): the reference's custom ops it replaces (Python autograd,
#   torch.where ~6x slower than the C++ select, dweight masked out of place) made a step of the
#   digits MLP 64-256-256-10 1.8x slower and 1.56x a dense step's peak memory (the MLP
#   1024-2048-2048-10: 1.2x slower, 1.46x); now 0.85x and 0.95x a dense step's speed (the
#   benchmark's training_step case), at its peak memory;
# - weight 0 off the mask: F.linear on weight_for_dense_kernel's C++ Function, three autograd nodes
#   per layer, took ~20 us more per layer and step (the digits MLP's step 1.07x slower);
# - dense_grad (OptG's every step, RigL's before each update), which took F.linear on that Function
#   until this op's double backward passed the weight's gradient through dx straight through too: it
#   kept the masked weight from forward to backward (a small Transformer's OptG step at 1.14x the dense
#   step's peak memory, now 1.08x, the masked path's); OptG's step (training_step's "sparse + OptG",
#   three interleaved runs) went from 0.58-0.60x to 0.62-0.64x the dense step's speed on the digits
#   MLP, from 0.78-0.79x to 0.81-0.83x on the Transformer, with the same results bit for bit.
_COMPILED_MASKED_LINEAR_DENSE_KERNEL = (torch.ops.sparsekern.masked_linear_dense_kernel.default
                                        if _extension.op_defined("masked_linear_dense_kernel") else None)


def runs_compiled_dense_kernel() -> bool:
    """Whether `masked_linear_dense_kernel` can run here: eager mode, with the extension."""
    return _COMPILED_MASKED_LINEAR_DENSE_KERNEL is not None and not torch.compiler.is_compiling()


def masked_linear_dense_kernel(x: Tensor, weight: Tensor, mask: Tensor, bias: Tensor | None, dense_grad: bool,
                               zero_off_mask: bool) -> Tensor:
    """masked_linear on the dense kernel (eager mode with the extension: `runs_compiled_dense_kernel`).
    The op tests the conditions of `_checks.masked_linear_args` first and raises RuntimeError where one
    fails, without saying which (masked_linear then runs those checks to say it); flags must be bools.

    zero_off_mask: the products take the weight itself. Otherwise the masked weight is made in one
    vectorized pass for each product that reads it (the forward's and dx's) and freed after it, so
    that a step's peak memory stays a dense step's: F.linear on weight_for_dense_kernel's result
    would keep it from forward to backward, one more weight-sized tensor per layer through the step.
    dweight is masked in place either way (+0.0 off the mask, a select, as the reference's), unless
    dense_grad; a double backward with dense_grad passes the weight's gradient through dx straight
    through too (dx recorded on weight_for_dense_kernel's Function with dense_grad).
    """
    return _COMPILED_MASKED_LINEAR_DENSE_KERNEL(x, weight, mask, bias, bool(dense_grad), bool(zero_off_mask))


# The C++ select (csrc/cpu/mask_grad.cpp), for the masked weight of a call that needs no gradient (a
# convolution in evaluation): torch.where reads its bool condition entry by entry. Measured on one
# shared core, 3x3 convolutions at density 0.1, no_grad: the select 4-6x faster, the forward 0.99x
# (64->64 channels, batch 8 at 16x16), 1.13x (256->256, batch 8 at 8x8), 2.05x (512->512, 1 at 4x4).
# It and the in-place select of the weight gradient are also what torch.compile traces for a linear
# layer's weight on CPU (`_traced_select_is_opaque`).
_COMPILED_MASKED_WEIGHT = (torch.ops.sparsekern.masked_weight.default
                           if _extension.kernel_missing("masked_weight", "cpu") is None else None)
_COMPILED_MASK_GRAD = (torch.ops.sparsekern.mask_grad_.default
                       if _extension.kernel_missing("mask_grad_", "cpu") is None else None)


def _masked_weight(weight: Tensor, mask: Tensor) -> Tensor:
    """where(mask, weight, 0), by the C++ select where it can run: eager, on a contiguous CPU weight
    (it returns a contiguous tensor, and a channels_last weight should stay channels_last for the
    convolution's choice of layout). torch.compile traces the select, which Inductor fuses."""
    if (_COMPILED_MASKED_WEIGHT is not None and weight.device.type == "cpu" and weight.is_contiguous()
            and not torch.compiler.is_compiling()):
        return _COMPILED_MASKED_WEIGHT(weight, mask)
    return reference.masked_weight(weight, mask)


def weight_for_dense_kernel(weight: Tensor, mask: Tensor, zero_off_mask: bool, dense_grad: bool) -> Tensor:
    """The weight argument of a dense kernel (F.linear, a convolution) that multiplies by weight * mask.

    zero_off_mask (weight already 0 off the mask): `weight` itself, a view that costs nothing;
    otherwise where(mask, weight, 0), one pass. Either way the gradient that reaches `weight` is the
    kernel's weight gradient masked in place (whole if `dense_grad`). Pass the result straight to
    one dense kernel, whose weight gradient is a fresh tensor of its own.

    Under torch.func transforms and forward-mode AD: where(mask, weight, 0), differentiated as
    such (tangents and gradients masked), or with the mask passed straight through if `dense_grad`.
    """
    if _transforms.active():
        # torch.func transforms and forward-mode AD: plain torch code, which every transform knows
        # (the C++ Function raises under them; the no-grad path below would pass a weight tangent
        # on unmasked). It selects even where zero_off_mask holds: the select is what masks the
        # tangents and gradients, at one pass.
        if dense_grad:
            return _MaskStraightThrough.apply(weight, mask)
        return reference.masked_weight(weight, mask)
    if not (weight.requires_grad and torch.is_grad_enabled()):
        # No gradient will reach weight (evaluation, torch.no_grad): what the Function's forward
        # returns, without building its autograd node (a few microseconds per layer and call).
        return weight if zero_off_mask else _masked_weight(weight, mask)
    if _COMPILED_WEIGHT_FOR_DENSE_KERNEL is not None and not torch.compiler.is_compiling():
        return _COMPILED_WEIGHT_FOR_DENSE_KERNEL(weight, mask, bool(zero_off_mask), bool(dense_grad))
    return _WeightForDenseKernel.apply(weight, mask, zero_off_mask, dense_grad)
