"""One rank of test_distributed.py's buffer-sync test (torch.distributed.run, gloo, CPU): DDP with its default
buffer sync, which copies rank 0's masks (buffers) into every rank's at construction and at each forward.

Under torch 2.11 each copy moves every mask's version counter (torch 2.13's does not), and a sparse layer whose
mask moved since its zero-off-mask promise read its weight again to check it: a host sync per layer per forward.

1. "static": a sparsified MLP trained for a few steps: the Tensor-to-Python conversions (host reads) of each
   forward, and whether every output equals the dense computation on where(mask, weight, 0).
2. "set": the same under SET (mask updates every 2 steps): host reads per forward, outputs, masks identical.
3. "diverged": rank 1 sets another mask in one layer (its weights zeroed off it, a promise made for it) and
   DDP copies rank 0's over it at the next forward: whether that output is right, whether the copy moved the
   mask's version counter (where it does not, torch 2.13, the layer cannot see it), and whether masks_identical
   sees the divergence.
Writes {"static": {"reads", "correct"}, "set": {"reads", "correct", "identical"}, "diverged": {"correct",
"copy_seen", "detected"}, "layers"} to <out>/rank<r>.pt.
"""
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

import sparsekern
from sparsekern.algorithms import distributed
from sparsekern.nn import SparseLinear, sparse_modules

from ..helpers import counting_host_reads, end_rank


def ddp_model():
    torch.manual_seed(0)
    model = sparsekern.sparsify(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                                              nn.Linear(32, 4)), 0.3, generator=torch.Generator().manual_seed(0))
    return model, DistributedDataParallel(model)   # the default: buffers synced at every forward


@torch.no_grad()
def masked_reference(model, x):
    for layer in model:
        if isinstance(layer, SparseLinear):
            x = F.linear(x, torch.where(layer.mask, layer.weight, 0), layer.bias)
        else:
            x = layer(x)
    return x


def train(model, ddp, steps, algorithm=None):
    """Host reads of each forward, and whether every output equalled the masked reference."""
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    if algorithm is not None:
        algorithm = algorithm(ddp, optimizer, update_every=2, total_steps=100, seed=0)
    data = torch.Generator().manual_seed(7)   # the same batches on every rank
    reads, correct = [], True
    for _ in range(steps):
        x = torch.randn(8, 16, generator=data)
        with counting_host_reads() as made:
            output = ddp(x)
        reads.append(len(made))
        correct = correct and torch.allclose(output, masked_reference(model, x), atol=1e-6)
        optimizer.zero_grad()
        F.cross_entropy(output, torch.randint(0, 4, (8,), generator=data)).backward()
        if algorithm is not None:
            algorithm.step()
        optimizer.step()
    return {"reads": reads, "correct": correct}


def diverged(rank):
    model, ddp = ddp_model()
    first = model[0]
    if rank == 1:   # a mask set on one rank only (the weights zeroed off it): DDP copies rank 0's over it
        first.set_mask(first.mask.roll(1, 0))
        with torch.no_grad():
            first.weight.add_(1)   # non-zero under the new mask, where rank 0's may hold 0
            first.zero_weights_off_mask()
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(3))
    version = first.mask._version
    with torch.no_grad():
        correct = torch.allclose(ddp(x), masked_reference(model, x), atol=1e-6)
    return {"correct": correct, "copy_seen": first.mask._version != version,
            "detected": not distributed.masks_identical(ddp)}


def main(out):
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model, ddp = ddp_model()
    results = {"static": train(model, ddp, 6), "layers": len(sparse_modules(model))}
    model, ddp = ddp_model()
    results["set"] = train(model, ddp, 6, sparsekern.SET)
    results["set"]["identical"] = distributed.masks_identical(ddp)
    results["diverged"] = diverged(rank)
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    end_rank()


if __name__ == "__main__":
    main(sys.argv[1])
