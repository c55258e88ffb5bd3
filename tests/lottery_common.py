"""Shared by test_imp, test_swamp and test_optg: a small sparse MLP, scikit-learn's digits, and a
stateless batch order (batch t is a function of (data seed, t)), so that a run resumed at any step
sees the same batches as an uninterrupted one."""
from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from sparsekern.nn import SparseLinear, sparse_modules


@pytest.fixture
def one_thread():
    """Runs a test on one intra-op thread: tiny models on 2 shared cores run ~10x faster so."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def mlp(seed: int, inputs: int = 64, hidden: int = 32, outputs: int = 10,
        batch_norm: bool = False) -> nn.Module:
    """Sparse (all-True masks) MLP whose default initialisation is drawn from `seed`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers = [SparseLinear(inputs, hidden)]
        if batch_norm:
            layers.append(nn.BatchNorm1d(hidden))
        layers += [nn.ReLU(), SparseLinear(hidden, outputs)]
        return nn.Sequential(*layers)


@functools.lru_cache(maxsize=1)
def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test): scikit-learn's bundled digits, a fixed 1397/400 split."""
    from sklearn.datasets import load_digits
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    return x[400:], y[400:], x[:400], y[:400]


def batch(x: torch.Tensor, y: torch.Tensor, data_seed: int, step: int, size: int):
    """The `step`-th minibatch of a shuffled pass order that depends only on (data_seed, epoch)."""
    per_epoch = len(y) // size
    epoch, index = divmod(step, per_epoch)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(data_seed * 7919 + epoch))
    rows = order[index * size:(index + 1) * size]
    return x[rows], y[rows]


def train(model, algorithm, x, y, data_seed: int, steps: int, size: int = 32) -> None:
    """Trains from `algorithm.step_in_cycle` to `steps` with `algorithm.optimizer` (IMP/SWAMP)."""
    for t in range(algorithm.step_in_cycle, steps):
        inputs, targets = batch(x, y, data_seed, t, size)
        nn.functional.cross_entropy(model(inputs), targets).backward()
        algorithm.optimizer.step()
        algorithm.optimizer.zero_grad()
        algorithm.step()


@torch.no_grad()
def accuracy(model, x, y) -> float:
    model.eval()
    correct = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    return correct


# The digits comparison at 90% sparsity. IMP's default p = 0.2 needs 11 prunings to get there;
# p = 0.54 needs 3 (0.46^3 = 9.7% density) and keeps the runs short.
DIGITS = dict(hidden=100, steps=300, rewind_step=20, prune_fraction=0.54, prunings=3, lr=0.1,
              swa_start=150, swa_every=10)


def _sgd(parameters):
    return torch.optim.SGD(parameters, lr=DIGITS["lr"], momentum=0.9)


@functools.lru_cache(maxsize=None)
def digits_run(method: str, seed: int) -> float:
    """Test accuracy of one method at ~90% sparsity: "imp" (IMP-WR), "reinit" (IMP-WR's final mask
    on a fresh random initialisation), or "swamp<N>" (SWAMP with N particles)."""
    from sparsekern.algorithms import IMP, SWAMP
    from sparsekern.algorithms.swamp import data_seed
    x, y, x_test, y_test = digits()
    steps, cycles = DIGITS["steps"], DIGITS["prunings"] + 1
    with torch.random.fork_rng(devices=[]):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)     # a tiny MLP on 2 shared cores runs ~10x faster on one thread
        try:
            model = mlp(seed, hidden=DIGITS["hidden"])
            if method in ("imp", "reinit"):
                imp = IMP(model, _sgd, prune_fraction=DIGITS["prune_fraction"],
                          rewind_step=DIGITS["rewind_step"])
                imp.run(lambda a: train(model, a, x, y, data_seed(seed, a.cycle, 0), steps), cycles)
                if method == "reinit":
                    masks = imp.masks
                    model = mlp(seed + 10_000, hidden=DIGITS["hidden"])
                    imp = IMP(model, _sgd)
                    for (_, layer), mask in zip(sparse_modules(model), masks):
                        layer.set_mask(mask)
                    train(model, imp, x, y, data_seed(seed, cycles, 0), steps)
            else:
                swamp = SWAMP(model, _sgd, particles=int(method[len("swamp"):]),
                              prune_fraction=DIGITS["prune_fraction"], rewind_step=DIGITS["rewind_step"],
                              swa_start=DIGITS["swa_start"], swa_every=DIGITS["swa_every"], seed=seed)
                while True:
                    train(model, swamp, x, y, swamp.data_seed, steps)
                    if swamp.next_particle():
                        continue
                    if swamp.cycle == cycles - 1:
                        break
                    swamp.next_cycle()
            return accuracy(model, x_test, y_test)
        finally:
            torch.set_num_threads(threads)
