"""SWA's weight average: one `update_parameters` of a ResNet-50-shaped model (its 54 conv/linear weights, each
conv followed by a BatchNorm2d; ERK at density 0.1), the sparse one's under `SparseAveragedModel` against the
dense one's under torch's AveragedModel (the baseline; on CPU torch runs SWA one tensor at a time).

- "SparseAveragedModel (SWA)": the default average, three multi-tensor calls over all the weights;
- "SparseAveragedModel, avg_fn=get_swa_avg_fn()": the same average through torch's one-tensor form, a few
  Python-side ops per tensor (the default's form before it went multi-tensor; the results are equal bit for bit).

Every call averages one more time (n_averaged grows), on models that never train: the values do not matter.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.optim import swa_utils

from ...nn import SparseAveragedModel, sparsify
from ..core import Case
from ..shapes import RESNET50, RESNET50_TINY

OPS = ("SWA update_parameters",)

DENSITY = 0.1


def resnet50_shaped(shapes, device: torch.device) -> nn.Module:
    """A conv (with a BatchNorm2d after it) or linear layer per weight shape: the parameters and buffers of a
    ResNet-50 without its forward."""
    layers = nn.Sequential()
    for _, shape in shapes:
        if len(shape) == 4:
            layers.append(nn.Conv2d(shape[1], shape[0], shape[2:], bias=False, device=device))
            layers.append(nn.BatchNorm2d(shape[0], device=device))
        else:
            layers.append(nn.Linear(shape[1], shape[0], device=device))
    return layers


def cases(device: torch.device, quick: bool) -> list[Case]:
    shapes = RESNET50_TINY if quick else RESNET50
    torch.manual_seed(0)
    dense = resnet50_shaped(shapes, device)
    sparse = sparsify(resnet50_shaped(shapes, device), DENSITY, init="dense",
                      generator=torch.Generator().manual_seed(0))
    averages = {
        "torch AveragedModel (dense model)": (swa_utils.AveragedModel(dense), dense),
        "SparseAveragedModel (SWA)": (SparseAveragedModel(sparse), sparse),
        "SparseAveragedModel, avg_fn=get_swa_avg_fn()": (
            SparseAveragedModel(sparse, avg_fn=swa_utils.get_swa_avg_fn()), sparse),
    }
    for average, model in averages.values():
        average.update_parameters(model)   # the first update copies; every later one averages
    runs = {label: (lambda average=average, model=model: average.update_parameters(model))
            for label, (average, model) in averages.items()}
    parameters = list(dense.parameters())
    size = (f"{'resnet50/16' if quick else 'resnet50'} conv+BN, {sum(p.numel() for p in parameters) / 1e6:.3g}M "
            f"parameters in {len(parameters)} tensors, d={DENSITY}")
    return [Case("SWA update_parameters", size, runs, baseline=next(iter(runs)))]
