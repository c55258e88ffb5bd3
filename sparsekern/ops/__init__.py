"""sparsekern's ops: the public entry points, their contracts, and the backend each call runs on.

Every function here checks its arguments once (bad input raises TypeError or ValueError naming the
argument and changes nothing), then runs the backend chosen by `sparsekern.ops._backend.choose`:
the compiled extension, then Triton, then the pure-PyTorch reference (`sparsekern.ops.reference`,
the specification every backend must match). `sparsekern.backends()` reports the choice.

Selection rule of the mask ops: larger score first; NaN is never preferred to a number; equal
scores (+0.0 equals -0.0) go to the lower flat position, row-major through the list in order.
"""
from __future__ import annotations

import importlib
from typing import Sequence

import torch
from torch import Tensor

from . import _backend, _checks, _masked_linear_op, _transforms, reference
from ._backend import Implementation
from .packing import PackedWeight

# The user's API (README.md, "The ops underneath"); the other module-level names are the backends' glue.
__all__ = ["topk_mask", "prune_grow", "masked_linear", "weight_for_dense_kernel", "mask_in_place", "pack",
           "PackedWeight", "sparse_linear", "SPARSE_LINEAR_LIMITS", "reference"]

# Ops that have a Triton implementation, as functions of the same name in sparsekern.ops._triton_ops.
TRITON_OPS: tuple[str, ...] = ("topk_mask", "topk_mask_per_tensor", "prune_grow", "masked_linear")
# Ops that the compiled extension defines (schemas in csrc/ops.cpp).
COMPILED_OPS = ("topk_mask", "topk_mask_per_tensor", "prune_grow", "sparse_linear")

# sparse_linear runs its sparse kernel where it beats the dense product of the unpacked weight: x's
# dtype listed, at least min_rows rows of x, and the packed density at most the limit of the first
# (rows up to, max density) pair of max_density_by_rows that covers the row count (none: dense).
# CPU row: measured on a loaded 2-core machine (benchmark cases `sparse_linear`): the C++ kernel
# costs 5-10 ns per kept entry (its bit walk is branch-bound), so it beats MKL only where the dense
# weight streams from memory: float32 4096x4096 at density 0.05 and 4-16 rows (1.3-1.8x on one
# thread); it loses at one row, at density >= 0.1, to cache-resident weights and to the dense
# bfloat16 kernels.
# CUDA row: an estimate, to be replaced by what benchmarks/gpu_check.sh measures (its results file
# prints the row its crossover sweep gives). fp16 8192^2 on an H100/H200, dense reading 134 MB at
# ~4 TB/s (~34 us): the kernel's time is the largest of its bytes (2.1 + 33.5 * density us), the
# shared-memory reads of x (one column of the batch tile per kept entry: ~26, 32, 55, 90, 180 *
# density us at 1, 2, 4, 8, 16 rows, with bank conflicts) and its instructions (~27-100 * density
# us), plus ~3-5 us of launches; the limits keep it 10% under dense.
SPARSE_LINEAR_LIMITS = {
    "cpu": {"dtypes": (torch.float32, torch.float64), "min_rows": 2, "max_density_by_rows": ((16, 0.05),)},
    "cuda": {"dtypes": (torch.float16, torch.bfloat16, torch.float32, torch.float64), "min_rows": 1,
             "max_density_by_rows": ((2, 0.6), (4, 0.4), (8, 0.25), (16, 0.12))},
}


def topk_mask(scores: Sequence[Tensor], k: int | Sequence[int]) -> list[Tensor]:
    """Bool masks of the top-scoring entries of a list of tensors.

    Args:
        scores: tensors of one float dtype (float16, bfloat16, float32, float64) on one device,
            any shapes and strides.
        k: an int for one global selection of exactly k entries over all tensors together, or a
            list of ints, one per tensor, for a separate selection in each.
    Returns:
        a list of bool tensors shaped like `scores`, True at the selected entries.
    Ties go to the lower flat position (tensor order, then row-major index). NaN is never
    selected: asking for more entries than there are non-NaN scores raises ValueError, as does
    k outside [0, numel].

    Not under torch.vmap (RuntimeError): a list with one k per tensor selects in each separately,
    in one call. Under grad and jvp transforms it runs as usual (masks have no derivative).
    """
    _transforms.refuse_vmap("sparsekern.ops.topk_mask", "its selection kernels have no batching rule",
                       "call it outside vmap, with the batch as a list of tensors and one k per tensor")
    scores = _checks.scores_list(scores)
    k = _checks.topk_counts(k, scores)
    if not scores:
        # Nothing to select; a compiled op could not even be dispatched without a tensor argument.
        return []
    op = "topk_mask_per_tensor" if isinstance(k, list) else "topk_mask"
    return list(_backend.choose(op, scores[0].device.type, (scores[0].dtype,))[1].run(scores, k))


def prune_grow(weights, masks, prune_scores, grow_scores, n, state=(), masked=(), *, active=None,
               prune_abs: bool = False, grow_abs: bool = False):
    """The drop-and-grow mask update of RigL, SET, MEST, ... for every layer at once.

    Per segment (each layer alone, or the whole list as one flat sequence) it keeps the
    `active - n` active entries with the highest prune score, then adds the `n` entries with the
    highest grow score among all entries not kept, just-dropped ones included (a just-dropped entry
    grown again keeps its value). Both selections follow the topk_mask rule (NaN ranks below every
    number here and never raises). Active counts are unchanged: per layer in layer scope, over the
    list in global scope.

    Args:
        weights: float tensors (any float dtype each), mutated in place.
        masks: bool tensors shaped like their weight, the current masks (not mutated; any non-zero
            byte is True).
        prune_scores, grow_scores: float tensors shaped like their weight, all of one dtype.
        n: entries to swap. A list with one int per layer (layer scope: 0 <= n[i] <= active
            entries of masks[i]), or one int (global scope: 0 <= n <= active entries of the list).
        state: per layer, a list of tensors zeroed like the weight (optimizer state: momentum,
            Adam moments), or () for none. State whose fresh value is not 0 (Rprop's step_size, Adagrad's
            sum: `sparsekern.nn.optimizer_state.fresh_state`) is not for it: DST sets it to that value after.
        masked: per layer, a list of tensors zeroed off the new mask only (the gradients the next
            optimizer step reads; optimizer state that new connections keep), or () for none.
        active: the caller's count of active entries, shaped like n (a list per layer, or the
            total). It saves counting the masks, which costs a device-to-host read on a GPU; the
            kernels on CPU tensors (C++, Triton's interpreter) and the reference check it, the GPU
            kernels trust it.
        prune_abs, grow_abs: rank the prune (grow) scores by their absolute value, so that magnitude
            criteria (|w|, |grad|) pass the weights or gradients themselves and need no score copy.
    Returns:
        the new masks, contiguous bool tensors shaped like `masks`.
    In place: each weight and each of its `state` tensors become 0 wherever the new mask is False
    and at newly grown positions (new & ~old); each `masked` tensor becomes 0 wherever the new mask
    is False; entries active before and after keep their values.

    Every argument is checked before anything is written: a bad one anywhere in the list raises
    TypeError or ValueError naming it and changes no layer. Tensors written in place may not
    overlap themselves (expanded views), each other or a mask (slices of one tensor that share no
    entry, such as its column blocks, do not overlap; a mask of another dtype in the same memory is
    taken to), nor be inference tensors outside torch.inference_mode, nor tensors that autograd records
    (requiring grad with grad mode on: a weight Parameter in a training loop), whose change would be missing
    from their graph: call prune_grow under torch.no_grad(), as DST calls it and as torch.optim's steps write
    parameters (`mask_in_place`'s rule; torch's in-place ops refuse such a Parameter too).
    A score may be the very tensor its own layer writes (magnitude pruning passes the weight); one sharing an
    entry with a written tensor in any other way is copied first (a slice sharing none, as above, is read in
    place). Scores that require grad are read, not recorded: the update is not differentiable.

    One-layer form: prune_grow(weight, mask, prune_score, grow_score, n, state=[...], masked=[...])
    with tensors, an int n (and an int active) returns the new mask.

    Not under torch.vmap (RuntimeError, before anything is written): the lists are its batch.
    """
    _transforms.refuse_vmap("sparsekern.ops.prune_grow", "it updates tensors in place through kernels with no batching rule",
                       "call it outside vmap, with the batch as lists of per-layer tensors")
    # Checked in the caller's grad mode, which decides whether autograd records a written tensor; run under no_grad,
    # which records no score either.
    args = _checks.prune_grow_args(weights, masks, prune_scores, grow_scores, n, state, masked, active,
                                   prune_abs, grow_abs)
    if not args.weights:
        return []
    dtypes = tuple({w.dtype for w in args.weights} | {args.prune_scores[0].dtype})
    with torch.no_grad():
        new = list(_backend.choose("prune_grow", args.weights[0].device.type, dtypes)[1].run(*args.backend_args()))
    return new[0] if args.single else new


def masked_linear(x: Tensor, weight: Tensor, mask: Tensor, bias: Tensor | None = None, *,
                  dense_grad: bool = False, zero_off_mask: bool = False) -> Tensor:
    """y = x @ (weight * mask).T + bias, for x of shape (..., in_features).

    weight: (out_features, in_features), mask: bool of the same shape, bias: (out_features,) or
    None; x, weight and bias share one dtype (float32, float16, bfloat16, float64), except under
    torch.autocast, which casts them as it casts F.linear's (the output then has the autocast
    dtype, as nn.Linear's would). Entries off the mask contribute nothing, even when they hold inf
    or NaN.

    Autograd: dx = dy @ (weight * mask); dweight = (dy.T @ x) * mask over all batch rows, masked by
    a select (exactly 0 off the mask, even where dy.T @ x is inf or NaN), or the dense dy.T @ x
    when `dense_grad=True` (RigL's growth criterion reads the gradient at inactive positions, and
    needs it only on mask-update steps); dbias = dy summed over batch rows. Every backward is
    differentiable again (double backward); with `dense_grad` the weight's gradient through dx is
    dense too (the mask passes the weight's derivatives straight through on every path), so that the
    dense gradient of a loss holding dx, a gradient penalty's, is the dense layer's.

    zero_off_mask=True promises that weight is exactly 0 wherever mask is False (sparsekern's
    modules keep it so), so that weight * mask == weight: forward and dx then run the dense kernel
    on the weight itself (F.linear's: MKL/oneDNN, cuBLAS), and only dweight meets the mask, masked
    in place in one pass. The promise is not checked here (`SparseModule.verify_zero_off_mask`
    does); a weight that breaks it gives wrong results. Without the promise, eager calls (with the
    compiled extension) run the dense kernel on where(mask, weight, 0), made in one pass for the
    forward and again for dx rather than kept in memory between them, and mask dweight in place
    as above (on a GPU a dense_grad call takes the reference backend's custom ops instead);
    torch.compile traces F.linear on the masked weight, its select and the gradient's mask the
    extension's kernels on CPU (`_masked_linear_op._traced_select_is_opaque`), torch.where that
    Inductor fuses elsewhere. Masks
    whose blocks let the Triton kernel skip work still run it (it then skips the select as well); a
    backend named in SPARSEKERN_BACKEND runs every call.

    Under torch.func transforms (vmap, grad, vjp, jvp, jacrev, jacfwd, hessian) and forward-mode AD
    every backend gives way to F.linear(x, where(mask, weight, 0), bias), differentiated as such
    (weight tangents and gradients masked); with dense_grad the mask passes derivatives straight
    through (those of the dense layer at the masked weight, so jvp stays the adjoint of vjp).
    """
    if (isinstance(x, Tensor) and x.is_cpu and type(dense_grad) is bool and type(zero_off_mask) is bool
            and not torch.is_autocast_enabled("cpu") and not _transforms.active()
            and _masked_linear_op.runs_compiled_dense_kernel()):
        # An eager CPU call (a sparse layer's, at every call) in fewer steps than the path below takes
        # for it: the compiled op checks the arguments as `_checks.masked_linear_args` does, and only
        # where it refuses them do those Python checks run, to say which is wrong. The checks, the
        # backend choice and the calls between them cost ~10 us per layer and training step.
        try:
            if _backend.requested() in _CPU_DENSE_KERNEL_REQUESTS:
                return _masked_linear_op.masked_linear_dense_kernel(x, weight, mask, bias, dense_grad, zero_off_mask)
        except (RuntimeError, TypeError, ValueError):
            try:
                _checks.masked_linear_args(x, weight, mask, bias, dense_grad, zero_off_mask)
            except (TypeError, ValueError) as refused:
                raise refused from None
            raise
    if isinstance(x, Tensor):
        device_type = x.device.type
        x, weight, bias = _autocast_cast(device_type, x, weight, bias)
    _checks.masked_linear_args(x, weight, mask, bias, dense_grad, zero_off_mask)
    if _transforms.active():
        # No backend's custom ops have batching or forward-mode rules, nor autograd that torch.func
        # can run: the contract's formula in plain torch code, which every transform knows.
        return torch.nn.functional.linear(
            x, _masked_linear_op.weight_for_dense_kernel(weight, mask, zero_off_mask, dense_grad), bias)
    request = _backend.requested()
    name, implementation = _backend.choose("masked_linear", device_type, (x.dtype,), (x, weight, mask), request)
    if name == "reference" and request != name:  # chosen automatically, not forced
        # No kernel can skip work on this mask: the dense kernel is the fastest, on the weight itself
        # where it is 0 off the mask, else on the masked weight.
        # On a GPU not with dense_grad (the reference's custom ops, below): that route has not been
        # measured or compared there.
        if _masked_linear_op.runs_compiled_dense_kernel() and (device_type == "cpu" or not dense_grad):
            return _masked_linear_op.masked_linear_dense_kernel(x, weight, mask, bias, dense_grad, zero_off_mask)
        # Under torch.compile both states take F.linear on the Python Function, whose products
        # Inductor sees (its selects: `_masked_linear_op._traced_select_is_opaque`); the compiled
        # forward keeps the masked weight for dx, at the dense step's peak memory all the same
        # (measured: the MLPs below, 1.00x). The reference's custom ops hide the products from it:
        # with them the masked path's compiled step (SGD, one thread, density 0.1, two runs) ran at
        # 0.58-0.60x the compiled dense step's speed and 1.56x its peak memory for the MLP
        # 64-256-256-10 at batch 64 (1024-2048-2048-10: 0.57-0.60x, 1.37x); with the Function at
        # 0.82-0.88x (0.71-0.73x) and 1.0x, and 0.91-0.93x (0.93-0.95x) once its selects were the
        # extension's.
        # Eager without the extension, the masked path keeps the custom ops, which remake the
        # masked weight for dx: the Function would keep it from forward to backward.
        if zero_off_mask or torch.compiler.is_compiling():
            return torch.nn.functional.linear(
                x, _masked_linear_op.weight_for_dense_kernel(weight, mask, zero_off_mask, dense_grad), bias)
    return implementation.run(x, weight, mask, bias, dense_grad, zero_off_mask)


def weight_for_dense_kernel(weight: Tensor, mask: Tensor, *, zero_off_mask: bool, dense_grad: bool = False) -> Tensor:
    """What a dense kernel (F.linear, F.conv2d, ...) should take as its weight to multiply by weight * mask.

    zero_off_mask=True (weight already 0 off the mask): `weight` itself, at no cost; otherwise
    where(mask, weight, 0). The gradient reaching `weight` is the kernel's weight gradient masked in
    place in one pass, or left whole if `dense_grad`. Pass the result straight to one dense kernel
    (its weight gradient must be a tensor of its own: the mask is applied to it in place).
    Under torch.autocast the kernel casts it as it casts any weight.

    TypeError or ValueError naming the argument unless `weight` is a float16, bfloat16, float32 or float64
    tensor, `mask` a bool tensor of its shape on its device, and `zero_off_mask` and `dense_grad` bools.
    """
    _checks.floating(weight, "weight")
    _checks.bool_mask(mask, "mask", weight, "weight")
    _checks.same_device([("weight", weight), ("mask", mask)])
    _checks.flag(zero_off_mask, "zero_off_mask")
    _checks.flag(dense_grad, "dense_grad")
    return _masked_linear_op.weight_for_dense_kernel(weight, mask, zero_off_mask, dense_grad)


def mask_in_place(tensor: Tensor, mask: Tensor) -> Tensor:
    """tensor = where(mask, tensor, 0) in place, returned: +0.0 off the mask whatever `tensor` held there
    (inf and NaN included), the select every sparse layer masks its weight gradient with, whose
    reference is `reference.masked_weight` (out of place). Unlike tensor.masked_fill_(~mask, 0) it
    allocates no mask-sized temporary, and on CPU with the extension it is one vectorized pass.

    TypeError or ValueError naming the argument, with `tensor` unchanged, unless `tensor` is a dense
    float16, bfloat16, float32 or float64 tensor holding values (not on the meta device) whose entries each
    have memory of their own (not an expanded or overlapping view, none shared with `mask`), and `mask` a
    bool tensor of its shape on its device; also (as torch's own in-place ops refuse them) for a `tensor` that
    autograd records (it requires grad with grad mode on: the change would not be in its graph; call it under
    torch.no_grad()) and for an inference tensor outside torch.inference_mode(). The tensor's version
    counter counts the change, so a backward that saved it refuses to run on the new values.
    """
    _checks.maskable_in_place(tensor, "tensor", mask, "mask")
    return _masked_linear_op.mask_in_place(tensor, mask)


# torch.autocast casts these dtypes (not float64) to its own for the ops it runs in lower precision.
_AUTOCAST_CASTS = (torch.float16, torch.bfloat16, torch.float32)


def _autocast_cast(device_type: str, *tensors):
    """`tensors` as torch.autocast hands them to F.linear on `device_type`: eligible floats in the
    autocast dtype, everything else (None, float64, non-tensors the checks will reject) as is."""
    if not _autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if isinstance(t, Tensor) and t.dtype in _AUTOCAST_CASTS else t for t in tensors)


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type without autocast, such as meta (shape inference)
        return False


def pack(weight: Tensor, mask: Tensor) -> PackedWeight:
    """Compresses a trained masked weight for `sparse_linear` (layout and its why: sparsekern.ops.packing).

    weight: (out_features, in_features), float16, bfloat16, float32 or float64; mask: bool of the
    same shape, on the same device. Entries off the mask are dropped, whatever they hold (inf, NaN).
    Returns a PackedWeight on weight's device; `packed.unpack()` gives where(mask, weight, 0) back exactly.
    A one-time conversion, done with torch ops on every device. Its sizes depend on the mask's values: a meta or fake
    (FakeTensorMode) weight or mask raises ValueError.
    """
    _checks.floating(weight, "weight")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    _checks.bool_mask(mask, "mask", weight, "weight")
    _checks.same_device([("weight", weight), ("mask", mask)])
    _checks.holds_values(weight, "weight")
    for value, name in ((weight, "weight"), (mask, "mask")):
        _checks.not_fake(value, name, "the packed weight's sizes are its mask's count of kept entries")
    return PackedWeight(**reference.pack(weight.detach(), mask), in_features=weight.shape[1])


def dense_is_faster(density: float, rows: int, dtype: torch.dtype, device_type: str) -> bool:
    """Whether sparse_linear should multiply the unpacked weight densely (SPARSE_LINEAR_LIMITS)."""
    limits = SPARSE_LINEAR_LIMITS.get(device_type)
    if limits is None or dtype not in limits["dtypes"] or rows < limits["min_rows"]:
        return True
    for up_to, max_density in limits["max_density_by_rows"]:
        if rows <= up_to:
            return density > max_density
    return True


@torch.no_grad()
def sparse_linear(x: Tensor, packed: PackedWeight, bias: Tensor | None = None) -> Tensor:
    """y = x @ W.T + bias for a weight W packed by `pack`: inference at small batch.

    x: (..., in_features), of the packed weight's dtype and device; bias: (out_features,) or None,
    same dtype. Returns (..., out_features) in the packed weight's dtype, accumulated in float32
    (float64 for float64), under torch.autocast too, where an x of another floating dtype but float64
    (the output of a layer autocast ran before it) is cast to the packed weight's, as autocast casts
    inputs. No autograd: this is for inference.
    Where the dense product is faster (density or row count above SPARSE_LINEAR_LIMITS for the
    device), it calls F.linear on `packed.dense()`, the unpacked weight, which the PackedWeight
    makes on the first such call and keeps.

    An inf or NaN in x may meet a dropped weight: the dense product (and the reference) multiplies
    it by that 0 and gives NaN, the compressed kernels skip dropped weights and do not, so which
    answer such an x gets depends on the path (batch size, density, device). Finite inputs get the
    same answer, to rounding, on every path.

    Under torch.vmap it takes that dense product, which vmap batches natively. An x or bias that
    torch.func's grad, vjp, jvp, jacrev, jacfwd or hessian (or forward-mode AD) differentiates
    raises RuntimeError: there are no derivatives to give (torch.func.grad would give zeros).
    """
    if not isinstance(packed, PackedWeight):
        raise TypeError(f"packed must be a PackedWeight (from sparsekern.ops.pack), got {type(packed).__name__}")
    _checks.floating(x, "x")
    given = x   # what torch.func differentiates: a cast of it below would hide that from refuse_derivatives
    if x.dtype != packed.dtype and x.dtype in _AUTOCAST_CASTS and _autocast_enabled(x.device.type):
        # Under autocast, the layer before a layer in inference mode (a convolution, an attention, an LSTM)
        # answers in autocast's dtype, which the packed weight does not hold: refusing it failed every such model.
        # A dtype autocast leaves alone (float64) is refused as outside autocast.
        x = x.to(packed.dtype)
    # Under torch.jit.trace, checked and chosen as in eager code but not recorded (`_checks.untraced`): they read x's
    # and the pack's sizes, which a trace holds as tensors, as Python bools, and warned (TracerWarning) of branches
    # that no trace records; the trace keeps the path its example's batch chose.
    dense = _checks.untraced(lambda: _sparse_linear_checks(x, packed, bias))
    _transforms.refuse_derivatives("sparsekern.ops.sparse_linear", (given, bias),
                                   "it has no derivatives (inference mode)",
                                   "leave inference mode first (SparseLinear.to_training()), or call masked_linear")
    # vmap: the sparse kernel has no batching rule, and its fallback runs it once per sample.
    if _transforms.active() or dense:
        if _autocast_enabled(x.device.type):
            # In the packed weight's dtype, as the sparse kernels answer: autocast would run F.linear in its own
            # dtype, the output's dtype depending on the path.
            with torch.autocast(x.device.type, enabled=False):
                return torch.nn.functional.linear(x, packed.dense(), bias)
        return torch.nn.functional.linear(x, packed.dense(), bias)
    return _backend.choose("sparse_linear", x.device.type, (x.dtype,))[1].run(
        x, packed.bitmap, packed.values, packed.chunk_offsets, bias)


def _sparse_linear_checks(x: Tensor, packed: PackedWeight, bias: Tensor | None) -> bool:
    """sparse_linear's checks of x (cast as the packed weight's under autocast) and bias against `packed`, then
    whether the dense product is the faster (`dense_is_faster`)."""
    if x.dim() < 1 or x.shape[-1] != packed.in_features:
        raise ValueError(f"x must end in in_features={packed.in_features}, got shape {tuple(x.shape)}")
    if x.dtype != packed.dtype:
        raise TypeError(f"x has dtype {x.dtype} but the packed weight has {packed.dtype}")
    tensors = [("x", x), ("packed", packed.values)]
    if bias is not None:
        _checks.floating(bias, "bias")
        if bias.shape != (packed.out_features,):
            raise ValueError(f"bias must have shape ({packed.out_features},), got {tuple(bias.shape)}")
        if bias.dtype != x.dtype:
            raise TypeError(f"bias has dtype {bias.dtype} but x has {x.dtype}")
        tensors.append(("bias", bias))
    _checks.same_device(tensors)
    rows = x.numel() // packed.in_features if packed.in_features else 0
    return dense_is_faster(packed.density, rows, x.dtype, x.device.type)


def _compiled(op: str) -> Implementation:
    run = _compiled_prune_grow if op == "prune_grow" else lambda *args: getattr(torch.ops.sparsekern, op)(*args)
    return Implementation(run=run, missing=_backend.compiled_missing(op))


def flat_layers(per_layer: list[list[Tensor]]) -> tuple[list[Tensor], list[int]]:
    """Per-layer lists of tensors as one list and each tensor's layer (op schemas have no nested lists)."""
    return ([t for tensors in per_layer for t in tensors],
            [layer for layer, tensors in enumerate(per_layer) for _ in tensors])


def new_masks_like(masks: list[Tensor]) -> list[Tensor]:
    """Contiguous bool tensors shaped like `masks`, for the mask ops that write their results into them."""
    return [torch.empty(m.shape, dtype=torch.bool, device=m.device) for m in masks]


def _compiled_prune_grow(weights, masks, prune_scores, grow_scores, n, global_scope, state, masked, active,
                         prune_abs, grow_abs):
    new = new_masks_like(masks)
    torch.ops.sparsekern.prune_grow(weights, masks, prune_scores, grow_scores, n, global_scope, *flat_layers(state),
                                    *flat_layers(masked), active, prune_abs, grow_abs, new)
    return new


def _triton(op: str) -> Implementation:
    def run(*args):
        return getattr(_load_triton_ops(), op)(*args)
    if op == "masked_linear":  # its kernels walk lists of active tiles
        return Implementation(run=run, missing=_backend.triton_missing_with_loaded_loops,
                              automatic=_backend.only_on_gpu, takes=_triton_skips_tiles,
                              note=_TRITON_MASKED_LINEAR_NOTE)
    return Implementation(run=run, missing=_backend.triton_missing, automatic=_backend.only_on_gpu)


def _load_triton_ops():
    # Imported on first use: importing Triton costs seconds and is needed only where it runs.
    return importlib.import_module("sparsekern.ops._triton_ops")


def _triton_skips_tiles(x: Tensor, weight: Tensor, mask: Tensor) -> bool:
    return _load_triton_ops().skips_tiles(mask)


# Triton's masked matmul pays for its mask on every tile it cannot skip (a select in front of the
# tensor cores), so the automatic choice gives it block-structured masks only.
_TRITON_MASKED_LINEAR_NOTE = ("chosen automatically only for masks whose blocks let it skip tiles; other masks "
                              "run the next backend, or the dense kernel where weights are 0 off the mask")
_REFERENCE_MASKED_LINEAR_NOTE = ("automatic calls run the dense kernel instead: on the weight itself where it is 0 "
                                 "off the mask (zero_off_mask), else on the masked weight, made for each product "
                                 "(eager mode, with the compiled extension; under torch.compile, the select "
                                 "traced for the compiler to fuse)")


def _reference_sparse_linear(x, bitmap, values, chunk_offsets, bias):
    # The packed fields checked again on the CPU, as the compiled CPU kernel checks them: sparse_linear's checks read
    # only their shapes, and a field changed in place since packing would fail in the reference naming none, or be
    # taken (one value spread over every kept entry). On a GPU the contents would cost host syncs at every call.
    if bitmap.device.type == "cpu":
        _checks.packed_weight(bitmap, values, chunk_offsets, x.shape[-1])
    return reference.sparse_linear(x, bitmap, values, chunk_offsets, bias)


def _reference(function, note: str | None = None) -> Implementation:
    return Implementation(run=function, missing=_backend.never_missing, note=note)


# The reference always selects: the specification does not lean on the zero_off_mask promise.
_masked_linear_reference = _masked_linear_op.define(
    "reference",
    lambda x, weight, mask, bias, zero_off_mask: reference.masked_linear(x, weight, mask, bias),
    lambda grad_out, weight, mask, zero_off_mask: reference.masked_linear_grad_input(grad_out, weight, mask),
    reference.masked_linear_grad_weight)

for _op, _function in (("topk_mask", reference.topk_mask),
                       ("topk_mask_per_tensor", reference.topk_mask_per_tensor),
                       ("prune_grow", reference.prune_grow),
                       ("masked_linear", _masked_linear_reference),
                       ("sparse_linear", _reference_sparse_linear)):
    _backend.register(_op, "reference", _reference(
        _function, _REFERENCE_MASKED_LINEAR_NOTE if _op == "masked_linear" else None))
    if _op in COMPILED_OPS:
        _backend.register(_op, "compiled", _compiled(_op))
    if _op in TRITON_OPS:
        _backend.register(_op, "triton", _triton(_op))

# The SPARSEKERN_BACKEND values under which every masked_linear call on CPU tensors takes the dense
# kernel (the reference chosen automatically, not forced), as the registry decides it: masked_linear's
# eager CPU path checks this instead of calling `_backend.choose`.
_CPU_DENSE_KERNEL_REQUESTS = frozenset(
    request for request in ("auto", *_backend.AUTO_ORDER)
    if request != "reference" and _backend.static_choice("masked_linear", "cpu", request) == "reference")
