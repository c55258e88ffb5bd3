"""One rank of test_distributed.py's replica tests (torch.distributed.run, gloo, CPU).

1. Masks drawn per rank (sparsify with a rank-seeded generator; DDP copies rank 0's weights but, with
   broadcast_buffers=False, not its masks) are refused by DST, IMP and OptG on every rank, and DST
   accepts them once broadcast_masks has made them rank 0's.
2. broadcast_masks(algorithm=...) repairs a DST whose checkpoint only rank 0 loaded, and keeps each rank's
   DST.finish().
3. A model sharded by fully_shard (DTensor weights) is refused, with a ValueError that says so, by
   sparsify, DST, IMP, OptG, SWAMP, masks_identical and broadcast_masks, before any of them fails
   inside an op.
4. Pipeline stages (different layers per rank) are no replicas: DST builds, masks_identical says False,
   broadcast_masks refuses.
5. The constructors' replica check makes no tensor collective (NCCL's take CUDA tensors only, and a
   model may still be on the CPU when its algorithm is built).
Writes {"refused": {who: refused}, "accepted_after_broadcast", "sharded": {who: refused},
"load_on_rank_0_repaired", "stages_built", "built_by_objects_alone", "finish_kept_through_a_broadcast"} to
<out>/rank<r>.pt.
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


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def refuses(call, words):
    try:
        call()
    except ValueError as error:
        return words in str(error)
    return False


def sharded_refusals():
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        return {}
    model = sparsekern.sparsify(mlp(), 0.5, generator=torch.Generator().manual_seed(0))
    fully_shard(model)
    dense = mlp()
    fully_shard(dense)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    factory = lambda parameters: torch.optim.SGD(parameters, lr=0.1)
    calls = {"sparsify": lambda: sparsekern.sparsify(dense, 0.5),
             "DST": lambda: sparsekern.RigL(model, optimizer, update_every=1, total_steps=4),
             "IMP": lambda: sparsekern.IMP(model, factory),
             "OptG": lambda: sparsekern.OptG(model, sparsity=0.5, epochs=2),
             "SWAMP": lambda: sparsekern.SWAMP(model, factory, particles=2),
             "masks_identical": lambda: distributed.masks_identical(model),
             "broadcast_masks": lambda: distributed.broadcast_masks(model)}
    return {who: refuses(call, "sharded across ranks") for who, call in calls.items()}


def set_run(rank):
    model = sparsekern.sparsify(mlp(), 0.3, generator=torch.Generator().manual_seed(0))
    ddp = DistributedDataParallel(model, broadcast_buffers=False)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    algorithm = sparsekern.SET(ddp, optimizer, update_every=2, total_steps=40)
    data = torch.Generator().manual_seed(100 + rank)

    def train(steps):
        for _ in range(steps):
            optimizer.zero_grad()
            nn.functional.cross_entropy(ddp(torch.randn(8, 16, generator=data)),
                                        torch.randint(0, 4, (8,), generator=data)).backward()
            algorithm.step()
            optimizer.step()
    return ddp, algorithm, train


def repaired_after_a_load_on_rank_0(rank):
    """A checkpoint loaded on rank 0 only: broadcast_masks with the algorithm makes the replicas agree through
    later mask updates (the masks alone would not: DST's step count and random stream stay behind)."""
    ddp, algorithm, train = set_run(rank)
    train(5)
    saved = ddp.state_dict(), algorithm.state_dict()
    ddp, algorithm, train = set_run(rank)
    if rank == 0:
        ddp.load_state_dict(saved[0])
        algorithm.load_state_dict(saved[1])
    distributed.broadcast_masks(ddp, algorithm=algorithm)
    train(4)   # two mask updates
    return algorithm.step_count == 9 and distributed.masks_identical(ddp)


def finish_kept_through_a_broadcast(rank):
    """DST.finish() on every rank, then broadcast_masks(algorithm=...): the load of rank 0's state on rank 1
    forgot its finish(), and its next backward, before a due update, was dense again while rank 0's was
    masked, so DDP's averaged gradient moved inactive weights off 0 on every rank."""
    ddp, algorithm, train = set_run(rank)
    train(3)   # the next step (4) is an update step: the backward before it is dense
    algorithm.finish()
    distributed.broadcast_masks(ddp, algorithm=algorithm)
    return not any(module.dense_grad for _, module in sparsekern.nn.sparse_modules(ddp))


def stages_built(rank):
    """Pipeline stages: each rank holds other layers. DST builds on every rank, masks_identical says
    False and broadcast_masks refuses on every rank, where their tensor-by-tensor broadcasts aborted
    gloo (SIGABRT)."""
    stage = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32)) if rank == 0 else nn.Linear(32, 4)
    stage = sparsekern.sparsify(stage, 0.3, generator=torch.Generator().manual_seed(0))
    sparsekern.SET(stage, torch.optim.SGD(stage.parameters(), lr=0.1), update_every=2, total_steps=20)
    return not distributed.masks_identical(stage) and refuses(lambda: distributed.broadcast_masks(stage),
                                                               "different sparse layers")


def built_by_objects_alone(ddp, optimizer, factory):
    """DST, IMP and OptG build with torch.distributed's tensor collectives replaced by failures."""
    saved = dist.broadcast, dist.all_reduce, dist.all_gather

    def tensor_collective(*args, **kwargs):
        raise RuntimeError("a tensor collective")
    dist.broadcast = dist.all_reduce = dist.all_gather = tensor_collective
    try:
        sparsekern.SET(ddp, optimizer, update_every=2, total_steps=20)
        sparsekern.IMP(ddp, factory)
        sparsekern.OptG(ddp, sparsity=0.9, epochs=2)
        return True
    except RuntimeError as error:
        if str(error) != "a tensor collective":
            raise
        return False
    finally:
        dist.broadcast, dist.all_reduce, dist.all_gather = saved


def main(out):
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = sparsekern.sparsify(mlp(), 0.3, generator=torch.Generator().manual_seed(rank))
    ddp = DistributedDataParallel(model, broadcast_buffers=False)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    factory = lambda parameters: torch.optim.SGD(parameters, lr=0.1)
    refused = {"DST": refuses(lambda: sparsekern.SET(ddp, optimizer, update_every=2, total_steps=20),
                              "differ across ranks"),
               "IMP": refuses(lambda: sparsekern.IMP(ddp, factory), "differ across ranks"),
               "OptG": refuses(lambda: sparsekern.OptG(ddp, sparsity=0.9, epochs=2), "differ across ranks")}
    distributed.broadcast_masks(ddp)
    sparsekern.SET(ddp, optimizer, update_every=2, total_steps=20)
    torch.save({"refused": refused, "accepted_after_broadcast": True, "sharded": sharded_refusals(),
                "load_on_rank_0_repaired": repaired_after_a_load_on_rank_0(rank),
                "stages_built": stages_built(rank),
                "finish_kept_through_a_broadcast": finish_kept_through_a_broadcast(rank),
                "built_by_objects_alone": built_by_objects_alone(ddp, optimizer, factory)},
               os.path.join(out, f"rank{rank}.pt"))
    end_rank()


if __name__ == "__main__":
    main(sys.argv[1])
