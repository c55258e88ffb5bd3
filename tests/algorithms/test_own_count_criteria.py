"""A user's criterion deciding its own drop count (`sparsekern.Criterion(decides_count=True)`), as set_fw and
set_fixed do: a threshold rule drops exactly the active weights below its threshold and grows as many, in both
scopes, on every backend that runs here; it is given DST's swap count; what it returns is checked, naming it, before
anything changes; its flag is saved; and it reads the device as often as set_fw does."""
import numpy as np
import pytest
import torch

import sparsekern
from sparsekern.algorithms import criteria

from ..helpers import counting_host_reads
from .test_criteria import layers
from .test_dst import small_model

pytestmark = pytest.mark.usefixtures("one_thread")

THRESHOLD = 0.3


def below(threshold, calls=None):
    """A rule of a user's own: drop every active weight with |θ| < threshold, whatever the swap count (which
    `calls` records, with the number of layers scored)."""
    def score(weights, grads, masks, *, generator, n):
        if calls is not None:
            calls.append((len(weights), n))
        return [torch.where(mask & (weight.abs() < threshold), criteria.DROPPED, criteria.KEPT)
                for weight, mask in zip(weights, masks)]
    return sparsekern.Criterion("below", score, reads_gradient=False, elementwise=False, decides_count=True)


def one_update(prune, scope, seed=0):
    """(weights and masks before, masks after) of one update of three layers whose planted gradients make growth take
    inactive entries only, so that old & ~new is exactly what was dropped."""
    model, grads = layers(torch.Generator().manual_seed(seed), [(9, 13), (7, 5), (4, 6)], density=0.4)
    algo = sparsekern.DST(model, torch.optim.SGD(model.parameters(), lr=0.1), prune=prune, grow="gradient",
                          schedule="constant", drop_fraction=0.3, update_every=1, total_steps=10, scope=scope)
    before = [(m.weight.detach().clone(), m.mask.clone()) for m in model]
    for module, grad in zip(model, grads):
        module.weight.grad = grad.clone()
    assert algo.step()
    return before, [m.mask.clone() for m in model]


@pytest.mark.parametrize("backend", ["reference", "compiled", "triton"])
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_a_threshold_rule_drops_the_active_weights_below_it_and_grows_as_many(scope, backend, use_backend):
    use_backend(backend, "prune_grow")
    calls = []
    before, after = one_update(below(THRESHOLD, calls), scope)
    drops = []
    for (weight, old), new in zip(before, after):
        assert torch.equal(old & ~new, old & (weight.abs() < THRESHOLD))   # exactly those, ties and zeros included
        drops.append(int((old & ~new).sum()))
        if scope == "layer":
            assert int(new.sum()) == int(old.sum())   # as many grow in each layer
    assert sum(int(new.sum()) for new in after) == sum(int(old.sum()) for _, old in before)
    assert all(drops) and drops != [round(0.3 * int(old.sum())) for _, old in before]   # its own count, not DST's
    # Given DST's swap count: each layer's, one call per layer, or the total, one call over the list.
    actives = [int(old.sum()) for _, old in before]
    assert calls == ([(1, round(0.3 * a)) for a in actives] if scope == "layer" else [(3, round(0.3 * sum(actives)))])


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_every_backend_drops_and_grows_alike(scope, monkeypatch):
    masks = {}
    for backend in ("reference", "compiled", "triton"):
        monkeypatch.setenv("SPARSEKERN_BACKEND", backend)
        masks[backend] = one_update(below(THRESHOLD), scope, seed=1)[1]
    for backend in ("compiled", "triton"):
        assert all(torch.equal(a, b) for a, b in zip(masks["reference"], masks[backend])), backend


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("threshold", [0.0, 10.0])
def test_it_may_drop_nothing_or_every_active_weight(threshold, scope):
    before, after = one_update(below(threshold), scope)
    for (weight, old), new in zip(before, after):
        if threshold == 0.0:   # no |θ| is below 0: nothing swaps, whatever DST's count
            assert torch.equal(old, new)
        else:   # every active weight goes, and as many inactive entries grow (in the layer, under scope="layer")
            assert not (old & new).any() and (scope == "global" or int(new.sum()) == int(old.sum()))
    assert sum(int(new.sum()) for new in after) == sum(int(old.sum()) for _, old in before)


def _bad(kind):
    """A threshold rule whose scores `kind` spoils in the last of the three layers (layer '2', of shape (4, 6)),
    which it may be given alone (scope="layer")."""
    def score(weights, grads, masks, *, generator, n):
        torch.rand(3, generator=generator)   # a draw that a refusal must undo
        scores = [torch.where(m & (w.abs() < THRESHOLD), criteria.DROPPED, criteria.KEPT)
                  for w, m in zip(weights, masks)]
        last, mask, weight = scores[-1], masks[-1], weights[-1]
        if weight.shape != (4, 6):
            return scores
        if kind == "NaN":
            last[0, 0] = float("nan")
        elif kind == "negative at an active entry":
            last[mask.nonzero()[0].tolist()] = -1.0
        elif kind == "negative at an inactive entry":
            last[(~mask).nonzero()[0].tolist()] = -1.0
        elif kind == "0 at inactive entries":   # a rule that forgot the masks: inactive weights are 0, below t
            scores[-1] = torch.where(weight.abs() < THRESHOLD, criteria.DROPPED, criteria.KEPT)
        elif kind == "integer scores":
            scores[-1] = last.long()
        elif kind == "the wrong shape":
            scores[-1] = last.flatten()
        return scores
    return sparsekern.Criterion(f"bad_{kind}", score, reads_gradient=False, elementwise=False, decides_count=True)


@pytest.mark.parametrize("kind, error, words", [
    ("NaN", ValueError, r"criterion 'bad_NaN' scored NaN in layers \['2'\]: a criterion deciding its own count"),
    ("negative at an active entry", ValueError, r"scored below 0 in layers \['2'\].*dropped in the stead of one"),
    ("negative at an inactive entry", ValueError, r"scored below 0 in layers \['2'\]"),
    ("0 at inactive entries", ValueError, r"criterion 'bad_0 at inactive entries' scored 0, a drop, at inactive "
                                          r"entries in layers \['2'\].*only active entries can be dropped"),
    ("integer scores", TypeError, "criterion 'bad_integer scores''s score of layer '2' must be float16"),
    ("the wrong shape", ValueError, "criterion 'bad_the wrong shape''s score of layer '2' must have the shape"),
])
@pytest.mark.parametrize("host_checks", [True, False])   # its scores are checked in the read of its counts
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_a_bad_result_is_refused_naming_it_and_nothing_changes(scope, host_checks, kind, error, words):
    model, grads = layers(torch.Generator().manual_seed(0), [(9, 13), (7, 5), (4, 6)], density=0.4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    algo = sparsekern.DST(model, optimizer, prune=_bad(kind), grow="random", schedule="constant", update_every=1,
                          total_steps=10, scope=scope, host_checks=host_checks)
    for module, grad in zip(model, grads):
        module.weight.grad = grad.clone()

    def state():
        return ([t.clone() for m in model for t in (m.mask, m.weight.detach(), m.weight.grad)]
                + [algo.generator.get_state()], algo.step_count)

    before = state()
    with pytest.raises(error, match=words):
        algo.step()
    after = state()
    assert all(torch.equal(a, b) for a, b in zip(before[0], after[0])) and before[1] == after[1] == 0


def test_the_contract_is_checked_when_the_criterion_is_made_and_dst_is_built():
    def score(weights, grads, masks, *, generator, n):
        return [w.abs() for w in weights]

    with pytest.raises(TypeError, match="Criterion 'x': decides_count must be a bool, got int"):
        sparsekern.Criterion("x", score, reads_gradient=False, elementwise=False, decides_count=1)
    with pytest.raises(ValueError, match="Criterion 'x': decides_count needs elementwise=False"):
        sparsekern.Criterion("x", score, reads_gradient=False, elementwise=True, decides_count=True)
    with pytest.raises(TypeError, match=r"Criterion 'x': score must take \(weights, grads, masks, \*, generator, n\): "
                                        r".*'n'"):
        sparsekern.Criterion("x", lambda weights, grads, masks, *, generator: weights, reads_gradient=False,
                             elementwise=False, decides_count=True)
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="grow='below' decides its own drop count .*only a pruning criterion can"):
        sparsekern.DST(model, optimizer, grow=below(THRESHOLD), total_steps=10)
    with pytest.raises(ValueError, match="block needs elementwise criteria, got prune='below'"):
        sparsekern.DST(model, optimizer, prune=below(THRESHOLD), block=(1, 2), total_steps=10)


def test_its_flag_is_saved_and_a_state_of_another_flag_is_refused():
    def build(criterion):
        model = small_model()
        return sparsekern.DST(model, torch.optim.SGD(model.parameters(), lr=0.1), prune=criterion, update_every=2,
                              total_steps=10)

    def ranked(weights, grads, masks, *, generator, n=None):   # may serve either way
        return [w.abs() + 1 for w in weights]

    mine = sparsekern.Criterion("mine", ranked, reads_gradient=False, elementwise=False, decides_count=True)
    state = build(mine).state_dict()
    assert state["prune_decides_count"] is True and state["grow"] == "gradient"
    other = build(sparsekern.Criterion("mine", ranked, reads_gradient=False, elementwise=False))
    with pytest.raises(ValueError, match="prune='mine' of decides_count"):
        other.load_state_dict(state)
    del state["prune_decides_count"]   # as saved before the flag existed
    other.load_state_dict(state)


@pytest.mark.parametrize("saved", [1, 0, "yes", None, 1.0])
def test_a_saved_flag_that_is_no_bool_is_refused_as_such(saved):
    # Campaign 20b: refused as "the state was saved with prune='mine' of decides_count=1, not True", a run no
    # Criterion can make (decides_count must be a bool).
    def ranked(weights, grads, masks, *, generator, n=None):
        return [w.abs() + 1 for w in weights]

    model = small_model()
    mine = sparsekern.Criterion("mine", ranked, reads_gradient=False, elementwise=False, decides_count=True)
    dst = sparsekern.DST(model, torch.optim.SGD(model.parameters(), lr=0.1), prune=mine, update_every=2,
                         total_steps=10)
    state = {**dst.state_dict(), "prune_decides_count": saved}
    masks = [module.mask.clone() for _, module in sparsekern.nn.sparse_modules(model)]
    refusal = rf"^state\['prune_decides_count'\] must be a bool, got {type(saved).__name__}$"
    with pytest.raises(TypeError, match=refusal):
        dst.load_state_dict(state)
    assert all(torch.equal(module.mask, mask) for (_, module), mask in zip(sparsekern.nn.sparse_modules(model), masks))
    dst.load_state_dict({**state, "prune_decides_count": np.True_})   # NumPy's bool is one


@pytest.mark.parametrize("host_checks", [True, False])
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_an_update_reads_the_device_as_often_as_under_set_fw(scope, host_checks):
    def reads(prune):
        model, grads = layers(torch.Generator().manual_seed(0), [(9, 13), (7, 5), (4, 6)], density=0.4)
        algo = sparsekern.DST(model, torch.optim.SGD(model.parameters(), lr=0.1), prune=prune, grow="random",
                              schedule="constant", update_every=1, total_steps=10, scope=scope,
                              host_checks=host_checks)
        for module, grad in zip(model, grads):
            module.weight.grad = grad.clone()
        with counting_host_reads() as counted:
            assert algo.step()
        return len(counted)

    assert reads(below(THRESHOLD)) == reads("set_fw")

