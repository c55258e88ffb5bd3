"""Acceptance check 5: every pruning criterion removes exactly the set a NumPy re-implementation
removes for fixed (θ, g), through the whole DST update (layer and global scope)."""
import math

import numpy as np
import pytest
import torch

import sparsekern
from sparsekern.algorithms import criteria
from sparsekern.nn import SparseLinear

SCORED = ["magnitude", "mest", "snip", "sensitivity", "rsensitivity"]
GAMMA = 0.5


def numpy_scores(name, theta, g):
    epsilon = np.float32(1e-8)
    return {"magnitude": np.abs(theta), "mest": np.abs(theta) + np.float32(GAMMA) * np.abs(g),
            "snip": np.abs(theta * g), "sensitivity": np.abs(g) / (np.abs(theta) + epsilon),
            "rsensitivity": np.abs(theta) / (np.abs(g) + epsilon)}[name]


def numpy_removed(name, theta, g, active, n):
    """Flat positions removed among `active` (sorted flat positions) of flat arrays theta, g."""
    if name == "set":
        return numpy_set_removed(theta, active, n)
    score = numpy_scores(name, theta, g)[active]
    keep_order = np.lexsort((active, -score))  # best score first, ties to the lower position
    return np.sort(active[keep_order[len(active) - n:]])


def numpy_set_removed(theta, active, n):
    values = theta[active]
    positive, negative = active[values >= 0], active[values < 0]
    positive = positive[np.argsort(theta[positive], kind="stable")]     # smallest first
    negative = negative[np.argsort(-theta[negative], kind="stable")]    # closest to zero first
    take_positive, take_negative = math.ceil(n / 2), n // 2
    if take_positive > len(positive):
        take_positive, take_negative = len(positive), n - len(positive)
    if take_negative > len(negative):
        take_positive, take_negative = n - len(negative), len(negative)
    return np.sort(np.concatenate([positive[:take_positive], negative[:take_negative]]))


def layers(generator, shapes, density, positive_share=0.5):
    """Sparse layers with tied small-integer weights (zeros too) and planted gradients: moderate
    tied values at active positions, huge distinct ones at inactive positions, so growth takes
    only inactive entries and the removed set is exactly old & ~new."""
    modules, grads = [], []
    for out_features, in_features in shapes:
        module = SparseLinear(in_features, out_features, bias=False)
        numel = out_features * in_features
        mask = (torch.randperm(numel, generator=generator) < round(density * numel)).view(out_features, in_features)
        with torch.no_grad():
            magnitude = torch.randint(0, 5, (numel,), generator=generator).float()
            sign = torch.where(torch.rand(numel, generator=generator) < positive_share, 1.0, -1.0)
            module.weight.copy_((magnitude * sign / 4).view(out_features, in_features))
        module.set_mask(mask)
        grad = torch.randint(-3, 4, (numel,), generator=generator).float().view(out_features, in_features) / 2
        grad[~mask] = 1000 + torch.randperm(int((~mask).sum()), generator=generator).float()
        modules.append(module)
        grads.append(grad)
    return torch.nn.Sequential(*modules), grads


def run_update(model, grads, prune, drop_fraction, scope):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    algo = sparsekern.DST(model, optimizer, prune=prune, grow="gradient", schedule="constant",
                          drop_fraction=drop_fraction, update_every=1, total_steps=10, scope=scope,
                          mest_gamma=GAMMA)
    before = [(m.weight.detach().numpy().ravel().copy(), m.mask.numpy().ravel().copy()) for m in model]
    for module, grad in zip(model, grads):
        module.weight.grad = grad.clone()
    assert algo.step()
    return before, [m.mask.numpy().ravel().copy() for m in model]


@pytest.mark.parametrize("prune", SCORED + ["set"])
@pytest.mark.parametrize("drop_fraction", [0.1, 0.3, 0.55, 1.0])
def test_layer_scope_removes_the_numpy_set(prune, drop_fraction, generator):
    model, grads = layers(generator, [(9, 13), (7, 5)], density=0.4)
    before, after = run_update(model, grads, prune, drop_fraction, "layer")
    for (theta, old), new, grad in zip(before, after, grads):
        active = np.flatnonzero(old)
        n = min(round(drop_fraction * len(active)), len(active), old.size - len(active))
        removed = np.flatnonzero(old & ~new)
        assert len(removed) == n
        np.testing.assert_array_equal(removed, numpy_removed(prune, theta, grad.numpy().ravel(), active, n))


@pytest.mark.parametrize("prune", SCORED + ["set"])
def test_global_scope_removes_the_numpy_set(prune, generator):
    model, grads = layers(generator, [(9, 13), (7, 5), (4, 6)], density=0.35)
    before, after = run_update(model, grads, prune, 0.3, "global")
    theta = np.concatenate([t for t, _ in before])
    old = np.concatenate([m for _, m in before])
    new = np.concatenate(after)
    active = np.flatnonzero(old)
    n = round(0.3 * len(active))
    np.testing.assert_array_equal(np.flatnonzero(old & ~new),
                                  numpy_removed(prune, theta, torch.cat([g.ravel() for g in grads]).numpy(), active, n))


@pytest.mark.parametrize("positive_share", [0.0, 0.1, 0.9, 1.0])
def test_set_takes_the_rest_from_the_other_half_when_one_runs_out(positive_share, generator):
    model, grads = layers(generator, [(10, 10)], density=0.45, positive_share=positive_share)
    before, after = run_update(model, grads, "set", 0.8, "layer")
    (theta, old), new = before[0], after[0]
    active = np.flatnonzero(old)
    n = round(0.8 * len(active))
    np.testing.assert_array_equal(np.flatnonzero(old & ~new), numpy_set_removed(theta, active, n))


def test_set_rule_interleaves_the_halves():
    weight = torch.tensor([0.5, -0.1, 0.2, -0.3, 0.0, 9.0, -2.0])
    mask = torch.tensor([True, True, True, True, True, False, True])
    score = criteria.set_rule([weight], [None], [mask])[0]
    # non-negative, smallest first: 0.0 (2·0), 0.2 (2·1), 0.5 (2·2); negative, closest first:
    # -0.1 (1), -0.3 (3), -2.0 (5); inactive: +inf.
    torch.testing.assert_close(score, torch.tensor([4.0, 1.0, 2.0, 3.0, 0.0, float("inf"), 5.0]))


def test_random_pruning_is_exact_and_seeded(generator):
    def removed(seed):
        model, grads = layers(torch.Generator().manual_seed(7), [(12, 12)], density=0.3)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        algo = sparsekern.DST(model, optimizer, prune="random", grow="gradient", schedule="constant",
                              update_every=1, total_steps=5, seed=seed)
        old = model[0].mask.clone()
        model[0].weight.grad = grads[0]
        algo.step()
        return old & ~model[0].mask

    first, again, other = removed(1), removed(1), removed(2)
    assert int(first.sum()) == round(0.3 * round(0.3 * 144))
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_elementwise_criteria_guard_divisions():
    weight, grad = torch.tensor([0.0, 2.0, -1.0]), torch.tensor([3.0, 0.0, -2.0])
    sensitivity = criteria.sensitivity([weight], [grad], [None])[0]
    rsensitivity = criteria.rsensitivity([weight], [grad], [None])[0]
    assert torch.isfinite(sensitivity).all() and torch.isfinite(rsensitivity).all()
    torch.testing.assert_close(sensitivity, torch.tensor([3.0 / 1e-8, 0.0, 2.0]))
    torch.testing.assert_close(rsensitivity, torch.tensor([0.0, 2.0 / 1e-8, 0.5]))


@pytest.mark.parametrize("table, argument", [(criteria.PRUNE, "prune"), (criteria.GROW, "grow")])
def test_lookup_names_the_argument(table, argument):
    with pytest.raises(ValueError, match=argument):
        criteria.lookup("nope", table, argument)
    with pytest.raises(TypeError, match=argument):
        criteria.lookup(None, table, argument)
