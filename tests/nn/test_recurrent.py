"""SparseLSTM, SparseGRU, SparseRNN: the dense module's outputs, final states and gradients on masked weights,
sparsify of recurrent models, RigL on a character-level LSTM, conversions and state dicts, torch.compile,
autocast, copies, bad arguments."""
import contextlib
import copy
import math
import pickle
import re
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import prune
from torch.nn.utils.rnn import pack_padded_sequence

import sparsekern
from sparsekern.nn import SparseGRU, SparseLinear, SparseLSTM, SparseRNN, sparse_modules

INPUT, HIDDEN, T, N = 5, 7, 4, 3

# name: (sparse class, constructor arguments, call): odd sizes throughout.
CONFIGS = {
    "lstm": (SparseLSTM, dict(), dict()),
    "lstm_bidirectional_2_layers": (SparseLSTM, dict(num_layers=2, bidirectional=True), dict(hx=True)),
    "lstm_batch_first": (SparseLSTM, dict(num_layers=2, batch_first=True), dict()),
    "lstm_proj_size": (SparseLSTM, dict(num_layers=2, bidirectional=True, proj_size=3), dict(hx=True)),
    "lstm_no_bias": (SparseLSTM, dict(bias=False), dict(hx=True)),
    "lstm_unbatched": (SparseLSTM, dict(num_layers=2), dict(unbatched=True, hx=True)),
    "lstm_packed": (SparseLSTM, dict(num_layers=2, bidirectional=True), dict(packed=True, hx=True)),
    "lstm_proj_size_packed": (SparseLSTM, dict(proj_size=3, batch_first=True), dict(packed=True)),
    "gru_bidirectional_2_layers": (SparseGRU, dict(num_layers=2, bidirectional=True, batch_first=True),
                                   dict(hx=True)),
    "gru_packed": (SparseGRU, dict(num_layers=2), dict(packed=True, hx=True)),
    "rnn_tanh": (SparseRNN, dict(), dict(hx=True)),
    "rnn_relu_bidirectional_2_layers": (SparseRNN, dict(num_layers=2, nonlinearity="relu", bidirectional=True),
                                        dict()),
    "rnn_packed": (SparseRNN, dict(bidirectional=True, batch_first=True), dict(packed=True)),
}


def _dense(cls, arguments, generator):
    torch.manual_seed(int(torch.randint(2**31, (1,), generator=generator)))
    return cls.dense_class(INPUT, HIDDEN, dtype=torch.float64, **arguments)


def _sparse(dense, generator, zero_off_mask=True):
    """A sparse module from a copy of `dense`, with random half masks; with zero_off_mask False its weights hold 3
    off the masks."""
    sparse = _SPARSE[type(dense)].from_dense(copy.deepcopy(dense))
    for layer in sparse.children():
        layer.set_mask(torch.rand(layer.weight.shape, generator=generator) < 0.5)
        if not zero_off_mask:
            with torch.no_grad():
                layer.weight.masked_fill_(~layer.mask, 3.0)
            layer.zero_off_mask = False
    return sparse


_SPARSE = {nn.LSTM: SparseLSTM, nn.GRU: SparseGRU, nn.RNN: SparseRNN}


def _masked_dense(dense, sparse):
    """A copy of `dense` holding `sparse`'s masked weights, made without the code under test."""
    reference = copy.deepcopy(dense)
    with torch.no_grad():
        for name, layer in sparse.named_children():
            getattr(reference, f"weight_{name}").copy_(torch.where(layer.mask, layer.weight, 0.0))
    return reference


def _inputs(module, call, generator):
    """(input, hx) for `module`, each a leaf that requires grad; the input a PackedSequence with `packed`."""
    directions = 2 if module.bidirectional else 1
    x = torch.randn((T, INPUT) if call.get("unbatched") else
                    (N, T, INPUT) if module.batch_first else (T, N, INPUT),
                    dtype=torch.float64, generator=generator, requires_grad=True)
    hx = None
    if call.get("hx"):
        def state(size):
            shape = (module.num_layers * directions, size) if call.get("unbatched") else (
                module.num_layers * directions, N, size)
            return torch.randn(shape, dtype=torch.float64, generator=generator, requires_grad=True)
        hx = state(module.proj_size or module.hidden_size)
        if module.mode == "LSTM":
            hx = (hx, state(module.hidden_size))
    return x, hx


def _call(module, x, hx, call):
    """output, final states (a tuple) and a scalar loss of both."""
    if call.get("packed"):
        lengths = torch.tensor([T, T - 2, 1])[:N]   # unsorted: the states are permuted in and out
        x_in = pack_padded_sequence(x, lengths[[1, 0, 2]], batch_first=module.batch_first, enforce_sorted=False)
    else:
        x_in = x
    output, states = module(x_in, hx)
    states = states if isinstance(states, tuple) else (states,)
    data = output.data if call.get("packed") else output
    loss = data.square().sum() + sum((state * torch.arange(state.numel(), dtype=state.dtype).view_as(state)).sum()
                                     for state in states)
    return data, states, loss


def _leaves(x, hx):
    return [x, *([] if hx is None else hx if isinstance(hx, tuple) else [hx])]


@pytest.mark.parametrize("zero_off_mask", [True, False])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_outputs_states_and_gradients_are_the_dense_modules_on_the_masked_weights(name, zero_off_mask, generator):
    cls, arguments, call = CONFIGS[name]
    dense = _dense(cls, arguments, generator)
    sparse = _sparse(dense, generator, zero_off_mask)
    reference = _masked_dense(dense, sparse)
    x, hx = _inputs(sparse, call, generator)
    leaves = _leaves(x, hx)
    output, states, loss = _call(sparse, x, hx, call)
    expected_output, expected_states, expected_loss = _call(reference, x, hx, call)
    torch.testing.assert_close(output, expected_output)
    assert len(states) == len(expected_states)
    for state, expected in zip(states, expected_states):
        torch.testing.assert_close(state, expected)
    grads = torch.autograd.grad(loss, leaves + list(sparse.parameters()))
    expected_grads = torch.autograd.grad(expected_loss, leaves + list(reference.parameters()))
    for grad, expected in zip(grads[:len(leaves)], expected_grads[:len(leaves)]):
        torch.testing.assert_close(grad, expected)
    sparse_grads = dict(zip([key for key, _ in sparse.named_parameters()], grads[len(leaves):]))
    dense_grads = dict(zip([key for key, _ in reference.named_parameters()], expected_grads[len(leaves):]))
    assert len(sparse_grads) == len(dense_grads) == len(dense._flat_weights_names)
    for key, grad in sparse_grads.items():
        layer, kind = key.split(".")
        expected = dense_grads[f"{kind}_{layer}"]
        if kind == "weight":   # the masked gradient: zero off the mask
            expected = torch.where(getattr(sparse, layer).mask, expected, 0.0)
        torch.testing.assert_close(grad, expected, msg=key)


@pytest.mark.parametrize("name", ["lstm_proj_size", "gru_bidirectional_2_layers", "rnn_tanh"])
def test_weight_gradients_are_zero_off_the_masks_and_dense_with_dense_grad(name, generator):
    cls, arguments, call = CONFIGS[name]
    dense = _dense(cls, arguments, generator)
    sparse = _sparse(dense, generator)
    reference = _masked_dense(dense, sparse)
    x, hx = _inputs(sparse, call, generator)
    for dense_grad in (False, True):
        for layer in sparse.children():
            layer.dense_grad = dense_grad
        sparse.zero_grad()
        reference.zero_grad()
        _call(sparse, x, hx, call)[2].backward()
        _call(reference, x, hx, call)[2].backward()
        for layer_name, layer in sparse.named_children():
            grad, wanted = layer.weight.grad, getattr(reference, f"weight_{layer_name}").grad
            if dense_grad:   # the gradient at every position, as a growth criterion reads it
                torch.testing.assert_close(grad, wanted)
                assert grad[~layer.mask].abs().sum() > 0, layer_name
            else:
                assert not grad[~layer.mask].any(), layer_name
                torch.testing.assert_close(grad, torch.where(layer.mask, wanted, 0.0))


def test_dropout_between_layers_draws_as_the_dense_module_in_training_only(generator):
    dense = _dense(SparseLSTM, dict(num_layers=3, dropout=0.5), generator)
    sparse = _sparse(dense, generator)
    reference = _masked_dense(dense, sparse)
    x, _ = _inputs(sparse, {}, generator)
    outputs = []
    for module in (sparse, reference):
        torch.manual_seed(7)
        outputs.append(module(x)[0])
    torch.testing.assert_close(outputs[0], outputs[1])
    sparse.eval()
    torch.testing.assert_close(sparse(x)[0], reference.eval()(x)[0])
    assert not torch.allclose(outputs[0], sparse(x)[0])


def test_a_new_module_is_the_dense_one_of_the_same_seed_and_reads_its_weights_by_their_dense_names():
    torch.manual_seed(3)
    dense = nn.LSTM(INPUT, HIDDEN, 2, bidirectional=True, proj_size=3)
    torch.manual_seed(3)
    sparse = SparseLSTM(INPUT, HIDDEN, 2, bidirectional=True, proj_size=3)
    assert [name for name, _ in sparse.named_children()] == [
        "ih_l0", "hh_l0", "hr_l0", "ih_l0_reverse", "hh_l0_reverse", "hr_l0_reverse",
        "ih_l1", "hh_l1", "hr_l1", "ih_l1_reverse", "hh_l1_reverse", "hr_l1_reverse"]
    assert sparse.hr_l0.bias is None and sparse.ih_l1.weight.shape == (4 * HIDDEN, 6)
    for name in dense._flat_weights_names:
        assert torch.equal(getattr(sparse, name), getattr(dense, name)), name
    assert sparse.weight_hh_l1_reverse is sparse.hh_l1_reverse.weight and sparse.bias_ih_l0 is sparse.ih_l0.bias
    assert [[tuple(weight.shape) for weight in weights] for weights in sparse.all_weights] == [
        [tuple(weight.shape) for weight in weights] for weights in dense.all_weights]
    assert sparse.all_weights[3][4] is sparse.hr_l1_reverse.weight
    assert repr(sparse).startswith(f"SparseLSTM(\n  {INPUT}, {HIDDEN}, proj_size=3, num_layers=2, bidirectional=True")
    torch.manual_seed(3)
    assert torch.equal(SparseRNN(INPUT, HIDDEN, 1, "relu").hh_l0.weight,
                       (torch.manual_seed(3), nn.RNN(INPUT, HIDDEN, 1, "relu"))[1].weight_hh_l0)
    with pytest.raises(AttributeError, match="weight_hh_l2"):
        sparse.weight_hh_l2   # noqa: B018  (only the module's own names)



def test_the_dense_names_assign_the_childrens_parameters_and_refuse_deletion(generator):
    sparse = _sparse(_dense(SparseLSTM, dict(num_layers=2), generator), generator)
    weight = nn.Parameter(torch.randn(4 * HIDDEN, HIDDEN, dtype=torch.float64, generator=generator))
    sparse.weight_hh_l1 = weight   # as into an nn.LSTM: the child holds it, its promise read from its values
    assert sparse.hh_l1.weight is weight and sparse.weight_hh_l1 is weight and "weight_hh_l1" not in vars(sparse)
    assert not sparse.hh_l1.zero_off_mask
    with pytest.raises(ValueError, match=r"^bias_hh_l0 must have shape \(28,\), got \(3,\)"):
        sparse.bias_hh_l0 = nn.Parameter(torch.zeros(3, dtype=torch.float64))   # nn.LSTM's fused op would take it
    assert sparse.hh_l0.bias.shape == (4 * HIDDEN,)
    assert [name for name, _ in sparse.named_parameters()].count("hh_l1.weight") == 1
    with pytest.raises(AttributeError, match="cannot delete bias_ih_l0, its child ih_l0's bias: the fused op takes "
                                             "every weight and bias"):
        del sparse.bias_ih_l0
    assert isinstance(sparse.ih_l0.bias, nn.Parameter)


@pytest.mark.parametrize("name", ["lstm_proj_size", "gru_bidirectional_2_layers"])
def test_functional_call_by_the_dense_names_computes_with_the_masked_weights(name, generator):
    # Code written for an nn.LSTM swaps weights in by its names: each goes through its child's mask, and back.
    cls, arguments, call = CONFIGS[name]
    dense = _dense(cls, arguments, generator)
    sparse = _sparse(dense, generator)
    reference = _masked_dense(dense, sparse)
    weights = {key: torch.randn(value.shape, dtype=value.dtype, generator=generator)
               for key, value in dense.named_parameters() if key.startswith("weight_hh")}
    x, _ = _inputs(sparse, {}, generator)
    output = torch.func.functional_call(sparse, weights, (x,))[0]
    with torch.no_grad():
        for key, value in weights.items():
            getattr(reference, key).copy_(torch.where(getattr(sparse, key[len("weight_"):]).mask, value, 0.0))
    torch.testing.assert_close(output, reference(x)[0])
    # the module's own weights are back, with their promise
    torch.testing.assert_close(sparse(x)[0], _masked_dense(dense, sparse)(x)[0])
    assert all(isinstance(layer.weight, nn.Parameter) and layer.zero_off_mask for layer in sparse.children())
    assert not any(key in vars(sparse) for key in weights)


def test_flat_weights_are_the_masked_weights_and_biases_in_the_dense_order(generator):
    # nn.RNNBase's `_flat_weights` is a list that code outside torch.nn reads by index (torch.ao.ns).
    cls, arguments, call = CONFIGS["lstm_proj_size"]
    dense = _dense(cls, arguments, generator)
    sparse = _sparse(dense, generator, zero_off_mask=False)
    reference = _masked_dense(dense, sparse)
    flat = sparse._flat_weights
    assert len(flat) == len(reference._flat_weights)
    for tensor, expected in zip(flat, reference._flat_weights):
        assert torch.equal(tensor, expected)


def test_a_weight_computed_by_a_pre_hook_is_refused_naming_the_recurrent_module():
    sparse = SparseLSTM(INPUT, HIDDEN)
    prune.l1_unstructured(sparse.hh_l0, "weight", 0.5)
    with pytest.raises(ValueError, match=r"^hh_l0's weight is computed by a forward pre-hook .*which SparseLSTM does "
                                         r"not run: .*prune the dense nn.LSTM"):
        sparse(torch.randn(T, N, INPUT))

def test_reset_parameters_keeps_the_masks(generator):
    sparse = _sparse(_dense(SparseGRU, dict(num_layers=2), generator), generator)
    masks = [layer.mask.clone() for layer in sparse.children()]
    sparse.reset_parameters()
    for layer, mask in zip(sparse.children(), masks):
        assert torch.equal(layer.mask, mask) and layer.zero_off_mask
        assert not layer.weight[~mask].any() and layer.weight[mask].abs().max() <= 1 / math.sqrt(HIDDEN)


def test_from_dense_to_dense_and_state_dict_round_trips(generator):
    cls, arguments, call = CONFIGS["lstm_proj_size"]
    dense = _dense(cls, arguments, generator)
    sparse = SparseLSTM.from_dense(dense)
    for name in dense._flat_weights_names:   # shared, as SparseLinear.from_dense does
        assert getattr(sparse, name) is getattr(dense, name)
    assert all(layer.mask.all() and layer.zero_off_mask for layer in sparse.children())
    assert (sparse.proj_size, sparse.num_layers, sparse.bidirectional) == (3, 2, True)
    x, hx = (t.detach() if t is not None else None for t in _inputs(sparse, {}, generator))
    for layer in sparse.children():
        layer.set_mask(torch.rand(layer.weight.shape, generator=generator) < 0.5)

    plain = sparse.to_dense()
    assert type(plain) is nn.LSTM and plain.proj_size == 3
    for name, layer in sparse.named_children():
        assert torch.equal(getattr(plain, f"weight_{name}"), layer.masked_weight())
        assert getattr(plain, f"weight_{name}") is not layer.weight
    torch.testing.assert_close(plain(x), sparse(x))

    # a plain nn.LSTM state dict loads (masks all True), and the sparse one round-trips
    fresh = SparseLSTM(INPUT, HIDDEN, dtype=torch.float64, **arguments)
    fresh.load_state_dict(plain.state_dict())
    assert all(layer.mask.all() for layer in fresh.children())
    torch.testing.assert_close(fresh(x), plain(x))
    again = SparseLSTM(INPUT, HIDDEN, dtype=torch.float64, **arguments)
    again.load_state_dict(sparse.state_dict())
    for loaded, saved in zip(again.children(), sparse.children()):
        assert torch.equal(loaded.mask, saved.mask) and torch.equal(loaded.weight, saved.weight)
        assert loaded.zero_off_mask
    torch.testing.assert_close(again(x), sparse(x))
    with pytest.raises(RuntimeError, match='Unexpected key.*"hr_l0.weight"'):
        SparseLSTM(INPUT, HIDDEN, dtype=torch.float64, **{**arguments, "proj_size": 0}).load_state_dict(
            sparse.state_dict())


def test_an_lstm_pruned_by_torch_loads_its_masks_and_pruned_weights(generator):
    dense = _dense(SparseLSTM, dict(num_layers=2), generator)
    for name in dense._flat_weights_names:
        if name.startswith("weight"):
            prune.random_unstructured(dense, name, 0.5)
    sparse = SparseLSTM(INPUT, HIDDEN, 2, dtype=torch.float64)
    sparse.load_state_dict(dense.state_dict())
    for name, layer in sparse.named_children():
        assert torch.equal(layer.mask, getattr(dense, f"weight_{name}_mask").bool())
        assert torch.equal(layer.weight, getattr(dense, f"weight_{name}")) and layer.zero_off_mask
    x = torch.randn(T, N, INPUT, dtype=torch.float64, generator=generator)
    torch.testing.assert_close(sparse(x), dense(x))


def _char_model(vocabulary=11, seed=0):
    torch.manual_seed(seed)
    return nn.ModuleDict({"embedding": nn.Embedding(vocabulary, 8), "rnn": nn.LSTM(8, 13, 2, batch_first=True),
                          "head": nn.Linear(13, vocabulary)})


def _logits(model, tokens):
    return model["head"](model["rnn"](model["embedding"](tokens))[0])


@contextlib.contextmanager
def _no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


@pytest.mark.parametrize("distribution", ["erk", "uniform"])
def test_sparsify_of_a_model_holding_an_lstm_sparsifies_each_weight_matrix(distribution, generator):
    model = _char_model()
    weights = dict(model.named_parameters())
    hooked = []
    model["rnn"].register_forward_hook(lambda *args: hooked.append(1))
    with _no_warning():
        sparsekern.sparsify(model, 0.3, distribution, generator=generator)
    assert isinstance(model["rnn"], SparseLSTM)
    layers = sparse_modules(model)
    assert [name for name, _ in layers] == ["rnn.ih_l0", "rnn.hh_l0", "rnn.ih_l1", "rnn.hh_l1", "head"]
    # the Parameters are the dense model's (an optimizer built before keeps training them)
    assert model["rnn"].hh_l1.weight is weights["rnn.weight_hh_l1"] and model["rnn"].ih_l0.bias is weights[
        "rnn.bias_ih_l0"]
    shapes = [tuple(module.weight.shape) for _, module in layers]
    densities = sparsekern.distributions.layer_densities(shapes, 0.3, distribution)
    assert [module.nnz for _, module in layers] == [round(d * math.prod(s)) for d, s in zip(densities, shapes)]
    for _, module in layers:
        assert not module.weight[~module.mask].any()
    tokens = torch.randint(11, (2, 6), generator=generator)
    dense = copy.deepcopy(model)
    dense["rnn"], dense["head"] = model["rnn"].to_dense(), model["head"].to_dense()
    torch.testing.assert_close(_logits(model, tokens), _logits(dense, tokens))
    assert hooked == [1]   # the hook moved to the sparse module (to_dense makes one without it)


def test_sparsify_matches_a_recurrent_module_by_its_own_name(generator):
    model = _char_model()
    with _no_warning():   # excluded by its name: silently dense
        sparsekern.sparsify(model, 0.5, exclude="rnn", generator=generator)
    assert type(model["rnn"]) is nn.LSTM and [name for name, _ in sparse_modules(model)] == ["head"]
    model = _char_model()
    sparsekern.sparsify(model, 0.5, include="rnn", generator=generator)
    assert isinstance(model["rnn"], SparseLSTM) and type(model["head"]) is nn.Linear
    # sparsify again: the converted module is matched by the name of the nn.LSTM it was
    masks = {name: module.mask.clone() for name, module in sparse_modules(model)}
    sparsekern.sparsify(model, 0.3, include=["rnn", "head"], exclude="rnn", generator=generator)
    for name, module in sparse_modules(model):
        assert name == "head" or torch.equal(module.mask, masks[name]), name
    sparsekern.sparsify(model, 0.3, include="rnn", generator=generator)
    assert not torch.equal(model["rnn"].ih_l0.mask, masks["rnn.ih_l0"])


def test_sparsify_converts_a_recurrent_module_at_the_root(generator):
    rnn = nn.GRU(INPUT, HIDDEN, bidirectional=True)
    sparse = sparsekern.sparsify(rnn, 0.5, generator=generator)
    assert isinstance(sparse, SparseGRU)
    assert [name for name, _ in sparse_modules(sparse)] == ["ih_l0", "hh_l0", "ih_l0_reverse", "hh_l0_reverse"]


def test_sparsify_leaves_subclasses_cells_and_computed_weights_dense_with_a_warning(generator):
    class Custom(nn.LSTM):
        pass
    model = nn.ModuleDict({"custom": Custom(4, 4), "cell": nn.LSTMCell(4, 4), "head": nn.Linear(4, 2)})
    with pytest.warns(UserWarning, match=r"custom \(Custom\): a subclass of nn.RNN, nn.LSTM or nn.GRU .*cell "
                                         r"\(LSTMCell\): recurrent cells have no sparse module"):
        sparsekern.sparsify(model, 0.5, generator=generator)
    assert type(model["custom"]) is Custom and isinstance(model["head"], SparseLinear)
    model = nn.ModuleDict({"rnn": nn.RNN(4, 4), "head": nn.Linear(4, 2)})
    torch.nn.utils.parametrizations.weight_norm(model["rnn"], "weight_hh_l0")
    with pytest.warns(UserWarning, match=r"rnn \(RNN\) stays dense: a weight or bias is computed"):
        sparsekern.sparsify(model, 0.5, generator=generator)
    assert isinstance(model["head"], SparseLinear) and not isinstance(model["rnn"], SparseRNN)
    with pytest.raises(TypeError, match="whose weights are Parameters, got weight_hh_l0 computed"):
        SparseRNN.from_dense(model["rnn"])
    with pytest.raises(TypeError, match="from_dense takes an nn.GRU, got LSTM"):
        SparseGRU.from_dense(nn.LSTM(4, 4))



def test_sparsify_leaves_a_recurrent_module_dense_whose_weight_is_tied_to_a_dense_layer(generator):
    # The warning names the module, which stays dense with all its weight matrices, not one of them.
    model = nn.ModuleDict({"rnn": nn.GRU(INPUT, HIDDEN), "tied": nn.Linear(INPUT, 3 * HIDDEN),
                           "head": nn.Linear(HIDDEN, 2)})
    model["tied"].weight = model["rnn"].weight_ih_l0
    with pytest.warns(UserWarning, match=r"^rnn \(GRU\) stays dense as a whole: its ih_l0 weight is tied to tied "
                                         r"\(Linear\), which is not sparsified"):
        sparsekern.sparsify(model, 0.5, exclude="tied", generator=generator)
    assert type(model["rnn"]) is nn.GRU and [name for name, _ in sparse_modules(model)] == ["head"]

def test_rigl_on_a_character_level_lstm_keeps_exact_counts_and_zeros_off_the_masks(generator, one_thread):
    vocabulary = 11
    model = _char_model(vocabulary)
    sparsekern.sparsify(model, 0.3, generator=generator)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    algorithm = sparsekern.RigL(model, optimizer, update_every=2, total_steps=20)
    layers = sparse_modules(model)
    counts = [module.nnz for _, module in layers]
    first_masks = [module.mask.clone() for _, module in layers]
    text = torch.randint(vocabulary, (32, 9), generator=generator)
    for step in range(6):
        rows = torch.randint(32, (8,), generator=generator)
        optimizer.zero_grad()
        _next_token_loss(model, text[rows], vocabulary).backward()
        algorithm.step()
        optimizer.step()
        assert [module.nnz for _, module in layers] == counts
        for name, module in layers:
            assert not module.weight[~module.mask].any(), name
            assert not module.weight.grad[~module.mask].any(), name
    moved = [not torch.equal(module.mask, first) for (_, module), first in zip(layers, first_masks)]
    assert all(moved[:4])   # every weight matrix of the LSTM was updated


def _next_token_loss(model, text, vocabulary=11):
    logits = _logits(model, text[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, vocabulary), text[:, 1:].reshape(-1))


def test_imp_and_optg_prune_a_character_level_lstm_like_any_other_layers(generator, one_thread):
    text = torch.randint(11, (16, 9), generator=generator)
    model = sparsekern.sparsify(_char_model(), 1.0, generator=generator)
    imp = sparsekern.IMP(model, lambda parameters: torch.optim.SGD(parameters, lr=0.1), prune_fraction=0.5)
    for _ in range(2):
        _next_token_loss(model, text).backward()
        imp.optimizer.step()
        imp.optimizer.zero_grad()
        imp.step()
    imp.next_cycle()
    layers = sparse_modules(model)
    total = sum(module.mask.numel() for _, module in layers)
    assert sum(module.nnz for _, module in layers) == total - math.ceil(0.5 * total)   # pruned globally
    assert all(not module.weight[~module.mask].any() for _, module in layers)

    # OptG keeps the pruned weights off its masks (zero_off_mask False): forward still computes with the masked ones
    model = sparsekern.sparsify(_char_model(), 1.0, generator=generator)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    optg = sparsekern.OptG(model, sparsity=0.5, epochs=2)
    for _ in range(2):
        for _ in range(2):
            _next_token_loss(model, text).backward()
            optg.step()
            optimizer.step()
            optimizer.zero_grad()
        optg.next_epoch()
    layers = sparse_modules(model)
    assert sum(module.nnz for _, module in layers) == total - round(0.5 * total)
    assert any(module.weight[~module.mask].any() for _, module in layers)
    dense = copy.deepcopy(model)
    dense["rnn"], dense["head"] = model["rnn"].to_dense(), model["head"].to_dense()
    torch.testing.assert_close(_logits(model, text), _logits(dense, text))


def test_a_sparsified_lstm_round_trips_through_a_checkpoint(tmp_path, generator):
    model = sparsekern.sparsify(_char_model(), 0.3, generator=generator)
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    other = sparsekern.sparsify(_char_model(seed=1), 0.3, generator=torch.Generator().manual_seed(5))
    other.load_state_dict(torch.load(path))
    for (_, loaded), (_, saved) in zip(sparse_modules(other), sparse_modules(model)):
        assert torch.equal(loaded.mask, saved.mask) and torch.equal(loaded.weight, saved.weight)
    tokens = torch.randint(11, (2, 6), generator=generator)
    torch.testing.assert_close(_logits(other, tokens), _logits(model, tokens))


def test_deepcopy_and_pickle_after_a_forward(generator):
    sparse = _sparse(_dense(SparseLSTM, dict(num_layers=2, proj_size=2), generator), generator, zero_off_mask=False)
    x = torch.randn(T, N, INPUT, dtype=torch.float64, generator=generator)
    output = sparse(x)[0]   # its graph alive: the module keeps none of it
    for copied in (copy.deepcopy(sparse), pickle.loads(pickle.dumps(sparse))):
        torch.testing.assert_close(copied(x)[0], output)
        assert all(not layer.zero_off_mask for layer in copied.children())


def test_torch_compile_runs_the_fused_op_eagerly_with_the_masked_weights(generator, fresh_compiler):
    # Dynamo's AOT backends fail on the fused recurrent ops (nn.LSTM's too): the op runs outside the graph.
    model = sparsekern.sparsify(_char_model(), 0.3, generator=generator)
    tokens = torch.randint(11, (2, 6), generator=generator)
    expected = _logits(model, tokens)
    compiled = torch.compile(_logits, backend="aot_eager")
    logits = compiled(model, tokens)
    torch.testing.assert_close(logits, expected)
    logits.square().sum().backward()
    for name, module in sparse_modules(model):
        assert module.weight.grad.abs().sum() > 0 and not module.weight.grad[~module.mask].any(), name


def test_torch_func_grad_of_functional_call_is_the_masked_gradient(generator):
    # Weights handed to functional_call hold values off the masks: the children take their masked path.
    cls, arguments, call = CONFIGS["gru_bidirectional_2_layers"]
    dense = _dense(cls, arguments, generator)
    sparse = _sparse(dense, generator)
    parameters = {key: torch.randn(value.shape, dtype=value.dtype, generator=generator)
                  for key, value in sparse.named_parameters()}
    x, _ = _inputs(sparse, {}, generator)
    grads = torch.func.grad(lambda p: torch.func.functional_call(sparse, p, (x,))[0].square().sum())(parameters)
    reference = copy.deepcopy(dense)
    with torch.no_grad():
        for key, value in parameters.items():
            layer, kind = key.split(".")
            mask = getattr(sparse, layer).mask
            getattr(reference, f"{kind}_{layer}").copy_(torch.where(mask, value, 0.0) if kind == "weight" else value)
    reference(x)[0].square().sum().backward()
    for key, grad in grads.items():
        layer, kind = key.split(".")
        expected = getattr(reference, f"{kind}_{layer}").grad
        torch.testing.assert_close(grad, torch.where(getattr(sparse, layer).mask, expected, 0.0)
                                   if kind == "weight" else expected, msg=key)


@pytest.mark.parametrize("name", ["lstm_proj_size", "gru_bidirectional_2_layers", "lstm"])
@pytest.mark.parametrize("zero_off_mask", [True, False])
def test_cpu_autocast_bfloat16_as_the_dense_module(name, zero_off_mask, generator):
    cls, arguments, call = CONFIGS[name]
    dense = _dense(cls, arguments, generator).float()
    sparse = _sparse(dense, generator, zero_off_mask)
    reference = _masked_dense(dense, sparse)
    x = torch.randn(T, N, INPUT, generator=generator)
    if sparse.batch_first:
        x = x.transpose(0, 1)
    outputs = []
    for module in (reference, sparse):
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                output = module(x)[0]
        except RuntimeError as error:   # oneDNN's bfloat16 LSTM needs CPU support: as the dense module does
            assert module is sparse or "LSTM" in str(error)
            with pytest.raises(RuntimeError, match=str(error)[:40]), torch.autocast("cpu", dtype=torch.bfloat16):
                sparse(x)
            return
        output.float().square().sum().backward()
        outputs.append(output)
    assert outputs[0].dtype == outputs[1].dtype
    torch.testing.assert_close(outputs[1], outputs[0])
    for layer_name, layer in sparse.named_children():
        assert layer.weight.grad.dtype == torch.float32
        # bfloat16 sums: the dense module's one cached cast of each weight accumulates its per-step gradients in
        # bfloat16, the sparse one in float32
        torch.testing.assert_close(layer.weight.grad, torch.where(
            layer.mask, getattr(reference, f"weight_{layer_name}").grad, 0.0), rtol=0.02, atol=0.02)


@pytest.mark.parametrize("arguments, error, message", [
    (dict(cls=SparseLSTM, input_size=0, hidden_size=4), ValueError, "input_size must be greater than zero"),
    (dict(cls=SparseLSTM, input_size=4, hidden_size=4.0), TypeError, "hidden_size should be of type int"),
    (dict(cls=SparseLSTM, input_size=4, hidden_size=4, proj_size=4), ValueError, "proj_size has to be smaller"),
    (dict(cls=SparseLSTM, input_size=4, hidden_size=4, dropout=2.0), ValueError, "dropout should be a number"),
    (dict(cls=SparseGRU, input_size=4, hidden_size=4, proj_size=2), ValueError, "proj_size argument is only"),
    (dict(cls=SparseRNN, input_size=4, hidden_size=4, nonlinearity="gelu"), ValueError, "Unknown nonlinearity"),
    (dict(cls=SparseRNN, input_size=4, hidden_size=4, batch_first=1), TypeError, "batch_first should be of type"),
])
def test_bad_arguments_get_the_dense_modules_errors(arguments, error, message):
    arguments = dict(arguments)
    cls = arguments.pop("cls")
    try:
        cls.dense_class(**arguments)
    except error as dense_error:
        assert re.search(message, str(dense_error)), dense_error
        with pytest.raises(error, match=re.escape(str(dense_error))):
            cls(**arguments)
    else:
        # torch 2.9's nn.RNNBase checks neither input_size > 0 nor batch_first's type (pytorch#166302 and
        # #166980, December 2025, added them): the sparse class accepts what the dense class accepts
        assert message in ("input_size must be greater than zero", "batch_first should be of type"), message
        cls(**arguments)


def test_bad_inputs_get_the_dense_modules_errors():
    sparse = SparseLSTM(INPUT, HIDDEN)
    with pytest.raises(RuntimeError, match="input.size\\(-1\\) must be equal to input_size"):
        sparse(torch.randn(T, N, INPUT + 1))
    with pytest.raises(RuntimeError, match=r"Expected hidden\[0\] size \(1, 3, 7\), got \[1, 2, 7\]"):
        sparse(torch.randn(T, N, INPUT), (torch.zeros(1, 2, HIDDEN), torch.zeros(1, N, HIDDEN)))
    # A double input: the dense module's ValueError, whose wording changed after torch 2.9
    double = torch.randn(T, N, INPUT, dtype=torch.float64)
    with pytest.raises(ValueError, match="dtype|type torch.float32") as dense_error:
        sparse.to_dense()(double)
    with pytest.raises(ValueError, match=re.escape(str(dense_error.value))):
        sparse(double)


def test_flatten_parameters_does_nothing_and_to_keeps_the_masks(generator):
    sparse = _sparse(_dense(SparseGRU, dict(), generator), generator)
    masks = [layer.mask.clone() for layer in sparse.children()]
    sparse.flatten_parameters()
    sparse.float()
    assert all(torch.equal(layer.mask, mask) and layer.weight.dtype == torch.float32
               for layer, mask in zip(sparse.children(), masks))
    x = torch.randn(T, N, INPUT, generator=generator)
    torch.testing.assert_close(sparse(x), sparse.to_dense()(x))


@pytest.mark.gpu
def test_on_cuda_the_unflattened_weights_do_not_warn(generator):
    cls, arguments, call = CONFIGS["lstm_bidirectional_2_layers"]
    dense = _dense(cls, arguments, generator).float()
    sparse = _sparse(dense, generator).cuda()
    reference = _masked_dense(dense, sparse).cuda()
    x = torch.randn(T, N, INPUT, generator=generator).cuda()
    with _no_warning():
        output = sparse(x)[0]
        output.square().sum().backward()
    expected = reference(x)[0]
    expected.square().sum().backward()
    torch.testing.assert_close(output, expected)
    for layer_name, layer in sparse.named_children():
        torch.testing.assert_close(layer.weight.grad, torch.where(
            layer.mask, getattr(reference, f"weight_{layer_name}").grad, 0.0))


def test_sparsify_carries_what_a_user_attached_to_a_recurrent_module_to_its_sparse_replacement(generator):
    """A learned initial state kept on the LSTM (a Parameter h0, a buffer c0), an attribute and a submodule, as
    sparsify carries them for a Linear, a convolution or an attention: they were dropped, silently (the
    parameters left model.parameters(), so an optimizer built after sparsify no longer trained them), and
    forward then failed on the missing h0. A carried submodule is no weight matrix of the LSTM; it is sparsified
    by its own name."""
    rnn = nn.LSTM(INPUT, HIDDEN, batch_first=True)
    rnn.h0 = nn.Parameter(torch.zeros(1, 1, HIDDEN))
    rnn.register_buffer("c0", torch.zeros(1, 1, HIDDEN), persistent=False)
    rnn.tag = "encoder"
    rnn.adapter = nn.Linear(HIDDEN, HIDDEN)
    h0, c0 = rnn.h0, rnn.c0
    model = sparsekern.sparsify(nn.ModuleDict({"rnn": rnn}), 0.5, generator=generator)
    sparse = model["rnn"]
    assert isinstance(sparse, SparseLSTM) and sparse.h0 is h0 and sparse.c0 is c0 and sparse.tag == "encoder"
    assert "rnn.c0" not in model.state_dict() and "rnn.h0" in dict(model.named_parameters())
    assert isinstance(sparse.adapter, sparsekern.nn.SparseLinear)
    assert [name for name, _ in sparse.named_projections()] == ["ih_l0", "hh_l0"]
    x = torch.randn(2, 3, INPUT, generator=generator)
    output, _ = sparse(x, (sparse.h0.expand(1, 2, HIDDEN).contiguous(), sparse.c0.expand(1, 2, HIDDEN).contiguous()))
    assert sparse.adapter(output).shape == (2, 3, HIDDEN)
    sparse.reset_parameters()   # over its weight matrices, not the adapter
