"""Pruning and growth criteria of dynamic sparse training, as scores (higher is kept).

A pruning criterion scores the entries of a list of weights; a mask update keeps the active
entries with the highest scores and drops the others (`sparsekern.ops.prune_grow` keeps
`active - n` per layer, the global scope one selection over the whole list). A growth criterion
scores entries for growth; the update grows the highest-scoring entries not kept. Scores at
inactive positions are ignored by pruning and scores at kept positions by growth.

Every criterion has the signature
    criterion(weights, grads, masks, *, generator, gamma) -> list[Tensor]
over lists of one length: `weights` float tensors, `grads` the current batch's dense gradients
shaped like them (None entries allowed for criteria that do not read gradients), `masks` the
current bool masks; `generator` a torch.Generator on the weights' device (random criteria draw
from it, in list order), `gamma` MEST's gradient coefficient. Every criterion but `set` is
elementwise; `set` ranks weights over the whole list, so a per-layer update passes one layer.
Divisions are guarded by EPSILON = 1e-8. Definitions: Nowak et al. 2023 ("Fantastic Weights and
How to Find Them"), RigL (Evci et al. 2020), SET (Mocanu et al. 2018), MEST (Yuan et al. 2021).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

EPSILON = 1e-8

Criterion = Callable[..., list[Tensor]]


# The elementwise criteria are computed for the whole list in one batched pass each
# (torch._foreach_*), not one torch call per layer.


def _each(function, tensors: list[Tensor], *others) -> list[Tensor]:
    """function (a torch._foreach_* op) over lists, which may be empty."""
    return list(function(tensors, *others)) if tensors else []


def magnitude(weights, grads, masks, *, generator=None, gamma=1.0) -> list[Tensor]:
    """|θ|: drops the active weights closest to zero (RigL)."""
    return _each(torch._foreach_abs, list(weights))


def mest(weights, grads, masks, *, generator=None, gamma=1.0) -> list[Tensor]:
    """|θ| + γ|g| (MEST, γ = 1 by default)."""
    return _each(torch._foreach_add, magnitude(weights, grads, masks), _each(torch._foreach_mul, gradient(
        weights, grads, masks), gamma))


def snip(weights, grads, masks, *, generator=None, gamma=1.0) -> list[Tensor]:
    """|θ·g| (SNIP's saliency)."""
    return _each(torch._foreach_abs, _each(torch._foreach_mul, list(weights), list(grads)))


def sensitivity(weights, grads, masks, *, generator=None, gamma=1.0) -> list[Tensor]:
    """|g| / (|θ| + ε)."""
    return _each(torch._foreach_div, gradient(weights, grads, masks),
                 _each(torch._foreach_add, magnitude(weights, grads, masks), EPSILON))


def rsensitivity(weights, grads, masks, *, generator=None, gamma=1.0) -> list[Tensor]:
    """|θ| / (|g| + ε), the reciprocal of sensitivity."""
    return _each(torch._foreach_div, magnitude(weights, grads, masks),
                 _each(torch._foreach_add, gradient(weights, grads, masks), EPSILON))


def random(weights, grads, masks, *, generator=None, gamma=1.0) -> list[Tensor]:
    """Uniform random scores: drops (or grows) a uniformly random set of exactly n entries."""
    return [torch.rand(w.shape, generator=generator, device=w.device, dtype=torch.float32)
            for w in weights]


def set_rule(weights, grads, masks, *, generator=None, gamma=1.0) -> list[Tensor]:
    """SET (Mocanu et al. 2018): drop the ⌈n/2⌉ smallest positive weights and the ⌊n/2⌋ negative
    weights closest to zero, for whatever n the update asks, expressed as one score.

    This is the rule of the paper. The Fantastic Weights repository's `SET` option ranks the
    negative half the wrong way round (it drops the most negative weights); its `SET_fixed`
    option is this rule.

    Among active entries (over the whole list, row-major in list order) the i-th smallest
    non-negative weight (0-based; ties by lower position) scores 2i and the i-th negative weight
    closest to zero scores 2i + 1. The n lowest scores are then 0..n-1 whenever both halves are
    large enough: ⌈n/2⌉ non-negative and ⌊n/2⌋ negative weights. When one half runs out, every
    score beyond it belongs to the other half, so the rest of the n is taken from there. Zeros
    (grown weights start at 0) count as the smallest non-negative weights; NaN weights score NaN
    (dropped first by prune_grow). Inactive entries score +inf. Scores are float32 while the
    ranks fit its 24-bit mantissa, float64 beyond.
    """
    if not weights:
        return []
    flat_weight = torch.cat([w.detach().reshape(-1) for w in weights])
    flat_mask = torch.cat([m.reshape(-1) for m in masks])
    dtype = torch.float32 if 2 * flat_weight.numel() <= 2 ** 24 else torch.float64
    score = torch.full(flat_weight.shape, float("inf"), dtype=dtype, device=flat_weight.device)
    score[flat_mask & torch.isnan(flat_weight)] = float("nan")
    for half, offset, descending in ((flat_mask & (flat_weight >= 0), 0, False),
                                     (flat_mask & (flat_weight < 0), 1, True)):
        positions = half.nonzero().squeeze(1)
        order = torch.sort(flat_weight[positions], descending=descending, stable=True).indices
        score[positions[order]] = (2 * torch.arange(order.numel(), device=score.device) + offset).to(dtype)
    return [part.view(w.shape) for part, w in zip(score.split([w.numel() for w in weights]), weights)]


def gradient(weights, grads, masks, *, generator=None, gamma=1.0) -> list[Tensor]:
    """|g| (RigL's growth: the largest dense gradients among inactive entries)."""
    return _each(torch._foreach_abs, list(grads))


PRUNE: dict[str, Criterion] = {
    "magnitude": magnitude, "set": set_rule, "mest": mest, "snip": snip,
    "sensitivity": sensitivity, "rsensitivity": rsensitivity, "random": random,
}
GROW: dict[str, Criterion] = {"gradient": gradient, "random": random}
# Criteria whose score is |x| of an input x, by what x is among (weights, grads): the mask ops can
# rank x by magnitude themselves (prune_grow's prune_abs / grow_abs), so no score tensor is made.
MAGNITUDE_OF: dict[str, Callable[[list[Tensor], list[Tensor]], list[Tensor]]] = {
    "magnitude": lambda weights, grads: list(weights), "gradient": lambda weights, grads: list(grads)}
# Criteria whose score reads the gradient: the update step needs grads for them.
READS_GRADIENT = frozenset({"mest", "snip", "sensitivity", "rsensitivity", "gradient"})
# Criteria that score entries one by one: summing their scores per block is meaningful.
ELEMENTWISE = frozenset(PRUNE) - {"set"}


def lookup(name, table: dict[str, Criterion], argument: str) -> Criterion:
    """The criterion called `name` in `table`, or a TypeError/ValueError naming `argument`."""
    if not isinstance(name, str):
        raise TypeError(f"{argument} must be a str, got {type(name).__name__}")
    if name not in table:
        raise ValueError(f"{argument} must be one of {sorted(table)}, got {name!r}")
    return table[name]

