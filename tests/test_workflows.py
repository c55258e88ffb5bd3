"""sparsekern inside the training workflows written around it with standard PyTorch practice: each test
runs a small loop as a researcher would and checks it against what a correct library must do (masks at
their density, weights 0 off the mask where promised, results equal to an equivalent reference)."""
import copy
import functools
import pickle
import re
import types
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsekern
from sparsekern.nn import SparseConv2d, SparseLinear


def _sparse_linear(density: float = 0.3) -> SparseLinear:
    return sparsekern.sparsify(nn.Linear(20, 16), density, generator=torch.Generator().manual_seed(0))


def _batch(rows: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, 20, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("apply", [
    lambda layer: torch.nn.utils.parametrizations.spectral_norm(layer),
    lambda layer: torch.nn.utils.spectral_norm(layer),
    lambda layer: torch.nn.utils.parametrizations.weight_norm(layer),
    lambda layer: torch.nn.utils.weight_norm(layer),
], ids=["spectral_norm", "spectral_norm (hook)", "weight_norm", "weight_norm (hook)"])
@pytest.mark.filterwarnings("ignore:.*is deprecated:FutureWarning")
def test_a_sparse_layer_under_a_norm_reparametrization_computes_with_the_masked_weight(apply):
    """spectral_norm's σ reads every entry, so its backward reaches the original weight off the mask: after a
    step the computed weight is no longer 0 there, and a layer that went on promising zero_off_mask
    multiplied by those entries."""
    layer = apply(_sparse_linear())
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.5)
    x = _batch()
    for _ in range(3):
        layer(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    layer.eval()   # no power iteration: the weight read below is the one forward used
    with torch.no_grad():
        output = layer(x)   # the hooks set the weight as forward computes it
        torch.testing.assert_close(output, F.linear(x, torch.where(layer.mask, layer.weight, 0), layer.bias))


@pytest.mark.parametrize("apply", [
    lambda layer: torch.nn.utils.parametrizations.spectral_norm(layer),
    lambda layer: torch.nn.utils.parametrizations.weight_norm(layer),
], ids=["spectral_norm", "weight_norm"])
def test_a_reparametrized_sparse_layer_keeps_its_encoder_layer_off_the_fused_kernel(apply):
    """nn.TransformerEncoderLayer's fused eval-mode kernel reads linear1.weight itself, which a parametrization
    computes from its original weight, off the mask too (spectral_norm's σ moves it off 0 there in training).
    Such a layer computes with the masked weight in its own forward, but nothing kept the encoder layer off
    the fused kernel: it multiplied by the values off the mask."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    sparsekern.sparsify(layer, 0.3, generator=torch.Generator().manual_seed(1))
    apply(layer.linear1)
    with torch.no_grad():
        parametrized = layer.linear1.parametrizations.weight
        # spectral_norm's original weight, weight_norm's direction (original1): moved off 0 off the mask too
        (parametrized.original if hasattr(parametrized, "original") else parametrized.original1).add_(1.0)
    layer.eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        weight = torch.where(layer.linear1.mask, layer.linear1.weight, 0)
        attended = layer.norm1(x + layer._sa_block(x, None, None))   # the layer's own steps, unfused
        reference = layer.norm2(attended + layer.linear2(F.linear(attended, weight, layer.linear1.bias).relu()))
        torch.testing.assert_close(layer(x), reference)


def _mlp(density: float = 0.3) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 5))
    return sparsekern.sparsify(model, density, generator=torch.Generator().manual_seed(1))


def _labels(rows: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 5, (rows,), generator=torch.Generator().manual_seed(seed))


def _masked_reference(model: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """model's output computed with plain F.linear on where(mask, weight, 0)."""
    for layer in model:
        x = F.linear(x, torch.where(layer.mask, layer.weight, 0), layer.bias) if isinstance(layer, SparseLinear) \
            else layer(x)
    return x


@pytest.mark.parametrize("use_buffers", [False, True])
def test_an_ema_of_a_rigl_model_computes_with_its_averaged_weights_under_its_masks(use_buffers):
    """AveragedModel (EMA) across RigL's mask updates: its weights average over every mask the run had, so
    they are non-zero off the current one, and its buffer sync copies the live masks in place. Its layers
    kept promising zero_off_mask and computed with the whole averaged weight (the union of all masks).
    With use_buffers=True torch averages the bool masks too, into the union of all masks (README)."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    algo = sparsekern.RigL(model, optimizer, update_every=2, total_steps=40, drop_fraction=0.5)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=use_buffers)
    x, y = _batch(), _labels()
    for step in range(6):
        F.cross_entropy(model(x), y).backward()
        algo.step()
        optimizer.step()
        optimizer.zero_grad()
        ema.update_parameters(model)
        with torch.no_grad():
            torch.testing.assert_close(ema(x), _masked_reference(ema.module, x))
    for live, averaged in zip(model, ema.module):
        if isinstance(live, SparseLinear):
            assert torch.equal(averaged.mask, live.mask) is not use_buffers


def test_loading_a_dense_checkpoint_into_a_sparsified_model_warns_that_it_densifies():
    """Transfer: a plain (dense) state dict, a pretrained model's, loaded into a sparsified one. Its missing
    masks load as all True (a plain state dict loads into a sparse module as a dense layer), which silently
    turned a model at density 0.3 dense; now it warns, naming the layers. A model that is dense already
    (IMP's start, sparsify at density 1) loads one silently."""
    pretrained = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 5))
    model = _mlp(0.3)
    with pytest.warns(UserWarning, match=r"no mask for 3 sparse layers, '0\.mask' \(SparseLinear, density 0\.291\)"):
        model.load_state_dict(pretrained.state_dict())
    assert all(layer.mask.all() for layer in model if isinstance(layer, SparseLinear))
    dense_start = sparsekern.sparsify(nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 5)), 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dense_start.load_state_dict(nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 5)).state_dict())


def _dense_load_warnings(module: nn.Module, state: dict) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module.load_state_dict(state)
    return [str(warning.message) for warning in caught if "as a dense layer (mask all True)" in str(warning.message)]


def test_a_dense_checkpoint_warns_once_per_load_state_dict_call_however_many_layers_it_densifies():
    # A small ResNet's dense checkpoint printed a dozen warnings, one per layer, all saying the same.
    pretrained = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Sequential(nn.Linear(32, 32), nn.ReLU(),
                                                                           nn.Linear(32, 32)), nn.Linear(32, 5))
    state = pretrained.state_dict()

    def sparse_model():
        torch.manual_seed(0)
        return sparsekern.sparsify(copy.deepcopy(pretrained), 0.3, generator=torch.Generator().manual_seed(1))

    model = sparse_model()
    [message] = _dense_load_warnings(model, state)
    # It named the first layer only.
    assert re.match(r"state dict has no mask for 4 sparse layers, '0.mask' \(SparseLinear, density 0.32\), "
                    r"'2.0.mask' \(SparseLinear, density [\d.]+\), '2.2.mask' \(SparseLinear, density [\d.]+\), "
                    r"'3.mask' \(SparseLinear, density [\d.]+\): ", message), message
    model = sparse_model()
    model.load_state_dict(model.state_dict())   # the masks are there: no warning, and the next call warns again
    assert len(_dense_load_warnings(model, state)) == 1
    model = sparse_model()
    assert len(_dense_load_warnings(model, state)) == 1   # each call warns, the same state dict again too
    model = sparse_model()
    [message] = _dense_load_warnings(model[2], pretrained[2].state_dict())   # a submodule's own call
    assert "no mask for 2 sparse layers, '0.mask' (SparseLinear, density 0.246), '2.mask' (SparseLinear" in message
    assert len(_dense_load_warnings(model[3], pretrained[3].state_dict())) == 1   # one layer alone
    assert all(layer.mask.all() for _, layer in sparsekern.nn.sparse_modules(model[2:]))


def test_a_dense_checkpoint_of_many_layers_is_warned_with_a_count_at_the_callers_line():
    pretrained = nn.Sequential(*(nn.Linear(8, 8) for _ in range(7)))
    model = sparsekern.sparsify(copy.deepcopy(pretrained), 0.5, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.load_state_dict(pretrained.state_dict())
    [warning] = caught
    assert str(warning.message).startswith("state dict has no mask for 7 sparse layers, '0.mask' (SparseLinear, "
                                           "density 0.5), '1.mask' (SparseLinear, density 0.5), ")
    assert "'4.mask' (SparseLinear, density 0.5) and 2 more: " in str(warning.message)
    assert warning.filename == __file__


def _renamed_locals(load_state_dict):
    """`load_state_dict` as a torch that names its module and missing-keys list otherwise would have it."""
    code = load_state_dict.__code__
    renamed = code.replace(co_varnames=tuple("module" if name == "self" else name for name in code.co_varnames),
                           co_cellvars=tuple("missing" if name == "missing_keys" else name
                                             for name in code.co_cellvars))
    function = types.FunctionType(renamed, load_state_dict.__globals__, load_state_dict.__name__,
                                  load_state_dict.__defaults__, load_state_dict.__closure__)
    function.__kwdefaults__ = load_state_dict.__kwdefaults__
    return function


def _wrapped(load_state_dict):
    """`load_state_dict` inside a wrapper of functools.wraps's (a decorator a torch may add)."""
    @functools.wraps(load_state_dict)
    def wrapper(*args, **kwargs):
        return load_state_dict(*args, **kwargs)
    return wrapper


def _hidden(load_state_dict):
    """`load_state_dict` called from a function of its own: its frame, which holds the list, is not found."""
    def load_elsewhere(module, state_dict, strict=True, assign=False):
        return load_state_dict(module, state_dict, strict, assign)
    return load_elsewhere


@pytest.mark.parametrize("torch_change, warnings_made", [(_renamed_locals, 1), (_wrapped, 1), (_hidden, 3)])
def test_a_dense_checkpoint_is_warned_of_whatever_torch_names_its_locals(torch_change, warnings_made, monkeypatch):
    """The call's module was found by the names of torch's locals ("self", "missing_keys"): renamed, each layer
    warned for itself. Where the call's frame cannot be found at all, each layer still warns (none is silent) and
    no hook is left behind."""
    pretrained = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8))
    model = sparsekern.sparsify(copy.deepcopy(pretrained), 0.5, generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(nn.Module, "load_state_dict", torch_change(nn.Module.load_state_dict))
    messages = _dense_load_warnings(model, pretrained.state_dict())
    assert len(messages) == warnings_made, messages
    assert {key for message in messages for key in ("'0.mask'", "'1.mask'", "'2.mask'") if key in message} == {
        "'0.mask'", "'1.mask'", "'2.mask'"}
    assert not model._load_state_dict_post_hooks
    assert all(layer.mask.all() for layer in model)


def test_a_dense_load_that_raises_half_way_warns_nothing_later_and_leaves_the_model_picklable():
    pretrained = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    model = sparsekern.sparsify(copy.deepcopy(pretrained), 0.5, generator=torch.Generator().manual_seed(1))
    state = pretrained.state_dict()
    state["1.weight"] = state["1.weight"].to_sparse()   # refused by layer 1, after layer 0 loaded dense
    with pytest.raises(ValueError):
        model.load_state_dict(state)
    pickle.loads(pickle.dumps(model))
    assert _dense_load_warnings(model, model.state_dict()) == []   # the masks are there: nothing to warn of
    assert not model._load_state_dict_post_hooks


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_rigls_dense_gradient_of_a_gradient_penalty_loss_is_the_dense_layers(backend, monkeypatch):
    """A loss with an input-gradient penalty (WGAN-GP, input-gradient regularisation) differentiates the
    layers' dx again. On the step before a RigL update (dense_grad) the weight's gradient through dx was
    masked while its gradient through y was not, so growth read a gradient without the penalty's part at
    the inactive positions; the convolutions and torch.func already passed both through."""
    monkeypatch.setenv("SPARSEKERN_BACKEND", backend)
    model = _mlp()
    for layer in model:
        if isinstance(layer, SparseLinear):
            layer.dense_grad = True
    x, y = _batch().requires_grad_(), _labels()

    def loss_with_penalty(forward):
        loss = F.cross_entropy(forward(x), y)
        (grad_x,) = torch.autograd.grad(loss, x, create_graph=True)
        return loss + 10 * grad_x.square().sum()

    def dense_layers(inputs):   # the dense layers at the masked weights, which the weights are
        for layer in model:
            inputs = F.linear(inputs, layer.weight, layer.bias) if isinstance(layer, SparseLinear) else layer(inputs)
        return inputs

    gradients = []
    for forward in (model, dense_layers):
        loss_with_penalty(forward).backward()
        gradients.append([parameter.grad.clone() for parameter in model.parameters()])
        model.zero_grad()
    for got, want in zip(*gradients):
        torch.testing.assert_close(got, want)
