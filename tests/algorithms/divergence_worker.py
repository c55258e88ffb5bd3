"""One rank of test_distributed.py's per-rank-seed test (torch.distributed.run, gloo, CPU).

1. DST with a seed that differs across ranks is refused on every rank.
2. Replicas whose DST draws differ per rank (forced here past that refusal) diverge although DDP
   re-broadcasts rank 0's masks at every forward: masks_identical must see it.
3. broadcast_masks repairs masks and weights.
Writes {"refused": bool, "diverged_detected": bool, "repaired": bool} to <out>/rank<r>.pt.
"""
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
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
    for _ in range(4):
        optimizer.zero_grad()
        nn.functional.cross_entropy(ddp(torch.randn(8, 16, generator=data)),
                                    torch.randint(0, 4, (8,), generator=data)).backward()
        algo.step()
        optimizer.step()
    with torch.no_grad():
        ddp(torch.randn(2, 16, generator=data))  # DDP copies rank 0's masks over every rank's
    diverged_detected = not distributed.masks_identical(ddp)
    distributed.broadcast_masks(ddp)
    torch.save({"refused": refused, "diverged_detected": diverged_detected,
                "repaired": distributed.masks_identical(ddp)}, os.path.join(out, f"rank{rank}.pt"))
    end_rank()


if __name__ == "__main__":
    main(sys.argv[1])
