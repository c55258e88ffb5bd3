"""One rank of tests/algorithms/test_dst_no_gradient.py (launched by torch.distributed.run, gloo, CPU).

RigL under DDP on a mixture of three experts: on update steps expert 1 gets tokens on rank 0 only and
expert 2 on no rank. Checks after every step that masks agree across ranks, that expert 2 keeps its mask
at every update and expert 1 does not, under zero_grad(set_to_none=True) and (False), with host_checks
True and False, and saves this rank's masks after every update to <out>/rank<r>.pt.
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


class Experts(nn.Module):
    def __init__(self):
        super().__init__()
        self.experts = nn.ModuleList([nn.Linear(8, 16) for _ in range(3)])
        self.head = nn.Linear(16, 3)

    def forward(self, x, route):
        return self.head(torch.relu(sum(self.experts[e](x) for e in route)))


def train(set_to_none, host_checks, rank, steps=8):
    torch.manual_seed(0)
    model = sparsekern.sparsify(Experts(), 0.3, generator=torch.Generator().manual_seed(0))
    # broadcast_buffers=False: DDP would otherwise copy rank 0's masks (buffers) at every forward and
    # hide a disagreement; find_unused_parameters: the experts left out of a step.
    ddp = DistributedDataParallel(model, broadcast_buffers=False, find_unused_parameters=True)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    algo = sparsekern.RigL(ddp, optimizer, update_every=2, total_steps=2 * steps, host_checks=host_checks)
    data = torch.Generator().manual_seed(100 + rank)  # each rank sees its own batches
    history = []
    for _ in range(steps):
        x, y = torch.randn(8, 8, generator=data), torch.randint(0, 3, (8,), generator=data)
        due = algo.schedule.is_update(algo.step_count + 1)
        route = ((0, 1) if rank == 0 else (0,)) if due else (0, 1, 2)
        optimizer.zero_grad(set_to_none=set_to_none)
        nn.functional.cross_entropy(ddp(x, route), y).backward()
        before = [expert.mask.clone() for expert in model.experts]
        assert algo.step() == due
        optimizer.step()
        assert distributed.masks_identical(ddp), f"set_to_none={set_to_none}: masks differ across ranks"
        if due:
            moved = [not torch.equal(a, expert.mask) for a, expert in zip(before, model.experts)]
            assert moved == [True, True, False], (set_to_none, moved)
            history.append([m.clone() for m in (*(e.mask for e in model.experts), model.head.mask)])
    return history


def main(out):
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    results = {f"set_to_none={setting}, host_checks={checks}": train(setting, checks, rank)
               for setting in (True, False) for checks in (True, False)}
    torch.save({key: [mask for masks in history for mask in masks] for key, history in results.items()},
               os.path.join(out, f"rank{rank}.pt"))
    end_rank()


if __name__ == "__main__":
    main(sys.argv[1])
