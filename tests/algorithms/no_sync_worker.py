"""One rank of tests/algorithms/test_distributed.py (launched by torch.distributed.run, gloo, CPU).

Gradient accumulation under DDP's no_sync: RigL's and OptG's step() inside it (where each rank's gradients are its
own) is refused on every rank with nothing changed; accumulated under no_sync and stepped once after the backward
outside it, the masks stay identical. Saves this rank's findings to <out>/rank<r>.pt.
"""
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import sparsekern
from sparsekern.algorithms import distributed

from ..helpers import assert_unchanged, end_rank, everything

BUILDERS = {"RigL": lambda ddp, optimizer: sparsekern.RigL(ddp, optimizer, update_every=1, total_steps=8),
            "OptG": lambda ddp, optimizer: sparsekern.OptG(ddp, density=0.3, epochs=4)}


def _tensors(state) -> list:
    """The state's values, tensors and the rest, in order (nested dicts flattened)."""
    return [item for value in state.values() for item in (_tensors(value) if isinstance(value, dict) else [value])]


def accumulate(name, rank, steps=3):
    torch.manual_seed(0)
    model = sparsekern.sparsify(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)), 0.3,
                                generator=torch.Generator().manual_seed(0))
    # broadcast_buffers=False: DDP would otherwise copy rank 0's masks (buffers) at every forward and hide a
    # disagreement.
    ddp = DistributedDataParallel(model, broadcast_buffers=False)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    algo = BUILDERS[name](ddp, optimizer)
    data = torch.Generator().manual_seed(100 + rank)   # each rank sees its own batches

    def backward():
        x, y = torch.randn(8, 8, generator=data), torch.randint(0, 3, (8,), generator=data)
        nn.functional.cross_entropy(ddp(x), y).backward()

    refused = []
    for _ in range(steps):
        optimizer.zero_grad()
        with ddp.no_sync():
            backward()
            before = everything(model, optimizer) + _tensors(algo.state_dict())
            try:
                algo.step()
            except RuntimeError as error:
                assert_unchanged(before, everything(model, optimizer) + _tensors(algo.state_dict()))
                refused.append("inside DistributedDataParallel.no_sync()" in str(error))
        backward()
        algo.step()
        optimizer.step()
        if name == "OptG":
            algo.next_epoch()
    return {"refused": refused, "identical": distributed.masks_identical(ddp)}


def main(out):
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.save({name: accumulate(name, rank) for name in BUILDERS}, os.path.join(out, f"rank{rank}.pt"))
    end_rank()


if __name__ == "__main__":
    main(sys.argv[1])
