"""`densify(model)`: the inverse of `sparsify`, every sparse module of a model replaced by its plain torch twin, in
place, for export (deployment, torch.export, a code base without sparsekern)."""
from __future__ import annotations

import sys
import warnings

import torch
from torch import Tensor, nn

from .attention import SparseMultiheadAttention
from .modules import (_PACKED_FIELDS, SparseLinear, SparseModule, _forward_through_the_mask, check_own_masks,
                      computed_weight_refusal, sparse_modules)
from .recurrent import SparseRNNBase
from .sharding import refuse_sharded
from .sparsify import _carry_extras, _carry_hooks, _replace

# Converted as a whole (their projections are sparse layers of their own, which the dense twin holds as Parameters).
_WHOLES = (SparseMultiheadAttention, SparseRNNBase)
# What a sparse layer holds beyond what from_dense gives a new one: inference mode's pack (SparseLinear.to_inference)
# and the flags a user may set on one module.
_SPARSE_ONLY = (*(f"packed_{name}" for name in _PACKED_FIELDS), "_packed_weight",
                *SparseModule.__annotations__, "check_zero_off_mask")
# What to do with an attachment named like an attribute of the dense module (`_carry_extras`).
_RENAME = "rename it or remove it"
# A module's hooks that its forward runs: a projection's never run (the module converted whole multiplies by its
# weight itself), in the sparse model as in the dense one, which has no module to run them.
_FORWARD_HOOKS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")
# Its hooks that state_dict and load_state_dict run: a projection's do run (on its entries), and would not.
_STATE_DICT_HOOKS = ("_state_dict_pre_hooks", "_state_dict_hooks", "_load_state_dict_pre_hooks",
                     "_load_state_dict_post_hooks")


def densify(model: nn.Module) -> nn.Module:
    """Replaces, in place, every sparse module of `model` (SparseLinear, the sparse convolutions and transposed
    convolutions, SparseMultiheadAttention, SparseRNN/LSTM/GRU) by the plain torch module its `to_dense()` gives:
    the model `sparsify` started from, holding the masked weights. For export: deployment, torch.export, a code base
    without sparsekern.

    The dense modules share the sparse modules' Parameters (as sparsify shares the dense ones): each weight is
    zeroed off its mask in place (a sparse layer that keeps values off its mask, OptG's, loses them) and becomes the
    dense module's weight, the same Parameter object. So weights tied to anything else (an embedding, another layer)
    stay tied, and an optimizer built on the sparse model keeps training them, now densely (its state at pruned
    entries is whatever the optimizer holds there, 0 after sparse training). Except a weight holding values off its
    mask (kept there by OptG, or written there by the other module's training) that another module of the model
    computes with (an Embedding tied to a decoder after sparsify): zeroed in place, it would change that module, so
    the dense twin keeps a copy of the masked weight (layers tied to each other with one mask share one copy), that
    module keeps its values and the tie is broken, with a warning naming both; call the layer's
    zero_weights_off_mask() first to keep the tie, with the masked values in both. A module registered under several
    names becomes one dense module under all of them; an attention's out_proj registered elsewhere too becomes the
    dense attention's out_proj there. Hooks, and the parameters, buffers, submodules and attributes a user attached
    to a sparse module (an attention's out_proj included), move to its dense twin, as sparsify moves them the other
    way. An attention's input projections and a recurrent module's weight layers are Parameters of the dense twin,
    not modules: what a user attached to one (a parameter, buffer, submodule, attribute, state dict hook) raises
    ValueError naming it; its forward and backward hooks, which the sparse module's forward never runs either, are
    dropped with a warning naming it (the hooks of its weight, the same Parameter, stay). The sparse modules' masks
    and flags are not carried: the outputs, in eval and in train mode, are the sparse model's, and the state dict
    loads into the dense architecture the model had before sparsify.

    Returns `model`, or its dense twin if `model` is itself a sparse module; a model without sparse modules is
    returned unchanged. The dense twins are built on copies of the masked weights before the model changes, so
    densify holds one copy of the sparse weights while it runs. ValueError, with the model unchanged, for a model
    wrapped in DataParallel, DistributedDataParallel or torch.compile (densify the module inside, then wrap it
    again), one compiled in place (nn.Module.compile), a sharded one (FSDP, fully_shard), and a sparse module whose
    weight or bias (an attention's in_proj_bias, bias_k, bias_v too) is computed from other parameters (a
    parametrization, weight_norm, spectral_norm, torch.nn.utils.prune): remove that first
    (torch.nn.utils.parametrize.remove_parametrizations); also for a layer whose mask was replaced by something
    other than a bool tensor of its weight's shape. RuntimeError, with the model unchanged, for a model built under
    torch.inference_mode() densified outside it (its weights cannot be zeroed in place there).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _refuse_wrapped(model)
    refuse_sharded(model, "densify", why="densify zeroes each layer's whole weight off its whole mask and hands the "
                   "dense twin that whole weight, which a sharded rank does not hold: densify an unsharded copy of "
                   "the model (one built without sharding, its full state dict loaded), then shard the dense model")
    problem = computed_weight_refusal(sparse_modules(model), "densify")
    if problem is not None:
        raise ValueError(problem)
    _refuse_unmaskable(model)
    staged, dropped_hooks = _stage(model)
    copied = _weights_to_copy(model, staged)
    for warning in (*dropped_hooks, *copied.values()):
        warnings.warn(warning, stacklevel=2)
    return _commit(model, staged, copied)


def _refuse_unmaskable(model: nn.Module) -> None:
    """TypeError or ValueError naming the layer whose weight densify cannot mask in place, before anything changes:
    a mask that is missing, not a bool tensor, not of the weight's shape or on its device (a buffer replaced by hand,
    `check_own_masks`), where the twin's masked copy failed with torch's error naming no layer; RuntimeError for an
    inference tensor (a model built under torch.inference_mode()) outside inference mode, which torch refuses to
    change in place."""
    layers = sparse_modules(model)
    check_own_masks(layers, "densify", written=False)   # read alone: an expanded one is masked by as well as any
    for name, layer in layers:
        if layer.weight.is_inference() and not torch.is_inference_mode_enabled():
            raise RuntimeError(f"densify: layer {name or '(root)'!r}'s weight is an inference tensor (the model was "
                               f"built under torch.inference_mode()), which cannot be masked in place outside it: "
                               f"call densify under torch.inference_mode()")


def _refuse_wrapped(model: nn.Module) -> None:
    """ValueError naming a wrapper whose replica or compiled graph would keep running the sparse modules."""
    compiled = getattr(sys.modules.get("torch._dynamo.eval_frame"), "OptimizedModule", None)
    for name, module in model.named_modules():
        where = f"module {name or '(root)'!r}"
        if isinstance(module, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            raise ValueError(f"densify: {where} is a {type(module).__name__} wrapper: densify its .module, then "
                             f"wrap it again")
        if compiled is not None and isinstance(module, compiled):
            raise ValueError(f"densify: {where} is wrapped by torch.compile, whose graph runs the sparse modules: "
                             f"densify its ._orig_mod, then compile again")
        if vars(module).get("_compiled_call_impl") is not None:
            raise ValueError(f"densify: {where} was compiled in place (nn.Module.compile), whose graph runs the "
                             f"sparse modules: densify the model first, then compile")


def _stage(model: nn.Module) -> tuple[list[tuple[str, nn.Module, nn.Module]], list[str]]:
    """(name, sparse module, its dense twin) for every sparse module to replace, the twins holding copies of the
    masked weights and whatever a user attached (`_carry_extras`, which refuses a name the dense module uses
    itself): built without touching the model. A projection of a module converted whole gets a twin of its own
    only where it is also registered outside it (an attention's out_proj gets the dense attention's). With the
    warnings naming the projections whose hooks are dropped (`_refuse_stranded_attachments`)."""
    wholes = {id(module) for module in model.modules() if isinstance(module, _WHOLES)}
    projections = {id(projection): owner for owner in model.modules() if isinstance(owner, _WHOLES)
                   for _, projection in owner.named_projections()}
    registered_outside = {id(child) for parent in model.modules() for child in parent._modules.values()
                          if child is not None and id(child) in projections and projections[id(child)] is not parent}
    staged, dropped_hooks = [], []
    for name, module in model.named_modules():
        if id(module) in wholes or (isinstance(module, SparseModule) and not isinstance(module, _WHOLES)
                                    and (id(module) not in projections or id(module) in registered_outside)):
            if id(module) in projections and module is getattr(projections[id(module)], "out_proj", None):
                continue   # the dense attention's out_proj (below)
            dense = module.to_dense()
            _refuse_computed_parameters(name, module, dense)
            if id(module) in wholes:
                dropped_hooks += _refuse_stranded_attachments(name, module, registered_outside)
            if isinstance(module, SparseMultiheadAttention):
                _carry_extras(f"{name}.out_proj" if name else "out_proj", module.out_proj, dense.out_proj,
                              _own_entries(dense.out_proj), _RENAME)
            staged.append((name, module, _carry_extras(name, module, dense, _own_entries(dense, type(module)),
                                                       _RENAME)))
    return staged, dropped_hooks


def _refuse_computed_parameters(name: str, sparse: nn.Module, dense: nn.Module) -> None:
    """ValueError naming a Parameter of `dense` (`sparse`'s twin) that `sparse` computes from other parameters
    (a bias parametrized or pruned: `densify` has refused computed weights), where `_share_parameters` would put
    it in place of the Parameter; the parametrization would otherwise be carried, as a submodule a user attached,
    to a module that no longer runs it."""
    for path, layer in dense.named_modules():
        source = sparse.get_submodule(path)
        for key, parameter in layer._parameters.items():
            if parameter is not None and not isinstance(getattr(source, key), nn.Parameter):
                where = ".".join(part for part in (name, path, key) if part)
                raise ValueError(f"densify: {where!r} is computed from other parameters (a parametrization or "
                                 f"torch.nn.utils.prune), not a Parameter its dense {type(layer).__name__} can "
                                 f"hold: remove that first (torch.nn.utils.parametrize.remove_parametrizations, "
                                 f"torch.nn.utils.prune.remove)")


def _refuse_stranded_attachments(name: str, whole: nn.Module, registered_outside: set[int]) -> list[str]:
    """ValueError naming what a user attached to a projection of `whole` that its dense twin holds as Parameters,
    not as a module (an attention's in_proj, an LSTM's hh_l0): it would leave the model, and its state dict
    entries with it; so would a state dict hook, which runs on the projection's entries. Returns a warning for
    each such projection holding forward or backward hooks, which are dropped: they change nothing, as the
    sparse module's forward never runs them (it multiplies by the projection's weight itself), but a user may
    expect them to run."""
    dropped = []
    for child, projection in whole.named_projections():
        if child == "out_proj" or id(projection) in registered_outside:
            continue   # carried to the dense attention's out_proj, or to the projection's own twin
        where = f"{name}.{child}" if name else child
        own = _own_entries(nn.Linear(1, 1, bias=projection.bias is not None, device="meta"))
        stranded = [repr(key) for slot in ("_parameters", "_buffers", "_modules", "__dict__")
                    for key in getattr(projection, slot) if key not in own]
        stranded += [f"a {slot.strip('_').replace('_', ' ')[:-1]}" for slot in _STATE_DICT_HOOKS
                     if getattr(projection, slot)]
        if stranded:
            raise ValueError(f"densify: {where!r} holds {stranded[0]}, which a user attached; its dense "
                             f"{whole.dense_class.__name__} holds that projection as Parameters, with no module to "
                             f"carry it: move it to {name or '(root)'!r} or remove it")
        hooks = [hook for slot in _FORWARD_HOOKS for hook in getattr(projection, slot).values()
                 if hook is not _forward_through_the_mask]   # the sparse module's own, which goes with it
        if hooks:
            dropped.append(f"densify drops the {len(hooks)} forward or backward hook(s) of {where!r}: its dense "
                           f"{whole.dense_class.__name__} holds that projection as Parameters, with no module to "
                           f"run them (the sparse {type(whole).__name__}'s forward never ran them either: it "
                           f"multiplies by the projection's weight itself)")
    return dropped


def _own_entries(dense: nn.Module, kind: type = SparseLinear) -> tuple[str, ...]:
    """What a sparse module of `kind` holds as one (what its from_dense gives a new one built on `dense`, its
    twin, and inference mode's pack): anything else on it a user attached."""
    fresh = kind.from_dense(dense)
    return (*fresh._parameters, *fresh._buffers, *fresh._modules, *vars(fresh), *_SPARSE_ONLY)


def _masked_layers(name: str, module: nn.Module) -> list[tuple[str, SparseModule]]:
    """(name, layer) of the sparse layers whose weights densify masks to replace `module` (named `name`): the
    module itself, or the projections of a module converted whole."""
    if isinstance(module, SparseModule):
        return [(name, module)]
    return [(f"{name}.{child}" if name else child, projection) for child, projection in module.named_projections()]


def _weights_to_copy(model: nn.Module, staged: list[tuple[str, nn.Module, nn.Module]]) -> dict[int, str]:
    """The weights densify must not zero off the mask in place, by id, each with a warning naming its layer:
    those holding values off the mask (OptG's, or a tied module's updates) in memory that another tensor
    of `model` shares (a dense Embedding tied to the layer after sparsify), other than the same weight in a layer
    with the same mask. Zeroed in place, that module's outputs would change: the layer's twin keeps its copy of
    the masked weight instead, and that module keeps its values, at the cost of the tie."""
    layers = [pair for name, sparse, _ in staged for pair in _masked_layers(name, sparse)]
    masks = {id(layer): layer.mask for _, layer in layers}
    held = {}   # storage -> (module name, module, tensor) of every tensor in it
    for module_name, module in model.named_modules():
        for tensor in (*module._parameters.values(), *module._buffers.values()):
            if tensor is not None and not tensor.is_meta and tensor.numel():
                held.setdefault(_storage(tensor), []).append((module_name, module, tensor))
    copied = {}
    for name, layer in layers:
        weight = layer.weight
        # Read whatever zero_off_mask says: a dense module's training writes into the weight behind the layer's back.
        if id(weight) in copied or weight.is_meta or not layer._off_mask_nonzero():
            continue
        sharers = [(other_name, other) for other_name, other, tensor in held.get(_storage(weight), [])
                   if _overlap(tensor, weight)
                   and not (tensor is weight and id(other) in masks and masks[id(other)].equal(layer.mask))]
        if sharers:
            other_name, other = sharers[0]
            copied[id(weight)] = (
                f"densify: {name!r} holds values off its mask in a weight it shares with {other_name or '(root)'!r} "
                f"({type(other).__name__}), which computes with them: its dense twin gets a copy of the masked "
                f"weight, so that {other_name or '(root)'!r} keeps its values, and the tie is broken (an optimizer "
                f"built before trains the shared weight, not the copy); to keep the tie, with the masked values in "
                f"both, call {name}.zero_weights_off_mask() before densify")
    return copied


def _storage(tensor: Tensor) -> tuple:
    return tensor.device, tensor.untyped_storage().data_ptr()


def _overlap(a: Tensor, b: Tensor) -> bool:
    """Whether `a` and `b`, in one storage, may share memory: their byte ranges in it overlap. Not every two
    tensors of a storage do: an nn.LSTM flattened for cuDNN holds all its weights in one, which its sparse twin
    adopts, and zeroing one of them changes no other."""
    (a_start, a_end), (b_start, b_end) = _byte_range(a), _byte_range(b)
    return a_start < b_end and b_start < a_end


def _byte_range(tensor: Tensor) -> tuple[int, int]:
    """The first byte of `tensor`'s elements in its storage and the byte past the last."""
    last = tensor.storage_offset() + sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
    return tensor.storage_offset() * tensor.element_size(), (last + 1) * tensor.element_size()


def _commit(model: nn.Module, staged: list[tuple[str, nn.Module, nn.Module]], copied: dict[int, str]) -> nn.Module:
    replacements, copies = {}, {}
    for name, sparse, dense in staged:
        for _, layer in _masked_layers(name, sparse):
            if id(layer.weight) not in copied:
                layer.zero_weights_off_mask()   # the values the twin holds, and no guard hook to carry
        _share_parameters(sparse, dense, copied, copies)
        _move_hooks(sparse, dense)
        replacements[id(sparse)] = dense
        if isinstance(sparse, SparseMultiheadAttention):
            _move_hooks(sparse.out_proj, dense.out_proj)
            replacements[id(sparse.out_proj)] = dense.out_proj
    _replace(model, replacements)
    return replacements.get(id(model), model)


def _move_hooks(sparse: nn.Module, dense: nn.Module) -> None:
    """`_carry_hooks`, without the no-op guard hook of a sparse layer that holds values off its mask (one whose
    weight `_weights_to_copy` keeps), which is sparsekern's: the dense model is plain torch. The hook dicts are
    the sparse layer's too, which leaves the model without it."""
    _carry_hooks(sparse, dense)
    hooks = dense._forward_pre_hooks
    for key in [key for key, hook in hooks.items() if hook is _forward_through_the_mask]:
        del hooks[key]


def _share_parameters(sparse: nn.Module, dense: nn.Module, copied: dict[int, str], copies: dict[int, list]) -> None:
    """Puts `sparse`'s Parameters in place of the copies in `dense` (its `to_dense()`), by the dense names, which
    the sparse modules resolve (an attention's `in_proj_weight`, an LSTM's `weight_hh_l0`); except a weight in
    `copied`, whose copy stays, one for every twin with the same values (`copies`: id -> copies made), so that
    layers tied to each other stay so."""
    for path, layer in dense.named_modules():
        source = sparse.get_submodule(path)
        for name, parameter in list(layer._parameters.items()):
            if parameter is None:
                continue
            shared = getattr(source, name)
            if id(shared) in copied:
                made = copies.setdefault(id(shared), [])
                twin = next((copy for copy in made if copy.equal(parameter)), None)
                if twin is None:
                    made.append(twin := parameter)
                setattr(layer, name, twin)
            else:
                setattr(layer, name, shared)
