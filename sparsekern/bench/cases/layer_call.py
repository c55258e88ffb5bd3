"""A sparse layer's fixed cost per call: forward and backward of a layer so small that its products cost next
to nothing, against the dense layer's (the baseline). What is left is what a training step pays per sparse
layer and call over the dense layer, whatever the layer's size: the Python side (the module's forward, the
zero-off-mask checks, the op's dispatch) and the C++ autograd Function's node and in-place gradient mask.

Layers: a linear 16 -> 16 at batch 4 and a 1x1 convolution 4 -> 4 on one 4x4 image, at density 0.5. Runs:
"dense" (nn.Linear / nn.Conv2d), "sparse, static" (weight 0 off the mask: the dense kernel on the weight, the
weight gradient masked in place) and "sparse, masked path" (where(mask, weight, 0) first; the layer also
carries the no-op forward pre-hook that keeps torch's fused Transformer kernel off it, so each call takes
nn.Module's hook path). A call is forward, sum, backward into the weight's gradient (accumulated).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ...nn import sparse_modules, sparsify
from ..core import Case

OPS = ("layer call",)

DENSITY = 0.5
DENSE, STATIC, MASKED = "dense", "sparse, static", "sparse, masked path"

LAYERS = [("linear 16 -> 16, batch 4", lambda: nn.Linear(16, 16), (4, 16)),
          ("conv 1x1 4 -> 4, 1x4x4x4", lambda: nn.Conv2d(4, 4, 1), (1, 4, 4, 4))]


def _forward_backward(layer: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def run():
        layer(x).sum().backward()
    return run


def _case(description: str, build: Callable[[], nn.Module], input_shape, device: torch.device) -> Case:
    x = torch.randn(input_shape, generator=torch.Generator(device=device).manual_seed(0), device=device)

    def layer(sparse: bool) -> nn.Module:
        torch.manual_seed(0)
        # In a container: sparsify replaces the layers it holds.
        built = nn.Sequential(build().to(device))
        return (sparsify(built, DENSITY, generator=torch.Generator().manual_seed(0)) if sparse else built)[0]

    layers = {DENSE: layer(False), STATIC: layer(True), MASKED: layer(True)}
    for _, module in sparse_modules(layers[MASKED]):
        module.zero_off_mask = False
    return Case("layer call", f"{description}, d={DENSITY}", {name: _forward_backward(module, x)
                                                             for name, module in layers.items()}, baseline=DENSE)


def cases(device: torch.device, quick: bool) -> list[Case]:
    return [_case(description, build, shape, device) for description, build, shape in LAYERS]
