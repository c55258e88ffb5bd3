"""Whether a weight's gradient changed since an algorithm last looked: catches a second `step()`
in one iteration, or one without a fresh backward, which would otherwise reuse a stale gradient."""
from __future__ import annotations

import weakref
from typing import Sequence

from torch import Tensor


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

    def unchanged(self, weights: Sequence[Tensor]) -> int | None:
        """Index of the first weight whose gradient is unchanged since `remember()`, or None."""
        for i, (weight, seen) in enumerate(zip(weights, self._seen)):
            grad = weight.grad
            if seen is not None and grad is not None and seen[0]() is grad and seen[1] == grad._version:
                return i
        return None
