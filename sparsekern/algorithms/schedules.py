"""Drop-fraction schedules r(t) of dynamic sparse training: pure functions of the step t.

    cosine    RigL: r(t) = α/2 (1 + cos(π t / T_end)), α = 0.3, ΔT = 100.
    constant  SET, MEST: r(t) = α, α = 0.3, ΔT = 100.
    annealed  Fantastic Weights: α = 0.5 cosine-annealed to α_final = 0.005 by T_end,
              r(t) = α_final + (α - α_final)/2 (1 + cos(π t / T_end)), ΔT = 800.
    function  one's own: any function r(t) of the step (linear or step decay, a GraNet-style
              ramp), ΔT = 100; its name is FUNCTION.

Every schedule has an end point T_end: no mask update from T_end on. It defaults to 75% of
training for cosine (RigL's paper) and constant (the protocol under which RigL's paper compares
SET: a constant 30% swap a few steps before the end, at a learning rate near 0, leaves freshly
grown zero weights untrained), and to all of training for annealed (the Fantastic Weights code
has no end point) and a function (its shape is all the schedule it states: cutting it at 75% would
drop its tail unsaid). `make(schedule, total_steps, ...)` turns a name and its options, or a function,
into a `Schedule`, which also says at which steps masks are updated.

The end point is exclusive: an update step t = k·ΔT happens only while t < T_end. RigL's code
(`sparse_optimizers.py`, `is_mask_update_iter`: `global_step <= end_step`) also updates at T_end,
where its cosine fraction is 0: that update swaps nothing, so RigL's masks are the same either way
(we skip its dense backward). Only constant and annealed differ, by one update where T_end is a
multiple of ΔT; excluding it means end_fraction=1 never swaps at the last step of training, where
grown weights (at 0) would get no step to train and the dropped ones would be lost.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, ClassVar

from ..ops import _checks

# The name of a schedule given as a function of the step (`Schedule.name`, and what a state saves of it); not a name
# `make` takes: the named schedules are the keys of DEFAULT_DROP_FRACTION.
FUNCTION = "function"
DEFAULT_DROP_FRACTION = {"cosine": 0.3, "constant": 0.3, "annealed": 0.5}
# ΔT, steps between mask updates, by default: RigL's 100, and the Fantastic Weights code's 800.
DEFAULT_UPDATE_EVERY = {"cosine": 100, "constant": 100, "annealed": 800, FUNCTION: 100}
DEFAULT_FINAL_DROP_FRACTION = 0.005
# The fraction of training after which each schedule stops updating masks, by default.
DEFAULT_END_FRACTION = {"cosine": 0.75, "constant": 0.75, "annealed": 1.0, FUNCTION: 1.0}


def cosine(step: int, *, drop_fraction: float = 0.3, end_step: int) -> float:
    """RigL's α/2 (1 + cos(π t / T_end)); 0 from end_step on."""
    if step >= end_step:
        return 0.0
    return drop_fraction / 2 * (1 + math.cos(math.pi * step / end_step))


def constant(step: int, *, drop_fraction: float = 0.3) -> float:
    """SET's constant drop fraction."""
    return drop_fraction


def annealed(step: int, *, drop_fraction: float = 0.5, final_drop_fraction: float = 0.005,
             end_step: int) -> float:
    """Cosine annealing from drop_fraction at step 0 to final_drop_fraction at end_step (what
    torch's CosineAnnealingLR computes, as in the Fantastic Weights code, whose end_step is the
    whole training)."""
    progress = min(step, end_step) / end_step
    return final_drop_fraction + (drop_fraction - final_drop_fraction) / 2 * (1 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class Schedule:
    """When masks are updated and by how much.

    Masks are updated at steps t = update_every, 2·update_every, ... with t < end_step (t counts
    `DST.step()` calls from 1; none at end_step itself, see the module docstring); the update at step t
    drops fraction(t) of the active weights.
    `end_step` is the end point T_end; `total_steps` the length of training it was made for.
    A schedule of one's own (name FUNCTION) holds its `function`, and no drop_fraction nor final_drop_fraction
    (None): the function gives every fraction. Made by `make`, which validates every field.
    """

    name: str
    update_every: int
    end_step: int
    total_steps: int
    drop_fraction: float | None
    final_drop_fraction: float | None
    function: Callable[[int], float] | None = None

    # The fields a state saves (`state`): all but the function, which no state can hold.
    SAVED: ClassVar[tuple[str, ...]] = ("name", "update_every", "end_step", "total_steps", "drop_fraction",
                                        "final_drop_fraction")

    def state(self) -> dict:
        """The fields SAVED, by name: what `DST.state_dict()` saves of the schedule."""
        return {field: getattr(self, field) for field in self.SAVED}

    def is_update(self, step: int) -> bool:
        return step % self.update_every == 0 and 0 < step < self.end_step

    def fraction(self, step: int) -> float:
        """r(step). A function's value is checked as it comes: RuntimeError naming the schedule and the step where
        the function raised, TypeError where it gave no real number (a bool, a str, a tensor), ValueError where it
        gave one outside [0, 1] or NaN; an int or a NumPy float is taken as the float it is."""
        if self.function is not None:
            return self._function_fraction(step)
        if self.name == "cosine":
            return cosine(step, drop_fraction=self.drop_fraction, end_step=self.end_step)
        if self.name == "constant":
            return constant(step, drop_fraction=self.drop_fraction)
        return annealed(step, drop_fraction=self.drop_fraction,
                        final_drop_fraction=self.final_drop_fraction, end_step=self.end_step)

    def _function_fraction(self, step: int) -> float:
        shown = f"schedule={_checks.qualified_name(self.function)}"
        value = _checks.users_call(self.function, shown, f" at step {step}", step)
        return _checks.number(value, f"the drop fraction {shown} gave at step {step}", lambda value: 0 <= value <= 1,
                              "in [0, 1]")


def make(schedule, total_steps, *, update_every=None, end_step=None, end_fraction=None, drop_fraction=None,
         final_drop_fraction=None) -> Schedule:
    """A validated Schedule.

    schedule is a name, "cosine", "constant" or "annealed", or a function of one's own, r(t) -> the drop fraction
    of the update at step t: called with the step, an int (counting `DST.step()` calls from 1), at each update step
    and at no other, it returns a real number in [0, 1] (`Schedule.fraction` checks it there). It must be a pure
    function of the step: a resumed run calls it again from the step it resumes at, and every rank of a distributed
    run calls its own copy, which must be the same function for the masks to stay alike. drop_fraction and
    final_drop_fraction are the named schedules' options; with a function (which gives every fraction itself) they
    raise ValueError, as a callable that cannot be called with a step does TypeError.
    The end point is end_step, or round(end_fraction · total_steps) (at least 1), at most one of
    them; by default the schedule's DEFAULT_END_FRACTION (0.75 cosine and constant, 1 annealed and a function).
    update_every defaults per schedule (DEFAULT_UPDATE_EVERY: 100 cosine, constant and a function, 800 annealed).
    drop_fraction defaults per schedule (0.3 cosine and constant, 0.5 annealed);
    final_drop_fraction (annealed only) defaults to 0.005.
    """
    function = None
    if isinstance(schedule, str):
        name = _checks.choice(schedule, "schedule", sorted(DEFAULT_DROP_FRACTION))
    elif callable(schedule):
        _checks.callable_as(schedule, "schedule", "schedule(step)", 1)
        for argument, value in (("drop_fraction", drop_fraction), ("final_drop_fraction", final_drop_fraction)):
            if value is not None:
                raise ValueError(f"{argument} is an option of the named schedules, not of a function of one's own "
                                 f"(schedule={_checks.qualified_name(schedule)}), which gives every drop fraction")
        name, function = FUNCTION, schedule
    else:
        # A Schedule (what make returns) is what a researcher with a schedule of their own may try first.
        raise TypeError(f"schedule must be the name of one of {sorted(DEFAULT_DROP_FRACTION)} or a function of the "
                        f"step (step -> drop fraction), got a {type(schedule).__name__}: the options of a schedule "
                        f"are arguments of their own (drop_fraction, final_drop_fraction, update_every, end_step, "
                        f"end_fraction)")
    total_steps = _checks.count(total_steps, "total_steps", 1)
    update_every = _checks.count(DEFAULT_UPDATE_EVERY[name] if update_every is None else update_every,
                                 "update_every", 1)
    if end_step is not None and end_fraction is not None:
        raise ValueError(f"give end_step or end_fraction, not both (got {end_step} and {end_fraction})")
    if end_step is None:
        end_fraction = DEFAULT_END_FRACTION[name] if end_fraction is None else end_fraction
        end_fraction = _checks.number(end_fraction, "end_fraction", lambda value: 0 < value <= 1, "in (0, 1]")
        end_step = max(1, round(end_fraction * total_steps))
    else:
        end_step = _checks.count(end_step, "end_step", 1)
    if function is not None:
        return Schedule(name, update_every, end_step, total_steps, None, None, function)
    drop_fraction = _fraction(DEFAULT_DROP_FRACTION[name] if drop_fraction is None else drop_fraction,
                              "drop_fraction")
    if final_drop_fraction is not None and name != "annealed":
        raise ValueError(f"final_drop_fraction applies only to schedule='annealed', got schedule={name!r}")
    final_drop_fraction = _fraction(DEFAULT_FINAL_DROP_FRACTION if final_drop_fraction is None
                                    else final_drop_fraction, "final_drop_fraction")
    return Schedule(name, update_every, end_step, total_steps, drop_fraction, final_drop_fraction)


def _fraction(value, name: str) -> float:
    return _checks.number(value, name, lambda value: 0 <= value <= 1, "in [0, 1]")
