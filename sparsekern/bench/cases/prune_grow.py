"""prune_grow against the same steps in torch ops: one RigL mask update of every layer.

Over ResNet-50's 54 weights at density 0.1, drop the 30% lowest-|w| active entries and grow as many
at the highest |gradient| among all not kept, zeroing weight and momentum where the contract says:
per layer (layer scope) or over the whole list (global scope). sparsekern makes one call for the
list, ranking the weights and gradients by magnitude itself; the baselines compute |w| and |g| and
select with `torch.topk`, per layer or on the concatenated list, as DST code in plain torch does.
Updates mutate the inputs in place; repeating one is a steady state (the same old masks give the
same new masks), so every call does the same work.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ... import ops
from ..core import Case, sparsekern_runs
from ..shapes import ONE_MILLION, RESNET50, RESNET50_TINY, describe, random_tensors

OPS = ("prune_grow (RigL update, layer scope)", "prune_grow (RigL update, global scope)")

DENSITY = 0.1
DROP_FRACTION = 0.3


def torch_select(score: Tensor, eligible: Tensor, k: int) -> Tensor:
    """Bool mask of k best entries of a flat score among eligible ones (topk; scores here have no ties)."""
    selected = torch.zeros_like(eligible)
    selected[torch.where(eligible, score, float("-inf")).topk(k, sorted=False).indices] = True
    return selected


def torch_prune_grow(weights: list[Tensor], masks: list[Tensor], grads: list[Tensor], n, state: list[Tensor],
                     global_scope: bool) -> list[Tensor]:
    """The contract's update in plain torch ops: per layer, or on the concatenated list."""
    groups = [list(range(len(weights)))] if global_scope else [[i] for i in range(len(weights))]
    swaps = [n] if global_scope else n
    new_masks = [None] * len(weights)
    for group, swap in zip(groups, swaps):
        old = torch.cat([masks[i].reshape(-1) for i in group])
        kept = torch_select(torch.cat([weights[i].abs().reshape(-1) for i in group]), old, int(old.sum()) - swap)
        new = kept | torch_select(torch.cat([grads[i].abs().reshape(-1) for i in group]), ~kept, swap)
        for i, part in zip(group, new.split([masks[i].numel() for i in group])):
            new_masks[i] = part.view(masks[i].shape)
    for weight, mask, new, tensor in zip(weights, masks, new_masks, state):
        zero = ~new | (new & ~mask)
        weight.masked_fill_(zero, 0)
        tensor.masked_fill_(zero, 0)
    return new_masks


class _Layers:
    """Sparse weights at DENSITY (zero off the mask), their gradients and momentum, and the swap counts."""

    def __init__(self, shapes, device):
        self.weights = random_tensors(shapes, device, seed=0)
        self.grads = random_tensors(shapes, device, seed=1)
        self.momenta = random_tensors(shapes, device, seed=2)
        self.actives = [round(DENSITY * w.numel()) for w in self.weights]
        self.masks = ops.topk_mask(random_tensors(shapes, device, seed=3), self.actives)
        for weight, momentum, mask in zip(self.weights, self.momenta, self.masks):
            weight.mul_(mask)
            momentum.mul_(mask)

    def swaps(self, global_scope: bool):
        if global_scope:
            return round(DROP_FRACTION * sum(self.actives))
        return [round(DROP_FRACTION * active) for active in self.actives]

    def torch_update(self, global_scope: bool) -> list[Tensor]:
        return torch_prune_grow(self.weights, self.masks, self.grads, self.swaps(global_scope), self.momenta,
                                global_scope)

    def sparsekern_update(self, global_scope: bool) -> list[Tensor]:
        return ops.prune_grow(self.weights, self.masks, self.weights, self.grads, self.swaps(global_scope),
                              state=[[m] for m in self.momenta],
                              active=sum(self.actives) if global_scope else self.actives,
                              prune_abs=True, grow_abs=True)


def cases(device: torch.device, quick: bool) -> list[Case]:
    result = []
    for name, shapes in (("resnet50/16" if quick else "resnet50", RESNET50_TINY if quick else RESNET50),
                         ("single" if quick else "1M", [("x", (1 << 14,) if quick else ONE_MILLION)])):
        layers = _Layers(shapes, device)
        size = f"{describe(name, layers.weights)}, d={DENSITY}, drop {DROP_FRACTION}"
        for scope, global_scope in (("layer", False), ("global", True)):
            if len(shapes) == 1 and global_scope:
                continue  # one tensor: the same work as layer scope
            baseline = f"torch topk ({'cat' if global_scope else 'per layer'})"
            runs = {baseline: lambda l=layers, g=global_scope: l.torch_update(g)}
            runs.update(sparsekern_runs("prune_grow", device, lambda l=layers, g=global_scope: l.sparsekern_update(g)))
            result.append(Case(f"prune_grow (RigL update, {scope} scope)", size, runs, baseline=baseline))
    return result
