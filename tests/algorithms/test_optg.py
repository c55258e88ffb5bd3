"""OptG: the paper's learned scores, the per-epoch global mask, pruned weights that
come back, and resumption."""
import copy
import math
import sys
import warnings

import numpy as np
import pytest
import torch

import sparsekern.checkpoint
import sparsekern.nn
import sparsekern.ops
from sparsekern.algorithms import OptG, _tickets
from sparsekern.algorithms.optg import cosine_lr, sparsity_at
from sparsekern.nn import sparse_modules

from ..helpers import (BAD_OWN_MASKS, assert_unchanged, batch, conv1d_conv3d_model, conv_data, damage_mask, everything,
                       mlp)

pytestmark = pytest.mark.usefixtures("one_thread")


def _data(seed=0, rows=64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 64, generator=g), torch.randint(0, 10, (rows,), generator=g)


def _layers(model):
    return [layer for _, layer in sparse_modules(model)]


def _dense_gradient(model, inputs, targets):
    """g = ∂L/∂(θ ⊙ m) of each sparse layer, by plain autograd on a functional copy of the MLP."""
    first, second = _layers(model)
    w1 = (first.weight * first.mask).detach().requires_grad_()
    w2 = (second.weight * second.mask).detach().requires_grad_()
    hidden = torch.relu(inputs @ w1.T + first.bias.detach())
    loss = torch.nn.functional.cross_entropy(hidden @ w2.T + second.bias.detach(), targets)
    return torch.autograd.grad(loss, [w1, w2])


def _epoch_loop(model, optg, optimizer, x, y, epochs, steps, start_step=0, stop=None, on_step=None):
    """Trains epochs optg.epoch..epochs-1 from step `start_step`; returns early at (epoch, step) `stop`."""
    for epoch in range(optg.epoch, epochs):
        for group in optimizer.param_groups:
            group["lr"] = optg.lr_schedule(epoch)
        for t in range(start_step, steps):
            if (epoch, t) == stop:
                return
            inputs, targets = batch(x, y, epoch, t, 16)
            if on_step is not None:
                on_step(inputs, targets)
            torch.nn.functional.cross_entropy(model(inputs), targets).backward()
            optg.step()
            optimizer.step()
            optimizer.zero_grad()
        start_step = 0
        optg.next_epoch()


def test_scores_accumulate_minus_lr_times_gradient_times_weight_at_every_position():
    x, y = _data()
    model = mlp(1, hidden=16)
    epochs, steps = 4, 5
    optg = OptG(model, sparsity=0.6, epochs=epochs, lr=0.2, momentum=0.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    expected = [torch.zeros_like(layer.weight, dtype=torch.float64) for layer in _layers(model)]
    pruned_seen = [torch.zeros_like(layer.mask) for layer in _layers(model)]

    def record(inputs, targets):
        eta = optg.score_lr(optg.epoch)
        for total, seen, layer, g in zip(expected, pruned_seen, _layers(model),
                                         _dense_gradient(model, inputs, targets)):
            total -= eta * (g * layer.weight.detach()).double()
            seen |= ~layer.mask
    _epoch_loop(model, optg, optimizer, x, y, epochs, steps, on_step=record)
    for score, total, seen in zip(optg.scores, expected, pruned_seen):
        torch.testing.assert_close(score.double(), total, rtol=0, atol=1e-6)
        assert seen.any() and (score[seen] != 0).any()     # pruned positions' scores move too


def test_each_epoch_keeps_the_global_top_scores_at_the_ramped_sparsity():
    x, y = _data(1)
    model = mlp(2, hidden=16)
    epochs = 6
    optg = OptG(model, sparsity=0.8, epochs=epochs, lr=0.1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    total = sum(layer.mask.numel() for layer in _layers(model))
    for epoch in range(epochs):
        scores = np.concatenate([s.numpy().ravel() for s in optg.scores])
        ramp = (1 + math.exp(-(epochs / 2 - 1))) / (1 + math.exp(-(epoch - epochs / 2)))  # σ(e − E/2)/σ(E/2 − 1)
        keep = total - round(0.8 * ramp * total) if epoch else total
        order = np.lexsort((np.arange(total), -scores))      # ties to the lower flat position
        expected = np.zeros(total, dtype=bool)
        expected[order[:keep]] = True
        np.testing.assert_array_equal(np.concatenate([m.numpy().ravel() for m in optg.masks]), expected)
        assert optg.score_lr(epoch) == pytest.approx(
            cosine_lr(0.1, epochs)(epoch) / (1 + math.exp(-(epoch - epochs / 2))))
        _epoch_loop(model, optg, optimizer, x, y, epoch + 1, 3)
    assert sparsity_at(epochs - 1, 0.8, epochs) == pytest.approx(0.8)
    assert sparsity_at(epochs, 0.8, epochs) == 0.8          # capped: never beyond the target


@pytest.mark.parametrize("epochs", [2, 3, 10, 31])
@pytest.mark.parametrize("sparsity", [0.5, 0.95, 0.99])
def test_the_last_epoch_trains_at_exactly_the_target_density(epochs, sparsity):
    model = mlp(0, hidden=16)
    optg = OptG(model, sparsity=sparsity, epochs=epochs, lr=0.1)
    ramp = [optg.sparsity_at(e) for e in range(epochs)]
    assert ramp == sorted(ramp) and ramp[-1] == pytest.approx(sparsity, abs=1e-12)
    for layer, score in zip(_layers(model), optg.scores):  # scores no longer tie
        score.copy_(torch.randn(score.shape, generator=torch.Generator().manual_seed(epochs)))
    while optg.epoch < epochs - 1:
        optg.next_epoch()
    total = sum(layer.mask.numel() for layer in _layers(model))
    assert sum(int(layer.mask.sum()) for layer in _layers(model)) == total - round(sparsity * total)


def test_next_epoch_after_the_last_epoch_keeps_the_mask_the_last_epoch_trained():
    # The docstring's loop calls next_epoch() after every epoch, the last included: the model must end with
    # the mask it trained with, not a top-k of the scores that moved during the last epoch.
    x, y = _data(7)
    model = mlp(8, hidden=16)
    epochs = 3
    optg = OptG(model, sparsity=0.8, epochs=epochs, lr=0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    _epoch_loop(model, optg, optimizer, x, y, epochs - 1, 4)
    for t in range(4):  # the last epoch, by hand, so that its mask can be read before next_epoch()
        inputs, targets = batch(x, y, epochs - 1, t, 16)
        torch.nn.functional.cross_entropy(model(inputs), targets).backward()
        optg.step()
        optimizer.step()
        optimizer.zero_grad()
    trained = optg.masks
    total = sum(layer.mask.numel() for layer in _layers(model))
    top_k = sparsekern.ops.topk_mask(optg.scores, sum(int(m.sum()) for m in trained))
    assert not all(torch.equal(a, b) for a, b in zip(trained, top_k))   # the moved scores would pick others
    optg.next_epoch()
    assert optg.epoch == epochs
    assert all(torch.equal(a, b) for a, b in zip(trained, optg.masks))
    assert sum(int(m.sum()) for m in optg.masks) == total - round(0.8 * total)
    with pytest.raises(RuntimeError, match="last"):
        optg.next_epoch()


def test_the_reference_ramp_stops_short_of_the_target():
    # the reference code's p·σ(β(e − E/2)): a nominal density 0.05 over 10 epochs ends at 0.067
    final = sparsity_at(9, 0.95, 10, reach_target=False)
    assert 1 - final == pytest.approx(0.0671, abs=1e-4)
    assert sparsity_at(9, 0.95, 10) == pytest.approx(0.95)


def test_magnitude_criterion_keeps_the_largest_weights_on_the_same_ramp():
    x, y = _data(5)
    model = mlp(6, hidden=16)
    epochs = 4
    optg = OptG(model, sparsity=0.75, epochs=epochs, lr=0.1, criterion="magnitude")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    total = sum(layer.mask.numel() for layer in _layers(model))
    for epoch in range(epochs):
        magnitudes = np.concatenate([layer.weight.detach().abs().numpy().ravel() for layer in _layers(model)])
        keep = total - round(optg.sparsity_at(epoch) * total)
        expected = np.zeros(total, dtype=bool)
        expected[np.lexsort((np.arange(total), -magnitudes))[:keep]] = True
        np.testing.assert_array_equal(np.concatenate([m.numpy().ravel() for m in optg.masks]), expected)
        assert not any(layer.dense_grad for layer in _layers(model))    # no scores to train
        _epoch_loop(model, optg, optimizer, x, y, epoch + 1, 3)


def test_pruned_weights_keep_their_values_get_no_gradient_and_come_back():
    x, y = _data(2)
    model = mlp(3, hidden=8)
    optg = OptG(model, sparsity=0.5, epochs=4, lr=0.1)   # the next_epoch() below is not after the last epoch
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # no momentum, no decay
    _epoch_loop(model, optg, optimizer, x, y, 1, 3)
    layer = _layers(model)[0]
    before = layer.weight.detach().clone()
    pruned = ~layer.mask
    assert pruned.any() and (before[pruned] != 0).all()      # masked out, not zeroed
    _epoch_loop(model, optg, optimizer, x, y, 2, 3)
    assert torch.equal(layer.weight[pruned], before[pruned])
    assert not torch.equal(layer.weight[~pruned], before[~pruned])
    # A pruned weight whose score rises to the top returns with the value it kept.
    position = pruned.nonzero()[0].tolist()
    with torch.no_grad():
        optg.scores[0][tuple(position)] = 1e3
    optg.next_epoch()
    assert layer.mask[tuple(position)]
    assert layer.weight[tuple(position)] == before[tuple(position)]


def test_epoch_zero_is_dense_while_all_scores_are_zero_unless_asked():
    total = 64 * 8 + 8 * 10
    assert all(m.all() for m in OptG(mlp(0, hidden=8), sparsity=0.9, epochs=2).masks)
    masks = OptG(mlp(0, hidden=8), sparsity=0.9, epochs=2, dense_while_scores_tie=False).masks
    flat = torch.cat([m.flatten() for m in masks])
    removed = round(0.9 * 2 / (1 + math.exp(1)) * total)     # p·σ(−1)/σ(0), the ramp's epoch 0 of 2
    assert flat.tolist() == [True] * (total - removed) + [False] * removed   # ties: lower position kept


def test_scores_get_no_weight_decay_and_the_weights_gradient_is_masked():
    x, y = _data(3)
    model = mlp(4, hidden=8)
    optg = OptG(model, sparsity=0.5, epochs=2, lr=0.1, momentum=0.0, dense_while_scores_tie=False)
    assert all(group["weight_decay"] == 0 for group in optg.score_optimizer.param_groups)
    inputs, targets = batch(x, y, 0, 0, 16)
    torch.nn.functional.cross_entropy(model(inputs), targets).backward()
    optg.step()
    for layer in _layers(model):
        assert (layer.weight.grad[~layer.mask] == 0).all()
        assert layer.dense_grad


def test_step_sets_dense_grad_again_where_cleared_and_assigns_nothing_where_it_is_set(monkeypatch):
    # It assigned dense_grad = True to every layer at every step, through the modules' __setattr__ (~1 us each).
    x, y = _data(3)
    model = mlp(4, hidden=8)
    optg = OptG(model, sparsity=0.5, epochs=2, lr=0.1, dense_while_scores_tie=False)
    layers = _layers(model)
    assigned = []
    setattr_of = type(layers[0]).__setattr__
    monkeypatch.setattr(type(layers[0]), "__setattr__", lambda self, name, value: (
        assigned.append(name) if name == "dense_grad" else None, setattr_of(self, name, value))[1])
    for step, cleared in enumerate([False, True]):
        inputs, targets = batch(x, y, 0, step, 16)
        layers[1].dense_grad = not cleared
        assigned.clear()
        torch.nn.functional.cross_entropy(model(inputs), targets).backward()
        optg.step()
        assert all(layer.dense_grad for layer in layers)
        assert assigned == (["dense_grad"] if cleared else [])
        for layer in layers:
            layer.weight.grad = None


def test_the_weights_gradient_is_masked_by_a_select_as_the_layers_mask_it():
    # Before: a multiply by the mask, so an inf gradient at a pruned weight became NaN there, and OptG, which
    # keeps pruned values to bring them back, would have stepped that weight to NaN.
    x, y = _data(3)
    model = mlp(4, hidden=8)
    optg = OptG(model, sparsity=0.5, epochs=2, lr=0.1, dense_while_scores_tie=False, host_checks=False)
    inputs, targets = batch(x, y, 0, 0, 16)
    torch.nn.functional.cross_entropy(model(inputs), targets).backward()
    layer = _layers(model)[0]
    layer.weight.grad[~layer.mask] = float("inf")
    optg.step()
    off = layer.weight.grad[~layer.mask]
    assert off.numel() and torch.equal(off, torch.zeros_like(off)) and not torch.signbit(off).any()



@pytest.mark.parametrize("host_checks", [True, False])
def test_a_step_whose_gradients_are_not_finite_leaves_the_scores_alone(host_checks):
    # Such a step is one torch.amp.GradScaler skips (an fp16 overflow). Before: the scores took inf · θ, stayed
    # inf or NaN for good, and every later epoch kept or pruned those weights whatever they did.
    x, y = _data(5)
    model = mlp(6, hidden=8)
    optg = OptG(model, sparsity=0.5, epochs=3, lr=0.1, host_checks=host_checks)
    for step in range(3):
        inputs, targets = batch(x, y, 0, step, 16)
        torch.nn.functional.cross_entropy(model(inputs), targets).backward()
        if step == 1:
            _layers(model)[1].weight.grad[2] = float("inf")
            scores = [score.clone() for score in optg.scores]
            momenta = [optg.score_optimizer.state[score]["momentum_buffer"].clone() for score in optg.scores]
        optg.step()
        for layer in _layers(model):
            layer.weight.grad = None
        if step == 1 and host_checks:
            assert all(torch.equal(a, b) for a, b in zip(scores, optg.scores))
            assert all(torch.equal(a, optg.score_optimizer.state[b]["momentum_buffer"])
                       for a, b in zip(momenta, optg.scores))
            assert all(layer.dense_grad for layer in _layers(model))
    assert all(torch.isfinite(score).all() for score in optg.scores) == host_checks   # False: trusts them
    assert not torch.equal(optg.scores[1], scores[1])   # the steps after it update again


def test_a_frozen_layer_keeps_its_mask_and_the_others_reach_the_target():
    # Before: a layer whose weight does not require grad kept its scores at 0, and the global top-k pruned it
    # by position (its last entries first).
    x, y = _data(6)
    model = mlp(7, hidden=8)
    frozen, trained = _layers(model)
    frozen.weight.requires_grad_(False)
    with pytest.warns(UserWarning, match=r"OptG leaves the masks of \['0'\] alone"):
        optg = OptG(model, sparsity=0.5, epochs=3, lr=0.1)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    _epoch_loop(model, optg, optimizer, x, y, 3, 3)
    assert frozen.mask.all() and not frozen.dense_grad
    assert int(trained.mask.sum()) == trained.mask.numel() - round(0.5 * trained.mask.numel())
    trained.weight.requires_grad_(False)
    with pytest.raises(ValueError, match="no sparse layer of the model is trained"):
        OptG(model, sparsity=0.5, epochs=3)
    OptG(model, sparsity=0.5, epochs=3, criterion="magnitude")   # magnitudes need no gradient
    trained.weight.requires_grad_(True)
    with warnings.catch_warnings():   # a refused argument is the only message: no warning before it
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="epochs must be"):
            OptG(model, sparsity=0.5, epochs=0)

def _train_freezing(model, optg, x, y, epochs, steps, layer, since, until, start=(0, 0), stop=None, on_epoch=None):
    """Trains epochs optg.epoch..epochs-1 from (epoch, step) `start` with plain SGD over the weights requiring grad
    (stateless: rebuilt at every step), `layer` frozen from step `since`, right after its backward (its gradient
    stays on it, as the optimizer no longer clears it), until step `until`, before its backward; returns early at
    step `stop`. `on_epoch()` runs after each next_epoch()."""
    for epoch in range(optg.epoch, epochs):
        for t in range(start[1] if epoch == start[0] else 0, steps):
            if (epoch, t) == stop:
                return
            if (epoch, t) == until:
                layer.weight.requires_grad_(True)
                layer.weight.grad = None
            inputs, targets = batch(x, y, epoch, t, 16)
            torch.nn.functional.cross_entropy(model(inputs), targets).backward()
            if (epoch, t) == since:
                layer.weight.requires_grad_(False)
            optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
            optg.step()
            optimizer.step()
            optimizer.zero_grad()
        optg.next_epoch()
        if on_epoch is not None:
            on_epoch()


def _kept(optg):
    return sum(int(mask.sum()) for mask in optg.masks)


def test_a_step_that_used_no_sparse_layer_keeps_their_scores_and_one_before_backward_is_refused():
    # Review 28: refusing every step at which no sparse layer had a gradient refused a sparse adapter (a branch) a
    # step did not use, after its backward; only no gradient anywhere is a step() before backward, as for DST.
    torch.manual_seed(0)
    trunk, adapter = torch.nn.Linear(6, 6), sparsekern.nn.SparseLinear(6, 6)
    model = torch.nn.Sequential(trunk, adapter)
    optg = OptG(model, sparsity=0.5, epochs=3, lr=0.1)
    x = torch.randn(4, 6)
    trunk(x).sum().backward()   # the adapter unused at this step
    scores = [score.clone() for score in optg.scores]
    optg.step()
    assert all(torch.equal(old, new) for old, new in zip(scores, optg.scores))
    model.zero_grad(set_to_none=True)
    with pytest.raises(RuntimeError, match="no trained parameter of the model has a gradient"):
        optg.step()
    model(x).sum().backward()
    optg.step()
    assert not torch.equal(scores[0], optg.scores[0])
    # Review 28c: a gradient a frozen parameter kept from before it was frozen is no backward of this step.
    trunk.weight.requires_grad_(False)
    adapter.weight.grad = trunk.bias.grad = adapter.bias.grad = None
    with pytest.raises(RuntimeError, match="no trained parameter of the model has a gradient"):
        optg.step()


def test_a_layer_frozen_after_construction_keeps_its_mask_and_scores_and_the_model_stays_on_the_ramp():
    # Before: its stale scores were still ranked in each epoch's global top-k (its mask moved, without a warning),
    # and the gradient it kept from before freezing was refused as stale at the next step().
    x, y = _data(3)
    model = mlp(2, hidden=16)
    first, second = _layers(model)
    epochs, steps = 5, 4
    optg = OptG(model, sparsity=0.6, epochs=epochs, lr=0.5, momentum=0.9)
    total = sum(mask.numel() for mask in optg.masks)
    held = {}

    def on_epoch():
        epoch = min(optg.epoch, epochs - 1)
        assert _kept(optg) == total - round(optg.sparsity_at(epoch) * total)   # on the ramp, exactly
        if optg.epoch == 1:   # the mask it is frozen with, at step (1, 2)
            held.update(mask=second.mask.clone())
        elif second.weight.requires_grad and optg.epoch < epochs:   # ranked with the others again
            assert all(torch.equal(mask, want) for mask, want in zip(
                optg.masks, sparsekern.ops.topk_mask(optg.scores, _kept(optg))))
        elif not second.weight.requires_grad:
            if "score" not in held:   # at the end of the first whole epoch it sat out
                held.update(score=optg.scores[1].clone(),
                            momentum=optg.score_optimizer.state[optg.scores[1]]["momentum_buffer"].clone())
            assert torch.equal(optg.scores[1], held["score"])
            assert torch.equal(optg.score_optimizer.state[optg.scores[1]]["momentum_buffer"], held["momentum"])
            assert torch.equal(second.mask, held["mask"])
            assert torch.equal(first.mask, sparsekern.ops.topk_mask([optg.scores[0]],
                                                                    _kept(optg) - int(held["mask"].sum()))[0])

    with pytest.warns(UserWarning, match=r"OptG leaves the masks and scores of \['2'\] alone") as warned:
        _train_freezing(model, optg, x, y, epochs, steps, second, since=(1, 2), until=(3, 1), on_epoch=on_epoch)
    assert len([w for w in warned if "OptG leaves" in str(w.message)]) == 1   # once
    assert held and 0 < int(held["mask"].sum()) < held["mask"].numel()
    assert not torch.equal(optg.scores[1], held["score"])   # unfrozen, its scores moved again
    assert _kept(optg) == total - round(0.6 * total)


def test_frozen_layers_that_leave_the_others_no_count_meeting_the_budget_are_refused_with_nothing_changed():
    model = mlp(2, hidden=16)   # 1024 + 160 weights
    first, second = _layers(model)
    optg = OptG(model, sparsity=0.6, epochs=3, criterion="learned")
    x, y = _data(1)
    _epoch_loop(model, optg, torch.optim.SGD(model.parameters(), lr=0.1), x, y, 3, 4, stop=(0, 2))
    first.weight.requires_grad_(False)   # dense (epoch 0): 1024 active, more than epoch 1 keeps
    masks, scores = [m.clone() for m in optg.masks], [s.clone() for s in optg.scores]
    with pytest.raises(RuntimeError, match=r"the layers frozen after OptG was built, \['0'\], keep their masks, "
                                           r"with 1024 active weights, and epoch 1 keeps 753 of all 1184"):
        optg.next_epoch()
    with torch.no_grad():   # so sparse that the others cannot make up for it
        first.mask.zero_()
        first.mask[0, 0] = True
    masks[0] = first.mask.clone()
    with pytest.raises(RuntimeError, match=r"with 1 active weights.* \(which hold 160\) would have to keep 752"):
        optg.next_epoch()
    with torch.no_grad():   # exactly the epoch's budget: the others would keep no weight at all
        first.mask.zero_()
        first.mask.view(-1)[:753] = True
    masks[0] = first.mask.clone()
    with pytest.raises(RuntimeError, match=r"with 753 active weights.* \(which hold 160\) would have to keep 0"):
        optg.next_epoch()
    assert optg.epoch == 0
    assert all(torch.equal(a, b) for a, b in zip(masks + scores, optg.masks + optg.scores))
    first.weight.requires_grad_(True)
    optg.next_epoch()
    assert _kept(optg) == 753


def test_a_state_saved_with_a_layer_frozen_resumes_bit_identically(tmp_path):
    x, y = _data(5)
    epochs, steps = 4, 4

    def fresh():
        model = mlp(9, hidden=16)
        return model, OptG(model, sparsity=0.7, epochs=epochs, lr=0.5)

    def train(model, optg, **options):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _train_freezing(model, optg, x, y, epochs, steps, _layers(model)[1], since=(0, 3), until=(3, 2),
                            **options)

    reference, optg = fresh()
    train(reference, optg)
    model, optg = fresh()
    train(model, optg, stop=(2, 1))
    sparsekern.checkpoint.save({"model": model.state_dict(), "optg": optg.state_dict()}, tmp_path / "optg.pt")
    checkpoint = sparsekern.checkpoint.load(tmp_path / "optg.pt")
    model, optg = fresh()   # built before freezing: the layer is OptG's, as in the run that saved the state
    _layers(model)[1].weight.requires_grad_(False)
    model.load_state_dict(checkpoint["model"])
    optg.load_state_dict(checkpoint["optg"])
    train(model, optg, start=(2, 1))
    assert all(torch.equal(a, b) for a, b in zip(reference.state_dict().values(), model.state_dict().values()))
    built_frozen = mlp(9, hidden=16)
    _layers(built_frozen)[1].weight.requires_grad_(False)
    with pytest.warns(UserWarning, match="OptG leaves the masks of"):
        optg = OptG(built_frozen, sparsity=0.7, epochs=epochs, lr=0.5)
    with pytest.raises(ValueError, match=r"unexpected \['2'\]"):
        optg.load_state_dict(checkpoint["optg"])


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(sparsity=1.0), ValueError, "sparsity must be a finite number in"),
    (dict(sparsity="0.9"), TypeError, "sparsity must be a number"),
    (dict(epochs=0), ValueError, "epochs must be >= 1, got 0"),
    (dict(beta=-1.0), ValueError, "beta must be a finite number > 0, got -1.0"),
    (dict(lr_schedule=0.1), TypeError, "lr_schedule must be callable"),
    (dict(criterion="snip"), ValueError, r"criterion must be one of \['learned', 'magnitude'\], got 'snip'"),
    (dict(criterion=None), TypeError, "criterion must be a str, got NoneType"),
])
def test_bad_arguments_raise_naming_them(kwargs, error, match):
    arguments = {"sparsity": 0.5, "epochs": 3, **kwargs}
    with pytest.raises(error, match=match):
        OptG(mlp(0, hidden=4), **arguments)


@pytest.mark.parametrize("lr", [np.float32(0.25), np.float64(0.25), 1])
def test_an_lr_schedule_giving_any_real_number_is_taken_as_its_float(lr):
    # A NumPy float32 was refused ("must return a finite number >= 0, got np.float32(0.25)"): only int and float were
    # taken, not the real numbers every other numeric argument takes.
    optg = OptG(mlp(0, hidden=4), sparsity=0.5, epochs=3, lr_schedule=lambda epoch: lr)
    assert optg.score_lr(1) == pytest.approx(float(lr) / (1 + math.exp(0.5)))   # lr_1 σ(β(1 - E/2)), β = 1, E = 3
    assert type(optg.score_optimizer.param_groups[0]["lr"]) is float


def test_a_criterion_given_as_a_str_subclass_is_kept_as_its_text(tmp_path):
    # A NumPy str_ was kept as it came and went into state_dict(), which sparsekern.checkpoint.save refused; a
    # subclass's own __eq__ could say it was "learned".
    optg = OptG(mlp(0, hidden=4), sparsity=0.5, epochs=3, criterion=np.str_("magnitude"))
    assert type(optg.criterion) is str and type(optg.state_dict()["criterion"]) is str
    sparsekern.checkpoint.save(optg.state_dict(), tmp_path / "optg.pt")


def test_one_epoch_that_would_end_dense_is_refused_and_the_others_run():
    # Epoch 0's scores all tie at 0 and dense_while_scores_tie keeps it dense: with E = 1 a run ended dense.
    with pytest.raises(ValueError, match="epochs=1 would end dense, not at sparsity=0.5"):
        OptG(mlp(0, hidden=4), sparsity=0.5, epochs=1)
    for options in (dict(criterion="magnitude"), dict(dense_while_scores_tie=False), dict(sparsity=0.0)):
        optg = OptG(mlp(0, hidden=4), **{"sparsity": 0.5, "epochs": 1, **options})
        kept = sum(int(mask.sum()) for mask in optg.masks) / sum(mask.numel() for mask in optg.masks)
        assert kept == pytest.approx(1 - optg.sparsity, abs=0.01)


@pytest.mark.parametrize("stop_epoch, stop_step", [(1, 0), (1, 3), (2, 4)])
def test_resuming_from_a_checkpoint_is_bit_identical(tmp_path, stop_epoch, stop_step):
    x, y = _data(4)
    epochs, steps = 4, 5

    def fresh(seed):
        model = mlp(seed, hidden=16)
        return (model, OptG(model, sparsity=0.7, epochs=epochs, lr=0.1),
                torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3))

    reference, optg, optimizer = fresh(5)
    _epoch_loop(reference, optg, optimizer, x, y, epochs, steps)
    reference_scores = [s.clone() for s in optg.scores]

    model, optg, optimizer = fresh(5)
    _epoch_loop(model, optg, optimizer, x, y, epochs, steps, stop=(stop_epoch, stop_step))
    sparsekern.checkpoint.save({"model": model.state_dict(), "optg": optg.state_dict(),
                                "optimizer": optimizer.state_dict()}, tmp_path / "optg.pt")
    checkpoint = sparsekern.checkpoint.load(tmp_path / "optg.pt")
    model, optg, optimizer = fresh(6)
    model.load_state_dict(checkpoint["model"])
    optg.load_state_dict(checkpoint["optg"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    _epoch_loop(model, optg, optimizer, x, y, epochs, steps, start_step=stop_step)
    for a, b in zip(reference.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(reference_scores, optg.scores):
        assert torch.equal(a, b)


def test_conv1d_and_conv3d_masks_follow_the_ramp_at_exact_global_counts():
    x, y = conv_data(4)
    model = conv1d_conv3d_model(5)
    epochs = 4
    optg = OptG(model, sparsity=0.7, epochs=epochs, lr=0.1, dense_while_scores_tie=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    convolutions = _layers(model)[:2]
    total = sum(layer.mask.numel() for layer in _layers(model))
    seen = [[] for _ in convolutions]
    for epoch in range(epochs):
        assert sum(int(m.sum()) for m in optg.masks) == total - round(optg.sparsity_at(epoch) * total)
        for history, layer in zip(seen, convolutions):
            history.append(layer.mask.clone())
        dense = copy.deepcopy(model)
        for index in (0, 3, 6):   # OptG keeps pruned values: they must not reach the output
            dense[index] = model[index].to_dense()
        torch.testing.assert_close(model(x[:8]), dense(x[:8]))
        _epoch_loop(model, optg, optimizer, x, y, epoch + 1, 3)
    for history, layer in zip(seen, convolutions):
        assert any(not torch.equal(a, b) for a, b in zip(history, history[1:]))
        assert (layer.weight[~layer.mask] != 0).any()   # kept, not zeroed


# -- the ramp, the score rate and the straight-through update, against values worked out by hand --
# E = 4, p = 0.5, β = 1: σ(−2) = 0.1192029, σ(−1) = 0.2689414, σ(0) = 0.5, σ(1) = 0.7310586.


def test_ramp_by_hand():
    # p_e = p·σ(e − 2)/σ(1): 0.5·0.1630552 = 0.0815276, 0.5·e⁻¹ = 0.1839397, 0.5·0.6839397 = 0.3419699, 0.5
    expected = [0.0815276, 0.1839397, 0.3419699, 0.5]
    assert [sparsity_at(e, 0.5, 4) for e in range(4)] == pytest.approx(expected, abs=1e-7)
    # the reference code's p·σ(e − 2) ends at 0.5·σ(1) = 0.3655293
    assert sparsity_at(3, 0.5, 4, reach_target=False) == pytest.approx(0.3655293, abs=1e-7)
    # β = 2 over E = 4: p_1 = 0.5·σ(−2)/σ(2) = 0.5·0.1192029/0.8807971 = 0.0676676
    assert sparsity_at(1, 0.5, 4, beta=2.0) == pytest.approx(0.0676676, abs=1e-7)


def test_scores_and_masks_by_hand():
    layer = sparsekern.nn.SparseLinear(4, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[2.0, -1.0, 0.5, -3.0]]))
    optg = OptG(torch.nn.Sequential(layer), sparsity=0.5, epochs=4, lr=0.1, momentum=0.0)
    x = torch.tensor([[1.0, 3.0, -2.0, 0.25]])    # L = θ·x, so g = ∂L/∂(θ ⊙ m) = x at every position
    direction = torch.tensor([[-2.0, 3.0, 1.0, 0.75]])   # −g ⊙ θ

    # epoch 0: dense (all scores tie at 0); score lr = lr_0·σ(−2) = 0.1·0.1192029
    assert layer.mask.all()
    layer(x).sum().backward()
    optg.step()
    layer.weight.grad = None
    torch.testing.assert_close(optg.scores[0], 0.01192029 * direction, rtol=1e-6, atol=0)
    # epoch 1: round(0.1839397·4) = round(0.7358) = 1 pruned, the lowest score (entry 0)
    optg.next_epoch()
    assert layer.mask.flatten().tolist() == [False, True, True, True]
    # the pruned entry's score moves too; score lr = lr_1·σ(−1) = 0.05·(1 + cos(π/4))·0.2689414 = 0.0229557
    layer(x).sum().backward()
    optg.step()
    assert layer.weight.grad.flatten().tolist() == [0.0, 3.0, -2.0, 0.25]    # the weights' gradient is masked
    torch.testing.assert_close(optg.scores[0], (0.01192029 + 0.0229557) * direction, rtol=1e-5, atol=0)
    assert layer.weight[0, 0] == 2.0                                          # the pruned weight keeps its value
    # epoch 2: round(0.3419699·4) = round(1.368) = 1; epoch 3: round(0.5·4) = 2 (entries 0 and 3)
    optg.next_epoch()
    assert layer.mask.flatten().tolist() == [False, True, True, True]
    optg.next_epoch()
    assert layer.mask.flatten().tolist() == [False, True, True, False]


def test_step_writes_the_scores_gradient_into_the_buffer_it_left_and_honours_zero_grad():
    # score.grad is reused across steps (no weight-sized allocation while the last one is held), is g ⊙ θ
    # every step, and the score optimizer's zero_grad behaves as on any parameter: None (set_to_none, the
    # default) is allocated anew, zeros (set_to_none=False) are written over.
    x, y = _data(3)
    model = mlp(3, hidden=16)
    optg = OptG(model, sparsity=0.5, epochs=4, lr=0.1)
    buffers = None
    for t, zero_grad in enumerate([None, None, "none", None, "zeros", None]):
        if zero_grad is not None:
            optg.score_optimizer.zero_grad(set_to_none=zero_grad == "none")
        inputs, targets = batch(x, y, 0, t, 16)
        expected = [g * layer.weight.detach() for g, layer in zip(_dense_gradient(model, inputs, targets),
                                                                   _layers(model))]
        torch.nn.functional.cross_entropy(model(inputs), targets).backward()
        held = [None if score.grad is None else score.grad.data_ptr() for score in optg.scores]
        optg.step()
        for score, want, before in zip(optg.scores, expected, held):
            torch.testing.assert_close(score.grad, want, rtol=1e-6, atol=1e-7)
            assert before is None or score.grad.data_ptr() == before
        if buffers is not None and zero_grad is None:
            assert [score.grad.data_ptr() for score in optg.scores] == buffers
        buffers = [score.grad.data_ptr() for score in optg.scores]
        model.zero_grad()


def test_step_allocates_nothing_weight_or_mask_sized():
    # Its scores' gradient goes into the buffer the previous step left, and the weights' gradient is masked
    # in place without a ~mask: the step allocated one weight-sized product and one mask-sized
    # temporary per layer, the training step's peak (1.56x a dense step's on the digits MLP).
    from sparsekern.bench.cases.training_step import step_peak_bytes

    x, y = _data(4)
    model = mlp(4, hidden=64)
    optg = OptG(model, sparsity=0.5, epochs=4, lr=0.1, dense_while_scores_tie=False)
    for t in range(3):
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        peak = step_peak_bytes(optg.step, torch.device("cpu"))
    assert peak < min(layer.mask.numel() for layer in _layers(model)), peak


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_scores_accumulate_as_in_float32(dtype):
    """Scores add up -lr·g⊙θ in float32 whatever the weights' dtype: in the weights' half precision an
    increment of 1e-4 next to a score of 1 rounds away, and the scores would never move."""
    moved = {}
    for kind in (torch.float32, dtype):
        layer = sparsekern.nn.SparseLinear(4, 1, bias=False).to(kind)
        with torch.no_grad():
            layer.weight.fill_(1.0)
        optg = OptG(torch.nn.Sequential(layer), sparsity=0.5, epochs=4, lr=0.1, momentum=0.0)
        assert optg.scores[0].dtype == torch.float32
        optg.scores[0].fill_(1.0)
        for _ in range(100):
            layer.weight.grad = torch.full_like(layer.weight, 1e-3)
            optg.step()
        moved[kind] = optg.scores[0]
    torch.testing.assert_close(moved[dtype], moved[torch.float32])
    assert bool((moved[dtype] < 1.0).all())


def test_a_half_precision_state_of_older_versions_loads_into_float32_scores():
    """Older versions kept a half-precision layer's scores in its dtype; their states still load."""
    model = torch.nn.Sequential(sparsekern.nn.SparseLinear(4, 3).to(torch.float16))
    optg = OptG(model, sparsity=0.5, epochs=4, lr=0.1)
    state = optg.state_dict()
    state["scores"] = {name: torch.full_like(score, 0.25, dtype=torch.float16)
                       for name, score in state["scores"].items()}
    optg.load_state_dict(state)
    assert optg.scores[0].dtype == torch.float32 and bool((optg.scores[0] == 0.25).all())


def test_a_state_of_an_older_torch_without_the_implementation_choices_loads():
    # OptG compares the score optimizer's update hyperparameters with its own; those choosing the implementation
    # only, which torch added over versions and SGD fills on loading (fused as False, OptG's own None), are left.
    model = torch.nn.Sequential(sparsekern.nn.SparseLinear(4, 3))
    optg = OptG(model, sparsity=0.5, epochs=4, lr=0.1)
    state = optg.state_dict()
    for group in state["score_optimizer"]["param_groups"]:
        for key in ("foreach", "fused", "differentiable", "maximize"):
            del group[key]
    optg.load_state_dict(state)
    assert optg.score_optimizer.param_groups[0]["momentum"] == 0.9


def test_the_flags_a_state_may_hold_as_none_or_false_are_the_score_optimizers_that_default_to_none():
    # OptG takes None and False alike (both off) for exactly _tickets.OPTIONAL_FLAGS, the shared set that
    # check_hyperparameters allows None for; a flag torch adds with a None default would be compared by value, its
    # False (an older torch's state) refused.
    optg = OptG(torch.nn.Sequential(sparsekern.nn.SparseLinear(4, 3)), sparsity=0.5, epochs=4)
    assert {key for key, value in optg.score_optimizer.defaults.items() if value is None} == _tickets.OPTIONAL_FLAGS
    state = optg.state_dict()
    for group in state["score_optimizer"]["param_groups"]:
        group.update(foreach=False, fused=False)   # as an older torch saved them
    optg.load_state_dict(state)
    for key, value in (("foreach", True), ("differentiable", None)):
        tampered = copy.deepcopy(state)
        tampered["score_optimizer"]["param_groups"][0][key] = value
        with pytest.raises(ValueError, match=rf"state\['score_optimizer'\]\['param_groups'\]\[0\]\['{key}'\]"):
            optg.load_state_dict(tampered)


def test_the_frozen_layer_warning_of_step_names_the_line_that_called_step():
    # step() runs under torch.no_grad()'s decorator: a fixed count named torch's _contextlib.py.
    model = mlp(0)
    optg = OptG(model, sparsity=0.5, epochs=4)
    model[0].weight.requires_grad_(False)
    torch.nn.functional.cross_entropy(model(torch.randn(3, 64)), torch.tensor([0, 1, 2])).backward()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = sys._getframe().f_lineno + 1
        optg.step()
    assert [str(w.message).startswith("OptG leaves the masks and scores of ['0'] alone") for w in caught] == [True]
    assert (caught[0].filename, caught[0].lineno) == (__file__, line)


@pytest.mark.parametrize("kind", BAD_OWN_MASKS)
@pytest.mark.parametrize("call", ["next_epoch", "load_state_dict"])
def test_a_layer_whose_mask_was_put_in_place_through_data_is_refused_before_optg_changes_anything(kind, call):
    # next_epoch copied the new masks into the layers before the damaged one, then torch refused an expanded one or
    # broadcast one of another shape; a float one took the masks silently. load_state_dict copies the saved ones.
    x, y = _data()
    model = mlp(0)
    optg = OptG(model, sparsity=0.8, epochs=4, lr=0.1)
    saved = copy.deepcopy(optg.state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(3):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x[:16]), y[:16]).backward()
        optg.step()
        optimizer.step()
    optg.next_epoch()
    error, match = damage_mask(model[2], kind)
    before = everything(model, optimizer) + [score.clone() for score in optg.scores]
    with pytest.raises(error, match="^OptG: layer '2'" + match):
        optg.next_epoch() if call == "next_epoch" else optg.load_state_dict(saved)
    assert_unchanged(before, everything(model, optimizer) + [score.clone() for score in optg.scores])
    assert optg.epoch == 1


def _masks_through_the_ramp(model, optg):
    """The masks of every epoch of `optg`, its scores drawn at random (they no longer tie)."""
    generator = torch.Generator().manual_seed(7)
    for score in optg.scores:
        score.copy_(torch.randn(score.shape, generator=generator))
    masks = [optg.masks]
    while optg.epoch < optg.epochs - 1:
        optg.next_epoch()
        masks.append(optg.masks)
    return masks


# Totals (inputs·hidden + hidden·outputs) where the target times the total falls on a half (0.3·15 = 4.5,
# 0.15·30 = 4.5, 0.3·35 = 10.5), where the float complement 1 - 0.7 = 0.30000000000000004 rounds the pruned count
# the other way (round(4.500000000000001) = 5, round(4.5) = 4).
@pytest.mark.parametrize("shape", [(1, 5, 2), (7, 3, 2), (5, 5, 1), (2, 7, 3), (64, 16, 10)])
@pytest.mark.parametrize("density, sparsity", [(0.3, 0.7), (0.7, 0.3), (0.05, 0.95), (0.15, 0.85),
                                               (1 / 3, 1 - 1 / 3), (1 / 3, 2 / 3)])
def test_density_prunes_exactly_as_the_sparsity_it_complements(shape, density, sparsity):
    inputs, hidden, outputs = shape
    runs = {}
    for target in ({"density": density}, {"sparsity": sparsity}):
        model = mlp(0, inputs=inputs, hidden=hidden, outputs=outputs)
        optg = OptG(model, epochs=4, **target)
        runs[next(iter(target))] = _masks_through_the_ramp(model, optg)
    for by_density, by_sparsity in zip(runs["density"], runs["sparsity"]):
        for a, b in zip(by_density, by_sparsity):
            assert torch.equal(a, b)
    total = inputs * hidden + hidden * outputs
    assert sum(int(mask.sum()) for mask in runs["density"][-1]) == total - round(sparsity * total)


def test_density_and_sparsity_are_the_same_target_read_either_way():
    model = mlp(0, hidden=4)
    by_density, by_sparsity = OptG(model, density=0.7, epochs=3), OptG(model, sparsity=0.3, epochs=3)
    assert by_density.sparsity == by_sparsity.sparsity == 0.3        # not 1 - 0.7 = 0.30000000000000004
    assert by_density.density == by_sparsity.density == 0.7
    positional = OptG(model, 0.9, 3)                                  # sparsity, then epochs, as before
    assert positional.sparsity == 0.9 and positional.density == 0.1   # not 1 - 0.9 = 0.09999999999999998
    assert OptG(model, density=1.0, epochs=3).sparsity == 0.0        # dense: kept as sparsity=0 keeps it
    with pytest.raises(AttributeError):
        by_density.density = 0.5


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(sparsity=0.9, density=0.1), TypeError, r"exactly one of sparsity= .* and density= .*, got both"),
    (dict(), TypeError, r"exactly one of sparsity= .* and density= .*, got neither"),
    (dict(density=0.0), ValueError, r"density must be a finite number in \(0, 1\], got 0.0"),
    (dict(density=1.5), ValueError, r"density must be a finite number in \(0, 1\], got 1.5"),
    (dict(density=math.nan), ValueError, r"density must be a finite number in \(0, 1\], got nan"),
    (dict(density="0.1"), TypeError, "density must be a number, got str"),
    (dict(density=True), TypeError, "density must be a number, got bool"),
    (dict(density=1e-5), ValueError, "density=1e-05 would prune all 1628 prunable weights"),
    (dict(density=0.5, epochs=1), ValueError, "epochs=1 would end dense, not at density=0.5"),
    (dict(density=0.5, epochs=None), TypeError, "OptG needs epochs"),
])
def test_a_bad_density_or_target_raises_naming_what_was_passed(kwargs, error, match):
    with pytest.raises(error, match=match):
        OptG(mlp(0, hidden=22), **{"epochs": 3, **kwargs})


def test_a_state_loads_whichever_spelling_built_either_optg(tmp_path):
    def built(seed, **target):
        model = mlp(seed, hidden=8)
        return model, OptG(model, epochs=3, lr=0.5, **target)

    for saving, loading in (({"density": 0.3}, {"sparsity": 0.7}), ({"sparsity": 0.7}, {"density": 0.3})):
        model, optg = built(0, **saving)
        _masks_through_the_ramp(model, optg)
        sparsekern.checkpoint.save(optg.state_dict(), tmp_path / "optg.pt")
        state = sparsekern.checkpoint.load(tmp_path / "optg.pt")
        assert state["sparsity"] == 0.7 and "density" not in state
        _, resumed = built(1, **loading)
        resumed.load_state_dict(state)
        assert resumed.epoch == optg.epoch == 2
        for a, b in zip(resumed.masks + resumed.scores, optg.masks + optg.scores):
            assert torch.equal(a, b)
        _, other = built(1, density=0.4)
        with pytest.raises(ValueError, match=r"saved with sparsity=0.7, not 0.6"):
            other.load_state_dict(state)


def test_a_state_saved_with_the_float_complement_of_its_density_loads():
    # The command line built OptG(sparsity=1 - density) before OptG took density=: 1 - 0.7 = 0.30000000000000004.
    model = mlp(0, hidden=8)
    state = {**OptG(model, sparsity=0.3, epochs=3).state_dict(), "sparsity": 1 - 0.7}
    for target in ({"density": 0.7}, {"sparsity": 0.3}):
        optg = OptG(model, epochs=3, **target)
        optg.load_state_dict(state)
        assert optg.sparsity == 0.3
    with pytest.raises(ValueError, match=r"saved with sparsity=0.30000000000000004, not 0.31"):
        OptG(model, density=0.69, epochs=3).load_state_dict(state)


@pytest.mark.parametrize("saving, loading", [({"density": 1 / 3}, {"sparsity": 2 / 3}),
                                             ({"sparsity": 2 / 3}, {"density": 1 / 3})])
def test_a_state_loads_under_a_target_a_float_rounding_away_that_prunes_the_same_counts(saving, loading):
    # density=1/3 holds the sparsity 0.6666666666666667, sparsity=2/3 0.6666666666666666: the same masks at every
    # epoch (test_density_prunes_exactly_as_the_sparsity_it_complements), so either's state loads under the other.
    def built(seed, **target):
        model = mlp(seed, hidden=8)
        return model, OptG(model, epochs=4, lr=0.5, **target)

    model, optg = built(0, **saving)
    _masks_through_the_ramp(model, optg)
    state = optg.state_dict()
    _, resumed = built(1, **loading)
    assert resumed.sparsity != state["sparsity"]
    resumed.load_state_dict(state)
    assert resumed.epoch == optg.epoch == 3
    for a, b in zip(resumed.masks + resumed.scores, optg.masks + optg.scores):
        assert torch.equal(a, b)
    other_model, other = built(1, density=0.34)
    before = everything(other_model) + [score.clone() for score in other.scores]
    with pytest.raises(ValueError, match=rf"saved with sparsity={state['sparsity']!r}, not 0.66$"):
        other.load_state_dict(state)
    assert_unchanged(before, everything(other_model) + other.scores)


def test_a_state_whose_target_is_a_float_rounding_away_but_prunes_another_count_is_refused():
    # 15 weights: density=0.7 prunes round(0.3 x 15) = 4 at the last epoch, sparsity=1 - 0.7 round(4.500000000000001)
    # = 5, a run of other masks.
    state = OptG(mlp(0, inputs=1, hidden=5, outputs=2), density=0.7, epochs=4).state_dict()
    model = mlp(1, inputs=1, hidden=5, outputs=2)
    loading = OptG(model, sparsity=1 - 0.7, epochs=4)
    before = everything(model) + [score.clone() for score in loading.scores]
    with pytest.raises(ValueError, match=r"state\['sparsity'\]=0.3 is this OptG's 0.30000000000000004 but for "
                                         r"float rounding, yet prunes 4 of the 15 weights at epoch 3, where this "
                                         r"OptG prunes 5"):
        loading.load_state_dict(state)
    assert_unchanged(before, everything(model) + loading.scores)


# (One on the meta device is refused before, with every meta mask of the model named.)
@pytest.mark.parametrize("kind", [kind for kind in BAD_OWN_MASKS if kind != "on the meta device"])
def test_the_constructor_refuses_a_layer_whose_mask_was_put_in_place_through_data_before_it_writes_the_masks(kind):
    # It writes the first epoch's masks: torch refused an expanded one, or one of another shape, after the layers
    # before it had taken theirs; a float one, or a view of the weight, took the masks silently.
    model = mlp(0)
    error, match = damage_mask(model[2], kind)
    before = everything(model)
    with pytest.raises(error, match="^OptG: layer '2'" + match):
        OptG(model, sparsity=0.8, epochs=4, lr=0.1)
    assert_unchanged(before, everything(model))


def test_a_state_whose_score_optimizer_runs_out_of_memory_loading_raises_out_of_memory(monkeypatch):
    # Review 28c: it became ValueError 'does not fit the scores' optimizer', blaming a good state.
    model = mlp(5, hidden=16)
    optg = OptG(model, sparsity=0.7, epochs=3, lr=0.1)
    state = optg.state_dict()

    def failing(self, state_dict):
        raise torch.OutOfMemoryError("CUDA out of memory")
    monkeypatch.setattr(torch.optim.SGD, "load_state_dict", failing)
    with pytest.raises(torch.OutOfMemoryError):
        optg.load_state_dict(state)


def test_step_right_after_a_load_refuses_the_gradients_the_model_held_at_the_load():
    # The loaded run's scores go on from the state: gradients computed before the load belong to no step of it, and
    # a step() without a backward after the load would add them to the loaded scores.
    model = mlp(3, hidden=16)
    optg = OptG(model, sparsity=0.6, epochs=3)
    x, y = _data(3)
    state = optg.state_dict()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    optg.load_state_dict(state)
    scores = [score.clone() for score in optg.scores]
    with pytest.raises(RuntimeError, match="has not changed since the previous step"):
        optg.step()
    assert all(torch.equal(a, b) for a, b in zip(scores, optg.scores))
