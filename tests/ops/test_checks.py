"""Bad input raises TypeError or ValueError naming the argument, and changes no input."""
import re

import pytest
import torch

import sparsekern
from sparsekern.ops import _extension


def snapshot(value):
    """Clones of every CPU tensor in value (nested lists included), to compare after the call."""
    if isinstance(value, torch.Tensor):
        return value.clone() if value.device.type == "cpu" else value
    if isinstance(value, (list, tuple)):
        return [snapshot(v) for v in value]
    return value


def assert_unchanged(before, after):
    if isinstance(after, torch.Tensor):
        if after.device.type == "cpu":
            torch.testing.assert_close(after, before, rtol=0, atol=0, equal_nan=True)
    elif isinstance(after, (list, tuple)):
        for b, a in zip(before, after):
            assert_unchanged(b, a)


def assert_rejected(function, args, error, argument):
    """function(*args) raises `error` whose message starts by naming `argument`; args are unchanged."""
    before = snapshot(list(args))
    with pytest.raises(error) as raised:
        function(*args)
    # The name must not run on: "k" is not named by a message about "k[1]".
    assert re.match(rf"{re.escape(argument)}(?![\w\[])", str(raised.value)), f"{raised.value!r} does not name {argument}"
    assert_unchanged(before, list(args))


def scores():
    return [torch.randn(3, 4), torch.randn(5)]


TOPK_CASES = {
    "scores is a tensor": ((torch.randn(4), 1), TypeError, "scores"),
    "scores entry not a tensor": (([torch.randn(3), [1.0]], 1), TypeError, "scores[1]"),
    "integer scores": (([torch.arange(4)], 1), TypeError, "scores[0]"),
    "mixed dtypes": (([torch.randn(3), torch.randn(3).double()], 1), TypeError, "scores[1]"),
    "negative k": ((scores(), -1), ValueError, "k"),
    "k above numel": ((scores(), 18), ValueError, "k"),
    "float k": ((scores(), 1.5), TypeError, "k"),
    "bool k": ((scores(), True), TypeError, "k"),
    "k list too short": ((scores(), [1]), ValueError, "k"),
    "k list entry out of range": ((scores(), [1, 6]), ValueError, "k[1]"),
    "k list entry negative": ((scores(), [-1, 0]), ValueError, "k[0]"),
    "k list entry not int": ((scores(), [1, "2"]), TypeError, "k[1]"),
    "scores on two devices": (([torch.randn(3), torch.randn(3, device="meta")], 1), ValueError, "scores[1]"),
}


@pytest.mark.parametrize("name", list(TOPK_CASES))
def test_topk_mask_rejects(name):
    args, error, argument = TOPK_CASES[name]
    assert_rejected(sparsekern.ops.topk_mask, args, error, argument)


def prune_grow_args(**changes):
    weight = torch.randn(4, 5)
    mask = torch.zeros(4, 5, dtype=torch.bool)
    mask[:, :2] = True  # 8 active, 12 inactive
    args = dict(weight=weight, mask=mask, prune_score=weight.abs(), grow_score=torch.randn(4, 5), n=3,
                state=[torch.randn(4, 5)])
    args.update(changes)
    return tuple(args.values())


PRUNE_GROW_CASES = {
    "integer weight": (prune_grow_args(weight=torch.ones(4, 5, dtype=torch.int32)), TypeError, "weight"),
    "weight not a tensor": (prune_grow_args(weight=[[1.0]]), TypeError, "weight"),
    "mask shape": (prune_grow_args(mask=torch.ones(5, 4, dtype=torch.bool)), ValueError, "mask"),
    "mask not bool": (prune_grow_args(mask=torch.ones(4, 5)), TypeError, "mask"),
    "prune_score shape": (prune_grow_args(prune_score=torch.randn(20)), ValueError, "prune_score"),
    "grow_score integer": (prune_grow_args(grow_score=torch.ones(4, 5, dtype=torch.long)), TypeError, "grow_score"),
    "score dtypes differ": (prune_grow_args(grow_score=torch.randn(4, 5).half()), TypeError, "grow_score"),
    "n above active": (prune_grow_args(n=9), ValueError, "n"),
    "n above inactive": (prune_grow_args(mask=torch.ones(4, 5, dtype=torch.bool).tril(2), n=9), ValueError, "n"),
    "negative n": (prune_grow_args(n=-1), ValueError, "n"),
    "float n": (prune_grow_args(n=2.0), TypeError, "n"),
    "state a tensor": (prune_grow_args(state=torch.randn(4, 5)), TypeError, "state"),
    "state shape": (prune_grow_args(state=[torch.randn(4, 5), torch.randn(3)]), ValueError, "state[1]"),
    "state integer": (prune_grow_args(state=[torch.ones(4, 5, dtype=torch.int8)]), TypeError, "state[0]"),
    "mask on another device": (prune_grow_args(mask=torch.ones(4, 5, dtype=torch.bool, device="meta")), ValueError,
                               "mask"),
}


@pytest.mark.parametrize("name", list(PRUNE_GROW_CASES))
def test_prune_grow_rejects(name):
    args, error, argument = PRUNE_GROW_CASES[name]
    assert_rejected(sparsekern.ops.prune_grow, args, error, argument)


def linear_args(**changes):
    args = dict(x=torch.randn(2, 3, 6), weight=torch.randn(4, 6), mask=torch.rand(4, 6) < 0.5, bias=torch.randn(4))
    args.update(changes)
    return tuple(args.values())


MASKED_LINEAR_CASES = {
    "integer x": (linear_args(x=torch.ones(2, 6, dtype=torch.long)), TypeError, "x"),
    "weight 1-D": (linear_args(weight=torch.randn(6), mask=torch.ones(6, dtype=torch.bool)), ValueError, "weight"),
    "weight dtype": (linear_args(weight=torch.randn(4, 6).double()), TypeError, "weight"),
    "x features": (linear_args(x=torch.randn(2, 5)), ValueError, "x"),
    "mask shape": (linear_args(mask=torch.ones(6, 4, dtype=torch.bool)), ValueError, "mask"),
    "mask not bool": (linear_args(mask=torch.ones(4, 6)), TypeError, "mask"),
    "bias shape": (linear_args(bias=torch.randn(6)), ValueError, "bias"),
    "bias dtype": (linear_args(bias=torch.randn(4).half()), TypeError, "bias"),
    "weight on another device": (linear_args(weight=torch.randn(4, 6, device="meta")), ValueError, "weight"),
}


@pytest.mark.parametrize("name", list(MASKED_LINEAR_CASES))
def test_masked_linear_rejects(name):
    args, error, argument = MASKED_LINEAR_CASES[name]
    assert_rejected(sparsekern.ops.masked_linear, args, error, argument)


def test_a_wrong_name_would_be_caught():
    with pytest.raises(AssertionError, match="does not name"):
        assert_rejected(sparsekern.ops.topk_mask, (scores(), -1), ValueError, "scores")


compiled = pytest.mark.skipif(_extension.kernel_missing("prune_grow", "cpu") is not None,
                              reason=f"no compiled CPU kernels: {_extension.kernel_missing('prune_grow', 'cpu')}")

COMPILED_CASES = {
    "topk negative k": (lambda: torch.ops.sparsekern.topk_mask, (scores(), -1), ValueError, "k"),
    "topk k above numel": (lambda: torch.ops.sparsekern.topk_mask, (scores(), 18), ValueError, "k"),
    "topk integer scores": (lambda: torch.ops.sparsekern.topk_mask, ([torch.arange(3)], 1), TypeError, "scores[0]"),
    "topk mixed dtypes": (lambda: torch.ops.sparsekern.topk_mask, ([torch.randn(2), torch.randn(2).half()], 1),
                          TypeError, "scores[1]"),
    "per tensor k length": (lambda: torch.ops.sparsekern.topk_mask_per_tensor, (scores(), [1]), ValueError, "k"),
    "per tensor k range": (lambda: torch.ops.sparsekern.topk_mask_per_tensor, (scores(), [1, 6]), ValueError, "k[1]"),
    "prune_grow n": (lambda: torch.ops.sparsekern.prune_grow, prune_grow_args(n=9), ValueError, "n"),
    "prune_grow mask": (lambda: torch.ops.sparsekern.prune_grow, prune_grow_args(mask=torch.ones(4, 5)), TypeError,
                        "mask"),
    "prune_grow shape": (lambda: torch.ops.sparsekern.prune_grow, prune_grow_args(grow_score=torch.randn(5, 4)),
                         ValueError, "grow_score"),
    "prune_grow dtypes": (lambda: torch.ops.sparsekern.prune_grow,
                          prune_grow_args(grow_score=torch.randn(4, 5).double()), TypeError, "grow_score"),
    "prune_grow state": (lambda: torch.ops.sparsekern.prune_grow,
                         prune_grow_args(state=[torch.randn(4, 5), torch.ones(4, 5, dtype=torch.int32)]), TypeError,
                         "state[1]"),
}


@compiled
@pytest.mark.parametrize("name", list(COMPILED_CASES))
def test_compiled_ops_check_their_own_arguments(name):
    # Direct callers of torch.ops.sparsekern.* skip sparsekern.ops' checks; the kernels repeat them.
    op, args, error, argument = COMPILED_CASES[name]
    assert_rejected(op(), args, error, argument)
