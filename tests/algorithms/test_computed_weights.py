"""A sparse layer whose weight is computed at every forward from other parameters (a parametrization or the older
weight_norm/spectral_norm hooks, registered after sparsify): the algorithms refuse it by name, before anything
changes; the module's own set_mask copies the mask alone (its forward masks the computed weight), and
zero_weights_off_mask, which cannot make its promise for such a weight, refuses it."""
import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize, prune

import sparsekern
from sparsekern.algorithms import DST, IMP, OptG, SWAMP, RigL
from sparsekern.algorithms.distributed import broadcast_masks, masks_identical

from ..helpers import mlp


class Double(nn.Module):
    def forward(self, weight):
        return 2 * weight


def _old_weight_norm(layer):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)   # deprecated in favour of parametrizations.weight_norm
        torch.nn.utils.weight_norm(layer)


COMPUTE = {
    "spectral_norm": parametrizations.spectral_norm,
    "weight_norm": parametrizations.weight_norm,
    "user parametrization": lambda layer: parametrize.register_parametrization(layer, "weight", Double()),
    "old weight_norm hook": _old_weight_norm,
    "old spectral_norm hook": torch.nn.utils.spectral_norm,
}
computed = pytest.mark.parametrize("compute", COMPUTE.values(), ids=COMPUTE)


def _sgd(parameters):
    return torch.optim.SGD(parameters, lr=0.1, momentum=0.9)


BUILD = {
    "DST": lambda model: RigL(model, _sgd(model.parameters()), total_steps=10, update_every=1, drop_fraction=0.5),
    "IMP": lambda model: IMP(model, _sgd, rewind_step=0),
    "SWAMP": lambda model: SWAMP(model, _sgd, particles=2),
    "OptG": lambda model: OptG(model, sparsity=0.5, epochs=2),
}


def _sparse_model(seed=0):
    model = mlp(seed, inputs=8, hidden=6, outputs=4)
    sparsekern.sparsify(model, 0.5, generator=torch.Generator().manual_seed(seed))
    return model


def _everything(model):
    """Every tensor of the model (the parametrizations' buffers, spectral_norm's u and v, included), cloned."""
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def _unchanged(model, before):
    after = _everything(model)
    return after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


@computed
@pytest.mark.parametrize("who", BUILD)
def test_an_algorithm_refuses_a_layer_whose_weight_is_computed_by_name_changing_nothing(compute, who):
    model = _sparse_model()
    compute(model[0])
    before = _everything(model)
    with pytest.raises(ValueError, match=rf"{who}: layer '0'.*computed.*before sparsify.*remove"):
        BUILD[who](model)
    assert _unchanged(model, before)


def _replace_weight_by_a_plain_tensor(layer):
    weight = layer.weight.detach().clone()
    del layer.weight
    layer.weight = weight


@pytest.mark.parametrize("who", BUILD)
def test_a_weight_replaced_by_a_plain_tensor_is_refused_as_such_not_as_computed(who):
    model = _sparse_model()
    _replace_weight_by_a_plain_tensor(model[0])
    before = _everything(model)
    with pytest.raises(ValueError, match=rf"{who}: layer '0'.s weight is not a Parameter: it was deleted or "
                                         rf"replaced by a plain tensor, .*nn.Parameter"):
        BUILD[who](model)
    assert _unchanged(model, before)


def test_a_weight_replaced_after_dst_was_built_is_refused_as_such():
    model = _sparse_model()
    dst = BUILD["DST"](model)
    _train_step(model, 0)
    _replace_weight_by_a_plain_tensor(model[0])
    with pytest.raises(RuntimeError, match=r"DST: layer '0'.s weight is not a Parameter: .* after DST was built"):
        dst.step()
    assert dst.step_count == 0


def test_torch_prune_on_a_sparse_layer_is_still_refused_as_computed():
    model = _sparse_model()
    prune.l1_unstructured(model[0], "weight", amount=0.3)
    with pytest.raises(ValueError, match=r"DST: layer '0'.s weight is computed .*torch.nn.utils.prune"):
        BUILD["DST"](model)


@computed
def test_broadcast_masks_and_masks_identical_refuse_a_computed_weight(one_rank, compute):
    model = _sparse_model()
    compute(model[0])
    model.train()
    before = _everything(model)
    for call in (lambda: broadcast_masks(model), lambda: broadcast_masks(model, weights=False),
                 lambda: masks_identical(model)):
        with pytest.raises(ValueError, match=r"layer '0'.*computed"):
            call()
    assert _unchanged(model, before)   # spectral_norm's power iteration did not run either


def _train_step(model, seed):
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(seed))
    model(x).square().sum().backward()


def test_dst_refuses_a_layer_parametrized_after_it_was_built_changing_nothing():
    model = _sparse_model()
    optimizer = _sgd(model.parameters())
    dst = RigL(model, optimizer, total_steps=10, update_every=1, drop_fraction=0.5)
    parametrizations.spectral_norm(model[0])
    _train_step(model, 0)
    before = _everything(model)
    with pytest.raises(RuntimeError, match=r"DST: layer '0'.*computed.*after DST was built"):
        dst.step()
    assert _unchanged(model, before) and dst.step_count == 0


def test_the_check_at_every_dst_step_raises_and_drops_no_attribute_error(monkeypatch):
    # DST.step() asks every layer whether a parametrization computes its weight now; asked through getattr of the
    # missing `parametrizations`, nn.Module built, formatted and dropped an AttributeError per layer and step.
    model = _sparse_model()
    dst = RigL(model, _sgd(model.parameters()), total_steps=10, update_every=5)
    raised = []
    module_getattr = nn.Module.__getattr__

    def counting_getattr(module, name):
        try:
            return module_getattr(module, name)
        except AttributeError:
            raised.append(name)
            raise

    monkeypatch.setattr(nn.Module, "__getattr__", counting_getattr)
    _train_step(model, 0)
    dst.step()
    assert raised == [] and dst.step_count == 1


def test_imp_and_swamp_refuse_a_layer_parametrized_after_they_were_built_changing_nothing():
    for build in (BUILD["IMP"], BUILD["SWAMP"]):
        model = _sparse_model()
        algorithm = build(model)
        parametrizations.spectral_norm(model[0])
        before, cycle = _everything(model), algorithm.cycle
        for call in (algorithm.next_cycle, algorithm.prune_masks):
            with pytest.raises(RuntimeError, match=r"layer '0'.*computed.*after .* was built"):
                call()
        assert _unchanged(model, before) and algorithm.cycle == cycle


def test_optg_refuses_a_layer_parametrized_after_it_was_built_changing_nothing():
    model = _sparse_model()
    optg = BUILD["OptG"](model)
    parametrizations.spectral_norm(model[2])
    _train_step(model, 0)
    before, scores = _everything(model), [score.detach().clone() for score in optg.scores]
    for call in (optg.step, optg.next_epoch):
        with pytest.raises(RuntimeError, match=r"OptG: layer '2'.*computed.*after OptG was built"):
            call()
    assert _unchanged(model, before) and all(torch.equal(a, b) for a, b in zip(optg.scores, scores))


@computed
def test_set_mask_on_a_computed_weight_copies_the_mask_alone_and_forward_masks_the_weight(compute):
    layer = sparsekern.nn.SparseLinear(8, 6)
    compute(layer)
    layer.train()
    mask = torch.rand(6, 8, generator=torch.Generator().manual_seed(1)) < 0.5
    before = _everything(layer)
    layer.set_mask(mask)
    after = _everything(layer)
    assert torch.equal(layer.mask, mask) and not layer.zero_off_mask
    # Nothing but the mask changed: no write into a computed tensor, no power iteration of spectral_norm.
    assert all(torch.equal(after[k], before[k]) for k in before if k != "mask")
    layer.eval()   # spectral_norm's weight no longer moves when read
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight * mask, layer.bias))


@computed
def test_zero_weights_off_mask_refuses_a_computed_weight(compute):
    layer = sparsekern.nn.SparseLinear(8, 6)
    compute(layer)
    layer.train()
    before = _everything(layer)
    with pytest.raises(ValueError, match=r"SparseLinear's weight is computed.*set_mask"):
        layer.zero_weights_off_mask()
    assert _unchanged(layer, before)


def test_a_parametrization_removed_again_lets_the_algorithms_act_on_the_weight():
    model = _sparse_model()
    parametrizations.spectral_norm(model[0])
    parametrize.remove_parametrizations(model[0], "weight", leave_parametrized=True)
    dst = RigL(model, _sgd(model.parameters()), total_steps=10, update_every=1, drop_fraction=0.5)
    assert [name for name, _ in dst.modules] == ["0", "2"]


@pytest.mark.parametrize("who", BUILD)
def test_loading_a_state_into_an_algorithm_whose_layer_became_computed_is_refused_changing_nothing(who):
    model = _sparse_model()
    algorithm = BUILD[who](model)
    state = copy.deepcopy(algorithm.state_dict())
    parametrizations.spectral_norm(model[0])
    before = _everything(model)
    with pytest.raises(RuntimeError, match=rf"{who}: layer '0'.*computed.*after {who} was built"):
        algorithm.load_state_dict(state)
    assert _unchanged(model, before)
