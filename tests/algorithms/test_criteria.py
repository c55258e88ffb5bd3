"""Acceptance check 5: every pruning criterion removes exactly the set a NumPy re-implementation
removes for fixed (θ, g), through the whole DST update (layer and global scope)."""
from fractions import Fraction

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
    """Mocanu's rule, written independently: zeros first, then of the rest n₊ = round(n·A₊/A) (Python's: halves
    to even) smallest positive and n − n₊ negative weights closest to zero; ties keep the lower position, as under
    every criterion, so among equal weights (zeros included) the highest position goes first."""
    values = theta[active]
    zeros = active[values == 0][::-1]
    if n <= len(zeros):
        return np.sort(zeros[:n])
    rest = n - len(zeros)
    positive, negative = active[values > 0], active[values < 0]
    positive = positive[np.lexsort((-positive, theta[positive]))]     # smallest first, ties: highest position
    negative = negative[np.lexsort((-negative, -theta[negative]))]    # closest to zero first, ties: highest
    signed = len(positive) + len(negative)
    take_positive = round(Fraction(rest * len(positive), signed))
    return np.sort(np.concatenate([zeros, positive[:take_positive], negative[:rest - take_positive]]))


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
def test_set_splits_by_sign_counts_at_extreme_shares(positive_share, generator):
    model, grads = layers(generator, [(10, 10)], density=0.45, positive_share=positive_share)
    before, after = run_update(model, grads, "set", 0.8, "layer")
    (theta, old), new = before[0], after[0]
    active = np.flatnonzero(old)
    n = round(0.8 * len(active))
    np.testing.assert_array_equal(np.flatnonzero(old & ~new), numpy_set_removed(theta, active, n))


def lowest(score, n):
    """Flat positions of the n lowest scores (NaN first), as prune_grow drops them."""
    flat = score.flatten().double()
    key = torch.where(torch.isnan(flat), float("-inf"), flat)
    return np.sort(torch.sort(key, stable=True).indices[:n].numpy())


SIGN_CASES = ["mixed", "no positives", "no negatives", "one positive", "one negative", "many zeros", "only zeros",
              "ties"]


def signed_layer(case, generator, numel=60):
    """(weights, mask) of `numel` entries, about 70% active, whose signs (and zeros, ties or NaN) are `case`'s."""
    theta = torch.randn(numel, generator=generator)
    mask = torch.rand(numel, generator=generator) < 0.7
    if case == "no positives":
        theta = -theta.abs()
    elif case == "no negatives":
        theta = theta.abs()
    elif case in ("one positive", "one negative"):
        theta = -theta.abs() if case == "one positive" else theta.abs()
        theta[mask.nonzero()[3]] *= -1
    elif case == "many zeros":
        theta[torch.rand(numel, generator=generator) < 0.3] = 0.0
    elif case == "only zeros":
        theta.zero_()
    elif case == "ties":
        theta = torch.randint(-2, 3, (numel,), generator=generator).float() / 2
    elif case == "nan":
        theta[torch.rand(numel, generator=generator) < 0.1] = float("nan")
    return theta, mask


@pytest.mark.parametrize("case", SIGN_CASES)
def test_set_rule_drops_the_numpy_set_for_every_n(case, generator):
    theta, mask = signed_layer(case, generator)
    score = criteria.set_rule([theta.view(6, 10)], [None], [mask.view(6, 10)])[0]
    assert torch.isinf(score.flatten()[~mask]).all()
    active = np.flatnonzero(mask.numpy())
    for n in range(len(active) + 1):
        np.testing.assert_array_equal(lowest(score, n), numpy_set_removed(theta.numpy(), active, n), err_msg=f"n={n}")


def test_set_rule_splits_in_proportion_not_half_and_half():
    # 8 positive and 2 negative weights: of 5 dropped, round(5·8/10) = 4 are positive, 1 negative
    # (half and half would drop 3 and 2).
    weight = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, -0.05, -0.9])
    score = criteria.set_rule([weight], [None], [torch.ones(10, dtype=torch.bool)])[0]
    dropped = set(torch.argsort(score)[:5].tolist())
    assert dropped == {0, 1, 2, 3, 8}


def test_set_rule_rounds_a_half_share_to_even_as_the_swap_count():
    # A₊ = A₋ = 2: n₊ = round(n·2/4), Python's round as the swap count n = round(r·A) (the specification writes
    # round for both). n = 1: ½ rounds to 0, the negative closest to 0 (-0.1) goes (half up took the smallest
    # positive, 0.1, and at every odd n the odd weight was positive). n = 2: 1 of each. n = 3: 1.5 rounds to 2:
    # 0.1, 0.2 and -0.1.
    weight = torch.tensor([0.2, -0.2, 0.1, -0.1])
    score = criteria.set_rule([weight], [None], [torch.ones(4, dtype=torch.bool)])[0]
    order = torch.argsort(score).tolist()
    assert set(order[:1]) == {3}
    assert set(order[:2]) == {2, 3}
    assert set(order[:3]) == {0, 2, 3}


@pytest.mark.parametrize("fraction, positive, negative", [(0.625, 2, 3), (0.375, 2, 1), (0.875, 4, 3)])
def test_a_dst_update_under_set_drops_each_signs_share_rounded_half_to_even(fraction, positive, negative):
    # 4 positive and 4 negative active weights: n = round(r·8) = 5, 3, 7 swaps, of which n₊ = round(n/2) = round(2.5),
    # round(1.5), round(3.5) = 2, 2, 4 positive (half up: 3, 2, 4) and the rest negative. Growth by gradient takes
    # inactive entries only (planted gradients), so the dropped ones are exactly old & ~new.
    layer = SparseLinear(4, 4, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.1, 0.2, 0.3, 0.4], [-0.1, -0.2, -0.3, -0.4], [0.0] * 4, [0.0] * 4]))
    old = torch.tensor([[True] * 4, [True] * 4, [False] * 4, [False] * 4])
    layer.set_mask(old)
    model = torch.nn.Sequential(layer)
    algo = sparsekern.DST(model, torch.optim.SGD(model.parameters(), lr=0.1), prune="set", grow="gradient",
                          schedule="constant", drop_fraction=fraction, update_every=1, total_steps=10)
    layer.weight.grad = torch.cat([torch.zeros(2, 4), torch.arange(1.0, 9.0).view(2, 4)])
    assert algo.step()
    dropped = old & ~layer.mask
    assert [int(dropped[0].sum()), int(dropped[1].sum())] == [positive, negative]


@pytest.mark.parametrize("prune, dropped", [("magnitude", {2, 3}), ("set", {3, 5})])
def test_ties_keep_the_lower_position_under_set_as_under_magnitude(prune, dropped):
    # DST's tie rule: ties keep (and grow) the lower flat position. Four equal positive weights, two equal
    # negative ones: magnitude drops the two highest 0.1s; SET (n = 2: n₊ = round(2·4/6) = 1, n₋ = 1) the highest
    # 0.1 and the highest -0.5. SET ranked ties the other way before, dropping positions 0 and 4.
    layer = SparseLinear(8, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.1, 0.1, 0.1, 0.1, -0.5, -0.5, 0.0, 0.0]]))
    old = torch.tensor([[True] * 6 + [False] * 2])
    layer.set_mask(old)
    model = torch.nn.Sequential(layer)
    algo = sparsekern.DST(model, torch.optim.SGD(model.parameters(), lr=0.1), prune=prune, grow="gradient",
                          schedule="constant", drop_fraction=1 / 3, update_every=1, total_steps=10)
    layer.weight.grad = torch.tensor([[0.0] * 6 + [5.0, 6.0]])   # growth takes the two inactive entries
    assert algo.step()
    assert set((old & ~layer.mask)[0].nonzero().flatten().tolist()) == dropped


def test_set_rule_drops_the_highest_zeros_first():
    # Zeros (grown weights that have not moved) go first, the highest position first: of three, n = 2 keeps the
    # lowest, as magnitude keeps the lower of tied weights.
    weight = torch.tensor([0.0, 0.3, 0.0, -0.2, 0.0])
    score = criteria.set_rule([weight], [None], [torch.ones(5, dtype=torch.bool)])[0]
    assert set(torch.argsort(score)[:2].tolist()) == {2, 4}


def test_set_rule_ranks_zeros_first_then_interleaves_by_share():
    weight = torch.tensor([0.5, -0.1, 0.2, -0.3, 0.0, 9.0, -2.0])
    mask = torch.tensor([True, True, True, True, True, False, True])
    score = criteria.set_rule([weight], [None], [mask])[0]
    # zero first (0); then A₊ = 2 and A₋ = 3: n₊(k) = round(2k/5) = 0, 1, 1, 2, 2 for k = 1..5 (no half),
    # so ranks 1..5 go -, +, -, +, -: -0.1 (1), 0.2 (2), -0.3 (3), 0.5 (4), -2.0 (5); inactive +inf.
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


# -- the criteria's formulas, against drop sets worked out by hand --
# One 3×4 layer: flat entries 0..5 active, 6..11 inactive. n = round(0.5 · 6) = 3 dropped; the inactive
# entries' gradients (1006..1011) dwarf the active ones', so gradient growth takes 9, 10 and 11.
HAND_WEIGHT = [0.1, -0.02, 0.4, -0.03, 1.6, 0.05]
HAND_GRAD = [4.0, 10.0, -0.6, 0.35, 0.05, 0.0]


def _hand_update(prune, grow="gradient", **options):
    """(dropped, grown) flat positions of one update of the layer above."""
    layer = SparseLinear(4, 3, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(HAND_WEIGHT + [0.0] * 6).view(3, 4))
    old = torch.arange(12).view(3, 4) < 6
    layer.set_mask(old)
    model = torch.nn.Sequential(layer)
    algo = sparsekern.DST(model, torch.optim.SGD(model.parameters(), lr=0.1), prune=prune, grow=grow,
                          schedule="constant", drop_fraction=0.5, update_every=1, total_steps=10, **options)
    layer.weight.grad = torch.tensor(HAND_GRAD + [1006.0, 1007, 1008, 1009, 1010, 1011]).view(3, 4)
    assert algo.step()
    new = layer.mask.flatten()
    dropped = set((old.flatten() & ~new).nonzero().flatten().tolist())
    grown = set((new & ~old.flatten()).nonzero().flatten().tolist())
    assert int(new.sum()) == 6 and torch.all(layer.weight.detach().flatten()[~new] == 0)
    return dropped, grown


@pytest.mark.parametrize("prune, options, expected", [
    # |θ| = .1 .02 .4 .03 1.6 .05
    ("magnitude", {}, {1, 3, 5}),
    # |θ| + γ|g|, γ = 1: 4.1 10.02 1.0 .38 1.65 .05; γ = 0.01: .14 .12 .406 .0335 1.6005 .05
    ("mest", {}, {2, 3, 5}),
    ("mest", {"mest_gamma": 0.01}, {1, 3, 5}),
    # |θ·g| = .4 .2 .24 .0105 .08 0
    ("snip", {}, {3, 4, 5}),
    # |g| / |θ| = 40 500 1.5 11.7 .031 0
    ("sensitivity", {}, {2, 4, 5}),
    # |θ| / |g| = .025 .002 .67 .086 32 5e6 (0.05 / 1e-8)
    ("rsensitivity", {}, {0, 1, 3}),
    # the Fantastic Weights code's denominators, offset 1: |g| / (|θ| + 1) = 3.6 9.8 .43 .34 .019 0
    ("sensitivity", {"sensitivity_offset": 1.0}, {3, 4, 5}),
    # |θ| / (|g| + 1) = .02 .0018 .25 .022 1.5 .05
    ("rsensitivity", {"sensitivity_offset": 1.0}, {0, 1, 3}),
    # A₊ = 4 (.1 .4 1.6 .05), A₋ = 2: n₊ = round(3·4/6) = 2 smallest positive (.05, .1), n₋ = 1 negative
    # closest to zero (-.02)
    ("set", {}, {0, 1, 5}),
])
def test_each_criterion_drops_the_set_worked_out_by_hand(prune, options, expected):
    dropped, grown = _hand_update(prune, **options)
    assert dropped == expected
    assert grown == {9, 10, 11}      # top-3 |g| among the entries not kept


def test_random_growth_grows_exactly_n_among_the_entries_not_kept():
    # Magnitude keeps {0, 2, 4}; random growth then picks exactly 3 of the 9 others, just-dropped ones included.
    picked = set()
    for seed in range(20):
        dropped, grown = _hand_update("magnitude", grow="random", seed=seed)
        new = (set(range(6)) - dropped) | grown
        assert {0, 2, 4} <= new and len(new - {0, 2, 4}) == 3
        picked |= new - {0, 2, 4}
    assert picked & {1, 3, 5} and picked & set(range(6, 12))
