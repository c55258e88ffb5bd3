"""IMP with rewinding: the lottery-ticket rule, resumption, and the digits comparison."""
import math
import sys
import warnings

import numpy as np
import pytest
import torch

import sparsekern
import sparsekern.checkpoint
from sparsekern.algorithms import IMP
from sparsekern.nn import sparse_modules

from ..helpers import (BAD_OWN_MASKS, assert_unchanged, batch, conv1d_conv3d_model, conv_data, damage_mask, digits_run,
                       everything, mlp)

pytestmark = pytest.mark.usefixtures("one_thread")


def _sgd(parameters):
    return torch.optim.SGD(parameters, lr=0.05, momentum=0.9, weight_decay=1e-3)


def _data(seed=0, rows=96):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 64, generator=g), torch.randint(0, 10, (rows,), generator=g)


def _train(model, imp, x, y, steps, stop=None):
    for t in range(imp.step_in_cycle, steps if stop is None else stop):
        inputs, targets = batch(x, y, imp.cycle, t, 16)
        torch.nn.functional.cross_entropy(model(inputs), targets).backward()
        imp.optimizer.step()
        imp.optimizer.zero_grad()
        imp.step()


def _weights(model):
    return [layer.weight.detach().clone() for _, layer in sparse_modules(model)]


def _numpy_global_keep(weights, masks, prune_fraction):
    """NumPy re-implementation of one global pruning: keep the largest |w| among active entries,
    ties to the lower flat position (layer order, then row-major)."""
    flat = np.concatenate([w.numpy().ravel() for w in weights]).astype(np.float64)
    active = np.concatenate([m.numpy().ravel() for m in masks])
    remaining = int(active.sum())
    removed = math.ceil(round(prune_fraction * remaining, 9))
    candidates = np.flatnonzero(active)
    order = candidates[np.lexsort((candidates, -np.abs(flat[candidates])))]
    keep = np.zeros_like(active)
    keep[order[:remaining - removed]] = True
    return keep, removed


@pytest.mark.parametrize("rewind_step", [0, 3])
def test_survivors_are_the_rewound_weights_masks_nest_and_global_counts_are_exact(rewind_step):
    x, y = _data()
    model = mlp(1, hidden=24)
    prune_fraction = 0.3
    imp = IMP(model, _sgd, prune_fraction=prune_fraction, rewind_step=rewind_step)
    rewound = _weights(model) if rewind_step == 0 else None
    bias_at_k = None
    for cycle in range(4):
        if rewound is None:
            _train(model, imp, x, y, 10, stop=rewind_step)
            rewound = _weights(model)
            bias_at_k = model[0].bias.detach().clone()
        _train(model, imp, x, y, 10)
        trained, old_masks = _weights(model), imp.masks
        expected_keep, removed = _numpy_global_keep(trained, old_masks, prune_fraction)
        new_masks = imp.next_cycle()
        flat_new = np.concatenate([m.numpy().ravel() for m in new_masks])
        np.testing.assert_array_equal(flat_new, expected_keep)
        assert sum(int(m.sum()) for m in old_masks) - sum(int(m.sum()) for m in new_masks) == removed
        for old, new in zip(old_masks, new_masks):
            assert not (new & ~old).any()
        for weight, theta_k, mask in zip(_weights(model), rewound, new_masks):
            assert torch.equal(weight, torch.where(mask, theta_k, 0))
        if bias_at_k is not None:
            assert torch.equal(model[0].bias, bias_at_k)
        assert imp.cycle == cycle + 1 and imp.step_in_cycle == rewind_step
        assert not imp.optimizer.state          # a fresh optimizer per cycle


def test_layer_scope_removes_the_fraction_from_every_layer():
    x, y = _data(1)
    model = mlp(2, hidden=16)
    imp = IMP(model, _sgd, prune_fraction=0.25, scope="layer")
    _train(model, imp, x, y, 6)
    trained, old = _weights(model), imp.masks
    new = imp.next_cycle()
    for weight, old_mask, new_mask in zip(trained, old, new):
        keep, removed = _numpy_global_keep([weight], [old_mask], 0.25)
        np.testing.assert_array_equal(new_mask.numpy().ravel(), keep)
        assert int(old_mask.sum()) - int(new_mask.sum()) == removed


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_an_exact_fraction_of_the_weights_is_removed_whatever_its_float_product(scope):
    # 0.55 * 100 is 55.00000000000001 in floats: rounded up as it is, it would remove 56 weights, not 55.
    model = sparsekern.sparsify(torch.nn.Sequential(torch.nn.Linear(10, 10)), 1.0)
    masks = IMP(model, _sgd, prune_fraction=0.55, scope=scope).next_cycle()
    assert int(masks[0].sum()) == 45


def test_learning_rate_rewinding_keeps_the_trained_survivors():
    x, y = _data(2)
    model = mlp(3, hidden=16)
    imp = IMP(model, _sgd, prune_fraction=0.5, rewind_step=2, rewind="learning_rate")
    _train(model, imp, x, y, 8)
    trained = _weights(model)
    masks = imp.next_cycle()
    for weight, before, mask in zip(_weights(model), trained, masks):
        assert torch.equal(weight, torch.where(mask, before, 0))
    assert imp.step_in_cycle == 2


def test_ties_are_broken_towards_the_lower_flat_position():
    model = mlp(4, inputs=3, hidden=2, outputs=2)
    with torch.no_grad():
        for _, layer in sparse_modules(model):
            layer.weight.fill_(-0.5)
        model[0].weight[0, 0] = 0.0
    imp = IMP(model, _sgd, prune_fraction=0.5)
    masks = imp.next_cycle()           # 10 weights, 5 removed: the 0 then the last four ties
    flat = torch.cat([m.flatten() for m in masks])
    assert flat.tolist() == [False] + [True] * 5 + [False] * 4


def test_masks_nest_even_when_active_weights_tie_with_pruned_zeros():
    model = mlp(4, inputs=3, hidden=2, outputs=2)
    layers = [layer for _, layer in sparse_modules(model)]
    with torch.no_grad():
        layers[0].weight.zero_()
        layers[1].weight.zero_()
        layers[1].weight[1, 1] = 2.0
    imp = IMP(model, _sgd, prune_fraction=0.2)
    layers[0].set_mask(torch.tensor([[False, False, True], [True, True, True]]))
    masks = imp.next_cycle()           # 8 active, 2 removed: keep the 2.0 and the 5 first active zeros
    flat = torch.cat([m.flatten() for m in masks])
    assert flat.tolist() == [False, False, True, True, True, True, True, False, False, True]


def test_next_cycle_before_the_rewind_step_raises_and_changes_nothing():
    model = mlp(5, hidden=8)
    imp = IMP(model, _sgd, rewind_step=5)
    masks = imp.masks
    with pytest.raises(RuntimeError, match="rewind_step=5"):
        imp.next_cycle()
    assert all(torch.equal(a, b) for a, b in zip(masks, imp.masks)) and imp.cycle == 0


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(prune_fraction=1.0), ValueError, "prune_fraction must be a finite number in"),
    (dict(prune_fraction="0.2"), TypeError, "prune_fraction must be a number"),
    (dict(rewind_step=-1), ValueError, "rewind_step must be >= 0, got -1"),
    (dict(scope="layerwise"), ValueError, "scope must be one of"),
    (dict(rewind="optimizer"), ValueError, "rewind must be one of"),
])
def test_bad_arguments_raise_naming_them(kwargs, error, match):
    with pytest.raises(error, match=match):
        IMP(mlp(0, hidden=4), _sgd, **kwargs)


def test_a_model_without_sparse_modules_is_refused():
    with pytest.raises(ValueError, match="no sparse modules"):
        IMP(torch.nn.Linear(3, 3), _sgd)


def test_a_lazy_module_not_made_yet_is_refused_by_name_where_imp_keeps_the_state_at_construction_or_loads():
    # IMP keeps θ_0 as it is built (rewind_step=0, rewind="weights"), and its load checks θ_k against the model's
    # tensors: torch refused the lazy parameter naming no module. Learning-rate rewinding keeps no state.
    def lazy_model():
        model = mlp(0, hidden=12, batch_norm=True)
        model[1] = torch.nn.LazyBatchNorm1d()
        return model

    made = mlp(0, hidden=12, batch_norm=True)
    states = {rewind: IMP(made, _sgd, rewind=rewind).state_dict() for rewind in ("weights", "learning_rate")}
    lazy = r"the lazy modules '1' \(LazyBatchNorm1d\) have not made their parameters yet.*: "
    model = lazy_model()
    with pytest.raises(ValueError, match=r"^IMP keeps the model's state at rewind_step=0 as it is built, but "
                                         + lazy + "run the model on one batch before building IMP$"):
        IMP(model, _sgd)
    imp = IMP(model, _sgd, rewind="learning_rate")
    with pytest.raises(ValueError, match=r"^IMP.load_state_dict\(\) checks the state against the model's tensors, "
                                         r"but " + lazy + "load the model's state dict first$"):
        imp.load_state_dict(states["learning_rate"])
    assert model[1].has_uninitialized_params()
    model.load_state_dict(made.state_dict())
    imp.load_state_dict(states["learning_rate"])
    IMP(model, _sgd).load_state_dict(states["weights"])


def _uninterrupted(steps, cycles, rewind_step):
    x, y = _data(3)
    model = mlp(6, hidden=16)
    imp = IMP(model, _sgd, prune_fraction=0.3, rewind_step=rewind_step)
    imp.run(lambda a: _train(model, a, x, y, steps), cycles)
    return model, imp


@pytest.mark.parametrize("stop_cycle, stop_step", [(0, 2), (0, 5), (1, 4), (1, 10), (2, 7)])
def test_resuming_from_a_checkpoint_is_bit_identical(tmp_path, stop_cycle, stop_step):
    steps, cycles, rewind_step = 10, 3, 4
    reference, _ = _uninterrupted(steps, cycles, rewind_step)
    x, y = _data(3)
    model = mlp(6, hidden=16)
    imp = IMP(model, _sgd, prune_fraction=0.3, rewind_step=rewind_step)
    for _ in range(stop_cycle):
        _train(model, imp, x, y, steps)
        imp.next_cycle()
    _train(model, imp, x, y, steps, stop=stop_step)
    sparsekern.checkpoint.save({"model": model.state_dict(), "imp": imp.state_dict()}, tmp_path / "imp.pt")

    checkpoint = sparsekern.checkpoint.load(tmp_path / "imp.pt")
    resumed = mlp(99, hidden=16)
    resumed.load_state_dict(checkpoint["model"])
    imp = IMP(resumed, _sgd, prune_fraction=0.3, rewind_step=rewind_step)
    imp.load_state_dict(checkpoint["imp"])
    imp.run(lambda a: _train(resumed, a, x, y, steps), cycles)
    for a, b in zip(reference.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("saved, loaded", [
    (dict(rewind_step=2), dict(rewind_step=0)),    # cycle 1 at step 3 holding θ_2: fits k = 0 by its counters
    (dict(rewind_step=0), dict(rewind_step=2)),    # θ_0 held at step 3 of cycle 0: fits k = 2 by its counters
    (dict(rewind="learning_rate", rewind_step=2), dict(rewind="learning_rate", rewind_step=1))])
def test_a_state_saved_under_other_rewind_settings_is_refused(saved, loaded):
    x, y = _data(3)
    model = mlp(6, hidden=16)
    imp = IMP(model, _sgd, prune_fraction=0.3, **saved)
    if saved.get("rewind_step") == 2:
        _train(model, imp, x, y, 6)
        imp.next_cycle()
    _train(model, imp, x, y, 6, stop=3)
    other = IMP(mlp(6, hidden=16), _sgd, prune_fraction=0.3, **loaded)
    with pytest.raises(ValueError, match="saved with rewind"):
        other.load_state_dict(imp.state_dict())
    assert other.cycle == 0 and other.step_in_cycle == 0


def test_digits_imp_with_rewinding_beats_random_reinitialisation_at_90_percent_sparsity():
    seeds = range(3)
    imp = np.array([digits_run("imp", seed) for seed in seeds])
    reinit = np.array([digits_run("reinit", seed) for seed in seeds])
    print(f"digits, 90% sparsity, 3 seeds: IMP-WR {imp.mean():.4f} ± {imp.std():.4f}, "
          f"random reinit {reinit.mean():.4f} ± {reinit.std():.4f}")
    assert imp.mean() > reinit.mean()


def test_a_model_made_dense_by_sparsify_starts_imp_from_the_package_export():
    dense = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    model = sparsekern.sparsify(dense, 1.0, generator=torch.Generator().manual_seed(0))
    imp = sparsekern.IMP(model, _sgd, prune_fraction=0.5)
    assert all(mask.all() for mask in imp.masks)
    assert sum(int(mask.sum()) for mask in imp.next_cycle()) == 45 - math.ceil(0.5 * 45)


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_conv1d_and_conv3d_layers_are_pruned_at_exact_counts_and_rewound(scope):
    x, y = conv_data()
    model = conv1d_conv3d_model(1)
    imp = IMP(model, _sgd, prune_fraction=0.3, scope=scope)
    rewound = _weights(model)
    for cycle in range(2):
        _train(model, imp, x, y, 6)
        trained, old_masks = _weights(model), imp.masks
        new_masks = imp.next_cycle()
        if scope == "global":
            expected_keep, _ = _numpy_global_keep(trained, old_masks, 0.3)
            np.testing.assert_array_equal(np.concatenate([m.numpy().ravel() for m in new_masks]), expected_keep)
        else:
            for weight, old, new in zip(trained, old_masks, new_masks):
                keep, _ = _numpy_global_keep([weight], [old], 0.3)
                np.testing.assert_array_equal(new.numpy().ravel(), keep)
        for old, new in zip(old_masks[:2], new_masks[:2]):   # the Conv3d and the Conv1d lost weights
            assert int(new.sum()) < int(old.sum()) and not (new & ~old).any()
        for weight, theta_0, mask in zip(_weights(model), rewound, new_masks):
            assert torch.equal(weight, torch.where(mask, theta_0, 0))


# -- the lottery-ticket rule, against counts and tickets worked out by hand --
# The "training" writes chosen weights (under the mask) between step() calls, so which weights survive each
# cycle, and what they are reset to, can be read off by hand.


def _hand_layer(*shape):
    return sparsekern.nn.SparseLinear(shape[1], shape[0], bias=False)


def _write(layer, values):
    with torch.no_grad():
        layer.weight.copy_(torch.where(layer.mask, values.view_as(layer.weight), 0.0))


def test_removed_counts_and_rewind_target_by_hand():
    layer = _hand_layer(4, 6)
    model = torch.nn.Sequential(layer)
    imp = IMP(model, _sgd, prune_fraction=0.2, rewind_step=2)
    positions = torch.arange(24, dtype=torch.float32)
    theta_k = 100 + positions
    _write(layer, -positions)
    imp.step()
    _write(layer, theta_k)
    imp.step()                                   # θ_2 kept here
    rising, falling = positions + 1, 24 - positions   # |w| rising or falling with the flat position
    expected_active = []
    # ⌈0.2·24⌉ = 5 -> 19; ⌈0.2·19⌉ = ⌈3.8⌉ = 4 -> 15; ⌈0.2·15⌉ = 3 (0.2·15 is 3.0000000000000004 in
    # floating point) -> 12; ⌈0.2·12⌉ = ⌈2.4⌉ = 3 -> 9.
    for trained, survivors in [(rising, range(5, 24)), (falling, range(5, 20)), (rising, range(8, 20)),
                               (-falling, range(8, 17))]:
        _write(layer, trained)
        imp.step()
        mask = imp.next_cycle()[0].flatten()
        assert mask.nonzero().flatten().tolist() == list(survivors)
        # survivors rewound to θ_2, the others 0
        assert torch.equal(layer.weight.detach().flatten(), torch.where(mask, theta_k, 0.0))
        assert imp.step_in_cycle == 2
        expected_active.append(len(survivors))
    assert expected_active == [19, 15, 12, 9]


def test_global_and_layer_scope_by_hand():
    # Layer a holds |w| = 1..10, layer b |w| = 0.1..0.7 (17 weights), p = 0.25.
    def pruned(scope):
        a, b = _hand_layer(2, 5), _hand_layer(1, 7)
        _write(a, torch.arange(1, 11, dtype=torch.float32))
        _write(b, -torch.arange(1, 8, dtype=torch.float32) / 10)
        imp = IMP(torch.nn.Sequential(a, b), _sgd, prune_fraction=0.25, scope=scope)
        return [m.flatten().nonzero().flatten().tolist() for m in imp.next_cycle()]
    # global: ⌈0.25·17⌉ = ⌈4.25⌉ = 5 smallest over both layers, all five from b.
    assert pruned("global") == [list(range(10)), [5, 6]]
    # layer: ⌈0.25·10⌉ = 3 from a, ⌈0.25·7⌉ = ⌈1.75⌉ = 2 from b.
    assert pruned("layer") == [list(range(3, 10)), [2, 3, 4, 5, 6]]


def test_a_last_pruning_to_a_density_lands_on_round_d_n_whatever_the_earlier_rounding():
    # 1,000 weights (|w| = 1..1000), target d = 0.02 in 2 prunings: p = 1 - sqrt(0.02) = 0.858578...
    # ⌈p·1000⌉ = ⌈858.58⌉ = 859 -> 141; ⌈p·141⌉ = ⌈121.06⌉ = 122 -> 19, one short of
    # round(0.02·1000) = 20: next_cycle(density=0.02) keeps the 20 largest instead.
    layer = _hand_layer(20, 50)
    _write(layer, torch.arange(1, 1001, dtype=torch.float32))
    p = 1 - 0.02 ** 0.5
    imp = IMP(torch.nn.Sequential(layer), _sgd, prune_fraction=p)
    assert int(imp.next_cycle()[0].sum()) == 141
    assert int(imp.prune_masks()[0].sum()) == 19           # by ⌈p·remaining⌉
    mask = imp.next_cycle(density=0.02)[0].flatten()
    assert mask.nonzero().flatten().tolist() == list(range(980, 1000))
    with pytest.raises(ValueError, match="density=0.5 keeps 500 of the 1000 weights, more than the 20 that remain"):
        imp.next_cycle(density=0.5)
    assert int(imp.masks[0].sum()) == 20


def test_an_optimizer_imp_replaced_refuses_to_step_before_it_moves_a_weight():
    # A loop that kept `imp.optimizer` from before next_cycle() stepped it on: its momentum moved pruned
    # weights off 0 under layers that promise zeros there, and the ticket computed with them.
    x, y = _data(4)
    model = mlp(4)
    imp = IMP(model, _sgd, prune_fraction=0.5)
    kept = imp.optimizer
    _train(model, imp, x, y, 5)
    imp.next_cycle()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    before = _weights(model)
    with pytest.raises(RuntimeError, match=r"^step\(\) of an optimizer that IMP has replaced .* Step imp.optimizer"):
        kept.step()
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(model)))
    imp.optimizer.step()
    for _, layer in sparse_modules(model):
        layer.verify_zero_off_mask()
    loaded = IMP(model, _sgd, prune_fraction=0.5)
    constructed = loaded.optimizer
    loaded.load_state_dict(imp.state_dict())
    with pytest.raises(RuntimeError, match="replaced"):
        constructed.step()


def test_run_prunes_to_its_density_at_the_last_pruning():
    # The weights of the test above, which training that does nothing keeps: by ⌈p·remaining⌉ alone three cycles
    # end at 19 weights; run(density=0.02) prunes the second time to round(0.02·1000) = 20, the 20 largest.
    def run(**density):
        layer = _hand_layer(20, 50)
        _write(layer, torch.arange(1, 1001, dtype=torch.float32))
        imp = IMP(torch.nn.Sequential(layer), _sgd, prune_fraction=1 - 0.02 ** 0.5)
        imp.run(lambda imp: None, 3, **density)
        return imp.masks[0].flatten()
    assert int(run().sum()) == 19
    assert run(density=0.02).nonzero().flatten().tolist() == list(range(980, 1000))


@pytest.mark.parametrize("cycles, density, scope, match", [
    (1, 0.5, "global", r"density=0.5 needs cycles >= 2 .*got cycles=1"),
    (3, 1.5, "global", r"density must be a finite number in \(0, 1\], got 1.5"),
    # p = 0.2 once leaves 0.8 of the weights, fewer than the 0.9 the last pruning would keep (all layers, or each)
    (3, 0.9, "global", r"density=0.9 keeps \d+ weights of all layers, but the 1 prunings of prune_fraction=0.2 "
                       r"before the last leave \d+: pruning cannot add weights"),
    (3, 0.9, "layer", r"density=0.9 keeps \d+ weights of '0', but the 1 prunings .* leave \d+")])
def test_run_refuses_a_density_it_cannot_reach_before_training(cycles, density, scope, match):
    model = mlp(0)
    imp = IMP(model, _sgd, scope=scope)
    trained = []
    with pytest.raises(ValueError, match=match):
        imp.run(trained.append, cycles, density=density)
    assert trained == [] and imp.cycle == 0


def test_a_pruning_to_a_density_per_layer_and_one_that_would_grow_by_hand():
    # scope "layer": round(0.3·10) = 3 of a, round(0.3·7) = round(2.1) = 2 of b, the largest |w| of each.
    a, b = _hand_layer(2, 5), _hand_layer(1, 7)
    _write(a, torch.arange(1, 11, dtype=torch.float32))
    _write(b, -torch.arange(1, 8, dtype=torch.float32) / 10)
    imp = IMP(torch.nn.Sequential(a, b), _sgd, prune_fraction=0.5, scope="layer")
    masks = imp.next_cycle(density=0.3)
    assert [m.flatten().nonzero().flatten().tolist() for m in masks] == [[7, 8, 9], [5, 6]]
    # density 0.5 would keep round(0.5·10) = 5 of a's 3 and round(3.5) = 4 of b's 2, which pruning cannot.
    with pytest.raises(ValueError, match=r"density=0.5 keeps more weights than remain in layers \['0', '1'\]"):
        imp.next_cycle(density=0.5)
    assert [int(m.sum()) for m in imp.masks] == [3, 2]     # nothing changed
    for bad in (0, 1.5, float("nan"), "0.1"):
        with pytest.raises((TypeError, ValueError), match="density"):
            imp.prune_masks(density=bad)


def test_the_emptied_layer_warning_names_the_line_that_called_next_cycle():
    # next_cycle() reaches the warning through prune_masks(), under torch.no_grad()'s decorator: a fixed count
    # named a line of imp.py.
    model = mlp(0)
    imp = IMP(model, lambda params: torch.optim.SGD(params, lr=0.1), prune_fraction=0.9)
    last = sparse_modules(model)[-1][1]
    with torch.no_grad():
        last.weight.mul_(1e-9)   # global pruning takes the whole last layer
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = sys._getframe().f_lineno + 1
        imp.next_cycle()
    assert [w.message.args[0].startswith("global magnitude pruning leaves layers") for w in caught] == [True]
    assert (caught[0].filename, caught[0].lineno) == (__file__, line)


@pytest.mark.parametrize("kind", BAD_OWN_MASKS)
def test_next_cycle_refuses_a_layer_whose_mask_was_put_in_place_through_data_with_nothing_changed(kind):
    # An expanded one: torch refused to copy the new mask in after the weights were rewound; another dtype or shape
    # failed in the pruning's indexing, naming no layer.
    x, y = _data()
    model = mlp(0)
    imp = IMP(model, _sgd, prune_fraction=0.3, rewind_step=1)
    _train(model, imp, x, y, 3)
    error, match = damage_mask(model[2], kind)
    optimizer, before = imp.optimizer, everything(model, imp.optimizer)
    with pytest.raises(error, match="^IMP: layer '2'" + match):
        imp.next_cycle()
    assert_unchanged(before, everything(model, optimizer))
    assert imp.optimizer is optimizer and imp.cycle == 0 and imp.step_in_cycle == 3


def test_a_state_whose_optimizer_runs_out_of_memory_loading_raises_out_of_memory(monkeypatch):
    # Review 28d: it became ValueError 'state['optimizer'] does not fit the optimizer', blaming a good state.
    model = mlp(4)
    imp = IMP(model, _sgd, prune_fraction=0.5)
    state = imp.state_dict()

    def failing(self, state_dict):
        raise torch.OutOfMemoryError("CUDA out of memory")
    monkeypatch.setattr(torch.optim.SGD, "load_state_dict", failing)
    with pytest.raises(torch.OutOfMemoryError):
        IMP(model, _sgd, prune_fraction=0.5).load_state_dict(state)
