import math
import warnings

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


@pytest.mark.parametrize("schedule", [schedules.make("cosine", 100, update_every=10), lambda step: 0.3],
                         ids=["Schedule", "function"])
def test_dst_refuses_a_schedule_of_ones_own_saying_what_it_takes_instead(schedule):
    # What a researcher with a drop fraction of their own tries first: say that the options are DST's arguments,
    # and where a count of one's own can come from.
    model = sparsekern.sparsify(torch.nn.Sequential(torch.nn.Linear(8, 8)), 0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match=r"schedule must be the name of one of \['annealed', 'constant', 'cosine'\], "
                                        r"got a (Schedule|function): its options are .*update_every.*decides_count"):
        sparsekern.DST(model, optimizer, schedule=schedule, total_steps=100)
