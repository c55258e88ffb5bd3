"""`densify(model)`: the inverse of `sparsify`, every sparse module of a model replaced by its plain torch twin, in
place, for export (deployment, torch.export, a code base without sparsekern)."""
from __future__ import annotations

import sys

from torch import nn

from .attention import SparseMultiheadAttention
from .modules import _PACKED_FIELDS, SparseLinear, SparseModule, computed_weight_refusal, sparse_modules
from .recurrent import SparseRNNBase
from .sharding import refuse_sharded
from .sparsify import _carry_extras, _carry_hooks, _replace

# Converted as a whole (their projections are sparse layers of their own, which the dense twin holds as Parameters).
_WHOLES = (SparseMultiheadAttention, SparseRNNBase)
# What a sparse layer holds beyond what from_dense gives a new one: inference mode's pack (SparseLinear.to_inference)
# and the flags a user may set on one module.
_SPARSE_ONLY = (*(f"packed_{name}" for name in _PACKED_FIELDS), "_packed_weight",
                *SparseModule.__annotations__, "check_zero_off_mask")


def densify(model: nn.Module) -> nn.Module:
    """Replaces, in place, every sparse module of `model` (SparseLinear, the sparse convolutions and transposed
    convolutions, SparseMultiheadAttention, SparseRNN/LSTM/GRU) by the plain torch module its `to_dense()` gives:
    the model `sparsify` started from, holding the masked weights. For export: deployment, torch.export, a code base
    without sparsekern.

    The dense modules share the sparse modules' Parameters (as sparsify shares the dense ones): each weight is
    zeroed off its mask in place (a sparse layer that keeps values off its mask, OptG's, loses them) and becomes the
    dense module's weight, the same Parameter object. So weights tied to anything else (an embedding, another layer)
    stay tied, and an optimizer built on the sparse model keeps training them, now densely (its state at pruned
    entries is whatever the optimizer holds there, 0 after sparse training). A module registered under several names
    becomes one dense module under all of them; an attention's out_proj registered elsewhere too becomes the dense
    attention's out_proj there. Hooks, and the parameters, buffers, submodules and attributes a user attached to a
    sparse module (an attention's out_proj included), move to its dense twin, as sparsify moves them the other way.
    An attention's input projections and a recurrent module's weight layers are Parameters of the dense twin, not
    modules: what a user attached to one raises ValueError naming it (their hooks, which the sparse module's forward
    never runs either, are dropped). The sparse modules' masks and flags are not carried: the outputs, in eval and
    in train mode, are the sparse model's, and the state dict loads into the dense architecture the model had before
    sparsify.

    Returns `model`, or its dense twin if `model` is itself a sparse module; a model without sparse modules is
    returned unchanged. The dense twins are built on copies of the masked weights before the model changes, so
    densify holds one copy of the sparse weights while it runs. ValueError, with the model unchanged, for a model
    wrapped in DataParallel, DistributedDataParallel or torch.compile (densify the module inside, then wrap it
    again), one compiled in place (nn.Module.compile), a sharded one (FSDP, fully_shard), and a sparse layer whose
    weight is computed from other parameters (a parametrization, weight_norm, spectral_norm, torch.nn.utils.prune):
    remove that first (torch.nn.utils.parametrize.remove_parametrizations).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _refuse_wrapped(model)
    refuse_sharded(model, "densify")
    problem = computed_weight_refusal(sparse_modules(model), "densify")
    if problem is not None:
        raise ValueError(problem)
    staged = _stage(model)
    return _commit(model, staged)


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


def _stage(model: nn.Module) -> list[tuple[str, nn.Module, nn.Module]]:
    """(name, sparse module, its dense twin) for every sparse module to replace, the twins holding copies of the
    masked weights and whatever a user attached (`_carry_extras`, which refuses a name the dense module uses
    itself): built without touching the model. A projection of a module converted whole gets a twin of its own
    only where it is also registered outside it (an attention's out_proj gets the dense attention's)."""
    wholes = {id(module) for module in model.modules() if isinstance(module, _WHOLES)}
    projections = {id(projection): owner for owner in model.modules() if isinstance(owner, _WHOLES)
                   for _, projection in owner.named_projections()}
    registered_outside = {id(child) for parent in model.modules() for child in parent._modules.values()
                          if child is not None and id(child) in projections and projections[id(child)] is not parent}
    staged = []
    for name, module in model.named_modules():
        if id(module) in wholes or (isinstance(module, SparseModule) and not isinstance(module, _WHOLES)
                                    and (id(module) not in projections or id(module) in registered_outside)):
            if id(module) in projections and module is getattr(projections[id(module)], "out_proj", None):
                continue   # the dense attention's out_proj (below)
            if id(module) in wholes:
                _refuse_stranded_attachments(name, module, registered_outside)
            dense = module.to_dense()
            if isinstance(module, SparseMultiheadAttention):
                _carry_extras(f"{name}.out_proj" if name else "out_proj", module.out_proj, dense.out_proj,
                              _own_entries(dense.out_proj))
            staged.append((name, module, _carry_extras(name, module, dense, _own_entries(dense, type(module)))))
    return staged


def _refuse_stranded_attachments(name: str, whole: nn.Module, registered_outside: set[int]) -> None:
    """ValueError naming what a user attached to a projection of `whole` that its dense twin holds as Parameters,
    not as a module (an attention's in_proj, an LSTM's hh_l0): it would leave the model, and its state dict
    entries with it. Its hooks are not refused: the sparse module's forward never runs them either."""
    for child, projection in whole.named_projections():
        if child == "out_proj" or id(projection) in registered_outside:
            continue   # carried to the dense attention's out_proj, or to the projection's own twin
        own = _own_entries(nn.Linear(1, 1, bias=projection.bias is not None, device="meta"))
        stranded = [key for slot in ("_parameters", "_buffers", "_modules", "__dict__")
                    for key in getattr(projection, slot) if key not in own]
        if stranded:
            raise ValueError(f"densify: {f'{name}.{child}' if name else child!r} holds {stranded[0]!r}, which a "
                             f"user attached; its dense {whole.dense_class.__name__} holds that projection as "
                             f"Parameters, with no module to carry it: move it to {name or '(root)'!r} or remove it")


def _own_entries(dense: nn.Module, kind: type = SparseLinear) -> tuple[str, ...]:
    """What a sparse module of `kind` holds as one (what its from_dense gives a new one built on `dense`, its
    twin, and inference mode's pack): anything else on it a user attached."""
    fresh = kind.from_dense(dense)
    return (*fresh._parameters, *fresh._buffers, *fresh._modules, *vars(fresh), *_SPARSE_ONLY)


def _commit(model: nn.Module, staged: list[tuple[str, nn.Module, nn.Module]]) -> nn.Module:
    replacements = {}
    for _, sparse, dense in staged:
        for layer in [sparse] if isinstance(sparse, SparseModule) else [p for _, p in sparse.named_projections()]:
            layer.zero_weights_off_mask()   # the values the twin holds, and no guard hook to carry
        _share_parameters(sparse, dense)
        _carry_hooks(sparse, dense)
        replacements[id(sparse)] = dense
        if isinstance(sparse, SparseMultiheadAttention):
            _carry_hooks(sparse.out_proj, dense.out_proj)
            replacements[id(sparse.out_proj)] = dense.out_proj
    _replace(model, replacements)
    return replacements.get(id(model), model)


def _share_parameters(sparse: nn.Module, dense: nn.Module) -> None:
    """Puts `sparse`'s Parameters in place of the copies in `dense` (its `to_dense()`), by the dense names, which
    the sparse modules resolve (an attention's `in_proj_weight`, an LSTM's `weight_hh_l0`)."""
    for path, layer in dense.named_modules():
        source = sparse.get_submodule(path)
        for name, parameter in list(layer._parameters.items()):
            if parameter is not None:
                setattr(layer, name, getattr(source, name))
