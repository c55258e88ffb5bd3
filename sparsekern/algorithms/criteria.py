"""Pruning and growth criteria of dynamic sparse training, as scores (higher is kept).

A pruning criterion scores the entries of a list of weights; a mask update keeps the active
entries with the highest scores and drops the others (`sparsekern.ops.prune_grow` keeps
`active - n` per layer, the global scope one selection over the whole list). A growth criterion
scores entries for growth; the update grows the highest-scoring entries not kept. Scores at
inactive positions are ignored by pruning and scores at kept positions by growth.

Every criterion has the signature
    criterion(weights, grads, masks, *, generator, gamma, offset) -> list[Tensor]
over lists of one length: `weights` float tensors, `grads` the current batch's dense gradients
shaped like them (None entries allowed for criteria that do not read gradients), `masks` the
current bool masks; `generator` a torch.Generator on the weights' device (random criteria draw
from it, in list order), `gamma` MEST's gradient coefficient, `offset` what Sensitivity and
RSensitivity add to their denominators. Every criterion but `set` is elementwise; `set` ranks weights
over the whole list, so a per-layer update passes one layer. The divisions are guarded by offset =
EPSILON = 1e-8 by default; the Fantastic Weights code adds 1 instead (offset=1.0), which changes the
ranking. (That code also adds 1e-5 to SNIP's score, which changes no ranking, so it is no option.)
Definitions: Nowak et al. 2023 ("Fantastic Weights and
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


def magnitude(weights, grads, masks, *, generator=None, gamma=1.0, offset=EPSILON) -> list[Tensor]:
    """|θ|: drops the active weights closest to zero (RigL)."""
    return _each(torch._foreach_abs, list(weights))


def mest(weights, grads, masks, *, generator=None, gamma=1.0, offset=EPSILON) -> list[Tensor]:
    """|θ| + γ|g| (MEST, γ = 1 by default)."""
    return _each(torch._foreach_add, magnitude(weights, grads, masks), _each(torch._foreach_mul, gradient(
        weights, grads, masks), gamma))


def snip(weights, grads, masks, *, generator=None, gamma=1.0, offset=EPSILON) -> list[Tensor]:
    """|θ·g| (SNIP's saliency)."""
    return _each(torch._foreach_abs, _each(torch._foreach_mul, list(weights), list(grads)))


def sensitivity(weights, grads, masks, *, generator=None, gamma=1.0, offset=EPSILON) -> list[Tensor]:
    """|g| / (|θ| + offset)."""
    return _each(torch._foreach_div, gradient(weights, grads, masks),
                 _each(torch._foreach_add, magnitude(weights, grads, masks), offset))


def rsensitivity(weights, grads, masks, *, generator=None, gamma=1.0, offset=EPSILON) -> list[Tensor]:
    """|θ| / (|g| + offset), the reciprocal of sensitivity."""
    return _each(torch._foreach_div, magnitude(weights, grads, masks),
                 _each(torch._foreach_add, gradient(weights, grads, masks), offset))


def random(weights, grads, masks, *, generator=None, gamma=1.0, offset=EPSILON) -> list[Tensor]:
    """Uniform random scores: drops (or grows) a uniformly random set of exactly n entries."""
    return [torch.rand(w.shape, generator=generator, device=w.device, dtype=torch.float32)
            for w in weights]


def set_rule(weights, grads, masks, *, generator=None, gamma=1.0, offset=EPSILON) -> list[Tensor]:
    """SET (Mocanu et al. 2018): drop the smallest positive weights and the negative weights
    closest to zero, in proportion to their numbers, expressed as one score.

    Of any n dropped, n₊ = round(n·A₊/A) are positive and n₋ = n − n₊ negative, where A₊ and A₋
    count the active positive and negative weights and A = A₊ + A₋ (rounded half up). Mocanu drops
    the fraction ζ of each sign, which this equals up to rounding while keeping n exact. Since n₊
    and n₋ never decrease as n grows, one ranking serves every n: the k-th lowest score (k = 1..A)
    goes to the next positive weight (smallest first) when n₊(k) > n₊(k − 1), else to the next
    negative weight (closest to zero first), ties by lower position (row-major, in list order).
    n₊(A) = A₊, so a sign never runs out before its share is dropped: with no positive (or no
    negative) weights every drop is of the other sign.

    Zeros carry no sign: they rank first, by position, so they are dropped before anything else
    (Mocanu's code drops every zero weight; here a zero is a grown weight that has not moved).
    NaN weights score NaN (prune_grow drops them first). Inactive entries score +inf. Ranks are
    computed over the whole list, so a per-layer update passes one layer. Scores are float32
    while the ranks fit its 24-bit mantissa, float64 beyond.

    The *Fantastic Weights* repository differs: its `SET` option (`MagnitudeAndNegativityPruner`,
    used for the paper's SET runs) keeps the most negative weights and drops #negatives + 1
    weights whatever the drop rate, about half a layer per update; its `SET_fixed` option drops
    2·⌈n/2⌉ weights split evenly between the signs. Neither is Mocanu's proportional rule.
    """
    if not weights:
        return []
    flat_weight = torch.cat([w.detach().reshape(-1) for w in weights])
    flat_mask = torch.cat([m.reshape(-1) for m in masks])
    device = flat_weight.device
    dtype = torch.float32 if flat_weight.numel() <= 2 ** 24 else torch.float64
    score = torch.full(flat_weight.shape, float("inf"), dtype=dtype, device=device)
    score[flat_mask & torch.isnan(flat_weight)] = float("nan")
    zeros = (flat_mask & (flat_weight == 0)).nonzero().squeeze(1)
    score[zeros] = torch.arange(zeros.numel(), device=device).to(dtype)
    positive = _sorted_positions(flat_weight, flat_mask & (flat_weight > 0), descending=False)
    negative = _sorted_positions(flat_weight, flat_mask & (flat_weight < 0), descending=True)
    signed = positive.numel() + negative.numel()
    if signed:
        k = torch.arange(1, signed + 1, device=device)
        positive_share = (2 * k * positive.numel() + signed) // (2 * signed)   # n₊(k), half up
        takes_positive = torch.diff(positive_share, prepend=positive_share.new_zeros(1)) == 1
        rank = torch.arange(zeros.numel(), zeros.numel() + signed, device=device).to(dtype)
        score[positive] = rank[takes_positive]
        score[negative] = rank[~takes_positive]
    return [part.view(w.shape) for part, w in zip(score.split([w.numel() for w in weights]), weights)]


def _sorted_positions(values: Tensor, selected: Tensor, descending: bool) -> Tensor:
    """Flat positions of `selected` entries ordered by value (ties by lower position)."""
    positions = selected.nonzero().squeeze(1)
    return positions[torch.sort(values[positions], descending=descending, stable=True).indices]


def gradient(weights, grads, masks, *, generator=None, gamma=1.0, offset=EPSILON) -> list[Tensor]:
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

