"""How each `--method` drives the training loop of `sparsekern.cli.training`.

The loop trains in segments of `config.epochs` epochs: one segment for dense, static, DST (set, rigl, mest, dst),
OptG and GMP (magnitude pruning on OptG's ramp); one per pruning cycle for IMP; one per cycle and particle for
SWAMP. Within a segment the learning rate
follows a cosine from `config.lr` to 0 over the segment's steps (SWAMP's particles: SWA's schedule, see
`SWAMPRecipe`). A recipe says what happens after backward, after
the optimizer step and at a segment's end, and holds the state a checkpoint needs besides the model's.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
import warnings

import torch
from torch import nn

from .. import checkpoint
from ..algorithms import DST, IMP, MEST, SET, SWAMP, OptG, RigL, _tickets
from ..algorithms.dst import ArgumentWarning, NoUpdateWarning, as_argument
from ..algorithms.schedules import DEFAULT_DROP_FRACTION, DEFAULT_END_FRACTION
from ..ops import _checks

DST_PRESETS = {"set": SET, "rigl": RigL, "mest": MEST, "dst": DST}
# (prune, grow) of each DST method when the config names neither: the presets' own and DST's defaults (a test
# builds each method's algorithm and checks them).
DST_CRITERIA = {"set": ("set", "random"), "rigl": ("magnitude", "gradient"), "mest": ("mest", "random"),
                "dst": ("magnitude", "gradient")}
# The schedule of each DST method when the config names none: the presets' own and DST's default (a test builds
# each method's algorithm and checks `dst_settings` against it).
DST_SCHEDULES = {"set": "constant", "rigl": "cosine", "mest": "constant", "dst": "cosine"}
# The parameters of a pruning criterion a run may set, and the criteria that read them (DST ignores them otherwise).
CRITERION_PARAMETERS = {"mest_gamma": ("mest",), "sensitivity_offset": ("sensitivity", "rsensitivity"),
                        "snip_shift": ("snip",)}
TICKET_METHODS = ("imp", "swamp")
TICKET_SCOPE = "global"   # IMP's and SWAMP's own scope, a ticket run's without --scope (a test checks both)
RAMP_METHODS = {"optg": "learned", "gmp": "magnitude"}  # OptG's sigmoid ramp, and the OptG criterion it uses
METHODS = ("dense", "static", *DST_PRESETS, *TICKET_METHODS, *RAMP_METHODS)


def criteria_of(config) -> tuple[str, str]:
    """(prune, grow): the criteria a DST method's run prunes and grows by, the config's or the method's own;
    ("", "") for the other methods, which have none."""
    if config.method not in DST_PRESETS:
        return "", ""
    prune, grow = DST_CRITERIA[config.method]
    return config.prune or prune, config.grow or grow


def dst_settings(config) -> dict:
    """The DST settings a DST method's run trains under, by TrainConfig's field names: the config's, and for each it
    leaves None what the method then takes (`criteria_of`'s criteria, the method's schedule and that schedule's drop
    and end fractions, DST's swap rounding and criterion parameters), so that a setting written out at its default
    and one left to it read alike; {} for the other methods, which read none of them. block stays the config's."""
    if config.method not in DST_PRESETS:
        return {}
    prune, grow = criteria_of(config)
    schedule = config.schedule or DST_SCHEDULES[config.method]
    defaults = {name: parameter.default for name, parameter in inspect.signature(DST).parameters.items()}
    defaults.update(drop_fraction=DEFAULT_DROP_FRACTION[schedule], end_fraction=DEFAULT_END_FRACTION[schedule])
    return {"prune": prune, "grow": grow, "schedule": schedule,
            **{name: defaults[name] if getattr(config, name) is None else getattr(config, name)
               for name in ("drop_fraction", "end_fraction", "swap_rounding", *CRITERION_PARAMETERS)}}


def ticket_scope_of(config) -> str:
    """The scope an IMP or SWAMP run prunes by: per layer or over all layers together (global)."""
    return config.ticket_scope or TICKET_SCOPE


def start_density(method: str, density: float) -> float:
    """The density `sparsify` starts the model at: the target, or dense for the dense method and the methods that
    prune as they train."""
    return 1.0 if method in ("dense", *TICKET_METHODS, *RAMP_METHODS) else density


class Recipe:
    """Dense and static training: a plain optimizer, masks never change."""

    def __init__(self, config, model: nn.Module, steps_per_epoch: int):
        self.config, self.model = config, model
        self.steps_per_epoch, self.steps_per_segment = steps_per_epoch, config.epochs * steps_per_epoch
        self.optimizer = self._make_optimizer(model.parameters())

    segments = 1
    algorithm = None  # the sparsekern algorithm that changes the masks, checkpointed with the optimizer

    @property
    def first_step(self) -> int:
        """Steps of the current segment that are skipped (a rewound ticket starts at step k)."""
        return 0

    def data_seed(self, epoch_in_segment: int) -> int:
        return self.config.seed * 1_000_003 + epoch_in_segment

    def learning_rate(self, step: int) -> float:
        """The learning rate of step `step` (from 0) of a segment: a cosine from `config.lr` to 0."""
        return self.config.lr * 0.5 * (1 + math.cos(math.pi * step / self.steps_per_segment))

    def updates_masks_next(self) -> bool:
        """Whether the coming `after_backward` updates the masks (a DST update step)."""
        return False

    def updates_masks_after_epoch(self, last_of_segment: bool, last_segment: bool) -> bool:
        """Whether the masks change at the end of this epoch, after its evaluation (OptG's next epoch, a ticket's
        next cycle)."""
        return False

    def after_backward(self) -> bool:
        """Returns whether masks changed."""
        return False

    def after_optimizer_step(self) -> None:
        pass

    def end_segment_before_evaluation(self, last: bool) -> None:
        pass

    def end_segment_after_evaluation(self, last: bool) -> None:
        pass

    def end_epoch_after_evaluation(self, last_of_segment: bool) -> None:
        pass

    def position(self) -> dict:
        """Extra per-epoch columns saying where in the method's schedule the epoch was."""
        return {}

    def describe(self) -> str:
        """How the masks change over training, in a few words for tables ("" when they never change)."""
        return ""

    def state_dict(self) -> dict:
        """The optimizer's state, its parameters by name (torch's own keys them by position, which a model listing
        its parameters in another order would load into the wrong tensors), and the algorithm's."""
        state = {"optimizer": _tickets.optimizer_by_name(self.optimizer.state_dict(), self.optimizer,
                                                         _tickets.parameter_names(self.model))}
        if self.algorithm is not None:
            state["algorithm"] = self.algorithm.state_dict()
        return state

    def load_state_dict(self, state: dict, steps: int | None = None) -> None:
        """Loads a `state_dict()`; ValueError, naming the parameters, for an optimizer state of other parameters
        than this model's. The optimizer state is checked on a fresh optimizer first, which puts each parameter's
        entry in this model's order (a checkpoint of earlier versions, by position, loads by position). `steps`: the
        training steps the run had taken when the state was saved, which an algorithm counting steps must have
        counted."""
        entries = ("optimizer",) if self.algorithm is None else ("optimizer", "algorithm")
        _check_recipe_state(state, entries)
        if steps is not None:
            self._check_steps_counted(state, steps)
        checked = _tickets.loaded_optimizer(self._make_optimizer, self.model, state["optimizer"],
                                            "its optimizer state", "this run")
        if self.algorithm is not None:
            # Before the optimizer's: DST's load zeroes the optimizer's state off the loaded masks (for one not rolled
            # back with them), and this run's holds none yet; the state loaded next was saved with those masks.
            self.algorithm.load_state_dict(state["algorithm"])
        self.optimizer.load_state_dict(checked.state_dict())

    def _check_steps_counted(self, state: dict, steps: int) -> None:
        """ValueError where the algorithm's state counts other steps than `steps` (none to check here)."""

    def _make_optimizer(self, parameters):
        return torch.optim.SGD(parameters, lr=self.config.lr, momentum=self.config.momentum,
                               weight_decay=self.config.weight_decay)


def _check_counters(saved, algorithm: str, expected: dict, steps: int) -> None:
    """ValueError where the algorithm's saved state `saved` holds a counter other than `expected` (name: value) gives
    after the run's `steps` training steps: resumed, a doctored counter would go on at another point of the
    algorithm's schedule than the run's (or past its end). A counter that is no int (a flag no bool) is left to the
    algorithm's load_state_dict, which names it."""
    if not isinstance(saved, dict):
        return   # the algorithm's load_state_dict names it
    for key, value in expected.items():
        count = saved.get(key)
        if isinstance(value, bool):
            if not isinstance(count, bool):
                continue
        else:
            try:
                count = _checks.integer(count, key)
            except TypeError:
                continue
        if count != value:
            shown = count if isinstance(count, bool) else checkpoint.integer_shown(count)
            after = "" if key == "step_count" else f", after which it is {value}"   # DST's: the steps themselves
            raise ValueError(f"its {algorithm} state's {key} is {shown}, but the run had trained {steps} steps{after}")


def _check_recipe_state(state, entries: tuple[str, ...]) -> None:
    """ValueError unless `state` is a dict holding `entries` (a recipe's state: the optimizer's and the algorithm's)
    and no other entry (a misspelled or tampered one, or another method's, which the resume would ignore)."""
    if not isinstance(state, dict) or any(entry not in state for entry in entries):
        got = sorted(map(str, state)) if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"its recipe state must be a dict holding {list(entries)}, got {got}")
    unknown = sorted((key for key in state if key not in entries), key=str)
    if unknown:
        raise ValueError(f"its recipe state holds {unknown}, which this method's recipe does not save (a misspelled or "
                         f"tampered entry?)")


class DSTRecipe(Recipe):
    """SET, RigL, MEST or DST with any criteria: `algo.step()` after backward, before the optimizer step."""

    def __init__(self, config, model, steps_per_epoch):
        super().__init__(config, model, steps_per_epoch)
        options = {"total_steps": self.steps_per_segment, "update_every": config.update_every,
                   "scope": config.scope, "seed": config.seed}
        for name in ("prune", "grow", "schedule", "drop_fraction", "end_fraction", "swap_rounding", "block",
                     *CRITERION_PARAMETERS):
            if getattr(config, name) is not None:
                options[name] = getattr(config, name)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            self.algorithm = DST_PRESETS[config.method](model, self.optimizer, **options)
        self._warn_in_option_names(caught)

    def _warn_in_option_names(self, caught: list) -> None:
        """Re-raises DST's construction warnings in the words of the command line, whose user typed options
        (--update-every, --block 4x4), never DST's argument names (update_every, block=(4, 4)) nor its end_step,
        which the CLI derives from --end-fraction and --epochs. DST's warnings carry the arguments they name
        (`ArgumentWarning`) and are worded anew from them; the one saying no update comes is found by its
        category and said in full here. (DST's warning about layers left empty under scope='layer' cannot come:
        sparsify refuses a density that empties a layer.)"""
        config, schedule = self.config, self.algorithm.schedule
        idle = False
        for warning in caught:
            if issubclass(warning.category, NoUpdateWarning):
                idle = True   # said below, in the options that set it
            elif isinstance(warning.message, ArgumentWarning):
                warnings.warn(warning.message.worded(self._as_option), stacklevel=3)
            else:
                warnings.warn(warning.message, stacklevel=3)
        if idle:
            end_fraction = DEFAULT_END_FRACTION[schedule.name] if config.end_fraction is None else config.end_fraction
            warnings.warn(f"no mask update will ever happen: --update-every {schedule.update_every} reaches no step "
                          f"before the updates end, at step {schedule.end_step} (--end-fraction {end_fraction:g} "
                          f"of the {schedule.total_steps} steps of --epochs {config.epochs}); raise --epochs or "
                          f"lower --update-every", stacklevel=3)

    def _check_steps_counted(self, state: dict, steps: int) -> None:
        """ValueError where the DST state's step count is not `steps`, the run's: DST counts every training step, and a
        count from elsewhere (a doctored state) would resume its schedule at another step, or past its end."""
        _check_counters(state["algorithm"], "DST", {"step_count": steps}, steps)

    def _as_option(self, name: str, value) -> str:
        """DST's argument `name` of `value` as the command line sets it: by its option (--block 4x4,
        --swap-rounding floor), or, for a drop fraction --drop-fraction left to the method, in words. An argument
        without an option of the same name (none of DST's warnings names one now) keeps DST's wording."""
        if name not in {field.name for field in dataclasses.fields(self.config)}:
            return as_argument(name, value)
        if name == "drop_fraction" and self.config.drop_fraction is None:
            return f"the {self.config.method} schedule's drop fraction {value:g}"
        shown = f"{value[0]}x{value[1]}" if name == "block" else f"{value:g}" if isinstance(value, float) else value
        return f"--{name.replace('_', '-')} {shown}"

    def updates_masks_next(self) -> bool:
        return self.algorithm.schedule.is_update(self.algorithm.step_count + 1)

    def after_backward(self) -> bool:
        return self.algorithm.step()

    def describe(self) -> str:
        schedule = self.algorithm.schedule
        rate = f"{schedule.drop_fraction:g}"
        if schedule.name == "annealed":
            rate += f"→{schedule.final_drop_fraction:g}"
        return (f"{schedule.name} {rate}, ΔT {schedule.update_every}, "
                f"to {schedule.end_step / schedule.total_steps:.0%}")


class OptGRecipe(Recipe):
    """OptG: scores trained alongside the weights; the mask follows its sigmoid sparsity ramp per epoch. GMP: the
    same ramp, the mask keeping the largest weights."""

    def __init__(self, config, model, steps_per_epoch):
        super().__init__(config, model, steps_per_epoch)
        self.algorithm = OptG(model, density=config.density, epochs=config.epochs, lr=config.lr,
                              momentum=config.momentum, criterion=RAMP_METHODS[config.method])

    def describe(self) -> str:
        return f"sigmoid ramp over {self.config.epochs} epochs"

    def after_backward(self) -> bool:
        self.algorithm.step()
        return False

    def updates_masks_after_epoch(self, last_of_segment: bool, last_segment: bool) -> bool:
        return not last_of_segment  # the mask for the next epoch; none follows the last

    def end_epoch_after_evaluation(self, last_of_segment: bool) -> None:
        if self.updates_masks_after_epoch(last_of_segment, True):
            self.algorithm.next_epoch()

    def _check_steps_counted(self, state: dict, steps: int) -> None:
        """ValueError where the OptG state's epoch is not the one the run's `steps` reached: next_epoch() follows every
        epoch but the last (after which OptG keeps counting the last, epochs - 1)."""
        epochs = steps // self.steps_per_epoch
        _check_counters(state["algorithm"], "OptG", {"epoch": min(epochs, self.config.epochs - 1)}, steps)


class TicketRecipe(Recipe):
    """IMP with weight rewinding (and SWAMP, below): `cycles` segments, each but the last followed by a pruning by
    magnitude (over all layers together, or per layer under ticket_scope "layer"): of ⌈p·remaining⌉ weights,
    p = 1 - d^(1/(cycles-1)), then, last, to exactly round(d·N) (of each layer: round(d·N_l)) (the earlier ones'
    rounding up would leave the last cycle a weight or two short of the target density d); the ticket is rewound
    to step k = 10% of a cycle."""

    def __init__(self, config, model, steps_per_epoch):
        self.config, self.model = config, model
        self.steps_per_epoch, self.steps_per_segment = steps_per_epoch, config.epochs * steps_per_epoch
        self.cycles = config.cycles
        self.algorithm = self._make_algorithm(prune_fraction=1 - config.density ** (1 / (config.cycles - 1)),
                                              rewind_step=self.steps_per_segment // 10, scope=ticket_scope_of(config))

    @property
    def segments(self) -> int:
        return self.cycles

    @property
    def optimizer(self):
        return self.algorithm.optimizer

    @property
    def first_step(self) -> int:
        return self.algorithm.step_in_cycle if self.algorithm.cycle > 0 else 0

    def after_optimizer_step(self) -> None:
        self.algorithm.step()

    def updates_masks_after_epoch(self, last_of_segment: bool, last_segment: bool) -> bool:
        return last_of_segment and not last_segment   # pruned, then rewound, for the next cycle

    def end_segment_after_evaluation(self, last: bool) -> None:
        if not last:
            self._next_cycle()

    def _next_cycle(self) -> None:
        """Prunes for the next cycle, the last to the target density."""
        last = self.algorithm.cycle + 1 == self.cycles - 1
        self.algorithm.next_cycle(density=self.config.density if last else None)

    def position(self) -> dict:
        return {"cycle": self.algorithm.cycle}

    def describe(self) -> str:
        return f"{self.cycles} cycles, rewind to 10%"

    def state_dict(self) -> dict:
        return {"algorithm": self.algorithm.state_dict()}

    def load_state_dict(self, state: dict, steps: int | None = None) -> None:
        _check_recipe_state(state, ("algorithm",))
        if steps is not None:
            self._check_steps_counted(state, steps)
        self.algorithm.load_state_dict(state["algorithm"])

    def _check_steps_counted(self, state: dict, steps: int) -> None:
        """ValueError where the state's cycle, step_in_cycle (or SWAMP's particle, averaged) are not those the run's
        `steps` reached: resumed, the run would train a cycle or particle again, or skip one, without a word."""
        _check_counters(state["algorithm"], type(self.algorithm).__name__, self._counters_after(steps), steps)

    def _counters_after(self, steps: int) -> dict:
        """The counters of the algorithm's state after the run's first `steps` steps (a whole number of epochs)."""
        cycle, step_in_cycle, _ = self._segment_after(steps)
        return {"cycle": cycle, "step_in_cycle": step_in_cycle}

    def _segment_after(self, steps: int) -> tuple[int, int, bool]:
        """(segment, its steps counted, whether the run has ended) after the run's first `steps` steps. step() counts
        every step of a segment but those a later segment skips, before the rewind step, where it starts counting
        (next_cycle, and SWAMP's next_particle); after the last segment nothing starts another."""
        segment, counted = divmod(steps, self.steps_per_segment)
        if segment == self.segments:
            return segment - 1, self.steps_per_segment, True
        return segment, max(counted, self.algorithm.rewind_step) if segment else counted, False

    def _make_algorithm(self, **options):
        return IMP(self.model, self._make_optimizer, **options)


class SWAMPRecipe(TicketRecipe):
    """SWAMP: every cycle trains `particles` particles one after another (each its own data order, an SWA mean
    over the last 25% of the cycle); the last epoch of a cycle reports the averaged weights."""

    # SWA's constant rate as a fraction of --lr: the paper's setup averages at 0.05 after training at 0.1.
    SWA_LR_FRACTION = 0.5

    def __init__(self, config, model, steps_per_epoch):
        self.particles = config.particles
        super().__init__(config, model, steps_per_epoch)

    @property
    def segments(self) -> int:
        return self.cycles * self.particles

    @property
    def first_step(self) -> int:
        return self.algorithm.step_in_cycle if (self.algorithm.cycle, self.algorithm.particle) != (0, 0) else 0

    def data_seed(self, epoch_in_segment: int) -> int:
        return self.algorithm.data_seed * 1_009 + epoch_in_segment

    def learning_rate(self, step: int) -> float:
        """SWA's schedule, as SWAMP runs it: a cosine from --lr down to the SWA rate until averaging starts, then
        that rate, constant, over every averaged step. (A rate annealed to 0 there, like IMP's, leaves the
        weights nearly still: the mean of a particle is then its last point, and SWAMP little more than IMP.)"""
        swa_lr = self.SWA_LR_FRACTION * self.config.lr
        start = self.algorithm.swa_start
        if step >= start:
            return swa_lr
        return swa_lr + (self.config.lr - swa_lr) * 0.5 * (1 + math.cos(math.pi * step / start))

    def end_segment_before_evaluation(self, last: bool) -> None:
        if self.algorithm.particle == self.particles - 1:
            self.algorithm.next_particle()  # the model now holds the average of the cycle's particles

    def updates_masks_after_epoch(self, last_of_segment: bool, last_segment: bool) -> bool:
        # A cycle's particles share its mask: it changes only after the last, once they are averaged.
        return last_of_segment and self.algorithm.averaged and not last_segment

    def end_segment_after_evaluation(self, last: bool) -> None:
        if not self.algorithm.averaged:
            self.algorithm.next_particle()
        elif not last:
            self._next_cycle()

    def position(self) -> dict:
        return {"cycle": self.algorithm.cycle, "particle": self.algorithm.particle}

    def _counters_after(self, steps: int) -> dict:
        """As IMP's, a segment being one particle of a cycle; once the run has ended, the last cycle is averaged."""
        segment, step_in_cycle, ended = self._segment_after(steps)
        cycle, particle = divmod(segment, self.particles)
        return {"cycle": cycle, "particle": particle, "step_in_cycle": step_in_cycle, "averaged": ended}

    def describe(self) -> str:
        return (f"{self.cycles} cycles × {self.particles} particles, rewind to 10%, SWA at "
                f"{self.SWA_LR_FRACTION:g}×lr over the last 25%")

    def _make_algorithm(self, **options):
        return SWAMP(self.model, self._make_optimizer, particles=self.particles,
                     swa_start=self.swa_start(self.steps_per_segment), seed=self.config.seed, **options)

    @staticmethod
    def swa_start(steps_per_segment: int) -> int:
        """The step of a cycle after which a particle's SWA mean starts: its last 25% are averaged."""
        return math.ceil(0.75 * steps_per_segment)


def make_recipe(config, model: nn.Module, steps_per_epoch: int) -> Recipe:
    if config.method in DST_PRESETS:
        return DSTRecipe(config, model, steps_per_epoch)
    if config.method in RAMP_METHODS:
        return OptGRecipe(config, model, steps_per_epoch)
    if config.method == "imp":
        return TicketRecipe(config, model, steps_per_epoch)
    if config.method == "swamp":
        return SWAMPRecipe(config, model, steps_per_epoch)
    return Recipe(config, model, steps_per_epoch)
