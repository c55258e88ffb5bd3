"""One rank of test_resume's DST test (torch.distributed.run, gloo, CPU): SET (random growth) and RigL in global
scope on a DistributedDataParallel model, each rank on its own data. Trains 12 steps uninterrupted; then 5, where
rank 0 saves the checkpoint (model, optimizer, DST) to <out>/<method>.pt; then every rank builds a new model and
resumes from that file to step 12. Writes {method: {"uninterrupted", "resumed"}} (masks and DST state at the end)
to <out>/rank<rank>.pt."""
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import sparsekern
from sparsekern import checkpoint
from sparsekern.nn import sparse_modules

from ..helpers import end_rank

STEPS, STOP = 12, 5


def build(method: str, seed: int):
    torch.manual_seed(seed)
    model = sparsekern.sparsify(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)), 0.3,
                                generator=torch.Generator().manual_seed(seed))
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.Adam(ddp.parameters(), lr=0.01)
    options = dict(update_every=2, total_steps=14, seed=3)
    algorithm = (sparsekern.SET(ddp, optimizer, **options) if method == "set"
                 else sparsekern.RigL(ddp, optimizer, scope="global", **options))
    return ddp, optimizer, algorithm


def train(ddp, optimizer, algorithm, start: int, stop: int) -> None:
    for step in range(start, stop):
        generator = torch.Generator().manual_seed(1000 * step + dist.get_rank())
        optimizer.zero_grad()
        nn.functional.cross_entropy(ddp(torch.randn(8, 16, generator=generator)),
                                    torch.randint(0, 4, (8,), generator=generator)).backward()
        algorithm.step()
        optimizer.step()


def result(ddp, algorithm) -> dict:
    return {"masks": {name: module.mask.clone() for name, module in sparse_modules(ddp)},
            "state": algorithm.state_dict()}


if __name__ == "__main__":
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    out, results = sys.argv[1], {}
    for method in ("set", "rigl"):
        ddp, optimizer, algorithm = build(method, 0)
        train(ddp, optimizer, algorithm, 0, STEPS)
        uninterrupted = result(ddp, algorithm)
        ddp, optimizer, algorithm = build(method, 0)
        train(ddp, optimizer, algorithm, 0, STOP)
        path = os.path.join(out, f"{method}.pt")
        if dist.get_rank() == 0:
            checkpoint.save({"model": ddp.state_dict(), "optimizer": optimizer.state_dict(),
                             "algorithm": algorithm.state_dict()}, path)
        dist.barrier()
        ddp, optimizer, algorithm = build(method, 9)
        saved = checkpoint.load(path)
        ddp.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        algorithm.load_state_dict(saved["algorithm"])
        train(ddp, optimizer, algorithm, STOP, STEPS)
        results[method] = {"uninterrupted": uninterrupted, "resumed": result(ddp, algorithm)}
    torch.save(results, os.path.join(out, f"rank{dist.get_rank()}.pt"))
    end_rank()
