"""DST with a criterion of the user's own (sparsekern.Criterion): a built-in one re-expressed through it gives the
built-in's masks bit for bit on every path (scopes, blocks, gradient reading); its declarations decide how it is
called; what it returns is checked, naming it, before anything changes; and it is seeded like the built-in ones."""
import copy
import functools
import io

import pytest
import torch

import sparsekern
from sparsekern.algorithms import criteria
from sparsekern.nn import sparse_modules

from .test_dst import masks, small_model, train_step
from .test_dst_no_gradient import MoE, build, same_masks, train

pytestmark = pytest.mark.usefixtures("one_thread")


def re_expressed(name):
    """The built-in criterion `name` as a user would write it (DST's default gamma and offset); set_fw and set_fixed
    as criteria deciding their own count, which take DST's swap count."""
    if name in criteria.OWN_COUNT:
        def score(weights, grads, masks, *, generator, n):
            return criteria._BUILT_IN[name].score(weights, grads, masks, generator=generator, n=n)
    else:
        def score(weights, grads, masks, *, generator):
            return criteria._BUILT_IN[name].score(weights, grads, masks, generator=generator)
    return sparsekern.Criterion(f"my_{name}", score, reads_gradient=name in criteria.READS_GRADIENT,
                                elementwise=name in criteria.ELEMENTWISE or name in criteria.GROW,
                                decides_count=name in criteria.OWN_COUNT)


def run(prune, grow, steps=8, **options):
    """(masks and weights after every step, the DST) of a small model updated every 2 steps."""
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    algo = sparsekern.DST(model, optimizer, prune=prune, grow=grow, schedule="constant", update_every=2,
                          total_steps=20, **options)
    history = []
    for step in range(steps):
        train_step(model, optimizer, algo, step)
        history.append([t.clone() for _, m in sparse_modules(model) for t in (m.mask, m.weight.detach())])
    return history, algo


def same(first, second):
    return all(torch.equal(a, b) for xs, ys in zip(first, second) for a, b in zip(xs, ys))


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("grow", sorted(criteria.GROW))
# Those deciding their own count (set_fw, set_fixed) too, as a user's Criterion with decides_count=True.
@pytest.mark.parametrize("prune", sorted(criteria.PRUNE))
def test_a_built_in_criterion_re_expressed_through_criterion_gives_its_masks_bit_for_bit(prune, grow, scope):
    built_in, _ = run(prune, grow, scope=scope)
    for custom in ((re_expressed(prune), grow), (prune, re_expressed(grow)), (re_expressed(prune), re_expressed(grow))):
        mine, algo = run(*custom, scope=scope)
        assert same(built_in, mine), custom
        assert not same(built_in[:1], built_in[-1:])   # the masks moved
        assert algo.state_dict()["prune"] == getattr(custom[0], "name", custom[0])


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("prune, grow", [("magnitude", "gradient"), ("snip", "random"), ("mest", "gradient")])
def test_block_masks_of_a_re_expressed_criterion_are_the_built_in_ones(prune, grow, scope):
    built_in, _ = run(prune, grow, scope=scope, block=(1, 2))
    mine, _ = run(re_expressed(prune), re_expressed(grow), scope=scope, block=(1, 2))
    assert same(built_in, mine)


@pytest.mark.parametrize("host_checks", [True, False])
@pytest.mark.parametrize("set_to_none", [True, False])
def test_a_layer_without_gradient_keeps_its_mask_under_a_criterion_reading_gradients(set_to_none, host_checks):
    built_in, mine = [train(*build(MoE, prune=prune, grow="random", host_checks=host_checks),
                            set_to_none=set_to_none, absent={1}) for prune in ("snip", re_expressed("snip"))]
    assert same_masks(built_in, mine)
    assert all(torch.equal(built_in[0][1], masks[1]) for masks in built_in)   # the unrouted expert's


def test_a_criterion_reading_gradients_refuses_a_step_before_backward_and_sees_dense_gradients():
    seen = []

    def score(weights, grads, masks, *, generator):
        seen.append([bool((g[~m] != 0).any()) for g, m in zip(grads, masks)])
        return [(w * g).abs() for w, g in zip(weights, grads)]

    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    algo = sparsekern.DST(model, optimizer, prune=sparsekern.Criterion("saliency", score, reads_gradient=True,
                                                                       elementwise=True),
                          update_every=2, total_steps=20)
    train_step(model, optimizer, algo, 0)
    optimizer.zero_grad(set_to_none=True)
    with pytest.raises(RuntimeError, match="no trained parameter has a gradient.*prune='saliency'"):
        algo.step()
    train_step(model, optimizer, algo, 1)
    assert seen == [[True, True, True]]   # dense: the inactive entries' gradients too


@pytest.mark.parametrize("block", [None, (1, 2)])
@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("elementwise", [True, False])
def test_an_elementwise_criterion_scores_the_whole_list_at_once_the_others_as_the_scope_says(elementwise, scope,
                                                                                             block):
    calls = []

    def score(weights, grads, masks, *, generator):
        calls.append(len(weights))
        return [torch.rand(w.shape, generator=generator) for w in weights]

    criterion = sparsekern.Criterion("random_again", score, reads_gradient=False, elementwise=elementwise)
    if block is not None and not elementwise:
        for prune, grow in ((criterion, "random"), ("magnitude", criterion)):
            with pytest.raises(ValueError, match="block needs elementwise criteria, got (prune|grow)='random_again'"):
                run(prune, grow, steps=0, scope=scope, block=block)
        return
    run(criterion, "random", steps=2, scope=scope, block=block)
    assert calls == ([3] if elementwise or scope == "global" else [1, 1, 1])


def test_equal_seeds_give_equal_masks_with_a_random_criterion_of_ones_own():
    def score(weights, grads, masks, *, generator):
        return [w.abs() * torch.rand(w.shape, generator=generator) for w in weights]

    def criterion():   # a new object each run: the masks depend on its score, not on the object
        return sparsekern.Criterion("noisy_magnitude", score, reads_gradient=False, elementwise=True)

    first, again, other = (run(criterion(), "random", seed=seed)[0] for seed in (3, 3, 4))
    assert same(first, again) and not same(first, other)


def test_a_criterion_of_ones_own_may_not_take_a_built_in_name_and_is_checked_when_made():
    with pytest.raises(ValueError, match="prune: Criterion name 'magnitude' is a built-in criterion's"):
        run(sparsekern.Criterion("magnitude", criteria.snip, reads_gradient=True, elementwise=True), "random")
    with pytest.raises(ValueError, match="grow: Criterion name 'gradient'"):
        run("magnitude", sparsekern.Criterion("gradient", criteria.gradient, reads_gradient=False, elementwise=True))
    with pytest.raises(TypeError, match="name must be a str"):
        sparsekern.Criterion(None, criteria.magnitude, reads_gradient=False, elementwise=True)
    with pytest.raises(ValueError, match="name must not be empty"):
        sparsekern.Criterion("", criteria.magnitude, reads_gradient=False, elementwise=True)
    with pytest.raises(TypeError, match="'x': score must be callable"):
        sparsekern.Criterion("x", "magnitude", reads_gradient=False, elementwise=True)
    with pytest.raises(TypeError, match="Criterion 'x': reads_gradient must be a bool, got NoneType"):
        sparsekern.Criterion("x", criteria.magnitude, reads_gradient=None, elementwise=True)
    with pytest.raises(TypeError, match="Criterion 'x': elementwise"):
        sparsekern.Criterion("x", criteria.magnitude, reads_gradient=False, elementwise=1)
    with pytest.raises(TypeError, match=r"prune must be a str or a sparsekern.Criterion, got function: wrap a score "
                                        r"function as sparsekern.Criterion\(name, score, reads_gradient=\.\.\., "):
        run(criteria.magnitude, "random")
    with pytest.raises(ValueError, match=r"prune must be one of .* got 'magnitute': did you mean 'magnitude'\?$"):
        run("magnitute", "random")
    with pytest.raises(ValueError, match=r"grow must be one of .* got 'Gradient': did you mean 'gradient'\?$"):
        run("magnitude", "Gradient")
    with pytest.raises(ValueError, match=r"grow must be one of \['gradient', 'random'\] or a sparsekern.Criterion, "
                                         r"got 'set'"):   # a built-in Criterion object, in the wrong role
        run("magnitude", criteria.lookup("set", criteria.PRUNE, "prune"))


def _bad(kind):
    """A score returning what `kind` says is wrong with it, after drawing from the generator."""
    def score(weights, grads, masks, *, generator):
        scores = [torch.rand(w.shape, generator=generator) for w in weights]
        if kind == "a tensor":
            return scores[0]
        if kind == "too short":
            return scores[:-1]
        if kind == "a number":
            scores[1] = 1.0
        if kind == "shape":
            scores[1] = scores[1].t()
        if kind == "dtype":
            scores[1] = scores[1].to(torch.int64)
        if kind == "device":
            scores[1] = scores[1].to("meta")
        if kind == "NaN":
            scores[2][0, 3] = float("nan")
        if kind == "writes":
            weights[0].mul_(1.0)
        return scores
    return sparsekern.Criterion(f"bad_{kind}", score, reads_gradient=False, elementwise=True)


@pytest.mark.parametrize("kind, error, words", [
    ("a tensor", TypeError, "criterion 'bad_a tensor' must return a list of tensors, got Tensor"),
    ("too short", ValueError, r"criterion 'bad_too short' returned 2 scores for 3 layers \['0', '3', '5'\]"),
    ("a number", TypeError, "criterion 'bad_a number''s score of layer '3' must be a Tensor, got float"),
    ("shape", ValueError, r"criterion 'bad_shape''s score of layer '3' must have the shape of its weight \(24, 64\)"),
    ("dtype", TypeError, "criterion 'bad_dtype''s score of layer '3' must be float16, .* got torch.int64"),
    ("device", ValueError, "criterion 'bad_device''s score of layer '3' is on meta but its weight is on cpu"),
    ("NaN", ValueError, r"criterion 'bad_NaN' scored NaN in layers \['5'\]"),
    ("writes", RuntimeError, "criterion 'bad_writes' wrote into its arguments"),
])
@pytest.mark.parametrize("role", ["prune", "grow"])
def test_what_a_criterion_returns_is_checked_naming_it_before_anything_changes(role, kind, error, words):
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    criterion = {"prune": "magnitude", "grow": "gradient", role: _bad(kind)}
    algo = sparsekern.DST(model, optimizer, update_every=2, total_steps=20, **criterion)
    train_step(model, optimizer, algo, 0)
    x, y = torch.randn(8, 2, 6, 6), torch.randint(0, 5, (8,))
    torch.nn.functional.cross_entropy(model(x), y).backward()

    def state():
        return ([t.clone() for _, m in sparse_modules(model) for t in (m.mask, m.weight.detach(), m.weight.grad)],
                [algo.generator.get_state()], algo.step_count)

    before = state()
    with pytest.raises(error, match=words):
        algo.step()
    after = state()
    assert same(before[:2], after[:2]) and before[2] == after[2] == 1


def test_nan_scores_are_not_looked_for_without_host_checks():
    # The check reads the device, which host_checks=False promises never to do; NaN ranks below every number.
    run(_bad("NaN"), "random", steps=2, host_checks=False)


def _jittered_magnitude(weights, grads, masks, *, generator):
    return [w.abs() * torch.rand(w.shape, generator=generator) for w in weights]


JITTERED = sparsekern.Criterion("jittered_magnitude", _jittered_magnitude, reads_gradient=False, elementwise=True)


@pytest.mark.parametrize("prune", ["mest", JITTERED])
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copied_dst_updates_as_the_original(prune, how):
    """A copy holds copies of its Criterion objects: the built-in ones must still be known as built-in (MEST's
    gamma would be lost otherwise), and a user's must still be called and checked."""
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    algo = sparsekern.DST(model, optimizer, prune=prune, grow="random", mest_gamma=0.25, update_every=2,
                          total_steps=20, schedule="constant", drop_fraction=0.5)
    if how == "deepcopy":
        copied = copy.deepcopy((model, optimizer, algo))
    else:
        buffer = io.BytesIO()
        torch.save((model, optimizer, algo), buffer)
        buffer.seek(0)
        copied = torch.load(buffer, weights_only=False)
    for step in range(6):
        train_step(model, optimizer, algo, step)
        train_step(*copied, step)
    assert same([masks(model)], [masks(copied[0])])


import functools
import inspect
from typing import Callable, ClassVar, Sequence
