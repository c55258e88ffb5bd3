"""The Fantastic Weights repository's two SET rules, `set_fw` (its `SET` option, MagnitudeAndNegativityPruner) and
`set_fixed` (its `SET_fixed`): the sets they drop worked out by hand (ties, zeros, NaN, one-signed layers), against
a NumPy re-implementation through the whole DST update (acceptance check 5), and their own counts kept exact."""
import math

import numpy as np
import pytest
import torch

import sparsekern
from sparsekern.algorithms import criteria
from sparsekern.nn import SparseLinear

from .test_criteria import SIGN_CASES, _hand_update, layers, run_update, signed_layer

FW_RULES = ["set_fw", "set_fixed"]


def numpy_fw_removed(rule, theta, active, n):
    """Flat positions of `active` (sorted flat positions of theta) that `rule` drops at swap count n, written
    independently of the thresholds the library takes: by counting, entry by entry. With h = ⌈n/2⌉, kp =
    min(h, A₊), kn = min(h, A₋): a positive weight goes when fewer than kp positive weights are below it (the kp
    smallest, and their ties); a negative one, under set_fixed, when fewer than kn negative weights are closer to 0
    (the kn closest, and ties), and under set_fw when kn or more negative weights are at most it (all but the kn - 1
    most negative, and ties); zeros and NaN always (no sign). n = 0 drops nothing."""
    if n == 0:
        return active[:0]
    values = theta[active]
    half = math.ceil(n / 2)
    positive, negative = values[values > 0], values[values < 0]
    kp, kn = min(half, len(positive)), min(half, len(negative))
    removed = []
    for position, value in zip(active, values):
        if value > 0:
            goes = np.sum(positive < value) < kp
        elif value < 0:
            goes = np.sum(negative > value) < kn if rule == "set_fixed" else np.sum(negative <= value) >= kn
        else:   # 0 or NaN
            goes = True
        if goes:
            removed.append(position)
    return np.array(removed, dtype=active.dtype)


@pytest.mark.parametrize("rule", FW_RULES)
@pytest.mark.parametrize("drop_fraction", [0.1, 0.3, 0.55, 1.0])
def test_layer_scope_removes_the_numpy_set_and_grows_as_many(rule, drop_fraction, generator):
    # Tied small-integer weights, zeros among them; density 0.4, so that even a drop of the whole layer fits in
    # the inactive entries, whose planted gradients take all the growth: removed = old & ~new exactly.
    model, grads = layers(generator, [(9, 13), (7, 5)], density=0.4)
    before, after = run_update(model, grads, rule, drop_fraction, "layer")
    for (theta, old), new in zip(before, after):
        active = np.flatnonzero(old)
        removed = np.flatnonzero(old & ~new)
        n = round(drop_fraction * len(active))
        np.testing.assert_array_equal(removed, numpy_fw_removed(rule, theta, active, n))
        assert new.sum() == old.sum() and len(removed) > 0


@pytest.mark.filterwarnings("ignore:the global update")   # set_fw may empty a layer of negative weights
@pytest.mark.parametrize("rule", FW_RULES)
@pytest.mark.parametrize("positive_share", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_global_scope_takes_the_thresholds_of_the_whole_list(rule, positive_share, generator):
    model, grads = layers(generator, [(9, 13), (7, 5), (4, 6)], density=0.35, positive_share=positive_share)
    before, after = run_update(model, grads, rule, 0.3, "global")
    theta = np.concatenate([t for t, _ in before])
    old = np.concatenate([m for _, m in before])
    new = np.concatenate(after)
    active = np.flatnonzero(old)
    np.testing.assert_array_equal(np.flatnonzero(old & ~new),
                                  numpy_fw_removed(rule, theta, active, round(0.3 * len(active))))
    assert new.sum() == old.sum()


@pytest.mark.parametrize("rule", FW_RULES)
@pytest.mark.parametrize("case", SIGN_CASES + ["nan"])
def test_scores_drop_the_numpy_set_for_every_n(rule, case, generator):
    theta, mask = signed_layer(case, generator)
    active = np.flatnonzero(mask.numpy())
    for n in range(len(active) + 1):
        score = criteria.PRUNE[rule]([theta.view(6, 10)], [None], [mask.view(6, 10)], n=n)[0].flatten()
        assert torch.isinf(score[~mask]).all()
        dropped = np.flatnonzero((score == criteria.DROPPED).numpy())
        np.testing.assert_array_equal(dropped, numpy_fw_removed(rule, theta.numpy(), active, n), err_msg=f"n={n}")
        assert criteria.dropped_counts([score], [mask]) == [len(dropped)]


def dropped(rule, weight, n, mask=None):
    """Positions that `rule` drops from the one-dimensional `weight` (all active unless `mask`) at swap count n."""
    weight = torch.tensor(weight)
    mask = torch.ones(weight.shape, dtype=torch.bool) if mask is None else torch.tensor(mask)
    score = criteria.PRUNE[rule]([weight], [None], [mask], n=n)[0]
    assert set(score[mask].tolist()) <= {criteria.DROPPED, criteria.KEPT} and torch.isinf(score[~mask]).all()
    return set((score == criteria.DROPPED).nonzero().flatten().tolist())


NAN = float("nan")


@pytest.mark.parametrize("weight, n, fw, fixed", [
    # Positive .1 .2 .3, negative -.4 -.2 -.1 (most negative first). n = 2, h = 1: set_fw drops the smallest
    # positive (.1) and keeps the h - 1 = 0 most negative: every negative goes, 4 = #negatives + 1. set_fixed drops
    # the smallest positive and the negative closest to 0 (-.1).
    ([0.3, -0.4, 0.1, -0.2, 0.2, -0.1], 2, {1, 2, 3, 5}, {2, 5}),
    # n = 4, h = 2: set_fw drops .1 .2 and keeps -.4 alone: 4 again, whatever n; set_fixed drops .1 .2, -.1 -.2.
    ([0.3, -0.4, 0.1, -0.2, 0.2, -0.1], 4, {2, 3, 4, 5}, {2, 3, 4, 5}),
    # n = 3 counts as 4: h = ⌈3/2⌉ = 2, and set_fixed drops 2h = 4.
    ([0.3, -0.4, 0.1, -0.2, 0.2, -0.1], 3, {2, 3, 4, 5}, {2, 3, 4, 5}),
    # n = 6, h = 3 = every positive: set_fw keeps -.4 -.2 (h - 1 = 2 most negative).
    ([0.3, -0.4, 0.1, -0.2, 0.2, -0.1], 6, {0, 2, 4, 5}, {0, 1, 2, 3, 4, 5}),
    # Ties with a threshold drop with it. h = 1: the smallest positive is .1, held twice: both go. set_fw's
    # negative threshold, the most negative -.6, keeps nothing; set_fixed's, the closest to 0, -.2, held twice,
    # drops both.
    ([0.1, 0.1, 0.3, -0.2, -0.2, -0.6], 2, {0, 1, 3, 4, 5}, {0, 1, 3, 4}),
    # set_fw at h = 2: the second most negative, -.2, ties with the third: only -.6 (below it) stays.
    ([0.1, 0.5, 0.3, -0.2, -0.2, -0.6], 4, {0, 2, 3, 4}, {0, 2, 3, 4}),
    # Zeros have no sign: always dropped, beyond the rule's count.
    ([0.0, 0.5, -0.5, 0.0, 0.2, -0.1], 2, {0, 2, 3, 4, 5}, {0, 3, 4, 5}),
    # Every active weight zero: all go.
    ([0.0, 0.0, 0.0], 2, {0, 1, 2}, {0, 1, 2}),
    # No negative weight (the repository's code raises IndexError): kp = min(h, 4) smallest positives only.
    ([0.5, 0.1, 0.4, 0.2], 2, {1}, {1}),
    ([0.5, 0.1, 0.4, 0.2], 4, {1, 3}, {1, 3}),
    ([0.5, 0.1, 0.4, 0.2], 10, {0, 1, 2, 3}, {0, 1, 2, 3}),
    # No positive weight: set_fw keeps the h - 1 most negative (none at h = 1: the whole layer goes), set_fixed
    # drops the h closest to 0.
    ([-0.5, -0.1, -0.4, -0.2], 2, {0, 1, 2, 3}, {1}),
    ([-0.5, -0.1, -0.4, -0.2], 4, {1, 2, 3}, {1, 3}),
    # NaN has no sign either: dropped, and no threshold reads it.
    ([NAN, 0.3, -0.3, 0.1, -0.1], 2, {0, 2, 3, 4}, {0, 3, 4}),
    # n = 0 drops nothing, NaN and zeros included.
    ([NAN, 0.0, -0.3, 0.1], 0, set(), set()),
])
def test_each_rule_drops_the_set_worked_out_by_hand(weight, n, fw, fixed):
    assert dropped("set_fw", weight, n) == fw
    assert dropped("set_fixed", weight, n) == fixed


def test_inactive_entries_take_no_part():
    # Inactive -9 and .01 would move both thresholds (and NaN would be dropped) if they counted.
    weight = [-9.0, 0.3, -0.3, 0.1, -0.1, 0.01, NAN]
    mask = [False, True, True, True, True, False, False]
    assert dropped("set_fw", weight, 2, mask) == {2, 3, 4}
    assert dropped("set_fixed", weight, 2, mask) == {3, 4}


@pytest.mark.parametrize("rule", FW_RULES)
def test_a_list_is_ranked_as_one_flat_sequence(rule):
    weights = [torch.tensor([[0.3, -0.4], [0.1, -0.2]]), torch.tensor([0.2, -0.1])]
    masks = [torch.ones(2, 2, dtype=torch.bool), torch.ones(2, dtype=torch.bool)]
    scores = criteria.PRUNE[rule](weights, [None, None], masks, n=2)
    flat = torch.cat([s.flatten() for s in scores])
    assert set((flat == criteria.DROPPED).nonzero().flatten().tolist()) == dropped(
        rule, [0.3, -0.4, 0.1, -0.2, 0.2, -0.1], 2)
    assert criteria.dropped_counts(scores, masks) == ([1, 1] if rule == "set_fixed" else [3, 1])


@pytest.mark.parametrize("rule", FW_RULES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_every_float_dtype_drops_the_float32_set(rule, dtype):
    weight = [0.5, -0.125, 0.25, -0.375, 0.0, -2.0, 0.375, -0.375]
    mask = torch.ones(len(weight), dtype=torch.bool)
    score = criteria.PRUNE[rule]([torch.tensor(weight, dtype=dtype)], [None], [mask], n=3)[0]
    assert set((score == criteria.DROPPED).nonzero().flatten().tolist()) == dropped(rule, weight, 3)


@pytest.mark.parametrize("rule", FW_RULES)
@pytest.mark.parametrize("n, error", [(None, TypeError), (1.0, TypeError), (True, TypeError), (-1, ValueError)])
def test_a_bad_n_is_refused_naming_it(rule, n, error):
    with pytest.raises(error, match="n must be"):
        criteria.PRUNE[rule]([torch.ones(3)], [None], [torch.ones(3, dtype=torch.bool)], n=n)


@pytest.mark.parametrize("rule, expected_dropped, expected_grown", [
    # The hand layer of test_criteria: |θ| .1 -.02 .4 -.03 1.6 .05 active, n = round(0.5 · 6) = 3, h = 2.
    # set_fw: the 2 smallest positive (.05, .1); of the negatives it keeps h - 1 = 1, the most negative (-.03),
    # and drops -.02: 3 = #negatives + 1. set_fixed: .05 .1 and both negatives (the 2 closest to 0): 4 = 2h.
    # Growth grows as many, the largest planted gradients among the entries not kept (11, 10, 9, then 8).
    ("set_fw", {0, 1, 5}, {9, 10, 11}),
    ("set_fixed", {0, 1, 3, 5}, {8, 9, 10, 11}),
])
def test_dst_drops_the_hand_set_and_grows_as_many(rule, expected_dropped, expected_grown):
    dropped_positions, grown = _hand_update(rule)   # which checks that the layer keeps its 6 active weights
    assert dropped_positions == expected_dropped and grown == expected_grown


def _one_layer(weight):
    layer = SparseLinear(len(weight), 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([weight]))
    layer.set_mask(torch.tensor([weight]) != 0)
    return torch.nn.Sequential(layer)


@pytest.mark.parametrize("drop_fraction, fw, fixed", [
    # 12 positive and 8 negative distinct weights, 20 inactive entries. n = round(r · 20), h = ⌈n/2⌉: while both
    # signs hold h, set_fw drops 8 + 1 = 9 whatever n, set_fixed 2h.
    (0.05, 9, 2), (0.2, 9, 4), (0.5, 9, 10),
    # n = 18, h = 9 > 8 negatives: set_fw drops 9 positives, keeps the 8 - 1 most negative, so 10 go; set_fixed
    # drops 9 positives and all 8 negatives.
    (0.9, 10, 17),
])
def test_set_fw_drops_negatives_plus_one_whatever_the_rate(drop_fraction, fw, fixed):
    weight = [(i + 1) / 100 * (1 if i % 5 < 3 else -1) for i in range(20)] + [0.0] * 20
    counts = {}
    for rule in FW_RULES:
        model = _one_layer(weight)
        algo = sparsekern.DST(model, torch.optim.SGD(model.parameters(), lr=0.1), prune=rule, grow="gradient",
                              schedule="constant", drop_fraction=drop_fraction, update_every=1, total_steps=5)
        old = model[0].mask.clone()
        # Growth takes inactive entries only (their gradients dwarf the active ones'), so old & ~new is the drop.
        model[0].weight.grad = torch.where(old, 0.0, 1000 + torch.arange(40.0))
        assert algo.step()
        counts[rule] = int((old & ~model[0].mask).sum())
        assert int(model[0].mask.sum()) == 20
    assert counts == {"set_fw": fw, "set_fixed": fixed}


W = torch.tensor([[0.5, -0.2, 0.1], [-0.7, 0.3, -0.05]])
M = torch.tensor([[True, True, True], [True, True, False]])


@pytest.mark.parametrize("rule", ["set", *FW_RULES])
@pytest.mark.parametrize("weights, masks, error, match", [
    (W, M, TypeError, "weights must be a list of Tensors, got Tensor"),
    ([W, W], [M], ValueError, "masks has 1 entries but weights has 2"),
    ([W], [M.reshape(3, 2)], ValueError, r"masks\[0\] must have the shape of weights\[0\] \(2, 3\), got \(3, 2\)"),
    ([W], [M[:, :2]], ValueError, r"masks\[0\] must have the shape of weights\[0\]"),
    ([W], [M.float()], TypeError, r"masks\[0\] must be a bool tensor, got torch.float32"),
    ([W.long()], [M], TypeError, r"weights\[0\] must be float16, bfloat16, float32 or float64, got torch.int64"),
    ([W.to("meta")], [M.to("meta")], ValueError, r"weights\[0\] is on the meta device"),
], ids=["a tensor for the list", "lists of other lengths", "a mask of another shape", "a mask of another size",
        "a float mask", "integer weights", "meta weights"])
def test_the_criteria_ranking_the_whole_list_refuse_odd_lists_by_name(rule, weights, masks, error, match):
    """Campaign 20: called directly, set, set_fw and set_fixed joined the lists flat: a mask of another shape but as
    many entries marked other weights active, silently (a float mask was taken as its truth value, an integer
    weight ranked), and the rest failed in torch naming nothing (a tensor for the list: "Boolean value of Tensor
    with more than one value is ambiguous"; lists of other lengths: a size mismatch; meta: nonzero's)."""
    options = {} if rule == "set" else {"n": 2}
    with pytest.raises(error, match=match):
        criteria.PRUNE[rule](weights, [None] * 2, masks, **options)
