"""Helpers shared by the test packages (fixtures live in conftest.py).

Op tests: the backends under test, dtypes, random scores with ties and special values, non-contiguous
layouts. Algorithm tests (IMP, SWAMP, OptG and the SWAMP-on-ranks script): a small sparse MLP, a
Conv3d+Conv1d model, scikit-learn's digits, and a stateless batch order (batch t is a function of
(data seed, t)), so that a run resumed at any step sees the same batches as an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import functools
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from torch import nn

from sparsekern.nn import SparseConv1d, SparseConv3d, SparseLinear, sparse_modules
from sparsekern.ops import _backend

BACKENDS = _backend.AUTO_ORDER
ROOT = pathlib.Path(__file__).resolve().parent.parent
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def random_scores(generator, shape, dtype, kind):
    """Scores of one kind: 'normal', 'ties' (a handful of distinct values), or 'special' (NaN, ±inf, ±0)."""
    if kind == "ties":
        values = torch.randint(-2, 3, shape, generator=generator).to(torch.float64) / 2
    else:
        values = torch.randn(shape, generator=generator, dtype=torch.float64)
    if kind == "special":
        specials = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0], dtype=torch.float64)
        which = torch.randint(0, 10, shape, generator=generator)
        values = torch.where(which < 5, specials[which.clamp(max=4)], values)
    return values.to(dtype)


def strided(t, generator, layout):
    """The same values as t in a non-contiguous layout: 'transposed' or 'sliced' (every other column)."""
    if layout == "contiguous" or t.dim() < 2:
        return t
    if layout == "transposed":
        return t.transpose(0, -1).contiguous().transpose(0, -1)
    wide = torch.randn((*t.shape[:-1], 2 * t.shape[-1]), generator=generator).to(t.dtype)
    wide[..., ::2] = t
    return wide[..., ::2]


def reversed_dims(t):
    """`t` with its dimensions in reverse order, a non-contiguous view (`.T` of other than 2 dims is deprecated)."""
    return t.permute(*reversed(range(t.dim())))


def skip_interpreter_limits(backend, dtype=None, size=0):
    """Skips a Triton case the interpreter cannot run right (bf16) or in CI time (over 4096 entries)."""
    if backend != "triton" or torch.cuda.is_available():
        return
    if dtype == torch.bfloat16:
        pytest.skip("Triton interpreter lacks bf16")
    if size > 4096:
        pytest.skip("too large for the Triton interpreter")


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


def conv1d_conv3d_model(seed: int) -> nn.Module:
    """Sparse (all-True masks) model of a Conv3d, a grouped Conv1d and a Linear head, drawn from `seed`:
    input (N, 2, 4, 4, 4), 5 classes."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(SparseConv3d(2, 4, 3), nn.ReLU(), nn.Flatten(2), SparseConv1d(4, 6, 3, groups=2),
                             nn.ReLU(), nn.Flatten(), SparseLinear(36, 5))


def conv_data(seed: int = 0, rows: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) for `conv1d_conv3d_model`."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 2, 4, 4, 4, generator=g), torch.randint(0, 5, (rows,), generator=g)


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


def torchrun(module: str, *args: str, ranks: int = 2, timeout: float = 120) -> subprocess.CompletedProcess:
    """Runs `python -m <module> args...` on `ranks` local processes under torch.distributed.run (one
    thread each), from the repository root so that `tests.*` modules import. Past `timeout` seconds
    the run is stopped, its ranks included, and the test fails with their output."""
    environment = dict(os.environ, OMP_NUM_THREADS="1",
                       PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
               "-m", module, *args]
    with subprocess.Popen(command, env=environment, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as run:
        try:
            stdout, stderr = run.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            # SIGTERM: torchrun passes it on to the ranks, which run in sessions of their own (a
            # SIGKILL would leave them running, holding the output pipes open).
            run.terminate()
            stdout, stderr = run.communicate(timeout=60)
            pytest.fail(f"{module} on {ranks} ranks ran past {timeout} s:\n{stdout[-4000:]}\n{stderr[-4000:]}")
    return subprocess.CompletedProcess(command, run.returncode, stdout, stderr)


def end_rank() -> None:
    """Ends a torchrun worker whose results are on disk, after a barrier so that no rank leaves while
    another still talks to it, without tearing the gloo group down: its destructor joins gloo's
    threads while holding the GIL, which a thread still freeing a finished collective's tensors waits
    for (a hang seen here), and at interpreter exit it can abort ('terminate called without an active
    exception'). torch's own teardown, not sparsekern's, so the ranks skip it."""
    torch.distributed.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@contextlib.contextmanager
def counting_host_reads():
    """Counts the Tensor-to-Python conversions (device-to-host reads, each a sync on a GPU) made inside: yields a
    list that holds one entry per read."""
    reads = []
    originals = {name: getattr(torch.Tensor, name)
                 for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")}
    for name, original in originals.items():
        setattr(torch.Tensor, name, lambda self, *a, _f=original, **k: (reads.append(1), _f(self, *a, **k))[1])
    try:
        yield reads
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


# A sparse layer's own mask put in place behind the module's back (`mask.data = ...`, or the buffers dict for a meta
# tensor, which set_data refuses), as a user or a library may: kind -> (damage, the error every mask writer raises
# for it, the words after the layer's name). Every writer refuses it naming the layer, before it changes anything.
BAD_OWN_MASKS = {
    "expanded": (lambda layer: setattr(layer.mask, "data", torch.ones(1, layer.mask.shape[-1], dtype=torch.bool)
                                       .expand(layer.mask.shape)), ValueError, "'s mask has entries that share memory"),
    "float": (lambda layer: setattr(layer.mask, "data", layer.mask.float()), TypeError, "'s mask is not a bool tensor"),
    "of another shape": (lambda layer: setattr(layer.mask, "data", torch.ones(3, 2, dtype=torch.bool)), ValueError,
                         r"'s mask is not of its weight's shape"),
    "on the meta device": (lambda layer: layer._buffers.__setitem__("mask", torch.ones_like(layer.mask, device="meta")),
                           ValueError, r"'s mask is not on its weight's device \(cpu\)"),
    # A bool view of the weight's bytes, of the weight's shape: every write of either changed the other.
    "a view of its weight": (lambda layer: setattr(layer.mask, "data", layer.weight.detach().view(torch.bool)
                                                   [..., ::layer.weight.element_size()]),
                             ValueError, "'s mask shares memory with its weight"),
}


def damage_mask(layer: nn.Module, kind: str) -> tuple[type, str]:
    """Puts a mask of `kind` (BAD_OWN_MASKS) in place of `layer`'s; returns the error and message a writer refuses
    it with."""
    damage, error, match = BAD_OWN_MASKS[kind]
    damage(layer)
    return error, match


def everything(model: nn.Module, optimizer=None, generator=None) -> list:
    """Copies of all that a refused call must leave as it was: the model's parameters and buffers (a meta one by its
    shape), the optimizer's state tensors, torch's random stream and `generator`'s."""
    copies = [(key, value.shape if value.is_meta else value.clone()) for key, value in model.state_dict().items()]
    if optimizer is not None:
        copies += [(key, value.clone()) for state in optimizer.state.values() for key, value in state.items()
                   if isinstance(value, torch.Tensor)]
    copies.append(torch.get_rng_state())
    if generator is not None:
        copies.append(generator.get_state())
    return copies


def assert_unchanged(before: list, after: list) -> None:
    assert len(before) == len(after)
    for old, new in zip(before, after):
        if isinstance(old, tuple):
            assert old[0] == new[0] and type(old[1]) is type(new[1]), (old[0], new[0])
            old, new = old[1], new[1]
        assert (old == new if not isinstance(old, torch.Tensor) else
                old.dtype == new.dtype and torch.equal(old, new)), "changed"
