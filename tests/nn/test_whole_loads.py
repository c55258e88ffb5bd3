"""A model sparsify built checks its whole state dict before any of its modules loads (`sparsekern.nn.load_checks`):
torch loads module by module, and a sparse layer refusing its entries raised with the modules before it loaded."""
import copy
import pickle

import pytest
import torch
from torch import nn

import sparsekern as sk
from sparsekern.nn import load_checks


class Net(nn.Module):
    """Dense and sparse modules, an attention and an LSTM converted whole, the layer refused last."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(4, 8)
        self.norm = nn.LayerNorm(8)
        self.attention = nn.MultiheadAttention(8, 2)
        self.rnn = nn.LSTM(8, 8)
        self.head = nn.Linear(8, 3)


def _sparse_net(generator) -> nn.Module:
    return sk.sparsify(Net(), 0.5, generator=generator)


def _pruned(state: dict, dense_key: str, sparse_key: str | None = None) -> None:
    """`state`'s entry `dense_key` saved as torch.nn.utils.prune saves it, its mask holding a 0.5; the sparse layer's
    own mask (`sparse_key`) left out, so that prune's is the one to load."""
    values = state.pop(dense_key)
    state.pop(sparse_key, None)
    state[dense_key + "_orig"] = values
    state[dense_key + "_mask"] = torch.full(values.shape, 0.5)


REFUSALS = {
    "a mask of 0.5": (lambda state: state.update({"head.mask": torch.full((3, 8), 0.5)}), "'head.mask'"),
    "a torch.sparse weight": (lambda state: state.update({"head.weight": state["head.weight"].to_sparse()}),
                              "'head.weight' must be a dense"),
    "a pruned LSTM weight of a plain LSTM's name": (
        lambda state: (state.update({"rnn.weight_hh_l0": state.pop("rnn.hh_l0.weight")}),
                       _pruned(state, "rnn.weight_hh_l0", "rnn.hh_l0.mask")), "'rnn.hh_l0.weight_mask'"),
    "a pruned attention bias": (lambda state: _pruned(state, "attention.in_proj_bias"),
                                "'attention.in_proj_bias_mask'"),
}


@pytest.mark.parametrize("refusal", REFUSALS)
def test_an_entry_a_sparse_layer_refuses_leaves_every_module_as_it_was(generator, refusal):
    model = _sparse_net(generator)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    state = {key: value + 1 if value.is_floating_point() else value for key, value in before.items()}
    edit, named = REFUSALS[refusal]
    edit(state)
    with pytest.raises(ValueError, match=named):
        model.load_state_dict(state)
    after = model.state_dict()
    assert all(torch.equal(after[key], value) for key, value in before.items())


def test_a_meta_entry_assigned_into_a_layer_in_inference_mode_leaves_every_module_as_it_was(generator):
    model = _sparse_net(generator)
    sk.nn.to_inference(model)
    held = {key: value for key, value in model.state_dict(keep_vars=True).items()}
    state = {key: value.detach().clone() for key, value in held.items()}
    state["head.weight"] = state["head.weight"].to("meta")
    with pytest.raises(ValueError, match="'head.weight' is on the meta device"):
        model.load_state_dict(state, assign=True)
    assert all(value is held[key] for key, value in model.state_dict(keep_vars=True).items())


def test_a_good_state_dict_loads_whole_under_a_wrapper_s_prefix_and_in_copies(generator):
    model = _sparse_net(generator)
    saved = {key: value.clone() for key, value in _sparse_net(generator).state_dict().items()}
    outer = nn.ModuleDict({"inner": model})   # the check runs at the model, under the wrapper's prefix
    outer.load_state_dict({f"inner.{key}": value for key, value in saved.items()})
    assert all(torch.equal(model.state_dict()[key], value) for key, value in saved.items())
    bad = {f"inner.{key}": value for key, value in saved.items()}
    bad["inner.head.mask"] = torch.full((3, 8), 0.5)
    for copied in (outer, copy.deepcopy(outer), pickle.loads(pickle.dumps(outer))):
        before = copied.inner.stem.weight.clone()
        with pytest.raises(ValueError, match="'inner.head.mask'"):
            copied.load_state_dict({**bad, "inner.stem.weight": before + 1})
        assert torch.equal(copied.inner.stem.weight, before)


def test_sparsify_registers_the_check_once_and_densify_takes_it_off(generator):
    model = _sparse_net(generator)
    sk.sparsify(model, 0.3, generator=generator)
    checks = [hook for hook in model._load_state_dict_pre_hooks.values() if load_checks._is_check(hook)]
    assert len(checks) == 1
    layer = sk.sparsify(nn.Linear(4, 3), 0.5, generator=generator)   # a layer replaced whole holds it itself
    assert any(load_checks._is_check(hook) for hook in layer._load_state_dict_pre_hooks.values())
    for dense in (sk.densify(model), sk.densify(layer)):
        assert not any(load_checks._is_check(hook) for hook in dense._load_state_dict_pre_hooks.values())
