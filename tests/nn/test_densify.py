"""sparsekern.nn.densify: a sparsified model back to plain torch modules, in place."""
import copy
import pickle
import re
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize, prune

import sparsekern as sk
from sparsekern.nn import SparseModule


def _generator(seed=0):
    return torch.Generator().manual_seed(seed)


def _no_sparse_module(model):
    return not any(isinstance(module, SparseModule) for module in model.modules())


def _same_outputs(model, inputs):
    """Outputs of `model` before and after densify, in eval and train mode (dropout-free models)."""
    expected = {}
    for training in (False, True):
        model.train(training)
        with torch.no_grad():
            expected[training] = model(*inputs)
    sk.nn.densify(model)
    assert _no_sparse_module(model)
    for training in (False, True):
        model.train(training)
        with torch.no_grad():
            got = model(*inputs)
        for a, b in zip(torch.utils._pytree.tree_leaves(expected[training]), torch.utils._pytree.tree_leaves(got)):
            torch.testing.assert_close(b, a)


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(50, 16)
        self.hidden = nn.Linear(16, 16)
        self.decoder = nn.Linear(16, 50)
        self.decoder.weight = self.embedding.weight

    def forward(self, tokens):
        return self.decoder(torch.relu(self.hidden(self.embedding(tokens))))


def test_tied_language_model_keeps_its_tie_and_outputs():
    model = TiedLM()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the tied decoder stays dense, with a warning
        sk.sparsify(model, 0.5, exclude="decoder", generator=_generator())
    _same_outputs(model, (torch.randint(0, 50, (4, 7)),))
    assert model.decoder.weight is model.embedding.weight
    assert type(model.hidden) is nn.Linear


class LateTiedLM(nn.Module):
    """A decoder tied to its embedding after sparsify, which keeps the decoder dense if tied before."""

    def __init__(self, decoders=1):
        super().__init__()
        self.embedding = nn.Embedding(50, 16)
        self.decoders = nn.ModuleList(nn.Linear(16, 50) for _ in range(decoders))

    def tie(self):
        self.embedding.weight = self.decoders[0].weight
        for decoder in self.decoders[1:]:
            decoder.weight = self.decoders[0].weight

    def forward(self, tokens):
        return sum(decoder(self.embedding(tokens)) for decoder in self.decoders)


@pytest.mark.parametrize("decoders", [1, 2])
@pytest.mark.parametrize("promised", [False, True], ids=["values-kept-off-the-mask", "embedding-trained"])
def test_a_weight_tied_to_a_dense_module_and_held_off_the_mask_is_copied(decoders, promised):
    # Zeroed in place, the weight changed the embedding, which computed with its values off the mask: kept there
    # by OptG (zero_off_mask False), or written there by the embedding's training (the decoders' promise broken).
    model = LateTiedLM(decoders)
    sk.sparsify(model, 0.5, generator=_generator())
    model.tie()
    for decoder in model.decoders:
        decoder.set_mask(model.decoders[0].mask)
    with torch.no_grad():
        model.embedding.weight.add_(1.0)
    for decoder in model.decoders:
        decoder.zero_off_mask = promised
    embedding = model.embedding.weight.detach().clone()
    tokens = torch.randint(0, 50, (4, 7))
    expected = model(tokens)
    with pytest.warns(UserWarning, match=r"'decoders\.0' holds values off its mask in a weight it shares with "
                                         r"'embedding' \(Embedding\).*the tie is broken"):
        sk.nn.densify(model)
    assert _no_sparse_module(model) and torch.equal(model.embedding.weight, embedding)
    if not promised:   # a broken promise had the decoders compute with the values off the mask
        torch.testing.assert_close(model(tokens), expected)
    assert model.decoders[0].weight is not model.embedding.weight
    assert model.decoders[-1].weight is model.decoders[0].weight   # the sparse layers' own tie is kept
    assert b"sparsekern" not in pickle.dumps(model)   # the sparse module's guard hook does not come along


def test_a_weight_tied_to_a_dense_module_and_zero_off_the_mask_keeps_its_tie():
    model = LateTiedLM()
    sk.sparsify(model, 0.5, generator=_generator())
    model.tie()
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # nothing to warn about: zeroing changes nothing
        sk.nn.densify(model)
    assert model.decoders[0].weight is model.embedding.weight


def test_memory_shared_through_another_parameter_is_copied_and_a_flat_buffers_other_weights_are_not():
    model = LateTiedLM()
    sk.sparsify(model, 0.5, generator=_generator())
    decoder = model.decoders[0]
    model.embedding.weight = nn.Parameter(decoder.weight.data)   # another Parameter, the same memory
    decoder.zero_off_mask = False
    with torch.no_grad():
        decoder.weight.add_(1.0)
    embedding = model.embedding.weight.detach().clone()
    with pytest.warns(UserWarning, match="'decoders.0' holds values off its mask"):
        sk.nn.densify(model)
    assert torch.equal(model.embedding.weight, embedding)
    # An nn.LSTM flattened for cuDNN holds its weights in one buffer, which its sparse twin adopts: each weight is
    # its own range there, zeroed in place.
    lstm = nn.LSTM(4, 4, num_layers=2)
    flat = torch.cat([parameter.detach().flatten() for parameter in lstm.parameters()])
    offset = 0
    for name in lstm._flat_weights_names:
        size = getattr(lstm, name).numel()
        setattr(lstm, name, nn.Parameter(flat[offset:offset + size].view_as(getattr(lstm, name))))
        offset += size
    model = nn.Sequential(lstm)
    sk.sparsify(model, 0.5, generator=_generator())
    for _, layer in model[0].named_projections():
        layer.zero_off_mask = False
        with torch.no_grad():
            layer.weight.add_(1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _same_outputs(model, (torch.randn(3, 2, 4),))
    assert model[0].weight_hh_l1.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()


def test_two_sparse_layers_sharing_one_weight_share_it_dense():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    model[2].weight = model[0].weight
    sk.sparsify(model, 0.5, generator=_generator())
    weight = model[0].weight
    _same_outputs(model, (torch.randn(3, 8),))
    assert model[0].weight is weight and model[2].weight is weight
    assert model[0] is not model[2]


def test_a_module_registered_twice_becomes_one_dense_module():
    layer = nn.Linear(8, 8)
    model = nn.Sequential(layer, nn.ReLU(), layer)
    model.alias = layer
    sk.sparsify(model, 0.5, generator=_generator())
    _same_outputs(model, (torch.randn(3, 8),))
    assert type(model[0]) is nn.Linear and model[0] is model[2] is model.alias


def test_parameters_are_shared_and_an_optimizer_keeps_training_them():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    sk.sparsify(model, 0.5, generator=_generator())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    weight, mask = model[0].weight, model[0].mask.clone()
    sk.nn.densify(model)
    assert model[0].weight is weight
    assert not weight[~mask].any()   # the masked values
    model(torch.randn(5, 8)).sum().backward()
    optimizer.step()
    assert weight[~mask].any()       # trained dense now


def test_weights_held_off_the_mask_are_zeroed():
    model = nn.Sequential(nn.Linear(8, 8))
    sk.sparsify(model, 0.5, generator=_generator())
    with torch.no_grad():
        model[0].weight.add_(1.0)
    model[0].zero_off_mask = False   # OptG's state: values kept off the mask, forward masks them
    _same_outputs(model, (torch.randn(3, 8),))
    assert not model[0]._forward_pre_hooks   # the sparse module's guard hook does not come along


def test_round_trip_gives_the_masked_dense_model_and_its_state_dict():
    dense = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.ConvTranspose2d(8, 4, 3), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 5))
    model = copy.deepcopy(dense)
    sk.sparsify(model, 0.3, init="dense", generator=_generator())
    masks = {name: module.mask.clone() for name, module in sk.nn.sparse_modules(model)}
    sk.nn.densify(model)
    assert [type(module) for module in model] == [type(module) for module in dense]
    with torch.no_grad():
        for name, mask in masks.items():
            dense.get_submodule(name).weight.mul_(mask)
    dense.load_state_dict(model.state_dict())   # strict: the same keys
    inputs = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(model(inputs), dense(inputs))


def test_attention_and_its_out_proj_attachments():
    model = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0, batch_first=True)
    reference = copy.deepcopy(model)
    sk.sparsify(model, 0.5, generator=_generator())
    calls = []
    model.self_attn.out_proj.register_forward_hook(lambda *_: calls.append("out_proj"))
    model.self_attn.out_proj.scale = 2.0
    model.self_attn.register_buffer("note", torch.ones(2))
    model.projection = model.self_attn.out_proj
    inputs = torch.randn(2, 5, 16)
    _same_outputs(model, (inputs,))
    attention = model.self_attn
    assert type(attention) is nn.MultiheadAttention
    assert model.projection is attention.out_proj and attention.out_proj.scale == 2.0
    assert torch.equal(attention.note, torch.ones(2))
    model.projection(torch.randn(1, 16))
    assert calls and calls[-1] == "out_proj"
    reference.self_attn.register_buffer("note", torch.ones(2))   # the dense layout plus what the user attached
    reference.projection = reference.self_attn.out_proj
    reference.load_state_dict(model.state_dict())


class CrossAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention = nn.MultiheadAttention(16, 2, kdim=8, vdim=12, batch_first=True)

    def forward(self, query, key, value):
        return self.attention(query, key, value)


def test_attention_with_other_key_dims_shares_its_weights():
    model = CrossAttention()
    sk.sparsify(model, 0.5, generator=_generator())
    sparse = model.attention
    weights = [sparse.q_proj.weight, sparse.k_proj.weight, sparse.v_proj.weight, sparse.out_proj.weight]
    _same_outputs(model, (torch.randn(2, 3, 16), torch.randn(2, 4, 8), torch.randn(2, 4, 12)))
    attention = model.attention
    assert type(attention) is nn.MultiheadAttention
    assert all(a is b for a, b in zip([attention.q_proj_weight, attention.k_proj_weight, attention.v_proj_weight,
                                       attention.out_proj.weight], weights))


class Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(6, 8, num_layers=2, proj_size=4, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, inputs):
        return self.head(self.lstm(inputs)[0])


def test_lstm_with_a_learned_initial_state_and_a_hook():
    model = Recurrent()
    model.lstm.h0 = nn.Parameter(torch.zeros(2, 4))
    sk.sparsify(model, 0.5, generator=_generator())
    weight = model.lstm.weight_hh_l1
    calls = []
    model.lstm.register_forward_hook(lambda *_: calls.append(1))
    _same_outputs(model, (torch.randn(2, 5, 6),))
    assert type(model.lstm) is nn.LSTM and model.lstm.weight_hh_l1 is weight
    assert isinstance(model.lstm.h0, nn.Parameter) and calls
    dense = Recurrent()
    dense.lstm.h0 = nn.Parameter(torch.zeros(2, 4))
    dense.load_state_dict(model.state_dict())


def test_hooks_and_attachments_of_a_linear_layer_move_over():
    model = nn.Sequential(nn.Linear(8, 8))
    sk.sparsify(model, 0.5, generator=_generator())
    layer = model[0]
    layer.extra = nn.Parameter(torch.ones(3))
    layer.register_buffer("scratch", torch.zeros(2), persistent=False)
    layer.tag = "encoder"
    calls = []
    handle = layer.register_forward_pre_hook(lambda *_: calls.append(1))
    sk.nn.densify(model)
    dense = model[0]
    assert type(dense) is nn.Linear and dense.extra is layer.extra and dense.tag == "encoder"
    assert "scratch" in dense._buffers and "scratch" not in dense.state_dict()
    assert not hasattr(dense, "mask") and not hasattr(dense, "dense_grad")
    dense(torch.randn(1, 8))
    assert calls == [1]
    handle.remove()
    dense(torch.randn(1, 8))
    assert calls == [1]


def test_an_attachment_named_like_an_attribute_of_the_dense_module_is_refused_unchanged():
    model = nn.Sequential(nn.Linear(8, 8))
    sk.sparsify(model, 0.5, generator=_generator())
    model[0].forward = lambda inputs: inputs
    with pytest.raises(ValueError, match=r"layer '0' \(SparseLinear\) holds 'forward', a name its Linear uses "
                                         r"itself: rename it or remove it$"):
        sk.nn.densify(model)
    assert isinstance(model[0], SparseModule)


def test_a_sparse_module_as_the_model_is_returned_dense():
    layer = sk.nn.SparseLinear(4, 4)
    dense = sk.nn.densify(layer)
    assert type(dense) is nn.Linear and dense.weight is layer.weight


def test_a_model_without_sparse_modules_is_unchanged():
    model = nn.Sequential(nn.Linear(4, 4))
    first = model[0]
    assert sk.nn.densify(model) is model and model[0] is first


def test_wrapped_or_computed_models_are_refused_unchanged():
    model = nn.Sequential(nn.Linear(4, 4))
    sk.sparsify(model, 0.5, generator=_generator())
    with pytest.raises(ValueError, match="DataParallel"):
        sk.nn.densify(nn.DataParallel(model))
    with pytest.raises(ValueError, match="torch.compile"):
        sk.nn.densify(torch.compile(model))
    torch.nn.utils.parametrizations.weight_norm(model[0])
    with pytest.raises(ValueError, match="computed"):
        sk.nn.densify(model)
    assert isinstance(model[0], SparseModule)
    with pytest.raises(TypeError, match="model"):
        sk.nn.densify("model")


class _Doubled(nn.Module):
    def forward(self, value):
        return 2 * value


@pytest.mark.parametrize("dense, owner, name, key", [
    (lambda: nn.Linear(8, 8), "", "bias", "0.bias"),
    (lambda: nn.MultiheadAttention(8, 2), "", "in_proj_bias", "0.in_proj_bias"),
    (lambda: nn.MultiheadAttention(8, 2), "out_proj", "bias", "0.out_proj.bias"),
    (lambda: nn.GRU(8, 8), "hh_l0", "bias", "0.bias_hh_l0"),
    (lambda: nn.Linear(8, 8), "", "prune", "0.bias"),
], ids=["linear", "attention", "out_proj", "gru", "pruned"])
def test_a_computed_bias_is_refused_by_name_unchanged(dense, owner, name, key):
    # It failed half-way with torch's TypeError (after weights were zeroed), or carried the parametrization to
    # a module that no longer ran it, or was refused as an attachment of the projection.
    model = nn.Sequential(dense(), nn.Linear(8, 8))
    sk.sparsify(model, 0.5, generator=_generator())
    for _, layer in sk.nn.sparse_modules(model):
        layer.zero_off_mask = False
        with torch.no_grad():
            layer.weight.add_(1.0)
    module = model[0].get_submodule(owner)
    if name == "prune":
        prune.random_unstructured(module, "bias", 0.5)
    else:
        parametrize.register_parametrization(module, name, _Doubled())
    with pytest.raises(ValueError, match=rf"^densify: '{re.escape(key)}' is computed from other parameters"):
        sk.nn.densify(model)
    assert [type(module) for module in model] == [type(model[0]), sk.nn.SparseLinear]
    assert all(layer._off_mask_nonzero() for _, layer in sk.nn.sparse_modules(model))   # not zeroed


def test_inference_mode_and_a_sparse_layer_attached_to_one():
    model = nn.Sequential(nn.Linear(8, 8))
    model[0].inner = nn.Linear(8, 8)
    sk.sparsify(model, 0.5, generator=_generator())
    model[0].to_inference()
    _same_outputs(model, (torch.randn(2, 8),))
    assert type(model[0]) is nn.Linear and type(model[0].inner) is nn.Linear
    assert not model[0]._buffers and "_packed_weight" not in vars(model[0])


def test_a_recurrent_weight_layer_registered_outside_shares_its_weight():
    model = Recurrent()
    sk.sparsify(model, 0.5, generator=_generator())
    model.alias = model.lstm.ih_l0
    sk.nn.densify(model)
    assert type(model.alias) is nn.Linear and model.alias.weight is model.lstm.weight_ih_l0


def test_an_attachment_of_a_projection_without_a_dense_module_is_refused_unchanged():
    model = Recurrent()
    sk.sparsify(model, 0.5, generator=_generator())
    model.lstm.hh_l1.scale = nn.Parameter(torch.ones(1))
    with pytest.raises(ValueError, match=r"'lstm\.hh_l1' holds 'scale'.*LSTM"):
        sk.nn.densify(model)
    assert isinstance(model.lstm, sk.nn.SparseLSTM) and isinstance(model.head, SparseModule)
    attention = nn.Sequential(nn.MultiheadAttention(8, 2))
    sk.sparsify(attention, 0.5, generator=_generator())
    attention[0].in_proj.register_buffer("note", torch.ones(1))
    with pytest.raises(ValueError, match=r"'0\.in_proj' holds 'note'"):
        sk.nn.densify(attention)
    del attention[0].in_proj.note
    # A state dict hook runs on the projection's entries, in the sparse model; the dense one has no module to run it.
    attention[0].in_proj._register_state_dict_hook(lambda *args: None)
    with pytest.raises(ValueError, match=r"'0\.in_proj' holds a state dict hook"):
        sk.nn.densify(attention)
    assert isinstance(attention[0], sk.nn.SparseMultiheadAttention)


def test_hooks_of_a_projection_without_a_dense_module_are_dropped_with_a_warning():
    # The sparse module's forward never runs them (nor their dense module's, which has none); the hooks of the
    # weight Parameter itself go with it.
    model = nn.ModuleDict({"attention": nn.MultiheadAttention(8, 2, batch_first=True), "rnn": nn.GRU(8, 8)})
    sk.sparsify(model, 0.5, generator=_generator())
    model["attention"].in_proj.register_forward_hook(lambda *args: None)
    model["rnn"].hh_l0.register_forward_pre_hook(lambda *args: None)
    model["rnn"].hh_l0.register_full_backward_hook(lambda *args: None)
    gradients = []
    model["rnn"].hh_l0.weight.register_hook(gradients.append)
    model["rnn"].hh_l0.zero_off_mask = False   # its no-op guard hook, sparsekern's own, is not named
    model["attention"].in_proj.zero_off_mask = False
    with pytest.warns(UserWarning) as caught:
        sk.nn.densify(model)
    messages = [str(warning.message) for warning in caught]
    assert len(messages) == 2
    assert "drops the 1 forward or backward hook(s) of 'attention.in_proj'" in messages[0]
    assert "drops the 2 forward or backward hook(s) of 'rnn.hh_l0'" in messages[1]
    model["rnn"](torch.randn(3, 2, 8))[0].sum().backward()
    assert type(model["rnn"]) is nn.GRU and len(gradients) == 1


def test_a_densified_model_exports_with_torch_export():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))
    sk.sparsify(model, 0.3, generator=_generator())
    inputs = torch.randn(2, 3, 6, 6)
    expected = model(inputs)
    program = torch.export.export(sk.nn.densify(model), (inputs,))
    torch.testing.assert_close(program.module()(inputs), expected)


def test_a_sharded_model_is_refused_for_what_densify_needs(one_rank):
    """The refusal gave the writers of masks' reason ("masks are chosen over whole weights") and told to wrap the
    model in DistributedDataParallel, which densify has no use for."""
    fully_shard = pytest.importorskip("torch.distributed.fsdp").fully_shard
    model = sk.sparsify(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)), 0.5, generator=_generator())
    fully_shard(model)
    with pytest.raises(ValueError, match=r"^densify: model is sharded across ranks \(module '0' holds DTensor "
                                         r"parameters .*\); densify zeroes each layer's whole weight off its whole "
                                         r"mask .*: densify an unsharded copy of the model") as err:
        sk.densify(model)
    assert "DistributedDataParallel" not in str(err.value)
    assert isinstance(model[0], SparseModule) and isinstance(model[2], SparseModule)
