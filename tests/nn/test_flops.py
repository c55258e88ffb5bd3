"""sk.flops counted by hand: each weight entry (a sparse layer's active ones) times the positions it is applied at,
per layer and in total, in one forward that leaves the model's modes, buffers and hooks as they were."""
import copy

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import sparsekern as sk
from sparsekern.nn import SparseConv2d, SparseConvTranspose2d, SparseLinear


def _flops(model, *inputs, **kwargs):
    return sk.flops(model, *inputs, print_fn=None, **kwargs)


def _by_name(result) -> dict:
    return {row["name"]: row for row in result["layers"]}


def _hooks(model) -> list:
    return [name for name, m in model.named_modules() if m._forward_hooks]


def test_a_conv_net_is_counted_at_each_output_position_of_each_example():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1),                 # 9x9 -> 5x5; weight 8*3*3*3 = 216
        nn.ReLU(),
        nn.Conv2d(8, 4, 3, padding=2, dilation=2, groups=2),     # 5x5 -> 5x5; weight 4*(8/2)*3*3 = 144
        nn.Flatten(),
        nn.Linear(100, 10))                                      # weight 1000, one row per example
    result = _flops(model, torch.randn(2, 3, 9, 9))
    rows = _by_name(result)
    assert rows["0"]["dense_macs"] == 216 * 2 * 25
    assert rows["2"]["dense_macs"] == 144 * 2 * 25
    assert rows["4"]["dense_macs"] == 1000 * 2
    assert result["dense_macs"] == 10800 + 7200 + 2000 == result["sparse_macs"]
    assert result["ratio"] == 1.0 and all(row["density"] == 1.0 and row["calls"] == 1 for row in result["layers"])
    assert result["batch_size"] == 2 and result["dense_macs_per_example"] == 10000
    assert [row["name"] for row in result["layers"]] == ["0", "2", "4"]


def test_a_linear_layer_is_counted_at_each_row_of_a_3d_input():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    result = _flops(model, torch.randn(3, 5, 4))               # (B, T, F): 15 rows
    assert [row["dense_macs"] for row in result["layers"]] == [32 * 15, 16 * 15]
    assert result["batch_size"] == 3 and result["dense_macs_per_example"] == 720 // 3


def test_an_empty_batch_counts_no_mac_at_a_ratio_of_1():
    # Nothing computed, nothing saved: the ratio and each layer's density are 1, not 0 (a mutant returning 0 lived).
    model = sk.nn.sparsify(nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3)), density=0.5)
    result = sk.nn.flops(model, torch.zeros(0, 8), print_fn=None)
    assert result["dense_macs"] == result["sparse_macs"] == 0 and result["ratio"] == 1.0
    assert [layer["density"] for layer in result["layers"]] == [1.0, 1.0]


def test_a_single_unbatched_vector_is_counted_per_call():
    result = _flops(nn.Linear(3, 4), torch.randn(3))
    assert result["dense_macs"] == 12
    assert result["batch_size"] is None and result["dense_macs_per_example"] is None


def test_a_transposed_convolution_is_counted_at_each_input_position():
    dense = nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2)     # weight (4, 6/2, 3, 3): 108 entries
    x = torch.randn(2, 4, 5, 5)                                 # 2 x 25 input positions (the output is 11x11)
    assert _flops(dense, x)["dense_macs"] == 108 * 50
    sparse = SparseConvTranspose2d.from_dense(dense)
    mask = torch.rand(sparse.weight.shape, generator=torch.Generator().manual_seed(0)) < 0.3
    sparse.set_mask(mask)
    result = _flops(sparse, x)
    assert result["dense_macs"] == 108 * 50 and result["sparse_macs"] == int(mask.sum()) * 50


class _Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.Linear(4, 4)

    def forward(self, x):
        return self.block(torch.relu(self.block(x)))


def test_a_shared_module_is_counted_at_each_call():
    result = _flops(_Twice(), torch.randn(5, 4))
    assert result["layers"] == [{"name": "block", "type": "Linear", "calls": 2, "dense_macs": 2 * 16 * 5,
                                 "sparse_macs": 2 * 16 * 5, "density": 1.0}]
    shared = nn.Linear(4, 4)
    result = _flops(nn.Sequential(shared, nn.ReLU(), shared), torch.randn(5, 4))
    assert [(row["name"], row["calls"], row["dense_macs"]) for row in result["layers"]] == [("0", 2, 160)]


def _conv_net():
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(32 * 4 * 4, 10))


# Positions per layer of _conv_net on a (2, 3, 8, 8) batch: 2 x 8x8, 2 x 4x4, 2 rows.
_POSITIONS = {"0": 2 * 64, "3": 2 * 16, "6": 2}


def test_a_sparse_layer_counts_its_active_weights_at_the_same_positions():
    model = _conv_net()
    sk.sparsify(model, density=0.25, generator=torch.Generator().manual_seed(0))
    result = _flops(model, torch.randn(2, 3, 8, 8))
    rows = _by_name(result)
    for name, positions in _POSITIONS.items():
        layer = model.get_submodule(name)
        assert rows[name]["sparse_macs"] == layer.nnz * positions
        assert rows[name]["dense_macs"] == layer.weight.numel() * positions
        assert rows[name]["density"] == pytest.approx(layer.nnz / layer.weight.numel())
    assert result["sparse_macs"] == sum(model.get_submodule(n).nnz * p for n, p in _POSITIONS.items())
    assert result["not_counted"] == [{"name": "1", "type": "BatchNorm2d"}]


def test_the_ratio_of_an_erk_sparsified_model_is_its_active_weights_weighted_by_positions():
    model = _conv_net()
    sk.sparsify(model, density=0.1, distribution="erk", generator=torch.Generator().manual_seed(1))
    layers = [model[0], model[3], model[6]]
    assert all(isinstance(layer, (SparseConv2d, SparseLinear)) for layer in layers)
    positions = list(_POSITIONS.values())
    sparse = sum(int(layer.mask.sum()) * p for layer, p in zip(layers, positions))
    dense = sum(layer.mask.numel() * p for layer, p in zip(layers, positions))
    result = _flops(model, torch.randn(2, 3, 8, 8))
    assert result["ratio"] == pytest.approx(sparse / dense)
    assert result["ratio"] != pytest.approx(0.1)   # ERK keeps more of the small first layer, which runs the most


def test_attention_counts_its_projections_on_their_own_inputs():
    attention = nn.MultiheadAttention(8, 2, kdim=4, vdim=6)    # q 8x8, k 8x4, v 8x6, out 8x8
    query, key, value = torch.randn(3, 2, 8), torch.randn(5, 2, 4), torch.randn(5, 2, 6)
    expected = 64 * 6 + 32 * 10 + 48 * 10 + 64 * 6             # query: 6 tokens, key and value: 10
    result = _flops(attention, query, key, value)
    assert result["dense_macs"] == expected == result["sparse_macs"] and result["batch_size"] == 2
    model = nn.ModuleDict({"attention": attention})
    sk.sparsify(model, density=0.5, generator=torch.Generator().manual_seed(0))
    sparse = model["attention"]
    result = _flops(sparse, query=query, key=key, value=value)
    active = [int(p.mask.sum()) for p in (sparse.q_proj, sparse.k_proj, sparse.v_proj, sparse.out_proj)]
    assert result["dense_macs"] == expected
    assert result["sparse_macs"] == active[0] * 6 + active[1] * 10 + active[2] * 10 + active[3] * 6


def test_an_encoder_in_eval_mode_is_counted_layer_by_layer_and_the_fast_path_setting_restored():
    # Eligible for torch's fused kernel, which would pack the batch into a NestedTensor and skip the padding.
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=True).eval()
    padding = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    result = _flops(encoder, torch.randn(2, 5, 16), src_key_padding_mask=padding)
    rows = _by_name(result)
    assert rows["layers.0.self_attn"]["dense_macs"] == 4 * 256 * 10   # q, k, v, out: 16x16 at 2 x 5 tokens
    assert rows["layers.0.linear1"]["dense_macs"] == rows["layers.0.linear2"]["dense_macs"] == 512 * 10
    assert torch.backends.mha.get_fastpath_enabled()


def test_a_recurrent_layer_counts_every_matrix_at_each_step_without_the_padding():
    model = nn.Sequential(nn.GRU(4, 6, num_layers=2, batch_first=True))
    sk.sparsify(model, density=0.5, generator=torch.Generator().manual_seed(0))
    packed = pack_padded_sequence(torch.randn(3, 7, 4), [7, 5, 2], batch_first=True)   # 14 steps
    result = _flops(model, packed)
    matrices = [layer for _, layer in model[0].named_projections()]
    assert result["dense_macs"] == (18 * 4 + 18 * 6 + 18 * 6 + 18 * 6) * 14
    assert result["sparse_macs"] == sum(layer.nnz for layer in matrices) * 14
    assert result["batch_size"] == 3


def test_per_example_counts_of_sequences_of_several_lengths_are_not_truncated():
    # 5 steps of 2 sequences (3 and 2 long), each (3·2 + 3·3) MACs: 75, 37.5 an example (37 truncated).
    packed = pack_padded_sequence(torch.randn(2, 3, 2), [3, 2], batch_first=True)
    result = _flops(nn.Sequential(nn.RNN(2, 3, batch_first=True)), packed)
    assert (result["dense_macs"], result["batch_size"], result["dense_macs_per_example"]) == (75, 2, 37.5)


@pytest.mark.filterwarnings("ignore:LSTM with projections")   # oneDNN's note that it runs torch's own kernel
def test_an_lstm_counts_each_direction_and_its_projection():
    lstm = nn.LSTM(4, 6, bidirectional=True, proj_size=3)     # per direction: ih 24x4, hh 24x3, hr 3x6
    result = _flops(lstm, torch.randn(7, 2, 4))                # 14 steps, batch 2 (not batch_first)
    assert result["dense_macs"] == 2 * (96 + 72 + 18) * 14 and result["batch_size"] == 2


class _EmbeddingLSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding, self.lstm, self.head = nn.Embedding(20, 8), nn.LSTM(8, 6, batch_first=True), nn.Linear(6, 3)

    def forward(self, tokens):
        return self.head(self.lstm(self.embedding(tokens))[0])


def _encoder():
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    return nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), nn.LayerNorm(16),
                         nn.Linear(16, 4))


@pytest.mark.parametrize("make, example, uncounted", [
    (_encoder, torch.ones(2, 5, 16),
     ["0.layers.0.norm1", "0.layers.0.norm2", "0.layers.1.norm1", "0.layers.1.norm2", "1"]),
    (lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.PReLU(), nn.Dropout(), nn.Conv2d(8, 4, 1),
                           nn.GroupNorm(2, 4)), torch.ones(2, 3, 6, 6), ["1", "2", "5"]),
    (_EmbeddingLSTM, torch.tensor([[1, 2, 3], [4, 5, 6]]), ["embedding"]),
])
def test_a_sparsified_model_leaves_the_same_modules_uncounted_as_the_dense_one(make, example, uncounted):
    # Sparse attention, recurrent and linear layers are counted where their dense originals are: the normalisations,
    # activations and embeddings around them are listed alike.
    dense = make()
    sparse = sk.sparsify(copy.deepcopy(dense), density=0.5, generator=torch.Generator().manual_seed(0))
    assert [row["name"] for row in _flops(dense, example)["not_counted"]] == uncounted
    assert _flops(sparse, example)["not_counted"] == _flops(dense, example)["not_counted"]


def _model_in_mixed_modes():
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 2)).train()
    model[2].eval()
    return model


def test_modes_buffers_and_hooks_are_as_before():
    model = _model_in_mixed_modes()
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    modes = [m.training for m in model.modules()]
    _flops(model, torch.randn(6, 4))
    assert [m.training for m in model.modules()] == modes
    assert all(torch.equal(b, buffers[name]) for name, b in model.named_buffers())   # no running-stat update
    assert not _hooks(model)


def test_a_failing_forward_raises_torchs_error_with_the_hooks_removed_and_the_modes_restored():
    model = _model_in_mixed_modes()
    bad = torch.randn(6, 5)
    with pytest.raises(RuntimeError) as direct:
        model(bad)
    model = _model_in_mixed_modes()
    with pytest.raises(RuntimeError) as counted:
        _flops(model, bad)
    assert str(counted.value) == str(direct.value)
    assert not _hooks(model)
    assert [m.training for m in model.modules()] == [True, True, True, False, True]
    assert torch.backends.mha.get_fastpath_enabled()


def test_a_model_without_a_counted_layer_is_refused_with_its_hooks_removed():
    model = nn.Sequential(nn.LayerNorm(4), nn.ReLU())
    with pytest.raises(ValueError, match=r"no layer it counts.*\['0'\]"):
        _flops(model, torch.randn(2, 4))
    assert not _hooks(model)


def test_bad_arguments_are_refused_before_anything_runs():
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        sk.flops(lambda x: x, torch.randn(2))
    model = nn.Linear(2, 2)
    with pytest.raises(TypeError, match="print_fn must be callable"):
        sk.flops(model, torch.randn(2, 2), print_fn="table")
    meta = nn.Sequential(SparseLinear(2, 2, device="meta"))
    with pytest.raises(ValueError, match=r"layers \['0'\] are on the meta device"):
        sk.flops(meta, torch.randn(2, 2))
    with pytest.raises(ValueError, match=r"layers \['0'\] are on the meta device"):
        sk.flops(nn.Sequential(nn.Linear(2, 2, device="meta")), torch.randn(2, 2, device="meta"))
    assert not _hooks(meta)
    lazy = nn.Sequential(nn.LazyLinear(4))
    with pytest.raises(ValueError, match=r"lazy layers \['0'\] have no weights yet"):
        sk.flops(lazy, torch.randn(2, 3))
    assert isinstance(lazy[0], nn.LazyLinear) and not _hooks(lazy)


def test_the_table_is_printed_in_summarys_style():
    printed = []
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    sk.flops(model, torch.randn(3, 4), print_fn=printed.append)
    (table,) = printed
    lines = table.splitlines()
    assert lines[0].split() == ["layer", "type", "calls", "dense", "MACs", "sparse", "MACs", "density"]
    assert lines[2].split() == ["0", "Linear", "1", "96", "96", "1.0000"]
    assert lines[5].split() == ["total", "144", "144", "1.0000"]
    assert lines[6].split() == ["per", "example", "(batch", "3)", "48", "48"]
    assert lines[7] == "not counted: 1 (LayerNorm)"
