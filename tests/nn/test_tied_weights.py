"""Shared modules and tied weights: every reference sparse, one mask per weight, a weight tied to a
dense module left dense with a warning, and summary counting a shared parameter once."""
import copy
import pickle
import re
import warnings

import pytest
import torch
from torch import nn

import sparsekern
from sparsekern.nn import SparseLinear, sparse_modules


def sgd_step(model, x):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model(x).square().sum().backward()
    optimizer.step()


def test_every_reference_to_a_shared_module_becomes_the_sparse_one(generator):
    linear = nn.Linear(16, 16)
    model = sparsekern.sparsify(nn.Sequential(linear, nn.ReLU(), linear), 0.2, generator=generator)
    assert isinstance(model[0], SparseLinear) and model[2] is model[0]
    sgd_step(model, torch.randn(4, 16, generator=generator))
    layer = model[0]
    assert torch.all(layer.weight[~layer.mask] == 0)   # before: 190 of 205 inactive weights moved


def test_modules_sharing_one_weight_get_one_mask(generator):
    first, second = nn.Linear(8, 8), nn.Linear(8, 8)
    second.weight = first.weight
    model = sparsekern.sparsify(nn.Sequential(first, nn.Tanh(), second), 0.3, generator=generator)
    assert model[0].weight is model[2].weight and model[0].bias is not model[2].bias
    assert torch.equal(model[0].mask, model[2].mask) and model[0].nnz == round(0.3 * 64)
    sgd_step(model, torch.randn(4, 8, generator=generator))
    assert torch.all(model[0].weight[~model[0].mask] == 0)


class TiedLanguageModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(20, 8)
        self.hidden = nn.Linear(8, 8)
        self.output = nn.Linear(8, 20, bias=False)
        self.output.weight = self.embedding.weight

    def forward(self, tokens):
        return self.output(torch.relu(self.hidden(self.embedding(tokens))))


def test_a_weight_tied_to_a_dense_embedding_stays_dense_with_a_warning(generator):
    model = TiedLanguageModel()
    embedding = model.embedding.weight.detach().clone()
    with pytest.warns(UserWarning, match=r"output \(Linear\) stays dense: its weight is tied to embedding"):
        sparsekern.sparsify(model, 0.3, generator=generator)
    assert type(model.output) is nn.Linear and isinstance(model.hidden, SparseLinear)
    assert torch.equal(model.embedding.weight, embedding)   # before: pruned to 30%


def test_a_weight_tied_to_an_excluded_layer_stays_dense(generator):
    first, second = nn.Linear(6, 6), nn.Linear(6, 6)
    second.weight = first.weight
    model = nn.Sequential(first, second, nn.Linear(6, 2))
    with pytest.warns(UserWarning, match="tied to 1"):
        sparsekern.sparsify(model, 0.5, exclude="1", generator=generator)
    assert type(model[0]) is nn.Linear and type(model[1]) is nn.Linear and isinstance(model[2], SparseLinear)


def test_summary_counts_a_shared_parameter_once(generator):
    first, second = nn.Linear(8, 8), nn.Linear(8, 8)
    second.weight = first.weight
    model = sparsekern.sparsify(nn.Sequential(first, second), 0.25, generator=generator)
    result = sparsekern.summary(model, print_fn=None)
    unique = sum(p.numel() for p in model.parameters())   # parameters() counts a shared one once
    assert result["total"]["parameters"] == unique == 64 + 8 + 8
    assert result["sparse_weights"] == {"parameters": 64, "nonzeros": 16, "density": 0.25}
    assert result["total"]["nonzeros"] == 16 + 16
    assert [row["tied_to"] for row in result["layers"]] == [None, "0"]
    assert "tied to 0" in sparsekern.nn.metrics._table(result)


def test_sparsify_a_model_whose_modules_already_share_a_sparse_weight(generator):
    first = SparseLinear(6, 6)
    second = SparseLinear(6, 6)
    second.weight = first.weight
    model = sparsekern.sparsify(nn.Sequential(first, second), 0.5, generator=generator)
    assert torch.equal(model[0].mask, model[1].mask) and model[0].nnz == 18
    assert len(sparse_modules(model)) == 2


def test_sparsify_again_excluding_one_of_two_tied_sparse_layers_says_both_keep_their_mask(generator):
    """Sparsified again with one of two sparse layers sharing a weight excluded, the pair keeps its one mask,
    as an excluded sparse layer does; the warning said the other 'stays dense' and that the excluded one 'is not
    sparsified', both false of layers at density 0.3, and so not what a user could act on."""
    first, second = nn.Linear(8, 8), nn.Linear(8, 8)
    second.weight = first.weight
    model = sparsekern.sparsify(nn.Sequential(first, nn.Tanh(), second, nn.Linear(8, 2)), 0.3, generator=generator)
    mask = model[0].mask.clone()
    with pytest.warns(UserWarning) as caught:
        sparsekern.sparsify(model, 0.1, exclude="2", generator=generator)
    assert [str(w.message) for w in caught] == [
        "0 (SparseLinear) keeps its mask: its weight is tied to 2 (SparseLinear), which is left out and keeps its "
        "mask, and a new mask would change that module's too; exclude 0 to silence this warning"]
    assert torch.equal(model[0].mask, mask) and torch.equal(model[2].mask, mask)


class AttentionWithItsOutProjection(nn.Module):
    """An attention's out_proj registered a second time, as the model's own projection (a code base that
    reaches it by a shorter name, or reuses it after the attention)."""

    def __init__(self):
        super().__init__()
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.projection = self.attention.out_proj
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.projection(self.attention(x, x, x, need_weights=False)[0]))


def test_every_reference_to_a_converted_attentions_out_proj_becomes_its_sparse_out_proj(generator):
    """The second reference kept the dense out_proj: called there, it gave the shared weight a dense gradient,
    and the optimizer step moved 41 of its 45 pruned weights off 0, silently densifying the attention too."""
    model = AttentionWithItsOutProjection()
    calls = []
    model.projection.register_forward_hook(lambda *_: calls.append(1))   # moves with the module, as any hook does
    sparsekern.sparsify(model, 0.3, generator=generator)
    assert model.projection is model.attention.out_proj and isinstance(model.projection, SparseLinear)
    sgd_step(model, torch.randn(4, 5, 8, generator=generator))
    assert calls == [1]
    layer = model.attention.out_proj
    assert torch.all(layer.weight[~layer.mask] == 0)


class Siamese(nn.Module):
    """One LSTM encoder and one attention, each registered under two names (a Siamese network's two towers)."""

    def __init__(self):
        super().__init__()
        self.left = nn.LSTM(8, 8, batch_first=True)
        self.right = self.left
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.cross = self.attention
        self.head = nn.Linear(16, 2)

    def forward(self, a, b):
        a, b = self.left(a)[0], self.right(b)[0]
        return self.head(torch.cat([self.attention(a, b, b)[0].mean(1), self.cross(b, a, a)[0].mean(1)], -1))


def test_every_reference_to_a_shared_recurrent_module_and_attention_becomes_the_sparse_one(generator):
    model = sparsekern.sparsify(Siamese(), 0.3, generator=generator)   # raised AttributeError (no out_proj)
    assert model.left is model.right and isinstance(model.left, sparsekern.nn.SparseLSTM)
    assert model.attention is model.cross and isinstance(model.attention, sparsekern.nn.SparseMultiheadAttention)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    a, b = torch.randn(2, 5, 8, generator=generator), torch.randn(2, 4, 8, generator=generator)
    model(a, b).square().sum().backward()
    optimizer.step()
    for _, layer in sparse_modules(model):
        assert torch.all(layer.weight[~layer.mask] == 0)


def test_an_attention_sparsified_on_its_own_is_left_holding_its_dense_out_proj(generator):
    """sparsify returns the replacement of a model that is itself an attention; the attention passed in leaves
    the model as it was built, its out_proj the dense module (it came to hold the sparse one)."""
    attention = nn.MultiheadAttention(8, 2)
    out_proj = attention.out_proj
    sparse = sparsekern.sparsify(attention, 0.3, generator=generator)
    assert isinstance(sparse, sparsekern.nn.SparseMultiheadAttention) and attention.out_proj is out_proj


def test_a_linear_registered_first_and_made_an_attentions_out_proj_becomes_its_sparse_out_proj(generator):
    """The same module reached first under its own name (model.output, then attention.out_proj = model.output)."""
    model = nn.ModuleDict({"output": nn.Linear(8, 8), "attention": nn.MultiheadAttention(8, 2)})
    model["attention"].out_proj = model["output"]
    sparsekern.sparsify(model, 0.3, generator=generator)
    assert model["output"] is model["attention"].out_proj and isinstance(model["output"], SparseLinear)


def tied_pair(generator):
    """A sparsified model whose layers 0 and 2 share one weight."""
    first, second = nn.Linear(8, 8), nn.Linear(8, 8)
    second.weight = first.weight
    return sparsekern.sparsify(nn.Sequential(first, nn.Tanh(), second), 0.5, generator=generator)


def state_dict_round_trip(model):
    fresh = tied_pair(torch.Generator().manual_seed(7))
    fresh.load_state_dict(model.state_dict())
    return fresh


COPIES = {"as built": lambda model: model, "to float64": lambda model: model.to(torch.float64),
          "deepcopy": copy.deepcopy, "pickled": lambda model: pickle.loads(pickle.dumps(model)),
          "state dict loaded": state_dict_round_trip}


@pytest.mark.parametrize("copied", COPIES.values(), ids=COPIES.keys())
@pytest.mark.parametrize("member", [0, 2])
def test_set_mask_on_either_of_two_tied_layers_sets_both(generator, copied, member):
    """set_mask on one of two layers sharing a weight left its twin's mask as it was: the shared weight was zeroed
    off the new mask while the twin computed (and gave the weight a gradient) through its old one."""
    original = tied_pair(generator)
    before = original[0].mask.clone()
    model = copied(original)
    assert model[0].weight is model[2].weight
    mask = torch.rand(8, 8, generator=generator) < 0.3
    model[member].set_mask(mask)
    for layer in (model[0], model[2]):
        assert torch.equal(layer.mask, mask) and layer.zero_off_mask
    model(torch.randn(4, 8, generator=generator, dtype=model[0].weight.dtype)).square().sum().backward()
    assert torch.all(model[0].weight.grad[~mask] == 0)   # before: the twin's old mask let a gradient through
    if model is not original and model[0].weight is not original[0].weight:
        assert torch.equal(original[0].mask, before) and torch.equal(original[2].mask, before)   # a copy's own


def test_set_mask_on_a_tied_layer_zeroes_the_shared_weights_optimizer_state_once(generator, monkeypatch):
    model = tied_pair(generator)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(4, 8, generator=generator)).square().sum().backward()
    optimizer.step()
    zeroed = []
    resetting = sparsekern.nn.modules.reset_state_off_mask
    monkeypatch.setattr(sparsekern.nn.modules, "reset_state_off_mask",
                        lambda optimizer, weight, mask: zeroed.append(weight) or resetting(optimizer, weight, mask))
    mask = torch.rand(8, 8, generator=generator) < 0.3
    model[2].set_mask(mask, optimizer=optimizer)
    state = optimizer.state[model[0].weight]
    assert len(zeroed) == 1 and all(torch.all(state[key][~mask] == 0) for key in ("exp_avg", "exp_avg_sq"))


def test_set_mask_refuses_before_any_tied_layer_changes(generator):
    """A twin whose mask cannot be written (put in place through .data as an expanded view) is refused by name
    before the layer set_mask was called on changes."""
    model = tied_pair(generator)
    mask = model[0].mask.clone()
    model[2].mask.data = mask[:1].expand(8, 8)
    with pytest.raises(ValueError, match="tied to this one.*shares memory|tied to this one.*share memory"):
        model[0].set_mask(torch.ones(8, 8, dtype=torch.bool))
    assert torch.equal(model[0].mask, mask) and model[0].zero_off_mask


def test_set_mask_on_a_layer_no_longer_sharing_the_weight_leaves_its_former_twin(generator):
    """The tie is checked at use: a layer given a weight of its own since sparsify is no twin any more."""
    model = tied_pair(generator)
    model[2].weight = nn.Parameter(model[2].weight.detach().clone())
    before = model[2].mask.clone()
    model[0].set_mask(torch.ones(8, 8, dtype=torch.bool))
    assert torch.equal(model[2].mask, before) and model[0].mask.all()


def test_set_mask_on_a_tied_layer_of_a_wrapped_model_sets_both(generator, one_rank, fresh_compiler):
    """Under DistributedDataParallel and torch.compile, which hold the same layers: the compiled forward computes
    with the new mask, through both layers."""
    model = tied_pair(generator)
    ddp = nn.parallel.DistributedDataParallel(model)
    compiled = torch.compile(model, backend="eager")
    x = torch.randn(4, 8, generator=generator)
    compiled(x)
    mask = torch.rand(8, 8, generator=generator) < 0.3
    ddp.module[2].set_mask(mask)
    assert torch.equal(model[0].mask, mask)
    compiled(x).square().sum().backward()
    assert torch.all(model[0].weight.grad[~mask] == 0)


DENSE_LOADS = {  # a dense checkpoint's weight reaching the tie through one layer's key, or both
    "the twin's key alone": lambda model, weight: model.load_state_dict({"2.weight": weight}, strict=False),
    "the first layer's key alone": lambda model, weight: model.load_state_dict({"0.weight": weight}, strict=False),
    "the twin layer's own load": lambda model, weight: model[2].load_state_dict(
        {"weight": weight, "bias": model[2].bias.detach()}),
    "both keys": lambda model, weight: model.load_state_dict({"0.weight": weight, "2.weight": weight}, strict=False),
}


@pytest.mark.parametrize("load", DENSE_LOADS)
def test_a_dense_weight_loaded_through_either_tied_layer_makes_both_dense(generator, load):
    # Through one layer alone (a checkpoint leaving the tied duplicate out), that layer's mask became all True and
    # its twin kept its own: the twin promised 0 off its mask where the loaded weight is not, so it computed densely
    # while counted sparse, and DST refused the tie's two masks.
    model = tied_pair(generator)
    weight = torch.randn(8, 8, generator=generator)
    with pytest.warns(UserWarning, match=r"no mask for 1 sparse layer, '\d?\.?mask' \(SparseLinear, density 0.5, "
                                         r"with the layer sharing its weight\): load_state_dict loads each as a dense"):
        DENSE_LOADS[load](model, weight)
    x = torch.randn(4, 8, generator=generator)
    for layer in (model[0], model[2]):
        assert layer.mask.all() and layer.zero_off_mask
        torch.testing.assert_close(layer(x), nn.functional.linear(x, weight, layer.bias))
    sparsekern.DST(model, torch.optim.SGD(model.parameters(), lr=0.1), total_steps=1000)


def test_a_weight_assigned_in_place_of_a_tied_one_leaves_its_former_twin(generator):
    """load_state_dict(assign=True) gives the layer a weight of its own: its former twin keeps its weight and mask."""
    model = tied_pair(generator)
    before = model[0].mask.clone()
    with pytest.warns(UserWarning, match=r"no mask for 1 sparse layer, 'mask' \(SparseLinear, density 0.5\): "):
        model[2].load_state_dict({"weight": torch.randn(8, 8, generator=generator), "bias": model[2].bias.detach()},
                                 assign=True)
    assert model[2].weight is not model[0].weight and model[2].mask.all()
    assert torch.equal(model[0].mask, before) and model[0].zero_off_mask


def test_a_dense_load_refuses_a_twin_whose_mask_cannot_be_written_before_any_change(generator):
    model = tied_pair(generator)
    weight, mask = model[0].weight.detach().clone(), model[0].mask.clone()
    model[0].mask.data = mask[:1].expand(8, 8)
    with pytest.raises(ValueError, match=r"^load_state_dict: the SparseLinear tied to layer '2' \(sharing its weight\)"
                                         r".*share memory"):
        model.load_state_dict({"2.weight": torch.randn(8, 8, generator=generator)}, strict=False)
    assert torch.equal(model[2].weight, weight) and torch.equal(model[2].mask, mask)


def test_a_mask_loaded_through_one_tied_layer_is_its_twins_too(generator):
    # Review 28: a load holding one layer's weight and mask (a state dict leaving the tied duplicate's keys out)
    # left the twin on its old mask, computing with the loaded weight off it while promising zeros there.
    model, other = tied_pair(generator), tied_pair(torch.Generator().manual_seed(11))
    model[0].load_state_dict(other[0].state_dict())
    x = torch.randn(4, 8, generator=generator)
    for layer in (model[0], model[2]):
        assert torch.equal(layer.mask, other[0].mask) and layer.zero_off_mask
    torch.testing.assert_close(model[2](x), nn.functional.linear(x, other[0].masked_weight(), model[2].bias))
    sparsekern.DST(model, torch.optim.SGD(model.parameters(), lr=0.1), total_steps=1000)


def dense_load_warnings(load):
    """The dense-load warnings that `load()` gives."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load()
    return [str(warning.message) for warning in caught if "state dict has no mask" in str(warning.message)]


@pytest.mark.parametrize("masked, plain", [("0.", "2."), ("2.", "0.")], ids=["mask first", "mask second"])
@pytest.mark.parametrize("masked_weight", [True, False], ids=["with its weight", "alone"])
def test_a_mask_under_one_tied_layer_beside_the_twins_plain_weight_is_the_ties_in_either_order(
        generator, masked, plain, masked_weight):
    # Loop 29: torch loads layer 0 before layer 2, and the later one decided: a mask under "0." beside a plain weight
    # under "2." ended dense, the same keys the other way round ended sparse, under a warning naming layer 0 dense.
    model, other = tied_pair(generator), tied_pair(torch.Generator().manual_seed(11))
    weight = other[0].weight.detach().clone()
    state = {masked + "mask": other[0].mask.clone(), plain + "weight": weight,
             **({masked + "weight": weight} if masked_weight else {})}
    assert dense_load_warnings(lambda: model.load_state_dict(state, strict=False)) == []
    x = torch.randn(4, 8, generator=generator)
    for layer in (model[0], model[2]):
        assert torch.equal(layer.mask, other[0].mask) and layer.zero_off_mask
        torch.testing.assert_close(layer(x), nn.functional.linear(x, other[0].masked_weight(), layer.bias))
    sparsekern.DST(model, torch.optim.SGD(model.parameters(), lr=0.1), total_steps=1000)


@pytest.mark.parametrize("with_weights", [True, False], ids=["whole state dict", "masks alone"])
def test_different_masks_under_two_tied_layers_keys_are_refused_naming_both_before_either_loads(generator,
                                                                                                with_weights):
    # Each layer's load copied its mask into the tie: the layer torch loaded last decided, silently.
    model, other = tied_pair(generator), tied_pair(torch.Generator().manual_seed(11))
    state = other.state_dict() if with_weights else {"0.mask": other[0].mask.clone()}
    state["2.mask"] = ~other[0].mask
    weight, masks = model[0].weight.detach().clone(), [model[0].mask.clone(), model[2].mask.clone()]
    with pytest.raises(ValueError, match=r"^load_state_dict: state dict entries '0\.mask' and '2\.mask' hold "
                                         r"different masks for layers sharing one weight, which has one mask"):
        model.load_state_dict(state, strict=with_weights)
    assert torch.equal(model[0].weight, weight)
    assert torch.equal(model[0].mask, masks[0]) and torch.equal(model[2].mask, masks[1])
    state["2.mask"] = other[0].mask.float()   # the same mask, as torch.nn.utils.prune saves one: it loads
    model.load_state_dict(state, strict=with_weights)
    assert torch.equal(model[0].mask, other[0].mask) and torch.equal(model[2].mask, other[0].mask)


def test_a_pruned_pair_and_a_mask_that_differ_under_two_tied_layers_keys_are_refused(generator):
    # torch.nn.utils.prune's weight_orig/weight_mask under one layer's keys (translated as each layer loads) and
    # another mask under its twin's: the later won silently, the check reading "<layer>.mask" only.
    model, other = tied_pair(generator), tied_pair(torch.Generator().manual_seed(11))
    mask = other[0].mask.clone()
    state = {"0.weight_orig": other[0].weight.detach().clone(), "0.weight_mask": mask.float(), "2.mask": ~mask}
    masks = [model[0].mask.clone(), model[2].mask.clone()]
    with pytest.raises(ValueError, match=r"^load_state_dict: state dict entries '0\.weight_mask' and '2\.mask' hold "
                                         r"different masks"):
        model.load_state_dict(state, strict=False)
    assert torch.equal(model[0].mask, masks[0]) and torch.equal(model[2].mask, masks[1])


def test_the_dense_load_warning_names_only_the_layers_that_end_dense(generator):
    # Layer 0's plain weight is noted dense, then withdrawn when its twin loads the tie's mask; layer 3 stays dense.
    first, second = nn.Linear(8, 8), nn.Linear(8, 8)
    second.weight = first.weight
    model = sparsekern.sparsify(nn.Sequential(first, nn.Tanh(), second, nn.Linear(8, 8)), 0.5, generator=generator)
    mask = model[0].mask.clone()
    state = {"0.weight": torch.randn(8, 8, generator=generator), "2.mask": mask,
             "3.weight": torch.randn(8, 8, generator=generator)}
    messages = dense_load_warnings(lambda: model.load_state_dict(state, strict=False))
    assert len(messages) == 1 and re.match(r"state dict has no mask for 1 sparse layer, '3\.mask' \(SparseLinear, "
                                           r"density 0\.5\): ", messages[0])
    assert torch.equal(model[0].mask, mask) and torch.equal(model[2].mask, mask) and model[3].mask.all()


def test_a_load_torch_refuses_leaves_both_tied_layers_masks(generator):
    # Review 28: a dense weight of another shape failed torch's size check, yet both masks had become all True.
    model = tied_pair(generator)
    masks = [model[0].mask.clone(), model[2].mask.clone()]
    with pytest.raises(RuntimeError, match="size mismatch for 2.weight"):
        model.load_state_dict({"2.weight": torch.randn(4, 8, generator=generator)}, strict=False)
    assert torch.equal(model[0].mask, masks[0]) and torch.equal(model[2].mask, masks[1])


def test_a_load_refuses_a_twin_whose_mask_is_an_inference_tensor_before_any_change(generator):
    model = tied_pair(generator)
    with torch.inference_mode():   # the twin's mask alone (a layer's own inference tensors are refused as its own)
        model[0].mask = model[0].mask.clone()
    weight, masks = model[0].weight.clone(), [model[0].mask.clone(), model[2].mask.clone()]
    with pytest.raises(ValueError, match=r"^load_state_dict: the mask of the SparseLinear tied to layer '2' is "
                                         r"an inference tensor"):
        model.load_state_dict({"2.weight": torch.randn(8, 8, generator=generator)}, strict=False)
    assert torch.equal(model[0].weight, weight)
    assert torch.equal(model[0].mask, masks[0]) and torch.equal(model[2].mask, masks[1])


@pytest.mark.parametrize("dense", [nn.Linear, nn.Conv2d])
def test_set_mask_refuses_a_twin_whose_mask_is_an_inference_tensor_before_any_change(dense, generator):
    # A load checked it; set_mask wrote this layer's mask, then torch refused the twin's (RuntimeError naming no
    # layer), leaving the tie on two masks and this layer promising zeros its weight did not hold.
    first, second = (dense(8, 8), dense(8, 8)) if dense is nn.Linear else (dense(2, 2, 3), dense(2, 2, 3))
    second.weight = first.weight
    model = sparsekern.sparsify(nn.Sequential(first, nn.Tanh(), second), 0.5, generator=generator)
    with torch.inference_mode():
        model[2].mask = model[2].mask.clone()
    weight, masks = model[0].weight.detach().clone(), [model[0].mask.clone(), model[2].mask.clone()]
    with pytest.raises(ValueError, match=rf"^set_mask: the mask of the Sparse{dense.__name__} tied to this one is an "
                                         rf"inference tensor"):
        model[0].set_mask(~masks[0])
    assert torch.equal(model[0].weight, weight)
    assert torch.equal(model[0].mask, masks[0]) and torch.equal(model[2].mask, masks[1])


def test_a_mask_alone_assigned_into_a_tied_layer_is_its_twins_too(generator):
    # Review 28c: assign=True without a weight leaves the weight shared, yet the twin kept its old mask.
    model = tied_pair(generator)
    mask = ~model[0].mask
    model.load_state_dict({"0.mask": mask.clone()}, strict=False, assign=True)
    assert model[0].weight is model[2].weight
    assert torch.equal(model[0].mask, mask) and torch.equal(model[2].mask, mask)
    sparsekern.DST(model, torch.optim.SGD(model.parameters(), lr=0.1), total_steps=1000)


def test_a_load_torch_refuses_after_a_tied_layer_took_its_mask_leaves_the_twin_on_it(generator):
    # Review 28c: a weight of another shape beside a good mask: torch refuses the weight after the mask loaded, and
    # the twin, skipped on that error, kept its old mask (DST then refused the tie's two masks).
    model = tied_pair(generator)
    mask = ~model[0].mask
    with pytest.raises(RuntimeError, match="size mismatch for 0.weight"):
        model.load_state_dict({"0.weight": torch.randn(4, 8, generator=generator), "0.mask": mask}, strict=False)
    assert torch.equal(model[0].mask, model[2].mask) and model[0].zero_off_mask == model[2].zero_off_mask
