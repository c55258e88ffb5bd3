"""help() of every sparse layer class starts with a docstring of its own, not torch's docs of the dense class."""
import inspect
import pydoc

import pytest
from torch import nn

import sparsekern as sk

LAYERS = {sk.nn.SparseLinear: nn.Linear, sk.nn.SparseConv1d: nn.Conv1d, sk.nn.SparseConv2d: nn.Conv2d,
          sk.nn.SparseConv3d: nn.Conv3d, sk.nn.SparseConvTranspose1d: nn.ConvTranspose1d,
          sk.nn.SparseConvTranspose2d: nn.ConvTranspose2d, sk.nn.SparseConvTranspose3d: nn.ConvTranspose3d,
          sk.nn.SparseMultiheadAttention: nn.MultiheadAttention, sk.nn.SparseRNN: nn.RNN,
          sk.nn.SparseLSTM: nn.LSTM, sk.nn.SparseGRU: nn.GRU}


@pytest.mark.parametrize("layer", LAYERS, ids=lambda layer: layer.__name__)
def test_help_starts_with_the_layers_own_docstring(layer):
    own = layer.__dict__.get("__doc__") or ""
    assert len(own.splitlines()) >= 8, "a docstring of its own, more than a line"
    for subject in ("mask", "zero_off_mask", "from_dense", "to_dense", "More:"):   # what to read next, too
        assert subject in own, subject
    render = pydoc.render_doc(layer, renderer=pydoc.plaintext)
    # Its own text first, and none of the dense class's docstring (pulled in by `dense_class` before): only the
    # inherited methods' lines of torch's nn.Module follow.
    assert render.index(own.splitlines()[0]) < render.index("Method resolution order")
    dense_doc = inspect.getdoc(LAYERS[layer])
    assert dense_doc.splitlines()[0] not in render
    assert sum(line in render for line in dense_doc.splitlines() if len(line) > 40) <= 2


@pytest.mark.parametrize("layer", [layer for layer in LAYERS if layer is not sk.nn.SparseLinear],
                         ids=lambda layer: layer.__name__)
def test_dense_class_reads_as_the_dense_class(layer):
    assert layer.dense_class is LAYERS[layer]
    instance = layer.__new__(layer)   # an instance reads it too, unbuilt: no arguments to guess
    assert instance.dense_class is LAYERS[layer]
    assert "the dense class this one sparsifies" in pydoc.render_doc(layer, renderer=pydoc.plaintext)
