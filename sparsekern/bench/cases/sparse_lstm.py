"""SparseLSTM forward+backward: torch's fused LSTM on the weights themselves, their gradients masked (what a
sparse LSTM does while its weights are 0 off the masks), on the masked weights (its masked path, for weights
that are not), with nn.LSTM as the baseline.

Sizes: character-level language models (RigL's and Selfish-RNN's kind): an embedding of 128 into a 2-layer
LSTM of 256 (CPU) or 1024 (CUDA) over 50 or 100 characters, and a 1-layer LSTM of 512 (CPU) or 2048 (CUDA).

Forward+backward takes the gradients of the input and every weight with `torch.autograd.grad` (no `.grad`
accumulation timed).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ...nn import SparseLSTM
from ..core import Case

OPS = ("sparse lstm forward+backward",)

DENSITY = 0.1
# (batch, sequence length, input size, hidden size, layers)
SIZES = {"cpu": [(16, 50, 128, 256, 2), (16, 50, 128, 512, 1)],
         "cuda": [(64, 100, 128, 1024, 2), (64, 100, 128, 2048, 1)]}
QUICK_SIZES = [(2, 5, 8, 8, 2)]


def _forward_backward(module: nn.Module, x, grad_out):
    weights = [parameter for name, parameter in module.named_parameters() if "weight" in name]

    def run():
        y = module(x)[0]
        return torch.autograd.grad(y, [x, *weights], grad_out)
    return run


def _case(device, generator, batch, length, input_size, hidden_size, layers) -> Case:
    sparse = SparseLSTM(input_size, hidden_size, layers, batch_first=True, device=device)
    for layer in sparse.children():
        layer.set_mask(torch.rand(layer.weight.shape, generator=generator, device=device) < DENSITY)
    masked_path = copy.deepcopy(sparse)
    for layer in masked_path.children():
        layer.zero_off_mask = False
    x = torch.randn(batch, length, input_size, generator=generator, device=device, requires_grad=True)
    grad_out = torch.randn(batch, length, hidden_size, generator=generator, device=device)
    runs = {"SparseLSTM (fused LSTM on the weights, gradients masked)": sparse,
            "SparseLSTM, masked path (fused LSTM on the masked weights)": masked_path,
            "torch dense nn.LSTM": sparse.to_dense()}
    return Case("sparse lstm forward+backward",
                f"{batch}x{length}x{input_size} -> {layers}x{hidden_size}, d={DENSITY}",
                {label: _forward_backward(module, x, grad_out) for label, module in runs.items()},
                baseline="torch dense nn.LSTM")


def cases(device: torch.device, quick: bool) -> list[Case]:
    generator = torch.Generator(device=device).manual_seed(0)
    sizes = QUICK_SIZES if quick else SIZES.get(device.type, SIZES["cpu"])
    return [_case(device, generator, *size) for size in sizes]
