"""Sparse layers: what every sparse module shares (`SparseModule`: the mask, the zero-off-mask promise,
state-dict loading) and SparseLinear, nn.Linear whose weight is multiplied by a fixed bool mask (the
convolutions, on the same base, are in `convolutions`).

Each sparse module holds `weight` (Parameter), `bias` (Parameter or None), a bool buffer `mask`
shaped like the weight (all True at construction) and two plain attributes, `dense_grad` and
`zero_off_mask`. The output is always that of weight * mask: entries off the mask contribute
nothing. How it is computed is explicit in `zero_off_mask`:

* True (set by `set_mask`, which zeroes the weight off the mask; true of a new module): the module
  promises that every weight off the mask is exactly 0, so weight * mask == weight. Forward and the
  input gradient run the dense kernel on the weight itself (F.linear: MKL/oneDNN, cuBLAS; the
  convolution: oneDNN, cuDNN), and only the weight gradient meets the mask, masked in place in one
  pass. The masked gradient keeps the promise through training: SGD (momentum, Nesterov, weight
  decay), Adam, AdamW, Adagrad, RMSprop, Adadelta, Adamax, NAdam and RAdam all leave a weight with
  zero gradient and zero state at 0. sparsify, DST and IMP keep the promise.
* False: the weight may hold values off the mask (OptG keeps pruned weights; so does a module whose
  `mask` was written directly, which then must set False itself), and every forward selects
  where(mask, weight, 0) first (`sparsekern.ops.masked_linear`'s masked path), then runs the same
  dense kernel on it. SparseLinear makes that masked weight again for its input gradient rather
  than keep it from forward to backward, so that a step's peak memory stays a dense step's; the
  convolutions keep it (their weights are small next to their activations).

The promise is made for one weight tensor, the module's own Parameter: a weight put in its place other than
by assignment takes the masked path. So does one computed at every forward from other parameters
(torch.nn.utils.parametrize, parametrizations.weight_norm/spectral_norm, or their older hooks, applied to
the sparse module; such a module also keeps fused kernels that would read its weight off it, as one that
breaks its promise does), and one handed to torch.func.functional_call: the module holds no promise about
values it does not own. Into a computed weight, `set_mask` copies the mask alone and `zero_weights_off_mask`
raises; the algorithms and broadcast_masks refuse such a layer by name (`computed_weight_refusal`).

Writing into `weight` off the mask, or writing `mask` other than through `set_mask`, breaks the
promise: set `zero_off_mask = False`, or call `zero_weights_off_mask()` to keep it (`reset_parameters()`, torch's
init over the whole weight, calls it itself). A mask written in
place (noticed by its version counter, which a mask made under torch.inference_mode lacks and a write
through `mask.data` does not move) or put in place of the old one (registered as a buffer) is noticed at
the next forward outside torch.compile, which reads the weight once to check the promise again (a host
sync on a GPU); a mask that moves again before the promise is made anew (set_mask, zero_weights_off_mask,
an algorithm's update, a load) drops it unread instead, and the module takes the masked path until then, so
that a copy into the masks at every forward (DistributedDataParallel's buffer sync under torch 2.11) costs
no read per step (a mask assigned, `layer.mask = ...`, is checked at once; one that is not a dense bool
tensor, or that is an nn.Parameter, is refused with TypeError before it is in place): an EMA of a DST run
(torch.optim.swa_utils.AveragedModel, whose buffer sync copies the live masks into a model whose
averaged weights are non-zero off them) computes with its averaged weights under the live masks.
A mask that torch.func.functional_call swaps in for one call is put in place of the old one too: the promise is
dropped (or made for that mask), and the module's own, back after the call, runs the masked path (as right; on a
CPU about as fast) until the promise is made anew (set_mask, an algorithm's update, a load). Keeping the promise
across the swap was tried and left out: it held both tensors' versions in every forward, for a rare use.
Only the module's own forward notices it: nn.TransformerEncoderLayer's fused eval-mode kernel
multiplies by its layers' weights without running them (`sparsekern.nn.SparseAveragedModel` sets its
layers' `zero_off_mask = False`, whose forward pre-hook keeps the layer off that kernel). A write into
the weight alone is not noticed (an optimizer step writes it too). `verify_zero_off_mask()` checks it
(one pass over the weight); `SparseModule.check_zero_off_mask = True` (on the class, or on one module)
runs that check at every forward that relies on it, a debugging aid. A mask put in place through `mask.data = ...`
passes no check at all: every writer of masks (set_mask, load_state_dict, sparsify, the algorithms, broadcast_masks,
SparseAveragedModel) refuses one that is not a bool tensor of the weight's shape on its device, whose entries share
memory, or that shares memory with the weight, naming the layer, before it changes anything (`check_own_masks`).

With `dense_grad = True` the next backward also gives the gradient at inactive positions (dy.T @ x
for a linear layer), which growth criteria such as RigL's read on mask-update steps. That gradient
is not masked: set `dense_grad` back to False, and mask or consume the gradient, before an
optimizer step, or the step moves inactive weights.

Under torch.autocast the layers compute in the autocast dtype and return it, as nn.Linear and
nn.Conv1d/2d/3d do. Their backward is differentiable again (double backward). torch.func transforms
(functional_call, grad, vmap(grad) per-sample gradients, jvp, jacrev, jacfwd, hessian,
stack_module_state ensembles) and forward-mode AD see the plain-torch layer on where(mask, weight, 0)
whatever `zero_off_mask` says (see `sparsekern.ops.masked_linear`); inference mode (`to_inference`)
runs under vmap and refuses to be differentiated.

A plain nn.Linear / nn.Conv1d/2d/3d / nn.ConvTranspose1d/2d/3d state dict loads into the matching sparse
module (one pruned by torch.nn.utils.prune, its `weight_orig` and `weight_mask`, as that mask and the
pruned weight; a missing `mask` means all True: modules whose masks were not all True become dense, with
one warning per load_state_dict call naming them), and `to_dense()` returns a plain module holding the masked
weight (`sparsekern.nn.densify` turns a whole model back). A saved mask that is not bool
(torch.nn.utils.prune's are float) must hold only 0 and 1 (ValueError naming its key otherwise, the
module unchanged). An entry that torch's load_state_dict refuses (of another shape, not a tensor) leaves the whole
module as it was, its RuntimeError naming the entry: torch alone loads the others first.
Loading a state dict, or assigning or registering a `weight` Parameter (torch.nn.utils.parametrize's
remove_parametrizations(leave_parametrized=True) registers the original one again, holding the computed
values), sets `zero_off_mask` from the weight's values. A module moved off the meta device by `to_empty`
gets a new module's all-True mask (its weight holds whatever memory held, all of it active, until an init
or a state dict), the deferred-initialisation recipe; a mask for it comes from `set_mask`, a state dict or
`sparsify`. A SparseLinear in inference mode (`SparseLinear.to_inference`) is packed again from what it loaded.
"""
from __future__ import annotations

import weakref
from typing import Iterable

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .. import ops
from ..ops import _checks, _masked_linear_op, _transforms, reference
from ..ops.packing import PackedWeight
from . import _dense_loads
from .optimizer_state import check_optimizer, check_state_writable, reset_state_off_mask, trained_parameters
from .sharding import is_dtensor


class DenseClass(property):
    """The class attribute `dense_class` of a sparse module: the dense torch class it sparsifies, read as that class
    itself (`SparseConv2d.dense_class is nn.Conv2d`, on an instance too). A property to pydoc alone, which lists it
    with the line below rather than the dense class's whole docstring (help(SparseConv2d) was mostly nn.Conv2d's)."""

    def __init__(self, dense: type[nn.Module]):
        super().__init__()
        # On the instance: property keeps a doc given to a subclass's __init__ only on some Python versions.
        self.__doc__ = (f"nn.{dense.__name__}, the dense class this one sparsifies: from_dense takes one, "
                        f"to_dense returns one.")
        self.dense = dense

    def __get__(self, instance, owner=None) -> type[nn.Module]:
        return self.dense


class SparseModule(nn.Module):
    """What every sparse module shares: the mask, its invariant and state-dict loading.

    A mixin: subclasses also derive from the dense module they sparsify and call `_init_mask()`
    once `weight` exists.
    """

    mask: Tensor
    dense_grad: bool
    # Opt-in debugging check: verify the zero-off-mask promise at every forward that relies on it. A bool (TypeError
    # otherwise: when assigned to a module, else at the forward that would read it).
    check_zero_off_mask: bool = False

    # SparseLinear's inference mode (`to_inference`) holds a pack of weight and mask; the other sparse modules have
    # none, and `_refresh_pack` does nothing for them.
    _in_inference_mode = False

    def _init_mask(self) -> None:
        self.register_buffer("mask", torch.ones_like(self.weight, dtype=torch.bool))
        self.dense_grad = False
        self.zero_off_mask = True  # nothing is off an all-True mask
        self._record_tie(())       # tied to no other module until sparsify finds one (`tying.record`)

    def reset_parameters(self) -> None:
        """The dense module's initialisation (torch's default, over the whole weight), then the weight zeroed off the
        mask, which stays as it was: torch's init alone would write values off the mask into a weight promised 0
        there, and forward would multiply by them (a model re-initialised with
        `model.apply(lambda m: m.reset_parameters())`). The dense module's __init__ calls it before the mask exists.
        A weight computed from other parameters, or sharded (a DTensor), is left as torch's init leaves it: forward
        masks the one, and the other's whole mask cannot meet its shard."""
        super().reset_parameters()
        weight = self._parameters.get("weight")
        if "mask" in self._buffers and not weight_is_computed(self) and not is_dtensor(weight):
            self.zero_weights_off_mask()
        self._refresh_pack()

    def _refresh_pack(self) -> None:
        """Inference mode's pack made again, this module's and its tied twins' (`_tied_modules`, holding the same
        weight), from the weight and mask just written by this library (a load, an init), so that forward computes
        with them; a module in training mode, or with no inference mode (only SparseLinear has one), holds none."""
        for module in (self, *self._tied_modules()):
            if module._in_inference_mode:
                module.to_inference()

    def __getstate__(self) -> dict:
        # The modules tied to this one by strong reference, which deepcopy maps to their copies (to the model's own
        # copies when the model is copied whole) and pickle saves along; __setstate__ makes them weak again, so that a
        # twin copied only for this (a layer copied alone) goes with the copy's last reference to it.
        state = super().__getstate__()
        state["_tied_to"] = tuple(self._tied_modules())
        return state

    def __setstate__(self, state: dict) -> None:
        # A module pickled whole before the promise was tied to its weight holds it as a bool: a plain
        # attribute `zero_off_mask` at first, then `_zero_off_mask`.
        promised = state.pop("zero_off_mask", state.pop("_zero_off_mask", None))
        tied = state.pop("_tied_to", ())
        super().__setstate__(state)
        self.zero_off_mask = self.zero_off_mask if promised is None else promised  # its hook, as the setter keeps it
        self._record_tie(tied)

    def _record_tie(self, others) -> None:
        """Remembers `others`, the sparse modules holding this one's weight Parameter (`tying.record`), by weak
        reference: a module that leaves the model is not kept alive by its twin."""
        self.__dict__["_tied_to"] = tuple(weakref.ref(other) for other in others if other is not self)

    def _tied_modules(self) -> list[SparseModule]:
        """The modules recorded as tied to this one (`_record_tie`) that are alive and still hold its weight Parameter,
        checked now: one given a weight of its own since (an assignment, a conversion under torch's
        overwrite_module_params_on_conversion, a parametrization) is no twin any more."""
        weight = self._parameters.get("weight")
        alive = (ref() for ref in self.__dict__.get("_tied_to", ()))
        return [other for other in alive
                if other is not None and weight is not None and other._parameters.get("weight") is weight]

    def __setattr__(self, name: str, value) -> None:
        if name == "check_zero_off_mask":
            _checks.flag(value, "check_zero_off_mask")   # as zero_off_mask: "no" or None is no answer
        if name == "mask" and isinstance(value, Tensor):
            # Refused before it is in place: its check below, and every op, reads it as a dense bool tensor.
            _checks.tensor(value, "mask")
            if value.dtype != torch.bool:
                raise TypeError(f"mask must be a bool tensor, got {value.dtype}")
            if isinstance(value, nn.Parameter):   # nn.Module would register it as one: no buffer, no promise kept
                raise TypeError("mask must be a plain tensor (a buffer), got an nn.Parameter")
            if not _transforms.active():
                # set_mask and the algorithms write the mask in place, which torch refuses for these only then,
                # naming no mask: an expanded view, an inference tensor outside inference mode.
                _checks.writable_in_place(value, "mask")   # the mask itself, not where a mask says
        super().__setattr__(name, value)
        # A mask assigned in place of the old one is checked at once, not at the next forward (see
        # `_forward_arguments`): nn.TransformerEncoderLayer's fused eval-mode kernel, and a compiled graph, read
        # the weight without this module's forward.
        if name == "mask" and isinstance(value, Tensor):
            self._recheck_zero_off_mask()

    def register_parameter(self, name: str, param) -> None:
        super().register_parameter(name, param)
        # Assignment (`layer.weight = ...`) comes here too. A Parameter only: a forward pre-hook (weight_norm's,
        # torch.nn.utils.prune's) sets the weight it computes as a plain tensor at every forward, where a read
        # would cost a pass and a host sync. The one the promise was made for is read again as well:
        # torch.nn.utils.parametrize.remove_parametrizations(leave_parametrized=True) writes the computed
        # values into it (set_) and registers it again.
        if name == "weight" and isinstance(param, nn.Parameter):
            self._recheck_zero_off_mask()

    def __delattr__(self, name: str) -> None:
        super().__delattr__(name)
        # torch.nn.utils.parametrize (spectral_norm, weight_norm) and the older weight_norm/spectral_norm hooks
        # delete the weight Parameter before they compute one at every forward, from an original weight that may
        # move off 0 off the mask. The module's forward masks such a weight (_forward_arguments); the guard hook
        # that a broken promise brings keeps fused kernels that read the weight directly off the module too.
        if name == "weight":
            self.zero_off_mask = False

    def _recheck_zero_off_mask(self) -> None:
        """Sets `zero_off_mask` from the weight's values. A weight Parameter assigned in place of the old
        one carries values the module never masked: kept as a promise, they would reach the dense kernel.
        A DTensor shard that fully_shard sets, and the whole weight it gathers from the shards, are left
        alone: no op here mixes a shard with the mask, and the algorithms refuse such a model by name
        (`sharding.refuse_sharded`)."""
        mask = self.__dict__["_buffers"].get("mask")   # None while nn.Linear's __init__ sets the first weight
        if mask is None:
            return
        if mask.dtype != torch.bool:
            # Put in place unchecked (torch.func.functional_call swaps buffers in through the buffers dict): torch's
            # select below refused it naming no mask, and a convolution would have multiplied by the weight alone.
            raise TypeError(f"{type(self).__name__}'s mask must be a bool tensor, got {mask.dtype} (a mask handed to "
                            f"torch.func.functional_call is put in place without the checks of an assigned one)")
        weight, promised_for = self.weight, self._zero_off_mask_of
        if (mask.is_meta or weight.is_meta or weight.shape != mask.shape
                or is_dtensor(weight) or is_dtensor(promised_for)):
            # No values to read, or fully_shard putting a weight's shard in place of the whole weight or the
            # whole in place of the shard (before and after each forward and backward), the same values:
            # the promise made for the weight replaced passes to this one.
            self.zero_off_mask = promised_for is not None
        else:
            self.zero_off_mask = not self._off_mask_nonzero()

    @property
    def zero_off_mask(self) -> bool:
        """Whether the weight is exactly 0 wherever the mask is False (module docstring). Set to a bool
        (TypeError otherwise: a truthy "no" would be a promise).

        The promise holds for the weight tensor it was made for. Whatever puts another weight in place
        without assigning it (torch.func.functional_call, a parametrization, nn.Module.register_parameter)
        gets the masked path until the promise is made again: its values were never masked."""
        promised = self._zero_off_mask_of
        # The Parameter itself, as forward reads it: `self.weight` would compute a parametrized weight (and
        # spectral_norm's, in training mode, run a power iteration) at every read.
        return promised is not None and promised is self._parameters.get("weight")

    @zero_off_mask.setter
    def zero_off_mask(self, value: bool) -> None:
        # No promise for a weight that a parametrization or hook computes (not among the Parameters), which
        # is not read here (see the getter). In __dict__ itself: nn.Module.__setattr__ would register a
        # Parameter as a second parameter.
        _checks.flag(value, "zero_off_mask")   # a promise: "no" or a tensor is no answer
        weight = self._parameters.get("weight")
        value = value and weight is not None
        self.__dict__["_zero_off_mask_of"] = weight if value else None
        # The mask the promise was made for: one written in place since, other than by set_mask or an
        # algorithm (AveragedModel's buffer sync, which copies the live masks into an EMA whose averaged
        # weights are non-zero off them), makes forward check the promise again (_forward_arguments).
        # An inference tensor (made under torch.inference_mode) has no version counter: writes into it go unnoticed.
        # The tensor itself too: a mask put in place of the old one (assigned, registered) has a version
        # counter of its own, which may well read the same.
        mask = self.__dict__["_buffers"].get("mask")
        self.__dict__["_promised_mask"] = mask
        self.__dict__["_promised_mask_version"] = None if mask is None or mask.is_inference() else mask._version
        # A promise made anew: a mask moving since is read once (_forward_arguments, whose read makes the promise
        # again and then sets this True, so that the next move drops it unread).
        self.__dict__["_promise_rechecked"] = False
        # Fused inference kernels of torch read a child layer's weight directly: in eval mode,
        # nn.TransformerEncoderLayer hands linear1.weight, linear2.weight and its SparseMultiheadAttention's
        # in_proj.weight and out_proj.weight to one fused op, which would multiply by the values off the
        # mask. It keeps to its children's forwards while any of them has a forward hook, so a module that
        # holds values off its mask carries a no-op one (its only cost: nn.Module's hook path, a few
        # microseconds per call).
        hooks = self._forward_pre_hooks
        guards = [key for key, hook in hooks.items() if hook is _forward_through_the_mask]
        if not value and not guards:
            self.register_forward_pre_hook(_forward_through_the_mask)
        elif value:
            for key in guards:
                del hooks[key]

    def _apply(self, fn, recurse=True):
        # A conversion (.to, .double, ...) may put a new weight Parameter in place without assigning it
        # (torch.__future__.set_overwrite_module_params_on_conversion): the promise passes to it, as
        # every conversion takes 0 to 0. Not from the meta device (to_empty), where there were no values.
        promised, was_meta = self.zero_off_mask, _is_meta(self._parameters.get("weight"))
        mask_was_meta = _is_meta(self._buffers.get("mask"))
        super()._apply(fn, recurse)
        mask = self._buffers.get("mask")
        if mask_was_meta and not _is_meta(mask):
            # to_empty: a mask made where there were no values holds whatever memory held (all False, a fully
            # pruned layer, after the deferred-init recipe's reset_parameters), where a new module's is all True.
            with torch.no_grad():
                mask.fill_(True)
            self.zero_off_mask = True   # nothing is off an all-True mask
        else:
            self.zero_off_mask = promised and not (was_meta and not _is_meta(self._parameters.get("weight")))
        return self

    @torch.no_grad()
    def set_mask(self, mask: Tensor, *, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Copies `mask` (bool, shaped like the weight) in and sets the weight to 0 off it, so the
        module again promises `zero_off_mask`.

        Tied layers (sharing this weight Parameter, an LM's tied projections) that `sparsify` masked together get the
        mask too, and promise `zero_off_mask` with this one: the weight has one set of active entries, and a twin left
        on its old mask would compute, and give the weight a gradient, through entries this one promises are 0. The
        tie is checked at this call (a layer given a weight of its own since is left alone); it holds after
        `.to()`, deepcopy and pickling of the model (a copy's layers are tied to each other, not to the original's).
        Layers tied by hand after `sparsify` are unknown to it: sparsify the model again, or set each one's mask.
        Every layer's mask is checked before any changes; `dense_grad` stays each layer's own. A SparseLinear in
        inference mode (`to_inference`), this one or a twin, stays in it, packed from the new mask: the pack is made
        before anything changes, so a refused call leaves the old one.

        `optimizer`: one that trains this weight and has stepped (a method of your own changing masks mid-training,
        a one-shot pruning before fine-tuning): its per-weight state (momentum, Adam's moments: every state tensor
        shaped like the weight) is zeroed off the new mask too, as `sparsify(optimizer=)` and DST zero it (Rprop's
        step_size and Adagrad's sum are set to where a fresh state starts instead: the lr of the weight's group, the
        initial_accumulator_value; `optimizer_state.fresh_state`). Left
        there, it would move the pruned weights off 0 at the next step while the module promises they are 0, and
        forward would compute with them (the state of a weight shared by tied layers is zeroed once). Not an LBFGS
        (ValueError), nor one that does not train this weight (ValueError: another layer's, say), nor one holding such
        a state tensor that cannot be written in place (ValueError naming it), checked before anything changes. A
        gradient pending on the weight is not masked: call it before backward, or after the optimizer step.

        A weight computed at every forward (a parametrization, weight_norm or spectral_norm registered
        on this module) is not the module's to write, nor is it read: the mask alone is copied, and
        forward masks the computed weight (`zero_off_mask` stays False). Its original keeps its values
        off the mask, and spectral_norm's σ is that of the whole original; so does the optimizer's state of
        it (`optimizer` zeroes nothing there), which forward's mask makes harmless."""
        _checks.tensor(mask, "mask")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
        tied = self._tied_modules()
        # Its own buffer and its twins', written below (`mask`, only read, may be an expanded view); then the mask's
        # shape, which is the buffers' (their weight's).
        check_own_mask(self, f"set_mask: this {type(self).__name__}")
        _check_twin_masks(tied, "set_mask", "this one")
        # The mask's shape, which is the weight's: reading a computed weight would run its parametrization
        # (spectral_norm's power iteration, in training mode).
        if mask.shape != self.mask.shape:
            raise ValueError(f"mask must have the weight's shape {tuple(self.mask.shape)}, "
                             f"got {tuple(mask.shape)}")
        if mask.is_meta and not self.mask.is_meta:
            raise ValueError("mask is on the meta device, which holds no values")
        computed = weight_is_computed(self)
        if not computed:
            self._check_weight_writable()   # before the mask changes: torch would refuse the weight's write only
        # Its mask alone an inference tensor (assigned under torch.inference_mode), which torch refused to write
        # naming no layer (a layer built there is refused by its weight, above).
        _refuse_inference_mask(self, f"set_mask: the mask of this {type(self).__name__}", "call set_mask")
        resets_state = self._check_optimizer(optimizer, mask)   # the shared weight's, reset once
        # The layers in inference mode (this one, a twin) keep serving, from the new mask: their pack is made before
        # anything changes, so that one that cannot be made leaves every layer as it was. Entries off the mask are
        # dropped from a pack, so the weight's values there (zeroed below) do not matter.
        serving = [module for module in (self, *tied) if module._in_inference_mode]
        packed = ops.pack(self.weight, mask.to(self.mask.device)) if serving else None
        for module in (self, *tied):
            module.mask.copy_(mask)
        if resets_state:
            reset_state_off_mask(optimizer, self.weight, self.mask)
        if computed:
            self.zero_off_mask = False   # a new mask: the promise is not made for it (nor can be)
        else:
            self.zero_weights_off_mask()
            for twin in tied:
                twin.zero_off_mask = True   # the weight they share was zeroed off this mask just now
        for module in serving:
            module._hold_packed(packed)

    def _check_optimizer(self, optimizer: torch.optim.Optimizer | None, mask: Tensor) -> bool:
        """Whether `set_mask` resets `optimizer`'s per-weight state of this module's weight, each tensor of it checked
        writable."""
        check_optimizer(optimizer, "build the LBFGS after the masks are set")
        if optimizer is None or weight_is_computed(self):   # a computed weight holds no optimizer state of its own
            return False
        if id(self.weight) not in trained_parameters(optimizer):
            raise ValueError(f"optimizer does not train this {type(self).__name__}'s weight, so it holds no state of "
                             f"it to zero off the mask: pass the optimizer that trains it, or None")
        check_state_writable(optimizer, self.weight, self.mask, f"this {type(self).__name__}")
        return True

    @torch.no_grad()
    def zero_weights_off_mask(self) -> None:
        """Sets every weight off the mask to exactly 0, so the module promises `zero_off_mask` again
        (after anything wrote into the weight).

        ValueError for a weight computed at every forward (a parametrization, weight_norm or spectral_norm
        registered on this module): a write into it would be lost at the next forward, and no promise can
        be made for values the module does not own; its forward masks it anyway."""
        if weight_is_computed(self):
            raise ValueError(f"{type(self).__name__}'s weight is computed from other parameters at every forward "
                             f"(a parametrization, weight_norm, spectral_norm or torch.nn.utils.prune), not a "
                             f"Parameter of its own to zero off the mask; forward masks it anyway (set_mask "
                             f"copies a mask alone into such a module)")
        # Read where the weight is written: ~ refused a float mask naming none, and a row of one broadcast.
        check_own_mask(self, f"zero_weights_off_mask: this {type(self).__name__}", written=False)
        self._check_weight_writable()
        self.weight.masked_fill_(~self.mask, 0)
        self.zero_off_mask = True

    def _check_weight_writable(self) -> None:
        """ValueError for a weight made under torch.inference_mode (the layer was built there) written outside it:
        torch refuses, naming no layer, and set_mask would have changed the mask already (torch lets a write into
        an inference tensor that requires no grad pass); and for a shard of a weight (a DTensor: fully_shard or tensor
        parallelism), where torch refused the write naming no layer ("got mixed torch.Tensor and DTensor") after
        set_mask had changed the mask."""
        if is_dtensor(self.weight):
            raise ValueError(f"{type(self).__name__}'s weight is sharded across ranks (a DTensor: fully_shard or "
                             f"tensor parallelism), which its whole mask cannot be applied to: set the mask before "
                             f"sharding the model, or wrap it in DistributedDataParallel instead (every rank keeps "
                             f"whole weights)")
        if self.weight.is_inference() and not torch.is_inference_mode_enabled():
            raise ValueError(f"{type(self).__name__}'s weight is an inference tensor (the layer was built under "
                             f"torch.inference_mode), which cannot be written outside inference mode: set its mask "
                             f"under torch.inference_mode() (or initialise it there), or build the layer outside it")

    @torch.no_grad()
    def verify_zero_off_mask(self) -> None:
        """Raises RuntimeError if the module promises `zero_off_mask` and a weight off the mask is
        not exactly 0 (NaN included). One pass over the weight and one host sync."""
        if self.zero_off_mask and self._off_mask_nonzero():
            raise RuntimeError(f"{type(self).__name__} promises zero_off_mask but holds non-zero weights off "
                               "its mask: call zero_weights_off_mask() or set zero_off_mask = False after writing them")

    @torch.no_grad()
    def _off_mask_nonzero(self) -> bool:
        return bool(torch.where(self.mask, 0, self.weight).ne(0).any())

    def _forward_arguments(self) -> tuple:
        """(weight, mask, bias, zero_off_mask) as forward takes them, in one call (each call and
        attribute read on a layer's path costs it every step).

        The tensors are read from nn.Module's dicts where they are there: the attribute reads
        (nn.Module.__getattr__, ~0.5 us each) were a tenth of a small layer's fixed cost per call. One
        that is not (removed by a parametrization, or by weight_norm's hook that sets it as a plain
        attribute) is read as an attribute, as nn.Module resolves it.

        zero_off_mask is verified first when `check_zero_off_mask` asks for it. Not under torch.func
        transforms, where the layers select on the mask whatever they promise (and vmap cannot branch
        on values of a batched weight).

        A weight computed at every forward from other parameters (a parametrization, a weight_norm or
        spectral_norm hook) is taken through the mask whatever `zero_off_mask` says: the module never
        wrote those values, and the computation may move them off 0 (spectral_norm's σ reads every
        entry, so its backward reaches the original weight off the mask)."""
        parameters, buffers = self._parameters, self._buffers
        weight, mask, bias = parameters.get("weight"), buffers.get("mask"), parameters.get("bias")
        if weight is None:
            weight = self.weight
        zero_off_mask = self._zero_off_mask_of is weight
        # Not while torch.compile traces, where a version is no value to branch on. The promised mask's version is
        # None only for an inference tensor (no version counter), which this one then is.
        promised_version = self._promised_mask_version
        if (zero_off_mask and mask is not None and not torch.compiler.is_compiling()
                and (mask is not self._promised_mask
                     or promised_version is not None and mask._version != promised_version)
                and not _transforms.active()):
            # Another mask, or one written in place, since the promise (setter). Checked once, a read of the weight
            # (a host sync on a GPU); a mask that moves again before the promise is made anew drops it unread, for
            # the masked path: one copied in at every forward (DDP's buffer sync under torch 2.11) would cost a
            # sync per layer per step.
            if self._promise_rechecked:
                self.zero_off_mask = False
            else:
                self._recheck_zero_off_mask()
                self.__dict__["_promise_rechecked"] = True
            zero_off_mask = self._zero_off_mask_of is weight
        if zero_off_mask and self.check_zero_off_mask is not False and not _transforms.active():
            # Set on the class (where no assignment is checked), a truthy "no" would turn the check on: refused here.
            _checks.flag(self.check_zero_off_mask, "check_zero_off_mask")
            self.verify_zero_off_mask()
        return (weight, self.mask if mask is None else mask, self.bias if bias is None else bias, zero_off_mask)

    @property
    def nnz(self) -> int:
        """Number of active (masked-in) weights."""
        return int(self.mask.sum())

    @property
    def density(self) -> float:
        """Fraction of the weight that is active (1.0 for an empty weight, as `summary` and
        `PackedWeight.density` count it: a layer with nothing to keep keeps all of it)."""
        entries = self.mask.numel()
        return self.nnz / entries if entries else 1.0

    def masked_weight(self) -> Tensor:
        """weight where the mask is True, else 0 (a new tensor, not a view)."""
        return reference.masked_weight(self.weight, self.mask)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        _translate_pruned(state_dict, prefix)
        # Every entry of this module before any loads: torch copies each entry it can and raises for the
        # others only at the end, which would leave the module half loaded.
        for name in (*self._parameters, *self._buffers):
            _check_loaded_layout(state_dict.get(prefix + name), prefix + name)
        assign = local_metadata.get("assign_to_params_buffers", False)
        if not assign:
            _refuse_inference_targets(self, state_dict, prefix)
        if prefix + "mask" in state_dict:   # its own buffer first: one put in through mask.data may be of another shape
            check_own_mask(self, f"load_state_dict: layer {prefix[:-1] or '(root)'!r}", written=not assign)
        own = {prefix + name: value for name, value in (*self._parameters.items(), *self._buffers.items())
               if value is not None and name not in self._non_persistent_buffers_set}
        refused = [key for key, value in own.items()
                   if key in state_dict and _refused_by_torch(value, state_dict[key], assign)]
        if refused:
            # torch loads each entry it can and reports the others at the end, which left this module half loaded (a
            # new weight under the old mask). Handed only the entries it refuses, torch reports them in its own words
            # (a RuntimeError naming each key, at the end of the call) and loads nothing of this module.
            entries = {key: value for key, value in state_dict.items() if key not in own or key in refused}
            absent: list[str] = []
            super()._load_from_state_dict(entries, prefix, local_metadata, strict, absent, unexpected_keys,
                                          error_msgs)
            # A dense checkpoint's absent mask is no missing key: it loads as all True (below) where nothing is refused.
            dense_checkpoint = prefix + "weight" in state_dict
            missing_keys.extend(key for key in absent
                                if key not in state_dict and not (dense_checkpoint and key == prefix + "mask"))
            return
        if self._in_inference_mode and assign:
            _refuse_meta_into_pack(state_dict, prefix)
        # load_state_dict hands each module its own copy of the dict, so filling in the mask of a
        # dense checkpoint here does not touch the caller's dict.
        given_mask = prefix + "mask" in state_dict
        dense = not given_mask and prefix + "weight" in state_dict
        # Its tied twins' masks follow the one it loads (below), checked before anything changes; a weight assigned in
        # place of this one's (assign=True) is its own, and its former twins keep their weight and mask.
        unties = assign and prefix + "weight" in state_dict
        twins = [] if unties or not (dense or given_mask) else self._tied_modules()
        _check_twin_masks(twins, "load_state_dict", f"layer {prefix[:-1] or '(root)'!r}")
        if twins:
            _dense_loads.check_tie_masks(missing_keys, [self, *twins], assign)
        if dense:
            # The module's shape: a weight of another shape (a Conv2d's into a SparseConv3d) fails torch's own check,
            # which loads nothing of it, so the mask stays as it is, with no mismatch reported for a mask the
            # checkpoint does not hold.
            weight = state_dict[prefix + "weight"]
            # A twin that took its mask from this state dict earlier in the call gave the tie that mask, which stays:
            # the tie ends on the mask the state dict holds, whichever of its layers torch loads first (`_dense_loads`).
            keeps = weight.shape != self.mask.shape or twins and _dense_loads.mask_loaded_in_call(missing_keys, self)
            if not keeps and not self.mask.is_meta and not bool(self.mask.all()):
                # A pretrained dense checkpoint loaded into a sparsified model: it would train dense, silently.
                _dense_loads.note(missing_keys, prefix + "mask", self, twins)
            state_dict[prefix + "mask"] = (self.mask.clone() if keeps
                                           else torch.ones(self.mask.shape, dtype=torch.bool, device=weight.device))
        mask = state_dict.get(prefix + "mask")
        _check_loaded_mask(mask, prefix + "mask")
        if dense:   # a mask the state dict holds had its buffer checked first, above
            # Copied into the module's own buffer; assign=True puts the loaded one in its place instead, but reads the
            # old one as the weight is put in place first (`_recheck_zero_off_mask`).
            check_own_mask(self, f"load_state_dict: layer {prefix[:-1] or '(root)'!r}", written=not assign)
        if isinstance(mask, Tensor) and (mask.dtype != torch.bool or not _checks.non_overlapping(mask)):
            # As a bool tensor of its own here, not in the copy into the buffer: load_state_dict(assign=True)
            # puts the tensor itself in the module, where an expanded view (which torch.save keeps as
            # one) would refuse every later write of the mask (set_mask, DST).
            state_dict[prefix + "mask"] = mask.bool().contiguous()
        # Weight values load as saved: a checkpoint of a module that kept the invariant already
        # holds zeros off its mask, and OptG's deliberately kept values off the mask come back.
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        self._recheck_zero_off_mask()
        # A tied twin holds the weight just loaded: left on its old mask, it would promise 0 off that mask where the
        # weight is not, compute densely while counted sparse, and differ from this layer's mask, which the
        # algorithms refuse. So the tie loads the mask (the one a checkpoint holds for any of its layers, in any order,
        # else dense for a dense weight) whichever of its layers' keys a checkpoint holds (one leaving the tied
        # duplicate out, as torch.save of a tied LM may); where torch refused an entry of this layer, the twins take
        # the mask it holds now, so that the tie stays one.
        for twin in twins:
            twin.mask.copy_(self.mask)
            twin.zero_off_mask = self.zero_off_mask
        if given_mask and twins:
            _dense_loads.mask_loaded(missing_keys, [self, *twins])
        self._refresh_pack()   # a layer in inference mode (this one, a twin) serves the loaded weight and mask

    def extra_repr(self) -> str:
        if self.mask.is_meta:  # no values to count
            return super().extra_repr()
        return f"{super().extra_repr()}, density={self.density:.4g}"


def _is_meta(tensor: Tensor | None) -> bool:
    return tensor is not None and tensor.is_meta


def _forward_through_the_mask(module: nn.Module, args) -> None:
    """The forward pre-hook a sparse module holds while its weight is non-zero off the mask
    (`SparseModule.zero_off_mask` False): it does nothing, but its presence keeps fused kernels that
    would read the weight directly (nn.TransformerEncoderLayer's in eval mode) off the module."""


def _check_loaded_mask(mask, key: str) -> None:
    """ValueError naming `key` unless a non-bool saved mask holds only 0 and 1, before this module
    changes. The copy into the bool buffer reads any non-zero as kept, which is right for the 0/1
    float masks of torch.nn.utils.prune but would keep an entry saved as 0.5, NaN, -1 or 2 (a soft
    mask or scores saved by mistake). Modules that torch's load_state_dict reached earlier are
    already loaded, as with any error it raises. (A torch.sparse, mkldnn or nested mask was refused
    before, by `_check_loaded_layout`.)"""
    if not isinstance(mask, Tensor) or mask.dtype == torch.bool or mask.is_meta:
        return
    if not bool(((mask == 0) | (mask == 1)).all()):
        bad = mask[(mask != 0) & (mask != 1)].flatten()[:3].tolist()
        raise ValueError(f"state dict entry {key!r} ({mask.dtype}) must hold only 0 and 1 (or be a bool "
                         f"tensor), got values such as {bad}")


def _rename_dense_entries(state_dict: dict, prefix: str, renames: dict[str, str]) -> None:
    """Moves a dense module's entries in `state_dict` to the keys of the sparse module that holds its weights in
    child layers (`renames`: dense key -> sparse key, both without `prefix`), in place, with torch.nn.utils.prune's
    `<key>_orig` and `<key>_mask` of a pruned one (which the child then loads as its mask and pruned values,
    `_translate_pruned`). An entry the sparse module's own key already holds is left alone."""
    for dense_key, sparse_key in renames.items():
        for suffix in ("", "_orig", "_mask"):
            dense_entry, sparse_entry = prefix + dense_key + suffix, prefix + sparse_key + suffix
            if dense_entry in state_dict and sparse_entry not in state_dict:
                state_dict[sparse_entry] = state_dict.pop(dense_entry)


def _translate_pruned(state_dict: dict, prefix: str, names: tuple[str, ...] = ("weight", "bias")) -> None:
    """Turns torch.nn.utils.prune's entries of a layer in `state_dict` into a sparse module's, in place: a
    pruned weight is saved as `weight_orig` (the values before pruning) and `weight_mask` (its float 0/1
    mask), which load as `weight` (the pruned values, 0 off the mask, as prune's forward computes them) and
    `mask`; a pruned bias (`bias_orig`, `bias_mask`), or any other of `names` (an attention's
    `in_proj_bias`, `bias_k`, `bias_v`), as its pruned values. So a model pruned by torch (a lottery-ticket
    code base's checkpoint) loads into its sparse twin. ValueError naming the key for a mask that is not
    0/1 or not shaped like its values, before anything loads."""
    for name in names:
        original, pruned = f"{prefix}{name}_orig", f"{prefix}{name}_mask"
        if prefix + name in state_dict or not (isinstance(state_dict.get(original), Tensor)
                                               and isinstance(state_dict.get(pruned), Tensor)):
            continue
        if name == "weight" and prefix + "mask" in state_dict:
            # A sparse module's own mask beside prune's: one that torch pruned itself (its weight_orig and
            # weight_mask are its own entries), or nothing says which mask holds.
            continue
        for key in (original, pruned):
            _check_loaded_layout(state_dict[key], key)
        _check_loaded_mask(state_dict[pruned], pruned)
        values, mask = state_dict[original], state_dict[pruned]
        if mask.shape != values.shape:
            raise ValueError(f"state dict entry {pruned!r} must have the shape of {original!r} "
                             f"{tuple(values.shape)}, got {tuple(mask.shape)}")
        if mask.device != values.device:
            # Pruned below by where(mask, values, 0), which refused them naming neither ("Tensor on device meta is not
            # on the expected device cpu!").
            raise ValueError(f"state dict entry {pruned!r} must be on the device of {original!r} ({values.device}), "
                             f"got {mask.device}")
        keep = mask.bool()
        del state_dict[original], state_dict[pruned]
        state_dict[prefix + name] = reference.masked_weight(values, keep)
        if name == "weight":
            state_dict[prefix + "mask"] = keep


def _refuse_meta_into_pack(state_dict: dict, prefix: str) -> None:
    """ValueError naming the entry, before anything is assigned, for a meta weight or mask that load_state_dict(...,
    assign=True) would put in a layer in inference mode: its pack, made again from them (`_refresh_pack`), holds no
    values there, and failed after the assignment, naming no layer. Refused rather than leaving inference mode
    unasked: the layer keeps serving as it did; one in training mode takes meta tensors (to materialize later)."""
    for name in ("weight", "mask"):
        value = state_dict.get(prefix + name)
        if isinstance(value, Tensor) and value.is_meta:
            raise ValueError(f"load_state_dict(assign=True): state dict entry {prefix + name!r} is on the meta "
                             f"device, and layer {prefix[:-1] or '(root)'!r} is in inference mode, which packs its "
                             f"weight and mask: call to_training() on it first (sparsekern.nn.to_training(model)), or "
                             f"load tensors holding values")


def _refused_by_torch(current: Tensor, saved, assign: bool) -> bool:
    """Whether torch's load_state_dict refuses `saved` for the module's tensor `current` (its error naming the key):
    not a tensor, of another shape (a lazy parameter takes any), a meta tensor copied into one holding values, or one
    that cannot become a Parameter requiring grad (an integer weight under assign=True)."""
    if not torch.overrides.is_tensor_like(saved):
        return True
    if not nn.parameter.is_lazy(current) and saved.shape != current.shape:
        return True
    if assign:
        return (isinstance(current, nn.Parameter) and current.requires_grad
                and not (saved.is_floating_point() or saved.is_complex()))
    return saved.is_meta and not current.is_meta


def _refuse_inference_targets(module: SparseModule, state_dict, prefix: str) -> None:
    """ValueError naming the first of `module`'s tensors that `state_dict` would be copied into (the mask too where
    it holds the weight alone: a dense checkpoint loads the mask as all True) and that is an inference tensor (made
    under torch.inference_mode, a mask assigned there) outside inference mode: torch's copy into one writes it, then
    refuses it, so the layer ended with the loaded mask (or weight) and its error."""
    layer = f"layer {prefix[:-1] or '(root)'!r}"
    for name, value in (*module._parameters.items(), *module._buffers.items()):
        loaded = prefix + name in state_dict or name == "mask" and prefix + "weight" in state_dict
        if name == "mask" and loaded:
            _refuse_inference_mask(module, f"load_state_dict: the mask of {layer}",
                                   "load under torch.inference_mode(), or with assign=True")
        elif (isinstance(value, Tensor) and value.is_inference() and not torch.is_inference_mode_enabled() and loaded
                and name not in module._non_persistent_buffers_set):
            raise ValueError(f"load_state_dict: the {name} of {layer} is an inference tensor (made under "
                             f"torch.inference_mode), which cannot be loaded into outside inference mode: load under "
                             f"torch.inference_mode(), or with assign=True; nothing of the layer was loaded")


def _refuse_inference_mask(module: SparseModule, subject: str, or_else: str) -> None:
    """ValueError (`subject` starts it) where `module`'s own mask is an inference tensor (assigned under
    torch.inference_mode) outside inference mode, which torch writes, then refuses: the remedy is a mask of its own,
    not another argument."""
    if module.mask.is_inference() and not torch.is_inference_mode_enabled():
        raise ValueError(f"{subject} is an inference tensor (assigned under torch.inference_mode), which cannot be "
                         f"written outside inference mode: put a copy in its place first (layer.mask = "
                         f"layer.mask.clone()), or {or_else}; nothing was changed")


def _check_loaded_layout(value, key: str) -> None:
    """ValueError naming `key` for a torch.sparse, mkldnn or nested tensor: copy_ into a dense
    parameter or buffer refuses the first two only as it loads them, after the entries before, and a
    nested tensor (torch.nested's older layout is strided) raises an internal error as its shape is read."""
    if isinstance(value, Tensor) and value.layout != torch.strided:
        raise ValueError(f"state dict entry {key!r} must be a dense (strided) tensor, got layout {value.layout}")
    if isinstance(value, Tensor) and value.is_nested:
        raise ValueError(f"state dict entry {key!r} must be a dense (strided) tensor, got a nested tensor")


_PACKED_FIELDS = ("bitmap", "values", "chunk_offsets")


class SparseLinear(SparseModule, nn.Linear):
    """nn.Linear whose weight is multiplied by a fixed bool `mask`: its output is always that of weight * mask.

    Takes nn.Linear's arguments and starts dense (its `mask` buffer, shaped like the weight, all True).
    `sparsekern.sparsify(model, density)` makes a model's layers sparse (masks, per-layer densities, init), and
    `set_mask(mask)` sets one layer's mask, zeroing the weight off it.

    * `zero_off_mask`: the layer's promise that every weight off the mask is exactly 0, so forward runs the dense
      kernel on the weight itself and masks only the weight gradient. True after `set_mask` and sparsify; set it
      False (or call `zero_weights_off_mask()`) after writing into the weight off the mask.
    * `dense_grad = True`: the next backward also gives the gradient off the mask (RigL's growth reads it).
    * `from_dense(linear)` shares an nn.Linear's Parameters; `to_dense()` returns a plain nn.Linear holding the
      masked weight (`sparsekern.densify(model)` turns a whole model back). A plain or torch-pruned nn.Linear's
      state dict loads into it.
    * `to_inference()` packs the masked weight for `sparsekern.ops.sparse_linear` (no gradients in that mode),
      `to_training()` goes back; `sparsekern.nn.to_inference(model)` switches a whole model's.
    * `nnz`, `density`, `masked_weight()`, `verify_zero_off_mask()`.

    More: the docstring of `sparsekern.nn.modules` (the promise, autocast, torch.func, loading) and the README's
    Python API section."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        _check_dtype(dtype)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_mask()

    def forward(self, input: Tensor) -> Tensor:
        if "packed_values" in self._buffers:  # `_in_inference_mode`, inline: every forward passes here
            if torch.compiler.is_exporting():
                # Its packed weight is checked, and its kernel chosen, by the values it holds: torch.export raised
                # GuardOnDataDependentSymNode from inside those checks.
                raise RuntimeError("a SparseLinear in inference mode (to_inference()) cannot be exported by "
                                   "torch.export, whose tracing holds no values to check its packed weight by: export "
                                   "it in training mode (to_training()), which computes the same outputs")
            return ops.sparse_linear(input, self.packed, self.bias)
        weight, mask, bias, zero_off_mask = self._forward_arguments()
        if isinstance(input, Tensor) and input.is_nested:
            # nn.TransformerEncoder hands its layers a NestedTensor in eval mode when given a src_key_padding_mask,
            # and a layer kept off its fused kernel (a sparse layer off its mask carries a forward hook) passes it
            # to its linear layers: F.linear takes one, the masked-linear kernels do not.
            return nn.functional.linear(input, _masked_linear_op.weight_for_dense_kernel(
                weight, mask, zero_off_mask, self.dense_grad), bias)
        return ops.masked_linear(input, weight, mask, bias, dense_grad=self.dense_grad, zero_off_mask=zero_off_mask)

    @torch.no_grad()
    def to_inference(self) -> "SparseLinear":
        """Inference mode: packs the masked weight (`sparsekern.ops.pack`) and runs forward through
        `ops.sparse_linear`, which reads only the kept entries at small batch (and multiplies
        densely by itself where that is faster). No gradients flow in this mode.

        The packed tensors are non-persistent buffers (`packed_bitmap`, `packed_values`,
        `packed_chunk_offsets`): they follow `.to(device)` and `.half()`, and the state dict stays
        that of a training module. `to_training()` goes back. Returns self.

        The pack is a snapshot of weight and mask. What this library writes into a layer in inference mode, or into
        a tied twin sharing its weight, is packed again, so that forward computes with it: `set_mask`,
        `load_state_dict` (of the layer or of a model holding it), `reset_parameters`, `sparsekern.nn.init`'s
        functions, `sparsify` of a model holding it, and `SparseAveragedModel`'s update (`zero_weights_off_mask`
        changes nothing a pack holds); `load_state_dict(..., assign=True)` of a meta weight or mask, which holds no
        values to pack, is refused (ValueError naming the entry, the layer left as it was: `to_training()` first); the
        training algorithms (DST, IMP, SWAMP, OptG) and `broadcast_masks` refuse a layer in inference mode whose mask
        they would set, and at step() one still training, which gets no gradient there (ValueError:
        `sparsekern.nn.to_training(model)` first); a frozen layer that DST, or OptG's learned scores, leave alone may
        stay in it.
        A write of your own into the `weight` or `mask` tensor in place (`.data`, `copy_`, a `torch.nn.init`
        function) is not seen, as it cannot be without reading the tensors at every forward: call `to_inference()`
        again after one.

        Forward computes in the packed weight's dtype, under torch.autocast too, which hands it the output of a
        layer before it in autocast's dtype: that is cast to the packed weight's (`ops.sparse_linear`); torch.jit.trace
        traces it (called yet or not), torch.compile runs it (with a graph break), torch.export refuses it
        (RuntimeError): export the training-mode layer.

        A projection of a SparseMultiheadAttention or SparseRNN/LSTM/GRU does not run its own forward (its parent
        hands its weight to torch's fused op): that parent's forward refuses one in inference mode, naming it.
        `sparsekern.nn.to_inference(model)` switches the layers that run their own forward.
        """
        return self._hold_packed(ops.pack(self.weight, self.mask))

    def _hold_packed(self, packed: PackedWeight) -> "SparseLinear":
        """Inference mode on `packed`, this layer's packed weight (`sparsekern.nn.to_inference` packs every layer
        first, so that a layer it cannot pack leaves the model as it was)."""
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

    def extra_repr(self) -> str:
        # Inference mode runs another kernel and refuses gradients: a printed model says which layers are in it.
        return f"{super().extra_repr()}{', inference' if self._in_inference_mode else ''}"

    @property
    def _in_inference_mode(self) -> bool:
        """Whether `to_inference()` holds a pack (`packed` also checks the pack's values)."""
        return "packed_values" in self._buffers

    @property
    def packed(self) -> PackedWeight | None:
        """The packed weight of inference mode, or None in training mode."""
        if not self._in_inference_mode:
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
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{cls.__name__}.from_dense takes an nn.Linear, got {type(linear).__name__}")
        _check_adoptable_weight(cls, linear)
        sparse = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                     device="meta", dtype=linear.weight.dtype)
        return _adopt_parameters(sparse, linear)

    def to_dense(self) -> nn.Linear:
        """A plain nn.Linear with copies of the masked weight and the bias."""
        dense = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                          device="meta", dtype=self.weight.dtype)
        return _copy_masked_into(dense, self)


def sparse_modules(model: nn.Module) -> list[tuple[str, SparseModule]]:
    """(qualified name, module) of every sparse module in `model`, in `named_modules()` order; TypeError unless
    `model` is an nn.Module."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    return [(name, module) for name, module in model.named_modules() if isinstance(module, SparseModule)]


def weight_type_problem(weight: Tensor) -> str | None:
    """What keeps a dense layer's weight from becoming a sparse module's ("a torch.sparse_coo weight: ..."),
    or None: a torch.sparse or mkldnn weight fails in the dispatcher as the mask is made ("Could not run
    'aten::fill_.Scalar' with arguments from the 'SparseCPU' backend"), a nested one as its shape is read,
    an integer one as the module is."""
    if weight.layout != torch.strided:
        return f"a {weight.layout} weight: sparse layers take dense (strided) weights"
    if weight.is_nested:   # torch.nested's older layout: strided, and its shape raises an internal error
        return "a nested weight: sparse layers take dense (strided) weights"
    if weight.dtype not in _checks.SCORE_DTYPES:
        return f"a {weight.dtype} weight: sparse layers take float16, bfloat16, float32 or float64 weights"
    return None


def is_computed(module: nn.Module, name: str) -> bool:
    """Whether `module`'s tensor `name` is computed from other parameters (by torch.nn.utils.parametrize, or set as
    a plain attribute by a forward pre-hook: weight_norm, spectral_norm, torch.nn.utils.prune) or held as a buffer,
    rather than a Parameter of its own (or None), which a sparse module can share. Reads no computed value."""
    if _is_parametrized(module, name):
        return True
    return not isinstance(module._parameters.get(name), nn.Parameter) and (
        name in module._buffers or vars(module).get(name) is not None)


def weight_is_computed(module: SparseModule) -> bool:
    """Whether sparse `module`'s weight is not a Parameter of its own: computed at every forward from other
    parameters (torch.nn.utils.parametrize, parametrizations.weight_norm/spectral_norm, the older weight_norm and
    spectral_norm hooks, torch.nn.utils.prune, registered after sparsify), or deleted. Reads no computed value."""
    return _is_parametrized(module, "weight") or not isinstance(module._parameters.get("weight"), nn.Parameter)


def _is_parametrized(module: nn.Module, name: str) -> bool:
    """parametrize.is_parametrized(module, name), asked only of a module holding the `parametrizations` child that
    register_parametrization adds: on one without, its getattr raises nn.Module's AttributeError, whose message is
    formatted and dropped (~2 us), at every DST/OptG/SWAMP step for every layer (54 on ResNet-50)."""
    return "parametrizations" in module._modules and parametrize.is_parametrized(module, name)


def _computed_by_torch(module: SparseModule) -> bool:
    """Whether sparse `module`'s weight, not a Parameter of its own, is computed by one of torch's mechanisms (a
    parametrization, or the hooks of weight_norm, spectral_norm and torch.nn.utils.prune, which keep the weight's
    source under `weight_orig` or `weight_g`/`weight_v`), rather than deleted or replaced by hand."""
    return _is_parametrized(module, "weight") or any(
        source in module._parameters for source in ("weight_orig", "weight_g", "weight_v"))


def computed_weight_refusal(named: list[tuple[str, SparseModule]], who: str, built: bool = False) -> str | None:
    """Why `who` (an algorithm, broadcast_masks) cannot act on `named`, the first layer whose weight is computed
    (`weight_is_computed`) named, or None. `built`: `who` was built before the weight became computed.

    The algorithms refuse such a layer rather than act on the parametrization's original: they zero weights off
    the mask, regrow them at 0, rank them by magnitude and gradient, rewind them and zero their optimizer state,
    all of which hold for the weight forward multiplies by, not for an original it is computed from (spectral_norm
    divides by σ of the whole original; weight_norm's magnitude has another shape; a user's parametrization may
    move a 0 anywhere). Written into the computed tensor, a change would be lost at the next forward."""
    for name, module in named:
        if not weight_is_computed(module):
            continue
        if not _computed_by_torch(module):
            when = f" after {who} was built" if built else ""
            return (f"{who}: layer {name!r}'s weight is not a Parameter: it was deleted or replaced by a plain "
                    f"tensor{when}, and {who} masks, regrows and rewinds Parameters; give the layer its weight back "
                    f"as an nn.Parameter (del layer.weight; layer.weight = nn.Parameter(...)), or leave the layer out "
                    f"of sparsify (exclude=)")
        when = f", registered after {who} was built" if built else ""
        return (f"{who}: layer {name!r}'s weight is computed from other parameters at every forward (a "
                f"parametrization, weight_norm, spectral_norm or torch.nn.utils.prune{when}), not a Parameter "
                f"of its own whose values {who} could mask, regrow or rewind: register the parametrization "
                f"before sparsify (the layer then stays dense), remove it "
                f"(torch.nn.utils.parametrize.remove_parametrizations, torch.nn.utils.remove_weight_norm / "
                f"remove_spectral_norm), or leave the layer out of sparsify (exclude=)")
    return None


def refuse_meta(named: list[tuple[str, nn.Module]], who: str | None = None,
                tensors: tuple[str, ...] = ("weight",)) -> None:
    """ValueError naming every layer of `named` with one of its `tensors` ("weight", "mask") on the meta device,
    which holds no values to rank, count or draw a random stream beside, and which of them each layer has there
    ("the weights and masks of layers ['1'] and the masks of layers ['2'] are ..."), saying how to materialize the
    model; `who`, the algorithm (or sparsify), starts the message where given. The layers are sparse ones, or for
    sparsify the dense ones it is about to convert: any module with those tensors. torch's own errors
    ("Tensor.item() cannot be called on meta tensors") named neither the layer nor the remedy."""
    layers_by_kind: dict[tuple[str, ...], list[str]] = {}   # which tensors are on meta -> the layers, in order
    for name, module in named:
        kind = tuple(tensor for tensor in tensors if getattr(module, tensor).is_meta)
        if kind:
            layers_by_kind.setdefault(kind, []).append(name or "(root)")
    if layers_by_kind:
        which = " and ".join(f"the {' and '.join(f'{tensor}s' for tensor in kind)} of layers {layers}"
                             for kind, layers in layers_by_kind.items())
        raise ValueError(f"{f'{who}: ' if who else ''}{which} are on the meta device, which holds no values: "
                         f"materialize the model first (to_empty, then initialise it or load its state dict)")


def refuse_inference(named: list[tuple[str, nn.Module]], who: str) -> None:
    """ValueError naming the first layer of `named` whose weight or mask is an inference tensor (made under
    torch.inference_mode()): `who`, a training algorithm, could neither track the mask's version nor write either
    tensor, and autograd cannot train such a weight; torch's own errors ("Inference tensors do not track version
    counter") named no layer."""
    for name, module in named:
        made = [tensor for tensor in ("weight", "mask") if getattr(module, tensor).is_inference()]
        if made:
            raise ValueError(f"{who}: layer {name or '(root)'!r}'s {' and '.join(made)} "
                             f"{'are inference tensors' if len(made) > 1 else 'is an inference tensor'} (made under "
                             f"torch.inference_mode()), which training cannot use: build the model outside inference "
                             f"mode, or load its state_dict into one built outside it")


def refuse_inference_mode(named: Iterable[tuple[str, SparseModule]], who: str, trained_only: bool = False) -> None:
    """ValueError naming the first layer of `named` in inference mode (`SparseLinear.to_inference`), before `who`, a
    training algorithm or broadcast_masks, changes anything: the layer computes with a packed snapshot of its weight
    and mask, which `who`'s writes would leave stale, and gives its weight no gradient to train. With `trained_only`,
    only a layer still training (`_trains`) is refused: a frozen one may serve in inference mode where `who` leaves
    its mask alone. One pass, the weight looked at only for a layer in inference mode: the algorithms' step() runs it
    over every layer at every step."""
    for name, module in named:
        if module._in_inference_mode and (not trained_only or _trains(module)):
            raise ValueError(f"{who}: layer {name or '(root)'!r} is in inference mode (to_inference()): it computes "
                             f"with a packed copy of its weight and mask, which {who}'s updates would not reach, and "
                             f"gives its weight no gradient; call sparsekern.nn.to_training(model) before training")


def _trains(module: SparseModule) -> bool:
    """Whether sparse `module`'s weight requires grad, read without running a parametrization (spectral_norm's power
    iteration writes its buffers); a weight that is not a Parameter of its own (`weight_is_computed`) counts as
    training, its originals being the module's to train."""
    weight = module._parameters.get("weight")
    return not isinstance(weight, nn.Parameter) or weight.requires_grad


def check_own_masks(named: list[tuple[str, SparseModule]], who: str, written: bool = True) -> None:
    """TypeError or ValueError naming the first layer of `named` whose own mask buffer `who` (set_mask, an algorithm,
    sparsify, ...) cannot take as its weight's mask, before `who` changes anything (`check_own_mask`). Metadata only:
    no value is read, so no host sync on a GPU."""
    for name, module in named:
        check_own_mask(module, f"{who}: layer {name or '(root)'!r}", written)


def _check_twin_masks(twins: list[SparseModule], who: str, layer: str) -> None:
    """Refuses, before `who` writes the mask of `layer` and its tied `twins`, a twin mask that cannot be written in
    place (`check_own_mask`, and an inference tensor, which torch refused only after `layer`'s mask had changed)."""
    for twin in twins:
        twin_name = f"the {type(twin).__name__} tied to {layer}"
        check_own_mask(twin, f"{who}: {twin_name} (sharing its weight)")
        _checks.writable_in_place(twin.mask, f"{who}: the mask of {twin_name}")


def check_own_mask(module: SparseModule, subject: str, written: bool = True) -> None:
    """Refuses sparse `module`'s own mask buffer where it is not one to read as its weight's mask (`subject`,
    "who: layer 'fc1'", starts the message): not a bool tensor (TypeError), not of its weight's shape or on its device
    (ValueError), or sharing memory with its weight (a bool view of its bytes, which a write into either changes);
    with `written` (the caller writes it in place), one whose entries share memory too (an expanded view), which
    torch refused to write only after the layers before had changed. Assignment (`layer.mask = ...`)
    checks all this, but a mask put in place through `mask.data = ...` (or the buffers dict) passes no check. A
    weight computed at every forward is not read for its shape (a parametrization would run); a DTensor shard has
    the shape of its share (fully_shard)."""
    mask, weight = module._buffers.get("mask"), module._parameters.get("weight")
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        kind, problem = TypeError, "is not a bool tensor"
    elif isinstance(weight, Tensor) and not is_dtensor(weight) and mask.shape != weight.shape:
        kind, problem = ValueError, f"is not of its weight's shape {tuple(weight.shape)}"
    elif isinstance(weight, Tensor) and mask.device != weight.device:
        kind, problem = ValueError, f"is not on its weight's device ({weight.device})"
    elif written and not mask.is_contiguous() and not _checks.non_overlapping(mask):
        kind, problem = ValueError, "has entries that share memory (an expanded or stride-0 view): it cannot be written"
    elif isinstance(weight, Tensor) and not is_dtensor(weight) and _checks.overlap(mask, weight):
        # A bool view of the weight's bytes: writing either would change the other (reading a storage's address
        # reads no value).
        kind, problem = ValueError, "shares memory with its weight (a view of the weight's storage)"
    else:
        return
    got = (f"a {mask.dtype} tensor of shape {tuple(mask.shape)} on {mask.device}" if isinstance(mask, Tensor)
           else type(mask).__name__)
    raise kind(f"{subject}'s mask {problem}; got {got}. A mask put in place through mask.data escapes the checks of "
               f"an assigned one: assign the layer a bool mask of its weight's shape (layer.mask = "
               f"torch.ones_like(layer.weight, dtype=torch.bool)), then set its values with layer.set_mask(...)")


def _check_dtype(dtype) -> None:
    """TypeError naming `dtype` (a sparse layer's constructor argument) unless it is None or one that the sparse
    kernels take: torch would build a complex layer whose forward then refused its input."""
    if dtype is not None and dtype not in _checks.SCORE_DTYPES:
        raise TypeError(f"dtype must be float16, bfloat16, float32 or float64 (or None), got {dtype!r}")


def _check_adoptable_weight(cls: type, dense: nn.Module) -> None:
    for name in ("weight", "bias"):
        if is_computed(dense, name):
            # Assigning it to the sparse module would fail in nn.Module ("cannot assign 'torch.FloatTensor' as
            # parameter"), naming neither the layer nor why.
            raise TypeError(f"{cls.__name__}.from_dense takes a layer whose {name} is a Parameter, got one computed "
                            f"from other parameters (a parametrization, weight_norm, spectral_norm or "
                            f"torch.nn.utils.prune)")
    problem = weight_type_problem(dense.weight)
    if problem is not None:
        raise TypeError(f"{cls.__name__}.from_dense takes a layer whose weight a sparse module can hold, got {problem}")


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
