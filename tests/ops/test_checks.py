"""Bad input raises TypeError or ValueError naming the argument, and changes no input."""
import itertools
import re
import warnings

import pytest
import torch

import sparsekern
from sparsekern.ops import _checks, _extension


def snapshot(value):
    """Clones of every CPU tensor in value (nested lists included), to compare after the call."""
    if isinstance(value, torch.Tensor):
        return value.clone() if value.device.type == "cpu" else value
    if isinstance(value, (list, tuple)):
        return [snapshot(v) for v in value]
    return value


def assert_unchanged(before, after):
    if isinstance(after, torch.Tensor):
        if after.is_nested:   # assert_close reads shapes, which a nested tensor of the older layout lacks
            assert_unchanged(before.unbind(), after.unbind())
        elif after.device.type == "cpu":
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
    "str k": ((scores(), "3"), TypeError, "k"),   # a str is a Sequence, never a list of counts
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


def sharing_weight(changes_of):
    """prune_grow_args whose weight is shared with the tensors changes_of(weight) names."""
    weight = torch.randn(4, 5)
    return prune_grow_args(weight=weight, **changes_of(weight))


PRUNE_GROW_CASES = {
    "integer weight": (prune_grow_args(weight=torch.ones(4, 5, dtype=torch.int32)), TypeError, "weight"),
    "weight not a tensor": (prune_grow_args(weight=[[1.0]]), TypeError, "weight"),
    "mask shape": (prune_grow_args(mask=torch.ones(5, 4, dtype=torch.bool)), ValueError, "mask"),
    "mask not bool": (prune_grow_args(mask=torch.ones(4, 5)), TypeError, "mask"),
    "prune_score shape": (prune_grow_args(prune_score=torch.randn(20)), ValueError, "prune_score"),
    "grow_score integer": (prune_grow_args(grow_score=torch.ones(4, 5, dtype=torch.long)), TypeError, "grow_score"),
    "score dtypes differ": (prune_grow_args(grow_score=torch.randn(4, 5).half()), TypeError, "grow_score"),
    "n above active": (prune_grow_args(n=9), ValueError, "n"),
    "n a list": (prune_grow_args(n=[3]), TypeError, "n"),
    "negative n": (prune_grow_args(n=-1), ValueError, "n"),
    "float n": (prune_grow_args(n=2.0), TypeError, "n"),
    "str n": (prune_grow_args(n="2"), TypeError, "n"),
    "state a tensor": (prune_grow_args(state=torch.randn(4, 5)), TypeError, "state"),
    "state shape": (prune_grow_args(state=[torch.randn(4, 5), torch.randn(3)]), ValueError, "state[1]"),
    "state integer": (prune_grow_args(state=[torch.ones(4, 5, dtype=torch.int8)]), TypeError, "state[0]"),
    "state expanded": (prune_grow_args(state=[torch.randn(1, 5).expand(4, 5)]), ValueError, "state[0]"),
    "state stride 0": (prune_grow_args(state=[torch.randn(()).expand(4, 5)]), ValueError, "state[0]"),
    "state is the weight": (sharing_weight(lambda w: dict(state=[w])), ValueError, "weight"),
    "state views the weight": (sharing_weight(lambda w: dict(state=[w[:, :]])), ValueError, "weight"),
    "mask views the weight's bytes": (sharing_weight(lambda w: dict(mask=w.view(torch.uint8)[:, ::4].view(torch.bool))),
                                      ValueError, "weight"),
    "mask on another device": (prune_grow_args(mask=torch.ones(4, 5, dtype=torch.bool, device="meta")), ValueError,
                               "mask"),
}


@pytest.mark.parametrize("name", list(PRUNE_GROW_CASES))
def test_prune_grow_rejects(name):
    args, error, argument = PRUNE_GROW_CASES[name]
    assert_rejected(sparsekern.ops.prune_grow, args, error, argument)


def test_prune_grow_swaps_more_than_the_inactive_entries():
    # n is bounded by the active count only (just-dropped entries may grow back).
    weight, mask, prune_score, grow_score, _, state = prune_grow_args(mask=torch.ones(4, 5, dtype=torch.bool).tril(2))
    active = int(mask.sum())
    new = sparsekern.ops.prune_grow(weight, mask, prune_score, grow_score, active, state)
    assert int(new.sum()) == active


def layer_lists():
    """(weights, masks, prune_scores, grow_scores, n, state, masked) of three layers."""
    shapes = [(4, 5), (3, 3, 2), (6,)]
    weights = [torch.randn(shape) for shape in shapes]
    masks = [torch.rand(shape) < 0.5 for shape in shapes]
    for m in masks:
        m.view(-1)[0] = True
    n = [int(m.sum()) // 2 for m in masks]
    return dict(weights=weights, masks=masks, prune_scores=[w.abs() for w in weights],
                grow_scores=[torch.randn(shape) for shape in shapes], n=n,
                state=[[torch.randn(shape)] for shape in shapes], masked=[[torch.randn(shape)] for shape in shapes])


def list_case(**changes):
    """Arguments of the list form with some entries replaced: changes map a name to a function of
    the default value returning the new one."""
    args = layer_lists()
    for name, change in changes.items():
        args[name] = change(args[name])
    return args


def replaced(i, value):
    return lambda values: [value if j == i else v for j, v in enumerate(values)]


def total_active(masks):
    return sum(int(m.sum()) for m in masks)


def masked_sharing_a_weight():
    args = layer_lists()
    args["masked"] = [[], [], [args["weights"][0].view(-1)[:6]]]
    return args


def n_above_the_active_count_given():
    args = layer_lists()
    args["active"] = [int(m.sum()) for m in args["masks"]]
    args["n"] = args["n"][:2] + [args["active"][2] + 1]
    return args


def made_in_inference_mode(t):
    with torch.inference_mode():
        return t.clone()


LIST_CASES = {
    "weights not a list": (list_case(weights=lambda w: w[0]), TypeError, "weights"),
    "masks too short": (list_case(masks=lambda m: m[:2]), ValueError, "masks"),
    "weight integer": (list_case(weights=replaced(2, torch.ones(6, dtype=torch.int32))), TypeError, "weights[2]"),
    "mask shape": (list_case(masks=replaced(1, torch.ones(3, 2, 3, dtype=torch.bool))), ValueError, "masks[1]"),
    "mask not bool": (list_case(masks=replaced(2, torch.ones(6))), TypeError, "masks[2]"),
    "mixed score dtypes": (list_case(grow_scores=replaced(2, torch.randn(6).double())), TypeError, "grow_scores[2]"),
    "mixed prune dtypes": (list_case(prune_scores=replaced(1, torch.randn(3, 3, 2).half())), TypeError,
                           "prune_scores[1]"),
    "n too short": (list_case(n=lambda n: n[:2]), ValueError, "n"),
    "n above the layer": (list_case(n=replaced(1, 19)), ValueError, "n[1]"),
    "n above active": (list_case(n=lambda n: n[:2] + [7]), ValueError, "n[2]"),
    "negative n": (list_case(n=replaced(2, -1)), ValueError, "n[2]"),
    "state wrong length": (list_case(state=lambda s: s[:2]), ValueError, "state"),
    "state shape": (list_case(state=replaced(2, [torch.randn(5)])), ValueError, "state[2][0]"),
    "state expanded": (list_case(state=replaced(1, [torch.randn(1, 1, 2).expand(3, 3, 2)])), ValueError,
                       "state[1][0]"),
    "masked integer": (list_case(masked=replaced(2, [torch.ones(6, dtype=torch.int64)])), TypeError, "masked[2][0]"),
    "one weight in two layers": (list_case(weights=lambda w: [w[0], w[1], w[0].view(-1)[:6]]), ValueError,
                                 "weights[0]"),
    "state of two layers shared": (list_case(state=lambda s: [s[0], s[1], [s[0][0].view(-1)[14:]]]), ValueError,
                                   "state[0][0]"),
    "masked is another layer's weight": (masked_sharing_a_weight(), ValueError, "weights[0]"),
    "global n above active": (list_case(n=lambda n: 10 ** 6), ValueError, "n"),
    "global n a str": (list_case(n=lambda n: "1"), TypeError, "n"),
    "global n a float": (list_case(n=lambda n: 2.5), TypeError, "n"),
    "active wrong length": (dict(layer_lists(), active=[1, 2]), ValueError, "active"),
    "active a tensor": (dict(layer_lists(), active=torch.tensor([1, 2, 3])), TypeError, "active"),
    "n above active given": (n_above_the_active_count_given(), ValueError, "n[2]"),
    "prune_abs not bool": (dict(layer_lists(), prune_abs=1), TypeError, "prune_abs"),
    # torch forbids writing these outside inference mode; the compiled kernels wrote them all the same
    "weight an inference tensor": (list_case(weights=lambda w: w[:2] + [made_in_inference_mode(w[2])]), ValueError,
                                   "weights[2]"),
    "state an inference tensor": (list_case(state=lambda s: s[:2] + [[made_in_inference_mode(s[2][0])]]), ValueError,
                                  "state[2][0]"),
}


def call_list(args):
    args = dict(args)
    return sparsekern.ops.prune_grow(args.pop("weights"), args.pop("masks"), args.pop("prune_scores"),
                                     args.pop("grow_scores"), args.pop("n"), **args)


@pytest.mark.parametrize("backend", ["compiled", "reference"])
@pytest.mark.parametrize("name", list(LIST_CASES))
def test_prune_grow_list_rejects_and_no_layer_changes(name, backend, use_backend):
    # A bad argument anywhere in the list (here mostly in a later layer) changes no layer.
    use_backend(backend, "prune_grow")
    args, error, argument = LIST_CASES[name]
    assert_rejected(call_list, (args,), error, argument)


@pytest.mark.parametrize("backend", ["compiled", "reference"])
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_a_wrong_active_count_is_refused_before_any_write(backend, scope, use_backend):
    use_backend(backend, "prune_grow")
    args = layer_lists()
    counts = [int(m.sum()) for m in args["masks"]]
    if scope == "layer":
        wrong = counts[2] + 1 if counts[2] < args["masks"][2].numel() else counts[2] - 1   # in range
        args["active"] = counts[:2] + [wrong]
        expected = r"active\[2\] is"
    else:
        args["n"], args["active"] = 1, sum(counts) - 1
        expected = r"active is"
    before = snapshot(list(args.values()))
    with pytest.raises(ValueError, match=expected):
        call_list(args)
    assert_unchanged(before, list(args.values()))


def test_the_argument_checks_alone_refuse_a_global_n_past_the_active_count():
    # The CPU kernels count again and refuse it too; the CUDA kernels trust the count they are given, so the checks
    # before any kernel must refuse it (a mutant dropping them lived on the CPU).
    args = layer_lists()
    active = sum(int(m.sum()) for m in args["masks"])
    args["n"] = active + 1
    assert_rejected(_checks.prune_grow_args, (*args.values(), active, False, False), ValueError, "n")


def linear_args(**changes):
    args = dict(x=torch.randn(2, 3, 6), weight=torch.randn(4, 6), mask=torch.rand(4, 6) < 0.5, bias=torch.randn(4))
    args.update(changes)
    return tuple(args.values())


def nested(*tensors):
    """A nested tensor of torch.nested's older layout, whose layout is strided and whose shape raises."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)   # the older layout is a prototype
        return torch.nested.nested_tensor(list(tensors), layout=torch.strided)


MASKED_LINEAR_CASES = {
    "integer x": (linear_args(x=torch.ones(2, 6, dtype=torch.long)), TypeError, "x"),
    "weight 1-D": (linear_args(weight=torch.randn(6), mask=torch.ones(6, dtype=torch.bool)), ValueError, "weight"),
    "weight dtype": (linear_args(weight=torch.randn(4, 6).double()), TypeError, "weight"),
    "x features": (linear_args(x=torch.randn(2, 5)), ValueError, "x"),
    "mask shape": (linear_args(mask=torch.ones(6, 4, dtype=torch.bool)), ValueError, "mask"),
    "mask not bool": (linear_args(mask=torch.ones(4, 6)), TypeError, "mask"),
    "bias shape": (linear_args(bias=torch.randn(6)), ValueError, "bias"),
    "bias of one entry": (linear_args(bias=torch.randn(1)), ValueError, "bias"),   # torch would broadcast it
    "bias dtype": (linear_args(bias=torch.randn(4).half()), TypeError, "bias"),
    "weight on another device": (linear_args(weight=torch.randn(4, 6, device="meta")), ValueError, "weight"),
    "mask on another device": (linear_args(mask=torch.ones(4, 6, dtype=torch.bool, device="meta")), ValueError,
                               "mask"),
    "bias on another device": (linear_args(bias=torch.randn(4, device="meta")), ValueError, "bias"),
    "x not a tensor": (linear_args(x=[[1.0] * 6]), TypeError, "x"),
    "mask not a tensor": (linear_args(mask=[[True] * 6] * 4), TypeError, "mask"),
    "bias not a tensor": (linear_args(bias=[0.0] * 4), TypeError, "bias"),
    "x sparse": (linear_args(x=torch.randn(2, 6).to_sparse()), TypeError, "x"),
    "weight sparse": (linear_args(weight=torch.randn(4, 6).to_sparse()), TypeError, "weight"),
    "mask sparse": (linear_args(mask=torch.ones(4, 6, dtype=torch.bool).to_sparse()), TypeError, "mask"),
    "bias sparse": (linear_args(bias=torch.randn(4).to_sparse()), TypeError, "bias"),
    "x nested": (linear_args(x=nested(torch.randn(2, 6), torch.randn(3, 6))), TypeError, "x"),
    "weight nested": (linear_args(weight=nested(torch.randn(4, 6))), TypeError, "weight"),
    "mask nested": (linear_args(mask=nested(torch.ones(4, 6, dtype=torch.bool))), TypeError, "mask"),
    "bias nested": (linear_args(bias=nested(torch.randn(4))), TypeError, "bias"),
}


@pytest.mark.parametrize("name", list(MASKED_LINEAR_CASES))
def test_masked_linear_rejects(name):
    args, error, argument = MASKED_LINEAR_CASES[name]
    assert_rejected(sparsekern.ops.masked_linear, args, error, argument)


@pytest.mark.parametrize("name", list(MASKED_LINEAR_CASES))
def test_the_argument_checks_alone_reject_each_case(name):
    # Valid arguments pass masked_linear_args in one expression (every layer call runs it): each bad
    # case must fail that expression, not only a kernel behind the checks, which may refuse it too.
    args, error, argument = MASKED_LINEAR_CASES[name]
    assert_rejected(_checks.masked_linear_args, args, error, argument)


dense_kernel = pytest.mark.skipif(not _extension.op_defined("masked_linear_dense_kernel"),
                                  reason="the compiled extension lacks masked_linear_dense_kernel")


@dense_kernel
@pytest.mark.parametrize("name", list(MASKED_LINEAR_CASES))
def test_the_compiled_dense_kernel_refuses_each_case(name):
    # Eager CPU calls of masked_linear go straight to this op, which checks the arguments as
    # masked_linear_args does; the Python checks run only where it refuses them, to say why. A case it
    # let through would run (mask unread in forward where weights are 0 off it) with no error at all.
    args, _, _ = MASKED_LINEAR_CASES[name]
    with pytest.raises((RuntimeError, TypeError)):
        torch.ops.sparsekern.masked_linear_dense_kernel(*args, False, True)


def test_a_refused_call_shows_only_why():
    # The compiled op's refusal comes first; the traceback must show the clear error alone.
    with pytest.raises(TypeError, match="mask must be a bool tensor") as refused:
        sparsekern.ops.masked_linear(*linear_args(mask=torch.ones(4, 6)))
    assert refused.value.__context__ is None or refused.value.__suppress_context__


@pytest.mark.parametrize("flag", ["dense_grad", "zero_off_mask"])
@pytest.mark.parametrize("value", [1, None, "no", torch.tensor(True)])
def test_masked_linear_flags_must_be_bools(flag, value):
    assert_rejected(lambda *args: sparsekern.ops.masked_linear(*args, **{flag: value}), linear_args(), TypeError, flag)
    assert_rejected(lambda *args: _checks.masked_linear_args(*args, **{flag: value}), linear_args(), TypeError, flag)


def test_a_wrong_name_would_be_caught():
    with pytest.raises(AssertionError, match="does not name"):
        assert_rejected(sparsekern.ops.topk_mask, (scores(), -1), ValueError, "scores")


compiled = pytest.mark.skipif(_extension.kernel_missing("prune_grow", "cpu") is not None,
                              reason=f"no compiled CPU kernels: {_extension.kernel_missing('prune_grow', 'cpu')}")

def compiled_prune_grow(**changes):
    """Arguments of torch.ops.sparsekern.prune_grow (the list schema) for two layers."""
    from sparsekern.ops import flat_layers, new_masks_like
    args = layer_lists()
    args = dict(weights=args["weights"][:2], masks=args["masks"][:2], prune_scores=args["prune_scores"][:2],
                grow_scores=args["grow_scores"][:2], n=args["n"][:2], global_scope=False,
                state=flat_layers(args["state"][:2])[0], state_layers=[0, 1],
                masked=flat_layers(args["masked"][:2])[0], masked_layers=[0, 1], active=None, prune_abs=False,
                grow_abs=False, new_masks=new_masks_like(args["masks"][:2]))
    args.update(changes)
    return tuple(args.values())


COMPILED_CASES = {
    "topk negative k": (lambda: torch.ops.sparsekern.topk_mask, (scores(), -1), ValueError, "k"),
    "topk k above numel": (lambda: torch.ops.sparsekern.topk_mask, (scores(), 18), ValueError, "k"),
    "topk integer scores": (lambda: torch.ops.sparsekern.topk_mask, ([torch.arange(3)], 1), TypeError, "scores[0]"),
    "topk mixed dtypes": (lambda: torch.ops.sparsekern.topk_mask, ([torch.randn(2), torch.randn(2).half()], 1),
                          TypeError, "scores[1]"),
    "per tensor k length": (lambda: torch.ops.sparsekern.topk_mask_per_tensor, (scores(), [1]), ValueError, "k"),
    "per tensor k range": (lambda: torch.ops.sparsekern.topk_mask_per_tensor, (scores(), [1, 6]), ValueError, "k[1]"),
    "prune_grow n": (lambda: torch.ops.sparsekern.prune_grow, compiled_prune_grow(n=[1, 19]), ValueError, "n[1]"),
    "prune_grow mask": (lambda: torch.ops.sparsekern.prune_grow,
                        compiled_prune_grow(masks=[torch.ones(4, 5), torch.ones(3, 3, 2, dtype=torch.bool)]),
                        TypeError, "masks[0]"),
    "prune_grow shape": (lambda: torch.ops.sparsekern.prune_grow,
                         compiled_prune_grow(grow_scores=[torch.randn(4, 5), torch.randn(2, 3, 3)]), ValueError,
                         "grow_scores[1]"),
    "prune_grow dtypes": (lambda: torch.ops.sparsekern.prune_grow,
                          compiled_prune_grow(grow_scores=[torch.randn(4, 5), torch.randn(3, 3, 2).double()]),
                          TypeError, "grow_scores[1]"),
    "prune_grow state": (lambda: torch.ops.sparsekern.prune_grow,
                         compiled_prune_grow(state=[torch.randn(4, 5), torch.ones(3, 3, 2, dtype=torch.int32)]),
                         TypeError, "state[1]"),
    "prune_grow state layer": (lambda: torch.ops.sparsekern.prune_grow, compiled_prune_grow(state_layers=[0, 2]),
                               ValueError, "state_layers[1]"),
    "prune_grow state expanded": (lambda: torch.ops.sparsekern.prune_grow,
                                  compiled_prune_grow(state=[torch.randn(1, 5).expand(4, 5), torch.randn(3, 3, 2)]),
                                  ValueError, "state[0]"),
    "prune_grow shared weight": (lambda: torch.ops.sparsekern.prune_grow,
                                 (lambda w: compiled_prune_grow(weights=[w, torch.randn(3, 3, 2)],
                                                                masked=[w, torch.randn(3, 3, 2)]))(torch.randn(4, 5)),
                                 ValueError, "weights[0]"),
    "prune_grow active": (lambda: torch.ops.sparsekern.prune_grow, compiled_prune_grow(active=[1]), ValueError,
                          "active"),
}


@compiled
@pytest.mark.parametrize("name", list(COMPILED_CASES))
def test_compiled_ops_check_their_own_arguments(name):
    # Direct callers of torch.ops.sparsekern.* skip sparsekern.ops' checks; the kernels repeat them.
    op, args, error, argument = COMPILED_CASES[name]
    assert_rejected(op(), args, error, argument)


def test_writable_in_place_refuses_a_mask_in_its_memory_and_takes_one_beside_it():
    """It reads one storage, the written tensor's, and compares the mask's address with it: a mask anywhere in that
    storage is compared byte for byte, one elsewhere cannot share memory."""
    base = torch.zeros(64)
    value = base[8:32]
    as_bytes = base.view(torch.uint8)
    for mask, shares in [(as_bytes[:40].view(torch.bool), True),    # starts before value, ends inside it
                         (as_bytes[100:110].view(torch.bool), True),   # inside value
                         (as_bytes[:32].view(torch.bool), False),      # ends where value starts
                         (as_bytes[128:152].view(torch.bool), False),  # starts where value ends
                         (torch.zeros(24, dtype=torch.bool), False),   # another allocation
                         (as_bytes[100:100].view(torch.bool), False)]:  # empty
        if shares:
            with pytest.raises(ValueError, match="^value and mask share memory"):
                _checks.writable_in_place(value, "value", mask, "mask")
        else:
            assert _checks.writable_in_place(value, "value", mask, "mask") is value
    _checks.writable_in_place(value.to("meta"), "value", torch.zeros(24, dtype=torch.bool, device="meta"), "mask")
    # The mask's own checks, without one to compare: refused as a written tensor is.
    with pytest.raises(ValueError, match="^mask has entries that share memory"):
        _checks.writable_in_place(torch.ones(1, dtype=torch.bool).expand(4), "mask")


@pytest.mark.parametrize("view", [lambda t: t.t(), lambda t: t[:, ::2], lambda t: t[::2, 1:3],
                                  lambda t: t.view(2, 3, 4).permute(2, 0, 1)])
def test_writable_in_place_takes_a_strided_view_whose_entries_share_no_memory(view):
    # Not contiguous, yet every entry its own (a transposed gradient, a channels_last weight's): written in place
    # alike. Only views whose entries overlap (expanded, stride 0) are refused.
    value = view(torch.zeros(6, 4))
    assert not value.is_contiguous()
    assert _checks.writable_in_place(value, "value") is value


def test_prune_grow_refuses_the_tensors_it_writes_as_writable_in_place_does():
    """One check, one message: prune_grow's own copy of writable_in_place's told an inference tensor to "call
    prune_grow under torch.inference_mode()", every other op's (mask_in_place, OptG, sparsify) "call this"."""
    inference, expanded, shared = made_in_inference_mode(torch.randn(6)), torch.randn(1).expand(6), torch.randn(6)
    # (the argument refused, prune_grow's arguments, writable_in_place's beside the name)
    cases = [("weights[2]", list_case(weights=replaced(2, inference)), (inference,)),
             ("state[2][0]", list_case(state=replaced(2, [expanded])), (expanded,)),
             ("state[2][0]", list_case(state=replaced(2, [shared]), masked=replaced(2, [shared])),
              (shared, shared, "masked[2][0]"))]
    for name, args, (written, *other) in cases:
        with pytest.raises(ValueError) as refused:
            call_list(args)
        with pytest.raises(ValueError) as expected:
            _checks.writable_in_place(written, name, *other)
        assert str(refused.value) == str(expected.value)


def test_memory_sharing_is_exact_for_slices_of_one_tensor_and_never_missed():
    """Views of one storage share memory where their byte ranges overlap, unless they are slices of one layout that
    share no entry (column slices interleave their ranges): those were refused too. Checked against the addresses
    themselves, over random slices of 2-D and 3-D tensors and their transposes: never a share missed, and exact
    where both are slices of one contiguous tensor."""
    generator = torch.Generator().manual_seed(0)

    def addresses(t):
        return set((t.storage_offset() + sum(index * stride for index, stride in zip(indices, t.stride()))
                    for indices in itertools.product(*(range(extent) for extent in t.shape))))

    def random_slice(base):
        parts = []
        for extent in base.shape:
            start = int(torch.randint(0, extent, (), generator=generator))
            stop = int(torch.randint(start + 1, extent + 1, (), generator=generator))
            parts.append(slice(start, stop, int(torch.randint(1, 4, (), generator=generator))))
        return base[tuple(parts)]

    exact = 0
    for shape in [(6, 7), (4, 5, 6)]:
        base = torch.zeros(shape)
        for _ in range(300):
            a, b = random_slice(base), random_slice(base)
            transposed = bool(torch.randint(0, 2, (), generator=generator))
            if transposed:
                b = b.transpose(0, -1)
            shares = bool(addresses(a) & addresses(b))
            assert not shares or _checks.overlap(a, b), (a.stride(), b.stride(), a.storage_offset())
            if not transposed and not shares and _checks.overlap(a, b) is False:
                exact += 1
    assert exact > 100   # the interleaved pairs the byte ranges alone refused
    w = torch.zeros(8, 8)
    for a, b, shares in [(w[:, :4], w[:, 4:], False), (w[:, :5], w[:, 4:], True), (w[:, ::2], w[:, 1::2], False),
                         (w[:, ::2], w[:, 2::2], True), (w[1:3, 2:6], w[3:5, 2:6], False),
                         (w.view(-1)[3:40], w[:, 5:], True)]:
        assert _checks.overlap(a, b) is shares


def test_users_call_names_the_function_for_its_errors_and_lets_out_of_memory_pass():
    def failing(error):
        raise error

    with pytest.raises(RuntimeError, match=r"^schedule=f raised ValueError at step 3: bad$") as caught:
        _checks.users_call(failing, "schedule=f", " at step 3", ValueError("bad"))
    assert isinstance(caught.value.__cause__, ValueError)
    # What a handler catches to retry at a smaller batch, left as it is (review 28).
    with pytest.raises(torch.OutOfMemoryError):
        _checks.users_call(failing, "schedule=f", "", torch.OutOfMemoryError("out of memory"))
