"""prune_grow against the same steps in torch ops: one layer-wise RigL mask update.

Over ResNet-50's 54 weights at density 0.1, each layer drops its 30% lowest-|w| active entries and
grows as many at the highest |gradient| among the rest, zeroing weight and momentum where the
contract says. Scores (|w|, |g|) are computed inside every run, as a training step must.
Updates mutate the inputs in place; repeating one is a steady state (the same old mask gives the
same new mask), so every call does the same work.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ... import ops
from ..core import Case, sparsekern_runs
from ..shapes import ONE_MILLION, RESNET50, RESNET50_TINY, describe, random_tensors

DENSITY = 0.1
DROP_FRACTION = 0.3


def torch_prune_grow(weight: Tensor, mask: Tensor, prune_score: Tensor, grow_score: Tensor, n: int,
                     active: int, state: list[Tensor]) -> Tensor:
    """The contract's update in plain torch ops (topk instead of the exact tie rule; scores here have no ties)."""
    old = mask.reshape(-1)
    minus_inf = torch.tensor(float("-inf"), device=weight.device)
    kept = torch.zeros_like(old)
    kept[torch.where(old, prune_score.reshape(-1), minus_inf).topk(active - n, sorted=False).indices] = True
    new = kept.clone()
    new[torch.where(kept, minus_inf, grow_score.reshape(-1)).topk(n, sorted=False).indices] = True
    newly_grown = (new & ~old).view(mask.shape)
    new = new.view(mask.shape)
    weight.masked_fill_(~new | newly_grown, 0)
    for tensor in state:
        tensor.masked_fill_(newly_grown, 0)
    return new


class _Layers:
    """Sparse weights at DENSITY (zero off the mask), their gradients and momentum, and each layer's n."""

    def __init__(self, shapes, device):
        self.weights = random_tensors(shapes, device, seed=0)
        self.grads = random_tensors(shapes, device, seed=1)
        self.momenta = random_tensors(shapes, device, seed=2)
        self.actives = [round(DENSITY * w.numel()) for w in self.weights]
        self.masks = ops.topk_mask(random_tensors(shapes, device, seed=3), self.actives)
        for weight, momentum, mask in zip(self.weights, self.momenta, self.masks):
            weight.mul_(mask)
            momentum.mul_(mask)
        self.ns = [round(DROP_FRACTION * active) for active in self.actives]

    def torch_update(self) -> list[Tensor]:
        return [torch_prune_grow(w, m, w.abs(), g.abs(), n, active, [s]) for w, m, g, s, n, active
                in zip(self.weights, self.masks, self.grads, self.momenta, self.ns, self.actives)]

    def sparsekern_update(self) -> list[Tensor]:
        return [ops.prune_grow(w, m, w.abs(), g.abs(), n, state=(s,))
                for w, m, g, s, n in zip(self.weights, self.masks, self.grads, self.momenta, self.ns)]


def cases(device: torch.device, quick: bool) -> list[Case]:
    result = []
    for name, shapes in (("resnet50/16" if quick else "resnet50", RESNET50_TINY if quick else RESNET50),
                         ("single" if quick else "1M", [("x", (1 << 14,) if quick else ONE_MILLION)])):
        layers = _Layers(shapes, device)
        size = f"{describe(name, layers.weights)}, d={DENSITY}, drop {DROP_FRACTION}"
        runs = {"torch ops per layer": layers.torch_update}
        runs.update(sparsekern_runs("prune_grow", device, layers.sparsekern_update))
        result.append(Case("prune_grow (RigL update, layer-wise)", size, runs, baseline="torch ops per layer"))
    return result
