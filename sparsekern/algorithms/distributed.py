"""Keeping sparse masks, and the weights under them, identical across the ranks of a DDP run.

DST keeps masks identical by construction when every rank builds it with the same `seed` (the
default; it refuses a seed that differs across ranks): the random criteria then draw the same
numbers everywhere, and the gradient criteria read gradients that DDP has already averaged, which
are equal on every rank. Masks alone can look equal while replicas differ: DDP copies rank 0's
buffers, masks included, to every rank at each forward, but each rank zeroed its own weights off
its own mask. So `masks_identical` compares the masks and the weights under them, and
`broadcast_masks` repairs both, the optimizer state of the sparse weights when given it, and the
algorithm's own state (step count, random stream) when given it. They need an
initialised `torch.distributed` process group; masks travel as uint8 (gloo has no bool all-reduce),
and the tensors of a state through an object collective as CPU copies (`broadcast_object`).

Every rank enters each collective here, or none does: a rank raising alone would leave the others
waiting in the next one. Checks run inside an `Agreement`, whose one object gather carries each
rank's error; every rank raises when any failed, before anything changes. The algorithms'
constructors run theirs inside a `ReplicaCheck`, which compares their masks, random streams,
settings and the layers they update (frozen ones left alone) in that same gather (SWAMP's, whose
ranks train different particles, its settings alone).
"""
from __future__ import annotations

import zlib

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.algorithms.join import Join, Joinable, JoinHook
from torch.nn.parallel import DistributedDataParallel

from ..nn import sparse_modules
from ..nn.modules import check_own_masks, computed_weight_refusal, refuse_inference_mode
from ..nn.optimizer_state import (check_optimizer, check_state_writable, optimizer_state, reset_state_off_mask,
                                  state_is_sharded)
from ..nn.sharding import refuse_sharded
from ..ops import _checks
from . import _tickets
from ._tickets import map_tensors


@torch.no_grad()
def broadcast_masks(model: nn.Module, src: int = 0, group=None, weights: bool = True,
                    optimizer: torch.optim.Optimizer | None = None, algorithm=None) -> None:
    """Copies rank `src`'s mask, and with `weights` its weight, into every sparse module of `model`
    on every rank (weights off the mask become 0, except in a module that does not promise
    `zero_off_mask`: OptG keeps its pruned weights, and their optimizer state, to bring them back,
    and its forward selects). `model` may be wrapped in DistributedDataParallel. Collective: call
    on every rank of `group`, the process group whose ranks hold replicas (None: the default group);
    `src` is a global rank, as in torch.distributed.broadcast, of one of them (else TypeError or
    ValueError naming it).

    With `algorithm` (the DST, IMP or OptG driving `model` on this rank), rank `src`'s
    `algorithm.state_dict()` is loaded on every other rank first: masks alone do not make replicas
    agree when the algorithms' step counts or random streams differ (after a checkpoint was loaded on
    one rank only, say), since their next mask updates then differ; DST's `finish()` is part of that
    state. No other parameter (a bias, a dense layer) or its optimizer state is copied: loading the
    checkpoint on every rank (`sparsekern.checkpoint.load` is safe to call from all ranks at once)
    needs no repair. The state is checked on every rank before any rank installs it: one that does not
    load on some rank (its algorithm was built with other settings, or on another wrapping of the
    model) raises on every rank, and so do ranks whose DST or OptG leaves other layers alone (a layer
    frozen on some ranks only since it was built), whose masks would diverge again at the next update.

    With `optimizer` (the one training `model` on this rank), rank `src`'s state of each sparse
    weight (momentum, Adam moments and step) is copied too, and is 0 off the mask where the weights
    are: a rank that trained under masks of its own holds momentum that would move its weights apart
    from the others', and off the new mask, at its next step. A rank whose optimizer holds no state for
    a sparse weight yet (it has not stepped: under Join, a rank that had no inputs at all) takes src's
    whole state of that weight, in the object broadcast that carries the algorithm's state and the
    scalars (Adam's step). Other differences (src's optimizer has not stepped where another has, or is of
    another kind) raise ValueError on every rank, before anything changes.
    A ZeroRedundancyOptimizer keeps each weight's state on one rank only, which no other rank can have
    moved: each rank zeroes its own share off the masks, and nothing is copied.
    Not an LBFGS (ValueError): no mask change can follow its flattened history. Not a sparse layer whose
    weight is computed at every forward (ValueError naming it: a parametrization registered after sparsify),
    whose computed weight a broadcast could not write into, nor a SparseLinear in inference mode (ValueError naming
    it: `sparsekern.nn.to_training(model)` first), whose packed copy the broadcast would leave stale. Ranks holding
    different sparse layers (names or shapes), or given an optimizer or algorithm on some ranks only,
    raise ValueError on every rank. Every error is raised on every rank (a rank raising alone would
    leave the others waiting in a collective), before anything changes on any: the rank whose check
    failed raises its own, the others one of the same kind naming that rank."""
    _broadcast_replica(model, src, group, weights, optimizer, algorithm, whole_optimizer=False)


@torch.no_grad()
def _broadcast_replica(model: nn.Module, src: int, group, weights: bool, optimizer: torch.optim.Optimizer | None,
                       algorithm, whole_optimizer: bool, lr_scheduler=None) -> None:
    """broadcast_masks; with `whole_optimizer` (Join's catching up), rank `src`'s state of every parameter
    `optimizer` trains is copied as well, and its param_groups' settings (a learning rate that a scheduler
    set, say), the state tensors shaped like their parameter by tensor broadcasts in place, as the sparse
    weights' are, the rest in the one object broadcast (of CPU copies, which a model's worth of optimizer
    state would make slow), which also carries `lr_scheduler`'s state (its step count) where given."""
    from . import dst, imp, optg   # here: they import this module
    with Agreement("broadcast_masks", group) as agreement:
        _checks.flag(weights, "weights")
        _check_source(src, group)
        check_optimizer(optimizer, "build a new LBFGS on every rank after broadcast_masks")
        if algorithm is not None and not isinstance(algorithm, (dst.DST, imp.IMP, optg.OptG)):
            raise TypeError(f"algorithm must be a DST, IMP or OptG or None (SWAMP's ranks train different "
                            f"particles on purpose), got {type(algorithm).__name__}")
        refuse_sharded(model, "broadcast_masks")
        named = sparse_modules(model)
        refusal = computed_weight_refusal(named, "broadcast_masks")   # a computed weight is not there to write
        if refusal is not None:
            raise ValueError(refusal)
        check_own_masks(named, "broadcast_masks")   # copied into (and src's read) after the weights are broadcast
        refuse_inference_mode(named, "broadcast_masks")
        modules = [module for _, module in named]
        copy_state = optimizer is not None and not state_is_sharded(optimizer)
        whole_optimizer = whole_optimizer and copy_state
        # The sparse weights first, as `modules`, then (whole_optimizer) every other parameter optimizer trains.
        parameters = [module.weight for module in modules]
        if whole_optimizer:
            sparse = {id(weight) for weight in parameters}
            parameters += [p for entry in optimizer.param_groups for p in entry["params"] if id(p) not in sparse]
        if optimizer is not None:   # the broadcasts below write them in place, and zero them off the masks
            for name, module in named:
                check_state_writable(optimizer, module.weight, module.mask, name)
        states = [[] if optimizer is None else optimizer_state(optimizer, p) for p in parameters]
        agreement.shared = (_layers(model), [module.zero_off_mask for module in modules],
                            [len(state) for state in states] if copy_state else None,
                            algorithm is not None,
                            [[tuple(p.shape) for p in entry["params"]] for entry in optimizer.param_groups]
                            if whole_optimizer else None, lr_scheduler is not None,
                            None if algorithm is None else algorithm._layers_updated())
    source = dist.get_group_rank(group, src) if group is not None else src
    stateless = _check_same_setup(agreement.gathered, source, "parameters" if whole_optimizer else "sparse weights")
    # src's promises, which every rank's modules take with its masks: a rank whose own promise had lapsed (seen
    # under torch 2.11 after DDP copied rank 0's masks over a diverged replica's) kept its share of a
    # ZeroRedundancyOptimizer's state non-zero off the masks, which the next step would grow back on every rank.
    promised = agreement.gathered[source][1]
    if algorithm is not None or copy_state:
        # One object broadcast carries src's algorithm state and what its optimizer holds for the parameters
        # besides the tensors shaped like them, which tensor broadcasts copy below: scalars (Adam's step, which
        # sets its bias correction), and the whole state of a parameter that some rank's optimizer holds none
        # for (it has not stepped: under Join, a rank that had no inputs at all).
        algorithm_state, entries, settings, schedule = broadcast_object(
            (None if algorithm is None else algorithm.state_dict(),
             _state_entries(optimizer, parameters, stateless) if copy_state else {},
             [{key: value for key, value in entry.items() if key != "params"} for entry in optimizer.param_groups]
             if whole_optimizer else None, None if lr_scheduler is None else lr_scheduler.state_dict())
            if dist.get_rank() == src else None, src, group)
        if algorithm is not None:
            # Checked on every rank before any installs it: a state that fails on one rank (its algorithm
            # built with other settings) must leave every rank as it was, and none waiting for the others.
            with Agreement("broadcast_masks(algorithm=...)", group):
                install = algorithm._prepare_load(algorithm_state) if dist.get_rank() != src else None
            # The states load (their layer names are alike), so the names compare: every rank raises alike, before
            # any installs, where masks copied now would diverge again at the next update (layers frozen apart).
            check_same_layers_updated(type(algorithm).__name__, [shared[-1] for shared in agreement.gathered])
            if install is not None:
                install()
        if dist.get_rank() != src:
            for index, entry in entries.items():
                _install_entry(optimizer, parameters[index], entry)
                states[index] = optimizer_state(optimizer, parameters[index])
            for entry, setting in zip(optimizer.param_groups, settings) if whole_optimizer else ():
                _install_settings(entry, setting)
            if lr_scheduler is not None:
                lr_scheduler.load_state_dict(schedule)
    for state in states[len(modules):]:   # the parameters that are not sparse weights (whole_optimizer)
        for tensor in state:
            dist.broadcast(tensor, src=src, group=group)
    for module, state, promise in zip(modules, states, promised):
        mask = module.mask.to(torch.uint8)
        dist.broadcast(mask, src=src, group=group)
        if weights:
            dist.broadcast(module.weight.data, src=src, group=group)
        # A module whose src replica does not promise zero_off_mask keeps values off its mask on purpose
        # (OptG's pruned weights come back with them): zeroed, they and their momentum would be lost on every
        # rank, src's included. Its forward selects, so the mask alone is copied in.
        keeps_pruned = not promise
        if keeps_pruned:
            module.mask.copy_(mask.bool())
        else:
            module.set_mask(mask.bool())
        for tensor in state if copy_state else ():
            dist.broadcast(tensor, src=src, group=group)
        if state and not keeps_pruned:   # reset off the mask (zeroed, or Rprop's step sizes to their lr)
            reset_state_off_mask(optimizer, module.weight, module.mask)


def _check_source(src, group) -> None:
    """TypeError or ValueError naming `src` unless it is the (global) rank of a process in `group`: torch's
    broadcasts would refuse it only inside the first one, naming a "root rank"."""
    src = _checks.integer(src, "src")
    if not (dist.is_available() and dist.is_initialized()):
        return   # no ranks to name: the first collective says that no process group was initialised
    ranks = dist.get_process_group_ranks(group) if group is not None else range(dist.get_world_size())
    if src not in ranks:
        raise ValueError(f"src must be a rank of the group, one of {list(ranks)}, got {src}")


def broadcast_object(value, src: int, group=None):
    """Rank `src`'s `value` (nested dicts, lists and tuples of tensors and picklable values, as a state
    dict; ignored on the other ranks) on every rank of `group`. Collective: call on every rank. Its
    tensors travel as CPU copies: pickled as they are, CUDA tensors would be rebuilt on each receiving
    rank on the sender's GPU index (another rank's GPU, or one its machine lacks). Whoever loads them
    moves them to its own device."""
    held = [map_tensors(Tensor.cpu, value) if dist.get_rank() == src else None]
    dist.broadcast_object_list(held, src=src, group=group)
    return held[0]


def _check_same_setup(gathered: list[tuple], source: int, what: str) -> list[int]:
    """ValueError (on every rank: each reads the same `gathered`) unless every rank passed
    broadcast_masks the same sparse layers, optimizer state counts of the parameters it copies (`what`
    they are; none, where rank `source`'s optimizer has state: it is copied), parameter groups (the shapes
    of their parameters, in order) and algorithm presence: the broadcasts that follow would otherwise pair
    tensors of different sizes or counts, which gloo answers by aborting the process and NCCL by hanging.
    Returns the indices of the parameters that some rank's optimizer holds no state for, and `source`'s does."""
    layers, _, counts, has_algorithm, groups, has_scheduler, _ = zip(*gathered)
    if any(shapes != groups[0] for shapes in groups):
        sizes = sorted({tuple(map(len, shapes)) for shapes in groups})
        raise ValueError(f"broadcast_masks: the ranks' optimizers hold other parameter groups (parameters per group: "
                         f"{sizes}{'' if len(sizes) > 1 else ', of other shapes or in another order'}), so no rank's "
                         f"state fits the others'")
    if any(other != layers[0] for other in layers):
        raise ValueError("broadcast_masks: the ranks hold different sparse layers (names or mask shapes), so no "
                         "rank's masks fit the others' (pipeline stages are no replicas)")
    if None in counts and any(count is not None for count in counts):
        raise ValueError("broadcast_masks: optimizer is given on some ranks only (or is a ZeroRedundancyOptimizer "
                         "on some ranks only); pass each rank's own optimizer on every rank, or none")
    if any(given != has_algorithm[0] for given in has_algorithm):
        raise ValueError("broadcast_masks: algorithm is given on some ranks only; pass each rank's own on every "
                         "rank, or none")
    if any(given != has_scheduler[0] for given in has_scheduler):
        raise ValueError("Join(lr_scheduler=...) is given on some ranks only; pass each rank's own on every rank, "
                         "or none")
    if counts[0] is None:
        return []
    if any(count not in (0, held) for per_rank in counts for count, held in zip(per_rank, counts[source])):
        low = [min(per_weight) for per_weight in zip(*counts)]
        high = [max(per_weight) for per_weight in zip(*counts)]
        raise ValueError(f"optimizer holds other state for the {what} on some ranks than on src (state "
                         f"tensors per parameter: between {low} and {high}, src's {list(counts[source])}); a rank "
                         f"whose optimizer has not stepped takes src's state, but src's optimizer must be of the "
                         f"same kind, and have stepped where any rank's has")
    return [index for index, held in enumerate(counts[source]) if held and any(not c[index] for c in counts)]


def _state_entries(optimizer, parameters: list[Tensor], whole: list[int]) -> dict[int, tuple[dict, set]]:
    """Per parameter (by index), the optimizer's state of it that the tensor broadcasts do not copy: the
    values not shaped like it (Adam's step), or, for the indices in `whole`, all of it; with the names of
    the tensors among them that sit on the parameter's device, for `_install_entry` to put on this rank's
    (broadcast_object moves every tensor to the CPU)."""
    entries = {}
    for index, weight in enumerate(parameters):
        broadcast = set() if index in whole else {id(tensor) for tensor in optimizer_state(optimizer, weight)}
        values = {name: value for name, value in optimizer.state.get(weight, {}).items() if id(value) not in broadcast}
        if values:
            entries[index] = (values, {name for name, value in values.items()
                                       if isinstance(value, Tensor) and value.device == weight.device})
    return entries


def _install_entry(optimizer, weight: Tensor, entry: tuple[dict, set]) -> None:
    """Puts a `_state_entries` entry into `weight`'s optimizer state on this rank, each tensor where its
    optimizer keeps it (on the weight's device, or the CPU as Adam's step unless capturable)."""
    values, on_weight_device = entry
    optimizer.state[weight].update({name: value.to(weight.device) if name in on_weight_device else value
                                    for name, value in values.items()})


def _install_settings(param_group: dict, settings: dict) -> None:
    """Puts src's settings of a parameter group (broadcast_object's CPU copies) in `param_group`; a tensor setting
    (a fused or capturable optimizer's tensor learning rate) is copied into the tensor this rank holds, on its
    device."""
    for key, value in settings.items():
        held = param_group.get(key)
        if isinstance(held, Tensor) and isinstance(value, Tensor) and held.shape == value.shape:
            held.copy_(value)
        else:
            param_group[key] = value


@torch.no_grad()
def masks_identical(model: nn.Module, group=None, weights: bool = True) -> bool:
    """True on every rank when every sparse module's mask, and with `weights` the weight values
    under it, are the same on all ranks of `group`.

    Exact: rank 0's masks and masked weights are broadcast and compared entry by entry (NaN
    equals NaN), and the verdicts combined with an all-reduce, so every rank returns the same
    answer; False too when the ranks hold different sparse layers (names or shapes). A check that
    fails on one rank (a sharded model; with `weights`, a layer whose weight is computed at every forward)
    raises on every rank. Pass
    weights=False where ranks train different weights on purpose (SWAMP's particles). Collective:
    call on every rank.
    """
    with Agreement("masks_identical", group) as agreement:
        _checks.flag(weights, "weights")
        refuse_sharded(model, "masks_identical")
        # A computed weight would be computed here (spectral_norm's power iteration, in training mode).
        refusal = computed_weight_refusal(sparse_modules(model), "masks_identical") if weights else None
        if refusal is not None:
            raise ValueError(refusal)
        agreement.shared = _layers(model)
    if any(layers != agreement.gathered[0] for layers in agreement.gathered):
        return False   # no replicas, and their broadcasts below would not pair (see _check_same_setup)
    if not agreement.gathered[0]:
        return True    # no sparse layer on any rank: nothing to compare, nor a device for the verdict
    source = dist.get_global_rank(group, 0) if group is not None else 0
    same = True
    for _, module in sparse_modules(model):
        reference = module.mask.to(torch.uint8)
        dist.broadcast(reference, src=source, group=group)
        same &= torch.equal(reference.bool(), module.mask)
        if weights:
            under = torch.where(module.mask, module.weight.detach(), 0)
            expected = under.clone()
            dist.broadcast(expected, src=source, group=group)
            same &= _equal_or_both_nan(under, expected)
    verdict = torch.tensor([1 if same else 0], dtype=torch.int32, device=_device(model))
    dist.all_reduce(verdict, op=dist.ReduceOp.MIN, group=group)
    return bool(verdict.item())


def check_group(group):
    """`group` (None: the default group, or a torch.distributed ProcessGroup holding this rank) as
    given; TypeError or ValueError otherwise. Checked on this rank alone, before any collective: a
    group that is not one cannot carry the agreement of the others."""
    if group is None:
        return None
    if not dist.is_available() or not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed ProcessGroup or None, got {type(group).__name__}")
    if dist.get_rank(group) < 0:
        raise ValueError("group does not hold this rank: pass each rank a group it belongs to")
    return group


class Agreement:
    """A block of checks that fails on every rank of `group` when it fails on any: a rank that raised
    alone would leave the others waiting in the next collective (a hang), or pairing it with another.

    Before anything changes, each rank runs the block and sets `shared` to what the others must see;
    at its end one all_gather_object carries `shared` and this rank's error, if it raised. The rank
    that raised raises its own error; every other rank raises one of the same kind (TypeError or
    ValueError, subclasses included, which the other ranks may not know; else RuntimeError) naming
    that rank. Otherwise `gathered` holds every rank's `shared`, in rank order. Without a process
    group of several ranks nothing is gathered: an error is this rank's alone, and `gathered` holds
    its own `shared`."""

    # The kinds the other ranks raise for an error of one of them or a subclass (torch's, a library's,
    # which those ranks may not know), the most specific first; RuntimeError for any other error.
    _KINDS = (TypeError, ValueError)

    def __init__(self, who: str, group=None):
        self.who, self.group = who, check_group(group)   # on this rank alone: no other group can carry the verdict
        self.shared = None
        self.gathered: list | None = None

    def __enter__(self) -> "Agreement":
        return self

    def __exit__(self, kind, error, traceback) -> bool:
        if kind is not None and not issubclass(kind, Exception):
            return False   # KeyboardInterrupt, SystemExit: this process is going down, not failing a check
        if not _several_ranks(self.group):
            self.gathered = [self.shared]
            return False
        verdicts = [None] * dist.get_world_size(self.group)
        failure = None if error is None else (self._kind(error), type(error).__name__, str(error))
        dist.all_gather_object(verdicts, (failure, self.shared), group=self.group)
        if error is not None:
            return False   # raises this rank's own error
        for rank, (failed, _) in enumerate(verdicts):
            if failed is not None:
                kind, name, message = failed
                raise kind(
                    f"{self.who} failed on rank {rank} ({name}: {message}); it fails on every rank, and "
                    f"changed nothing on any")
        self.gathered = [shared for _, shared in verdicts]
        return False

    @classmethod
    def _kind(cls, error: Exception) -> type[Exception]:
        """The kind the other ranks raise for `error` (a builtin class: it pickles by name)."""
        return next((kind for kind in cls._KINDS if isinstance(error, kind)), RuntimeError)


class ReplicaCheck(Agreement):
    """The construction of an algorithm that keeps replicas identical by drawing the same numbers on
    every rank (DST, IMP, OptG): it cannot make masks equal that start apart, nor keep them equal when
    its random streams or its settings differ. Run the constructor's checks in the block, and last,
    before anything changes, `compare(model, settings, stream)`. At the block's end, one all_gather_object
    (whatever the backend and device: a CPU model under NCCL, whose collectives take CUDA tensors only,
    included) carries this rank's error, if it raised, its settings, the names of the layers it updates,
    and checksums of the stream and of the masks and weights under them (one pass over the weights, read
    on the host). Every rank then raises if a check failed on any rank, or ValueError if the streams, the
    settings (`check_same_settings`), the layers updated (`check_same_layers_updated`: some frozen on some
    ranks only), or the masks or weights under them, differ across ranks. Ranks holding different sparse layers
    (pipeline stages) are no replicas, and neither their settings nor their masks are compared. A no-op
    unless `group` (None: the default group) is initialised and holds two or more ranks."""

    def compare(self, model: nn.Module, settings: dict, stream: Tensor | None = None, what: str = "",
                updated: list[str] | None = None) -> None:
        """Shares what the replicas must agree on: `model`'s sparse layers, their masks and weights
        under them, the algorithm's `settings` (picklable values by name), `stream` (a random
        generator's state, described by `what`), if any, and the names of the layers it `updated`
        (None: every sparse layer), which frozen layers set apart."""
        if _several_ranks(self.group):
            self.what = what
            self.shared = (_layers(model), _masks_checksum(model), None if stream is None else _crc32(stream),
                           settings, updated)

    def __exit__(self, kind, error, traceback) -> bool:
        super().__exit__(kind, error, traceback)
        if kind is not None or not _several_ranks(self.group):
            return False
        layers, masks, streams, settings, updated = zip(*self.gathered)
        differing = [rank for rank, stream in enumerate(streams) if stream != streams[0]]
        if differing:
            raise ValueError(f"{self.what} differs across ranks (ranks {differing} differ from rank 0): random "
                             f"criteria would draw different masks on each rank and the replicas would "
                             f"diverge; use the same seed (or generator state) on every rank")
        if any(other != layers[0] for other in layers):
            return False
        check_same_settings(self.who, settings)
        check_same_layers_updated(self.who, updated)
        differing = [rank for rank, checksum in enumerate(masks) if checksum != masks[0]]
        if differing:
            raise ValueError(f"{self.who}: the masks of model, or the weights under them, differ across ranks "
                             f"(ranks {differing} from rank 0's), and the replicas would train apart (sparsify "
                             f"drew them from a generator seeded differently per rank, or ran after "
                             f"DistributedDataParallel had copied rank 0's weights); sparsify with the same "
                             f"generator on every rank, or call sparsekern.distributed.broadcast_masks(model) "
                             f"first")
        return False


def check_same_settings(who: str, settings: list[dict]) -> None:
    """ValueError naming every setting whose value differs across the ranks' `settings` (gathered, in rank
    order), with the ranks holding each value; a setting some ranks lack (one that only their criterion
    reads, say) shows as "unset" there. Every rank reads the same gathered settings and raises the same error.
    Ranks built with other settings would train on silently with masks that diverge at the first update,
    or enter their collectives at other steps, where they pair wrongly or hang."""
    differing = differing_values(settings)
    if differing:
        raise ValueError(f"{who} was built with other settings on some ranks ({'; '.join(differing)}), under which "
                         f"the ranks would not train one run (masks that diverge at the first update, or "
                         f"collectives that pair wrongly); build it with the same arguments on every rank")


def agreed_run_arguments(algorithm, train_fn, cycles, density) -> tuple[int, float | None]:
    """(cycles, density) of `algorithm.run(train_fn, cycles, density=density)`, IMP's or SWAMP's, checked on every
    rank of its group in one Agreement, and refused alike on every rank where they differ across ranks."""
    who = f"{type(algorithm).__name__}.run()"
    with Agreement(who, algorithm.group) as agreement:
        _tickets.check_callable(train_fn, "train_fn", type(algorithm).__name__.lower())
        cycles = _checks.count(cycles, "cycles", 1)
        density = _tickets.check_run_density(density, cycles, algorithm._groups, algorithm.prune_fraction,
                                             algorithm.scope, algorithm.cycle)
        agreement.shared = {"cycles": cycles, "density": density}
    check_same_arguments(who, agreement.gathered)
    return cycles, density


def check_same_arguments(who: str, arguments: list[dict]) -> None:
    """ValueError naming every argument of the call `who` whose value differs across the ranks' `arguments` (gathered
    by an `Agreement`, in rank order), with the ranks holding each value, raised alike on every rank before the call
    changes anything: called with others on each rank, a call that prunes (IMP.next_cycle's density) would draw the
    replicas' masks apart, silently until `masks_identical` looked."""
    differing = differing_values(arguments)
    if differing:
        raise ValueError(f"{who} was called with other arguments on some ranks ({'; '.join(differing)}), under which "
                         f"the replicas' masks would diverge: call it with the same arguments on every rank; nothing "
                         f"changed on any")


def differing_values(held: list[dict]) -> list[str]:
    """"name: 'a' on rank 0, 'b' on rank 1" for each name whose value differs across the ranks' dicts `held` (gathered,
    in rank order), in order of first appearance; a name some ranks lack shows as "unset" there."""
    differing = []
    for name in dict.fromkeys(name for on_rank in held for name in on_rank):
        values = [on_rank.get(name, _UNSET) for on_rank in held]
        if any(value != values[0] for value in values):
            differing.append(f"{name}: {_ranks_by_value(values)}")
    return differing


def check_same_layers_updated(who: str, updated: list[list[str] | None]) -> None:
    """ValueError naming each layer that the algorithm updates on some ranks and leaves alone on others (frozen:
    its weight does not require grad, or, under DST, is not in the optimizer), by the names of the layers each rank
    updates (gathered, in rank order; None: every layer, alike on every rank). The masks of such a layer would
    diverge at its first update, and every rank reads the same gathered names and raises the same error."""
    if all(names == updated[0] for names in updated):
        return
    differing = []
    for name in dict.fromkeys(name for names in updated for name in names or ()):
        held = [names is None or name in names for names in updated]
        if not all(held):
            differing.append(f"{name!r} updated on {_rank_list([r for r, h in enumerate(held) if h])}, left alone "
                             f"on {_rank_list([r for r, h in enumerate(held) if not h])}")
    raise ValueError(f"{who} updates other sparse layers on some ranks ({'; '.join(differing)}): a layer frozen on "
                     f"some ranks only (its weight does not require grad there, or is not in DST's optimizer) would "
                     f"have masks that diverge at its first update; freeze the same layers on every rank")


class _Unset:
    """A setting that a rank's algorithm does not hold (its repr names it so in check_same_settings' error)."""

    def __repr__(self) -> str:
        return "unset"


_UNSET = _Unset()


def _ranks_by_value(values: list) -> str:
    """"'a' on ranks [0, 2], 'b' on rank 1": the ranks holding each of `values` (one per rank), in order of the first
    rank holding it."""
    distinct: list = []
    for value in values:
        if all(value != seen for seen in distinct):
            distinct.append(value)
    return ", ".join(f"{value!r} on {_rank_list([rank for rank, held in enumerate(values) if held == value])}"
                     for value in distinct)


def _rank_list(ranks: list[int]) -> str:
    """"rank 1" or "ranks [0, 2]"."""
    return f"ranks {ranks}" if len(ranks) > 1 else f"rank {ranks[0]}"


class CatchesUp(Joinable):
    """The torch.distributed.algorithms.Joinable that DST, IMP and OptG are (see `join_hook`). A subclass sets
    `_catch_up_optimizer` to the optimizer whose state of the sparse weights the catching up copies, where its
    own state does not carry it (DST's; IMP's state holds its whole optimizer), and `_holds_its_optimizer`
    False where the optimizer training the model is not its own (OptG's: Join's keyword `optimizer` names it)."""

    _catch_up_optimizer: torch.optim.Optimizer | None = None
    _holds_its_optimizer = True

    def __init__(self, model: nn.Module, group):
        super().__init__()
        self._replicas, self.group = model, group

    def join_hook(self, optimizer: torch.optim.Optimizer | None = None, lr_scheduler=None, **kwargs) -> JoinHook:
        """For training on uneven inputs under `torch.distributed.algorithms.Join([ddp, algorithm])`, the model
        first (its forward tells Join that this rank still has inputs; step() refuses, with RuntimeError, to be
        the first). A rank that runs out of inputs stops calling step() while the others go on. The algorithm
        makes no collective of its own in step(), so there is nothing to shadow meanwhile, but that rank's counts
        fall behind, and with them what they schedule: DST's mask updates and random stream, IMP's rewind point
        and cycle, OptG's scores. When every rank has joined, every rank takes the algorithm's state, and the
        masks and weights of the sparse layers, of the last rank to join (the highest, as DDP picks), as
        `broadcast_masks` copies them, and the whole state of DST's optimizer (every parameter's, and its
        parameter groups' settings: DDP's hook copies the parameters, but no optimizer state). IMP's state holds
        its optimizer's: the catching up makes `imp.optimizer` a new one, as next_cycle() does. OptG's weights
        are trained by an optimizer it does not hold: name it with Join's keyword `optimizer`
        (`Join([ddp, optg], optimizer=optimizer)`; Join hands its keywords to every joinable, and DDP's hook
        ignores this one) and its whole state is copied too. Without it that state stays each rank's own, as DDP
        leaves every parameter's, and momentum moves the weights of a rank that joined early apart from the
        others'. DST and IMP hold their optimizers: one named to them must
        be theirs (ValueError otherwise, on every rank, as Join starts). A rank that had no inputs at all, whose
        optimizer holds no state yet, takes the last joiner's (broadcast_masks). A learning-rate scheduler of that
        optimizer stepped per batch counts this rank's own batches, and would set other rates than the last
        joiner's from its next step: name it with Join's keyword `lr_scheduler` (`Join([ddp, dst],
        lr_scheduler=scheduler)`), and its state is copied too (TypeError for one that is no
        torch.optim.lr_scheduler.LRScheduler, ValueError for one of another optimizer, or under IMP, whose
        catching up makes a new optimizer). Join calls this as it starts, on every rank, and the ranks check
        these keywords together before any collective: one refused on some ranks, or an optimizer or
        lr_scheduler named on some ranks only, raises on every rank (TypeError or ValueError), rather than leave
        the others waiting in the model's first collective."""
        with Agreement(f"Join([..., {type(self).__name__}])", self.group) as agreement:
            if self._holds_its_optimizer:
                if optimizer is not None and optimizer is not self.optimizer:
                    raise ValueError(f"Join(optimizer=...) names another optimizer than the {type(self).__name__}'s "
                                     f"own, whose state its catching up copies; leave it out, or name "
                                     f"{type(self).__name__.lower()}.optimizer")
                optimizer = None
            check_optimizer(optimizer, "train the model with another optimizer")
            self._check_scheduler(lr_scheduler, self._catch_up_optimizer if optimizer is None else optimizer)
            agreement.shared = (optimizer is not None, lr_scheduler is not None)
        if len(set(agreement.gathered)) > 1:
            given = [name for name, index in (("optimizer", 0), ("lr_scheduler", 1))
                     if len({named[index] for named in agreement.gathered}) > 1]
            raise ValueError(f"Join({'=..., '.join(given)}=...) is given on some ranks only; pass each rank's own on "
                             f"every rank, or none")
        return _CatchUpHook(self, optimizer, lr_scheduler)

    def _check_scheduler(self, lr_scheduler, optimizer: torch.optim.Optimizer | None) -> None:
        """TypeError/ValueError naming `lr_scheduler` unless it is None or schedules `optimizer`, whose state the
        catching up copies."""
        if lr_scheduler is None:
            return
        if not isinstance(lr_scheduler, torch.optim.lr_scheduler.LRScheduler):
            raise TypeError(f"lr_scheduler must be a torch.optim.lr_scheduler.LRScheduler or None, got "
                            f"{type(lr_scheduler).__name__}")
        if optimizer is None:
            raise ValueError(f"lr_scheduler: the {type(self).__name__}'s catching up makes a new optimizer, which no "
                             f"scheduler built before can follow" if self._holds_its_optimizer else
                             f"lr_scheduler needs Join's keyword optimizer, the one it schedules")
        if lr_scheduler.optimizer is not optimizer:
            raise ValueError(f"lr_scheduler schedules another optimizer than the one whose state the catching up "
                             f"copies (the {type(self).__name__}'s own, or Join's keyword optimizer)")

    @property
    def join_device(self) -> torch.device:
        return _device(self._replicas)

    @property
    def join_process_group(self):
        return self.group if self.group is not None else dist.group.WORLD

    def _refuse_leading_join(self) -> None:
        """RuntimeError, at step(), when this algorithm is the first joinable of a Join: the first one must
        tell Join that this rank has inputs before the model's collectives, and step() comes after them.

        Join.notify_join_context is torch's public word on it: it returns a work handle exactly for the first
        joinable of an enabled Join (None otherwise, at no cost), after starting the all-reduce by which that
        one tells Join. Every rank still training reaches it at the same step() and raises, so that all-reduce
        pairs up across them, and it is waited for: no collective is left in flight."""
        notified = Join.notify_join_context(self)
        if notified is not None:
            notified.wait()
            raise RuntimeError(f"{type(self).__name__} is the first joinable of a torch.distributed.algorithms."
                               f"Join: list the DistributedDataParallel model first, Join([ddp, algorithm])")

    def _refuse_no_sync(self) -> None:
        """RuntimeError, at step(), inside the DistributedDataParallel model's `no_sync()`: the gradients there are
        this rank's own, not yet averaged, and DST's mask update or OptG's scores read from them would differ on
        every rank, silently (masks_identical finds it later). Every rank is inside no_sync at the same step, so
        every rank raises alike, with no collective; nothing has changed."""
        # torch.compile(ddp) wraps the DDP model as its submodule (looked up directly: step() runs this each time,
        # and a getattr would build and drop nn.Module's AttributeError on every other model).
        replicas = self._replicas._modules.get("_orig_mod", self._replicas)
        if isinstance(replicas, DistributedDataParallel) and not replicas.require_backward_grad_sync:
            raise RuntimeError(f"{type(self).__name__}.step() inside DistributedDataParallel.no_sync(): the "
                               f"gradients are this rank's own, not averaged, and the replicas' masks would "
                               f"diverge; accumulate under no_sync, then call step() once, after the backward "
                               f"outside it")

    def _catch_up(self, is_last_joiner: bool, optimizer: torch.optim.Optimizer | None, lr_scheduler=None) -> None:
        """Join's post-hook, on every rank: adopts what the highest rank among the last to join holds: the
        algorithm's state, the masks and weights of the sparse layers, and the whole state of `optimizer`
        (Join's keyword; else the algorithm's own, if any). Whole: DDP's own hook copies every parameter but
        no optimizer state, and the momentum of a bias that a rank joining early kept would move that bias
        apart from the others' for good (the averaged gradients that follow are the same on every rank)."""
        candidate = torch.tensor([dist.get_rank() if is_last_joiner else -1], device=self.join_device)
        dist.all_reduce(candidate, op=dist.ReduceOp.MAX, group=self.join_process_group)
        src = int(candidate.item())
        optimizer = self._catch_up_optimizer if optimizer is None else optimizer
        # It checks first that every rank holds a like optimizer (state where src's has some). A
        # ZeroRedundancyOptimizer, a Joinable of its own, is left to itself.
        _broadcast_replica(self._replicas, src, self.group, True, optimizer, self, whole_optimizer=True,
                           lr_scheduler=lr_scheduler)


class _CatchUpHook(JoinHook):
    def __init__(self, algorithm: CatchesUp, optimizer: torch.optim.Optimizer | None, lr_scheduler):
        self.algorithm, self.optimizer, self.lr_scheduler = algorithm, optimizer, lr_scheduler

    def post_hook(self, is_last_joiner: bool) -> None:
        self.algorithm._catch_up(is_last_joiner, self.optimizer, self.lr_scheduler)


@torch.no_grad()
def _masks_checksum(model: nn.Module) -> int:
    """crc32 of every sparse module's mask and weights under it, as masks_identical compares them:
    -0.0 as 0.0 and every NaN as one (x + 0.0 gives +0.0 for -0.0; the fill gives one NaN pattern)."""
    checksum = 0
    for _, module in sparse_modules(model):
        under = torch.where(module.mask, module.weight.detach(), 0) + 0.0
        under = under.masked_fill(under.isnan(), float("nan"))
        checksum = _crc32(under, _crc32(module.mask, checksum))
    return checksum


def _crc32(tensor: Tensor, start: int = 0) -> int:
    """zlib.crc32 of a tensor's bytes, continuing from `start`."""
    return zlib.crc32(tensor.cpu().contiguous().view(torch.uint8).numpy().tobytes(), start)


def _layers(model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """(name, mask shape) of every sparse module: what ranks holding replicas of one model share."""
    return [(name, tuple(module.mask.shape)) for name, module in sparse_modules(model)]


def _several_ranks(group=None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _equal_or_both_nan(a: Tensor, b: Tensor) -> bool:
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


def _device(model: nn.Module) -> torch.device:
    modules = sparse_modules(model)
    return modules[0][1].mask.device if modules else torch.device("cpu")
