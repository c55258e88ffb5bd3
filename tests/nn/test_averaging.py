"""SparseAveragedModel: an EMA of a DST run computes with its averaged weights under the live masks, in eager
mode, compiled, and in nn.TransformerEncoderLayer's eval mode; use_buffers=True averages BatchNorm statistics
but copies the masks."""
import copy
import pickle
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn, get_swa_avg_fn

import sparsekern
from sparsekern.nn import SparseAveragedModel, SparseLinear, sparse_modules

from ..helpers import BAD_OWN_MASKS, assert_unchanged, damage_mask, everything


def mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 5))
    return sparsekern.sparsify(model, 0.3, generator=torch.Generator().manual_seed(1))


def masked_reference(model, x):
    """`model` (eval mode) with every sparse layer computing F.linear on where(mask, weight, 0)."""
    plain = copy.deepcopy(model)
    for name, layer in sparse_modules(plain):
        plain.get_submodule(name).forward = (
            lambda x, layer=layer: F.linear(x, torch.where(layer.mask, layer.weight, 0), layer.bias))
    return plain(x)


def rigl_steps(model, steps):
    """Builds RigL (a mask update every 2 steps) on `model` now, and returns an iterator that trains one step per
    item."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rigl = sparsekern.RigL(model, optimizer, update_every=2, total_steps=40, drop_fraction=0.5)
    data = torch.Generator().manual_seed(2)

    def train():
        for _ in range(steps):
            x, y = torch.randn(32, 20, generator=data), torch.randint(0, 5, (32,), generator=data)
            F.cross_entropy(model(x), y).backward()
            rigl.step()
            optimizer.step()
            optimizer.zero_grad()
            yield
    return train()


def rigl_with_ema(model, average, steps=6, **kwargs):
    """Trains `model` with RigL (`rigl_steps`) and yields its EMA `average(model, ...)` after each step's
    update_parameters."""
    training = rigl_steps(model, steps)
    ema = average(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), **kwargs)
    for _ in training:
        ema.update_parameters(model)
        yield ema


@pytest.mark.parametrize("use_buffers", [False, True])
def test_the_average_computes_under_the_live_masks_and_averages_the_other_buffers(use_buffers):
    model = mlp()
    x = torch.randn(16, 20, generator=torch.Generator().manual_seed(3))
    for ema in rigl_with_ema(model, SparseAveragedModel, use_buffers=use_buffers):
        ema.eval()
        with torch.no_grad():
            torch.testing.assert_close(ema(x), masked_reference(ema.module, x))
        for (_, averaged), (_, live) in zip(sparse_modules(ema.module), sparse_modules(model)):
            assert torch.equal(averaged.mask, live.mask) and averaged.nnz == live.nnz
            assert not averaged.zero_off_mask
    # the averaged weights hold values off the live masks (they span every mask of the run)
    assert any(layer.weight[~layer.mask].any() for _, layer in sparse_modules(ema.module))
    averaged_statistics = not torch.equal(ema.module[1].running_mean, model[1].running_mean)
    assert averaged_statistics == use_buffers


def test_a_compiled_average_computes_under_the_live_masks(fresh_compiler):
    # torch's AveragedModel copies the live masks in place, which a compiled layer never notices: it went on
    # multiplying by the averaged weights off the masks.
    model = mlp()
    x = torch.randn(16, 20, generator=torch.Generator().manual_seed(3))
    for ema in rigl_with_ema(model, SparseAveragedModel):
        ema.eval()
        compiled = torch.compile(ema, backend="aot_eager")
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), masked_reference(ema.module, x))


def test_an_averaged_transformer_keeps_its_layers_off_the_fused_eval_kernel():
    # nn.TransformerEncoderLayer's fused eval-mode kernel multiplies by its layers' weights without running
    # their forwards; under torch's AveragedModel it read the averaged weights off the live masks.
    torch.manual_seed(0)
    model = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    sparsekern.sparsify(model, 0.3, generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rigl = sparsekern.RigL(model, optimizer, update_every=2, total_steps=40, drop_fraction=0.5)
    ema = SparseAveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(3))
    for _ in range(6):
        model(x).square().mean().backward()
        rigl.step()
        optimizer.step()
        optimizer.zero_grad()
        ema.update_parameters(model)
    layer = ema.module.eval()
    with torch.no_grad():
        got = ema(x)   # first: the layers' own forwards, run below, would notice their masks written in place
        unfused = layer.norm1(x + layer._sa_block(x, None, None))   # the layer's own steps, through its layers
        torch.testing.assert_close(got, layer.norm2(unfused + layer._ff_block(unfused)))


def test_another_model_is_refused_before_anything_changes():
    model = mlp()
    ema = SparseAveragedModel(model)
    ema.update_parameters(model)
    before = copy.deepcopy(ema.state_dict())
    other = sparsekern.sparsify(nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 6)), 0.3)
    with pytest.raises(ValueError, match=r"model holds other sparse layers than the averaged model"):
        ema.update_parameters(other)
    after = ema.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[key], after[key]) for key in before)


def test_torchs_own_average_of_the_masks_is_their_union():
    # What SparseAveragedModel(use_buffers=True) avoids, as the README says of torch's AveragedModel.
    model = mlp()
    for ema in rigl_with_ema(model, AveragedModel, use_buffers=True):
        pass
    averaged, live = sparse_modules(ema.module)[0][1], sparse_modules(model)[0][1]
    assert averaged.mask.sum() > live.mask.sum() and isinstance(averaged, SparseLinear)


@pytest.mark.parametrize("use_buffers", [False, True])
def test_swa_averages_the_weights_and_statistics_and_copies_the_masks(use_buffers):
    # SWA, torch's default average: with use_buffers=True it subtracted the bool masks at the second
    # update_parameters ("Subtraction ... with two bool tensors is not supported"), after averaging some tensors.
    model = mlp()
    training = rigl_steps(model, 5)
    swa = SparseAveragedModel(model, use_buffers=use_buffers)
    snapshots = []
    for _ in training:
        swa.update_parameters(model)
        snapshots.append(copy.deepcopy(model.state_dict()))
    averaged = swa.module.state_dict()
    for key, value in averaged.items():
        if value.is_floating_point() and (use_buffers or not key.startswith("1.running")):
            mean = torch.stack([snapshot[key] for snapshot in snapshots]).mean(0)
            torch.testing.assert_close(value, mean, msg=key)
        elif value.dtype == torch.bool or not use_buffers:   # the masks, and unaveraged buffers: the live ones
            assert torch.equal(value, snapshots[-1][key]), key
    swa.eval()
    x = torch.randn(16, 20, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(swa(x), masked_reference(swa.module, x))
    restored = pickle.loads(pickle.dumps(swa))   # the default average pickles, as torch's AveragedModel does
    with torch.no_grad():
        torch.testing.assert_close(restored(x), swa(x))


@pytest.mark.parametrize("use_buffers", [False, True])
def test_the_default_swa_gives_torchs_one_tensor_swa_bit_for_bit(use_buffers):
    # The default average runs in a multi-tensor form of its own (faster: benchmark averaging); its results are
    # those of torch's one-tensor SWA (get_swa_avg_fn) exactly, BatchNorm's integer num_batches_tracked included.
    model = mlp()
    training = rigl_steps(model, 5)
    default = SparseAveragedModel(model, use_buffers=use_buffers)
    one_tensor = SparseAveragedModel(model, avg_fn=get_swa_avg_fn(), use_buffers=use_buffers)
    for _ in training:
        default.update_parameters(model)
        one_tensor.update_parameters(model)
        got, want = default.state_dict(), one_tensor.state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[key], want[key]) for key in got)


def test_a_wrapped_model_is_accepted_and_layers_in_another_order_are_refused():
    model = mlp()
    swa = SparseAveragedModel(model)
    swa.update_parameters(torch.compile(model))   # its layers named "_orig_mod.0", ...: the same layers
    swa.update_parameters(model)
    wrapped = copy.copy(model)
    wrapped._modules = dict(model._modules, **{"3": torch.compile(model[3])})   # "3._orig_mod"
    swa.update_parameters(wrapped)
    assert swa.n_averaged == 3
    # Two layers of one shape, registered in the other order: torch paired them by position, averaging each
    # layer's weights with the other's.
    torch.manual_seed(0)
    first = sparsekern.sparsify(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)), 0.5)
    swapped = nn.Sequential()
    swapped.add_module("2", first[2])
    swapped.add_module("1", first[1])
    swapped.add_module("0", first[0])
    swa = SparseAveragedModel(first)
    before = copy.deepcopy(swa.state_dict())
    with pytest.raises(ValueError, match=r"model holds other sparse layers than the averaged model"):
        swa.update_parameters(swapped)
    after = swa.state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before)


def test_a_model_that_is_no_module_is_refused_by_name():
    # It raised AttributeError ('str' object has no attribute 'named_modules'), from sparse_modules.
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got str"):
        SparseAveragedModel("model")
    swa = SparseAveragedModel(mlp())
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got OrderedDict"):
        swa.update_parameters(mlp().state_dict())
    assert swa.n_averaged == 0


def test_a_model_with_no_sparse_layer_is_averaged_as_torch_does_with_a_warning():
    # It was accepted silently: a model meant to be sparse and never sparsified averaged as a dense one.
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 5))
    with pytest.warns(UserWarning, match=r"model \(Sequential\) holds no sparse layer: .*sparsekern.sparsify"):
        swa = SparseAveragedModel(dense)
    reference = AveragedModel(dense)
    for scale in (1.0, 3.0):
        with torch.no_grad():
            for parameter in dense.parameters():
                parameter.mul_(scale)
        swa.update_parameters(dense)
        reference.update_parameters(dense)
    assert all(torch.equal(mine, theirs) for mine, theirs in zip(swa.parameters(), reference.parameters()))


def test_bad_average_functions_and_use_buffers_are_refused_at_construction():
    # torch's AveragedModel took them: a non-callable failed only at the second update (the first copies), after
    # n_averaged had moved; avg_fn given with multi_avg_fn was ignored; use_buffers="yes" read as True.
    model = mlp()
    with pytest.raises(TypeError, match="avg_fn must be callable or None, got int"):
        SparseAveragedModel(model, avg_fn=5)
    with pytest.raises(TypeError, match="multi_avg_fn must be callable or None, got str"):
        SparseAveragedModel(model, multi_avg_fn="swa")
    with pytest.raises(ValueError, match="avg_fn and multi_avg_fn were both given"):
        SparseAveragedModel(model, avg_fn=get_swa_avg_fn(), multi_avg_fn=get_ema_multi_avg_fn(0.9))
    with pytest.raises(TypeError, match="use_buffers must be a bool, got str"):
        SparseAveragedModel(model, use_buffers="yes")


@pytest.mark.parametrize("passed", ["itself", "its module"])
def test_the_averaged_model_itself_is_refused_before_anything_changes(passed):
    # Itself: torch's own pairing raised a size mismatch part-way; its module: averaged with itself, silently.
    model = mlp()
    swa = SparseAveragedModel(model)
    swa.update_parameters(model)
    before = copy.deepcopy(swa.state_dict())
    with pytest.raises(ValueError, match="model shares parameters with the averaged model"):
        swa.update_parameters(swa if passed == "itself" else swa.module)
    after = swa.state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before)


def _with_a_second_head(model):
    model.add_module("head", nn.Linear(5, 2))
    return model


def _with_another_batch_norm(model):
    model[1] = nn.BatchNorm1d(32, affine=False)
    return model


def _without_a_bias(model):
    model[0].bias = None
    return model


@pytest.mark.parametrize("change, use_buffers, match", [
    (_with_a_second_head, False, r"other parameters than the averaged model \(8 of them, the averaged model 6\)"),
    (_with_another_batch_norm, False, r"at position 2: '3.weight' of shape \(5, 32\), averaged '1.weight' of shape"),
    (_without_a_bias, False, r"at position 1: '1.weight' of shape \(32,\), averaged '0.bias' of shape \(32,\)"),
    (lambda model: model, True, None)], ids=["a layer more", "a BatchNorm without affine", "a bias fewer", "same"])
def test_update_refuses_a_model_of_other_dense_tensors_with_nothing_changed(change, use_buffers, match):
    """Campaign 20: only the sparse layers were compared; torch pairs every parameter (and buffer) by position, and
    averaged those of a model with a dense layer more or a bias fewer into the wrong tensors (one of the same shape:
    a bias fewer paired a BatchNorm weight with the bias before it), stopping half-way at a shape mismatch or not at
    all, silently."""
    average = SparseAveragedModel(mlp(), use_buffers=use_buffers)
    average.update_parameters(mlp())
    before = copy.deepcopy(average.state_dict())
    other = change(mlp())
    if match is None:
        average.update_parameters(other)
        return
    with pytest.raises(ValueError, match=match):
        average.update_parameters(other)
    assert all(torch.equal(before[key], value) for key, value in average.state_dict().items())


def _second_layer_on_meta(model):
    model[3].to("meta")
    return model


def _first_mask_on_meta(model):
    model[0].mask = torch.empty_like(model[0].mask, device="meta")
    return model


@pytest.mark.parametrize("change, meta", [
    (_second_layer_on_meta, "['3.weight', '3.bias', '3.mask']"), (_first_mask_on_meta, "['0.mask']")],
    ids=["a layer", "a mask"])
@pytest.mark.parametrize("use_buffers", [False, True])
@pytest.mark.parametrize("side", ["model", "the averaged model"])
def test_a_tensor_on_the_meta_device_is_refused_by_name_with_nothing_changed(change, meta, use_buffers, side):
    """Campaign 21: torch raised NotImplementedError ('Cannot copy out of meta tensor; no data!'), naming no tensor,
    for a model (or an averaged model made from one) holding a tensor on the meta device."""
    average = SparseAveragedModel(change(mlp()) if side == "the averaged model" else mlp(), use_buffers=use_buffers)
    live = mlp() if side == "the averaged model" else change(mlp())
    before = copy.deepcopy(average.state_dict())
    with pytest.raises(ValueError, match=re.escape(f"{side} holds tensors on the meta device, which holds no values "
                                                   f"to average: {meta}; materialize it first")):
        average.update_parameters(live)
    assert all(torch.equal(before[key], value) for key, value in average.state_dict().items() if not value.is_meta)


# (One on the meta device is refused before, with every meta tensor of the averaged model named.)
@pytest.mark.parametrize("kind", [kind for kind in BAD_OWN_MASKS if kind != "on the meta device"])
def test_an_averaged_layer_whose_mask_was_put_in_place_through_data_is_refused_naming_it(kind):
    # Under use_buffers the live masks are copied into the averaged ones: torch refused an expanded one after the
    # layers before it were averaged, and copied a live mask into a float one silently.
    model = nn.Sequential(SparseLinear(6, 8), nn.ReLU(), SparseLinear(8, 3))
    averaged = SparseAveragedModel(model, use_buffers=True)
    error, match = damage_mask(averaged.module[2], kind)
    before = everything(averaged)
    with pytest.raises(error, match="^update_parameters: the averaged model: layer '2'" + match):
        averaged.update_parameters(model)
    assert_unchanged(before, everything(averaged))
