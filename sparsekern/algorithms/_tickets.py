"""What IMP, SWAMP and OptG share: the layers they prune, global or layer-wise magnitude pruning,
rewinding to a snapshot, the checks of their arguments and saved states, a map over the tensors
of a saved state, and the keying of a state's entries (optimizer states included) by layer or
parameter name, so that a model listing them in another order loads each one's own.

A snapshot is the model's full state (parameters and buffers, BatchNorm statistics included)
except the masks, cloned; restoring it and then setting a mask gives the ticket θ_k ⊙ m.

Layers are the model's sparse modules grouped by weight (`sparsekern.nn.tying`): modules sharing
one weight are one layer, pruned once, and every mask change is copied to the others (`set_masks`,
`tying.sync`).
"""
from __future__ import annotations

import functools
import math
import numbers
import warnings
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.modules.lazy import LazyModuleMixin

from .. import checkpoint, ops
from ..ops import _checks
from ..nn import SparseModule, _wrappers, sparse_modules, tying
from ..nn.modules import (check_own_masks, computed_weight_refusal, refuse_inference, refuse_inference_mode,
                          refuse_meta)
from ..nn.sharding import refuse_sharded
from ._stack import user_stacklevel

SCOPES = ("global", "layer")


def sparse_layers(model: nn.Module, who: str, prunes_every_layer: bool = True) -> list[tying.Group]:
    """The model's sparse modules grouped by weight; ValueError when there are none (nothing to
    prune), when modules sharing a weight carry different masks, when the model is sharded across
    ranks, when a layer's weight is computed at every forward (a parametrization registered
    after sparsify: `computed_weight_refusal`), or on the meta device; `who`, the algorithm, names the refusal.
    A layer in inference mode (`refuse_inference_mode`) is refused where `who` `prunes_every_layer` (IMP, SWAMP);
    otherwise (OptG's learned scores leave frozen layers alone) `who` refuses it among the layers it sets
    (`check_masks_writable`), as DST does among those it trains."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    refuse_sharded(model, who)
    named = sparse_modules(model)
    refusal = computed_weight_refusal(named, who)   # before anything reads a computed weight
    if refusal is not None:
        raise ValueError(refusal)
    if not named:
        raise ValueError("model has no sparse modules: convert it with sparsekern.sparsify(model, 1.0) or build "
                         "it from sparsekern.nn.SparseLinear / SparseConv1d/2d/3d / SparseConvTranspose1d/2d/3d")
    groups = tying.group_by_weight(named)
    tying.check_groups(groups)
    # Once taken: IMP and SWAMP then failed at the first pruning, OptG at a read of a score, naming no layer. A real
    # weight assigned to a layer built on the meta device leaves its mask there: pruned, counted or applied only
    # later (OptG's scores, the forward), naming neither.
    check_layers_usable(groups, who, inference_mode=prunes_every_layer)
    return groups


def check_layers_usable(groups: list[tying.Group], who: str, inference_mode: bool = True) -> None:
    """ValueError naming the first module of `groups` (every module: a tied module's mask is its own buffer) that
    `who` cannot take at construction: its weight or mask on the meta device (`refuse_meta`), an inference tensor
    (`refuse_inference`), or, with `inference_mode`, a SparseLinear in inference mode (`refuse_inference_mode`)."""
    named = [pair for group in groups for pair in group]
    refuse_meta(named, who, tensors=("weight", "mask"))
    refuse_inference(named, who)
    if inference_mode:
        refuse_inference_mode(named, who)


def check_own_weights(groups: list[tying.Group], who: str) -> None:
    """RuntimeError, before anything changes, when a layer's weight became computed at every forward (a
    parametrization registered) after `who` was built (`computed_weight_refusal`); ValueError for a layer training
    in inference mode (`refuse_training_in_inference_mode`)."""
    refusal = computed_weight_refusal([pair for group in groups for pair in group], who, built=True)
    if refusal is not None:
        raise RuntimeError(refusal)
    refuse_training_in_inference_mode(groups, who)


def refuse_training_in_inference_mode(groups: list[tying.Group], who: str) -> None:
    """ValueError naming the first module of `groups` that is training (its weight requiring grad) in inference mode
    (`refuse_inference_mode`), before `who` changes anything: it gives its weight no gradient, so a `to_training`
    forgotten after an evaluation would stop it training, silently. A frozen layer may serve in it. The algorithms'
    step() runs it at every step: one pass, which reads only whether each layer is in inference mode."""
    refuse_inference_mode((pair for group in groups for pair in group), who, trained_only=True)


def check_masks_writable(groups: list[tying.Group], who: str, frozen_kept: bool = False) -> None:
    """TypeError or ValueError naming the layer, before anything changes, for a mask buffer that `who` cannot write
    in place (`check_own_masks`), of every module of a group: a tied module's mask is its own buffer,
    which `tying.sync` writes; ValueError for a layer in inference mode, whose pack a new mask would leave stale
    (`refuse_inference_mode`). With `frozen_kept`, `who` leaves the mask of a frozen layer (its weight not requiring
    grad) as it is, so that layer may serve in inference mode (a frozen part of the model under one training)."""
    named = [pair for group in groups for pair in group]
    check_own_masks(named, who)
    refuse_inference_mode(named, who, trained_only=frozen_kept)


def primaries(groups: list[tying.Group]) -> list[SparseModule]:
    return [group[0][1] for group in groups]


def make_optimizer(optimizer_factory: Callable, model: nn.Module) -> torch.optim.Optimizer:
    """optimizer_factory(model.parameters()), checked to be a torch optimizer that trains every
    trainable sparse weight of `model` (one that does not would leave the ticket untrained); RuntimeError naming
    optimizer_factory for an error it raises."""
    optimizer = _checks.users_call(optimizer_factory, "optimizer_factory", "", model.parameters())
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer_factory must return a torch.optim.Optimizer, got {type(optimizer).__name__}")
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    untrained = [name for name, module in sparse_modules(model)
                 if module.weight.requires_grad and id(module.weight) not in trained]
    if untrained:
        raise ValueError(f"optimizer_factory's optimizer does not train the weights of {untrained[:5]}")
    return optimizer


class FreshOptimizer:
    """The `optimizer` attribute of IMP and SWAMP, which make a new optimizer for every cycle (SWAMP: every particle)
    and on load_state_dict(): assigning one makes the optimizer it replaces refuse to step, before it changes
    anything. A loop that kept the first (`opt = imp.optimizer` before it) went on stepping that one, whose momentum
    from the cycle before moved pruned weights off 0 under layers promising zeros there: a ticket silently
    computed with weights it had pruned."""

    def __set_name__(self, owner, name: str) -> None:
        self.owner, self.attribute = owner.__name__, f"_{name}"

    def __get__(self, algorithm, owner=None):
        if algorithm is None:
            return self
        try:
            return algorithm.__dict__[self.attribute]
        except KeyError:
            raise AttributeError(f"{self.owner} has no optimizer yet") from None

    def __set__(self, algorithm, optimizer: torch.optim.Optimizer) -> None:
        replaced = algorithm.__dict__.get(self.attribute)
        if replaced is not None and replaced is not optimizer:
            replaced.register_step_pre_hook(functools.partial(_refuse_replaced_step, self.owner))
        algorithm.__dict__[self.attribute] = optimizer


def _refuse_replaced_step(owner: str, optimizer, args, kwargs) -> None:
    raise RuntimeError(f"step() of an optimizer that {owner} has replaced with a new one (it makes one for every "
                       f"cycle{', and every particle' if owner == 'SWAMP' else ''}, and on load_state_dict()): its "
                       f"state would move pruned weights off 0. Step {owner.lower()}.optimizer, read in the loop "
                       f"as the {owner} docstring's loop reads it, not kept from before")


def check_callable(value, name: str, argument: str) -> None:
    """TypeError naming `name` unless `value` can be called with one positional argument (`argument`, as the message
    says it: `optimizer_factory(parameters)`): it is called later, in a call whose own error would name nothing."""
    _checks.callable_as(value, name, f"{name}({argument})", None)


def check_fraction(prune_fraction) -> float:
    return _checks.number(prune_fraction, "prune_fraction", lambda value: 0 < value < 1, "in (0, 1)")


def removal_count(remaining: int, prune_fraction: float) -> int:
    """⌈p·remaining⌉, computed so that float error cannot push an exact product up by one."""
    return min(remaining, math.ceil(round(prune_fraction * remaining, 9)))


def check_target_density(density) -> float | None:
    """None, or a density in (0, 1] for `magnitude_masks` to prune to."""
    if density is None:
        return None
    return _checks.number(density, "density", lambda value: 0 < value <= 1, "in (0, 1]")


def check_run_density(density, cycles: int, groups: list[tying.Group], prune_fraction: float, scope: str,
                      cycle: int) -> float | None:
    """`check_target_density` for `run(..., cycles, density=)` of an IMP or SWAMP at `cycle` (its layer `groups`,
    `prune_fraction` and `scope`), whose last pruning, before the last cycle, prunes to it: a run of one cycle
    prunes nothing, so a density there would never be reached, nor one the prunings before leave too few weights
    for (`_check_run_reaches`). Both refused before any training."""
    density = check_target_density(density)
    if density is None:
        return None
    if cycles < 2:
        raise ValueError(f"density={density:g} needs cycles >= 2 (the last pruning reaches it), got cycles={cycles}")
    _check_run_reaches(groups, prune_fraction, scope, density, cycle, cycles)
    return density


@torch.no_grad()
def _check_run_reaches(groups: list[tying.Group], prune_fraction: float, scope: str, density: float,
                       cycle: int, cycles: int) -> None:
    """ValueError, before `run(train_fn, cycles, density=density)` trains from cycle `cycle`, where its last pruning
    (`magnitude_masks` to `density`) would keep no weight (of all layers together, or of one), or more weights than the
    prunings of `prune_fraction` before it leave: found only at that pruning, it was refused after every cycle but the
    last had trained. Counts as
    `magnitude_masks` does (⌈p·remaining⌉ of all layers together, or of each); passes a run past its last
    pruning."""
    prunings = cycles - 2 - cycle   # by prune_fraction, at the end of each cycle before the one the last ends
    if prunings < 0:
        return
    layers = primaries(groups)
    active = [int(layer.mask.sum()) for layer in layers]
    sizes = [layer.weight.numel() for layer in layers]
    names = [repr(group[0][0]) for group in groups]   # as the errors below show them
    if scope == "global":
        active, sizes, names = [sum(active)], [sum(sizes)], ["all layers"]
    empty = [(name, size) for name, size in zip(names, sizes) if round(density * size) == 0]
    if empty:
        name, size = empty[0]
        raise ValueError(f"density={density} keeps none of the {size} weights of {name}: the last pruning would leave "
                         f"none; raise density")
    for _ in range(prunings):
        active = [n - removal_count(n, prune_fraction) for n in active]
    short = [(name, round(density * size), n) for name, size, n in zip(names, sizes, active)
             if round(density * size) > n]
    if short:
        name, keep, n = short[0]
        raise ValueError(f"density={density} keeps {keep} weights of {name}, "
                         f"but the {prunings} prunings of prune_fraction={prune_fraction} before the last leave "
                         f"{n}: pruning cannot add weights (prune_fraction = 1 - density ** (1 / (cycles - 1)) "
                         f"prunes evenly towards it)")


def magnitude_masks(groups: list[tying.Group], prune_fraction: float, scope: str,
                    density: float | None = None) -> list[Tensor]:
    """Masks that keep all but ⌈p·remaining⌉ active weights, ranked by |weight|.

    `scope="global"` ranks every active weight of every layer together and removes
    ⌈p·(total active)⌉; `"layer"` removes ⌈p·(active in layer)⌉ from each layer. Inactive
    positions score NaN, which `topk_mask` never selects, so the new masks nest in the old ones.
    Ties follow `topk_mask` (lower flat position kept). Pruning that would leave no weight at
    all (or, layer-wise, a layer with none) raises ValueError, as do NaN weights; a global
    pruning that empties some layer warns.

    `density` (a checked `check_target_density`), for the last pruning of a run aimed at a density, replaces
    ⌈p·remaining⌉: the masks keep round(density·N) weights, N every weight of the layers, active or not
    (`"layer"`: round(density·N_l) of each layer, as `sparsify` counts), whatever earlier prunings' rounding
    left; ValueError where that is more than remain active (the masks must nest).
    """
    layers = primaries(groups)
    names = [group[0][0] for group in groups]
    for name, layer in zip(names, layers):
        if torch.isnan(layer.weight[layer.mask]).any():
            raise ValueError(f"layer {name!r} has NaN weights (did training diverge?): magnitude pruning "
                             f"cannot rank them")
    scores = [torch.where(layer.mask, layer.weight.abs(), torch.nan) for layer in layers]
    active = [int(layer.mask.sum()) for layer in layers]
    sizes = [layer.weight.numel() for layer in layers]
    # what the error lines below say prunes: p of the remaining weights, or to the density
    pruning = f"pruning {prune_fraction} of" if density is None else f"pruning to density={density}"
    if scope == "global":
        total = sum(active)
        keep = total - removal_count(total, prune_fraction) if density is None else round(density * sum(sizes))
        if keep > total:
            raise ValueError(f"density={density} keeps {keep} of the {sum(sizes)} weights, more than the {total} "
                             f"that remain: pruning cannot add weights")
        if keep == 0:
            raise ValueError(f"{pruning} the {total if density is None else sum(sizes)} "
                             f"{'remaining ' if density is None else ''}weights would leave none")
        masks = ops.topk_mask(scores, keep)
        emptied = [name for name, n, mask in zip(names, active, masks) if n and not mask.any()]
        if emptied:
            warnings.warn(f"global magnitude pruning leaves layers {emptied} with no weight",
                          stacklevel=user_stacklevel())
        return masks
    keep = [n - removal_count(n, prune_fraction) if density is None else round(density * size)
            for n, size in zip(active, sizes)]
    grown = [name for name, n, k in zip(names, active, keep) if k > n]
    if grown:
        raise ValueError(f"density={density} keeps more weights than remain in layers {grown}: pruning cannot "
                         f"add weights")
    emptied = [name for name, n, k in zip(names, active, keep) if n and not k]
    if emptied:
        raise ValueError(f"{pruning} each layer's {'remaining ' if density is None else ''}weights would leave "
                         f"layers {emptied} with none")
    return ops.topk_mask(scores, keep)


def _mask_names(model: nn.Module) -> set[str]:
    # Every name of every sparse module: a module reached under two names has two mask entries.
    return {f"{name}.mask" if name else "mask" for name, module in model.named_modules(remove_duplicate=False)
            if isinstance(module, SparseModule)}


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    """A clone of every parameter and buffer except the sparse modules' masks."""
    masks = _mask_names(model)
    return {name: value.detach().clone() for name, value in model.state_dict(keep_vars=True).items()
            if name not in masks}


# IMP and SWAMP read the model's whole state at three moments, and refuse lazy modules without parameters at each
# in one wording per moment, shared so that their messages cannot drift apart: `who` names the algorithm.
def refuse_unmaterialised_when_built(model: nn.Module, who: str) -> None:
    """At construction with rewind_step=0, which keeps θ_0."""
    _refuse_unmaterialised(model, f"{who} keeps the model's state at rewind_step=0 as it is built",
                           f"run the model on one batch before building {who}")


def refuse_unmaterialised_at_step(model: nn.Module, who: str, rewind_step: int) -> None:
    """At the step() that keeps θ_k (rewind_step=k >= 1), before the count moves on: lazy modules still without
    parameters there are ones the forward has not used."""
    _refuse_unmaterialised(model, f"{who}.step() keeps the model's state now (rewind_step={rewind_step})",
                           "run each of them once (on a dummy batch) before, or take them out of the model")


def refuse_unmaterialised_when_loading(model: nn.Module, who: str) -> None:
    """At load_state_dict(), before the state is checked against the model's tensors."""
    _refuse_unmaterialised(model, f"{who}.load_state_dict() checks the state against the model's tensors",
                           "load the model's state dict first")


def _refuse_unmaterialised(model: nn.Module, reading: str, remedy: str) -> None:
    """ValueError naming the lazy modules of `model` (nn.LazyLinear, nn.LazyBatchNorm1d, ...) whose parameters or
    buffers are not made yet (a lazy module makes them at its first forward, or as the model's state dict loads):
    `reading` says what would read their values, `remedy` how to make them. torch's own error names no module."""
    lazy = [f"{name!r} ({type(module).__name__})" for name, module in model.named_modules()
            if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params()]
    if lazy:
        raise ValueError(f"{reading}, but the lazy modules {', '.join(lazy)} have not made their parameters yet (a "
                         f"lazy module makes them at its first forward): {remedy}")


def check_snapshot(state, model: nn.Module, name: str, who: str) -> dict[str, Tensor]:
    """A validated copy of a saved `snapshot` of `model` (the same entries, shapes and dtypes),
    moved to the model's devices; TypeError/ValueError naming `name` otherwise (and the wrapper a state saved
    under it carries, `who` naming the algorithm)."""
    if not isinstance(state, dict):
        raise TypeError(f"{name} must be a dict of tensors, got {type(state).__name__}")
    masks = _mask_names(model)
    current = {key: value for key, value in model.state_dict(keep_vars=True).items() if key not in masks}
    if sorted(state, key=str) != sorted(current):
        missing, unexpected = sorted(set(current) - set(state)), sorted(set(state) - set(current), key=str)
        raise ValueError(f"{name} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
                         f"{wrapping_hint(list(state), list(current), who)}")
    checked = {}
    for key, value in current.items():
        saved = state[key]
        if not dense_values(saved) or saved.shape != value.shape or saved.dtype != value.dtype:
            if not isinstance(saved, Tensor):
                got = type(saved).__name__
            elif saved.is_nested:
                got = "a nested tensor"
            else:
                got = f"{saved.dtype} {tuple(saved.shape)} ({saved.layout}, {saved.device})"
            raise ValueError(f"{name}[{key!r}] must be a dense {value.dtype} tensor of shape {tuple(value.shape)}, "
                             f"got {got}")
        if not finite(saved):
            # Rewound into the weights, it would turn the whole run inf or NaN from the next step on.
            raise ValueError(f"{name}[{key!r}] must hold finite values, got one holding inf or NaN")
        checked[key] = saved.detach().to(value.device, copy=True)
    return checked


@torch.no_grad()
def restore(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Copies a `snapshot` back in place (the masks, and so the zeros they impose, are not set)."""
    current = model.state_dict(keep_vars=True)
    for name, value in state.items():
        current[name].copy_(value)


def dense_values(value) -> bool:
    """Whether `value` is a tensor whose values can be copied into a module's: not a meta tensor (no
    values), nor a torch.sparse or mkldnn one, which copy_ into a dense tensor refuses only as it
    loads it, after the entries before it, nor a nested one (torch.nested's older layout is strided,
    and its shape raises)."""
    return isinstance(value, Tensor) and value.layout == torch.strided and not value.is_nested and not value.is_meta


def finite(tensor: Tensor) -> bool:
    """Whether `tensor` holds no inf or NaN (an integer or bool one always)."""
    return not tensor.is_floating_point() or bool(torch.isfinite(tensor).all())


def map_tensors(function: Callable[[Tensor], Tensor], value):
    """`value` (nested dicts, lists and tuples of tensors and plain values, as a state dict) with
    `function` applied to each tensor; containers are new, plain values the same."""
    if isinstance(value, Tensor):
        return function(value)
    if isinstance(value, dict):
        return {key: map_tensors(function, item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(map_tensors(function, item) for item in value)
    return value


def check_tensors(values, like: list[Tensor], name: str, keys: list | None = None) -> list[Tensor] | None:
    """None, or a validated copy of `values`: tensors of the shapes and dtypes of `like`, on their devices. An
    error names a tensor by its position, or by its key in `keys` (of values taken out of a dict)."""
    if values is None:
        return None
    if not isinstance(values, (list, tuple)) or len(values) != len(like):
        raise ValueError(f"{name} must be None or a list of {len(like)} tensors, got "
                         f"{len(values) if isinstance(values, (list, tuple)) else type(values).__name__}")
    checked = []
    for key, value, reference in zip(keys or range(len(like)), values, like):
        if not dense_values(value) or value.shape != reference.shape or value.dtype != reference.dtype:
            raise ValueError(f"{name}[{key!r}] must be a dense {reference.dtype} tensor of shape "
                             f"{tuple(reference.shape)}")
        if not finite(value):
            raise ValueError(f"{name}[{key!r}] must hold finite values, got one holding inf or NaN")
        checked.append(value.detach().to(reference.device, copy=True))
    return checked


def layer_names(groups: list[tying.Group]) -> list[str]:
    """The name a saved state keys each layer by: its primary module's."""
    return [group[0][0] for group in groups]


def in_layer_order(saved_names, groups: list[tying.Group], name: str, who: str) -> list:
    """`saved_names` (the layer names a state keys its entries by) in the order of `groups` (`in_order_of`); a tied
    layer is found under the name of any module holding its weight (which of them comes first may differ)."""
    return in_order_of(saved_names, [[module_name for module_name, _ in group] for group in groups], name, who,
                       "layers")


def in_order_of(saved_names, aliases: list[list[str]], name: str, who: str, what: str) -> list:
    """`saved_names` (the names a state keys its entries by) in the order of the entries `aliases` lists the names
    of (the first the one saved, any of them found), so that a model listing its layers or parameters in another
    order loads each one's own entry. ValueError naming `name` and the entries missing or unexpected when they are
    not this model's, each once (`who` names the algorithm, `what` the entries: "layers", "parameters")."""
    saved_names = list(saved_names)
    position = {alias: i for i, names in enumerate(aliases) for alias in names}
    found, unexpected = {}, []
    for saved in saved_names:
        i = position.get(saved) if isinstance(saved, str) else None
        if i is None or i in found:
            unexpected.append(saved)
        else:
            found[i] = saved
    primary = [names[0] for names in aliases]
    missing = [primary[i] for i in range(len(aliases)) if i not in found]
    if missing or unexpected:
        raise ValueError(f"{name} holds the {what} {saved_names}, not those of this model: missing {missing}, "
                         f"unexpected {unexpected}{wrapping_hint(saved_names, primary, who)}")
    return [found[i] for i in range(len(aliases))]


def parameter_names(model: nn.Module) -> dict[int, list[str]]:
    """Every name of each parameter of `model`, by the parameter's id, the one `named_parameters()` gives first: a
    weight tied to two modules has two, and which comes first depends on the order the model lists them in."""
    names: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), []).append(name)
    return names


def tensors_by_name(tensors: list[Tensor] | None, names: dict[int, list[str]], like: list[Tensor]):
    """`tensors` (one for each parameter in `like`) keyed by the parameters' names; None stays None."""
    return None if tensors is None else {names[id(p)][0]: tensor for p, tensor in zip(like, tensors)}


def check_tensors_by_name(saved, names: dict[int, list[str]], like: list[Tensor], name: str,
                          who: str) -> list[Tensor] | None:
    """`check_tensors` of a state's `tensors_by_name`, found under any name of each parameter of `like`, in
    their order; a list (by position, as older versions saved it) is checked as it is."""
    if not isinstance(saved, dict):
        return check_tensors(saved, like, name)
    keys = in_order_of(saved, [names[id(p)] for p in like], name, who, "parameters")
    return check_tensors([saved[key] for key in keys], like, name, keys)


def optimizer_by_name(state: dict, optimizer: torch.optim.Optimizer, names: dict[int, list[str]]) -> dict:
    """`state`, a state dict of `optimizer` (torch's, keyed by the parameters' positions in its groups), with each
    position replaced by the parameter's first name in `names` (by the parameter's id), so that it loads into a
    model listing its parameters in another order (`optimizer_in_order`); as it is, by position, when a parameter
    has no name (is not one of the model's)."""
    parameters = [parameter for group in optimizer.param_groups for parameter in group["params"]]
    if not all(id(parameter) in names for parameter in parameters):
        return state
    named = {position: names[id(parameter)][0] for position, parameter in enumerate(parameters)}
    return {**state, "state": {named[position]: values for position, values in state["state"].items()},
            "param_groups": [{**group, "params": [named[position] for position in group["params"]]}
                             for group in state["param_groups"]]}


def optimizer_in_order(saved: dict, optimizer: torch.optim.Optimizer, names: dict[int, list[str]], name: str,
                       who: str, by_position: bool = True) -> dict:
    """A state of `optimizer_by_name`, its groups and their parameters' names listed in the order of `optimizer`'s
    own (a parameter found under any of its `names`): torch's load_state_dict pairs the saved groups, and the
    parameters in them, with the optimizer's own by position, and moves each one's hyperparameters and state to
    its pair. A state by position (torch's own, as older versions saved it) is returned as it is, where
    `by_position` allows it (not beside other entries by name). ValueError naming `name` and the parameters when
    they are not the optimizer's, or are grouped otherwise."""
    groups_saved = saved.get("param_groups")
    if (not isinstance(groups_saved, list) or not isinstance(saved.get("state"), dict)
            or not all(isinstance(group, dict) and isinstance(group.get("params"), list) for group in groups_saved)):
        raise ValueError(f"{name} must be an optimizer state dict: a dict of 'state' and 'param_groups', each "
                         f"group's 'params' the parameters' names")
    saved_names = [key for group in groups_saved for key in group["params"]]
    if by_position and not any(isinstance(key, str) for key in saved_names):
        # torch's load_state_dict keeps the state of a position no group lists under that key, where the next save
        # by name (optimizer_by_name) finds no parameter for it.
        _refuse_strangers(saved, saved_names, name)
        return saved
    parameters = [parameter for group in optimizer.param_groups for parameter in group["params"]]
    strangers = [i for i, parameter in enumerate(parameters) if id(parameter) not in names]
    if strangers:
        raise ValueError(f"{name} holds the parameters by name, but the optimizer's parameters {strangers} (by "
                         f"position) are not the model's")
    order = dict(zip(map(id, parameters), in_order_of(saved_names, [names[id(p)] for p in parameters], name, who,
                                                      "parameters")))
    _refuse_strangers(saved, saved_names, name)
    if len(groups_saved) != len(optimizer.param_groups):
        raise ValueError(f"{name} holds {len(groups_saved)} parameter groups, the optimizer "
                         f"{len(optimizer.param_groups)}")
    home = {key: i for i, group in enumerate(groups_saved) for key in group["params"]}
    empty = [i for i, group in enumerate(groups_saved) if not group["params"]]
    paired = []
    for group in optimizer.param_groups:
        keys = [order[id(parameter)] for parameter in group["params"]]
        # An empty group has no parameter to find its pair by: the empty saved groups pair up in their order.
        homes = {home[key] for key in keys} if keys else set(empty[:1])
        empty = empty if keys else empty[1:]
        if len(homes) != 1 or len(groups_saved[min(homes)]["params"]) != len(keys):
            grouped = [[order[id(parameter)] for parameter in group["params"]] for group in optimizer.param_groups]
            raise ValueError(f"{name} groups the parameters as {[group['params'] for group in groups_saved]}, "
                             f"the optimizer as {grouped}")
        paired.append({**groups_saved[homes.pop()], "params": keys})
    return {**saved, "param_groups": paired}


def _refuse_strangers(saved: dict, saved_names: list, name: str) -> None:
    """ValueError naming `name` for a state entry of `saved` (an optimizer state) keyed by no parameter its groups
    list, or one that is not a dict of that parameter's state."""
    unexpected = [key for key in saved["state"] if key not in saved_names]
    if unexpected:
        raise ValueError(f"{name} holds the state of {unexpected}, which are not its parameters {saved_names}")
    for key, entry in saved["state"].items():
        if not isinstance(entry, dict):
            raise ValueError(f"{name}['state'][{key!r}] must be a dict of the parameter's state, got "
                             f"{type(entry).__name__}")


def wrapping_hint(saved: list, names: list[str], who: str) -> str:
    """Why a state's layer names may be `who`'s with one prefix more or less: a wrapper's (module. of
    DistributedDataParallel, _orig_mod. of torch.compile) on one side only; "" when they differ otherwise."""
    added = _wrappers.added_prefix(saved, names)
    if added is None:
        return ""
    prefix, in_saved = added
    side = "the saved names carry" if in_saved else f"this {who}'s names carry"
    return (f" ({side} the prefix {prefix!r} of a wrapper, DistributedDataParallel's or torch.compile's: "
            f"build {who} on the model wrapped as it was when saved, as the model's own state dict needs)")


def check_masks(masks, groups: list[tying.Group], name: str = "masks", keys: list | None = None) -> list[Tensor]:
    """`masks`, one bool tensor shaped like each layer's weight, on its device; or TypeError/ValueError naming a
    mask by its position, or by its key in `keys` (of masks taken out of a dict)."""
    layers = primaries(groups)
    if not isinstance(masks, (list, tuple)) or len(masks) != len(layers):
        raise ValueError(f"{name} must be a list of {len(layers)} bool tensors (one per sparse layer), got "
                         f"{len(masks) if isinstance(masks, (list, tuple)) else type(masks).__name__}")
    checked = []
    for key, mask, layer in zip(keys or range(len(layers)), masks, layers):
        if not dense_values(mask) or mask.dtype != torch.bool or mask.shape != layer.weight.shape:
            raise ValueError(f"{name}[{key!r}] must be a dense bool tensor of shape {tuple(layer.weight.shape)}")
        checked.append(mask.to(layer.mask.device))
    return checked


def set_masks(groups: list[tying.Group], masks: list[Tensor]) -> None:
    for layer, mask in zip(primaries(groups), masks):
        layer.set_mask(mask)
    tying.sync(groups)


def masks_of(groups: list[tying.Group]) -> list[Tensor]:
    return [layer.mask.clone() for layer in primaries(groups)]


def check_state_keys(state, required: tuple[str, ...], optional: tuple[str, ...], who: str,
                     legacy: tuple[str, ...] = ()) -> None:
    """TypeError unless `state` is a dict; one ValueError naming the `required` entries it lacks and those it holds
    that are neither required nor `optional` (the other entries a state of `who` holds: its settings, and those
    that states of earlier versions lack) nor `legacy` (held by earlier versions and since dropped: accepted, and
    ignored as the versions since have ignored them). An entry nobody reads, a misspelled setting or a tampered one,
    would otherwise load as though it were not there, its setting unchecked."""
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict, got {type(state).__name__}")
    missing = sorted(set(required) - set(state))
    unknown = sorted(set(state) - {*required, *optional, *legacy}, key=str)
    problems = [f"lacks {missing}"] if missing else []
    if unknown:
        problems.append(f"holds {unknown}, which a state of {who} does not hold (a misspelled or tampered entry?)")
    if problems:
        raise ValueError(f"state {' and '.join(problems)}")


# Above any count a run reaches (torch keeps its own step counts in int64): a larger one is a tampered state, whose
# digits, past 4300, an error or warning line could not even print (Python's int-to-str limit raises ValueError).
MAX_COUNT = 2 ** 63 - 1


def refuse_count_end(count: int, name: str, who: str) -> None:
    """RuntimeError, before a step counts, where the counter `name` is at MAX_COUNT already (only a state doctored to
    a count near it gets there): counted on, the state saved next would hold a count no state loads."""
    if count >= MAX_COUNT:
        raise RuntimeError(f"{who}.step(): {name} is at 2**63 - 1, where the saved counters end (a state loaded with a "
                           f"count near it?); nothing was counted")


def state_count(state: dict, key: str, low: int = 0) -> int:
    """state[key], a counter, as an int in [low, MAX_COUNT]; TypeError or ValueError naming the entry otherwise."""
    count = _checks.count(state[key], f"state[{key!r}]", low)
    if count > MAX_COUNT:
        raise ValueError(f"state[{key!r}] must be at most 2**63 - 1, got {checkpoint.integer_shown(count)}")
    return count


def check_saved_by(state, algorithm: str) -> None:
    """TypeError unless `state` is a dict; ValueError when it was saved by another algorithm (its "algorithm"
    entry): the entries of one algorithm's state can be a subset of another's (SWAMP's hold IMP's), and
    loaded they would be taken for its own. A state without the entry (saved before it was kept) is not
    checked."""
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict, got {type(state).__name__}")
    check_saved_settings(state, {"algorithm": algorithm})


def check_saved_settings(state: dict, settings: dict, names: dict | None = None) -> None:
    """ValueError unless `state` was saved under `settings` (each key an entry, each value this algorithm's), naming
    in one error every setting it was saved under another value of (`names` maps a key to how the error names its
    setting, where the key alone says too little): resumed under another, a run would go on as a run of neither, or
    misread its counters, which alone cannot tell (check_rewind_point): a state at step 3 of cycle 1 holding θ_2 fits
    rewind_step 0 as well, and resuming it there would rewind to θ_2 and restart at step 0. Refused at the first
    difference, a state of several was refused again for the next once the first was put right. A state without an
    entry (saved before it was kept) is not checked for it. A flag's entry that is no bool (NumPy's counts as one)
    raises TypeError saying so, before any difference is named: no run saves one, and "saved with decides_count=1,
    not True" told of a run that cannot be."""
    for key, value in settings.items():
        if key in state and isinstance(value, bool) and not isinstance(state[key], (bool, np.bool_)):
            raise TypeError(f"state[{key!r}] must be a bool, got {type(state[key]).__name__}")
    differing = [key for key, value in settings.items() if key in state and _differs(state[key], value)]
    if differing:
        saved = {key: _shown(state[key]) for key in differing}
        names = names or {}
        raise ValueError(", ".join(f"state[{key!r}]={saved[key]}" for key in differing)
                         + ": the state was saved with "
                         + "; ".join(f"{names.get(key, key)}={saved[key]}, not {settings[key]!r}" for key in differing))


def _shown(value) -> str:
    """repr(value) for an error line, or what `value` is where its repr raises: an int of more than 4300 digits
    (Python's int-to-str limit), a tampered object's __repr__."""
    try:
        return repr(value)
    except Exception:   # whatever it raises, the error must still name the entry
        if isinstance(value, int):
            return f"<{checkpoint.integer_shown(value)}>"
        return f"<a {type(value).__name__} whose repr fails>"


def _differs(saved, value) -> bool:
    """Whether a state's setting `saved` is not `value`, as the algorithm's arguments tell settings apart: a flag is
    a bool, a count an integer of any kind, a number any real but a bool (True is no snip_shift of 1.0, nor 1 a
    reset_state of True), and a pair (block) a tuple or list of two (DST takes block=[2, 2] for (2, 2)). A NumPy
    scalar is taken for the Python value of its kind (np.bool_ a bool, np.integer an int, np.floating a float), as
    a state built from NumPy values holds them. A tensor or an array of values is never a setting, and comparing one
    gives a tensor or an array, whose truth value raises (a NumPy array's a ValueError of its own, naming nothing);
    so does a comparison that raises."""
    if isinstance(saved, Tensor) or getattr(saved, "ndim", 0):
        return True
    if isinstance(saved, (np.bool_, np.integer, np.floating)):
        saved = saved.item()
    if isinstance(value, tuple):
        return (not isinstance(saved, (tuple, list)) or len(saved) != len(value)
                or any(_differs(item, expected) for item, expected in zip(saved, value)))
    if isinstance(value, bool) or isinstance(saved, bool):
        return not (isinstance(saved, bool) and isinstance(value, bool) and saved == value)
    if isinstance(value, numbers.Integral) and not isinstance(saved, numbers.Integral):
        return True
    if isinstance(value, numbers.Real) and not isinstance(saved, numbers.Real):
        return True
    try:
        return bool(saved != value)
    except Exception:   # whatever a tampered object's comparison raises: it is no setting of these
        return True


def check_rewind_point(cycle: int, step_in_cycle: int, has_rewind_state: bool, rewind_step: int,
                       keeps_weights: bool) -> None:
    """ValueError unless a saved state's counters and θ_k agree as IMP and SWAMP keep them: every cycle
    after the first starts at the rewind step k, and θ_k is held (with weight rewinding) exactly from
    step k of cycle 0 on. A state saved under another rewind_step or rewind mode fails here."""
    if cycle > 0 and step_in_cycle < rewind_step:
        raise ValueError(f"state['step_in_cycle']={step_in_cycle} is below rewind_step={rewind_step} in cycle "
                         f"{cycle}, which starts at the rewind step (saved with another rewind_step?)")
    past = cycle > 0 or step_in_cycle >= rewind_step
    if not keeps_weights:
        if has_rewind_state:
            raise ValueError("state['rewind_state'] is set, but learning-rate rewinding keeps no θ_k "
                             "(saved with rewind='weights'?)")
    elif has_rewind_state and not past:
        raise ValueError(f"state['rewind_state'] is set, but the state is before the rewind step (cycle 0, step "
                         f"{step_in_cycle}, rewind_step={rewind_step}; saved with another rewind_step?)")
    elif not has_rewind_state and past:
        raise ValueError(f"state['rewind_state'] is None, but the state is past the rewind step "
                         f"(cycle {cycle}, step {step_in_cycle}, rewind_step={rewind_step})")


def loaded_optimizer(optimizer_factory: Callable, model: nn.Module, saved, name: str,
                     who: str) -> torch.optim.Optimizer:
    """A fresh optimizer from the factory with `saved` loaded, a state of `optimizer_by_name` by the names of
    `model`'s parameters (in any order) or torch's own by position; ValueError naming `name` (and the parameters
    missing or unexpected, `who` naming the algorithm) if it does not fit."""
    optimizer = make_optimizer(optimizer_factory, model)
    if not isinstance(saved, dict):
        raise TypeError(f"{name} must be an optimizer state dict, got {type(saved).__name__}")
    saved = optimizer_in_order(saved, optimizer, parameter_names(model), name, who)
    check_state_dtypes(saved, name, optimizer)
    held = {key for group in optimizer.param_groups for key in group}   # what the fresh optimizer's step reads
    try:
        # A copy: torch's optimizer keeps the caller's tensors as its own (where device and dtype fit) and would
        # train them in place, so that a state loaded twice (a retry, a rollback) would not resume alike.
        optimizer.load_state_dict(map_tensors(Tensor.clone, saved))
    except torch.OutOfMemoryError:   # the device, not the state: as it is
        raise
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as error:
        raise ValueError(f"{name} does not fit the optimizer: {type(error).__name__}: {error}") from None
    check_hyperparameters(optimizer, name, held)
    names = parameter_names(model)
    check_optimizer_state(optimizer, [(names[id(parameter)][0] if id(parameter) in names else str(position), parameter)
                                      for position, parameter in enumerate(
                                          p for group in optimizer.param_groups for p in group["params"])],
                          name, "parameter")
    return optimizer


def check_hyperparameters(optimizer: torch.optim.Optimizer, name: str, held: set[str] | None = None) -> None:
    """ValueError naming `name` when a hyperparameter just loaded into `optimizer` (a fresh one, so that the one
    in use stays as it was) is of another kind than the optimizer's own default (lr as a string, foreach as
    anything but None or a bool: `_same_kind`), or missing from a group where the fresh optimizer's groups held it
    (`held`; None: every default, as torch's own classes hold them):
    torch's load_state_dict takes it, and the next step fails on it (part-way, some parameters updated and others
    not, or with a KeyError naming no state). Not every default is held: torch's Optimizer.__setstate__ adds
    `differentiable` to the defaults of every class, and only some put it in their groups (Adafactor, Muon, a class
    of one's own do not)."""
    for index, group in enumerate(optimizer.param_groups):
        for key, default in optimizer.defaults.items():
            if key not in group:   # the optimizer's __setstate__ filled those that torch added over versions
                if held is not None and key not in held:
                    continue
                raise ValueError(f"{name}['param_groups'][{index}] lacks {key!r}, which the optimizer's step reads")
            if not _same_kind(group[key], default, key):
                kind = "None or a bool" if default is None else f"of the kind of the optimizer's own {default!r}"
                raise ValueError(f"{name}['param_groups'][{index}][{key!r}] must be {kind}, got {group[key]!r}")
            # torch's constructors refuse these (lr < 0, NaN); its load_state_dict takes them, and the next step
            # writes NaN into every weight, or climbs the loss.
            if not _finite_number(group[key]):
                raise ValueError(f"{name}['param_groups'][{index}][{key!r}] must be finite, got {group[key]!r}")
        if "lr" in group and _finite_number(group["lr"]) and _same_kind(group["lr"], 0.0) and group["lr"] < 0:
            raise ValueError(f"{name}['param_groups'][{index}]['lr'] must be >= 0, got {group['lr']!r}")
        refusal = _constructor_refusal(optimizer, group)
        if refusal is not None:
            raise ValueError(f"{name}['param_groups'][{index}] holds hyperparameters that {type(optimizer).__name__} "
                             f"refuses: {refusal}")


def _constructor_refusal(optimizer: torch.optim.Optimizer, group: dict) -> str | None:
    """What torch's optimizer class says of `group`'s hyperparameters, whose ranges its constructor checks (SGD's
    momentum >= 0, nesterov with momentum and no dampening, Adam's betas in [0, 1)) and its load_state_dict does not
    (a momentum of -1 loaded, and trained on); None where it takes them, or where it cannot be built from them alone.
    Only torch.optim's own classes are asked, on a meta tensor of the group's first parameter's shape (Muon takes
    only matrices), which allocates nothing: a class of one's own may do anything when built (count, log, take
    other arguments), and its ValueError need not be about the values."""
    if not type(optimizer).__module__.startswith("torch.optim."):
        return None
    parameter = next(iter(group["params"]), None)
    probe = torch.empty((1,) if parameter is None else parameter.shape, device="meta",
                        dtype=torch.float32 if parameter is None else parameter.dtype)
    try:
        type(optimizer)([probe], **{key: group[key] for key in optimizer.defaults})
    except ValueError as error:
        return str(error)
    except Exception:   # noqa: BLE001 -- any other failure says nothing about the values
        return None
    return None


# Per-parameter state entries torch's optimizers hold in the parameter's shape (SGD's, Adam's, RMSprop's,
# Adagrad's, Adadelta's, Adamax's, Rprop's, ASGD's).
PARAMETER_SHAPED_STATE = frozenset({"momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "square_avg",
                                    "grad_avg", "acc_delta", "sum", "exp_inf", "prev", "step_size", "ax"})


def check_state_dtypes(saved: dict, name: str, optimizer: torch.optim.Optimizer) -> None:
    """ValueError naming `name` and the entry for a per-parameter state entry of `saved` (an optimizer's state dict,
    its groups in the order of `optimizer`'s, `optimizer_in_order`) held in the parameter's shape
    (PARAMETER_SHAPED_STATE) that is a tensor of no floating dtype, or complex for a real parameter: torch's
    load_state_dict casts it to the parameter's dtype, and a bool or integer momentum loaded as numbers, a complex
    one without its imaginary part."""
    states = saved.get("state")
    groups = saved.get("param_groups")
    parameters = {key: parameter for group, own in zip(groups if isinstance(groups, list) else (),
                                                       optimizer.param_groups)
                  if isinstance(group, dict) and isinstance(group.get("params"), list)
                  for key, parameter in zip(group["params"], own["params"])}
    for key, entry in states.items() if isinstance(states, dict) else ():
        for field, value in entry.items() if isinstance(entry, dict) else ():
            if field not in PARAMETER_SHAPED_STATE or not isinstance(value, Tensor):
                continue
            real_parameter = key in parameters and not parameters[key].is_complex()
            if not (value.is_floating_point() or value.is_complex()) or (value.is_complex() and real_parameter):
                raise ValueError(f"{name}['state'][{key!r}][{field!r}] must be a floating-point tensor, got "
                                 f"{value.dtype}")


def check_optimizer_state(optimizer: torch.optim.Optimizer, parameters: list[tuple[str, Tensor]], name: str,
                          what: str) -> None:
    """ValueError naming `name` and the `what` (layer, parameter) whose per-parameter state, just loaded into
    `optimizer` (a fresh one), does not fit it: an entry held in the parameter's shape (PARAMETER_SHAPED_STATE)
    of another shape or not a tensor, or any tensor holding inf or NaN. torch's load_state_dict takes any value
    (and casts a tensor to the parameter's dtype), and the next step would fail on it part-way, some parameters
    updated, or turn them inf or NaN for good."""
    for parameter_name, parameter in parameters:
        for key, value in optimizer.state.get(parameter, {}).items():
            if value is None:   # SGD's momentum buffer without momentum
                continue
            if key in PARAMETER_SHAPED_STATE and (not dense_values(value) or value.shape != parameter.shape):
                got = (f"a {value.dtype} tensor of shape {tuple(value.shape)}" if isinstance(value, Tensor)
                       else type(value).__name__)
            elif isinstance(value, Tensor) and dense_values(value) and not finite(value):
                got = "one holding inf or NaN"
            else:
                continue
            raise ValueError(f"{name} must hold for {what} {parameter_name!r} a finite {key.replace('_', ' ')} of "
                             f"{parameter.dtype} and shape {tuple(parameter.shape)}, got {got}")
    _check_state_entries_alike(optimizer, {id(parameter): label for label, parameter in parameters}, name, what)


def _check_state_entries_alike(optimizer: torch.optim.Optimizer, names: dict[int, str], name: str, what: str) -> None:
    """ValueError naming `name` and the `what` whose state, just loaded into `optimizer`, lacks a tensor (or holds
    None) of PARAMETER_SHAPED_STATE where the other parameters of its group that hold any state hold one: torch's
    optimizers that keep those give every parameter of a group that has stepped the same (SGD's momentum buffer,
    Adam's moments), and loaded, such a state starts that parameter's afresh (a momentum of None is made again from
    the next gradient), without a word. Other entries may differ by the parameter's shape (Adafactor's row and column
    variances of a matrix, variance of a vector); a parameter holding no state at all (one that never had a gradient)
    is left alone."""
    for group in optimizer.param_groups:
        held = [(parameter, optimizer.state.get(parameter)) for parameter in group["params"]]
        held = [(parameter, state) for parameter, state in held if state]
        kinds = {key for _, state in held for key, value in state.items()
                 if key in PARAMETER_SHAPED_STATE and isinstance(value, Tensor)}
        for parameter, state in held:
            lacking = sorted(key for key in kinds if not isinstance(state.get(key), Tensor))
            if lacking:
                raise ValueError(f"{name} holds for {what} {names.get(id(parameter), '?')!r} no "
                                 f"{lacking[0].replace('_', ' ')}, which the other parameters of its group hold (a "
                                 f"dropped or damaged entry): loaded, its optimizer would start it afresh")


def _finite_number(value) -> bool:
    """False only for a number (or a one-element tensor, or a tuple holding one) that is inf or NaN."""
    if isinstance(value, (tuple, list)):
        return all(map(_finite_number, value))
    if isinstance(value, Tensor):
        return value.numel() != 1 or not value.is_floating_point() or bool(torch.isfinite(value).all())
    return not isinstance(value, float) or math.isfinite(value)


# Hyperparameters whose default is None that torch documents as bools (`foreach (bool, optional)`): None lets torch
# choose. A state of older torch versions holds False for them (fused's default was False), which loads as it did,
# and OptG takes for its score optimizer's None. (differentiable, torch's other flag of the implementation, defaults
# to False, a bool, and is checked as one.)
OPTIONAL_FLAGS = frozenset({"foreach", "fused"})


def _same_kind(value, default, key: str | None = None) -> bool:
    """Whether an optimizer's hyperparameter `value` (under `key`) is of the kind of its default: a bool, a number (a
    tensor of one element, which torch takes for lr and betas, included) or a tuple of them; None or a bool for a
    None default that torch documents as a bool (OPTIONAL_FLAGS: foreach='x' loaded, and the next step took it for
    True), anything for other None defaults (LBFGS's line_search_fn, a str)."""
    if default is None:
        return key not in OPTIONAL_FLAGS or value is None or isinstance(value, bool)
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, (int, float)):
        return (isinstance(value, (int, float)) and not isinstance(value, bool)) or \
            (isinstance(value, Tensor) and value.numel() == 1)
    if isinstance(default, tuple):
        return isinstance(value, (tuple, list)) and len(value) == len(default) and \
            all(_same_kind(item, item_default) for item, item_default in zip(value, default))
    return True
