"""The gradient-flow metric worked out by hand: ||g ⊙ m||_2 over every trainable parameter (sparse weights under
their masks; biases, norm layers and dense layers in full), per layer and in total, from the loss alone."""
import math

import pytest
import torch
from torch import nn

import sparsekern
from sparsekern.nn import SparseLinear


def _model():
    """x ∈ R² -> SparseLinear(2, 2) -> BatchNorm1d (eval: running mean 0, variance + eps = 1, so u = γh + β)
    -> Linear(2, 1)."""
    sparse = SparseLinear(2, 2)
    # eps 0.5 with running variance 0.5 divides by exactly 1: torch < 2.13 refuses eps 0 even in eval.
    norm = nn.BatchNorm1d(2, eps=0.5)
    dense = nn.Linear(2, 1)
    with torch.no_grad():
        sparse.weight.copy_(torch.tensor([[2.0, 0.0], [1.0, -1.0]]))
        sparse.bias.copy_(torch.tensor([1.0, 0.0]))
        norm.weight.copy_(torch.tensor([2.0, 1.0]))
        norm.bias.copy_(torch.tensor([0.0, 1.0]))
        norm.running_var.fill_(0.5)
        dense.weight.copy_(torch.tensor([[1.0, 1.0]]))
        dense.bias.copy_(torch.tensor([-1.0]))
    sparse.set_mask(torch.tensor([[True, False], [True, True]]))
    return nn.Sequential(sparse, norm, dense).eval()


def _half_squared_error(output, target):
    return 0.5 * ((output - target) ** 2).sum()


BATCH = (torch.tensor([[1.0, 2.0]]), torch.tensor([[2.0]]))
# x = (1, 2): h = W₁x + b₁ = (2 + 1, 1 - 2) = (3, -1); u = (2·3, -1 + 1) = (6, 0); z = 6 + 0 - 1 = 5; δ = z - t = 3.
# Linear: ∂W₂ = δu = (18, 0), ∂b₂ = 3: 18² + 3² = 333.
# BatchNorm: ∂u = δW₂ = (3, 3); ∂γ = ∂u·h = (9, -3), ∂β = (3, 3): 81 + 9 + 9 + 9 = 108.
# SparseLinear: ∂h = ∂u·γ = (6, 3); ∂W₁ = ∂h xᵀ = [[6, 12], [3, 6]], under the mask [[6, 0], [3, 6]]: 36 + 9 + 36;
# ∂b₁ = (6, 3): 36 + 9. In all 126.
BY_HAND = {"0": math.sqrt(126), "1": math.sqrt(108), "2": math.sqrt(333)}


@pytest.mark.parametrize("dense_grad", [False, True])
def test_gradient_flow_by_hand_per_layer_and_in_total(dense_grad):
    model = _model()
    model[0].dense_grad = dense_grad   # the masked norm leaves out the inactive entry's 12 either way
    flow = sparsekern.gradient_flow(model, _half_squared_error, BATCH)
    assert flow["layers"] == pytest.approx(BY_HAND, rel=1e-12)
    assert flow["total"] == pytest.approx(math.sqrt(126 + 108 + 333), rel=1e-12)


def test_gradient_flow_leaves_out_frozen_parameters_only():
    model = _model()
    model[1].weight.requires_grad_(False)   # γ: 9² + 3² no longer counted
    model[2].bias.requires_grad_(False)     # b₂: 3²
    flow = sparsekern.gradient_flow(model, _half_squared_error, BATCH)
    assert flow["layers"] == pytest.approx({"0": math.sqrt(126), "1": math.sqrt(18), "2": math.sqrt(324)}, rel=1e-12)
    assert flow["total"] == pytest.approx(math.sqrt(126 + 18 + 324), rel=1e-12)


def test_gradient_flow_is_of_the_loss_alone_whatever_the_optimizer_and_gradients_hold():
    # Weight decay lives in the optimizer, which the metric never sees; gradients already accumulated (with a
    # decay term added to them, say) are neither read nor changed.
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=0.5)
    _half_squared_error(model(BATCH[0]), BATCH[1]).backward()
    for parameter in model.parameters():
        parameter.grad.add_(parameter.detach(), alpha=0.5)
    held = [parameter.grad.clone() for parameter in model.parameters()]
    flow = sparsekern.gradient_flow(model, _half_squared_error, BATCH)
    assert flow["total"] == pytest.approx(math.sqrt(126 + 108 + 333), rel=1e-12)
    assert all(torch.equal(parameter.grad, grad) for parameter, grad in zip(model.parameters(), held))
    assert optimizer.param_groups[0]["weight_decay"] == 0.5
