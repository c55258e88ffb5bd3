"""What sparsekern writes into a SparseLinear in inference mode (`to_inference`) reaches its pack: set_mask (a tied
twin's too), load_state_dict (of the layer, of a model holding it), reset_parameters, sparsify and
SparseAveragedModel's update pack it again, as a fresh to_inference() of the same weight and mask would; the layer
stays in inference mode. A refused write leaves the old pack."""
import pytest
import torch
from torch import nn

import sparsekern as sk
from sparsekern.nn import SparseLinear


def _fresh_pack(layer: SparseLinear):
    """The pack a new layer holding `layer`'s weight and mask makes (of the weight's dtype, on its device)."""
    fresh = SparseLinear(layer.in_features, layer.out_features, device="meta").to_empty(device=layer.weight.device)
    fresh.to(layer.weight.dtype).load_state_dict(layer.state_dict())
    return fresh.to_inference().packed


def _assert_serves_its_weight(layer: SparseLinear, x: torch.Tensor) -> None:
    """`layer` is in inference mode on the pack of its current weight and mask, and computes with it."""
    packed, fresh = layer.packed, _fresh_pack(layer)
    assert packed is not None, "left inference mode"
    for field in ("bitmap", "values", "chunk_offsets"):
        assert torch.equal(getattr(packed, field), getattr(fresh, field)), field
    assert packed.values.dtype == layer.weight.dtype and packed.values.device == layer.weight.device
    with torch.no_grad():
        torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.masked_weight(), layer.bias))


def _random_mask(generator, shape=(6, 10)):
    return torch.rand(shape, generator=generator) < 0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_set_mask_packs_the_new_mask(generator, dtype):
    layer = SparseLinear(10, 6).to(dtype).to_inference()
    x = torch.randn(3, 10, generator=generator, dtype=dtype)
    before = layer(x)
    layer.set_mask(_random_mask(generator))
    _assert_serves_its_weight(layer, x)
    assert not torch.allclose(layer(x), before)


def test_set_mask_on_one_tied_layer_packs_each_twin_in_inference_mode(generator):
    model = nn.Sequential(nn.Linear(10, 6), nn.Linear(10, 6), nn.Linear(10, 6))
    model[1].weight = model[0].weight
    model[2].weight = model[0].weight
    sk.sparsify(model, 0.5, generator=generator)
    model[1].to_inference()
    model[2].to_inference()
    model[0].set_mask(_random_mask(generator))   # a twin in training mode writes the two in inference mode
    x = torch.randn(3, 10, generator=generator)
    for layer in model[1:]:
        _assert_serves_its_weight(layer, x)
    assert model[0].packed is None   # left in training mode


def test_a_refused_set_mask_leaves_the_pack_and_the_layer_unchanged(generator):
    layer = SparseLinear(10, 6)
    layer.set_mask(_random_mask(generator))
    layer.to_inference()
    packed, mask, weight = layer.packed, layer.mask.clone(), layer.weight.detach().clone()
    other = torch.optim.SGD(SparseLinear(10, 6).parameters(), lr=0.1)
    with pytest.raises(ValueError, match="mask must have the weight's shape"):
        layer.set_mask(torch.ones(6, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="optimizer does not train this SparseLinear's weight"):
        layer.set_mask(torch.ones(6, 10, dtype=torch.bool), optimizer=other)
    assert layer.packed is packed and torch.equal(layer.mask, mask) and torch.equal(layer.weight, weight)


def test_load_state_dict_into_a_layer_packs_the_loaded_weight_and_mask(generator):
    layer = SparseLinear(10, 6).to_inference()
    source = SparseLinear(10, 6)
    source.set_mask(_random_mask(generator))
    layer.load_state_dict(source.state_dict())
    _assert_serves_its_weight(layer, torch.randn(3, 10, generator=generator))
    assert torch.equal(layer.mask, source.mask)


def test_load_state_dict_into_a_model_packs_its_layers_in_inference_mode(generator):
    def model():
        return sk.sparsify(nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 4)), 0.5, generator=generator)

    serving, trained = model(), model()
    assert sk.nn.to_inference(serving) == ["0", "2"]
    serving.load_state_dict(trained.state_dict())
    x = torch.randn(3, 10, generator=generator)
    for layer in (serving[0], serving[2]):
        _assert_serves_its_weight(layer, torch.randn(3, layer.in_features, generator=generator))
    with torch.no_grad():
        torch.testing.assert_close(serving(x), trained(x))


class _RefusingLoad(nn.Module):
    """A module of one's own whose load raises (a checkpoint migration that fails)."""

    def _load_from_state_dict(self, *args):
        raise RuntimeError("refused by a module of one's own")


def test_a_load_raising_after_a_layer_loaded_leaves_it_serving_what_it_loaded(generator):
    # The layers a failed load wrote before the failure serve what they hold: a pack deferred to the end of the call
    # (to pack tied twins once) never came when a module of the user's raised, and left the old pack serving.
    def model():
        return nn.Sequential(sk.sparsify(nn.Linear(10, 6), 0.5, generator=generator), _RefusingLoad())

    serving, trained = model(), model()
    serving[0].to_inference()
    with pytest.raises(RuntimeError, match="refused by a module of one's own"):
        serving.load_state_dict(trained.state_dict())
    assert torch.equal(serving[0].weight, trained[0].weight)
    _assert_serves_its_weight(serving[0], torch.randn(3, 10, generator=generator))


def test_a_dense_checkpoint_loaded_into_a_layer_in_inference_mode_packs_the_dense_weight(generator):
    layer = SparseLinear(10, 6)
    layer.set_mask(_random_mask(generator))
    layer.to_inference()
    with pytest.warns(UserWarning, match="loads each as a dense layer"):
        layer.load_state_dict(nn.Linear(10, 6).state_dict())
    _assert_serves_its_weight(layer, torch.randn(3, 10, generator=generator))
    assert layer.packed.values.numel() == 60


def test_reset_parameters_packs_the_new_weight(generator):
    layer = SparseLinear(10, 6)
    layer.set_mask(_random_mask(generator))
    layer.to_inference()
    layer.reset_parameters()
    _assert_serves_its_weight(layer, torch.randn(3, 10, generator=generator))


def test_sparsify_of_a_model_holding_a_layer_in_inference_mode_packs_its_new_mask(generator):
    model = sk.sparsify(nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 4)), 0.5, generator=generator)
    sk.nn.to_inference(model)
    sk.sparsify(model, 0.2, generator=generator)
    for layer in (model[0], model[2]):
        _assert_serves_its_weight(layer, torch.randn(3, layer.in_features, generator=generator))


def test_an_averaged_model_in_inference_mode_packs_each_new_average(generator):
    model = sk.sparsify(nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 4)), 0.5, generator=generator)
    averaged = sk.nn.SparseAveragedModel(model)
    sk.nn.to_inference(averaged.module)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)
    model[0].set_mask(_random_mask(generator, (8, 10)))
    averaged.update_parameters(model)
    for layer in (averaged.module[0], averaged.module[2]):
        _assert_serves_its_weight(layer, torch.randn(3, layer.in_features, generator=generator))


def test_a_write_of_ones_own_into_the_weight_is_seen_at_the_next_to_inference(generator):
    # Documented: the pack is a snapshot, and an in-place write of the user's own (.data, copy_, torch.nn.init)
    # is not noticed (that would read the tensors at every forward); to_inference() packs it.
    layer = SparseLinear(10, 6).to_inference()
    packed = layer.packed
    with torch.no_grad():
        layer.weight.mul_(2)
    assert layer.packed is packed
    layer.to_inference()
    _assert_serves_its_weight(layer, torch.randn(3, 10, generator=generator))


def _tied_in_inference_mode(generator):
    """Two SparseLinear layers sparsify masked together (sharing one weight), both in inference mode."""
    model = nn.Sequential(nn.Linear(10, 6), nn.Linear(10, 6))
    model[1].weight = model[0].weight
    sk.sparsify(model, 0.5, generator=generator)
    return sk.nn.to_inference(model) and model


WRITES_OF_ONE_TWIN = {
    "reset_parameters": lambda model, generator: model[1].reset_parameters(),
    "sparse_ init": lambda model, generator: sk.init.sparse_(model[1], generator=generator),
    "load_state_dict of the layer": lambda model, generator: model[1].load_state_dict(
        {"weight": torch.randn(6, 10, generator=generator), "bias": model[1].bias.detach().clone(),
         "mask": model[1].mask.clone()}),
    # A checkpoint leaving the tied duplicate out (as torch.save of a tied LM may): only the twin's key is there.
    "load_state_dict of the model, the twin's key alone": lambda model, generator: model.load_state_dict(
        {"1.weight": torch.randn(6, 10, generator=generator), "1.mask": model[1].mask.clone()}, strict=False),
}


@pytest.mark.parametrize("write", WRITES_OF_ONE_TWIN)
def test_a_weight_written_through_one_tied_layer_is_packed_in_its_twin_too(generator, write):
    model = _tied_in_inference_mode(generator)
    WRITES_OF_ONE_TWIN[write](model, generator)
    x = torch.randn(3, 10, generator=generator)
    for layer in model:
        _assert_serves_its_weight(layer, x)


def test_sparsekerns_own_init_packs_the_drawn_weight(generator):
    layer = SparseLinear(10, 6)
    layer.set_mask(_random_mask(generator))
    layer.to_inference()
    sk.init.layer_scaled_(layer, generator=generator)
    _assert_serves_its_weight(layer, torch.randn(3, 10, generator=generator))


def test_an_average_of_a_model_in_inference_mode_is_taken_and_both_stay_in_it(generator):
    # torch copies the model's buffers into the averaged model's by position: the model's packs, which the averaged
    # model in training mode does not hold, made it stop after averaging the weights.
    model = sk.sparsify(nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 4)), 0.5, generator=generator)
    averaged = sk.nn.SparseAveragedModel(model)
    averaged.update_parameters(model)   # the first update copies
    sk.nn.to_inference(model)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)
    averaged.update_parameters(model)
    assert averaged.n_averaged.item() == 2
    x = torch.randn(3, 10, generator=generator)
    torch.testing.assert_close(averaged.module[0].weight, model[0].weight - 0.5)
    for layer in (model[0], model[2]):
        _assert_serves_its_weight(layer, torch.randn(3, layer.in_features, generator=generator))
    assert averaged.module[0].packed is None and averaged.module(x).shape == (3, 4)


@pytest.mark.parametrize("entries", [("weight",), ("mask",), ("weight", "bias", "mask")])
@pytest.mark.parametrize("whole_model", [False, True])
def test_meta_tensors_assigned_into_a_layer_in_inference_mode_are_refused_before_any_is_assigned(generator, entries,
                                                                                                  whole_model):
    # The weight was assigned, then packing it again raised "weight is on the meta device", naming no layer, the
    # layer left in inference mode on a pack of what it no longer held.
    model = nn.Sequential(SparseLinear(10, 6))
    layer = model[0]
    layer.set_mask(_random_mask(generator))
    layer.to_inference()
    held = {name: getattr(layer, name) for name in ("weight", "bias", "mask")}
    packed = layer.packed
    source = model if whole_model else layer
    state = {key: value.to("meta") if key.rsplit(".", 1)[-1] in entries else value
             for key, value in source.state_dict().items()}
    first = ("0." if whole_model else "") + ("weight" if "weight" in entries else "mask")
    named = "0" if whole_model else r"\(root\)"
    with pytest.raises(ValueError, match=rf"^load_state_dict\(assign=True\): state dict entry '{first}' is on the "
                                         rf"meta device, and layer '{named}' is in "
                                         rf"inference mode.*: call to_training\(\) on it first"):
        source.load_state_dict(state, assign=True)
    assert all(getattr(layer, name) is tensor for name, tensor in held.items()) and layer.packed is packed
    _assert_serves_its_weight(layer, torch.randn(3, 10, generator=generator))
    layer.to_training()
    source.load_state_dict(state, assign=True)   # a layer in training mode takes them, to materialize later
    assert all(getattr(layer, name).is_meta for name in entries)
