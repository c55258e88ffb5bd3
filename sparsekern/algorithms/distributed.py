"""Keeping sparse masks identical across the ranks of a distributed (DDP) run.

DST keeps masks identical by construction when every rank builds it with the same `seed` (the
default): the random criteria then draw the same numbers everywhere, and the gradient criteria
read gradients that DDP has already averaged, which are equal on every rank. These helpers check
that (`masks_identical`) and repair it when a run needs certainty (`broadcast_masks`, e.g. after
every update step or after loading a checkpoint on one rank). They need an initialised
`torch.distributed` process group; masks travel as uint8 (gloo has no bool all-reduce).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..nn import sparse_modules


@torch.no_grad()
def broadcast_masks(model: nn.Module, src: int = 0, group=None) -> None:
    """Copies rank `src`'s mask into every sparse module of `model` on every rank (weights off
    the mask become 0). `model` may be wrapped in DistributedDataParallel."""
    for _, module in sparse_modules(model):
        mask = module.mask.to(torch.uint8)
        dist.broadcast(mask, src=src, group=group)
        module.set_mask(mask.bool())


@torch.no_grad()
def masks_identical(model: nn.Module, group=None) -> bool:
    """True on every rank when every sparse module's mask is the same on all ranks of `group`.

    Exact: rank 0's masks are broadcast and compared entry by entry, and the verdicts combined
    with an all-reduce, so every rank returns the same answer. Collective: call on every rank.
    """
    source = dist.get_global_rank(group, 0) if group is not None else 0
    same = True
    for _, module in sparse_modules(model):
        reference = module.mask.to(torch.uint8)
        dist.broadcast(reference, src=source, group=group)
        same &= torch.equal(reference.bool(), module.mask)
    verdict = torch.tensor([1 if same else 0], dtype=torch.int32, device=_device(model))
    dist.all_reduce(verdict, op=dist.ReduceOp.MIN, group=group)
    return bool(verdict.item())


def _device(model: nn.Module) -> torch.device:
    modules = sparse_modules(model)
    return modules[0][1].mask.device if modules else torch.device("cpu")
