"""The benchmark engine: what a case is, how one implementation is timed, and how cases are found.

A case module is any module in `sparsekern.bench.cases` with a function
`cases(device: torch.device, quick: bool) -> list[Case]` and a tuple `OPS` of the ops its cases
report (so that `--only` is checked, and its modules chosen, without building any case, which for
some modules takes seconds). Inputs are built inside `cases` (so building them is never timed) and
captured by the zero-argument callables in `Case.runs`. A module that sets `ON_REQUEST = True` is left
out of the full report and runs only when `--only` names it or one of its ops (compiled_training_step:
its cases compile models for minutes, which no `--budget` bounds). A module that may not run everywhere
has `unavailable(device) -> str | None`, the reason it cannot run there (its `cases` then returns none).
"""
from __future__ import annotations

import contextlib
import importlib
import math
import os
import pkgutil
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from ..ops import _backend


@dataclass(frozen=True)
class Case:
    """One op at one size, and the implementations to compare on it.

    op: what is measured, e.g. "topk_mask (global)". size: the input, in words, e.g. "resnet50 d=0.1".
    runs: implementation label (e.g. "sparsekern[compiled/cpu]", "torch cat+topk") -> zero-argument callable
    doing the work once. baseline: the key of `runs` every ratio is taken against.
    """

    op: str
    size: str
    runs: dict[str, Callable[[], object]]
    baseline: str

    def __post_init__(self):
        if self.baseline not in self.runs:
            raise ValueError(f"baseline must be one of the runs {sorted(self.runs)}, got {self.baseline!r}")


@dataclass(frozen=True)
class Row:
    """One line of the report. ratio = baseline time / this time, so > 1 means faster than the baseline."""

    op: str
    size: str
    implementation: str
    time_ms: float
    ratio: float
    repeats: int
    baseline: str
    error: str | None = None


# A warm-up call this many budgets long is the only sample (a contended machine can slow one call
# several-fold, so a call merely over budget still gets timed repeats).
SLOW_CALL_BUDGETS = 4


def _one_call_s(run: Callable[[], object], on_cuda: bool) -> float:
    if on_cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        run()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    begin = time.perf_counter()
    run()
    return time.perf_counter() - begin


def usable_backends(op: str, device: torch.device) -> list[str]:
    """sparsekern backends worth timing for `op` (a registry op name) on `device`.

    Those the automatic choice picks from on this device type (`sparsekern.ops._backend.automatic_backends`):
    never Triton on CPU, whose interpreter checks kernels but says nothing about their speed.
    """
    return _backend.automatic_backends(op, device.type)


@contextlib.contextmanager
def forced_backend(name: str) -> Iterator[None]:
    """Runs the block with SPARSEKERN_BACKEND=name, restoring the previous setting after."""
    previous = os.environ.get(_backend.ENV_VAR)
    os.environ[_backend.ENV_VAR] = name
    try:
        yield
    finally:
        if previous is None:
            del os.environ[_backend.ENV_VAR]
        else:
            os.environ[_backend.ENV_VAR] = previous


def sparsekern_runs(op: str, device: torch.device, call: Callable[[], object]) -> dict[str, Callable[[], object]]:
    """{"sparsekern[<backend>]": call under that backend} for every backend of `op` usable on `device`.

    `call` goes through the public entry point (sparsekern.ops), so argument checks and dispatch
    are timed as users pay them; the backend is forced with SPARSEKERN_BACKEND.
    """
    def forced(name):
        def run():
            with forced_backend(name):
                return call()
        return run
    return {f"sparsekern[{_backend.label(name, device.type)}]": forced(name)
            for name in usable_backends(op, device)}


def case_modules(only: str | None = None) -> list[str]:
    """Names of the case modules in sparsekern.bench.cases, sorted. With `only`: just that module if
    it names one, else the modules with an op (their `OPS`) starting with it; a ValueError naming
    the modules and ops when there is none. Without `only`, the modules not run on request only."""
    from . import cases as package

    names = sorted(info.name for info in pkgutil.iter_modules(package.__path__) if not info.name.startswith("_"))
    if only is None:
        return [name for name in names if not getattr(_module(name), "ON_REQUEST", False)]
    if only in names:
        return [only]
    matching = [name for name in names if any(op.startswith(only) for op in _ops(name))]
    if not matching:
        ops = sorted({op for name in names for op in _ops(name)})
        raise ValueError(f"--only {only!r} names no case module and starts no op; case modules: {', '.join(names)}; "
                         f"ops: {', '.join(ops)}")
    return matching


def _module(name: str):
    return importlib.import_module(f"{__package__}.cases.{name}")


def _ops(module: str) -> tuple[str, ...]:
    return _module(module).OPS


def unavailable(modules: list[str], device: torch.device) -> list[str]:
    """"<module>: <reason>" for each of `modules` that says (its `unavailable`) it cannot run on `device`."""
    reasons = []
    for name in modules:
        check = getattr(_module(name), "unavailable", None)
        reason = check(device) if check is not None else None
        if reason is not None:
            reasons.append(f"{name}: {reason}")
    return reasons


def load_cases(module: str, device: torch.device, quick: bool) -> list[Case]:
    """The cases of one module of sparsekern.bench.cases."""
    return _module(module).cases(device, quick)


def discover(device: torch.device, quick: bool, only: str | None = None) -> Iterator[Case]:
    """Every case of every case module, one module at a time (each module's inputs are freed before
    the next is built). `only` keeps one module, or else the cases whose op starts with it (a
    ValueError, before anything is built, when it does neither)."""
    for module in case_modules(only):
        for case in load_cases(module, device, quick):
            if only is None or module == only or case.op.startswith(only):
                yield case


def measure(case: Case, device: torch.device, budget_s: float = 2.0, max_rounds: int = 100) -> list[Row]:
    """Times every implementation of a case; a run that raises gets a row with its error, not a crash.

    The implementations are timed in rounds, each calling every one of them once (in an order that
    rotates from round to round), as many rounds as fit in about `budget_s` per implementation (at
    most `max_rounds`), after warm-up calls. A row's time is the median of its calls, and its ratio
    the median over rounds of baseline time / its time in the same round: on a shared machine, load
    that comes and goes slows both sides of a ratio alike, where timing one implementation after
    another would credit the load to whichever ran while it lasted. A CPU implementation whose
    warm-up call alone outlasts SLOW_CALL_BUDGETS budgets is timed by that call only (at many
    seconds per call, first-call costs are noise), and its ratio taken from the medians. On CUDA
    every call is bracketed by CUDA events and synchronized, so queued kernels count; the first
    calls there compile and autotune Triton kernels, so they warm up three times.
    """
    on_cuda = device.type == "cuda"
    samples: dict[str, list[float]] = {}
    errors: dict[str, Exception] = {}

    def call(label: str) -> float | None:
        try:
            return _one_call_s(case.runs[label], on_cuda)
        except Exception as error:  # one broken implementation must not hide the others' figures
            errors[label] = error
            return None

    warm_s = {}
    for label in case.runs:
        for _ in range(3 if on_cuda else 1):
            warm_s[label] = call(label)
            if label in errors:
                break
    slow = {label for label, s in warm_s.items()
            if label not in errors and not on_cuda and s >= SLOW_CALL_BUDGETS * budget_s}
    for label in slow:
        samples[label] = [warm_s[label]]
    rotating = [label for label in case.runs if label not in errors and label not in slow]
    round_s = sum(warm_s[label] for label in rotating)
    rounds = max(1, min(max_rounds, int(budget_s * len(rotating) / max(round_s, 1e-6)))) if rotating else 0
    per_round: list[dict[str, float]] = []
    for r in range(rounds):
        timed = {}
        for i in range(len(rotating)):
            label = rotating[(r + i) % len(rotating)]
            if label not in errors:
                timed[label] = call(label)
        per_round.append({label: s for label, s in timed.items() if label not in errors})
    for label in rotating:
        if label not in errors:
            samples[label] = [times[label] for times in per_round]
    return [_row(case, label, samples, errors, per_round) for label in case.runs]


def _row(case: Case, label: str, samples: dict[str, list[float]], errors: dict[str, Exception],
         per_round: list[dict[str, float]]) -> Row:
    if label in errors:
        error = errors[label]
        return Row(case.op, case.size, label, math.nan, math.nan, 0, case.baseline,
                   error=f"{type(error).__name__}: {error}")
    time_s = statistics.median(samples[label])
    paired = [times[case.baseline] / times[label] for times in per_round if case.baseline in times and label in times]
    if paired:
        ratio = statistics.median(paired)
    elif case.baseline in samples:
        ratio = statistics.median(samples[case.baseline]) / time_s
    else:
        ratio = math.nan
    return Row(case.op, case.size, label, 1e3 * time_s, ratio, len(samples[label]), case.baseline)
