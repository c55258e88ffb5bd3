"""The benchmark engine: what a case is, how one implementation is timed, and how cases are found.

A case module is any module in `sparsekern.bench.cases` with a function
`cases(device: torch.device, quick: bool) -> list[Case]`. Inputs are built inside `cases` (so
building them is never timed) and captured by the zero-argument callables in `Case.runs`.
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
class Timing:
    """Median wall time of one call in milliseconds, over `repeats` calls after warm-up."""

    median_ms: float
    repeats: int


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
# several-fold, so a call merely over budget still gets a timed repeat).
SLOW_CALL_BUDGETS = 4


def time_call(run: Callable[[], object], device: torch.device, budget_s: float = 2.0,
              max_repeats: int = 100) -> Timing:
    """Times `run`: warm-up calls, then the median of as many calls as fit in about `budget_s`.

    The repeat count adapts to the warm-up's duration (at most `max_repeats`), so slow reference
    implementations on CPU cost a few calls, not a fixed hundred. A CPU call that alone outlasts
    SLOW_CALL_BUDGETS budgets is timed once, its warm-up being the sample (at many seconds per call,
    first-call costs are noise). On CUDA every call is bracketed by CUDA events and synchronized, so
    queued kernels count.
    """
    on_cuda = device.type == "cuda"
    # On CUDA the first calls compile and autotune Triton kernels; on CPU one call pages inputs in.
    warmups = 3 if on_cuda else 1
    last_s = 0.0
    for _ in range(warmups):
        last_s = _one_call_s(run, on_cuda)
    if not on_cuda and last_s >= SLOW_CALL_BUDGETS * budget_s:
        return Timing(median_ms=1e3 * last_s, repeats=1)
    repeats = max(1, min(max_repeats, int(budget_s / max(last_s, 1e-6))))
    samples = [_one_call_s(run, on_cuda) for _ in range(repeats)]
    return Timing(median_ms=1e3 * statistics.median(samples), repeats=repeats)


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

    Those that can run and that the automatic choice would take on this device type: Triton on
    CPU runs only in the interpreter, which checks kernels but says nothing about their speed.
    """
    reasons = _backend._reasons(op, device.type)
    return [name for name, why in reasons.items()
            if why is None and _backend._REGISTRY[op][name].automatic(device.type)]


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
    """Names of the case modules in sparsekern.bench.cases, sorted; just `only` if it names one."""
    from . import cases as package

    names = sorted(info.name for info in pkgutil.iter_modules(package.__path__) if not info.name.startswith("_"))
    return [only] if only in names else names


def load_cases(module: str, device: torch.device, quick: bool) -> list[Case]:
    """The cases of one module of sparsekern.bench.cases."""
    return importlib.import_module(f"{__package__}.cases.{module}").cases(device, quick)


def discover(device: torch.device, quick: bool, only: str | None = None) -> Iterator[Case]:
    """Every case of every case module, one module at a time (each module's inputs are freed before
    the next is built). `only` keeps one module, or else the cases whose op starts with it."""
    for module in case_modules(only):
        for case in load_cases(module, device, quick):
            if only is None or module == only or case.op.startswith(only):
                yield case


def measure(case: Case, device: torch.device, budget_s: float = 2.0) -> list[Row]:
    """Times every implementation of a case; a run that raises gets a row with its error, not a crash."""
    timings: dict[str, Timing | Exception] = {}
    for label, run in case.runs.items():
        try:
            timings[label] = time_call(run, device, budget_s)
        except Exception as error:  # one broken implementation must not hide the others' figures
            timings[label] = error
    baseline = timings[case.baseline]
    baseline_ms = baseline.median_ms if isinstance(baseline, Timing) else math.nan
    rows = []
    for label, timing in timings.items():
        if isinstance(timing, Timing):
            rows.append(Row(case.op, case.size, label, timing.median_ms, baseline_ms / timing.median_ms,
                            timing.repeats, case.baseline))
        else:
            rows.append(Row(case.op, case.size, label, math.nan, math.nan, 0, case.baseline,
                            error=f"{type(timing).__name__}: {timing}"))
    return rows
