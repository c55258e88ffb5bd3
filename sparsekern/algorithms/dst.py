"""Dynamic sparse training: SET, RigL, MEST and the pruning criteria of "Fantastic Weights".

Every `update_every` steps until `end_step`, each sparse layer (or, with scope="global", all of
them together) drops n = round(r(t) · active) active weights (its floor with swap_rounding="floor", its ceiling
with "ceil") by a pruning criterion and grows n by a growth criterion
(`sparsekern.algorithms.criteria`, `sparsekern.algorithms.schedules`); the active count is unchanged.
Usage, once per training step:

    loss.backward()
    algo.step()          # after backward, before the optimizer step
    optimizer.step()

Masking path. The sparse modules mask the weight gradient inside their op, so on steps that do
not update masks inactive weights get gradient 0 and, with their optimizer state at 0, stay
exactly 0 under SGD (momentum, weight decay) and Adam/AdamW; `step()` then only counts. Dense
gradients are produced only for update steps: at the end of the step before one, `dense_grad` is
set on every sparse module and cleared at the update. A gradient criterion reads them; with any
criteria, the update masks them by the new masks, so the optimizer step that follows gives grown
weights their first step (the default order: update and optimizer step both, on an update
step). No gradient buffer is kept between steps.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
import zlib
from collections import OrderedDict
from typing import Callable

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .. import ops
from ..ops import _checks, _transforms, reference
from . import _tickets, criteria, distributed, schedules
from ._gradients import GradientWatch, finite_sums, zero_everywhere
from ._stack import user_stacklevel
from ..nn import sparse_modules, tying
from ..nn.modules import computed_weight_refusal
from ..nn.optimizer_state import (check_optimizer, check_state_writable, fill_fresh, fresh_state, optimizer_state,
                                  reset_state_off_mask)
from ..nn.sharding import refuse_sharded

SCOPES = ("layer", "global")
# How n = r · active becomes a whole count: Python's round (halves to even), or floor as RigL's code.
SWAP_ROUNDINGS = ("round", "floor", "ceil")
_HEAD = 4096   # entries of a mask that _warn_if_emptied reads first
# The entries of a DST's state (`DST.state_dict`): those every state holds, those that earlier versions' lack
# ("finished"; "algorithm" and the settings were added together), and the settings (`DST._settings`, which reads
# the next two tables): those of every DST, a criterion parameter under the pruning criteria that read it alone,
# and the flags of a user's `sparsekern.Criterion`; `_SETTINGS`, every one of them, is made of the same tables.
_REQUIRED_ENTRIES = ("step_count", "masks", "schedule", "generator")
_OPTIONAL_ENTRIES = ("algorithm", "finished")
_COMMON_SETTINGS = ("prune", "grow", "scope", "block", "reset_state", "swap_rounding")
_PARAMETER_READERS = {"mest_gamma": ("mest",), "sensitivity_offset": ("sensitivity", "rsensitivity"),
                      "snip_shift": ("snip",)}
_SETTINGS = (*_COMMON_SETTINGS, *_PARAMETER_READERS,
             *(f"{argument}_{flag}" for argument in ("prune", "grow") for flag in criteria.Criterion.FLAGS))


# NoUpdateWarning, ArgumentWarning and as_argument carry no underscore: the CLI (cli/recipes.py) rewords DST's
# warnings through them, so they are names other packages may use, not the module's own.
class NoUpdateWarning(UserWarning):
    """The schedule reaches no update step: DST will never change a mask. A category of its own so that the CLI,
    which says it in its option names, finds it by kind rather than by its words."""


class ArgumentWarning(UserWarning):
    """A warning that names some of DST's arguments. Its message is `template` formatted with `details` and, for
    each entry of `arguments` (argument name: value), the argument as `as_argument` says it (`block=(4, 4)`); a
    caller that took the arguments under other names (the CLI's options: `--block 4x4`) words it in its own by
    `worded`, rather than by replacing text of a message that may be reworded."""

    def __init__(self, template: str, arguments: dict, details: dict):
        super().__init__(template, arguments, details)   # in args, so that it pickles and copies whole
        self.template, self.arguments, self.details = template, arguments, details

    def __str__(self) -> str:
        return self.worded(as_argument)

    def worded(self, phrase) -> str:
        """The message with each argument as `phrase(name, value)` says it."""
        return self.template.format(**self.details, **{name: phrase(name, value)
                                                       for name, value in self.arguments.items()})


def as_argument(name: str, value) -> str:
    """An argument as DST's messages give it: `name=value`, a float in its shortest form."""
    return f"{name}={value:g}" if isinstance(value, float) else f"{name}={value!r}"


def _stream_seed(seed: int) -> int:
    """DST's own seed for `seed`: deterministic, and not `seed` itself (see DST's `seed`)."""
    return zlib.crc32(f"sparsekern.DST/{seed}".encode())

class DST(distributed.CatchesUp):
    """Drop-and-grow mask updates on the sparse modules of `model`.

    Args:
        model: holds sparse modules (`sparsekern.sparsify`); their masks and weights are updated
            in place, and must stay on one device.
        optimizer: the torch optimizer of the model's parameters; its per-weight state tensors
            (momentum, Adam moments: every state tensor shaped like the weight) are zeroed at
            inactive positions on update steps, or set to where a fresh state starts for the few that do not
            start at 0 (Rprop's step_size: the lr of the weight's group; Adagrad's sum: its
            initial_accumulator_value), so that a weight grown there starts as a fresh one. Not an LBFGS
            (ValueError): its history, flattened over all parameters, cannot follow a mask update, and its
            closure's backward would recompute the gradients step() masked (dense before an update step).
        prune: pruning criterion, one of `sparsekern.algorithms.criteria.PRUNE` (drop the lowest score):
            "magnitude", "set", "mest", "snip", "sensitivity", "rsensitivity", "random", or "set_fw" and
            "set_fixed", the Fantastic Weights repository's two SET rules, which decide how many weights they drop
            from the swap count n (set_fw about half a layer whatever n; growth grows as many); or a
            `sparsekern.Criterion` of your own, which every option below works with as with the built-in ones
            (`block=` where it is elementwise), and which may decide its own count as those two do
            (`decides_count`). DST's `prune` attribute, and its state, hold the name.
        grow: growth criterion, "gradient" (largest |g| among inactive) or "random"; or a `sparsekern.Criterion` (not
            one that decides its own count: ValueError).
        drop_fraction: α, the schedule's initial fraction (default per schedule: 0.3 cosine and
            constant, 0.5 annealed); a named schedule's option (with a function, ValueError).
        final_drop_fraction: the annealed schedule's final fraction (default 0.005).
        schedule: "cosine" (RigL), "constant" (SET) or "annealed" (Fantastic Weights), or a drop-fraction schedule of
            your own: a function r(step) -> the fraction in [0, 1] of the active weights that the update at that step
            swaps (linear decay, step decay, ...), `step` counting step() calls from 1. It is called at each update step
            made (not one skipped: non-finite gradients, after `finish()`), and at no other, before anything changes: an
            error it raises (RuntimeError), or a value that is no real number (TypeError) or not in [0, 1] (ValueError),
            is raised naming it and the step, and the step is not counted. It must be a pure function of the step, the
            same on every rank of a distributed run (the construction compares its qualified name across ranks).
            `DST.schedule.name` is then "function" (`schedules.FUNCTION`); a state holds the timing, not the function
            (`load_state_dict`).
        update_every: ΔT, steps between mask updates (default per schedule: 100 cosine, constant and a function,
            as RigL; 800 annealed, as the Fantastic Weights code).
        end_step, end_fraction: the end point T_end, no updates from it on (none at T_end itself: RigL's
            code has one there, which its cosine fraction, 0 at T_end, makes swap nothing; see
            `sparsekern.algorithms.schedules`): a step, or a fraction of total_steps (at most one of them;
            default 0.75 for cosine and constant, as RigL's paper runs RigL and SET, 1.0 for annealed and a
            function, whose shape is the whole schedule).
        total_steps: length of training, in `step()` calls.
        scope: "layer" (each layer keeps its count) or "global" (one selection of the drop and one
            of the growth over all layers; layer counts may change, the total stays). Either way one
            `ops.prune_grow` call updates every layer.
        reset_state: zero the optimizer state at newly grown positions (RigL); "zero" here and below means
            reset to the fresh value (see `optimizer`). Dropped positions' state is always zeroed, because
            momentum left there would move an inactive weight off 0; so with SGD and Adam, whose state at an
            inactive weight is then 0, False (the Fantastic Weights code) changes nothing, and it matters only
            for optimizers that keep non-zero state at zero-gradient entries.
        block: None, or (bh, bw): masks are all-or-nothing per bh×bw block of the weight viewed
            as (dim 0, rest): (out, rest), or a transposed convolution's (in, rest) (edge blocks may
            be smaller). Scores are summed per block and whole blocks are dropped and grown,
            n = round(r · active blocks) (or its floor or ceiling, swap_rounding). Masks that are not block
            structured are made so at construction: each layer keeps round(active / (bh·bw))
            blocks, those holding the most active weights (ties to the lower block). Not with
            prune "set", "set_fw" or "set_fixed", whose scores rank weights against each other, nor with a
            `sparsekern.Criterion` that is not elementwise (one deciding its own count never is).
        swap_rounding: how the swap count n = r · active is made whole: "round" (Python's round,
            halves to even: 2.5 -> 2, 3.5 -> 4), "floor", as RigL's code (3.7 -> 3), or "ceil", as the
            Fantastic Weights code (3.2 -> 4; a layer swaps at least one weight at any rate above 0). Applies to every
            count: each layer's (scope="layer"), the total (scope="global"), and blocks (block=).
        mest_gamma: γ of the MEST criterion |θ| + γ|g|. It, sensitivity_offset and snip_shift are at most
            float32's largest number (`criteria.PARAMETER_MAX`), in which the scores are computed; each is read by
            its criterion alone, and ignored (and not saved) under the others.
        sensitivity_offset: what prune="sensitivity" and "rsensitivity" add to their denominators,
            |g| / (|θ| + offset) and |θ| / (|g| + offset): 1e-8 (a guard), or 1.0 as the Fantastic
            Weights code, which ranks differently.
        snip_shift: what prune="snip" adds to its score, |θ·g| + shift: 0, or 1e-5 as the Fantastic Weights
            code, which ranks differently: in float32 it merges scores less than 9e-13 apart (1e-13 and 3e-13
            both become 1e-5), which then rank by position.
        seed, generator: random criteria draw from `generator` (a torch.Generator on the
            weights' device), or from a new one whose stream is derived from `seed` (default 0)
            and differs from `torch.Generator().manual_seed(seed)`'s, the generator a user most
            likely gave `sparsify`: growing from the stream that drew the masks would score the
            active positions highest and regrow exactly what was dropped. Equal seeds give equal
            masks, on every backend (the random criteria draw one float32 score per entry of each updated layer,
            whatever its dtype and mask, in model order, before the backend selects), on every rank of a
            distributed run too, but not across device types (CPU and CUDA generators draw other streams); a
            layer frozen, added or moved earlier changes the draws of the layers after it; under an initialised
            torch.distributed process group the construction is collective and refuses (ValueError on every rank)
            a seed or generator state that differs across ranks, which would let replicas diverge,
            masks (or weights under them) that already differ across ranks (see
            `sparsekern.distributed.broadcast_masks`), and settings that differ across ranks, under which
            the masks would diverge at the first update: prune, grow (a `sparsekern.Criterion` by its
            name), scope, block, reset_state, swap_rounding, mest_gamma, sensitivity_offset and snip_shift
            (where the criterion reads them), schedule (a function by its qualified name: "schedule_function"),
            drop_fraction, final_drop_fraction, update_every, end_step and host_checks (total_steps, which only
            times a warning, may differ), with one ValueError
            naming each and the ranks holding each value, and ranks that update other layers (a layer
            frozen on some ranks only: "Which layers"); an argument refused on one rank only is
            refused on every rank (the others' error names that rank), so that none waits for it.
            A model sharded across ranks (FSDP, fully_shard) raises ValueError: use
            DistributedDataParallel. For uneven inputs, see `join_hook`.
        group: the torch.distributed process group whose ranks hold replicas of `model` (None: the
            default group): the ranks the checks above compare. Independent runs on each rank of one
            job (no DDP, seeds or masks differing on purpose) give each rank a group of its own,
            `torch.distributed.new_subgroups(1)[0]`, which compares nothing.
        host_checks: the two checks of an update step that read the device: skip the update when
            the gradients are not all finite (as torch.amp.GradScaler skips its step), and warn
            when a global update empties a layer; one device-to-host read each (and, under a criterion
            that reads the gradient, one more where a layer's gradient sums to 0, to tell whether it
            has none: below). False trusts the gradients, leaves the warning out and finds the layers
            without a gradient on the device (the same masks, at the cost of a pass over every layer's
            gradient and scores), so that an update on a GPU never waits for the device and can be
            captured in a CUDA graph (but under prune "set", "set_fw" or "set_fixed", whose selections by
            sign read counts from the device whatever host_checks, nor under a `sparsekern.Criterion` deciding its
            own count, whose counts are read so, its scores checked in the same read). A captured update replays the
            swap counts it was captured with (they are kernel parameters): capture again when they change, at
            every update of a schedule whose drop fraction moves (cosine, annealed, most functions).
            Neither setting reads the masks' active counts at an update: DST keeps them from one update to the next,
            and counts again where a mask was written (`set_mask`, `load_state_dict`, any in-place op on it: its
            version counter tells; `mask.data = other`). A write through `mask.data` (`mask.data.copy_(...)`,
            `mask.data[...] = ...`) or a NumPy view of the mask leaves the counter, and so the kept count, as it
            was. The CPU kernels check the count they are given: the update is then made from a fresh count, with
            a warning naming the layer. The GPU kernels (CUDA, Triton) trust it: the update swaps as many entries as
            the stale count makes n (more than a layer holds leaves the counts unspecified). Change masks with
            `set_mask`.

    Which layers: every sparse module whose weight requires grad and is trained by `optimizer`;
    frozen ones are left alone, with a warning. One frozen after construction is left alone while it
    stays frozen, under every criterion (warned once; its gradient is masked at the updates it sits
    out), and updated again once unfrozen. Under torch.distributed every rank must freeze the same
    layers: the construction refuses ranks that do not, and `broadcast_masks(algorithm=)` ranks that
    froze other layers since; `step()` cannot tell (it makes no collective, and one per step to
    compare would cost every step), so masks diverge from the next update of a layer frozen on some
    ranks only (`masks_identical` finds it). Modules that share one weight (tied weights) are one layer:
    the first in model order is updated and the others get its mask. Misconfigurations
    that would silently do nothing or damage the model raise ValueError before anything changes
    (a block holding more weights than a layer keeps, tied modules with different masks) or warn
    (a block that does not tile a layer, so that its count can drift; a schedule under which no
    update ever happens; a layer without active weights).

    Layers without a gradient: where a criterion reads the gradient (grow="gradient"; prune "mest",
    "snip", "sensitivity", "rsensitivity"; a Criterion with reads_gradient=True), a layer whose weight has none
    at an update step keeps its mask at that update (nothing dropped, nothing grown; its weights and optimizer
    state as they were), while the others update as usual. No backward of the step reached it: an expert no
    token was routed to, a block that stochastic depth dropped, a branch not taken. Its gradient is then None after
    `zero_grad(set_to_none=True)` and 0 everywhere after `zero_grad(set_to_none=False)`; both count as
    none, so the two settings give the same masks. The criterion has nothing to rank such a layer by:
    gradient growth would grow by position, SNIP's and Sensitivity's scores would all tie, MEST's and
    RSensitivity's fall back to magnitude. The gradient-free criteria (prune "magnitude", "set" or
    "random" with grow="random": SET) need no gradient and update it as usual. In global scope its
    entries still take part in the drop selection and whatever it loses grows straight back, so the
    other layers swap up to that many fewer weights at that update; the total stays exact. Under DDP
    the averaged gradient decides, the same on every rank: a layer used on some ranks only
    (find_unused_parameters=True) has a gradient on all of them. `step()` returns True for the update
    as a whole, whether or not some layers kept their masks.

    `step()` refuses (ValueError, nothing changed) an update step at which a layer's gradient cannot be masked in
    place (an expanded view, an inference tensor: `sparsekern.ops.mask_in_place`), naming it; construction and
    `load_state_dict` refuse so an optimizer state tensor of a layer's weight that they would zero off its mask.
    It refuses (RuntimeError, nothing changed) an update step at which, under a criterion that
    reads gradients, no parameter of the optimizer has a gradient (step() called before backward); one
    at which a layer is no longer a module of the model (replaced after DST was built, it would never
    get a gradient); and one when a weight's gradient is the very tensor, unwritten since, that the
    previous `step()` saw: a second `step()` in one iteration, or one without a fresh backward, would
    update by a stale, masked gradient (and, growing by gradient, regrow exactly what it dropped). It
    warns once when called more than `total_steps` times, and when a global update leaves a layer
    without active weights.

    Calling `step()` after `optimizer.step()` instead also works: the optimizer step then sees the
    dense gradient of an update step and may move inactive weights, and the update that follows
    zeroes them again (and their optimizer state) off the new mask.
    RigL's code applies a mask update *instead of* the optimizer step: for that order, skip
    `optimizer.step()` when `step()` returns True (the weights then stay as the update left them, grown
    ones at 0, until the next step).

    n = round(r · active) (Python's round; floor or ceil with swap_rounding) is not capped by the inactive count: a
    layer denser than 1/(1 + r) drops more than it has inactive entries and grows some just-dropped ones back, as
    RigL does; an update never changes the active count (prune "set_fw" and "set_fixed", and a `sparsekern.Criterion`
    with decides_count=True, drop as many as their rule decides, given n, and as many grow). Step t counts `step()`
    calls from 1; updates happen at multiples of update_every below end_step. Newly grown weights start at 0 (their
    optimizer state too, with reset_state); a just-dropped weight may be grown again and then keeps its value and
    optimizer state, as in RigL's code. Ties keep, and grow, the lower flat position (row-major, in layer order under
    scope="global"). After an update the gradients are masked by the new masks, so the optimizer step that follows
    sees masked gradients (grown weights get theirs, under every growth criterion: the backward before an update step
    is dense).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *,
                 prune: str | criteria.Criterion = "magnitude", grow: str | criteria.Criterion = "gradient",
                 drop_fraction: float | None = None,
                 final_drop_fraction: float | None = None, schedule: str | Callable[[int], float] = "cosine",
                 update_every: int | None = None, end_step: int | None = None, end_fraction: float | None = None,
                 total_steps: int,
                 scope: str = "layer", reset_state: bool = True, block: tuple[int, int] | None = None,
                 swap_rounding: str = "round", mest_gamma: float = 1.0,
                 sensitivity_offset: float = criteria.EPSILON, snip_shift: float = 0.0, seed: int = 0,
                 generator: torch.Generator | None = None,
                 host_checks: bool = True, group=None):
        # Collective: a check that fails on one rank fails on every rank (one raising alone would leave the
        # others waiting in the replica check), and nothing changes before the block ends.
        with distributed.ReplicaCheck("DST", group) as replicas:
            if not isinstance(model, nn.Module):
                raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
            if not isinstance(optimizer, torch.optim.Optimizer):
                raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
            check_optimizer(optimizer, "DST changes masks as it trains: use another optimizer")
            self._prune = criteria.lookup(prune, criteria.PRUNE, "prune")   # criteria.Criterion objects
            self._grow = criteria.lookup(grow, criteria.GROW, "grow")
            self.schedule = schedules.make(schedule, total_steps, update_every=update_every, end_step=end_step,
                                           end_fraction=end_fraction, drop_fraction=drop_fraction,
                                           final_drop_fraction=final_drop_fraction)
            scope = _checks.choice(scope, "scope", SCOPES)
            swap_rounding = _checks.choice(swap_rounding, "swap_rounding", SWAP_ROUNDINGS)
            _checks.flag(reset_state, "reset_state")
            _checks.flag(host_checks, "host_checks")
            block = _check_block(block)
            if self._grow.decides_count:   # what it drops is the pruning criterion's to say
                raise ValueError(f"grow={self._grow.name!r} decides its own drop count (decides_count=True): only "
                                 f"a pruning criterion can")
            for argument, criterion in (("prune", self._prune), ("grow", self._grow)):
                if block is not None and not criterion.elementwise:
                    raise ValueError(f"block needs elementwise criteria, got {argument}={criterion.name!r}")
            mest_gamma = criteria.check_parameter(mest_gamma, "mest_gamma")
            sensitivity_offset = criteria.check_parameter(sensitivity_offset, "sensitivity_offset", positive=True)
            snip_shift = criteria.check_parameter(snip_shift, "snip_shift")
            self.modules, self._groups = _trained_layers(model, optimizer)
            # No random stream can live on the meta device, nor any value be ranked; a real weight assigned to a
            # layer built there leaves its mask behind.
            _tickets.check_layers_usable(self._groups, "DST")
            device = self.modules[0][1].weight.device
            for name, module in self.modules:
                if module.weight.device != device:
                    raise ValueError(f"sparse modules must share one device: {name} is on "
                                     f"{module.weight.device}, {self.modules[0][0]} on {device}")
            if generator is None:  # else the seed is not used
                seed = _checks.integer(seed, "seed")
            stream = "the generator's state" if generator is not None else f"seed={seed!r}"
            if generator is None:
                generator = torch.Generator(device=device).manual_seed(_stream_seed(seed))
            elif not isinstance(generator, torch.Generator):
                raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
            elif generator.device.type != device.type:
                raise ValueError(f"generator is on {generator.device} but the weights are on {device}")
            # Every layer's active weights, for the checks and warnings below: one host read (a sync on a GPU).
            active = reference.active_counts([module.mask for _, module in self.modules])
            if block is not None:
                _check_blocks(self.modules, active, block)
            for name, module in self.modules:   # zeroed off the masks below, after block= has set them
                check_state_writable(optimizer, module.weight, module.mask, name)
            empty = [name for (name, _), count in zip(self.modules, active) if not count]
            _warn_if_idle(self.schedule, empty, scope)
            _warn_if_nothing_swaps(self.schedule, self.modules, active, scope, block, swap_rounding)
            self.prune, self.grow, self.scope = self._prune.name, self._grow.name, scope
            self.reset_state, self.block, self.mest_gamma = reset_state, block, mest_gamma
            self.sensitivity_offset, self.snip_shift = sensitivity_offset, snip_shift
            self.swap_rounding = swap_rounding
            self.host_checks = host_checks
            replicas.compare(model, self._replica_settings(), generator.get_state(), f"DST's random stream ({stream})",
                             updated=self._layers_updated())

        super().__init__(model, replicas.group)   # for Join's catching up (join_hook)
        self.optimizer = optimizer
        self.generator = generator
        self.step_count = 0
        self._finished = False   # finish() was called: the next step() follows a masked backward
        self._reads_gradient = self._prune.reads_gradient or self._grow.reads_gradient
        self._gradients = GradientWatch()
        self._empty = set(empty)   # warned about
        self._frozen_warned: set[str] = set()   # layers frozen after construction, warned about
        # register_update_hook's, by their handles' ids (an OrderedDict: a handle holds a weak reference to it)
        self._update_hooks: OrderedDict[int, Callable] = OrderedDict()
        units = active if block is None else self._make_block_structured(active)
        # (the masks' `_versions`, active counts per layer) as of the last update or count (_active_counts).
        # Construction's count (of blocks, once they are whole) serves the first update if no mask changes
        # before it: a count is a host read, a sync on a GPU.
        self._remember_counts([module.mask for _, module in self.modules], units)
        # State left at inactive positions (say, from dense training before sparsify) would move
        # inactive weights off 0.
        with torch.no_grad():
            for _, module in self.modules:
                reset_state_off_mask(optimizer, module.weight, module.mask)
        self._sync_modules()
        self._remember_gradients()

    def step(self) -> bool:
        """Counts one training step; on update steps updates the masks. Returns whether it did.

        Call after backward and before optimizer.step(), once per optimizer step: under DDP, after the
        backward outside no_sync() (inside it, RuntimeError: the gradients are not averaged yet). On steps
        that neither update nor precede an update it only counts. An update step whose gradients (of any
        parameter the optimizer holds) are not all finite is skipped, as torch.amp.GradScaler skips its optimizer step:
        the masks wait for the next update step. A schedule function of one's own is called at each update step made,
        before anything changes: what it raises, or a fraction that it gives outside [0, 1], is raised naming it and
        the step, which is not counted. A layer without a gradient keeps its mask under a
        criterion that reads the gradient (see the class). With a GradScaler, call
        scaler.unscale_(optimizer) before step(): the gradients are scaled
        until then, which changes no ranking by |g| but makes MEST's |θ| + γ|g| rank by the scaled
        gradient.
        Clip gradients after step(), not before: on an update step they are dense (where a criterion
        reads them) until step() masks them, so a norm taken earlier counts the inactive entries too,
        and clipping by it shrinks the active weights' update on update steps only (by 20-25% in a
        small MLP at density 0.1).
        """
        _transforms.refuse_vmap(f"{type(self).__name__}.step()", "a mask update selects over the whole model",
                                "call it outside vmap, once per training step")
        self._refuse_leading_join()
        self._refuse_no_sync()
        _tickets.refuse_count_end(self.step_count, "step_count", "DST")
        # Every step: a weight computed since (a parametrization registered) would not have its gradient masked.
        _tickets.check_own_weights(self._groups, "DST")
        due = self.schedule.is_update(self.step_count + 1)
        if due and not self._finished:   # after finish() no update can come of them
            self._check_gradients(self.step_count + 1)
        if due:   # an update, or a skipped one, masks them
            self._check_gradients_writable()
        # After finish(), the backward ran with masked gradients, from which no update can be made.
        sums = self._gradient_sums() if due and not self._finished and self.host_checks else None
        updated = due and not self._finished and (not self.host_checks or sums is not None)
        # Before anything changes: a schedule function of the user's own may raise, or give no fraction in [0, 1].
        fraction = self.schedule.fraction(self.step_count + 1) if updated else None
        self.step_count += 1
        if self.step_count == self.schedule.total_steps + 1:
            warnings.warn(f"DST.step() called more than total_steps={self.schedule.total_steps} times: the "
                          f"schedule (and end_step={self.schedule.end_step}) assumed training ends there",
                          stacklevel=user_stacklevel())
        self._finished = False
        if updated:
            try:
                changes = self._update(fraction, sums)
            except Exception:
                # An update that raised changed nothing (a user's criterion's scores, like prune_grow's arguments,
                # are checked before anything is written): the step does not count, and step() may be called again.
                self.step_count -= 1
                raise
            if self.scope == "global" and self.host_checks:
                self._warn_if_emptied()
        elif due:
            self._mask_gradients()
        if due or self.schedule.is_update(self.step_count + 1):
            self._sync_modules()
            self._remember_gradients()
        if updated:   # last: a hook that raises leaves the step complete
            for hook in list(self._update_hooks.values()):
                hook(self, changes)
        return updated

    def finish(self) -> None:
        """Ends mask updates before the schedule does: call it before training on without step()
        (fine-tuning the masks reached so far, say). The layers keep their masks, the gradients they
        hold now are masked, and so are those of their next backwards. Without it, the backward before
        an update step leaves gradients dense for the update, and an optimizer step on them, with no
        step() to mask them, moves inactive weights off 0. A later step() carries on with the schedule
        (its own step cannot update: its gradients were masked). Part of `state_dict()` until that
        step(): a DST loading a state saved after finish(), or given it by
        `sparsekern.distributed.broadcast_masks(algorithm=)`, is finished too, as the replicas of a
        DDP run must all be for their next mask updates to agree.
        """
        for _, module in self.modules:
            module.dense_grad = False
        tying.sync(self._groups)   # a tied module left dense_grad set would add a dense gradient
        self._mask_gradients()
        self._finished = True

    @property
    def _catch_up_optimizer(self) -> torch.optim.Optimizer:
        return self.optimizer   # Join's catching up copies its state of the sparse weights (join_hook)

    @torch.no_grad()
    def _mask_gradients(self) -> None:
        """Masks the gradients as the layers mask them on a step without an update (a select: 0 off the
        mask, inf and NaN included): those of a skipped update were left dense for it, and an
        optimizer step (one without a GradScaler, which would skip it) would move inactive weights."""
        for _, module in self.modules:
            if module.weight.grad is not None:
                ops.mask_in_place(module.weight.grad, module.mask)

    def _gradient_sums(self) -> dict[int, float] | None:
        """The sum of every gradient the optimizer holds, by id of its parameter, or None when one is not
        finite (one host read per device)."""
        held = [parameter for group in self.optimizer.param_groups for parameter in group["params"]
                if parameter.grad is not None]
        sums = finite_sums([parameter.grad for parameter in held])
        return None if sums is None else {id(parameter): total for parameter, total in zip(held, sums)}

    def state_dict(self) -> dict:
        """Step count, masks (by module name), schedule, random-generator state, whether finish()
        was called since the last step() ("finished"), and the settings it updates by: criteria by name (a
        `sparsekern.Criterion`'s with its flags, as "prune_reads_gradient", "prune_elementwise", ...: resume under one
        of that name and flags; with mest_gamma, sensitivity_offset or snip_shift where the criterion reads it),
        scope, block, reset_state and swap_rounding.

        The names are those of the model DST was built on, wrapper prefixes included ("module." under
        DistributedDataParallel, "_orig_mod." under torch.compile): load the state into a DST built on the
        same wrapping, as for the model's own state dict."""
        return {"algorithm": "DST", "step_count": self.step_count,
                "masks": {name: module.mask.clone() for name, module in self.modules},
                "schedule": self.schedule.state(),
                "generator": self.generator.get_state(), "finished": self._finished, **self._settings()}

    def _settings(self) -> dict:
        """The arguments a state is saved with and must be loaded under (`load_state_dict`): those that decide
        what an update does, a criterion's parameter only where the criterion reads it, and a `sparsekern.Criterion`
        of a user's own by its name and flags (`_SETTINGS`)."""
        settings = {key: getattr(self, key) for key in _COMMON_SETTINGS}
        settings.update({key: getattr(self, key) for key, readers in _PARAMETER_READERS.items()
                         if self.prune in readers})
        for argument, criterion in self._users_criteria():
            settings.update({f"{argument}_{flag}": value for flag, value in criterion.flags().items()})
        return settings

    def _users_criteria(self) -> list[tuple[str, criteria.Criterion]]:
        """("prune" or "grow", its criterion) for each criterion of a user's own."""
        return [(argument, criterion) for argument, criterion in (("prune", self._prune), ("grow", self._grow))
                if not criteria.is_built_in(criterion)]

    def _setting_name(self, key: str) -> str:
        """`key`, a setting, as an error names it: a criterion's flag with the criterion."""
        for argument, criterion in self._users_criteria():
            flag = key.removeprefix(f"{argument}_")
            if flag in criterion.flags():
                return f"{argument}={criterion.name!r} of {flag}"
        return key

    def _replica_settings(self) -> dict:
        """The settings the ranks of a DDP run must all build DST with (`distributed.ReplicaCheck`), each deciding
        which weights an update swaps, or whether it happens: those a state is saved with, the schedule's but
        total_steps (which only times a warning), and host_checks (which skips an update whose gradients are not
        all finite)."""
        schedule = self.schedule.state()
        del schedule["total_steps"]
        schedule["schedule"] = schedule.pop("name")
        # A user's criteria and schedule function by their function's name too, which a state cannot keep
        # (`Criterion.score_name`).
        functions = {f"{argument}_score": criterion.score_name() for argument, criterion in self._users_criteria()}
        if self.schedule.function is not None:
            functions["schedule_function"] = _checks.qualified_name(self.schedule.function)
        return {**self._settings(), **functions, **schedule, "host_checks": self.host_checks}

    def load_state_dict(self, state: dict) -> None:
        """Restores a `state_dict()`: step count, masks (weights, and the optimizer's per-weight state,
        are zeroed off them), schedule, generator and, after finish(), finished (a state without
        "finished", saved by earlier versions, loads unfinished). Checked completely before anything
        changes: a bad state raises TypeError or ValueError naming the entry, and the model and this
        DST are as before; so does the state of another algorithm, or of a DST of other settings (criteria and their
        parameter, scope, block, reset_state, swap_rounding), which this one would go on from as though they were
        its own (a state saved before it kept one of them is not checked for it, except one without swap_rounding or
        snip_shift, saved before the option existed, which rounded and did not shift; nor, for a
        `sparsekern.Criterion`, one without its flags); and so does a state holding an entry that a DST of these
        settings does not save (a misspelled or tampered setting, which would go unchecked), naming it. A step count
        past the schedule's total_steps (a run that called step() too often, which step() allows) loads with a
        warning (step() refuses to count past 2**63 - 1, the largest count a state holds), as does a saved schedule
        that differs from the one this DST was built with (which it replaces), a mask with no active weight
        under scope="layer" (the layer stays empty, as construction warns), and masks holding other active weight counts
        than the model's (per layer, or in all under scope="global"; not with block=): the run goes on at the state's
        counts, which its updates keep (a state of another density, or a damaged one: a mask of all True).

        A schedule function of one's own is not saved (no state can hold a function, and no name of one tells it
        apart: lambdas share theirs, and a script's functions move between modules): its state holds the timing
        (update_every, end_step, total_steps) under the name "function". It loads into a DST built with a function,
        which goes on with its own function (build it with the saving run's) and the saved timing (replacing its own,
        with the warning above where they differ); a DST built with a named schedule refuses it (ValueError naming
        state['schedule']), having no way to the saving run's fractions. A named schedule's state loaded into a DST
        built with a function replaces it, as any saved schedule replaces the built one."""
        self._prepare_load(state)()

    def _prepare_load(self, state: dict):
        """Checks `state` completely, warnings included, and returns the function that installs it
        (load_state_dict runs both; broadcast_masks checks on every rank before any rank installs)."""
        _tickets.check_own_weights(self._groups, "DST")
        _tickets.check_masks_writable(self._groups, "DST")   # set_mask writes them at install
        _tickets.check_saved_by(state, "DST")
        # Entries that no DST's state holds first (a misspelled swap_rounding would be taken for one saved before
        # the option existed); then, its settings being this DST's, those that it does not (another criterion's
        # parameter). Every entry that earlier versions saved is saved still: none is accepted as legacy.
        _tickets.check_state_keys(state, _REQUIRED_ENTRIES, _OPTIONAL_ENTRIES + _SETTINGS, "DST")
        # swap_rounding and snip_shift entered the state with their options: a state without them was saved rounding,
        # unshifted. (The other settings were options before the state kept them: a state without one may have been
        # saved under any.)
        settings = self._settings()
        _tickets.check_saved_settings({"swap_rounding": "round", "snip_shift": 0.0, **state}, settings,
                                      {key: self._setting_name(key) for key in settings})
        _tickets.check_state_keys(state, _REQUIRED_ENTRIES, _OPTIONAL_ENTRIES + tuple(self._settings()),
                                  f"a DST of prune={self.prune!r}, grow={self.grow!r}")
        # As IMP, SWAMP and OptG read their counters: an integer of any kind (a NumPy one, a 0-d integer tensor), not
        # a bool or float.
        step_count = _tickets.state_count(state, "step_count")
        masks = state["masks"]
        names = [name for name, _ in self.modules]
        if not isinstance(masks, dict) or sorted(masks, key=str) != sorted(names):
            hint = _tickets.wrapping_hint(list(masks), names, "DST") if isinstance(masks, dict) else ""
            raise ValueError(f"state['masks'] must hold the masks of {names}, got "
                             f"{sorted(masks, key=str) if isinstance(masks, dict) else type(masks).__name__}{hint}")
        staged = []
        for name, module in self.modules:
            mask = masks[name]
            # Not a torch.sparse mask either: set_mask refuses it only once the layers before are set.
            if not _tickets.dense_values(mask) or mask.dtype != torch.bool or mask.shape != module.mask.shape:
                raise ValueError(f"state['masks'][{name!r}] must be a dense bool tensor of shape "
                                 f"{tuple(module.mask.shape)} holding values")
            mask = mask.to(module.mask.device, copy=True)
            check_state_writable(self.optimizer, module.weight, module.mask, name)   # zeroed off the mask at install
            if self.block is not None and not _Blocks(module.weight.shape, self.block).is_whole(mask):
                raise ValueError(f"state['masks'][{name!r}] is not made of whole {self.block} blocks")
            staged.append((module, mask))
        schedule = _schedule_from_state(state["schedule"], self.schedule)
        generator_state = state["generator"]
        if not isinstance(generator_state, Tensor):
            raise TypeError(f"state['generator'] must be a Tensor, got {type(generator_state).__name__}")
        try:  # on a scratch generator first: set_state checks the state only as it installs it
            torch.Generator(device=self.generator.device).set_state(generator_state)
        except (RuntimeError, TypeError, ValueError) as error:
            raise ValueError(f"state['generator'] is not a state of a {self.generator.device.type} "
                             f"generator: {error}") from None
        finished = _checks.flag(state.get("finished", False), "state['finished']")
        # One host read for all layers: the saved masks' counts, then the model's.
        both = reference.active_counts([*(mask for _, mask in staged), *(module.mask for module, _ in staged)])
        counts, held = both[:len(staged)], both[len(staged):]
        if self.block is None:   # whole blocks of another size at the edges move a layer's count
            _warn_if_counts_differ(counts, held, [name for name, _ in self.modules], self.scope)
        if self.scope == "layer":   # as at construction: a loaded mask may have emptied a layer for good
            _warn_if_empty([name for (name, _), count in zip(self.modules, counts) if not count], self.scope)
        else:
            counts = None
        if schedule != self.schedule:
            # The saved schedule is the run's own (its cosine was laid over its total_steps); built
            # with other arguments (a longer run, a new end_step), this DST would silently follow it.
            changed = {field: (old, new) for (field, old), new in zip(self.schedule.state().items(),
                                                                      schedule.state().values()) if old != new}
            warnings.warn("the loaded state's schedule replaces the one this DST was built with "
                          f"({', '.join(f'{k}: {old!r} -> {new!r}' for k, (old, new) in changed.items())}); "
                          "build it with the saving run's arguments, or set DST.schedule "
                          "(sparsekern.algorithms.schedules.make) after loading", stacklevel=user_stacklevel())
        if step_count > schedule.total_steps:
            # Not refused: step() lets a run go past total_steps (with this warning), and its state must
            # load back. Warned here, before anything changes, because step() will not warn again.
            warnings.warn(f"state['step_count']={step_count} is beyond the schedule's total_steps="
                          f"{schedule.total_steps}: the run that saved it went past the end of training the "
                          f"schedule (end_step={schedule.end_step}) was made for", stacklevel=user_stacklevel())

        def install() -> None:
            for module, mask in staged:
                module.set_mask(mask)
                # As at construction: state left off the mask (an optimizer not rolled back with the masks)
                # would move inactive weights off 0. A state saved with these masks is reset there already.
                reset_state_off_mask(self.optimizer, module.weight, mask)
            self.schedule = schedule
            self.step_count = step_count
            self.generator.set_state(generator_state)
            self._finished = False   # the loaded run's next backward is dense again where an update is due
            self._sync_modules()
            self._remember_gradients()
            if finished:
                self.finish()
            if counts is not None and self.block is None:
                # As construction's count: it serves the first update while the masks are the ones loaded. (With
                # block=, updates count blocks, not the entries counted here.)
                self._remember_counts([module.mask for _, module in self.modules], counts)
        return install

    # -- internals ------------------------------------------------------------------------

    def register_update_hook(self, hook: Callable) -> RemovableHandle:
        """Calls `hook(dst, changes)` after every mask update, to observe it (what a paper logs: per layer the
        weights dropped and grown, the overlap of successive masks) without copying every mask before every step.
        `changes` is {layer name: (before, after)}, the bool masks of each layer the update set (frozen ones left
        out), as DST's state names them: `before` a copy of the mask the update replaced, `after` the layer's mask
        itself (read it; write masks with `set_mask`), so `(before & ~after).sum()` counts the dropped weights,
        `(after & ~before).sum()` the grown ones (a just-dropped weight grown back is neither). Called once the update
        is complete, in registration order, after the warnings it raises; an error a hook raises propagates from
        `step()`, with the update made and the step counted. Hooks are not part of `state_dict()`: register them
        again on a resumed DST. The copies cost a mask's memory per layer at each update, only while a hook is
        registered; a hook that reads values (`.sum()`) reads the device, which a CUDA graph capture refuses.
        Returns a handle whose `remove()` unregisters the hook. TypeError for a hook that is not callable as
        `hook(dst, changes)`."""
        _checks.callable_as(hook, "hook", "hook(dst, changes)", self, {})
        handle = RemovableHandle(self._update_hooks)
        self._update_hooks[handle.id] = hook
        return handle

    def _dense_grad_next(self) -> bool:
        # Dense whatever the criteria: SET's randomly grown weights get their first gradient step at
        # the update as RigL's do. The dense-kernel path computes the dense weight gradient anyway
        # and only skips masking it. Only gradient growth reads inactive entries' gradients: the pruning criteria read
        # the active ones', which the masked gradient holds (tests/algorithms/test_dst.py), so under random growth the
        # dense gradient buys only that first step, at RigL's training FLOPs (cli/costs.py). Why it is kept: without
        # it (`sparsekern compare --methods static,set,mest,rigl`, digits, paired seeds) MEST lost 0.36 ± 0.59 points
        # at density 0.02 over 40 seeds (28 worse, 7 better; 91.6 -> 91.2) and was worse on 49 of 66 differing seeds
        # at densities 0.2 to 0.01; SET tied (-0.17 ± 0.82 at 0.02, 21 worse, 17 better).
        return self.schedule.is_update(self.step_count + 1)

    def _sync_modules(self) -> None:
        """Sets `dense_grad` for the next step and gives tied modules their primary's mask."""
        value = self._dense_grad_next()
        for _, module in self.modules:
            module.dense_grad = value
        tying.sync(self._groups)

    def _warn_if_emptied(self) -> None:
        masks = [module.mask.reshape(-1) for _, module in self.modules]
        # A layer almost always shows an active entry among its first ones; only the others are read
        # whole (any() never stops early, and a full read of every mask costs a fifth of the update).
        empty = torch.stack([~m[:_HEAD].any() for m in masks]).tolist()
        unsure = [i for i, maybe in enumerate(empty) if maybe]
        if unsure:
            for i, is_empty in zip(unsure, torch.stack([~masks[i].any() for i in unsure]).tolist()):
                empty[i] = is_empty
        emptied = [name for (name, _), is_empty in zip(self.modules, empty) if is_empty and name not in self._empty]
        if emptied:
            warnings.warn(f"the global update at step {self.step_count} left {emptied} with no active weight",
                          stacklevel=user_stacklevel())
        self._empty = {name for (name, _), is_empty in zip(self.modules, empty) if is_empty}

    def _remember_gradients(self) -> None:
        self._gradients.remember([module.weight for _, module in self.modules])

    def _check_gradients(self, step: int) -> None:
        """RuntimeError, before anything changes, unless every layer is still a module of the model whose
        weight the optimizer trains, every weight's gradient is fresh, and, where a criterion reads
        gradients, some parameter has one."""
        trained = {id(parameter) for group in self.optimizer.param_groups for parameter in group["params"]}
        present = {id(module) for module in self._replicas.modules()}
        for name, module in self.modules:
            if id(module) not in present:
                # Its gradient never comes, and a layer without one would silently keep its mask for good.
                raise RuntimeError(f"{name} is no longer a module of the model (a layer replaced in the model "
                                   f"after DST was built gets no gradient): build DST again")
            if id(module.weight) not in trained:
                # A weight Parameter replaced, or taken out of the optimizer: its grown weights would never train.
                raise RuntimeError(f"{name}.weight is no longer a parameter of the optimizer (replaced by another "
                                   f"Parameter, or removed from it, after DST was built); build the optimizer and DST "
                                   f"again")
        # A layer without a gradient keeps its mask (_keep_masks_without_gradient); no trained parameter with one
        # is a step() called before backward (a frozen parameter may hold a gradient from before it was frozen).
        if self._reads_gradient and all(parameter.grad is None for group in self.optimizer.param_groups
                                        for parameter in group["params"] if parameter.requires_grad):
            raise RuntimeError(f"no trained parameter has a gradient at update step {step}: call DST.step() after "
                               f"backward (prune={self.prune!r}, grow={self.grow!r} read it)")
        stale = self._gradients.unchanged([module.weight for _, module in self.modules])
        if stale is not None:
            raise RuntimeError(
                f"DST.step() at update step {step}: {self.modules[stale][0]}.weight's gradient has not changed "
                f"since the previous step() (no backward in between: step() called twice in one iteration, "
                f"or without a fresh backward); an update from it would be wrong (with gradient growth it "
                f"regrows exactly what it drops). Call step() once per iteration, after loss.backward()")

    @torch.no_grad()   # a gradient that requires grad (create_graph=True) is masked under no_grad too
    def _check_gradients_writable(self) -> None:
        """ValueError naming the gradient, before anything changes, for one that the update (or `_mask_gradients`)
        could not mask in place: an expanded view, an inference tensor (`ops._checks.writable_in_place`); before it,
        TypeError or ValueError naming the layer for a mask that the update cannot write (`check_masks_writable`),
        put in place through `mask.data = ...`, which the module's checks of an assigned mask never see: torch refused
        to write an expanded one only after the weights and optimizer state were, and the kernels refused another
        dtype or shape naming their argument `masks[i]`, not the layer."""
        _tickets.check_masks_writable(self._groups, "DST", frozen_kept=True)   # `_unfrozen_modules` are updated
        for name, module in self.modules:
            if module.weight.grad is not None:
                _checks.writable_in_place(module.weight.grad, f"{name}.weight.grad", module.mask, f"{name}.mask")

    @torch.no_grad()
    def _update(self, fraction: float, sums: dict[int, float] | None) -> dict[str, tuple[Tensor, Tensor]]:
        """One mask update of every layer (`_update_layers`), returning its changes for the update hooks (empty
        without any). `sums`: those of `_gradient_sums`, or None without
        host checks. One that raises changes nothing, the random stream included; one refused (ValueError) where
        a mask was written without its version changing, so that the count kept of it is stale, is made again
        from a fresh count (`_recount_if_stale`)."""
        named = self._unfrozen_modules()
        if not named:
            return {}
        # A CUDA generator's state cannot be read while a CUDA graph is captured (an update under host_checks=False
        # may be): an update refused there leaves the stream advanced.
        capturing = self.generator.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        stream = None if capturing else self.generator.get_state()
        try:
            try:
                return self._update_layers(named, fraction, sums)
            except ValueError:
                if stream is None or not self._recount_if_stale(named):
                    raise
                self.generator.set_state(stream)   # the scores are drawn again, as the first try drew them
                return self._update_layers(named, fraction, sums)
        except Exception:
            if stream is not None:
                self.generator.set_state(stream)
            raise

    def _update_layers(self, named: list[tuple[str, nn.Module]], fraction: float,
                       sums: dict[int, float] | None) -> dict[str, tuple[Tensor, Tensor]]:
        """One mask update of the layers `named`: one sparsekern.ops.prune_grow call, scores included. Every
        check runs before the first write (prune_grow's, of the counts `active` too, among them). Returns
        {name: (mask before, mask)} when an update hook is registered, else {}."""
        modules = [module for _, module in named]
        weights = [module.weight for module in modules]
        grads = [w.grad for w in weights]
        masks = [module.mask for module in modules]
        if self._reads_gradient:
            # A weight without a gradient (zero_grad(set_to_none=True), then no backward reached it) is
            # scored as the zero gradient it has under set_to_none=False: both settings give one update.
            scored_grads = [torch.zeros_like(w) if g is None else g for w, g in zip(weights, grads)]
        else:
            scored_grads = grads
        # Whole blocks count by their grids (_update_blocks); no criterion deciding its own count takes blocks.
        counts = None if self.block is not None else self._active_counts(masks, masks)
        swap = None if counts is None else self._swap_counts(fraction, counts)
        prune, prune_abs, grow, grow_abs, dropped = self._scores(weights, scored_grads, masks,
                                                                 [name for name, _ in named], swap)
        if dropped is not None:   # the pruning criterion decided how many it drops: that many swap
            swap = dropped if self.scope == "layer" else sum(dropped)
        if self._reads_gradient:
            # A weight without a gradient sums to 0 (none is not in sums).
            layer_sums = None if sums is None else [sums.get(id(w), 0.0) for w in weights]
            grow = _keep_masks_without_gradient(scored_grads, masks, grow, layer_sums)
        state = [self._state(w) for w in weights]
        # Optimizer state follows the weight (0 off the new mask and at grown entries) when reset,
        # else only the mask; gradients follow the mask, so the optimizer step cannot revive a
        # dropped weight. The kernels zero it; the few states that start elsewhere are set to that after.
        fresh = [fresh_state(self.optimizer, w) for w in weights]
        zeroed_like_weight = state if self.reset_state else [[] for _ in weights]
        masked = [([] if g is None else [g]) + ([] if self.reset_state else s) for g, s in zip(grads, state)]
        if self.block is None:
            new = ops.prune_grow(weights, masks, prune, grow, swap,
                                 state=zeroed_like_weight, masked=masked, active=self._per_scope(counts),
                                 prune_abs=prune_abs, grow_abs=grow_abs)
        else:
            new = self._update_blocks(fraction, masks, prune, prune_abs, grow, grow_abs)
            reference.apply_masks(weights, masks, new, zeroed_like_weight, masked)
        self._refill_fresh_state(fresh, masks, new)
        # The weights are 0 off the new masks already (prune_grow wrote them), so the masks are copied
        # in directly rather than through set_mask, which would read every weight again; the modules
        # promise zero_off_mask, as set_mask would have them.
        # The replaced masks, for the update hooks: `new` would do, but the copy below makes them the layers' own.
        before = [mask.clone() for mask in masks] if self._update_hooks else None
        torch._foreach_copy_(masks, new)
        for module in modules:
            module.zero_off_mask = True
        self._remember_counts(masks, self._counts[1])
        return {} if before is None else {name: (old, mask) for (name, _), old, mask in zip(named, before, masks)}

    def _refill_fresh_state(self, fresh: list[list[tuple[Tensor, float | complex | Tensor]]], old: list[Tensor],
                            new: list[Tensor]) -> None:
        """Sets the state that the update zeroed but that starts elsewhere (`fresh`, per layer: Rprop's step sizes,
        Adagrad's sums) to its fresh value where it was zeroed: off the `new` masks, and with reset_state at the grown
        entries too, off `old` (the masks before), so that a weight grown there starts as a fresh one would."""
        for states, before, after in zip(fresh, old, new):
            if states:   # none for the optimizers whose state starts at 0: no mask is computed for them
                zeroed = ~(before & after) if self.reset_state else ~after
                for tensor, value in states:
                    fill_fresh(tensor, zeroed, value)

    def _layers_updated(self) -> list[str]:
        """The names of the layers the next update sets the masks of: those not frozen (construction and
        `broadcast_masks` compare them across ranks)."""
        return [name for name, module in self.modules if module.weight.requires_grad]

    def _unfrozen_modules(self) -> list[tuple[str, nn.Module]]:
        """The (name, module) pairs whose weight requires grad. Those frozen since DST was built are left alone, as
        at construction (warned once each): grown weights would never train, under any criterion. Their
        gradients, dense for the update they sit out, are masked, so that a stale one cannot move an
        inactive weight at the optimizer step."""
        frozen = [(name, module) for name, module in self.modules if not module.weight.requires_grad]
        unwarned = [name for name, _ in frozen if name not in self._frozen_warned]
        if unwarned:
            warnings.warn(f"DST leaves the masks of {unwarned} alone while their weights do not require grad "
                          f"(frozen after DST was built)", stacklevel=user_stacklevel())
            self._frozen_warned.update(unwarned)
        for _, module in frozen:
            if module.weight.grad is not None:
                ops.mask_in_place(module.weight.grad, module.mask)
        return [(name, module) for name, module in self.modules if module.weight.requires_grad]

    def _update_blocks(self, fraction: float, masks, prune, prune_abs: bool, grow, grow_abs: bool) -> list[Tensor]:
        """The new entry masks of a block-structured update: whole blocks dropped and grown by their
        summed scores, in one prune_grow call over the block grids."""
        blocking = [_Blocks(m.shape, self.block) for m in masks]
        block_masks = [b.mask(m) for b, m in zip(blocking, masks)]
        prune = [b.sum(s.abs() if prune_abs else s) for b, s in zip(blocking, prune)]
        grow = [b.sum(s.abs() if grow_abs else s) for b, s in zip(blocking, grow)]
        counts = self._active_counts(masks, block_masks)
        new_blocks = ops.prune_grow([torch.zeros_like(p) for p in prune], block_masks, prune, grow,
                                    self._swap_counts(fraction, counts), active=self._per_scope(counts))
        return [b.expand(m) for b, m in zip(blocking, new_blocks)]

    def _swap_counts(self, fraction: float, counts: list[int]):
        """n per layer (layer scope) or over the list (global scope) for active counts `counts`."""
        if self.scope == "layer":
            return [_swap_count(fraction, active, self.swap_rounding) for active in counts]
        return _swap_count(fraction, sum(counts), self.swap_rounding)

    def _per_scope(self, counts: list[int]):
        return counts if self.scope == "layer" else sum(counts)

    def _active_counts(self, masks: list[Tensor], units: list[Tensor]) -> list[int]:
        """Active entries of each of `units` (the masks, or their block grids), counted only when a
        mask changed since the last update. An update keeps each layer's count (layer scope) or the
        total (global scope), so DST counts on the device, a host read on a GPU, only after masks are
        set some other way (set_mask; load_state_dict, whose own count serves in layer scope without block=),
        as their `_versions` tell. A write those miss (through .data or a NumPy view) leaves the count stale:
        the CPU kernels refuse it, and the update counts again (`_recount_if_stale`); the GPU kernels trust it."""
        versions = _versions(masks)   # the layers updated change as they are frozen
        if self._counts[0] != versions:
            self._counts = (versions, reference.active_counts(units))
        return self._counts[1]

    def _remember_counts(self, masks: list[Tensor], counts: list[int]) -> None:
        """Marks `counts` (active entries per layer of `masks`, or of their block grids) as current for `masks` as
        they are now, for `_active_counts` to serve until a mask is written. In global scope only their total is
        kept: an update moves entries between layers, after which only the total is still right, and it is all
        that scope reads."""
        self._counts: tuple[tuple[tuple[int, int, int], ...], list[int]] = (
            _versions(masks), counts if self.scope == "layer" else [sum(counts)])

    def _recount_if_stale(self, named: list[tuple[str, nn.Module]]) -> bool:
        """After an update of the layers `named` was refused (ValueError): whether the counts kept of their masks
        were stale, a mask having been written without its version changing (through .data, a NumPy view), which
        the kernels that check the count they are given refuse (the CPU kernels and the reference; not the GPU
        kernels, which trust it). If so, keeps a fresh count for the next try and warns, naming the layers. One
        host read, on this path only."""
        masks = [module.mask for _, module in named]
        if self._counts[0] != _versions(masks):   # refused before its count was taken: not for it
            return False
        units = masks if self.block is None else [_Blocks(m.shape, self.block).mask(m) for m in masks]
        kept, counts = self._counts[1], reference.active_counts(units)
        if (sum(kept) == sum(counts)) if self.scope == "global" else (kept == counts):
            return False   # the counts given were right: refused for another reason
        unit = "active entries" if self.block is None else f"active {self.block[0]}x{self.block[1]} blocks"
        warnings.warn(f"DST.step(): {_stale_masks([name for name, _ in named], kept, counts, unit)} (a write "
                      f"through .data or a NumPy view?), so DST counted the masks again; use module.set_mask(...) "
                      f"to change a mask", stacklevel=user_stacklevel())
        self._remember_counts(masks, counts)
        return True

    def _scores(self, weights, grads, masks, layers: list[str],
                swap) -> tuple[list[Tensor], bool, list[Tensor], bool, list[int] | None]:
        """(prune scores, rank them by |score|, grow scores, rank them by |score|, the entries each layer drops where
        the pruning criterion decides its own count, else None), the scores of one dtype, of the layers named
        `layers`; `swap`: the swap counts (`_swap_counts`, None for blocks), which the criteria deciding their own
        count read.

        Magnitude criteria hand over the weights or gradients themselves, ranked by magnitude, so no
        score tensor is made for them (criteria.MAGNITUDE_OF); the others are computed in one
        batched pass each. A user's criterion's scores are checked here, before anything changes (what one deciding
        its own count drops, in the read of its counts); if they are refused (or it raised), `_update` puts the random
        stream back as it was."""
        scored, dropped = [], None
        for criterion in (self._prune, self._grow):
            if criterion.name in criteria.MAGNITUDE_OF:
                scored.append((criteria.MAGNITUDE_OF[criterion.name](weights, grads), True))
            elif criterion.elementwise or self.scope == "global":
                scored.append((self._score(criterion, weights, grads, masks, layers, swap), False))
            else:  # a rank over the list (SET): in layer scope, each layer's own
                scored.append(([self._score(criterion, [w], [g], [m], [layer], n)[0]
                                for w, g, m, layer, n in zip(weights, grads, masks, layers, swap)], False))
            if criterion.decides_count:   # one read: its counts, and NaN among the checks of a user's scores
                dropped = criterion.drop_counts(scored[-1][0], masks, layers)
            elif self.host_checks and not criteria.is_built_in(criterion):
                criterion.refuse_nan(scored[-1][0], layers)
        (prune, prune_abs), (grow, grow_abs) = scored
        dtype = prune[0].dtype
        for score in prune + grow:
            dtype = torch.promote_types(dtype, score.dtype)
        return [s.to(dtype) for s in prune], prune_abs, [s.to(dtype) for s in grow], grow_abs, dropped

    def _score(self, criterion: criteria.Criterion, weights, grads, masks, layers: list[str], n) -> list[Tensor]:
        """`criterion`'s scores of the layers named `layers`: a built-in's, given DST's parameters of the
        criteria (and `n`, their swap count, where it decides its own count), or a user's, checked (and given `n`
        where it decides its own count)."""
        if criteria.is_built_in(criterion):
            own_count = {"n": n} if criterion.decides_count else {}
            return criterion.score(weights, grads, masks, generator=self.generator, gamma=self.mest_gamma,
                                   offset=self.sensitivity_offset, shift=self.snip_shift, **own_count)
        return criterion.checked_scores(weights, grads, masks, generator=self.generator, layers=layers, n=n)

    def _state(self, weight: Tensor) -> list[Tensor]:
        """The optimizer's per-entry state tensors of `weight` (not scalars such as Adam's step)."""
        return optimizer_state(self.optimizer, weight)

    def _make_block_structured(self, active: list[int]) -> list[int]:
        """Makes every mask whole blocks; `active`: the layers' active counts. Returns the blocks each layer
        keeps. One topk_mask call selects them all: each call reads its counts back (a sync on a GPU)."""
        blocking = [_Blocks(module.weight.shape, self.block) for _, module in self.modules]
        kept = [blocks.keep(count) for blocks, count in zip(blocking, active)]
        per_block = [blocks.sum(module.mask.to(torch.float32)) for blocks, (_, module) in zip(blocking, self.modules)]
        for blocks, (_, module), block_mask in zip(blocking, self.modules, ops.topk_mask(per_block, kept)):
            module.set_mask(blocks.expand(block_mask))
        return kept


def _versions(masks: list[Tensor]) -> tuple[tuple[int, int, int], ...]:
    """Which masks, how often each was written, and where its values live: what DST's remembered counts are of
    (`DST._active_counts`). A write that bumps no version (through .data or a NumPy view) goes unseen here, but
    `mask.data = other` moves the values, which the address shows without reading the device."""
    return tuple((id(mask), mask._version, mask.data_ptr()) for mask in masks)


def _stale_masks(layers: list[str], kept: list[int], counts: list[int], unit: str) -> str:
    """Which masks changed unseen, for `DST._recount_if_stale`'s warning: the layers whose count `kept` (per layer,
    or only the total: global scope after an update) differs from `counts`, theirs now."""
    if len(kept) != len(counts):
        return (f"a mask of the layers {', '.join(map(repr, layers))} ({kept[0]} {unit} in all when DST counted "
                f"them, {sum(counts)} now) was changed without its version counter changing")
    changed = [f"{layer!r} ({old} {unit} when DST counted them, {new} now)"
               for layer, old, new in zip(layers, kept, counts) if old != new]
    if len(changed) == 1:
        return f"the mask of layer {changed[0]} was changed without its version counter changing"
    return (f"the masks of layers {', '.join(changed[:-1])} and {changed[-1]} were changed without their version "
            f"counters changing")


def _trained_layers(model: nn.Module, optimizer: torch.optim.Optimizer):
    """(primary (name, module) per weight, groups of modules sharing a weight) of the sparse modules
    that `optimizer` trains; warns about the frozen ones, which are left alone."""
    refuse_sharded(model, "DST")
    named = sparse_modules(model)
    if not named:
        raise ValueError("model has no sparse modules; sparsify it first (sparsekern.sparsify)")
    refusal = computed_weight_refusal(named, "DST")   # before anything reads a computed weight
    if refusal is not None:
        raise ValueError(refusal)
    groups = tying.group_by_weight(named)
    tying.check_groups(groups)
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    frozen = [group[0][0] for group in groups
              if not group[0][1].weight.requires_grad or id(group[0][1].weight) not in optimized]
    if frozen:
        if len(frozen) == len(groups):
            raise ValueError(f"no sparse module of the model is trained: the weights of {frozen} do not "
                             f"require grad or are not in the optimizer")
        warnings.warn(f"DST leaves the masks of {frozen} alone: their weights do not require grad or are "
                      f"not in the optimizer, so grown weights could never train", stacklevel=user_stacklevel())
        groups = [group for group in groups if group[0][0] not in frozen]
    return [group[0] for group in groups], groups


def _keep_masks_without_gradient(grads: list[Tensor], masks: list[Tensor], grow: list[Tensor],
                                  sums: list[float] | None) -> list[Tensor]:
    """`grow`, with new scores for each layer whose gradient is 0 everywhere that make it keep its mask
    in the prune_grow call that follows, whatever its prune scores: +inf at its active entries, so that
    what the selection drops from it grows straight back, keeping its value and optimizer state
    (prune_grow resets only entries inactive before), and NaN, which ranks below every number, at the
    others, so that in global scope no tie of another layer's grows one of them. The decision reads the
    gradients' values, which DDP has averaged, so it is the same on every rank.

    With `sums` (each gradient's sum, read by the finite check), only the gradients that sum to 0 can
    be 0 everywhere: they alone are checked, with one more read, and only the scores of the layers
    without a gradient are made anew. Without (no host checks), every layer's score is, score +
    mask · (inf or 0) by its on-device flag, and nothing is read back: for a layer without a gradient
    that is inf at its active entries and, since 0 · inf is NaN, NaN at the others, the scores the host
    path gives it. The gradients and scores passed in are not written."""
    if sums is None:
        return [torch.addcmul(score, mask, torch.where(no_gradient, float("inf"), 0.0))
                for mask, score, no_gradient in zip(masks, grow, zero_everywhere(grads))]
    unsure = [index for index, total in enumerate(sums) if total == 0]
    zero = torch.stack(zero_everywhere([grads[index] for index in unsure])).tolist() if unsure else []
    without = {index for index, is_zero in zip(unsure, zero) if is_zero}
    return [torch.full_like(score, float("nan")).masked_fill_(mask, float("inf")) if index in without else score
            for index, (mask, score) in enumerate(zip(masks, grow))]


def _check_blocks(modules, counts: list[int], block: tuple[int, int]) -> None:
    """ValueError for a layer that whole blocks would empty; a warning where blocks do not tile. `counts`: the
    layers' active weights."""
    for (name, module), active in zip(modules, counts):
        blocks = _Blocks(module.weight.shape, block)
        if active and not blocks.keep(active):
            raise ValueError(f"block={block} is too large for layer {name!r}: its {active} active weights make "
                             f"{active / (block[0] * block[1]):.3g} blocks of {block[0] * block[1]}, which "
                             f"rounds to 0 and would empty the layer")
        if blocks.rows % block[0] or blocks.cols % block[1]:
            warnings.warn(ArgumentWarning(
                "{block} does not tile layer {layer!r} ({rows}x{cols} weight matrix): its edge blocks hold fewer "
                "weights, so its active weight count changes when they are dropped or grown (its block count stays "
                "exact)", {"block": block}, {"layer": name, "rows": blocks.rows, "cols": blocks.cols}),
                stacklevel=user_stacklevel())


def _warn_if_idle(schedule: schedules.Schedule, empty: list[str], scope: str) -> None:
    """Warns about configurations under which DST silently does nothing (or nothing to a layer);
    `empty` names the layers without an active weight. (A schedule function's drop_fraction is None, never 0: its
    fractions are not known before its update steps.)"""
    if not schedule.is_update(schedule.update_every):
        warnings.warn(f"no mask update will ever happen: update_every={schedule.update_every} reaches no "
                      f"step before end_step={schedule.end_step} (total_steps={schedule.total_steps})",
                      NoUpdateWarning, stacklevel=user_stacklevel())
    elif schedule.drop_fraction == 0 and (schedule.name != "annealed" or schedule.final_drop_fraction == 0):
        warnings.warn("drop_fraction is 0: every mask update swaps no weight", stacklevel=user_stacklevel())
    _warn_if_empty(empty, scope)


def _warn_if_counts_differ(saved: list[int], held: list[int], names: list[str], scope: str) -> None:
    """Warns, naming the layers (or, under scope="global", the total), where a state's masks hold another number of
    active weights, `saved`, than the model's masks, `held`: DST's updates never change them (per layer, or in total
    under scope="global"), so the run goes on at the state's counts, not the model's. A state of another run's density
    loads so on purpose; a damaged one (a mask of all True, which would train its layer dense while the model was
    built sparse) said nothing."""
    if scope == "layer":
        differ = [f"{name!r} ({saved_count} in the state, {held_count} in the model)"
                  for name, saved_count, held_count in zip(names, saved, held) if saved_count != held_count]
    else:
        differ = [f"all layers together ({sum(saved)} in the state, {sum(held)} in the model)"] \
            if sum(saved) != sum(held) else []
    if differ:
        warnings.warn(f"state['masks'] holds other active weight counts than the model's masks for {', '.join(differ)}"
                      f": the run goes on at the state's (DST's updates keep them, scope={scope!r}); load the model's "
                      f"state dict saved with this state first, or check that the state is of this run",
                      stacklevel=user_stacklevel())


def _warn_if_empty(empty: list[str], scope: str) -> None:
    """Warns that the layers `empty`, which have no active weight, stay so under scope="layer" (an update grows
    as many weights as it drops in each layer)."""
    if scope == "layer" and empty:
        warnings.warn(f"{empty} have no active weight: with scope='layer' they stay empty",
                      stacklevel=user_stacklevel())


def _warn_if_nothing_swaps(schedule: schedules.Schedule, modules, active: list[int], scope: str, block,
                           rounding: str) -> None:
    """Warns where the largest fraction any update drops makes a swap count of 0 of the layers' `active` weights:
    of the total (scope="global") or of every layer (no update swaps anything), or of some layers (scope="layer":
    they never change), counted in `block`s where given. A drop fraction of 0 has its own warning
    (`_warn_if_idle`). Not for a schedule function of one's own, which is called at its update steps alone."""
    if schedule.function is not None:
        return
    # Every named schedule's fraction is monotone in the step: its largest is at the first update or at the last.
    last = (schedule.end_step - 1) // schedule.update_every * schedule.update_every
    largest = max((schedule.fraction(step) for step in {schedule.update_every, last} if schedule.is_update(step)),
                  default=0.0)
    if largest == 0:
        return
    unit = "weights" if block is None else f"blocks of {block[0]}x{block[1]}"
    counts = active if block is None else [_Blocks(module.weight.shape, block).keep(count)
                                           for (_, module), count in zip(modules, active)]
    still = [name for (name, _), count in zip(modules, counts) if count and _swap_count(largest, count, rounding) == 0]
    if scope == "global":
        if not sum(counts) or _swap_count(largest, sum(counts), rounding):
            return
        opening, of = "no mask update swaps a weight", "of the {total} active"
    elif still and len(still) == sum(1 for count in counts if count):
        opening, of = "no mask update swaps a weight", "of each layer's active"
    elif still:
        opening, of = "the masks of {still} never change", "of each one's active"
    else:
        return
    template = (opening + ": the largest fraction any update drops, {largest:.3g} ({drop_fraction}), " + of +
                " {unit} rounds {down}to 0 ({swap_rounding})")
    warnings.warn(ArgumentWarning(template, {"drop_fraction": schedule.drop_fraction, "swap_rounding": rounding},
                                   {"largest": largest, "total": sum(counts), "still": still, "unit": unit,
                                    "down": "down " if rounding == "floor" else ""}), stacklevel=user_stacklevel())


def _schedule_from_state(saved, built: schedules.Schedule) -> schedules.Schedule:
    """The Schedule of a state dict's "schedule" entry, validated like DST's own arguments. One saved with a function
    of one's own (name FUNCTION) holds no function: it takes `built`'s, that of the DST loading it, and is refused
    (ValueError) where `built` is named, which could not go on with the saving run's fractions."""
    fields = list(schedules.Schedule.SAVED)
    if not isinstance(saved, dict) or sorted(saved, key=str) != sorted(fields):
        raise ValueError(f"state['schedule'] must be a dict of {fields}, got "
                         f"{sorted(saved, key=str) if isinstance(saved, dict) else type(saved).__name__}")
    own = isinstance(saved["name"], str) and saved["name"] == schedules.FUNCTION
    if own and built.function is None:
        raise ValueError(f"state['schedule'] was saved with a schedule function of one's own (name "
                         f"{schedules.FUNCTION!r}), not schedule={built.name!r}: a state holds no function, so this "
                         f"DST cannot go on with the saving run's fractions; build it with that run's function as "
                         f"its schedule")
    try:
        # A saved schedule holds its own ΔT, end and drop fraction: None, which make() reads as the schedule's
        # default, is none of them.
        _checks.count(saved["update_every"], "update_every", 1)
        _checks.count(saved["end_step"], "end_step", 1)
        if own:
            for key in ("drop_fraction", "final_drop_fraction"):   # a function's own schedule has neither
                if saved[key] is not None:
                    raise ValueError(f"{key} must be None under a schedule function, got {saved[key]!r}")
            return schedules.make(built.function, saved["total_steps"], update_every=saved["update_every"],
                                  end_step=saved["end_step"])
        if not isinstance(saved["name"], str):   # make() would take a callable for a function of one's own
            raise TypeError(f"schedule must be a str, got {type(saved['name']).__name__}")
        _checks.number(saved["drop_fraction"], "drop_fraction")
        schedule = schedules.make(saved["name"], saved["total_steps"], update_every=saved["update_every"],
                                  end_step=saved["end_step"], drop_fraction=saved["drop_fraction"],
                                  final_drop_fraction=saved["final_drop_fraction"]
                                  if saved["name"] == "annealed" else None)
        final = saved["final_drop_fraction"]
        if isinstance(final, bool) or not isinstance(final, (int, float)) or not 0 <= final <= 1:
            raise ValueError(f"final_drop_fraction must be in [0, 1], got {final!r}")
        # Unused but kept by the other schedules, so that a state round-trips exactly.
        schedule = dataclasses.replace(schedule, final_drop_fraction=float(final))
    except (TypeError, ValueError) as error:
        raise ValueError(f"state['schedule'] is not a valid schedule: {error}") from None
    return schedule


class _Blocks:
    """A weight seen as a grid of bh×bw blocks of its (dim 0, rest) matrix, edge blocks smaller."""

    def __init__(self, shape: torch.Size, block: tuple[int, int]):
        self.shape = shape
        self.rows, self.cols = shape[0], (shape.numel() // shape[0] if shape[0] else 0)
        self.block = block
        self.grid = (-(-self.rows // block[0]), -(-self.cols // block[1]))

    def sum(self, values: Tensor) -> Tensor:
        """Per-block sums (float32 at least) of a tensor shaped like the weight."""
        (bh, bw), (gr, gc) = self.block, self.grid
        matrix = values.reshape(self.rows, self.cols).to(torch.promote_types(values.dtype, torch.float32))
        padded = torch.nn.functional.pad(matrix, (0, gc * bw - self.cols, 0, gr * bh - self.rows))
        return padded.view(gr, bh, gc, bw).sum((1, 3))

    def mask(self, mask: Tensor) -> Tensor:
        """Bool grid: which blocks are active (any active entry)."""
        return self.sum(mask.to(torch.float32)) > 0

    def keep(self, active: int) -> int:
        """Blocks a layer of this shape keeps for a mask of `active` weights: that count in whole blocks, rounded."""
        return min(round(active / (self.block[0] * self.block[1])), self.grid[0] * self.grid[1])

    def is_whole(self, mask: Tensor) -> bool:
        """Whether every block of `mask` is all active or all inactive."""
        return torch.equal(self.expand(self.mask(mask)), mask)

    def expand(self, block_mask: Tensor) -> Tensor:
        """The entry mask, shaped like the weight, of a bool block grid."""
        bh, bw = self.block
        entries = block_mask.repeat_interleave(bh, 0).repeat_interleave(bw, 1)
        return entries[:self.rows, :self.cols].reshape(self.shape)


def _swap_count(fraction: float, active: int, rounding: str) -> int:
    """n = round(fraction · active), Python's round (halves to even), its floor (rounding="floor", RigL's code)
    or its ceiling (rounding="ceil", the Fantastic Weights code), a difference of at most one entry, in
    [0, active] for fractions in [0, 1] (a product with a factor at most 1 rounds to at most `active`). Floor
    and ceiling are of the float product, as those codes take them: 0.07 · 100 is 7.000000000000001, whose
    ceiling is 8."""
    n = fraction * active
    if rounding == "floor":
        return math.floor(n)
    return math.ceil(n) if rounding == "ceil" else round(n)


def _check_block(block):
    if block is None:
        return None
    if not isinstance(block, (tuple, list)) or len(block) != 2:
        raise TypeError(f"block must be None or a pair (bh, bw), got {block!r}")
    sizes = []
    for size in block:   # any integer scalar, as every count DST takes (a NumPy one from a sweep), kept as an int
        try:
            sizes.append(_checks.integer(size, "block"))
        except TypeError:
            raise TypeError(f"block must hold two ints, got {block!r}") from None
        if sizes[-1] < 1:
            raise ValueError(f"block sizes must be >= 1, got {block!r}")
    return tuple(sizes)


def RigL(model: nn.Module, optimizer: torch.optim.Optimizer, **options) -> DST:
    """RigL (Evci et al. 2020): magnitude pruning, gradient growth, cosine schedule (α = 0.3,
    ΔT = 100, T_end = 75% of training). Every DST option may be overridden; swap counts are DST's default
    round(r · active), where RigL's code floors them (swap_rounding="floor")."""
    return DST(model, optimizer, **{"prune": "magnitude", "grow": "gradient", "schedule": "cosine", **options})


def SET(model: nn.Module, optimizer: torch.optim.Optimizer, **options) -> DST:
    """SET (Mocanu et al. 2018): drop the smallest positive and the negative weights closest to
    zero in proportion to their counts, random growth, constant fraction 0.3, no update after 75%
    of training (RigL's T_end, under which RigL's paper compares SET). Every DST option may be
    overridden (end_fraction=1.0 updates to the end, as Mocanu's code)."""
    return DST(model, optimizer, **{"prune": "set", "grow": "random", "schedule": "constant", **options})


def MEST(model: nn.Module, optimizer: torch.optim.Optimizer, **options) -> DST:
    """MEST (Yuan et al. 2021): prune by |θ| + γ|g| (mest_gamma, default 1), random growth,
    constant fraction 0.3, no update after 75% of training. Every DST option may be overridden."""
    return DST(model, optimizer, **{"prune": "mest", "grow": "random", "schedule": "constant", **options})
