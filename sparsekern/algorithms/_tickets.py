"""What IMP and SWAMP share: global or layer-wise magnitude pruning, and rewinding to a snapshot.

A snapshot is the model's full state (parameters and buffers, BatchNorm statistics included)
except the masks, cloned; restoring it and then setting a mask gives the ticket θ_k ⊙ m.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .. import ops
from ..nn import SparseModule, sparse_modules

SCOPES = ("global", "layer")


def sparse_layers(model: nn.Module) -> list[SparseModule]:
    """The model's sparse modules; ValueError when there are none (nothing to prune)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    layers = [module for _, module in sparse_modules(model)]
    if not layers:
        raise ValueError("model has no sparse modules: convert it with sparsekern.sparsify(model, 1.0) "
                         "or build it from sparsekern.nn.SparseLinear / SparseConv2d")
    return layers


def check_fraction(prune_fraction) -> float:
    if isinstance(prune_fraction, bool) or not isinstance(prune_fraction, (int, float)):
        raise TypeError(f"prune_fraction must be a float, got {type(prune_fraction).__name__}")
    if not 0 < prune_fraction < 1:
        raise ValueError(f"prune_fraction must be in (0, 1), got {prune_fraction}")
    return float(prune_fraction)


def check_choice(value, name: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def check_count(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def removal_count(remaining: int, prune_fraction: float) -> int:
    """⌈p·remaining⌉, computed so that float error cannot push an exact product up by one."""
    return min(remaining, math.ceil(round(prune_fraction * remaining, 9)))


@torch.no_grad()
def magnitude_masks(layers: list[SparseModule], prune_fraction: float, scope: str) -> list[Tensor]:
    """Masks that keep all but ⌈p·remaining⌉ active weights, ranked by |weight|.

    `scope="global"` ranks every active weight of every layer together and removes
    ⌈p·(total active)⌉; `"layer"` removes ⌈p·(active in layer)⌉ from each layer. Inactive
    positions score NaN, which `topk_mask` never selects, so the new masks nest in the old ones.
    Ties follow `topk_mask` (lower flat position kept).
    """
    scores = [torch.where(layer.mask, layer.weight.abs(), torch.nan) for layer in layers]
    active = [int(layer.mask.sum()) for layer in layers]
    if scope == "global":
        total = sum(active)
        return ops.topk_mask(scores, total - removal_count(total, prune_fraction))
    return ops.topk_mask(scores, [n - removal_count(n, prune_fraction) for n in active])


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    """A clone of every parameter and buffer except the sparse modules' masks."""
    masks = {f"{name}.mask" if name else "mask" for name, _ in sparse_modules(model)}
    return {name: value.detach().clone() for name, value in model.state_dict(keep_vars=True).items()
            if name not in masks}


@torch.no_grad()
def restore(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Copies a `snapshot` back in place (the masks, and so the zeros they impose, are not set)."""
    current = model.state_dict(keep_vars=True)
    for name, value in state.items():
        current[name].copy_(value)


def set_masks(layers: list[SparseModule], masks: list[Tensor]) -> None:
    for layer, mask in zip(layers, masks):
        layer.set_mask(mask)


def masks_of(layers: list[SparseModule]) -> list[Tensor]:
    return [layer.mask.clone() for layer in layers]
