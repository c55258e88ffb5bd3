"""SWAMP: the paper's averaging and pruning rule, BatchNorm recomputation, resumption, particles on
two gloo ranks, and the digits comparison with IMP-WR."""
import math

import numpy as np
import pytest
import torch

import sparsekern.checkpoint
from sparsekern.algorithms import IMP, SWAMP
from sparsekern.algorithms.swamp import data_seed
from sparsekern.nn import sparse_modules

from ..helpers import (BAD_OWN_MASKS, assert_unchanged, batch, conv1d_conv3d_model, conv_data, damage_mask, digits_run,
                       everything, mlp, torchrun)
from .swamp_distributed import run

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 10


def _sgd(parameters):
    return torch.optim.SGD(parameters, lr=0.05, momentum=0.9, weight_decay=1e-3)


def _data(seed=0, rows=96):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 64, generator=g), torch.randint(0, 10, (rows,), generator=g)


def _train(model, algorithm, x, y, seed, stop=STEPS, on_step=None):
    for t in range(algorithm.step_in_cycle, stop):
        inputs, targets = batch(x, y, seed, t, 16)
        torch.nn.functional.cross_entropy(model(inputs), targets).backward()
        algorithm.optimizer.step()
        algorithm.optimizer.zero_grad()
        algorithm.step()
        if on_step is not None:
            on_step(algorithm)


def _parameters(model):
    return [p.detach().clone() for p in model.parameters()]


def test_the_average_is_the_mean_of_the_particles_swa_averages_and_particles_differ():
    x, y = _data()
    model = mlp(1, hidden=16)
    swamp = SWAMP(model, _sgd, particles=3, prune_fraction=0.3, rewind_step=2, swa_start=5, swa_every=2)
    for cycle in range(2):
        averages = []
        while True:
            samples = []

            def record(algorithm):
                if algorithm.step_in_cycle > 5 and (algorithm.step_in_cycle - 5) % 2 == 0:
                    samples.append(_parameters(model))
            _train(model, swamp, x, y, swamp.data_seed, on_step=record)
            assert len(samples) == 2
            expected = [torch.stack(s).mean(0) for s in zip(*samples)]
            for average, mean in zip(swamp.particle_average, expected):
                torch.testing.assert_close(average, mean, rtol=0, atol=1e-6)
            averages.append([a.clone() for a in swamp.particle_average])
            if not swamp.next_particle():
                break
        assert len(averages) == 3
        for p, *per_particle in zip(model.parameters(), *averages):
            torch.testing.assert_close(p.detach(), torch.stack(per_particle).mean(0), rtol=0, atol=1e-7)
        for first, second in zip(averages[0], averages[1]):
            assert not torch.equal(first, second)       # different data orders, different particles
        theta_bar = _parameters(model)
        masks = swamp.next_cycle()
        # The next mask is the global magnitude pruning of θ̄.
        scores = torch.cat([w.abs().flatten() for w, (name, _) in zip(theta_bar, model.named_parameters())
                            if name.endswith("weight")])
        kept = torch.cat([m.flatten() for m in masks])
        assert scores[kept].min() >= scores[~kept & (scores > 0)].max()


def test_particles_start_from_the_ticket_with_the_optimizer_state_of_step_k_in_cycle_zero():
    x, y = _data(5)
    model = mlp(6, hidden=8)
    swamp = SWAMP(model, _sgd, particles=2, prune_fraction=0.3, rewind_step=4, swa_start=6)
    _train(model, swamp, x, y, swamp.data_seed, stop=4)
    theta_k = model.state_dict()
    theta_k = {name: value.clone() for name, value in theta_k.items()}
    momentum_k = [swamp.optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    _train(model, swamp, x, y, swamp.data_seed)
    assert swamp.next_particle() and swamp.particle == 1 and swamp.step_in_cycle == 4
    for name, value in model.state_dict().items():
        assert torch.equal(value, theta_k[name])
    for p, momentum in zip(model.parameters(), momentum_k):
        assert torch.equal(swamp.optimizer.state[p]["momentum_buffer"], momentum)
    _train(model, swamp, x, y, swamp.data_seed)
    assert not swamp.next_particle()
    swamp.next_cycle()                    # later cycles: θ_k ⊙ m and a fresh optimizer
    assert not swamp.optimizer.state
    for (name, value), mask in zip([(n, v) for n, v in model.state_dict().items() if n.endswith("weight")],
                                   swamp.masks):
        assert torch.equal(value, torch.where(mask, theta_k[name], 0))


def _imp_wr(rewind_step, cycles, batch_norm=False, density=None):
    x, y = _data(1)
    model = mlp(2, hidden=16, batch_norm=batch_norm)
    imp = IMP(model, _sgd, prune_fraction=0.3, rewind_step=rewind_step)
    imp.run(lambda a: _train(model, a, x, y, data_seed(5, a.cycle, 0)), cycles, density=density)
    return model


def _swamp_run(model, swamp, x, y, cycles, density=None):
    swamp.run(lambda s: _train(model, s, x, y, s.data_seed), cycles, density=density)


def test_a_particle_ended_before_its_rewind_step_says_to_count_the_steps():
    swamp = SWAMP(mlp(2, hidden=16), _sgd, particles=2, rewind_step=5, swa_start=None)
    with pytest.raises(RuntimeError, match=r"^particle ended before the rewind step 5 was reached \(only 0 steps were "
                                           r"counted\): call swamp.step\(\) after every optimizer step$"):
        swamp.next_particle()


def test_an_optimizer_of_an_earlier_particle_refuses_to_step():
    x, y = _data(1)
    model = mlp(2, hidden=16)
    swamp = SWAMP(model, _sgd, particles=2, swa_start=None)
    first = swamp.optimizer
    _train(model, swamp, x, y, swamp.data_seed)
    assert swamp.next_particle()
    with pytest.raises(RuntimeError, match=r"^step\(\) of an optimizer that SWAMP has replaced .*every particle"):
        first.step()
    swamp.optimizer.step()


def test_run_to_a_density_is_imp_run_to_it_with_one_particle_without_swa():
    # 0.3 of the remaining weights twice leaves 0.49 of the 1184; the last pruning goes to round(0.45·1184) = 533.
    reference = _imp_wr(2, cycles=3, density=0.45)
    x, y = _data(1)
    model = mlp(2, hidden=16)
    swamp = SWAMP(model, _sgd, particles=1, prune_fraction=0.3, rewind_step=2, swa_start=None, seed=5)
    _swamp_run(model, swamp, x, y, cycles=3, density=0.45)
    assert sum(int(mask.sum()) for mask in swamp.masks) == 533
    for key, a in reference.state_dict().items():
        assert torch.equal(a, model.state_dict()[key]), key
    trained = []
    with pytest.raises(ValueError, match=r"density=0.45 needs cycles >= 2 .*got cycles=1"):
        SWAMP(mlp(2, hidden=16), _sgd, particles=1, swa_start=None).run(trained.append, 1, density=0.45)
    # 0.3 of the remaining weights once leaves 0.7, fewer than density=0.8 keeps: refused before any cycle trains.
    with pytest.raises(ValueError, match=r"density=0.8 keeps \d+ weights of all layers, but the 1 prunings"):
        SWAMP(mlp(2, hidden=16), _sgd, particles=1, prune_fraction=0.3, swa_start=None).run(trained.append, 3,
                                                                                              density=0.8)
    assert trained == []


@pytest.mark.parametrize("batch_norm", [False, True])
@pytest.mark.parametrize("rewind_step", [0, 3])
def test_one_particle_without_swa_is_imp_with_rewinding_bit_for_bit(rewind_step, batch_norm):
    # With BatchNorm, the statistics were recomputed on bn_loader for θ̄, one particle's trained weights, whose
    # statistics IMP-WR keeps as training left them.
    reference = _imp_wr(rewind_step, cycles=3, batch_norm=batch_norm)
    x, y = _data(1)
    model = mlp(2, hidden=16, batch_norm=batch_norm)
    loader = [x[i:i + 32] for i in range(0, len(x), 32)] if batch_norm else None
    swamp = SWAMP(model, _sgd, particles=1, prune_fraction=0.3, rewind_step=rewind_step, swa_start=None,
                  seed=5, bn_loader=loader)
    _swamp_run(model, swamp, x, y, cycles=3)
    assert reference.state_dict().keys() == model.state_dict().keys()
    for key, a in reference.state_dict().items():
        assert torch.equal(a, model.state_dict()[key]), key


def test_batch_norm_statistics_are_recomputed_for_the_average():
    x, y = _data(2)
    model = mlp(3, hidden=12, batch_norm=True)
    loader = [x[i:i + 32] for i in range(0, len(x), 32)]
    swamp = SWAMP(model, _sgd, particles=2, swa_start=4, bn_loader=loader)
    _train(model, swamp, x, y, swamp.data_seed)
    assert swamp.next_particle()
    _train(model, swamp, x, y, swamp.data_seed)
    assert not swamp.next_particle()
    with torch.no_grad():
        hidden = model[0](x)
    # update_bn's cumulative average over equal batches: the mean of the batch means and variances.
    per_batch = hidden.reshape(3, 32, -1)
    norm = model[1]
    torch.testing.assert_close(norm.running_mean, per_batch.mean(1).mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(norm.running_var, per_batch.var(1).mean(0), rtol=1e-5, atol=1e-6)


def test_a_failing_bn_loader_leaves_the_batch_norm_layers_as_they_were():
    x, y = _data(2)
    model = mlp(3, hidden=12, batch_norm=True)
    loader = [x[:32], x[32:64, :5]]   # the second batch has the wrong width
    swamp = SWAMP(model, _sgd, particles=1, swa_start=4, bn_loader=loader)
    _train(model, swamp, x, y, swamp.data_seed)
    norm = model[1].eval()   # a layer whose mode differs from the model's keeps it
    before = ({k: v.clone() for k, v in norm.named_buffers()}, norm.momentum, model.training)
    with pytest.raises(RuntimeError, match="recomputing BatchNorm statistics on bn_loader failed"):
        swamp.next_particle()
    for key, value in before[0].items():   # the statistics; the affine parameters are averaged
        assert torch.equal(dict(norm.named_buffers())[key], value), key
    assert norm.momentum == before[1] and model.training == before[2] and not norm.training
    assert swamp.averaged


def test_a_bn_loader_that_yields_no_batch_leaves_the_batch_norm_layers_as_they_were():
    # update_bn over no batch resets the statistics to mean 0 and variance 1: an iterator used up by the first
    # cycle gave the second cycle's θ̄ those, silently.
    x, y = _data(2)
    model = mlp(3, hidden=12, batch_norm=True)
    swamp = SWAMP(model, _sgd, particles=1, swa_start=4, bn_loader=iter([x[:32], x[32:64]]))
    _train(model, swamp, x, y, swamp.data_seed)
    assert not swamp.next_particle()
    swamp.next_cycle()
    _train(model, swamp, x, y, swamp.data_seed)
    _assert_refused_keeping_statistics(model[1], swamp, "bn_loader yielded no batch")
    assert model[1].momentum == 0.1


def test_a_bn_loader_of_non_finite_batches_leaves_the_batch_norm_layers_as_they_were():
    """Campaign 20: a batch holding NaN recomputed NaN statistics, silently: the averaged model computed NaN."""
    x, y = _data(2)
    model = mlp(3, hidden=12, batch_norm=True)
    poisoned = x[32:64].clone()
    poisoned[3, 1] = float("nan")
    swamp = SWAMP(model, _sgd, particles=1, swa_start=4, bn_loader=[x[:32], poisoned])
    _train(model, swamp, x, y, swamp.data_seed)
    _assert_refused_keeping_statistics(model[1], swamp,
                                       r"not finite in layers \['1'\] \(a batch holds NaN or infinity\)")


def test_a_bn_loader_of_empty_batches_leaves_the_batch_norm_layers_as_they_were():
    """Campaign 21: batches of no rows update no statistic, so those update_bn had reset (mean 0, variance 1) were
    kept, silently, as for a loader yielding no batch."""
    x, y = _data(2)
    model = mlp(3, hidden=12, batch_norm=True)
    swamp = SWAMP(model, _sgd, particles=1, swa_start=4, bn_loader=[x[:0], (x[:0], y[:0])])
    _train(model, swamp, x, y, swamp.data_seed)
    _assert_refused_keeping_statistics(model[1], swamp, "bn_loader yielded no batch holding data")


def _assert_refused_keeping_statistics(norm, swamp, match: str) -> None:
    """swamp.next_particle() raises RuntimeError matching `match` and leaves the buffers of `norm` as they were."""
    before = {k: v.clone() for k, v in norm.named_buffers()}
    with pytest.raises(RuntimeError, match=match):
        swamp.next_particle()
    for key, value in before.items():
        assert torch.equal(dict(norm.named_buffers())[key], value), key


def test_a_refused_recomputation_leaves_the_global_random_stream_as_it_was():
    """Campaign 21: update_bn's forward passes drew from the global random stream (dropout), which a refused
    recomputation left advanced, though it put the statistics back."""
    x, y = _data(2)
    model = mlp(3, hidden=12, batch_norm=True).append(torch.nn.Dropout(0.5))
    poisoned = x[32:64].clone()
    poisoned[3, 1] = float("inf")
    swamp = SWAMP(model, _sgd, particles=1, swa_start=4, bn_loader=[x[:32], poisoned])
    _train(model, swamp, x, y, swamp.data_seed)
    random_state = torch.get_rng_state()
    with pytest.raises(RuntimeError, match="not finite"):
        swamp.next_particle()
    assert torch.equal(torch.get_rng_state(), random_state)


@pytest.mark.parametrize("loader, error, match", [
    ([], ValueError, "bn_loader is empty \\(list of length 0\\)"),
    ("batches", TypeError, "bn_loader must be an iterable of batches or None, got str"),
    # Campaign 20: a tensor iterates by rows and a dict by keys, each refused only at the first average.
    (torch.zeros(8, 4), TypeError, r"got a Tensor \(it iterates by rows: pass \[tensor\]\)"),
    ({"x": torch.zeros(8, 4)}, TypeError, "bn_loader must be an iterable of batches or None, got dict"),
    # Campaign 21: a NumPy array iterates by rows too, each failing update_bn at the first average.
    (np.zeros((8, 4), np.float32), TypeError, r"got an array, ndarray \(it iterates by rows: pass "
                                              r"\[torch.as_tensor\(array\)\]\)"),
])
def test_an_empty_or_string_bn_loader_is_refused_at_construction(loader, error, match):
    # Both were taken: the empty list reset the statistics at the first average, the str failed there.
    with pytest.raises(error, match=match):
        SWAMP(mlp(0, hidden=4, batch_norm=True), _sgd, bn_loader=loader)


def test_batch_norm_without_a_loader_is_refused_where_the_weights_are_averaged():
    with pytest.raises(ValueError, match="bn_loader is None"):
        SWAMP(mlp(0, hidden=4, batch_norm=True), _sgd)
    with pytest.raises(ValueError, match="bn_loader is None"):
        SWAMP(mlp(0, hidden=4, batch_norm=True), _sgd, particles=1)   # SWA averages
    SWAMP(mlp(0, hidden=4, batch_norm=True), _sgd, particles=1, swa_start=None)   # IMP-WR: nothing averaged


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(particles=0), ValueError, "particles must be >= 1, got 0"),
    (dict(swa_every=0), ValueError, "swa_every must be >= 1, got 0"),
    (dict(swa_start=-2), ValueError, "swa_start must be >= 0, got -2"),
    (dict(prune_fraction=0), ValueError, "prune_fraction must be a finite number in"),
    (dict(rewind_step=5, swa_start=4), ValueError, "swa_start must be >= rewind_step \\(5\\), got 4"),
])
def test_bad_arguments_raise_naming_them(kwargs, error, match):
    with pytest.raises(error, match=match):
        SWAMP(mlp(0, hidden=4), _sgd, **kwargs)


def test_a_particle_ending_before_its_first_swa_sample_raises():
    x, y = _data()
    model = mlp(0, hidden=4)
    swamp = SWAMP(model, _sgd, particles=2, swa_start=STEPS)
    _train(model, swamp, x, y, swamp.data_seed)
    with pytest.raises(RuntimeError, match="no SWA sample"):
        swamp.next_particle()


def _swamp(model):
    return SWAMP(model, _sgd, particles=2, prune_fraction=0.3, rewind_step=3, swa_start=6, seed=7)


# (cycle, particle, step): mid-particle before and after k and in the SWA phase, at a particle's
# end; (cycle, "averaged", None): after the cycle's average, before its pruning.
@pytest.mark.parametrize("stop", [(0, 0, 2), (0, 0, 7), (0, 1, 5), (0, 1, STEPS), (1, 0, 8), (1, 1, 4),
                                  (1, "averaged", None)])
def test_resuming_from_a_checkpoint_is_bit_identical(tmp_path, stop):
    x, y = _data(4)
    reference = mlp(8, hidden=16)
    _swamp_run(reference, _swamp(reference), x, y, cycles=3)

    model = mlp(8, hidden=16)
    swamp = _swamp(model)
    while (swamp.cycle, "averaged" if swamp.averaged else swamp.particle) != stop[:2]:
        if swamp.averaged:
            swamp.next_cycle()
            continue
        _train(model, swamp, x, y, swamp.data_seed)
        swamp.next_particle()
    if stop[2] is not None:
        _train(model, swamp, x, y, swamp.data_seed, stop=stop[2])
    sparsekern.checkpoint.save({"model": model.state_dict(), "swamp": swamp.state_dict()}, tmp_path / "s.pt")

    checkpoint = sparsekern.checkpoint.load(tmp_path / "s.pt")
    resumed = mlp(0, hidden=16)
    resumed.load_state_dict(checkpoint["model"])
    swamp = _swamp(resumed)
    swamp.load_state_dict(checkpoint["swamp"])
    _swamp_run(resumed, swamp, x, y, cycles=3)
    for a, b in zip(reference.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_a_state_saved_under_another_rewind_step_is_refused():
    # Particle 1 of cycle 0 at step 5 holding θ_3: its counters fit rewind_step 2 as well, where it loaded and
    # the next particle would have restarted from θ_3 at step 2.
    x, y = _data(4)
    model = mlp(8, hidden=16)
    swamp = _swamp(model)
    _train(model, swamp, x, y, swamp.data_seed)
    swamp.next_particle()
    _train(model, swamp, x, y, swamp.data_seed, stop=5)
    other = SWAMP(mlp(8, hidden=16), _sgd, particles=2, prune_fraction=0.3, rewind_step=2, swa_start=6, seed=7)
    with pytest.raises(ValueError, match="saved with rewind_step=3, not 2"):
        other.load_state_dict(swamp.state_dict())
    assert other.particle == 0 and other.step_in_cycle == 0 and other.rewind_state is None


def _lazy_norm_mlp(seed):
    """mlp(seed, hidden=12, batch_norm=True) with an nn.LazyBatchNorm1d, which makes its parameters and statistics
    at its first forward, in place of its BatchNorm1d."""
    model = mlp(seed, hidden=12, batch_norm=True)
    model[1] = torch.nn.LazyBatchNorm1d()
    return model


def _lazy_swamp(model, x):
    return SWAMP(model, _sgd, particles=2, prune_fraction=0.3, rewind_step=2, swa_start=4, seed=3,
                 bn_loader=[x[i:i + 32] for i in range(0, len(x), 32)])


def test_a_lazy_batch_norm_made_by_the_first_forward_trains_as_a_batch_norm_bit_for_bit():
    # rewind_step >= 1: the first particle's first forward makes its parameters (in place: the optimizer and the
    # averages hold the same objects) before θ_k is kept, and every later average recomputes its statistics.
    x, y = _data(2)
    models = [mlp(3, hidden=12, batch_norm=True), _lazy_norm_mlp(3)]
    for model in models:
        _swamp_run(model, _lazy_swamp(model, x), x, y, cycles=2)
    assert type(models[1][1]) is torch.nn.BatchNorm1d
    assert models[0].state_dict().keys() == models[1].state_dict().keys()
    for key, value in models[0].state_dict().items():
        assert torch.equal(value, models[1].state_dict()[key]), key


def test_a_lazy_module_not_made_yet_is_refused_by_name_where_swamp_keeps_the_state_at_construction():
    # rewind_step=0 keeps θ_0 as SWAMP is built: torch refused the lazy parameter's clone naming no module.
    x, _ = _data(2)
    model = _lazy_norm_mlp(3)
    with pytest.raises(ValueError, match=r"^SWAMP keeps the model's state at rewind_step=0 as it is built, but the "
                                         r"lazy modules '1' \(LazyBatchNorm1d\) have not made their parameters yet"
                                         r".*: run the model on one batch before building SWAMP$"):
        SWAMP(model, _sgd, particles=2, bn_loader=[x])
    assert model[1].has_uninitialized_params()
    with torch.no_grad():
        model(x[:4])
    assert SWAMP(model, _sgd, particles=2, bn_loader=[x]).rewind_state["1.weight"].shape == (12,)


def test_a_state_loaded_before_the_models_own_is_refused_naming_its_lazy_modules_and_loads_after_it():
    x, y = _data(2)
    model = _lazy_norm_mlp(3)
    swamp = _lazy_swamp(model, x)
    _train(model, swamp, x, y, swamp.data_seed)
    swamp.next_particle()
    _train(model, swamp, x, y, swamp.data_seed, stop=6)
    checkpoint = {"model": model.state_dict(), "swamp": swamp.state_dict()}
    resumed = _lazy_norm_mlp(0)
    resumed_swamp = _lazy_swamp(resumed, x)
    with pytest.raises(ValueError, match=r"^SWAMP.load_state_dict\(\) checks the state against the model's "
                                         r"tensors, but the lazy modules '1' \(LazyBatchNorm1d\) have not made "
                                         r"their parameters yet.*: load the model's state dict first$"):
        resumed_swamp.load_state_dict(checkpoint["swamp"])
    assert resumed_swamp.particle == 0 and resumed_swamp.rewind_state is None
    resumed.load_state_dict(checkpoint["model"])
    resumed_swamp.load_state_dict(checkpoint["swamp"])
    for run, algorithm in ((model, swamp), (resumed, resumed_swamp)):
        _swamp_run(run, algorithm, x, y, cycles=2)
    for a, b in zip(model.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_particles_on_two_gloo_ranks_match_particles_in_sequence(tmp_path):
    result = torchrun("tests.algorithms.swamp_distributed", str(tmp_path / "rank{}.pt"))
    assert result.returncode == 0, result.stdout + result.stderr

    sequential = run()
    for rank in range(2):
        distributed = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert distributed.keys() == sequential.keys()
        for name in sequential:
            torch.testing.assert_close(distributed[name], sequential[name], rtol=0, atol=1e-6)
            if name.endswith("mask"):
                assert torch.equal(distributed[name], sequential[name])


def test_digits_swamp_compared_with_imp_with_rewinding_at_90_percent_sparsity():
    seeds = range(3)
    imp = np.array([digits_run("imp", seed) for seed in seeds])
    swamp = np.array([digits_run("swamp2", seed) for seed in seeds])
    print(f"digits, 90% sparsity, 3 seeds: IMP-WR {imp.mean():.4f} ± {imp.std():.4f}, "
          f"SWAMP (2 particles) {swamp.mean():.4f} ± {swamp.std():.4f}")
    # Only what is robust: SWAMP trains a useful sparse network, within 2 points of IMP-WR.
    assert swamp.mean() > imp.mean() - 0.02


def test_conv1d_and_conv3d_layers_are_pruned_at_exact_counts_with_zeros_off_the_mask():
    x, y = conv_data(6)
    model = conv1d_conv3d_model(7)
    swamp = SWAMP(model, _sgd, particles=2, prune_fraction=0.3, swa_start=4)
    layers = [module for _, module in sparse_modules(model)]
    for _ in range(2):
        while True:
            _train(model, swamp, x, y, swamp.data_seed, stop=6)
            if not swamp.next_particle():
                break
        old = swamp.masks
        remaining = sum(int(m.sum()) for m in old)
        new = swamp.next_cycle()
        assert sum(int(m.sum()) for m in new) == remaining - math.ceil(round(0.3 * remaining, 9))
        for before, after in zip(old[:2], new[:2]):   # the Conv3d and the Conv1d lost weights
            assert int(after.sum()) < int(before.sum()) and not (after & ~before).any()
        for layer in layers:
            assert not layer.weight[~layer.mask].any()


# -- the averaging rule, against a θ̄ worked out by hand --
# The "training" writes chosen weights between step() calls, so each particle's SWA mean, θ̄ and the mask
# pruned from it can be read off by hand.


def test_average_and_mask_by_hand():
    layer = sparsekern.nn.SparseLinear(3, 2)       # weight (2, 3), bias (2,)
    model = torch.nn.Sequential(layer)
    theta_0 = layer.weight.detach().clone()
    swamp = SWAMP(model, _sgd, particles=2, prune_fraction=0.5, rewind_step=0, swa_start=2, swa_every=1)
    # Samples after steps 3 and 4 (past swa_start = 2); steps 1 and 2 are not averaged.
    written = [
        [[100.0] * 6, [100.0] * 6, [-6.0, 0, 2, 0, 2, 0], [-4.0, 0, 4, 0, 0, 0]],   # mean -5 0 3 0 1 0
        [[100.0] * 6, [100.0] * 6, [0.0, 4, 0, 6, 0, 0], [0.0, 0, 0, 6, 0, 8]],     # mean  0 2 0 6 0 4
    ]
    biases = [[[9.0, 9], [9.0, 9], [1.0, 2], [3.0, 4]], [[9.0, 9], [9.0, 9], [5.0, 6], [7.0, 8]]]
    for particle, (weights, bias) in enumerate(zip(written, biases)):
        assert swamp.particle == particle and swamp.step_in_cycle == 0
        for values, b in zip(weights, bias):
            with torch.no_grad():
                layer.weight.copy_(torch.tensor(values).view(2, 3))
                layer.bias.copy_(torch.tensor(b))
            swamp.step()
        assert swamp.next_particle() == (particle == 0)
    # θ̄ = the mean of the two means; the bias is averaged alike: ((2, 3) + (6, 7)) / 2.
    torch.testing.assert_close(layer.weight.detach(), torch.tensor([[-2.5, 1, 1.5], [3, 0.5, 2]]), rtol=0, atol=0)
    torch.testing.assert_close(layer.bias.detach(), torch.tensor([4.0, 5.0]), rtol=0, atol=0)
    # ⌈0.5·6⌉ = 3 removed from θ̄ by magnitude: 0.5, 1 and 1.5; the ticket is θ_0 on the survivors.
    mask = swamp.next_cycle()[0]
    assert mask.flatten().tolist() == [True, False, False, True, False, True]
    assert torch.equal(layer.weight.detach(), torch.where(mask, theta_0, 0.0))


@pytest.mark.parametrize("kind", BAD_OWN_MASKS)
@pytest.mark.parametrize("call", ["next_cycle", "next_particle"])
def test_a_layer_whose_mask_was_put_in_place_through_data_is_refused_before_swamp_changes_anything(kind, call):
    # next_cycle writes the pruned masks, next_particle (from the second cycle on) the cycle's masks again, after
    # the model was rewound.
    x, y = _data()
    model = mlp(0, hidden=16)
    swamp = SWAMP(model, _sgd, particles=2, prune_fraction=0.3, rewind_step=1, swa_start=None)
    _train(model, swamp, x, y, swamp.data_seed, stop=3)
    assert swamp.next_particle()
    _train(model, swamp, x, y, swamp.data_seed, stop=3)
    assert not swamp.next_particle()
    if call == "next_particle":
        swamp.next_cycle()
        _train(model, swamp, x, y, swamp.data_seed, stop=3)
    error, match = damage_mask(model[2], kind)
    optimizer, state = swamp.optimizer, (swamp.cycle, swamp.particle, swamp.averaged)
    before = everything(model, optimizer)
    with pytest.raises(error, match="^SWAMP: layer '2'" + match):
        getattr(swamp, call)()
    assert_unchanged(before, everything(model, optimizer))
    assert swamp.optimizer is optimizer and (swamp.cycle, swamp.particle, swamp.averaged) == state


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_a_lazy_module_unmade_on_one_rank_only_is_refused_on_every_rank(tmp_path):
    # Each rank trains its own particle's batches: a lazy module that only rank 0's run was refused on rank 1 alone,
    # at the step that keeps θ_k (rank 0 went on into the broadcast of its θ_k, and waited there for rank 1) or at
    # load_state_dict (rank 0 loaded, and would wait in the next collective); so was a layer left in inference mode
    # on one rank at that step.
    result = torchrun("tests.algorithms.lazy_swamp_worker", str(tmp_path), timeout=90)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    for rank in (0, 1):
        results = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert all(results.values()), (rank, [name for name, ok in results.items() if not ok])


@pytest.mark.parametrize("particles, rewind_step, swa_start, swa_every", [(2, 1, None, 1), (3, 2, 3, 2), (1, 0, 2, 1),
                                                                     (2, 0, 0, 3), (2, 1, 1, 2)])
def test_every_state_saved_after_every_call_of_a_run_loads_into_a_fresh_swamp(particles, rewind_step, swa_start,
                                                                              swa_every):
    # load_state_dict refuses the points of a cycle SWAMP never reaches (averaged mid-cycle, a particles' sum lost,
    # an SWA sample count its step does not take): none that it saves itself, after a step, next_particle or
    # next_cycle.
    x, y = _data()

    def swamp_of(model):
        return SWAMP(model, _sgd, particles=particles, prune_fraction=0.3, rewind_step=rewind_step,
                     swa_start=swa_start, swa_every=swa_every)

    model = mlp(1, hidden=12)
    swamp = swamp_of(model)
    saved = []

    def save(algorithm):
        saved.append((algorithm.state_dict(), {k: v.clone() for k, v in model.state_dict().items()}))
    for cycle in range(2):
        while True:
            _train(model, swamp, x, y, swamp.data_seed, stop=5, on_step=save)
            more = swamp.next_particle()
            save(swamp)
            if not more:
                break
        if cycle == 0:
            swamp.next_cycle()
            save(swamp)
    assert [state["averaged"] for state, _ in saved].count(True) == 2
    for state, model_state in saved:
        fresh = mlp(1, hidden=12)
        fresh.load_state_dict(model_state)
        loaded = swamp_of(fresh)
        loaded.load_state_dict(state)
        assert (loaded.cycle, loaded.particle, loaded.step_in_cycle, loaded.averaged) == (
            state["cycle"], state["particle"], state["step_in_cycle"], state["averaged"])


@pytest.mark.parametrize("swa_start, swa_every, count", [(2, 1, 2), (2, 1, 4), (0, 2, 1), (None, 1, 1)])
def test_a_state_whose_swa_sample_count_its_step_does_not_take_is_refused_naming_it(swa_start, swa_every, count):
    # The particle's running mean weighs the next sample by 1 / (count + 1): a tampered count loaded, and the mean
    # went on weighing the samples unequally, silently. Step 5 takes 3 samples past swa_start=2, 2 past 0 every 2nd.
    x, y = _data()
    model = mlp(0, hidden=8)

    def swamp_of(model):
        return SWAMP(model, _sgd, particles=2, swa_start=swa_start, swa_every=swa_every)
    swamp = swamp_of(model)
    _train(model, swamp, x, y, swamp.data_seed, stop=5)
    state = swamp.state_dict()
    state["average_count"] = count
    if state["particle_average"] is None:   # swa_start=None: the average and its count set alike
        state["particle_average"] = {name: p.detach().clone() for name, p in model.named_parameters()}
    loaded = swamp_of(mlp(0, hidden=8))
    before = (loaded.step_in_cycle, loaded.average_count, loaded.particle_average, loaded.optimizer)
    with pytest.raises(ValueError, match=rf"^state\['average_count'\]={count}, but state\['step_in_cycle'\]=5 "
                                         rf"comes after {swamp.average_count} SWA samples"):
        loaded.load_state_dict(state)
    assert (loaded.step_in_cycle, loaded.average_count, loaded.particle_average, loaded.optimizer) == before


def test_a_bn_loader_running_out_of_memory_raises_out_of_memory_and_leaves_the_statistics():
    # Review 28c: it became RuntimeError 'recomputing BatchNorm statistics ... failed', which a handler catching
    # torch.OutOfMemoryError (to retry at a smaller batch) missed.
    x, y = _data(2)
    model = mlp(3, hidden=12, batch_norm=True)

    def loader():
        yield x[:32]
        raise torch.OutOfMemoryError("CUDA out of memory")
    swamp = SWAMP(model, _sgd, particles=1, swa_start=4, bn_loader=[x[:32]])
    _train(model, swamp, x, y, swamp.data_seed)
    swamp.bn_loader = loader()
    norm = model[1]
    before = {k: v.clone() for k, v in norm.named_buffers()}
    with pytest.raises(torch.OutOfMemoryError):
        swamp.next_particle()
    for key, value in before.items():
        assert torch.equal(dict(norm.named_buffers())[key], value), key
