import copy
import functools
import math
import pickle
import warnings

import numpy as np
import pytest
import torch

import sparsekern
from sparsekern.algorithms import schedules


@pytest.mark.parametrize("step", [0, 1, 37, 374, 749, 750, 751, 999, 1000])
def test_cosine_matches_rigl_formula_and_stops_at_end(step):
    schedule = schedules.make("cosine", 1000)
    assert schedule.end_step == 750 and schedule.drop_fraction == 0.3
    expected = 0.3 / 2 * (1 + math.cos(math.pi * step / 750)) if step < 750 else 0.0
    assert schedule.fraction(step) == pytest.approx(expected, abs=1e-15)


def test_cosine_probe_values():
    assert schedules.cosine(0, end_step=100) == pytest.approx(0.3)
    assert schedules.cosine(50, end_step=100) == pytest.approx(0.15)
    assert schedules.cosine(25, drop_fraction=0.5, end_step=100) == pytest.approx(0.25 * (1 + math.sqrt(0.5)))


@pytest.mark.parametrize("step", [0, 1, 400, 999, 1000])
def test_annealed_goes_from_half_to_final_over_all_training(step):
    schedule = schedules.make("annealed", 1000)
    assert schedule.end_step == 1000
    expected = 0.005 + (0.5 - 0.005) / 2 * (1 + math.cos(math.pi * step / 1000))
    assert schedule.fraction(step) == pytest.approx(expected, abs=1e-15)
    assert schedules.annealed(0, end_step=1000) == pytest.approx(0.5)
    assert schedules.annealed(1000, end_step=1000) == pytest.approx(0.005)
    # Past its end point it stays at the final fraction: the cosine does not climb back.
    assert schedules.annealed(1500, end_step=1000) == pytest.approx(0.005, abs=1e-15)


def test_constant_and_options():
    schedule = schedules.make("constant", 500, drop_fraction=0.2)
    assert [schedule.fraction(t) for t in (0, 250, 499)] == [0.2, 0.2, 0.2]
    assert schedule.end_step == 375  # SET and MEST stop at 75%, as RigL's paper runs SET
    annealed = schedules.make("annealed", 100, drop_fraction=0.4, final_drop_fraction=0.1)
    assert annealed.fraction(100) == pytest.approx(0.1) and annealed.fraction(0) == pytest.approx(0.4)


@pytest.mark.parametrize("name", ["cosine", "constant", "annealed"])
def test_updates_only_on_multiples_before_end_step(name):
    schedule = schedules.make(name, 1000, update_every=100)
    updates = [t for t in range(0, 1200) if schedule.is_update(t)]
    last = 900 if name == "annealed" else 700
    assert updates == list(range(100, last + 1, 100))
    explicit = schedules.make(name, 1000, update_every=30, end_step=95)
    assert [t for t in range(200) if explicit.is_update(t)] == [30, 60, 90]


@pytest.mark.parametrize("arguments, error, word", [
    (dict(name="linear", total_steps=10), ValueError, "schedule"),
    (dict(name=3, total_steps=10), TypeError, "schedule"),
    (dict(name="cosine", total_steps=0), ValueError, "total_steps"),
    (dict(name="cosine", total_steps=1.5), TypeError, "total_steps"),
    (dict(name="cosine", total_steps=10, update_every=0), ValueError, "update_every"),
    (dict(name="cosine", total_steps=10, end_step=-1), ValueError, "end_step"),
    (dict(name="cosine", total_steps=10, end_step=5, end_fraction=0.5), ValueError, "end_step or end_fraction"),
    (dict(name="constant", total_steps=10, end_fraction=0), ValueError, "end_fraction"),
    (dict(name="constant", total_steps=10, end_fraction=1.5), ValueError, "end_fraction"),
    # Campaign 28: a negative one was said to need [0, 1], which holds 0, which is refused
    (dict(name="constant", total_steps=10, end_fraction=-0.1), ValueError, r"end_fraction .* in \(0, 1\], got -0.1"),
    (dict(name="annealed", total_steps=10, end_fraction=float("nan")), ValueError, "end_fraction"),
    (dict(name="annealed", total_steps=10, end_fraction="0.5"), TypeError, "end_fraction"),
    (dict(name="cosine", total_steps=10, drop_fraction=1.5), ValueError, "drop_fraction"),
    (dict(name="cosine", total_steps=10, drop_fraction="a"), TypeError, "drop_fraction"),
    (dict(name="cosine", total_steps=10, final_drop_fraction=0.1), ValueError, "final_drop_fraction"),
    (dict(name="annealed", total_steps=10, final_drop_fraction=-0.1), ValueError, "final_drop_fraction"),
])
def test_bad_arguments_name_themselves(arguments, error, word):
    name = arguments.pop("name")
    with pytest.raises(error, match=word):
        schedules.make(name, **arguments)


@pytest.mark.parametrize("name, default_end", [("cosine", 0.75), ("constant", 0.75), ("annealed", 1.0)])
@pytest.mark.parametrize("end_fraction", [None, 0.5, 1.0, 0.001])
def test_every_schedule_has_an_end_point_and_no_update_after_it(name, default_end, end_fraction):
    """Check 4: no update from T_end on, whatever the schedule; T_end = round(f·T), at least 1."""
    schedule = schedules.make(name, 400, update_every=10, end_fraction=end_fraction)
    fraction = default_end if end_fraction is None else end_fraction
    assert schedule.end_step == max(1, round(fraction * 400))
    updates = [t for t in range(1, 500) if schedule.is_update(t)]
    assert all(t < schedule.end_step for t in updates)
    assert updates == list(range(10, schedule.end_step, 10))


def test_annealed_reaches_its_final_fraction_at_its_end_point():
    schedule = schedules.make("annealed", 1000, end_step=600)
    assert schedule.fraction(0) == pytest.approx(0.5) and schedule.fraction(600) == pytest.approx(0.005)
    assert schedule.fraction(300) == pytest.approx(0.005 + (0.5 - 0.005) / 2)


def _dst_update_steps(preset, total_steps, **options):
    torch.manual_seed(0)
    model = sparsekern.sparsify(torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)),
                                0.3, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    algo = getattr(sparsekern, preset)(model, optimizer, total_steps=total_steps, update_every=5, **options)
    updated = []
    for step in range(1, total_steps + 1):
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(torch.randn(6, 8)), torch.randint(0, 4, (6,))).backward()
        if algo.step():
            updated.append(step)
        optimizer.step()
    return updated, algo.schedule


@pytest.mark.parametrize("preset", ["RigL", "SET", "MEST"])
def test_presets_stop_updating_at_75_percent_of_training(preset):
    updated, schedule = _dst_update_steps(preset, 100)
    assert schedule.end_step == 75 and updated == list(range(5, 75, 5))


def test_dst_takes_an_end_fraction_or_an_end_step():
    updated, _ = _dst_update_steps("SET", 100, end_fraction=1.0)  # Mocanu's: update to the end
    assert updated == list(range(5, 100, 5))
    updated, _ = _dst_update_steps("DST", 100, schedule="annealed", end_step=42)
    assert updated == list(range(5, 42, 5))
    with pytest.raises(ValueError, match="end_step or end_fraction"):
        _dst_update_steps("RigL", 100, end_step=10, end_fraction=0.5)


# -- the specification's schedules, as swap counts worked out by hand --
# One 10×8 layer with 40 active weights of distinct magnitudes; at every step the inactive entries get far
# larger gradients than the active ones, so growth takes only entries inactive before the update and the
# entries an update drops are exactly old & ~new: n = round(r(t) · 40).


def _drop_counts(total_steps, update_every, algorithm=sparsekern.DST, **options):
    """{step: entries dropped} over every step() of `algorithm` (magnitude pruning, gradient growth) on the
    layer above."""
    layer = sparsekern.nn.SparseLinear(8, 10, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.arange(1, 81, dtype=torch.float32).view(10, 8) / 80)
    layer.set_mask(torch.arange(80).view(10, 8) % 2 == 0)
    model = torch.nn.Sequential(layer)
    options = {"prune": "magnitude", "grow": "gradient", **options}
    algo = algorithm(model, torch.optim.SGD(model.parameters(), lr=0.1), total_steps=total_steps,
                     update_every=update_every, **options)
    dropped = {}
    for step in range(1, total_steps + 1):
        old = layer.mask.clone()
        layer.weight.grad = torch.where(old, 0.01, 1000.0) + torch.arange(80.0).view(10, 8) / 1000
        updated = algo.step()
        assert int(layer.mask.sum()) == 40
        if updated:
            dropped[step] = int((old & ~layer.mask).sum())
        else:
            assert torch.equal(layer.mask, old)
    return dropped


def test_cosine_drop_counts_by_hand():
    # T = 12, T_end = 0.75·12 = 9, ΔT = 3: updates at 3 and 6 (none at 9 or after).
    # r(3) = 0.15·(1 + cos(π/3)) = 0.225 -> 9 of 40; r(6) = 0.15·(1 + cos(2π/3)) = 0.075 -> 3.
    assert _drop_counts(12, 3, schedule="cosine") == {3: 9, 6: 3}


def test_annealed_drop_counts_by_hand():
    # T = T_end = 8, ΔT = 2: updates at 2, 4, 6. r(t) = 0.005 + 0.2475·(1 + cos(π t/8)):
    # r(2) = 0.42751 -> 17.1 -> 17; r(4) = 0.2525 -> 10.1 -> 10; r(6) = 0.077491 -> 3.0996 -> 3.
    assert _drop_counts(8, 2, schedule="annealed") == {2: 17, 4: 10, 6: 3}


def test_constant_drop_counts_by_hand_stop_at_75_percent():
    # T = 8, T_end = 6, ΔT = 2: updates at 2 and 4, each round(0.3·40) = 12.
    assert _drop_counts(8, 2, schedule="constant") == {2: 12, 4: 12}
    # With the end point moved to the end (Mocanu's SET): 2, 4 and 6.
    assert _drop_counts(8, 2, schedule="constant", end_fraction=1.0) == {2: 12, 4: 12, 6: 12}


def test_the_end_point_is_the_rounded_fraction_of_training_by_hand():
    # 0.75 · 13 = 9.75 rounds to 10 (truncated, 9); 0.75 · 10 = 7.5 to 8, Python's round halving to even.
    assert schedules.make("cosine", 13).end_step == 10
    assert schedules.make("cosine", 10).end_step == 8


def test_a_drop_fraction_of_0_is_a_schedule_that_swaps_nothing():
    assert schedules.make("constant", 100, drop_fraction=0.0).fraction(50) == 0.0
    annealed = schedules.make("annealed", 100, drop_fraction=0.0, final_drop_fraction=0.0)
    assert annealed.fraction(50) == 0.0


def test_default_schedule_constants_by_hand():
    rigl = schedules.make("cosine", 1000)
    assert (rigl.update_every, rigl.end_step, rigl.drop_fraction) == (100, 750, 0.3)
    fantastic = schedules.make("annealed", 1000)
    assert (fantastic.end_step, fantastic.drop_fraction, fantastic.final_drop_fraction) == (1000, 0.5, 0.005)
    constant = schedules.make("constant", 1000)
    assert (constant.update_every, constant.end_step) == (100, 750)


def test_annealed_updates_every_800_steps_by_default_as_the_fantastic_weights_code():
    assert schedules.make("annealed", 10000).update_every == 800
    assert schedules.make("annealed", 10000, update_every=50).update_every == 50
    model = sparsekern.sparsify(torch.nn.Sequential(torch.nn.Linear(8, 4)), 0.5,
                                generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    assert sparsekern.DST(model, optimizer, schedule="annealed", total_steps=10000).schedule.update_every == 800
    assert sparsekern.RigL(model, optimizer, total_steps=10000).schedule.update_every == 100


# -- the swap count's rounding: n = round(r·A) (halves to even) by default, floor(r·A) as RigL's code, ceil(r·A) as
# the Fantastic Weights code --

@pytest.mark.parametrize("fraction, rounded, floored, ceiled", [
    (0.0625, 2, 2, 3),    # r·A = 2.5: round halves to even, 2; floor 2; ceil 3
    (0.0875, 4, 3, 4),    # r·A = 3.5: round 4 (even); floor 3; ceil 4
    (0.0925, 4, 3, 4),    # r·A = 3.7: round 4; floor 3; ceil 4
    (0.0025, 0, 0, 1),    # r·A = 0.1: only ceil swaps a weight
    (0.075, 3, 3, 3),     # r·A = 3.0 (in floats too): all 3
])
def test_swap_rounding_drop_counts_by_hand(fraction, rounded, floored, ceiled):
    # A = 40 active; constant schedule, T = 4, ΔT = 2, end point at the end: one update, at step 2.
    options = dict(schedule="constant", drop_fraction=fraction, end_fraction=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # r·A = 0.1 rounds to 0 under round and floor, as DST warns
        assert _drop_counts(4, 2, **options) == {2: rounded}
        assert _drop_counts(4, 2, swap_rounding="round", **options) == {2: rounded}
        assert _drop_counts(4, 2, swap_rounding="floor", **options) == {2: floored}
    assert _drop_counts(4, 2, swap_rounding="ceil", **options) == {2: ceiled}


def test_floor_and_ceil_are_of_the_float_product_as_the_codes_take_them():
    # 0.07 · 100 is 7.000000000000001 in floats: RigL's code floors it to 7, the Fantastic Weights code's math.ceil
    # gives 8. A factor at most 1 keeps the product at most the count: no ceiling beyond it.
    from sparsekern.algorithms.dst import _swap_count
    assert [_swap_count(0.07, 100, rounding) for rounding in ("round", "floor", "ceil")] == [7, 7, 8]
    assert _swap_count(1.0, 37, "ceil") == 37 and _swap_count(0.0, 37, "ceil") == 0


def test_rigl_with_floor_rounding_drop_counts_by_hand():
    # As test_cosine_drop_counts_by_hand: r(3)·40 = 9 -> 9; r(6)·40 = 3 (3.000000000000001 in floats) -> 3.
    assert _drop_counts(12, 3, algorithm=sparsekern.RigL, swap_rounding="floor") == {3: 9, 6: 3}
    # Annealed over T = 8: r(2)·40 = 17.1 -> 17, r(4)·40 = 10.1 -> 10, r(6)·40 = 3.0996 -> 3, as round gives; at
    # α = 0.4 instead: r(2)·40 = 0.005 + 0.1975·(1 + cos(π/4)) = 0.34215 -> 13.686: round 14, floor 13;
    # r(4) = 0.2025 -> 8.1: 8 both; r(6) = 0.062846 -> 2.5139: round 3, floor 2.
    options = dict(schedule="annealed", drop_fraction=0.4)
    assert _drop_counts(8, 2, algorithm=sparsekern.RigL, **options) == {2: 14, 4: 8, 6: 3}
    assert _drop_counts(8, 2, algorithm=sparsekern.RigL, swap_rounding="floor", **options) == {2: 13, 4: 8, 6: 2}


def _swap_counts_passed(monkeypatch, swap_rounding, **options):
    """The swap counts DST hands to ops.prune_grow at its one update, on two layers holding 20 and 17 active
    weights (block (1, 1) blocks: the same counts), at r = 0.1."""
    passed = []
    original = sparsekern.ops.prune_grow
    monkeypatch.setattr(sparsekern.ops, "prune_grow", lambda *a, **k: (passed.append(a[4]), original(*a, **k))[1])
    layers = [sparsekern.nn.SparseLinear(8, 5, bias=False), sparsekern.nn.SparseLinear(5, 6, bias=False)]
    for layer, active in zip(layers, (20, 17)):
        layer.set_mask(torch.arange(layer.weight.numel()).view_as(layer.weight) < active)
    model = torch.nn.Sequential(*layers)
    algo = sparsekern.DST(model, torch.optim.SGD(model.parameters(), lr=0.1), schedule="constant",
                          drop_fraction=0.1, update_every=1, total_steps=4, swap_rounding=swap_rounding, **options)
    for layer in layers:
        layer.weight.grad = torch.rand(layer.weight.shape, generator=torch.Generator().manual_seed(0))
    assert algo.step()
    return passed


@pytest.mark.parametrize("options", [{}, dict(block=(1, 1)), dict(host_checks=False)])
def test_swap_rounding_in_layer_and_global_scope_by_hand(monkeypatch, options):
    # Layer scope: r·A = 2.0 and 1.7, round 2 and 2, floor 2 and 1, ceil 2 and 2. Global: r·37 = 3.7, round 4,
    # floor 3, ceil 4.
    assert _swap_counts_passed(monkeypatch, "round", **options) == [[2, 2]]
    monkeypatch.undo()
    assert _swap_counts_passed(monkeypatch, "floor", **options) == [[2, 1]]
    monkeypatch.undo()
    assert _swap_counts_passed(monkeypatch, "round", scope="global", **options) == [4]
    monkeypatch.undo()
    assert _swap_counts_passed(monkeypatch, "floor", scope="global", **options) == [3]
    monkeypatch.undo()
    assert _swap_counts_passed(monkeypatch, "ceil", **options) == [[2, 2]]
    monkeypatch.undo()
    assert _swap_counts_passed(monkeypatch, "ceil", scope="global", **options) == [4]


@pytest.mark.parametrize("value, error", [("up", ValueError), ("Floor", ValueError), (None, TypeError),
                                          (1, TypeError)])
def test_swap_rounding_is_validated_naming_the_argument(value, error):
    model = sparsekern.sparsify(torch.nn.Sequential(torch.nn.Linear(8, 4)), 0.5,
                                generator=torch.Generator().manual_seed(0))
    with pytest.raises(error, match="swap_rounding"):
        sparsekern.DST(model, torch.optim.SGD(model.parameters(), lr=0.1), total_steps=10, swap_rounding=value)


# -- a schedule of one's own: a function r(t) of the step --

def _linear(step):
    """A linear decay from 0.5 at step 0 to 0 at step 12."""
    return 0.5 * (1 - step / 12)


def _steps_down(step):
    """A step decay: 0.4, halved every 4 steps."""
    return 0.4 * 0.5 ** (step // 4)


@pytest.mark.parametrize("function", [_linear, _steps_down])
@pytest.mark.parametrize("swap_rounding, whole", [("round", round), ("floor", math.floor), ("ceil", math.ceil)])
def test_a_schedule_functions_fractions_make_each_updates_swap_count(function, swap_rounding, whole):
    # 40 active weights (as the counts by hand above): each update drops whole(r(t) · 40), the fraction the function
    # gives at that step. Called at the update steps alone (3, 6 and 9: to the end of training by default, the end
    # point excluded), once each.
    calls = []
    def recorded(step):
        calls.append(step)
        return function(step)
    dropped = _drop_counts(12, 3, schedule=recorded, swap_rounding=swap_rounding)
    assert dropped == {step: whole(function(step) * 40) for step in (3, 6, 9)}
    assert calls == [3, 6, 9]
    assert len(set(dropped.values())) > 1   # the fractions move: no count is the constant's by chance


@pytest.mark.parametrize("options, updates", [(dict(end_fraction=0.75), [3, 6]), (dict(end_step=9), [3, 6]),
                                              (dict(end_step=10), [3, 6, 9]), (dict(update_every=4), [4, 8])])
def test_a_schedule_functions_end_point_and_update_every_are_the_named_schedules(options, updates):
    options = {"update_every": 3, **options}
    schedule = schedules.make(_linear, 12, **options)
    assert (schedule.name, schedule.function, schedule.drop_fraction, schedule.final_drop_fraction) == (
        schedules.FUNCTION, _linear, None, None)
    assert [step for step in range(30) if schedule.is_update(step)] == updates
    assert _drop_counts(12, options.pop("update_every"), schedule=_linear, **options) == {
        step: round(_linear(step) * 40) for step in updates}


def test_a_schedule_functions_defaults():
    # RigL's ΔT, and the end of training: the function states the whole schedule.
    schedule = schedules.make(_linear, 1000)
    assert (schedule.update_every, schedule.end_step, schedule.total_steps) == (100, 1000, 1000)


@pytest.mark.parametrize("value", [0, 1, 0.25, np.float32(0.25), np.float64(0.75), np.int64(1)])
def test_a_schedule_function_may_give_any_real_number_in_0_1(value):
    fraction = schedules.make(lambda step: value, 10).fraction(3)
    assert type(fraction) is float and fraction == float(value)


def _run(schedule, prune, grow, **options):
    """Masks and weights after every step of a short DST run (two layers, momentum SGD) under `schedule`."""
    torch.manual_seed(0)
    model = sparsekern.sparsify(torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)),
                                0.3, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    algo = sparsekern.DST(model, optimizer, prune=prune, grow=grow, schedule=schedule, update_every=2, total_steps=20,
                          seed=3, **options)
    data = torch.Generator().manual_seed(1)
    trace = []
    for _ in range(20):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(torch.randn(6, 8, generator=data)),
                                          torch.randint(0, 4, (6,), generator=data)).backward()
        algo.step()
        optimizer.step()
        trace.append([(module.mask.clone(), module.weight.detach().clone())
                      for _, module in sparsekern.nn.sparse_modules(model)])
    return trace


@pytest.mark.parametrize("name, function", [
    ("cosine", functools.partial(schedules.cosine, drop_fraction=0.3, end_step=15)),
    ("constant", functools.partial(schedules.constant, drop_fraction=0.3)),
    ("annealed", functools.partial(schedules.annealed, drop_fraction=0.5, final_drop_fraction=0.005, end_step=15)),
])
@pytest.mark.parametrize("prune, grow", [("magnitude", "gradient"), ("random", "random")])
def test_a_function_that_is_a_named_schedule_gives_its_masks_bit_for_bit(name, function, prune, grow):
    # Its fractions, at its end point (15: updates at 2, 4, ..., 14), from the same seed.
    named = _run(name, prune, grow, end_step=15)
    own = _run(function, prune, grow, end_step=15)
    assert all(torch.equal(a, b) for step_a, step_b in zip(named, own) for pair_a, pair_b in zip(step_a, step_b)
               for a, b in zip(pair_a, pair_b))
    assert not torch.equal(named[0][0][0], named[-1][0][0])   # the masks did move


@pytest.mark.parametrize("schedule, options, error, words", [
    (3, {}, TypeError, r"schedule must be the name of one of \['annealed', 'constant', 'cosine'\] or a function of "
                       r"the step \(step -> drop fraction\), got a int"),
    (None, {}, TypeError, "schedule must be the name of one of .* or a function of the step"),
    # What make returns, which a researcher with a schedule of their own may try: its options are DST's arguments.
    (schedules.make("cosine", 100, update_every=10), {}, TypeError,
     "got a Schedule: the options of a schedule are arguments of their own .*update_every"),
    (lambda: 0.3, {}, TypeError, r"schedule must be callable as schedule\(step\)"),
    (lambda step, total: 0.3, {}, TypeError, r"schedule must be callable as schedule\(step\)"),
    (_linear, dict(drop_fraction=0.3), ValueError,
     "drop_fraction is an option of the named schedules, not of a function of one's own \\(schedule=_linear\\)"),
    (_linear, dict(final_drop_fraction=0.01), ValueError, "final_drop_fraction is an option of the named schedules"),
    (_linear, dict(end_fraction=0), ValueError, "end_fraction"),
    (_linear, dict(update_every=0), ValueError, "update_every"),
    (_linear, dict(end_step=5, end_fraction=0.5), ValueError, "end_step or end_fraction"),
])
def test_dst_refuses_a_bad_schedule_naming_the_argument_with_nothing_changed(schedule, options, error, words):
    model = sparsekern.sparsify(torch.nn.Sequential(torch.nn.Linear(8, 8)), 0.5,
                                generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=words):
        schedules.make(schedule, 100, **options)
    with pytest.raises(error, match=words):
        sparsekern.DST(model, optimizer, schedule=schedule, total_steps=100, **options)
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())


def _raises(step):
    return 1 / (step - 2)


@pytest.mark.parametrize("function, error, words", [
    (lambda step: 1.5, ValueError, r"the drop fraction schedule=<lambda> gave at step 2 must be a finite number in "
                                   r"\[0, 1\], got 1.5"),
    (lambda step: -0.1, ValueError, r"schedule=<lambda> gave at step 2 must be a finite number in \[0, 1\], got -0.1"),
    (lambda step: float("nan"), ValueError, "at step 2 must be a finite number in .*, got nan"),
    (lambda step: float("inf"), ValueError, "at step 2 must be a finite number in .*, got inf"),
    (lambda step: "0.3", TypeError, "the drop fraction schedule=<lambda> gave at step 2 must be a number, got str"),
    (lambda step: None, TypeError, "at step 2 must be a number, got NoneType"),
    (lambda step: True, TypeError, "at step 2 must be a number, got bool"),
    (lambda step: torch.tensor(0.3), TypeError, "at step 2 must be a number, got Tensor"),
    (_raises, RuntimeError, "schedule=_raises raised ZeroDivisionError at step 2: division by zero"),
])
def test_a_bad_fraction_or_error_of_a_schedule_function_is_raised_naming_it_and_the_step_before_any_change(
        function, error, words):
    # The update step's checks come before any change: masks, weights, gradients, the step count and the random
    # stream are as they were (tests/test_bad_inputs.py compares every piece of state).
    layer = sparsekern.nn.SparseLinear(8, 10, bias=False)
    layer.set_mask(torch.arange(80).view(10, 8) % 2 == 0)
    model = torch.nn.Sequential(layer)
    algo = sparsekern.DST(model, torch.optim.SGD(model.parameters(), lr=0.1), grow="random", schedule=function,
                          update_every=2, total_steps=10)
    layer.weight.grad = torch.ones(10, 8)
    assert not algo.step()
    layer.weight.grad = torch.rand(10, 8)
    mask, grad, stream = layer.mask.clone(), layer.weight.grad.clone(), algo.generator.get_state()
    with pytest.raises(error, match=words) as raised:
        algo.step()
    assert algo.step_count == 1 and torch.equal(layer.mask, mask) and torch.equal(layer.weight.grad, grad)
    assert torch.equal(algo.generator.get_state(), stream) and layer.dense_grad
    if error is RuntimeError:
        assert isinstance(raised.value.__cause__, ZeroDivisionError)   # the function's own error, chained


def test_an_update_step_refused_by_its_schedule_function_may_be_made_again():
    # Not counted, the step is still due: a second call, the function giving a fraction now, makes the update.
    answers = iter([float("nan"), 0.25])
    layer = sparsekern.nn.SparseLinear(8, 10, bias=False)
    layer.set_mask(torch.arange(80).view(10, 8) % 2 == 0)
    model = torch.nn.Sequential(layer)
    algo = sparsekern.DST(model, torch.optim.SGD(model.parameters(), lr=0.1), schedule=lambda step: next(answers),
                          update_every=1, total_steps=10)
    before = layer.mask.clone()
    layer.weight.grad = torch.where(before, 0.01, 1000.0)   # growth takes none of the dropped weights back
    with pytest.raises(ValueError, match="at step 1 must be a finite number"):
        algo.step()
    assert algo.step() and algo.step_count == 1
    assert int((before & ~layer.mask).sum()) == 10   # round(0.25 · 40)


def test_a_schedule_function_that_reaches_no_update_step_warns_as_a_named_one_and_is_never_called():
    calls = []
    model = sparsekern.sparsify(torch.nn.Sequential(torch.nn.Linear(8, 8)), 0.5,
                                generator=torch.Generator().manual_seed(0))
    with pytest.warns(sparsekern.algorithms.dst.NoUpdateWarning, match="update_every=200 reaches no step before "
                                                                       "end_step=100"):
        sparsekern.DST(model, torch.optim.SGD(model.parameters(), lr=0.1), schedule=lambda step: calls.append(step),
                       update_every=200, total_steps=100)
    assert calls == []


def _dst_of(schedule):
    model = sparsekern.sparsify(torch.nn.Sequential(torch.nn.Linear(8, 8)), 0.5,
                                generator=torch.Generator().manual_seed(0))
    return sparsekern.DST(model, torch.optim.SGD(model.parameters(), lr=0.1), schedule=schedule, update_every=2,
                          total_steps=10)


def test_a_dst_with_a_module_level_schedule_function_pickles_and_one_with_a_lambda_copies():
    loaded = pickle.loads(pickle.dumps(_dst_of(_linear)))
    assert loaded.schedule == schedules.make(_linear, 10, update_every=2)
    lambda_schedule = _dst_of(lambda step: 0.25)
    for copied in (copy.deepcopy(lambda_schedule), copy.copy(lambda_schedule)):
        assert copied.schedule == lambda_schedule.schedule and copied.schedule.fraction(2) == 0.25
