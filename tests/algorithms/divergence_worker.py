"""One rank of test_distributed.py's per-rank-seed test (torch.distributed.run, gloo, CPU).

1. DST with a seed that differs across ranks is refused on every rank.
2. Replicas whose DST draws differ per rank (forced here past that refusal) diverge although DDP
   re-broadcasts rank 0's masks at every forward: masks_identical must see it.
3. broadcast_masks repairs masks, weights and, given the optimizer, its momentum: the replicas stay
   identical, with weights 0 off the masks, through the next training step.
   An optimizer that holds no state on src (rank 0) where another rank's does is refused on every rank first
   (the other way round, the rank without state takes src's).
4. With a ZeroRedundancyOptimizer, whose ranks hold the state of different weights by design,
   broadcast_masks repairs the masks and each rank zeroes its own share of the state off them, src's promise of
   zeros off the masks taken by a rank whose own lapsed.
Writes {"refused", "diverged_detected", "lopsided_refused", "repaired", "stays_repaired", "zero_repaired",
"holds_a_share"} (bools) to
<out>/rank<r>.pt.
"""
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel

import sparsekern
from sparsekern.algorithms import distributed

from ..helpers import end_rank


def model_and_optimizer():
    torch.manual_seed(0)
    model = sparsekern.sparsify(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)), 0.3,
                                generator=torch.Generator().manual_seed(0))
    ddp = DistributedDataParallel(model)   # broadcast_buffers=True: rank 0's masks at every forward
    return model, ddp, torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)


def main(out):
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model, ddp, optimizer = model_and_optimizer()
    try:
        sparsekern.SET(ddp, optimizer, update_every=2, total_steps=20, seed=rank)
        refused = False
    except ValueError as error:
        refused = "differs across ranks" in str(error)

    algo = sparsekern.SET(ddp, optimizer, update_every=2, total_steps=20, seed=0)
    algo.generator.manual_seed(1000 + rank)     # what a per-rank seed did before it was refused
    data = torch.Generator().manual_seed(7)     # the same batches everywhere
    def train_step():
        optimizer.zero_grad()
        nn.functional.cross_entropy(ddp(torch.randn(8, 16, generator=data)),
                                    torch.randint(0, 4, (8,), generator=data)).backward()
        algo.step()
        optimizer.step()

    for _ in range(4):
        train_step()
    with torch.no_grad():
        ddp(torch.randn(2, 16, generator=data))  # DDP copies rank 0's masks over every rank's
    diverged_detected = not distributed.masks_identical(ddp)
    # An optimizer without state on src (a fresh one on rank 0) where rank 1's has some is refused everywhere,
    # changing nothing: no rank's state can be taken for src's.
    lopsided = optimizer if rank == 1 else torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    try:
        distributed.broadcast_masks(ddp, optimizer=lopsided)
        lopsided_refused = False
    except ValueError as error:
        lopsided_refused = "other state for the sparse weights" in str(error) and not distributed.masks_identical(ddp)
    distributed.broadcast_masks(ddp, optimizer=optimizer)
    repaired = distributed.masks_identical(ddp)
    train_step()   # step 5: no mask update; rank 1's own momentum would move its weights apart again
    zero_off_masks = all(bool((module.weight[~module.mask] == 0).all())
                         for _, module in sparsekern.nn.sparse_modules(model))
    stays_repaired = distributed.masks_identical(ddp) and zero_off_masks

    zero = ZeroRedundancyOptimizer(ddp.parameters(), optimizer_class=torch.optim.SGD, lr=0.1, momentum=0.9)
    nn.functional.cross_entropy(ddp(torch.randn(8, 16, generator=data)),
                                torch.randint(0, 4, (8,), generator=data)).backward()
    zero.step()   # each rank now holds momentum for its own share of the weights only
    first = sparsekern.nn.sparse_modules(model)[0][1]
    if rank == 1:  # a replica whose masks came apart, and whose promises lapsed (as seen under torch 2.11)
        first.set_mask(first.mask.roll(1, 0))
        for _, module in sparsekern.nn.sparse_modules(model):
            module.zero_off_mask = False
    distributed.broadcast_masks(ddp, optimizer=zero)
    shares = [(module, state) for _, module in sparsekern.nn.sparse_modules(model)
              for state in zero.optim.state.get(module.weight, {}).values() if state.dim() > 0]
    zero_repaired = distributed.masks_identical(ddp) and all(bool((state[~module.mask] == 0).all())
                                                             for module, state in shares) and all(
        module.zero_off_mask for _, module in sparsekern.nn.sparse_modules(model))   # rank 0's promises taken
    torch.save({"refused": refused, "diverged_detected": diverged_detected, "lopsided_refused": lopsided_refused,
                "repaired": repaired, "stays_repaired": stays_repaired,
                "zero_repaired": zero_repaired, "holds_a_share": bool(shares)},
               os.path.join(out, f"rank{rank}.pt"))
    end_rank()


if __name__ == "__main__":
    main(sys.argv[1])
