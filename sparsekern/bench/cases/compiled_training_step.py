"""The training step of training_step.py with the model under torch.compile, sparse against dense.

The runs are training_step's (dense, the baseline; sparse static; sparse + RigL on a non-update step;
sparse, masked path), each calling `torch.compile(model)` (Inductor, default mode) for its forward and
backward; zero_grad, the cross-entropy loss, RigL's step and SGD's step stay eager. Models: the
quick ones with quick=True, else the digits MLP 64-256-256-10 and the conv net 3-32-64-128-256 (the
1024-2048-2048-10 MLP would add minutes of compiling for a ratio its products already decide).

Every model is compiled while the case is built, by its first step, never in a timed call: that step
(tens of seconds each, cold, on CPU) is in each run's label. The static and RigL models have the same
structure, so the RigL one may reuse the static one's compiled code and its first step be short. No
--budget bounds the compiling, so the full report leaves this module out: it runs when `--only` names it
(ON_REQUEST, read by core.case_modules). Peak memory is training_step's to report.
"""
from __future__ import annotations

import time
from typing import Callable

import torch
from torch import nn

from ..core import Case
from .training_step import DENSE, DENSITY, MODELS, training_runs

OPS = ("compiled training step",)
ON_REQUEST = True


def unavailable(device: torch.device) -> str | None:
    """Why torch.compile cannot compile a training step on `device` here, or None. Inductor builds CPU
    kernels with a C++ compiler and GPU kernels with Triton; torch checks both only at the first call."""
    try:
        torch._dynamo.eval_frame.check_if_dynamo_supported()
    except RuntimeError as error:
        return f"torch.compile cannot run here: {error}"
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return None if has_triton() else "torch.compile's Inductor needs Triton on CUDA, and it is not installed"
    try:  # private to torch: where a release moves it, the first step's error shows in the rows instead
        from torch._inductor.cpp_builder import get_cpp_compiler
    except ImportError:
        return None
    try:
        get_cpp_compiler()
    except RuntimeError as error:  # InvalidCxxCompiler
        return f"torch.compile's Inductor needs a C++ compiler on CPU: {' '.join(str(error).split())}"
    return None


def _first_step(run: Callable[[], None]) -> tuple[Callable[[], None], str]:
    """Compiles by a first step, then takes a second (momentum buffers exist, nothing left to compile).
    Returns the run and its label's note, or, when compiling fails, a run that raises its error, so
    that the report shows it in the run's row."""
    begin = time.perf_counter()
    try:
        run()
        seconds = time.perf_counter() - begin
        run()
    except Exception as error:  # one model torch cannot compile must not hide the others' figures
        def failed(error=error):
            raise error
        return failed, "compile failed"
    return run, f"first step, compiling, {seconds:.1f} s"


def _case(description: str, build: Callable[[], nn.Module], input_shape, device: torch.device) -> Case:
    runs = training_runs(build, input_shape, device, compiled=True)
    labelled = {}
    for name, run in runs.items():
        run, note = _first_step(run)
        labelled[f"compiled {name} ({note})"] = run
    baseline = next(label for label in labelled if label.startswith(f"compiled {DENSE} ("))
    return Case("compiled training step", f"{description}, d={DENSITY}", labelled, baseline=baseline)


def _start_compile_workers() -> None:
    """Starts Inductor's pool of compile workers (when it compiles with more than one process; torch's own
    `backend="inductor"` entry starts it at every compile, torch.compile's default path at its first Triton kernel)
    with SIGINT held, so that none of its processes takes a Ctrl-C: a terminal's reaches the whole process group, and
    workers still importing torch (torch ignores SIGINT in them only once they run) died of it, each printing a
    traceback where their output is not suppressed. The bench's own process answers it: one line, exit code 130."""
    from torch._inductor.async_compile import AsyncCompile

    from ...cli.interrupts import held_while_starting_workers   # here: the command line imports the bench

    with held_while_starting_workers():
        AsyncCompile.warm_pool()


def cases(device: torch.device, quick: bool) -> list[Case]:
    if unavailable(device) is not None:
        return []
    _start_compile_workers()
    # Dynamo keeps at most 8 compiled versions of one function (nn.Sequential.forward here) and falls back
    # to eager past them; each model structure and path takes one. Starting empty keeps far below.
    torch._dynamo.reset()
    models = MODELS[True] if quick else MODELS[False][1:]
    return [_case(description, build, shape, device) for description, build, shape in models]
