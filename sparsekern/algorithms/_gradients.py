"""Checks of the gradients an algorithm reads: whether a weight's gradient changed since it last
looked (a second `step()` in one iteration, or one without a fresh backward, would otherwise reuse a
stale gradient), whether they are all finite (a step that torch.amp.GradScaler skips is not), and
which are 0 everywhere (a layer no backward reached)."""
from __future__ import annotations

import math
import weakref
from typing import Container, Sequence

import torch
from torch import Tensor


def all_finite(grads: Sequence[Tensor]) -> bool:
    """Whether every entry of `grads` is finite (one host read per device)."""
    return finite_sums(grads) is not None


def finite_sums(grads: Sequence[Tensor]) -> list[float] | None:
    """The sum of each of `grads` (in float64), read with one host read per device, or None when some
    entry is not finite.

    A sum is finite whenever all its terms are (NaN and inf propagate through it), and one
    reduction pass costs a fifth of torch.isfinite's on CPU; only a sum that overflowed, or a
    gradient that really is not finite, pays the exact check as well. A torch.sparse gradient (an
    nn.Embedding(sparse=True) the optimizer holds) is read by its stored values: isfinite has no
    sparse kernel. The sums come along with the verdict at no cost: a gradient whose sum is not 0 is
    not 0 everywhere, so only the others need `zero_everywhere`."""
    by_device: dict[torch.device, list[int]] = {}
    for index, grad in enumerate(grads):
        by_device.setdefault(grad.device, []).append(index)
    sums = [0.0] * len(grads)
    for indices in by_device.values():
        group = [_stored_values(grads[index]) for index in indices]
        read = torch.stack([g.sum().to(torch.float64) for g in group]).tolist()
        if not all(map(math.isfinite, read)) and not bool(torch.stack([g.isfinite().all() for g in group]).all()):
            return None
        for index, value in zip(indices, read):
            sums[index] = value
    return sums


def zero_everywhere(grads: Sequence[Tensor]) -> list[Tensor]:
    """Per gradient, a bool scalar on its device: whether it is 0 everywhere (its largest |entry| is 0,
    exactly: a 2-norm would square tiny entries to 0). One batched reduction and no host read."""
    return [norm == 0 for norm in torch._foreach_norm(list(grads), float("inf"))] if grads else []


def _stored_values(grad: Tensor) -> Tensor:
    if grad.layout == torch.sparse_coo:
        return grad.coalesce().values()   # the gradient the optimizer applies: duplicates summed
    if grad.layout != torch.strided:
        return grad.values()    # compressed layouts (CSR, CSC, BSR, BSC)
    return grad


class GradientWatch:
    """Remembers the gradient tensors of some weights and their versions.

    A gradient counts as unchanged when it is the very tensor seen by `remember()` and has not
    been written since (its version counter is the same). A backward that accumulates into it,
    `zero_grad()`, a new tensor assigned to `.grad`, or an in-place copy all count as changes.
    Weak references: a gradient freed by `zero_grad(set_to_none=True)` is not kept alive.
    """

    def __init__(self) -> None:
        self._seen: list[tuple[weakref.ref, int] | None] = []

    def __getstate__(self) -> dict:
        # Weak references cannot be pickled; a copy (pickled, or a deep copy) has its own gradients, so
        # it starts with nothing remembered: the first step() of the copy cannot be refused as stale.
        return {"_seen": []}

    def remember(self, weights: Sequence[Tensor]) -> None:
        self._seen = [None if w.grad is None else (weakref.ref(w.grad), w.grad._version) for w in weights]

    def unchanged(self, weights: Sequence[Tensor], skip: Container[int] = ()) -> int | None:
        """Index of the first weight whose gradient is unchanged since `remember()`, or None; the indices in
        `skip` (weights whose gradient is not read: frozen ones) are not checked."""
        for i, (weight, seen) in enumerate(zip(weights, self._seen)):
            grad = weight.grad
            if (i not in skip and seen is not None and grad is not None and seen[0]() is grad
                    and seen[1] == grad._version):
                return i
        return None
