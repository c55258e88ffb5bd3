"""pytest-benchmark view of the cases in sparsekern.bench.cases: one benchmark per case x implementation.

Each `benchmark_<topic>.py` names its case module in CASE_MODULE and gets a `case_run` parameter per
implementation of every case, grouped by case so pytest-benchmark compares each run with its baseline.
Options: --bench-device cpu|cuda (default cpu), --bench-quick (the tiny sizes of the CI smoke test).
Implementations slower than a second per call run 3 rounds instead of pytest-benchmark's minimum of 5.
Run: python -m pytest benchmarks --benchmark-enable [--bench-quick]
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import pytest
import torch

from sparsekern.bench import core


def pytest_addoption(parser):
    group = parser.getgroup("sparsekern benchmarks")
    group.addoption("--bench-device", choices=("cpu", "cuda"), default="cpu",
                    help="device of the benchmark inputs")
    group.addoption("--bench-quick", action="store_true", help="tiny sizes (the CI smoke test's)")


def pytest_collect_file(file_path, parent):
    # The files are named like their ops (benchmark_<op>.py), outside pytest's test_*.py pattern.
    if file_path.suffix == ".py" and file_path.name.startswith("benchmark_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@dataclass(frozen=True)
class CaseRun:
    """One implementation of one case, timed by pytest-benchmark's `benchmark` fixture."""

    case: core.Case
    label: str
    device: torch.device

    def __call__(self, benchmark):
        benchmark.group = f"{self.case.op} [{self.case.size}]"
        benchmark.extra_info.update(baseline=self.case.baseline, is_baseline=self.label == self.case.baseline)
        run = self.case.runs[self.label]
        if self.device.type == "cuda":
            def synchronized():
                result = run()
                torch.cuda.synchronize()
                return result
            run = synchronized
        if not benchmark.disabled and _seconds(run) >= SLOW_CALL_S:
            # pytest-benchmark's default of at least 5 rounds costs minutes for the slow reference.
            benchmark.pedantic(run, rounds=SLOW_ROUNDS, iterations=1)
        else:
            benchmark(run)


SLOW_CALL_S = 1.0
SLOW_ROUNDS = 3


def _seconds(run) -> float:
    """Duration of one call (also the warm-up)."""
    begin = time.perf_counter()
    run()
    return time.perf_counter() - begin


def pytest_generate_tests(metafunc):
    if "case_run" not in metafunc.fixturenames:
        return
    device = torch.device(metafunc.config.getoption("--bench-device"))
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("--bench-device cuda: no CUDA device", allow_module_level=True)
    quick = metafunc.config.getoption("--bench-quick")
    runs = [CaseRun(case, label, device)
            for case in core.load_cases(metafunc.module.CASE_MODULE, device, quick) for label in case.runs]
    metafunc.parametrize("case_run", runs, ids=[f"{r.case.op} [{r.case.size}] {r.label}" for r in runs])
