"""A training step of a sparse model against the dense one, in time and in peak memory.

Models, at density 0.1 (ERK): the MLP 1024-2048-2048-10 at batch 256, the CLI's digits MLP 64-256-256-10 at
batch 64 (small enough that a sparse layer's fixed per-call cost, not its products, decides the ratio), a small
conv net (four 3x3 convolutions 3-32-64-128-256, batch norm, a linear head) at batch 32 on 32x32 images, and a
small Transformer (two encoder layers of width 64, 16 tokens, batch 16: many small layers, where fixed per-call
costs show). A step is zero_grad, forward, cross-entropy, backward, [DST.step()], SGD with momentum; the digits
MLP is timed with AdamW as well, torch's default CPU implementation and fused=True: the default takes the square
root of a second moment that is 0 at every pruned weight, which torch.sqrt computed ~5x slower than other values on
an AMD EPYC (AVX-512), and the fused kernel did not (README, `sparsekern bench`). Runs:

- "dense" (the baseline): the nn.Linear / nn.Conv2d model;
- "sparse, static": sparsified, weights 0 off the masks, so every layer runs the dense kernel on its
  weight and masks only the weight gradient (`SparseModule.zero_off_mask`);
- "sparse + RigL (no update)": the same under a DST whose next update never comes;
- "sparse, masked path": the static model told its weights may be non-zero off the masks (OptG's
  path), which selects where(mask, W, 0) every step;
- "sparse + OptG" (eager only): OptG's steps, on the masked path with the dense weight gradient its scores
  read (`dense_grad` at every step), and OptG.step() before the optimizer's.

Peak memory (in each run's label, and its ratio to dense): the most memory a step allocates after
zero_grad above what it holds then (parameters, buffers, optimizer state, and the sparse models' masks,
whose size is in the size column), so that a persistent dense-gradient buffer or a mask-sized temporary
would show. Measured once per run while the case is built: on CUDA by torch.cuda.max_memory_allocated,
on CPU from the profiler's allocation events. compiled_training_step.py times the same runs under torch.compile.
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Callable

import torch
from torch import nn

from ...algorithms import OptG, RigL
from ...nn import sparse_modules, sparsify
from ..core import Case

OPS = ("training step",)

DENSITY = 0.1
DENSE = "dense"


def mlp(width: int, hidden: int | None = None) -> nn.Module:
    """width-hidden-hidden-10, hidden 2 * width unless given."""
    hidden = 2 * width if hidden is None else hidden
    return nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, 10))


def conv_net(channels: int) -> nn.Module:
    layers, inputs = [], 3
    for i, outputs in enumerate((channels, 2 * channels, 4 * channels, 8 * channels)):
        layers += [nn.Conv2d(inputs, outputs, 3, stride=1 if i == 0 else 2, padding=1, bias=False),
                   nn.BatchNorm2d(outputs), nn.ReLU()]
        inputs = outputs
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(inputs, 10))


class Transformer(nn.Module):
    """A sequence classifier: nn.TransformerEncoder (batch first, ReLU, no dropout) over `features`-dimensional
    inputs embedded to `width`, its outputs averaged over the sequence into a linear head to 10 classes."""

    def __init__(self, features: int, width: int, heads: int, layers: int):
        super().__init__()
        self.embed = nn.Linear(features, width)
        layer = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x)).mean(1))


# (description, model builder, input shape) per device and size.
MODELS = {
    False: [("MLP 1024-2048-2048-10, batch 256", lambda: mlp(1024), (256, 1024)),
            ("digits MLP 64-256-256-10, batch 64", lambda: mlp(64, 256), (64, 64)),
            ("conv net 3-32-64-128-256, batch 32, 32x32", lambda: conv_net(32), (32, 3, 32, 32))],
    True: [("MLP 64-128-128-10, batch 32", lambda: mlp(64), (32, 64)),
           ("conv net 3-4-8-16-32, batch 4, 8x8", lambda: conv_net(4), (4, 3, 8, 8))],
}
# Timed eager only (compiled_training_step takes MODELS).
TRANSFORMERS = {
    False: ("transformer 2 layers, width 64, 4 heads, batch 16 x 16 tokens", lambda: Transformer(16, 64, 4, 2),
            (16, 16, 16)),
    True: ("transformer 1 layer, width 16, 2 heads, batch 2 x 4 tokens", lambda: Transformer(8, 16, 2, 1), (2, 4, 8)),
}


def training_step(model: nn.Module, optimizer: torch.optim.Optimizer, x, y, algorithm=None) -> Callable[[], None]:
    """zero_grad, then `learning_step`. The callable keeps `learn` (the step after zero_grad), `model` and
    `optimizer` as attributes, for peak-memory measurements."""
    learn = learning_step(model, optimizer, x, y, algorithm)

    def run():
        optimizer.zero_grad()
        learn()

    run.learn, run.model, run.optimizer = learn, model, optimizer
    return run


def learning_step(model: nn.Module, optimizer: torch.optim.Optimizer, x, y, algorithm=None) -> Callable[[], None]:
    """A training step after zero_grad: forward, backward, [algorithm.step()], optimizer.step()."""
    def run():
        nn.functional.cross_entropy(model(x), y).backward()
        if algorithm is not None:
            algorithm.step()
        optimizer.step()
    return run


def _allocations(profile) -> list[int]:
    """Bytes allocated (> 0) and freed (< 0), in time order, from a CPU profile with memory events.

    The profiler's event tree is a private API, used here by a benchmark only."""
    allocation = torch._C._profiler._EventType.Allocation
    stack, events = list(profile.profiler.kineto_results.experimental_event_tree()), []
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == allocation:
            events.append((event.start_time_ns, event.extra_fields.alloc_size))
    return [size for _, size in sorted(events)]


@contextlib.contextmanager
def _kineto_silenced():
    """Sends file descriptor 2 to /dev/null: Kineto (torch 2.13 and later) writes two "USDT:" lines to it
    at every profiler start and stop, at a level KINETO_LOG_LEVEL does not silence, and a report would
    otherwise be interleaved with them. Python's own writes (a warning raised in the profiled step) still
    reach the real stderr, through a copy of the descriptor; exceptions are raised, not printed."""
    sys.stderr.flush()
    saved, python_stderr = os.dup(2), sys.stderr
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
        if _writes_to_fd_2(python_stderr):
            sys.stderr = open(saved, "w", encoding=python_stderr.encoding, errors="backslashreplace",
                              buffering=1, closefd=False)
        yield
    finally:
        if sys.stderr is not python_stderr:
            sys.stderr.close()
            sys.stderr = python_stderr
        os.dup2(saved, 2)
        os.close(saved)


def _writes_to_fd_2(stream) -> bool:
    """Whether a Python text stream writes to file descriptor 2 (not a capture or a StringIO)."""
    try:
        return stream.fileno() == 2
    except (AttributeError, OSError, ValueError):
        return False


def step_peak_bytes(learn: Callable[[], None], device: torch.device) -> int:
    """Peak memory a call of `learn` allocates above what is allocated when it starts."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        held = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        learn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - held
    with _kineto_silenced(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                    profile_memory=True) as profile:
        learn()
    peak = total = 0
    for size in _allocations(profile):
        total += size
        peak = max(peak, total)
    return peak


STATIC, RIGL, MASKED = "sparse, static", "sparse + RigL (no update)", "sparse, masked path"
OPTG = "sparse + OptG"


def momentum_sgd(parameters) -> torch.optim.Optimizer:
    return torch.optim.SGD(parameters, lr=0.01, momentum=0.9)


def adamw(parameters) -> torch.optim.Optimizer:
    return torch.optim.AdamW(parameters, lr=1e-3)


def fused_adamw(parameters) -> torch.optim.Optimizer:
    return torch.optim.AdamW(parameters, lr=1e-3, fused=True)


# The digits MLP's AdamW cases: (description, optimizer).
ADAMW = (("AdamW", adamw), ("AdamW fused=True", fused_adamw))


def training_runs(build: Callable[[], nn.Module], input_shape, device: torch.device,
                  compiled: bool = False, optimizer: Callable = momentum_sgd) -> dict[str, Callable[[], None]]:
    """One training-step callable per run (dense, static, RigL on a non-update step, masked path, and
    in eager mode OptG) of the model `build` makes, on a fixed random batch of `input_shape`, each with
    its own model copy and its own `optimizer(parameters)`. compiled: each step calls torch.compile(model)
    (compiled on its first call); the optimizer and RigL hold the model itself, whose parameters the
    compiled one shares."""
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(input_shape, generator=generator, device=device)
    y = torch.randint(0, 10, (input_shape[0],), generator=generator, device=device)

    def model(sparse: bool) -> nn.Module:
        torch.manual_seed(0)
        built = build().to(device)
        return sparsify(built, DENSITY, generator=torch.Generator().manual_seed(0)) if sparse else built

    models = {DENSE: model(False), STATIC: model(True), RIGL: model(True), MASKED: model(True)}
    if not compiled:
        models[OPTG] = model(True)
    for _, module in sparse_modules(models[MASKED]):
        module.zero_off_mask = False
    optimizers = {name: optimizer(m.parameters()) for name, m in models.items()}
    # A step count no update ever reaches: every step() is an ordinary, non-update step.
    algorithms = {RIGL: RigL(models[RIGL], optimizers[RIGL], update_every=10 ** 9, total_steps=10 ** 10)}
    if not compiled:
        # Its first epoch's masks (its sparsity ramp's start, not DENSITY: the speed of its steps does not depend
        # on the masks); with scores tied at 0, dense_while_scores_tie would keep them all True.
        algorithms[OPTG] = OptG(models[OPTG], density=DENSITY, epochs=10, dense_while_scores_tie=False)
    return {name: training_step(torch.compile(m) if compiled else m, optimizers[name], x, y, algorithms.get(name))
            for name, m in models.items()}


def step_peaks(runs: dict[str, Callable[[], None]], device: torch.device) -> dict[str, int]:
    """Peak bytes each run's step allocates above what it holds after zero_grad (`step_peak_bytes`),
    measured after two steps, so that optimizer state and allocator caches already exist."""
    peaks = {}
    for name, run in runs.items():
        run(), run()
        run.optimizer.zero_grad()
        peaks[name] = step_peak_bytes(run.learn, device)
    return peaks


def mask_bytes(runs: dict[str, Callable[[], None]]) -> int:
    """Bytes of the masks a sparse run holds between steps."""
    return sum(module.mask.numel() * module.mask.element_size() for _, module in sparse_modules(runs[STATIC].model))


def _case(description: str, build: Callable[[], nn.Module], input_shape, device: torch.device,
          optimizer: Callable = momentum_sgd) -> Case:
    runs = training_runs(build, input_shape, device, optimizer=optimizer)
    peaks = step_peaks(runs, device)
    label = {name: f"{name} (step peak {peak / 2 ** 20:.1f} MB, {peak / peaks[DENSE]:.2f}x dense)"
             for name, peak in peaks.items()}
    size = f"{description}, d={DENSITY}, masks held {mask_bytes(runs) / 2 ** 20:.1f} MB"
    return Case("training step", size, {label[name]: run for name, run in runs.items()}, baseline=label[DENSE])


def cases(device: torch.device, quick: bool) -> list[Case]:
    models = (*MODELS[quick], TRANSFORMERS[quick])
    # The digits MLP (on --quick, the small MLP): its small products leave the optimizer's share of a step largest.
    digits, build, shape = MODELS[quick][0 if quick else 1]
    return ([_case(description, build, shape, device) for description, build, shape in models]
            + [_case(f"{digits}, {name}", build, shape, device, optimizer) for name, optimizer in ADAMW])
