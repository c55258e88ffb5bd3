"""SparseLinear's inference mode: forward through pack + sparse_linear matches the training forward."""
import warnings

import pytest
import torch

from sparsekern import ops
from sparsekern.nn import SparseLinear, to_inference


def sparse_layer(generator, in_features, out_features, density, dtype=torch.float32):
    layer = SparseLinear(in_features, out_features, dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(out_features, in_features, generator=generator))
        layer.bias.copy_(torch.randn(out_features, generator=generator))
    layer.set_mask(torch.rand(out_features, in_features, generator=generator) < density)
    return layer


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("density", [0.0, 0.03, 0.3, 1.0])
@pytest.mark.parametrize("batch", [(1,), (4,), (16,), (2, 3)])
def test_inference_forward_matches_training_forward(generator, monkeypatch, dtype, tolerance, density, batch):
    # Force the sparse kernel path as well as the fallback: both must give the same function.
    monkeypatch.setitem(ops.SPARSE_LINEAR_LIMITS, "cpu", {"dtypes": (dtype,), "min_rows": 0,
                                                          "max_density_by_rows": ((10**9, 1.0),)})
    layer = sparse_layer(generator, 70, 33, density, dtype)
    x = torch.randn(*batch, 70, generator=generator).to(dtype)
    with torch.no_grad():
        expected = layer(x).double()
        layer.to_inference()
        assert layer.packed is not None and layer.packed.values.numel() == layer.nnz
        torch.testing.assert_close(layer(x).double(), expected, atol=tolerance, rtol=tolerance)
        monkeypatch.setitem(ops.SPARSE_LINEAR_LIMITS, "cpu", {"dtypes": (), "min_rows": 1,
                                                              "max_density_by_rows": ()})
        torch.testing.assert_close(layer(x).double(), expected, atol=tolerance, rtol=tolerance)


def test_inference_mode_follows_the_module_and_keeps_the_state_dict(generator):
    layer = sparse_layer(generator, 40, 8, 0.2)
    keys = set(layer.state_dict())
    layer.to_inference()
    assert set(layer.state_dict()) == keys
    layer.to(torch.float64)
    assert layer.packed.dtype == torch.float64 and layer.packed.bitmap.dtype == torch.int32
    x = torch.randn(3, 40, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.masked_weight(), layer.bias))
    assert layer.to_training().packed is None
    assert layer(x).requires_grad  # back on masked_linear, with autograd


def test_inference_mode_keeps_one_packed_weight_until_its_buffers_change(generator):
    layer = sparse_layer(generator, 40, 8, 0.2).to_inference()
    assert layer.packed is layer.packed  # the dense fallback's unpacked weight lasts across calls
    before = layer.packed
    layer.to(torch.float64)
    assert layer.packed is not before and layer.packed.dtype == torch.float64


def test_replaced_inference_buffers_are_checked(generator):
    # The packed buffers are plain buffers: a PackedWeight made from replaced ones is checked again.
    layer = sparse_layer(generator, 70, 5, 0.5).to_inference()
    layer.packed_values = layer.packed_values[:2].clone()
    with pytest.raises(ValueError, match="values has 2 entries"):
        layer(torch.randn(1, 70, generator=generator))


def test_a_layer_in_inference_mode_says_so_when_printed(generator):
    layer = sparse_layer(generator, 40, 8, 0.25)
    training = repr(layer)
    assert repr(layer.to_inference()) == training[:-1] + ", inference)"
    assert repr(layer.to_training()) == training


@pytest.mark.parametrize("rows", [1, 4])   # the dense fallback (1 row), the sparse kernel where it runs (4)
def test_layers_in_inference_mode_chain_under_autocast(generator, rows):
    # The dense fallback ran F.linear in autocast's dtype: a bfloat16 output, which the next layer refused.
    first, second = sparse_layer(generator, 70, 40, 0.03), sparse_layer(generator, 40, 5, 0.03)
    x = torch.randn(rows, 70, generator=generator)
    with torch.no_grad():
        expected = second(torch.relu(first(x)))
    first.to_inference(), second.to_inference()
    with torch.autocast("cpu", torch.bfloat16):
        got = second(torch.relu(first(x)))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected)


def test_a_layer_in_inference_mode_takes_autocasts_output_of_the_layer_before(generator):
    # A convolution (or attention, or LSTM) under autocast answers in bfloat16: the layer after it raised TypeError.
    conv, linear = torch.nn.Conv2d(3, 4, 3), sparse_layer(generator, 4 * 4 * 4, 5, 0.03)
    x = torch.randn(2, 3, 6, 6, generator=generator)
    with torch.autocast("cpu", torch.bfloat16):
        expected = linear(conv(x).flatten(1))
        linear.to_inference()
        got = linear(conv(x).flatten(1))
    torch.testing.assert_close(got, expected.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("called", [False, True])
@pytest.mark.parametrize("rows", [1, 4])   # the dense fallback (1 row), the sparse kernel where it runs (4)
def test_torch_jit_trace_of_a_layer_in_inference_mode_gives_its_outputs(generator, rows, called):
    # Traced before its first call, the fallback's unpacked weight, made and kept at that call, was recorded in the
    # first graph and a constant in the trace's check's: TracingCheckError ("Graphs differed across invocations").
    layer = sparse_layer(generator, 70, 33, 0.03).to_inference()
    x = torch.randn(rows, 70, generator=generator)
    with torch.no_grad():
        if called:
            layer(x)
        traced = torch.jit.trace(layer, x)
        for batch in (1, 4, 16):
            other = torch.randn(batch, 70, generator=generator)
            torch.testing.assert_close(traced(other), layer(other))


@pytest.mark.parametrize("backend", ["reference", "compiled"])
@pytest.mark.parametrize("rows", [1, 4])   # the dense fallback (1 row), the sparse kernel where it runs (4)
def test_torch_jit_trace_of_a_model_in_inference_mode_warns_nothing(generator, use_backend, backend, rows):
    # Loop 29: sparse_linear's checks and kernel choice (and the reference's check of the pack) read sizes, which a
    # trace holds as tensors, as Python bools: a TracerWarning per read, per layer.
    use_backend(backend, "sparse_linear")
    model = torch.nn.Sequential(sparse_layer(generator, 70, 33, 0.03), torch.nn.ReLU(),
                                sparse_layer(generator, 33, 5, 0.3))
    to_inference(model)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", torch.jit.TracerWarning)
        traced = torch.jit.trace(model, torch.randn(rows, 70, generator=generator))
        x = torch.randn(rows, 70, generator=generator)
        torch.testing.assert_close(traced(x), model(x))


def test_torch_export_refuses_inference_mode_by_name_and_exports_training_mode(generator):
    layer = sparse_layer(generator, 70, 33, 0.03).to_inference()
    x = torch.randn(4, 70, generator=generator)
    with pytest.raises(RuntimeError, match=r"^a SparseLinear in inference mode \(to_inference\(\)\) cannot be "):
        torch.export.export(layer, (x,))
    expected = layer(x)
    torch.testing.assert_close(torch.export.export(layer.to_training(), (x,)).module()(x), expected)
