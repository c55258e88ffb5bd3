import math

import pytest

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
    assert schedules.annealed(0, total_steps=1000) == pytest.approx(0.5)
    assert schedules.annealed(1000, total_steps=1000) == pytest.approx(0.005)


def test_constant_and_options():
    schedule = schedules.make("constant", 500, drop_fraction=0.2)
    assert [schedule.fraction(t) for t in (0, 250, 499)] == [0.2, 0.2, 0.2]
    assert schedule.end_step == 500
    annealed = schedules.make("annealed", 100, drop_fraction=0.4, final_drop_fraction=0.1)
    assert annealed.fraction(100) == pytest.approx(0.1) and annealed.fraction(0) == pytest.approx(0.4)


@pytest.mark.parametrize("name", ["cosine", "constant", "annealed"])
def test_updates_only_on_multiples_before_end_step(name):
    schedule = schedules.make(name, 1000, update_every=100)
    updates = [t for t in range(0, 1200) if schedule.is_update(t)]
    last = 700 if name == "cosine" else 900
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
    (dict(name="cosine", total_steps=10, drop_fraction=1.5), ValueError, "drop_fraction"),
    (dict(name="cosine", total_steps=10, drop_fraction="a"), TypeError, "drop_fraction"),
    (dict(name="cosine", total_steps=10, final_drop_fraction=0.1), ValueError, "final_drop_fraction"),
    (dict(name="annealed", total_steps=10, final_drop_fraction=-0.1), ValueError, "final_drop_fraction"),
])
def test_bad_arguments_name_themselves(arguments, error, word):
    name = arguments.pop("name")
    with pytest.raises(error, match=word):
        schedules.make(name, **arguments)
