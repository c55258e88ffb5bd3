"""sparsekern inside the training workflows written around it with standard PyTorch practice: each test
runs a small loop as a researcher would and checks it against what a correct library must do (masks at
their density, weights 0 off the mask where promised, results equal to an equivalent reference)."""
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
