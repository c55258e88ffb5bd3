"""Interrupting and resuming: a run stopped anywhere and resumed from a checkpoint (written with torch.save,
read back with weights_only=True) ends bit for bit where the uninterrupted run ends, and a state that does not
belong to the algorithm it is loaded into (another algorithm, other settings, another number of ranks) is
refused with nothing changed."""
import copy
import dataclasses
import io
import itertools
import re
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import sparsekern
from sparsekern.algorithms import IMP, SWAMP, OptG, _tickets, criteria, schedules
from sparsekern.nn import sparse_modules

from ..helpers import batch, mlp, torchrun

pytestmark = pytest.mark.usefixtures("one_thread")


def _through_a_file(state):
    """`state` saved with torch.save and loaded back as users are told to, with weights_only=True."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _same(a, b, where="state"):
    """The first difference between two nested states (tensors compared bit for bit), or None."""
    if isinstance(a, torch.Tensor):
        same = isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        return None if same else where
    if isinstance(a, dict):
        if not isinstance(b, dict) or a.keys() != b.keys():
            return f"{where} keys"
        return next((d for k in a if (d := _same(a[k], b[k], f"{where}[{k!r}]")) is not None), None)
    if isinstance(a, (list, tuple)):
        if not isinstance(b, (list, tuple)) or len(a) != len(b):
            return f"{where} length"
        return next((d for i, (x, y) in enumerate(zip(a, b)) if (d := _same(x, y, f"{where}[{i}]")) is not None),
                    None)
    return None if a == b else f"{where}: {a!r} != {b!r}"


# -- DST: every pruning criterion, both growths and scopes, at the awkward points of its schedule -----------

DST_STEPS, DST_EVERY = 14, 3   # cosine, ending at 75%: updates at steps 3, 6 and 9


def _dst_run(dst, stop=None):
    """(model, optimizer, lr scheduler, DST) state after DST_STEPS steps under momentum SGD and a StepLR; with
    `stop`, the run is checkpointed after `stop` steps and resumed on a newly built model from the file."""

    def build(seed):
        torch.manual_seed(seed)
        model = sparsekern.sparsify(nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 24),
                                                  nn.ReLU(), nn.Linear(24, 5)),
                                    0.3, distribution="uniform", generator=torch.Generator().manual_seed(seed))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
        return (model, optimizer, torch.optim.lr_scheduler.StepLR(optimizer, 3, gamma=0.7),
                sparsekern.DST(model, optimizer, update_every=DST_EVERY, total_steps=DST_STEPS, seed=5, **dst))

    parts = build(0)
    for step in range(DST_STEPS):
        if step == stop:
            saved = _through_a_file([part.state_dict() for part in parts])
            parts = build(1)   # another initialisation and mask, all replaced by the checkpoint
            for part, state in zip(parts, saved):
                part.load_state_dict(state)
        model, optimizer, scheduler, algorithm = parts
        generator = torch.Generator().manual_seed(1000 + step)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(torch.randn(8, 2, 6, 6, generator=generator)),
                                    torch.randint(0, 5, (8,), generator=generator)).backward()
        algorithm.step()
        optimizer.step()
        scheduler.step()
    return ([part.state_dict() for part in parts], [module.dense_grad for _, module in sparse_modules(parts[0])])


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("grow", sorted(criteria.GROW))
@pytest.mark.parametrize("prune", sorted(criteria.PRUNE))
def test_dst_resumed_around_its_mask_updates_ends_where_the_uninterrupted_run_ends(prune, grow, scope):
    # Stopped before an update step (its backward is dense), just after one, after the last one, and after the
    # schedule's end; random growth and pruning must resume their random stream too.
    dst = dict(prune=prune, grow=grow, scope=scope)
    uninterrupted = _dst_run(dst)
    for stop in (2, 3, 9, 12):
        assert _same(uninterrupted, _dst_run(dst, stop)) is None, stop


def _noisy_magnitude(weights, grads, masks, *, generator):
    return [w.abs() * torch.rand(w.shape, generator=generator) for w in weights]


def _noisy_gradient(weights, grads, masks, *, generator):
    return [g.abs() + torch.rand(g.shape, generator=generator) for g in grads]


# Criteria of a user's own, both drawing from DST's random stream, which a resumed run must go on with.
NOISY = sparsekern.Criterion("noisy_magnitude", _noisy_magnitude, reads_gradient=False, elementwise=True)
NOISY_RANK = sparsekern.Criterion("noisy_rank", _noisy_magnitude, reads_gradient=False, elementwise=False)
NOISY_GROWTH = sparsekern.Criterion("noisy_gradient", _noisy_gradient, reads_gradient=True, elementwise=True)


def _small_ones_dropped(weights, grads, masks, *, generator, n=None):
    """Marks the active weights below 0.05 dropped (0), the others kept (1): a rule deciding its own count, whose
    marks rank the same entries lowest when it does not."""
    return [torch.where(m & (w.abs() < 0.05), 0.0, 1.0) for w, m in zip(weights, masks)]


SMALL_ONES = sparsekern.Criterion("small_ones", _small_ones_dropped, reads_gradient=False, elementwise=False,
                                  decides_count=True)


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("prune, grow", [(NOISY, NOISY_GROWTH), (NOISY_RANK, "random"), ("snip", NOISY_GROWTH)])
def test_dst_with_criteria_of_a_users_own_resumes_where_the_uninterrupted_run_ends(prune, grow, scope):
    dst = dict(prune=prune, grow=grow, scope=scope)
    uninterrupted = _dst_run(dst)
    for stop in (2, 3, 9):
        assert _same(uninterrupted, _dst_run(dst, stop)) is None, stop


def _decaying(step):
    """A drop-fraction schedule of one's own: 0.4 decaying linearly to 0.1 at DST_STEPS (updates at 3, 6, 9 and 12, to
    the end of training by default)."""
    return 0.4 - 0.3 * step / DST_STEPS


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("prune, grow", [("magnitude", "gradient"), ("random", "random"), ("set", "random")])
def test_dst_with_a_schedule_function_resumes_where_the_uninterrupted_run_ends(prune, grow, scope):
    # The state holds no function: the resumed DST, built with the same one, goes on from the saved step.
    dst = dict(prune=prune, grow=grow, scope=scope, schedule=_decaying)
    uninterrupted = _dst_run(dst)
    assert uninterrupted[0][3]["schedule"]["name"] == schedules.FUNCTION
    for stop in (2, 3, 9, 12):
        assert _same(uninterrupted, _dst_run(dst, stop)) is None, stop


# -- a state that does not belong to the algorithm it is loaded into ---------------------------------------

def _sgd(parameters):
    return torch.optim.SGD(parameters, lr=0.05, momentum=0.9)


ALGORITHMS = {
    "DST": lambda model: sparsekern.RigL(model, torch.optim.SGD(model.parameters(), lr=0.1), update_every=2,
                                         total_steps=20),
    "IMP": lambda model: IMP(model, _sgd, prune_fraction=0.3),
    "SWAMP": lambda model: SWAMP(model, _sgd, particles=2, prune_fraction=0.3),
    "OptG": lambda model: OptG(model, sparsity=0.5, epochs=3),
}


def _refused_with_nothing_changed(algorithm, model, state, match):
    before = copy.deepcopy((algorithm.state_dict(), model.state_dict()))
    with pytest.raises(ValueError, match=match):
        algorithm.load_state_dict(state)
    assert _same(before, (algorithm.state_dict(), model.state_dict())) is None


@pytest.mark.parametrize("saved, loaded", list(itertools.permutations(sorted(ALGORITHMS), 2)))
def test_a_state_of_another_algorithm_is_refused(saved, loaded):
    # A SWAMP state holds every entry of an IMP state: IMP loaded it, took its counters and θ_k for its own, and
    # trained on as though it were an IMP run.
    state = _through_a_file(ALGORITHMS[saved](mlp(0, hidden=8)).state_dict())
    model = mlp(1, hidden=8)
    _refused_with_nothing_changed(ALGORITHMS[loaded](model), model, state, "state")


@pytest.mark.parametrize("saved, loaded, words", [
    (dict(prune="set", grow="random"), dict(prune="mest", grow="random"), "prune='set', not 'mest'"),
    (dict(grow="gradient"), dict(grow="random"), "grow='gradient', not 'random'"),
    (dict(scope="layer"), dict(scope="global"), "scope='layer', not 'global'"),
    (dict(block=(2, 2)), dict(block=None), r"block=\(2, 2\), not None"),
    (dict(block=(2, 2)), dict(block=(2, 4)), r"block=\(2, 2\), not \(2, 4\)"),
    (dict(reset_state=False), dict(reset_state=True), "reset_state=False, not True"),
    (dict(prune="mest", mest_gamma=0.5), dict(prune="mest"), "mest_gamma=0.5, not 1.0"),
    (dict(prune="sensitivity", sensitivity_offset=1.0), dict(prune="sensitivity"), "sensitivity_offset=1.0, not 1e-08"),
    (dict(prune="snip", snip_shift=1e-5), dict(prune="snip"), "snip_shift=1e-05, not 0.0"),
    (dict(prune="snip"), dict(prune="snip", snip_shift=1e-5), "snip_shift=0.0, not 1e-05"),
    (dict(swap_rounding="floor"), dict(), "swap_rounding='floor', not 'round'"),
    (dict(swap_rounding="round"), dict(swap_rounding="floor"), "swap_rounding='round', not 'floor'"),
    (dict(prune=NOISY), dict(prune="magnitude"), "prune='noisy_magnitude', not 'magnitude'"),
    (dict(prune="magnitude"), dict(prune=NOISY), "prune='magnitude', not 'noisy_magnitude'"),
    (dict(prune=NOISY), dict(prune=NOISY_RANK), "prune='noisy_magnitude', not 'noisy_rank'"),
    (dict(grow=NOISY_GROWTH), dict(grow="gradient"), "grow='noisy_gradient', not 'gradient'"),
])
def test_a_dst_state_saved_with_other_criteria_scope_or_blocks_is_refused(saved, loaded, words):
    # The state held no criteria: a SET run resumed as MEST, or a layer-scope run as a global one, went on under
    # the other rule without a word.
    def dst(model, options):
        return sparsekern.DST(model, torch.optim.SGD(model.parameters(), lr=0.1), update_every=2, total_steps=20,
                              schedule="constant", **options)

    state = _through_a_file(dst(mlp(0, hidden=8), saved).state_dict())
    model = mlp(0, hidden=8)
    _refused_with_nothing_changed(dst(model, loaded), model, state, f"saved with {words}")
    dst(mlp(0, hidden=8), saved).load_state_dict(state)   # the same settings load


def _halving(step):
    return 0.4 * 0.5 ** (step // 6)


def test_a_state_saved_with_a_schedule_function_loads_into_a_dst_built_with_one_and_only_such():
    state = _through_a_file(_dst_of(mlp(0, hidden=8), schedule=_decaying).state_dict())
    assert state["schedule"] == {"name": "function", "update_every": 2, "end_step": 20, "total_steps": 20,
                                 "drop_fraction": None, "final_drop_fraction": None}
    # A named schedule cannot go on with the saving run's fractions, which no state holds.
    model = mlp(0, hidden=8)
    _refused_with_nothing_changed(_dst_of(model, schedule="cosine"), model, state,
                                  r"state\['schedule'\] was saved with a schedule function of one's own \(name "
                                  r"'function'\), not schedule='cosine'")
    # A function is the resuming DST's own, whichever it is: no name of a function tells it apart in another process.
    other = _dst_of(mlp(0, hidden=8), schedule=_halving)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        other.load_state_dict(state)
    assert other.schedule == schedules.make(_halving, 20, update_every=2)
    # Its timing is the saved one, which replaces the built one as for a named schedule, with the same warning.
    longer = _dst_of(mlp(0, hidden=8), schedule=_decaying, total_steps=40, update_every=4)
    with pytest.warns(UserWarning, match=r"replaces the one this DST was built with \(update_every: 4 -> 2, end_step: "
                                         r"40 -> 20, total_steps: 40 -> 20\)"):
        longer.load_state_dict(state)
    assert longer.schedule == schedules.make(_decaying, 20, update_every=2)


def test_a_named_schedules_state_replaces_a_schedule_function_as_any_saved_schedule_replaces_the_built_one():
    state = _through_a_file(_dst_of(mlp(0, hidden=8), schedule="constant").state_dict())
    own = _dst_of(mlp(0, hidden=8), schedule=_decaying)
    with pytest.warns(UserWarning, match=r"\(name: 'function' -> 'constant', end_step: 20 -> 15, drop_fraction: None "
                                         r"-> 0.3, final_drop_fraction: None -> 0.005\)"):
        own.load_state_dict(state)
    assert own.schedule == schedules.make("constant", 20, update_every=2) and own.schedule.function is None


@pytest.mark.parametrize("saved, value, differs", [
    (np.True_, True, False), (np.False_, False, False), (np.True_, False, True),   # a flag: np.bool_ as a bool
    (np.int64(3), 3, False), (np.uint8(3), 3, False), (np.int64(4), 3, True),      # a count: np.integer as an int
    (np.float32(0.5), 0.5, False), (np.float64(1e-5), 1e-5, False), (np.int32(1), 1.0, False),
    ((np.int64(2), np.int32(2)), (2, 2), False),                                   # block's pair
    # Other kinds stay refused, as their Python values are: no bool is a number, no number a flag, no float a count.
    (np.True_, 1, True), (np.True_, 1.0, True), (np.int64(1), True, True), (np.float32(1.0), True, True),
    (np.float64(2.0), 2, True), (np.complex64(1), 1.0, True), (np.array([True]), True, True),
])
def test_a_numpy_scalar_is_a_setting_of_its_kind(saved, value, differs):
    # A state built from NumPy values (a setting read back from an .npz, or computed) held np.True_ for
    # reset_state=True: refused as "saved with reset_state=True, not True".
    assert _tickets._differs(saved, value) is differs


def test_a_dst_state_with_numpy_settings_loads():
    def dst(model):
        return sparsekern.DST(model, torch.optim.SGD(model.parameters(), lr=0.1), update_every=2, total_steps=20,
                              block=(2, 2), reset_state=True)

    state = _through_a_file(dst(mlp(0, hidden=8)).state_dict())
    state.update(reset_state=np.True_, block=(np.int64(2), np.int64(2)))
    dst(mlp(0, hidden=8)).load_state_dict(state)
    state.update(reset_state=np.False_)
    model = mlp(0, hidden=8)
    _refused_with_nothing_changed(dst(model), model, state, "saved with reset_state=.*False.*, not True")


def test_a_dst_state_saved_before_swap_rounding_existed_loads_only_where_it_rounds():
    # Such a state was saved rounding: loaded under swap_rounding="floor" it went on under the other rule without a
    # word (the settings a state lacks are not checked, and this one's value is known).
    def dst(model, **options):
        return sparsekern.DST(model, torch.optim.SGD(model.parameters(), lr=0.1), update_every=2, total_steps=20,
                              **options)

    state = _through_a_file(dst(mlp(0, hidden=8)).state_dict())
    del state["swap_rounding"]
    model = mlp(0, hidden=8)
    _refused_with_nothing_changed(dst(model, swap_rounding="floor"), model, state,
                                  "saved with swap_rounding='round', not 'floor'")
    dst(mlp(0, hidden=8)).load_state_dict(state)


def test_a_snip_state_saved_before_snip_shift_existed_loads_only_unshifted():
    # Such a state was saved unshifted: loaded under snip_shift=1e-5 it would go on under the other ranking.
    def dst(model, **options):
        return sparsekern.DST(model, torch.optim.SGD(model.parameters(), lr=0.1), prune="snip", update_every=2,
                              total_steps=20, **options)

    state = _through_a_file(dst(mlp(0, hidden=8)).state_dict())
    del state["snip_shift"]
    model = mlp(0, hidden=8)
    _refused_with_nothing_changed(dst(model, snip_shift=1e-5), model, state, "saved with snip_shift=0.0, not 1e-05")
    dst(mlp(0, hidden=8)).load_state_dict(state)


def test_a_criterion_parameter_the_criterion_does_not_read_is_not_a_setting_of_the_state():
    def rigl(model, **options):
        return sparsekern.RigL(model, torch.optim.SGD(model.parameters(), lr=0.1), update_every=2, total_steps=20,
                               **options)

    state = _through_a_file(rigl(mlp(0, hidden=8), mest_gamma=0.5, sensitivity_offset=1.0,
                                 snip_shift=1e-5).state_dict())
    rigl(mlp(0, hidden=8)).load_state_dict(state)


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_a_state_holding_an_entry_its_algorithm_does_not_save_is_refused_naming_it(name):
    # Entries beside the real ones were ignored: a misspelled setting (or a tampered one) was never checked, and
    # the run went on under whatever setting the loading algorithm had.
    state = _through_a_file(ALGORITHMS[name](mlp(0, hidden=8)).state_dict())
    model = mlp(1, hidden=8)
    _refused_with_nothing_changed(ALGORITHMS[name](model), model, {**state, "bogus": 1, 3: None},
                                  rf"state holds \[3, 'bogus'\], which a state of {name} does not hold \(a "
                                  rf"misspelled or tampered entry\?\)")
    ALGORITHMS[name](mlp(1, hidden=8)).load_state_dict(state)   # the state itself loads
    # A required entry misspelled: what is missing and what is unknown, in one error.
    required = {"DST": "step_count", "OptG": "epoch"}.get(name, "cycle")
    misspelled = {f"{key}_" if key == required else key: value for key, value in state.items()}
    _refused_with_nothing_changed(ALGORITHMS[name](model), model, misspelled,
                                  rf"state lacks \['{required}'\] and holds \['{required}_'\], which a state of")


@pytest.mark.parametrize("misspelled, options", [
    # Taken for a state saved before the option existed, which rounded: refused as one saved rounding.
    ("swap_roundng", dict(swap_rounding="floor")),
    ("mest_gama", dict(prune="mest", mest_gamma=0.5)),
    ("scop", dict(scope="global")),
])
def test_a_dst_state_with_a_misspelled_setting_is_refused_naming_it_not_the_setting(misspelled, options):
    def dst(model):
        return sparsekern.DST(model, torch.optim.SGD(model.parameters(), lr=0.1), update_every=2, total_steps=20,
                              **options)

    state = _through_a_file(dst(mlp(0, hidden=8)).state_dict())
    right = misspelled.replace("roundng", "rounding").replace("gama", "gamma").replace("scop", "scope")
    state[misspelled] = state.pop(right)
    model = mlp(0, hidden=8)
    _refused_with_nothing_changed(dst(model), model, state, rf"state holds \['{misspelled}'\], which a state of DST")


def test_a_dst_state_holding_a_parameter_of_a_criterion_it_does_not_use_is_refused():
    # mest_gamma is a setting of MEST's states only: in a RigL state it was tampered in, and meant nothing.
    def rigl(model):
        return sparsekern.RigL(model, torch.optim.SGD(model.parameters(), lr=0.1), update_every=2, total_steps=20)

    state = {**_through_a_file(rigl(mlp(0, hidden=8)).state_dict()), "mest_gamma": 0.5}
    model = mlp(0, hidden=8)
    _refused_with_nothing_changed(rigl(model), model, state, r"state holds \['mest_gamma'\], which a state of a DST "
                                                             r"of prune='magnitude', grow='gradient' does not hold")


# A growth criterion never decides its own count (DST refuses one that does).
@pytest.mark.parametrize("argument, flag", [(argument, flag) for argument in ("prune", "grow")
                                            for flag in criteria.Criterion.FLAGS
                                            if (argument, flag) != ("grow", "decides_count")])
def test_a_dst_state_of_a_users_criterion_is_refused_by_one_of_that_name_with_other_flags(argument, flag):
    # Only the name was saved: a state of an elementwise criterion resumed under a per-layer one of the same name
    # (or one that reads no gradient under one that does) went on under the other rule without a word.
    def dst(model, criterion):
        return sparsekern.DST(model, torch.optim.SGD(model.parameters(), lr=0.1), update_every=2, total_steps=20,
                              **{argument: criterion})

    saved = {"prune": NOISY, "grow": NOISY_GROWTH}[argument] if flag != "decides_count" else SMALL_ONES
    other = dataclasses.replace(saved, **{flag: not getattr(saved, flag)})
    state = _through_a_file(dst(mlp(0, hidden=8), saved).state_dict())
    assert state[f"{argument}_{flag}"] is getattr(saved, flag)
    model = mlp(0, hidden=8)
    _refused_with_nothing_changed(dst(model, other), model, state,
                                  rf"state\['{argument}_{flag}'\]={getattr(saved, flag)}: the state was saved with "
                                  rf"{argument}='{saved.name}' of {flag}={getattr(saved, flag)}, not "
                                  rf"{getattr(other, flag)}")
    dst(mlp(0, hidden=8), copy.deepcopy(saved)).load_state_dict(state)   # the same criterion (a copy) loads
    # A state saved before the flags were kept loads under either (as one saved before the settings were).
    older = {key: value for key, value in state.items() if not key.startswith(f"{argument}_")}
    dst(mlp(0, hidden=8), other).load_state_dict(older)


@pytest.mark.parametrize("saved, loaded, words", [
    (dict(prune_fraction=0.3), dict(prune_fraction=0.5), "prune_fraction=0.3, not 0.5"),
    (dict(scope="global"), dict(scope="layer"), "scope='global', not 'layer'"),
])
def test_an_imp_state_saved_with_another_pruning_is_refused(saved, loaded, words):
    state = _through_a_file(IMP(mlp(0, hidden=8), _sgd, **saved).state_dict())
    model = mlp(0, hidden=8)
    _refused_with_nothing_changed(IMP(model, _sgd, **loaded), model, state, f"saved with {words}")


@pytest.mark.parametrize("setting", ["rewind_step", "rewind", "algorithm"])
def test_a_setting_tampered_into_a_tensor_is_refused_as_a_value_error(setting):
    # Compared with !=, a tensor of several values raised RuntimeError ('Boolean value of Tensor ... is ambiguous').
    state = _through_a_file(IMP(mlp(0, hidden=8), _sgd).state_dict())
    state[setting] = torch.zeros(3)
    model = mlp(0, hidden=8)
    _refused_with_nothing_changed(IMP(model, _sgd), model, state, f"state\\['{setting}'\\]=tensor")


@pytest.mark.parametrize("saved, loaded, words", [
    (dict(particles=4), dict(particles=2), "particles=4, not 2"),
    (dict(prune_fraction=0.3), dict(prune_fraction=0.5), "prune_fraction=0.3, not 0.5"),
    (dict(scope="global"), dict(scope="layer"), "scope='global', not 'layer'"),
    (dict(swa_start=0), dict(swa_start=4), "swa_start=0, not 4"),
    (dict(swa_start=0), dict(swa_start=None), "swa_start=0, not None"),
    (dict(swa_every=1), dict(swa_every=2), "swa_every=1, not 2"),
    (dict(seed=0), dict(seed=1), "seed=0, not 1"),
])
def test_a_swamp_state_saved_with_other_particles_or_averaging_is_refused(saved, loaded, words):
    # Particle 1 of 4 holding particle 0's average, resumed with particles=2, averaged the two and divided by 2:
    # a run of neither setting, without a word.
    state = _through_a_file(SWAMP(mlp(0, hidden=8), _sgd, **{"particles": 2, **saved}).state_dict())
    model = mlp(0, hidden=8)
    swamp = SWAMP(model, _sgd, **{"particles": 2, **loaded})
    _refused_with_nothing_changed(swamp, model, state, f"saved with {words}")


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_swamp_resumes_on_as_many_ranks_and_refuses_another_number(tmp_path):
    # Each rank's state holds the sum of its own particles only: rank 0's of 2, resumed in one process, trained
    # particles 2 and 3 but never 1, and divided the sum of three by 4.
    result = torchrun("tests.algorithms.swamp_resume_worker", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    for rank in ranks:   # on 2 ranks: the uninterrupted run's model and state, on each rank
        assert _same(rank["uninterrupted"], rank["resumed"]) is None
    saved = torch.load(tmp_path / "checkpoint0.pt", weights_only=True)
    model = mlp(0, hidden=16)
    model.load_state_dict(saved["model"])
    swamp = SWAMP(model, _sgd, particles=4, prune_fraction=0.3, rewind_step=2, swa_start=4, seed=3)
    _refused_with_nothing_changed(swamp, model, saved["swamp"], "saved by rank 0 of 2 ranks, and this SWAMP runs in "
                                                                "a single process; .* so resume on 2 ranks, each "
                                                                "rank loading its own")
    # A state saved by one process, loaded on 2 ranks, was said to be "saved by rank 0 of 1 rank, not 2".
    for rank in ranks:
        assert rank["single_process_refusal"] == (
            "state['world_size']=1: the state was saved by a single process, and this SWAMP runs on 2 ranks; each "
            "rank's state holds only the particles it trained, so resume in a single process")


@pytest.mark.parametrize("saved, loaded, words", [
    (dict(sparsity=0.7), dict(sparsity=0.5), "sparsity=0.7, not 0.5"),
    (dict(epochs=4), dict(epochs=5), "epochs=4, not 5"),
    (dict(criterion="learned"), dict(criterion="magnitude"), "criterion='learned', not 'magnitude'"),
    # The saved score optimizer's momentum replaced the one OptG was built with, without a word.
    (dict(momentum=0.5), dict(momentum=0.9), "momentum=0.5, not 0.9"),
    (dict(nesterov=True), dict(nesterov=False), "nesterov=True, not False"),
])
def test_an_optg_state_saved_with_another_ramp_or_criterion_is_refused(saved, loaded, words):
    # Scores trained towards one sparsity (or a magnitude run's) went on towards another's ramp without a word.
    options = dict(sparsity=0.7, epochs=4)
    state = _through_a_file(OptG(mlp(0, hidden=8), **{**options, **saved}).state_dict())
    model = mlp(0, hidden=8)
    _refused_with_nothing_changed(OptG(model, **{**options, **loaded}), model, state, f"saved with {words}")


def _dst_of(model, **options):
    return sparsekern.DST(model, torch.optim.SGD(model.parameters(), lr=0.1),
                          **{"update_every": 2, "total_steps": 20, **options})


@pytest.mark.parametrize("build, saved, loaded, words", [
    (_dst_of, dict(prune=NOISY, scope="layer", swap_rounding="floor"), dict(prune=NOISY_RANK, scope="global"),
     "state['prune']='noisy_magnitude', state['scope']='layer', state['swap_rounding']='floor', "
     "state['prune_elementwise']=True: the state was saved with prune='noisy_magnitude', not 'noisy_rank'; "
     "scope='layer', not 'global'; swap_rounding='floor', not 'round'; prune='noisy_rank' of elementwise=True, "
     "not False"),
    # Its counters fit rewind_step 1 and not 0: refused for them, with a guess, before the settings were read.
    (lambda model, **options: IMP(model, _sgd, **options), dict(rewind_step=1, prune_fraction=0.3, scope="layer"),
     dict(rewind_step=0, prune_fraction=0.5, scope="global"),
     "state['rewind_step']=1, state['prune_fraction']=0.3, state['scope']='layer': the state was saved with "
     "rewind_step=1, not 0; prune_fraction=0.3, not 0.5; scope='layer', not 'global'"),
    (lambda model, **options: SWAMP(model, _sgd, **options), dict(particles=4, swa_every=1, seed=0),
     dict(particles=2, swa_every=2, seed=1),
     "state['particles']=4, state['swa_every']=1, state['seed']=0: the state was saved with particles=4, not 2; "
     "swa_every=1, not 2; seed=0, not 1"),
    (OptG, dict(sparsity=0.7, epochs=4, beta=2.0, nesterov=True), dict(sparsity=0.6, epochs=5, beta=1.0),
     "state['sparsity']=0.7, state['epochs']=4, state['beta']=2.0, state['nesterov']=True: the state was saved "
     "with sparsity=0.7, not 0.6; epochs=4, not 5; beta=2.0, not 1.0; nesterov=True, not False"),
])
def test_a_state_saved_with_several_other_settings_is_refused_once_naming_each(build, saved, loaded, words):
    # Refused at the first setting that differed: put right, the state was refused again for the next.
    state = _through_a_file(build(mlp(0, hidden=8), **saved).state_dict())
    model = mlp(0, hidden=8)
    _refused_with_nothing_changed(build(model, **loaded), model, state, f"^{re.escape(words)}$")


class _TwoLayers(nn.Module):
    """Sparse layers of 8 to 8 features registered under `names`, in that order; the forward runs "first" and then
    "second" whatever the order (a third name is a layer the forward does not use)."""

    def __init__(self, names, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        for name in names:
            setattr(self, name, sparsekern.nn.SparseLinear(8, 8))

    def forward(self, x):
        return self.second(torch.relu(self.first(x)))


def _two_layer_steps(model, optg, epochs):
    """`epochs` epochs of 2 steps of OptG under momentum SGD, the optimizer returned for a checkpoint."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for epoch in range(epochs):
        for step in range(2):
            generator = torch.Generator().manual_seed(10 * epoch + step)
            model(torch.randn(16, 8, generator=generator)).square().mean().backward()
            optg.step()
            optimizer.step()
            optimizer.zero_grad()
        optg.next_epoch()
    return optimizer


def _optg_of_two_layers(names, seed=0):
    model = _TwoLayers(names, seed)
    return model, OptG(model, sparsity=0.5, epochs=4)


def test_an_optg_state_loads_by_layer_name_into_a_model_listing_its_layers_in_another_order():
    # Scores, masks and their momentum were kept by position: the model's own state dict (by name) loaded each
    # layer's weights, and OptG gave each layer the other's scores and masks, without a word.
    model, optg = _optg_of_two_layers(["first", "second"])
    _two_layer_steps(model, optg, 2)
    saved = _through_a_file({"model": model.state_dict(), "optg": optg.state_dict()})
    swapped, swapped_optg = _optg_of_two_layers(["second", "first"], seed=1)
    swapped.load_state_dict(saved["model"])
    swapped_optg.load_state_dict(saved["optg"])
    for name, mask in saved["optg"]["masks"].items():
        assert torch.equal(getattr(swapped, name).mask, mask), name
    assert _same(saved["optg"]["scores"], swapped_optg.state_dict()["scores"]) is None
    # The scores' momentum went with them: both train on alike (the weights' optimizer starts afresh on both).
    _two_layer_steps(model, optg, 1)
    _two_layer_steps(swapped, swapped_optg, 1)
    assert _same(model.state_dict(), swapped.state_dict()) is None
    assert _same(optg.state_dict()["scores"], swapped_optg.state_dict()["scores"]) is None


@pytest.mark.parametrize("names, words", [
    (["first", "third"], r"missing \['third'\], unexpected \['second'\]"),            # a layer renamed
    (["first", "second", "third"], r"missing \['third'\], unexpected \[\]"),           # one added
    (["second", "first", "third"], r"missing \['third'\], unexpected \[\]"),
])
def test_an_optg_state_of_other_layers_is_refused_naming_them(names, words):
    # A renamed layer of the same shape took the other's scores silently; a layer more or less was refused as
    # "a list of 3 tensors" without saying which.
    model, optg = _optg_of_two_layers(["first", "second"])
    _two_layer_steps(model, optg, 1)
    state = _through_a_file(optg.state_dict())
    other, other_optg = _optg_of_two_layers(names, seed=1)
    _refused_with_nothing_changed(other_optg, other, state, r"state\['scores'\] holds the layers \['first', "
                                                             r"'second'\], not those of this model: " + words)


def test_an_optg_state_missing_a_layer_is_refused_naming_it():
    model, optg = _optg_of_two_layers(["first", "second", "third"])
    optg.next_epoch()
    state = _through_a_file(optg.state_dict())
    fewer, fewer_optg = _optg_of_two_layers(["first", "second"], seed=1)
    _refused_with_nothing_changed(fewer_optg, fewer, state, r"missing \[\], unexpected \['third'\]")


def test_an_optg_state_of_a_tied_layer_loads_under_the_name_of_either_module_holding_its_weight():
    # A layer of two modules sharing one weight is keyed by the first of them, which a model listing them in the
    # other order names differently.
    def tied(names, seed):
        model = _TwoLayers(names, seed)
        model.second.weight = model.first.weight
        return model, OptG(model, sparsity=0.5, epochs=4)

    model, optg = tied(["first", "second"], 0)
    _two_layer_steps(model, optg, 2)
    saved = _through_a_file({"model": model.state_dict(), "optg": optg.state_dict()})
    swapped, swapped_optg = tied(["second", "first"], 1)
    swapped.load_state_dict(saved["model"])
    swapped_optg.load_state_dict(saved["optg"])
    assert list(saved["optg"]["scores"]) == ["first"] and list(swapped_optg.state_dict()["scores"]) == ["second"]
    assert torch.equal(saved["optg"]["scores"]["first"], swapped_optg.state_dict()["scores"]["second"])
    assert torch.equal(swapped.first.mask, saved["optg"]["masks"]["first"])


class _Wrapper(nn.Module):
    """Holds the model as `module`, as DistributedDataParallel does."""

    def __init__(self, model):
        super().__init__()
        self.module = model

    def forward(self, x):
        return self.module(x)


def test_an_optg_state_saved_under_a_wrapper_is_refused_by_the_bare_model_saying_why():
    state = _through_a_file(OptG(_Wrapper(mlp(0, hidden=8)), sparsity=0.5, epochs=3).state_dict())
    model = mlp(1, hidden=8)
    _refused_with_nothing_changed(OptG(model, sparsity=0.5, epochs=3), model, state,
                                  r"missing \['0', '2'\], unexpected \['module\.0', 'module\.2'\] \(the saved names "
                                  r"carry the prefix 'module\.' of a wrapper")


def _positional(optg):
    """`optg`'s state as versions that kept it by position saved it."""
    return _tickets.map_tensors(torch.Tensor.clone, {
        "algorithm": "OptG", "epoch": optg.epoch, "scores": optg.scores,
        "score_optimizer": optg.score_optimizer.state_dict(), "masks": optg.masks, **optg._settings()})


def test_an_optg_state_saved_by_position_by_older_versions_loads_as_before():
    model, optg = _optg_of_two_layers(["first", "second"])
    _two_layer_steps(model, optg, 2)
    saved = _through_a_file({"model": model.state_dict(), "optg": _positional(optg)})
    resumed, resumed_optg = _optg_of_two_layers(["first", "second"], seed=1)
    resumed.load_state_dict(saved["model"])
    resumed_optg.load_state_dict(saved["optg"])
    assert _same(optg.state_dict(), resumed_optg.state_dict()) is None
    _two_layer_steps(model, optg, 1)
    _two_layer_steps(resumed, resumed_optg, 1)
    assert _same((model.state_dict(), optg.state_dict()), (resumed.state_dict(), resumed_optg.state_dict())) is None


def test_an_optg_state_of_the_first_versions_holding_pruned_weights_loads_as_before():
    # The first versions saved the values off the masks as "pruned_weights" (the model's state dict keeps them
    # since), and no settings: their states must load as they did, the entry ignored.
    model, optg = _optg_of_two_layers(["first", "second"])
    _two_layer_steps(model, optg, 2)
    first = {key: value for key, value in _positional(optg).items() if key in ("epoch", "scores", "score_optimizer",
                                                                             "masks")}
    first["pruned_weights"] = [torch.where(layer.mask, 0, layer.weight.detach()) for layer in optg.layers]
    saved = _through_a_file({"model": model.state_dict(), "optg": first})
    resumed, resumed_optg = _optg_of_two_layers(["first", "second"], seed=1)
    resumed.load_state_dict(saved["model"])
    resumed_optg.load_state_dict(saved["optg"])
    assert _same(optg.state_dict(), resumed_optg.state_dict()) is None


def _ticket_steps_of_two_layers(model, algorithm, steps):
    """Trains IMP or SWAMP from its step_in_cycle to `steps` with its own optimizer (momentum SGD), on data drawn
    by step and particle."""
    for t in range(algorithm.step_in_cycle, steps):
        generator = torch.Generator().manual_seed(100 * getattr(algorithm, "data_seed", 0) + t)
        model(torch.randn(16, 8, generator=generator)).square().mean().backward()
        algorithm.optimizer.step()
        algorithm.optimizer.zero_grad()
        algorithm.step()


TICKETS = {
    "IMP": lambda model, rewind_step: IMP(model, _sgd, prune_fraction=0.3, rewind_step=rewind_step),
    "SWAMP": lambda model, rewind_step: SWAMP(model, _sgd, particles=2, prune_fraction=0.3, rewind_step=rewind_step,
                                              swa_start=max(2, rewind_step)),
}


def _ticket_of_two_layers(name, names, seed=0, rewind_step=1, tied=False):
    model = _TwoLayers(names, seed)
    if tied:
        model.second.weight = model.first.weight
    return model, TICKETS[name](model, rewind_step)


def _finish_ticket(model, algorithm):
    """Runs IMP or SWAMP on to the end of its second cycle (steps of 4); its model's and its own state."""
    algorithm.run(lambda run: _ticket_steps_of_two_layers(model, run, 4), 2)
    return model.state_dict(), _params_sorted(algorithm.state_dict())


def _params_sorted(state):
    """`state` with its optimizers' groups, and the parameter names in each, sorted: models listing their
    parameters in other orders list them (and a group per parameter) in other orders."""
    if isinstance(state, dict):
        return {key: sorted(value) if key == "params" else
                sorted(_params_sorted(value), key=lambda group: group["params"]) if key == "param_groups" else
                _params_sorted(value) for key, value in state.items()}
    return [_params_sorted(value) for value in state] if isinstance(state, list) else state


def _stopped(model, algorithm, particle, step):
    """`model` and `algorithm` trained in cycle 0 to `step` of SWAMP's `particle` (IMP's 0: its only one)."""
    while getattr(algorithm, "particle", 0) < particle:
        _ticket_steps_of_two_layers(model, algorithm, 4)
        algorithm.next_particle()
    _ticket_steps_of_two_layers(model, algorithm, step)


# (algorithm, particle, step): SWAMP in its first particle holds the rewind optimizer state and the particle's
# average, in its second the sum of the first
TICKET_STOPS = [("IMP", 0, 3), ("SWAMP", 0, 3), ("SWAMP", 1, 3)]


@pytest.mark.parametrize("name, particle, step", TICKET_STOPS)
def test_an_imp_or_swamp_state_loads_by_parameter_name_into_a_model_listing_its_layers_in_another_order(
        name, particle, step):
    # Their optimizers' states (momentum) and SWAMP's particle average and sum were kept by position: the model's
    # own state dict (by name) loaded each layer's weights, and each layer took the other's momentum and average,
    # without a word.
    model, algorithm = _ticket_of_two_layers(name, ["first", "second"])
    _stopped(model, algorithm, particle, step)
    saved = _through_a_file({"model": model.state_dict(), "state": algorithm.state_dict()})
    swapped, swapped_algorithm = _ticket_of_two_layers(name, ["second", "first"], seed=1)
    swapped.load_state_dict(saved["model"])
    swapped_algorithm.load_state_dict(saved["state"])
    assert _same(_params_sorted(saved["state"]), _params_sorted(swapped_algorithm.state_dict())) is None
    assert _same(_finish_ticket(model, algorithm), _finish_ticket(swapped, swapped_algorithm)) is None


def test_an_imp_optimizer_state_of_a_group_per_parameter_pairs_each_group_by_its_parameters_name():
    # torch pairs the saved groups with the optimizer's own by position: in a model listing its layers in another
    # order, each group would take the other layer's hyperparameters (a learning rate a scheduler changed).
    def build(names, seed):
        model = _TwoLayers(names, seed)
        return model, IMP(model, lambda params: torch.optim.SGD([{"params": [p]} for p in params], lr=0.05,
                                                                momentum=0.9), prune_fraction=0.3, rewind_step=1)

    model, imp = build(["first", "second"], 0)
    _ticket_steps_of_two_layers(model, imp, 2)
    imp.optimizer.param_groups[0]["lr"] = 0.02   # first.weight's, as a per-layer schedule would set it
    saved = _through_a_file({"model": model.state_dict(), "state": imp.state_dict()})
    swapped, swapped_imp = build(["second", "first"], 1)
    swapped.load_state_dict(saved["model"])
    swapped_imp.load_state_dict(saved["state"])
    assert [group["lr"] for group in swapped_imp.optimizer.param_groups] == [0.05, 0.05, 0.02, 0.05]
    assert _same(_finish_ticket(model, imp), _finish_ticket(swapped, swapped_imp)) is None


@pytest.mark.parametrize("name", sorted(TICKETS))
@pytest.mark.parametrize("names, words", [
    (["first", "third"], r"missing \['third.weight', 'third.bias'\], unexpected \['second.weight', 'second.bias'\]"),
    (["first", "second", "third"], r"missing \['third.weight', 'third.bias'\], unexpected \[\]"),
    (["second", "first", "third"], r"missing \['third.weight', 'third.bias'\], unexpected \[\]"),
])
def test_an_imp_or_swamp_optimizer_state_of_other_layers_is_refused_naming_them(name, names, words):
    # A renamed layer of the same shape took the other's momentum silently; a layer more or less was refused by
    # torch as "a different number of parameters" without saying which.
    model, algorithm = _ticket_of_two_layers(name, ["first", "second"], rewind_step=2)
    _ticket_steps_of_two_layers(model, algorithm, 1)   # before the rewind step: the optimizer's state is checked
    state = _through_a_file(algorithm.state_dict())
    other, other_algorithm = _ticket_of_two_layers(name, names, seed=1, rewind_step=2)
    _refused_with_nothing_changed(other_algorithm, other, state,
                                  r"state\['optimizer'\] holds the parameters \['first.weight', 'first.bias', "
                                  r"'second.weight', 'second.bias'\], not those of this model: " + words)


@pytest.mark.parametrize("name", sorted(TICKETS))
def test_an_imp_or_swamp_optimizer_state_missing_a_layer_is_refused_naming_it(name):
    model, algorithm = _ticket_of_two_layers(name, ["first", "second", "third"], rewind_step=2)
    _ticket_steps_of_two_layers(model, algorithm, 1)
    state = _through_a_file(algorithm.state_dict())
    fewer, fewer_algorithm = _ticket_of_two_layers(name, ["first", "second"], seed=1, rewind_step=2)
    _refused_with_nothing_changed(fewer_algorithm, fewer, state,
                                  r"missing \[\], unexpected \['third.weight', 'third.bias'\]")


@pytest.mark.parametrize("name, particle, step", TICKET_STOPS)
def test_an_imp_or_swamp_state_of_a_tied_weight_loads_under_either_name_of_the_weight(name, particle, step):
    # A weight two modules share is one parameter, named after the first of them, which a model listing them in
    # the other order names differently.
    model, algorithm = _ticket_of_two_layers(name, ["first", "second"], tied=True)
    _stopped(model, algorithm, particle, step)
    saved = _through_a_file({"model": model.state_dict(), "state": algorithm.state_dict()})
    swapped, swapped_algorithm = _ticket_of_two_layers(name, ["second", "first"], seed=1, tied=True)
    swapped.load_state_dict(saved["model"])
    swapped_algorithm.load_state_dict(saved["state"])
    assert "first.weight" in saved["state"]["optimizer"]["state"]
    assert torch.equal(saved["state"]["optimizer"]["state"]["first.weight"]["momentum_buffer"],
                       swapped_algorithm.state_dict()["optimizer"]["state"]["second.weight"]["momentum_buffer"])
    finished, swapped_finished = _finish_ticket(model, algorithm), _finish_ticket(swapped, swapped_algorithm)
    assert _same(finished[0], swapped_finished[0]) is None
    assert torch.equal(finished[1]["optimizer"]["state"]["first.weight"]["momentum_buffer"],
                       swapped_finished[1]["optimizer"]["state"]["second.weight"]["momentum_buffer"])


@pytest.mark.parametrize("rewind_step", [0, 1])   # 0: θ_k is checked first; 1: the optimizer's state is
@pytest.mark.parametrize("name", sorted(TICKETS))
def test_an_imp_or_swamp_state_saved_under_a_wrapper_is_refused_by_the_bare_model_saying_why(name, rewind_step):
    state = _through_a_file(TICKETS[name](_Wrapper(mlp(0, hidden=8)), rewind_step).state_dict())
    model = mlp(1, hidden=8)
    _refused_with_nothing_changed(TICKETS[name](model, rewind_step), model, state,
                                  r"unexpected \['module\.0\.[a-z]+', .* \(the saved names carry the prefix "
                                  r"'module\.' of a wrapper, DistributedDataParallel's or torch.compile's: build "
                                  + name)


def _positional_ticket_state(algorithm):
    """IMP's or SWAMP's state as versions that kept its optimizers' states and SWAMP's particle average and sum by
    position saved it."""
    positional = {"optimizer": algorithm.optimizer.state_dict()}
    if isinstance(algorithm, SWAMP):
        positional.update(rewind_optimizer_state=algorithm.rewind_optimizer_state,
                          particle_average=algorithm.particle_average, particle_sum=algorithm.particle_sum)
    return _tickets.map_tensors(torch.Tensor.clone, {**algorithm.state_dict(), **positional})


@pytest.mark.parametrize("name, particle, step", TICKET_STOPS)
def test_an_imp_or_swamp_state_saved_by_position_by_older_versions_loads_as_before(name, particle, step):
    model, algorithm = _ticket_of_two_layers(name, ["first", "second"])
    _stopped(model, algorithm, particle, step)
    saved = _through_a_file({"model": model.state_dict(), "state": _positional_ticket_state(algorithm)})
    assert all(isinstance(key, int) for key in saved["state"]["optimizer"]["state"])
    resumed, resumed_algorithm = _ticket_of_two_layers(name, ["first", "second"], seed=1)
    resumed.load_state_dict(saved["model"])
    resumed_algorithm.load_state_dict(saved["state"])
    assert _same(algorithm.state_dict(), resumed_algorithm.state_dict()) is None
    assert _same(_finish_ticket(model, algorithm), _finish_ticket(resumed, resumed_algorithm)) is None


# -- a state kept in memory -----------------------------------------------------------------------------------

def _data():
    g = torch.Generator().manual_seed(3)
    return torch.randn(96, 64, generator=g), torch.randint(0, 10, (96,), generator=g)


def _ticket_steps(model, algorithm, steps):
    """Trains IMP or SWAMP from its step_in_cycle to `steps` with its own optimizer."""
    x, y = _data()
    for t in range(algorithm.step_in_cycle, steps):
        inputs, targets = batch(x, y, 0, t, 16)
        nn.functional.cross_entropy(model(inputs), targets).backward()
        algorithm.optimizer.step()
        algorithm.optimizer.zero_grad()
        algorithm.step()


def _optg_steps(model, optg, steps):
    """`steps` steps of OptG under plain SGD (no optimizer state for a checkpoint to carry)."""
    x, y = _data()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for t in range(steps):
        inputs, targets = batch(x, y, optg.epoch, t, 16)
        nn.functional.cross_entropy(model(inputs), targets).backward()
        optg.step()
        optimizer.step()
        optimizer.zero_grad()


IN_MEMORY = {
    "IMP": (lambda model: IMP(model, _sgd, prune_fraction=0.3), _ticket_steps),
    "SWAMP": (lambda model: SWAMP(model, _sgd, particles=2, prune_fraction=0.3, swa_start=2), _ticket_steps),
    "OptG": (lambda model: OptG(model, sparsity=0.5, epochs=3), _optg_steps),
}


@pytest.mark.parametrize("name", sorted(IN_MEMORY))
def test_a_state_kept_in_memory_stays_as_saved_through_training_and_loading(name):
    # A rollback (to the last good state, on a NaN loss) or a retry loads one state dict more than once. Its
    # optimizer state (momentum), SWAMP's running means, were the live tensors: training on after state_dict(),
    # or after load_state_dict(), which left the loaded optimizer holding the caller's tensors, wrote into them.
    build, train = IN_MEMORY[name]
    model = mlp(0, hidden=16)
    algorithm = build(model)
    train(model, algorithm, 4)
    state = algorithm.state_dict()
    kept = copy.deepcopy(state)
    train(model, algorithm, 6)
    assert _same(kept, state) is None
    runs = []
    for _ in range(2):
        model = mlp(1, hidden=16)
        algorithm = build(model)
        algorithm.load_state_dict(state)
        train(model, algorithm, 8)
        runs.append(algorithm.state_dict())
    assert _same(kept, state) is None
    assert _same(*runs) is None


# -- IMP and OptG at their boundaries -------------------------------------------------------------------------

def _adam(parameters):
    return torch.optim.Adam(parameters, lr=0.01)


@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("rewind", ["weights", "learning_rate"])
def test_imp_resumed_at_its_rewind_step_and_around_a_pruning_ends_where_the_uninterrupted_run_ends(rewind, scope):
    steps, cycles, k = 6, 3, 2

    def build(seed):
        model = mlp(seed, hidden=16, batch_norm=True)
        return model, IMP(model, _adam, prune_fraction=0.3, rewind_step=k, scope=scope, rewind=rewind)

    def finish(model, imp):
        imp.run(lambda algorithm: _ticket_steps(model, algorithm, steps), cycles)
        return model.state_dict(), imp.state_dict()

    uninterrupted = finish(*build(6))
    # (cycles trained, steps of the next): at the rewind step; at a cycle's end, before its pruning; right after
    # a pruning and rewind; one step after it
    for trained, step in ((0, k), (0, steps), (1, None), (1, k + 1)):
        model, imp = build(6)
        for _ in range(trained):
            _ticket_steps(model, imp, steps)
            imp.next_cycle()
        if step is not None:
            _ticket_steps(model, imp, step)
        saved = _through_a_file({"model": model.state_dict(), "imp": imp.state_dict()})
        model, imp = build(99)
        model.load_state_dict(saved["model"])
        imp.load_state_dict(saved["imp"])
        assert _same(uninterrupted, finish(model, imp)) is None, (trained, step)


@pytest.mark.parametrize("after_next_epoch", [False, True])
@pytest.mark.parametrize("criterion", ["learned", "magnitude"])
def test_optg_resumed_at_the_end_of_its_last_epoch_ends_as_the_uninterrupted_run(criterion, after_next_epoch):
    # Its last next_epoch() only counts the epoch (the model keeps the mask it trained with): resumed before it or
    # after it, the run ends with the uninterrupted run's model and state, and no further epoch.
    epochs = 3

    def build(seed):
        model = mlp(seed, hidden=16)
        return model, OptG(model, sparsity=0.6, epochs=epochs, criterion=criterion)

    model, optg = build(5)
    for epoch in range(epochs):
        _optg_steps(model, optg, 3)
        if epoch < epochs - 1 or after_next_epoch:
            optg.next_epoch()
    saved = _through_a_file({"model": model.state_dict(), "optg": optg.state_dict()})
    if not after_next_epoch:
        optg.next_epoch()
    uninterrupted = model.state_dict(), optg.state_dict()
    model, optg = build(6)
    model.load_state_dict(saved["model"])
    optg.load_state_dict(saved["optg"])
    if not after_next_epoch:
        optg.next_epoch()
    assert _same(uninterrupted, (model.state_dict(), optg.state_dict())) is None
    with pytest.raises(RuntimeError, match="after the last of the 3 epochs"):
        optg.next_epoch()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_dst_saved_by_two_ddp_ranks_resumes_on_two_alike_and_is_refused_by_a_dst_of_the_bare_model(tmp_path):
    # Rank 0's checkpoint, loaded on both ranks, resumes both to the uninterrupted run's masks and state (SET's
    # random stream included). Its names carry DDP's "module.": a DST built on the model itself, as one process
    # without DDP builds it, refuses them, and says why (the error named both lists, and not the prefix).
    result = torchrun("tests.algorithms.dst_resume_worker", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    for method in ("set", "rigl"):
        assert _same(ranks[0][method]["uninterrupted"], ranks[1][method]["uninterrupted"]) is None
        for rank in ranks:
            assert _same(rank[method]["uninterrupted"], rank[method]["resumed"]) is None, method
    saved = torch.load(tmp_path / "set.pt", weights_only=True)
    torch.manual_seed(0)
    model = sparsekern.sparsify(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)), 0.3,
                                generator=torch.Generator().manual_seed(0))
    dst = sparsekern.SET(model, torch.optim.Adam(model.parameters(), lr=0.01), update_every=2, total_steps=14, seed=3)
    _refused_with_nothing_changed(dst, model, saved["algorithm"], r"\['module\.0', 'module\.2'\] \(the saved "
                                                                  r"names carry the prefix 'module\.' of a wrapper")


class _BrokenRepr:
    def __repr__(self):
        raise RuntimeError("no repr")


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_a_counter_beyond_int64_is_refused_naming_it(name):
    # 10**5000 passed as a count; the first line to print it raised Python's own ValueError ("Exceeds the limit
    # (4300 digits) for integer string conversion"), naming nothing, or loaded without a word (IMP's cycle).
    model = mlp(0, hidden=8)
    algorithm = ALGORITHMS[name](model)
    counter = {"DST": "step_count", "IMP": "cycle", "SWAMP": "particle", "OptG": "epoch"}[name]
    for value, shown in ((10 ** 5000, "an integer of 16610 bits"), (2 ** 63, "9223372036854775808")):
        state = _through_a_file(algorithm.state_dict())
        state[counter] = value
        _refused_with_nothing_changed(algorithm, model, state,
                                      f"state\\['{counter}'\\] must be at most 2\\*\\*63 - 1, got {shown}$")


@pytest.mark.parametrize("value, shown", [(10 ** 5000, "<an integer of 16610 bits>"),
                                          (_BrokenRepr(), "<a _BrokenRepr whose repr fails>")],
                         ids=["10**5000", "broken-repr"])
def test_a_setting_whose_repr_fails_is_still_refused_naming_it(value, shown):
    # The error line's repr raised instead: Python's int-to-str ValueError, or the object's own error.
    model = mlp(0, hidden=8)
    imp = IMP(model, _sgd)
    state = _through_a_file(imp.state_dict())
    state["rewind_step"] = value
    _refused_with_nothing_changed(imp, model, state, f"state\\['rewind_step'\\]={shown}: the state was saved with")
