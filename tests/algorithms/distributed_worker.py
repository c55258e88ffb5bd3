"""One rank of tests/algorithms/test_distributed.py (launched by torch.distributed.run, gloo, CPU).

Trains a small sparse MLP under DDP with every rank on different data, with RigL (gradient
growth), SET (random growth) and DST with criteria of a user's own (sparsekern.Criterion, reading
the gradient and drawing from DST's random stream) and a drop-fraction schedule of its own (a function of the
step, the same on every rank), checks after every step that masks agree across ranks, and saves this rank's final
masks and weights to <out>/rank<r>.pt.
"""
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import sparsekern
from sparsekern.algorithms import distributed
from sparsekern.nn import sparse_modules

from ..helpers import end_rank


def _noisy_saliency(weights, grads, masks, *, generator):
    return [(w * g).abs() * torch.rand(w.shape, generator=generator) for w, g in zip(weights, grads)]


def _gradient_rank(weights, grads, masks, *, generator):
    """|g|'s rank over the whole list: a score that is no elementwise quantity."""
    flat = torch.cat([g.abs().reshape(-1) for g in grads])
    ranks = torch.empty_like(flat).scatter_(0, flat.argsort(stable=True), torch.arange(flat.numel()).to(flat))
    return [part.view(g.shape) for part, g in zip(ranks.split([g.numel() for g in grads]), grads)]


def _decaying(step):
    """A drop-fraction schedule of one's own: 0.4 decaying linearly to 0 over the 24 steps training is made for."""
    return 0.4 * (1 - step / 24)


ALGORITHMS = {
    "RigL": sparsekern.RigL, "SET": sparsekern.SET,
    "custom": lambda *args, **options: sparsekern.DST(
        *args, prune=sparsekern.Criterion("noisy_saliency", _noisy_saliency, reads_gradient=True, elementwise=True),
        grow=sparsekern.Criterion("gradient_rank", _gradient_rank, reads_gradient=True, elementwise=False),
        scope="global", schedule=_decaying, **options),
}


def train(algorithm, rank, steps=12):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    model = sparsekern.sparsify(model, 0.2, generator=torch.Generator().manual_seed(0))
    # broadcast_buffers=False: DDP would otherwise copy rank 0's masks (buffers) at every forward
    # and hide a disagreement.
    ddp = DistributedDataParallel(model, broadcast_buffers=False)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    algo = ALGORITHMS[algorithm](ddp, optimizer, update_every=2, total_steps=2 * steps)
    data = torch.Generator().manual_seed(100 + rank)  # each rank sees its own batches
    initial = [m.mask.clone() for _, m in sparse_modules(model)]
    updates = 0
    for _ in range(steps):
        x = torch.randn(8, 16, generator=data)
        y = torch.randint(0, 4, (8,), generator=data)
        optimizer.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        updates += algo.step()
        optimizer.step()
        assert distributed.masks_identical(ddp), f"{algorithm}: masks differ across ranks"
    changed = any(not torch.equal(a, m.mask) for a, (_, m) in zip(initial, sparse_modules(model)))
    assert updates == steps // 2 and changed, (algorithm, updates, changed)
    return {name: (m.mask.clone(), m.weight.detach().clone()) for name, m in sparse_modules(model)}


def main(out):
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    results = {algorithm: train(algorithm, rank) for algorithm in ALGORITHMS}
    # broadcast_masks makes disagreeing masks agree: perturb rank 1's, then repair from rank 0.
    model = sparsekern.sparsify(nn.Linear(8, 8), 0.5, generator=torch.Generator().manual_seed(rank))
    disagreed = not distributed.masks_identical(model)
    distributed.broadcast_masks(model)
    torch.save({"results": results, "disagreed": disagreed, "repaired": distributed.masks_identical(model)},
               os.path.join(out, f"rank{rank}.pt"))
    end_rank()


if __name__ == "__main__":
    main(sys.argv[1])
