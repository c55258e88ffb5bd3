"""The Python side of benchmarks/gpu_check.sh: environment, Triton warm-up, sanitizer and profiler
workloads, the goal benchmarks of issue 16, and the results file. Run from the repository root:

  python3 -m benchmarks.gpu_goals env OUT_DIR            env.json (GPU, driver, versions, commit)
  python3 -m benchmarks.gpu_goals warm I N                compile configs[I::N] of every Triton autotuner
  python3 -m benchmarks.gpu_goals sanitize                a small workload over every CUDA kernel
  python3 -m benchmarks.gpu_goals goals OUT.jsonl         each goal case against its torch baseline
  python3 -m benchmarks.gpu_goals profile                 the launches ncu looks at
  python3 -m benchmarks.gpu_goals results OUT_DIR         OUT_DIR/results/<date>-<h100|h200>.md

--dry-run (any command) runs the same logic on the CPU with tiny sizes, so that the script is tested
where there is no GPU (tests/bench/test_gpu_check.py). Every goal row is appended to the JSON-lines
file as soon as it is measured: a run stopped at its time limit keeps what it finished.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import math
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

# sparse_linear's crossover sweep (the goal cases are density 0.1, batch 1, 4, 16).
CROSSOVER_DENSITIES = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7)
CROSSOVER_BATCHES = (1, 2, 4, 8, 16)


def device_for(dry_run: bool) -> torch.device:
    return torch.device("cpu" if dry_run else "cuda")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, device: torch.device, sample_ms: float = 20.0, samples: int = 5) -> float:
    """Median milliseconds per call: each sample runs `fn` back to back for about `sample_ms`
    (between two CUDA events on a GPU), so that launch gaps count as a user pays them. On the CPU
    (the dry run, which checks the logic, not the speed) one call is the sample."""
    if device.type != "cuda":
        sample_ms, samples = 0.0, 1
    fn()
    synchronize(device)
    begin = time.perf_counter()
    fn()
    synchronize(device)
    once_ms = max(1e3 * (time.perf_counter() - begin), 1e-3)
    repeats = max(1, min(1000, int(sample_ms / once_ms)))
    results = []
    for _ in range(samples):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(repeats):
                fn()
            end.record()
            end.synchronize()
            results.append(start.elapsed_time(end) / repeats)
        else:
            begin = time.perf_counter()
            for _ in range(repeats):
                fn()
            results.append(1e3 * (time.perf_counter() - begin) / repeats)
    return statistics.median(results)


class Recorder:
    """Appends one JSON object per line to `path` and flushes it at once."""

    def __init__(self, path: str):
        self.path = path

    def __call__(self, **row) -> None:
        with open(self.path, "a") as stream:
            stream.write(json.dumps(row, default=str) + "\n")
        shown = {key: (round(value, 4) if isinstance(value, float) else value) for key, value in row.items()}
        print("RESULT", json.dumps(shown, default=str), flush=True)


def goal_row(record, goal: str, case: str, impl: str, ms: float, baseline: str, baseline_ms: float, target: str,
             max_time_ratio: float | None = None, max_ms: float | None = None, **extra) -> None:
    """One line of the goal table; `met` compares time / baseline time, or the time itself, with the target."""
    ratio = ms / baseline_ms if baseline_ms else math.nan
    met = (ratio <= max_time_ratio if max_time_ratio is not None else ms <= max_ms if max_ms is not None else None)
    record(kind="goal", goal=goal, case=case, impl=impl, ms=ms, baseline=baseline, baseline_ms=baseline_ms,
           time_ratio=ratio, target=target, met=met, **extra)


# ------------------------------------------------------------------------------------------ goals

def goal_topk(record, device, dry_run):
    from sparsekern import ops
    from sparsekern.bench.core import forced_backend, usable_backends
    from sparsekern.bench.shapes import RESNET50, RESNET50_TINY, random_tensors
    from sparsekern.ops import reference
    scores = [s.abs_() for s in random_tensors(RESNET50_TINY if dry_run else RESNET50, device)]
    k = round(0.1 * sum(s.numel() for s in scores))
    flat = torch.cat([s.reshape(-1) for s in scores])
    baseline_ms = time_ms(lambda: flat.topk(k, sorted=False), device)
    want = reference.topk_mask(scores, k)
    case = f"ResNet-50 list, {flat.numel() / 1e6:.3g}M fp32, k = 10%"
    for backend in [b for b in usable_backends("topk_mask", device) if b != "reference"]:
        def run():
            with forced_backend(backend):
                return ops.topk_mask(scores, k)
        exact = all(torch.equal(g, w) for g, w in zip(run(), want))
        goal_row(record, "global topk_mask", case, f"sparsekern[{backend}]", time_ms(run, device),
                 "torch.topk, one flat tensor", baseline_ms, "<= 0.15 ms", max_ms=0.15, exact=exact)


def goal_rigl(record, device, dry_run):
    from sparsekern.bench.core import load_cases
    for case in load_cases("dst", device, quick=dry_run):
        if not case.op.startswith("RigL update"):
            continue
        baseline_ms = time_ms(case.runs[case.baseline], device)
        for label, run in case.runs.items():
            if label != case.baseline and "reference" not in label:
                goal_row(record, case.op, case.size, label, time_ms(run, device), case.baseline, baseline_ms,
                         "<= 1 ms", max_ms=1.0)


def _block_mask(rows, cols, density, generator, device, block=32):
    blocks = torch.rand((-(-rows // block), -(-cols // block)), generator=generator, device=device) < density
    return blocks.repeat_interleave(block, 0).repeat_interleave(block, 1)[:rows, :cols].contiguous()


def masked_linear_problems(device, dry_run):
    """(goal, case, dtype, tokens, in, out, mask kind, modes, target time ratio) of the masked-linear goals."""
    if dry_run:
        return [("masked linear fwd+bwd", "64x96 -> 80, d=0.1", torch.float32, 64, 96, 80, "unstructured",
                 ("fwd+bwd",), 1.05),
                ("block-sparse 32x32", "64x96 -> 64, 32x32 blocks d=0.25", torch.float32, 64, 96, 64, "blocks",
                 ("fwd", "fwd+bwd"), 0.2)]
    return [("masked linear fwd+bwd", "4096x4096 -> 4096, d=0.1, bf16", torch.bfloat16, 4096, 4096, 4096,
             "unstructured", ("fwd+bwd",), 1.05),
            ("block-sparse 32x32", "4096x8192 -> 8192, 32x32 blocks d=0.1, fp16", torch.float16, 4096, 8192, 8192,
             "blocks", ("fwd", "fwd+bwd"), 0.2)]


def _masked_linear_inputs(dtype, tokens, in_features, out_features, kind, device, dry_run):
    generator = torch.Generator(device=device).manual_seed(0)

    def randn(*shape):
        return torch.randn(shape, generator=generator, device=device).to(dtype)
    x, weight, bias, grad_out = randn(tokens, in_features), randn(out_features, in_features), randn(out_features), \
        randn(tokens, out_features)
    if kind == "blocks":
        mask = _block_mask(out_features, in_features, 0.25 if dry_run else 0.1, generator, device)
    else:
        mask = torch.rand((out_features, in_features), generator=generator, device=device) < 0.1
    return x, weight * mask, mask, bias, grad_out   # 0 off the mask, as sparse modules keep it


def goal_masked_linear(record, device, dry_run):
    from sparsekern import ops
    from sparsekern.bench.cases.masked_linear import forward_backward_run, forward_run
    from sparsekern.bench.core import forced_backend
    backend = "auto" if dry_run else "triton"

    def sparsekern_linear(x, weight, mask, bias):
        with forced_backend(backend):
            return ops.masked_linear(x, weight, mask, bias)

    def sparse_module_linear(x, weight, mask, bias):
        # What SparseLinear runs for sparsify/DST/IMP models: weights 0 off the mask, so the dense
        # kernel on the weight itself, and the weight gradient masked in place.
        return ops.masked_linear(x, weight, mask, bias, zero_off_mask=True)

    def dense(x, weight, mask, bias):
        return torch.nn.functional.linear(x, weight, bias)

    def mask_then_matmul(x, weight, mask, bias):
        return torch.nn.functional.linear(x, weight * mask, bias)
    for goal, case, dtype, tokens, k, n, kind, modes, target in masked_linear_problems(device, dry_run):
        x, weight, mask, bias, grad_out = _masked_linear_inputs(dtype, tokens, k, n, kind, device, dry_run)
        for mode in modes:
            def make(linear):
                return forward_run(linear, x, weight, mask, bias) if mode == "fwd" else \
                    forward_backward_run(linear, x, weight, mask, bias, grad_out)
            baseline_ms = time_ms(make(dense), device)
            text = f"<= {target}x dense time" if target >= 1 else f">= {1 / target:.0f}x faster than dense"
            for label, linear in ((f"sparsekern[{backend}]", sparsekern_linear),
                                  ("SparseLinear (zero_off_mask)", sparse_module_linear),
                                  ("torch mask-then-matmul", mask_then_matmul)):
                goal_row(record, goal, f"{case}, {mode}", label, time_ms(make(linear), device),
                         "dense F.linear", baseline_ms, text, max_time_ratio=target)


class PackedRotation:
    """`copies` packed weights (and two dense ones) of one size and density, used in turn, so that a
    22 MB packed weight is not served from the 50 MB L2 cache as one reused weight would be."""

    def __init__(self, size, density, dtype, device, generator, copies=4):
        from sparsekern import ops
        self.packed, self.dense = [], []
        for i in range(copies):
            weight = torch.randn(size, size, generator=generator, device=device).to(dtype)
            mask = torch.rand(size, size, generator=generator, device=device) < density
            self.packed.append(ops.pack(weight, mask))
            if i < 2:
                self.dense.append(torch.where(mask, weight, torch.zeros((), dtype=dtype, device=device)))
        self.turn = 0

    def kernel(self, x):
        def run():
            self.turn += 1
            p = self.packed[self.turn % len(self.packed)]
            return torch.ops.sparsekern.sparse_linear(x, p.bitmap, p.values, p.chunk_offsets, None)
        return run

    def entry_point(self, x):
        from sparsekern import ops

        def run():
            self.turn += 1
            return ops.sparse_linear(x, self.packed[self.turn % len(self.packed)])
        return run

    def dense_linear(self, x):
        def run():
            self.turn += 1
            return torch.nn.functional.linear(x, self.dense[self.turn % len(self.dense)])
        return run


def goal_sparse_linear(record, device, dry_run):
    from sparsekern.ops import _extension
    dtype = torch.float32 if dry_run else torch.float16
    size = 256 if dry_run else 8192
    generator = torch.Generator(device=device).manual_seed(0)
    has_kernel = _extension.kernel_missing("sparse_linear", device.type) is None
    densities = (0.1, 0.5) if dry_run else CROSSOVER_DENSITIES
    batches = (1, 16) if dry_run else CROSSOVER_BATCHES
    for density in densities:
        weights = PackedRotation(size, density, dtype, device, generator)
        for batch in batches:
            x = torch.randn(batch, size, generator=generator, device=device).to(dtype)
            dense_ms = time_ms(weights.dense_linear(x), device)
            runs = {"sparsekern.ops.sparse_linear": weights.entry_point(x)}
            rel_err = None
            if has_kernel:
                runs["sparsekern kernel"] = weights.kernel(x)
                p = weights.packed[0]
                got = torch.ops.sparsekern.sparse_linear(x, p.bitmap, p.values, p.chunk_offsets, None).double()
                want = x.double() @ p.unpack().double().T
                rel_err = float((got - want).norm() / want.norm().clamp_min(1e-30))
            case = f"{size}^2 {str(dtype)[6:]}, d={density}, batch {batch}"
            for label, run in runs.items():
                ms = time_ms(run, device)
                if density == 0.1 and batch in (1, 4, 16):
                    goal_row(record, "sparse_linear", case, label, ms, "dense F.linear", dense_ms,
                             ">= 4x faster than dense", max_time_ratio=0.25, rel_err=rel_err)
                if label == "sparsekern kernel":
                    record(kind="crossover", density=density, batch=batch, kernel_ms=ms, dense_ms=dense_ms,
                           time_ratio=ms / dense_ms)
        del weights
        if device.type == "cuda":
            torch.cuda.empty_cache()


def goal_peak_memory(record, device, dry_run):
    from sparsekern.bench.cases.training_step import mlp, step_peaks, training_runs
    width, batch = (32, 16) if dry_run else (2048, 512)
    peaks = step_peaks(training_runs(lambda: mlp(width), (batch, width), device), device)
    record(kind="memory", case=f"MLP {width}-{2 * width}-{2 * width}-10, batch {batch}, SGD momentum, d=0.1",
           peak_mib={name: peak / 2 ** 20 for name, peak in peaks.items()},
           target="sparse steps <= dense step")


GOALS = {"topk": goal_topk, "rigl": goal_rigl, "masked_linear": goal_masked_linear,
         "sparse_linear": goal_sparse_linear, "peak_memory": goal_peak_memory}


def run_goals(path: str, dry_run: bool, only: list[str] | None) -> int:
    record = Recorder(path)
    device = device_for(dry_run)
    failures = 0
    for name, goal in GOALS.items():
        if only and name not in only:
            continue
        begin = time.time()
        try:
            goal(record, device, dry_run)
        except Exception as error:  # one broken goal must not hide the others' figures
            failures += 1
            record(kind="error", goal=name, error=f"{type(error).__name__}: {error}"[:600],
                   trace=traceback.format_exc()[-1500:])
        print(f"[goal {name} took {time.time() - begin:.1f}s]", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 1 if failures else 0


# ------------------------------------------------------------------------- warm-up, workloads

def limit_autotune(select) -> None:
    """Makes every Triton autotuner decorated from now on keep only `select(configs)`: Triton's
    `autotune` is replaced under each name it is imported by, whatever helper a kernel module uses."""
    import triton
    import triton.runtime
    import triton.runtime.autotuner as autotuner

    original = autotuner.autotune

    def limited(configs, key, **kwargs):
        return original(configs=select(list(configs)) or list(configs)[:1], key=key, **kwargs)
    triton.autotune = triton.runtime.autotune = autotuner.autotune = limited


def warm(index: int, workers: int, dry_run: bool) -> int:
    """Worker `index` of `workers`: every Triton autotuner keeps configs[index::workers] and runs the
    masked-linear goal problems once, compiling those configs into TRITON_CACHE_DIR; the benchmark then
    autotunes over all of them and finds each compiled."""
    if not dry_run:
        limit_autotune(lambda configs: configs[index::workers])
    device = device_for(dry_run)
    from sparsekern import ops
    from sparsekern.bench.cases.masked_linear import forward_backward_run, forward_run
    from sparsekern.bench.core import forced_backend
    for goal, case, dtype, tokens, k, n, kind, modes, _ in masked_linear_problems(device, dry_run):
        begin = time.time()
        try:
            x, weight, mask, bias, grad_out = _masked_linear_inputs(dtype, tokens, k, n, kind, device, dry_run)
            with forced_backend("auto" if dry_run else "triton"):
                for mode in modes:
                    run = forward_run(ops.masked_linear, x, weight, mask, bias) if mode == "fwd" else \
                        forward_backward_run(ops.masked_linear, x, weight, mask, bias, grad_out)
                    run()
            synchronize(device)
            print(f"warm {index}/{workers} {goal} [{case}]: ok in {time.time() - begin:.1f}s", flush=True)
        except Exception as error:  # noqa: BLE001  (a warm-up failure shows again in the tests)
            print(f"warm {index}/{workers} {goal} [{case}]: {type(error).__name__}: {error}"[:400], flush=True)
    return 0


def sanitize_workload(dry_run: bool, small: bool) -> int:
    """Every compiled CUDA kernel on small, awkward inputs (ties, NaN, -0.0, empty, odd sizes, every
    dtype, sparse_linear's every batch tile and its summed-slab path), for memcheck; `small` keeps one
    case of each kind, for racecheck, which follows every shared-memory access."""
    from sparsekern import ops
    from sparsekern.bench.core import forced_backend
    from sparsekern.ops import _extension
    device = device_for(dry_run)
    generator = torch.Generator().manual_seed(0)
    small = small or dry_run
    failures = 0

    def part(name, body):
        nonlocal failures
        if _extension.kernel_missing(name, device.type) is not None:
            print(f"{name}: skipped ({_extension.kernel_missing(name, device.type)})", flush=True)
            return
        try:
            body()
            synchronize(device)
            print(f"{name}: ran", flush=True)
        except Exception as error:  # noqa: BLE001  (the other kernels still get checked)
            failures += 1
            print(f"{name}: FAILED {type(error).__name__}: {error}"[:500], flush=True)

    def topk():
        shapes = [(300, 7), (4097,), (5,), (0,), (64, 3, 3, 3)]
        base = [((torch.randn(s, generator=generator, dtype=torch.float64) * 2).round() / 2) for s in shapes]
        for t in base:
            if t.numel() > 10:
                t.view(-1)[::13] = float("nan")
                t.view(-1)[1::17] = -0.0
        for dtype in (torch.float32,) if small else (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            scores = [t.to(dtype).to(device) for t in base]
            numbers = sum(int((~torch.isnan(s)).sum()) for s in scores)
            for k in (0, 1, numbers // 3, numbers):
                ops.topk_mask(scores, k)
            ops.topk_mask(scores, [int((~torch.isnan(s)).sum()) // 2 for s in scores])
        x = torch.randn(300_000, generator=generator).to(device)
        ops.topk_mask([x, x[:1000]], 30_000)
        ops.topk_mask([x.double()], 30_000)

    def prune_grow():
        # Lists in both scopes: odd sizes, an empty layer, a transposed and a channels-last layer
        # (written in place through their strides), weights of several dtypes, n from 0 up to every
        # active entry (just-dropped ones grown back), masked tensors, |score| ranking, and scores
        # that are the weights being written.
        shapes = [(300, 301), (0, 5), (7,), (64, 3, 3, 3)] if not small else [(300, 301), (0, 5), (64, 3, 3, 3)]
        for score_dtype in (torch.float32,) if small else (torch.float32, torch.bfloat16):
            masks = [(torch.rand(s, generator=generator) < 0.3).to(device) for s in shapes]
            ties = [((torch.randn(s, generator=generator) * 2).round() / 2).to(score_dtype).to(device) for s in shapes]
            actives = [int(m.sum()) for m in masks]
            for global_scope in (False, True):
                for fraction in (0.0, 0.3, 1.0):
                    weights = [torch.randn(s, generator=generator).to(device) for s in shapes]
                    weights[0] = weights[0].t().contiguous().t()              # column-major
                    weights[-1] = weights[-1].to(memory_format=torch.channels_last)
                    if not small:
                        weights[2] = weights[2].half()
                    state = [[torch.randn(s, generator=generator).to(device)] for s in shapes]
                    masked = [[torch.randn(s, generator=generator).to(device)] for s in shapes]
                    n = (round(fraction * sum(actives)) if global_scope
                         else [round(fraction * a) for a in actives])
                    ops.prune_grow(weights, masks, ties, ties, n, state=state, masked=masked,
                                   active=sum(actives) if global_scope else actives, prune_abs=True)
            # Magnitude pruning as DST calls it: the weights themselves are the prune scores.
            weights = [torch.randn(s, generator=generator).to(score_dtype).to(device) for s in shapes]
            ops.prune_grow(weights, masks, weights, ties, [a // 3 for a in actives], prune_abs=True, grow_abs=True)

    def sparse_linear():
        dtypes = (torch.float16, torch.float32) + (() if small else (torch.bfloat16, torch.float64))
        shapes = ((37, 70, 0.5), (20, 5000, 0.1)) if small else ((37, 70, 0.5), (100, 2049, 0.2), (20, 5000, 0.1))
        for dtype in dtypes:
            for out_features, in_features, density in shapes:
                weight = torch.randn(out_features, in_features, generator=generator).to(dtype)
                packed = ops.pack(weight, torch.rand(out_features, in_features, generator=generator) < density)
                packed = packed.to(device)
                bias = torch.randn(out_features, generator=generator).to(dtype).to(device)
                # Every batch tile; 300 rows: two launches of summed slabs.
                for rows in (1, 3, 9, 33) if small else (1, 2, 3, 5, 16, 33, 300):
                    x = torch.randn(rows, in_features, generator=generator).to(dtype).to(device)
                    torch.ops.sparsekern.sparse_linear(x, packed.bitmap, packed.values, packed.chunk_offsets, bias)
        empty = torch.zeros(6, 0, dtype=torch.int32, device=device)
        torch.ops.sparsekern.sparse_linear(torch.randn(2, 0, device=device), empty,
                                           torch.zeros(0, device=device), empty.long(), None)

    # Through sparsekern.ops (whose signatures other work may change) on the compiled kernels;
    # sparse_linear through its op, which takes raw tensors and does not route to dense.
    with forced_backend("compiled"):
        for name, body in (("topk_mask", topk), ("prune_grow", prune_grow), ("sparse_linear", sparse_linear)):
            part(name, body)
    print("sanitize workload finished", flush=True)
    return 1 if failures else 0


def profile_workload(dry_run: bool) -> int:
    """sparse_linear at the goal size (batch 1 and 16) and one global topk_mask over ResNet-50's list."""
    from sparsekern import ops
    from sparsekern.bench.shapes import RESNET50, RESNET50_TINY, random_tensors
    device = device_for(dry_run)
    size = 256 if dry_run else 8192
    generator = torch.Generator(device=device).manual_seed(0)
    weights = PackedRotation(size, 0.1, torch.float32 if dry_run else torch.float16, device, generator, copies=1)
    for batch in (1, 16):
        x = torch.randn(batch, size, generator=generator, device=device).to(weights.packed[0].dtype)
        weights.kernel(x)()
    scores = [s.abs_() for s in random_tensors(RESNET50_TINY if dry_run else RESNET50, device)]
    ops.topk_mask(scores, round(0.1 * sum(s.numel() for s in scores)))
    synchronize(device)
    print("profile workload finished", flush=True)
    return 0


# ------------------------------------------------------------------------------ env and results

def environment(out_dir: str, dry_run: bool) -> int:
    import sparsekern
    from sparsekern.ops import _extension
    info = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
            "python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "extension": "loaded" if _extension.LOAD_ERROR is None else _extension.LOAD_ERROR,
            "cuda_kernels": _extension.kernel_missing("sparse_linear", "cuda") is None,
            "backends": {op: report["cuda" if not dry_run else "cpu"]["chosen"]
                         for op, report in sparsekern.backends()["ops"].items()}}
    # setuptools: pyproject's license table needs replacing by an SPDX string (setuptools >= 77) before setuptools
    # drops the table (2027-02-18); the device installs with --no-build-isolation, so its own setuptools decides.
    for package in ("triton", "numpy", "setuptools"):
        try:
            info[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            info[package] = None
    if not dry_run:
        properties = torch.cuda.get_device_properties(0)
        info.update(gpu=properties.name, capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                    sms=properties.multi_processor_count, memory_gb=round(properties.total_memory / 1e9, 1))
    else:
        info.update(gpu="none (dry run on the CPU)", capability=None, sms=None, memory_gb=None)
    for key, command in (("driver", ["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit",
                                     "--format=csv,noheader"]),
                         ("nvcc", ["nvcc", "--version"]), ("commit", ["git", "rev-parse", "--short", "HEAD"])):
        try:
            output = subprocess.run(command, capture_output=True, text=True, timeout=20).stdout.strip()
            info[key] = output.splitlines()[-1] if output else None
        except (OSError, subprocess.SubprocessError):
            info[key] = None
    Path(out_dir, "env.json").write_text(json.dumps(info, indent=1) + "\n")
    print(json.dumps(info))
    return 0


def gpu_label(name: str) -> str:
    """'NVIDIA H200' -> 'h200', 'NVIDIA H100 80GB HBM3' -> 'h100'; another GPU -> its name in lower case."""
    match = re.search(r"\b([A-Z]\d{3})\b", name)
    return match.group(1).lower() if match else re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "cpu"


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def pytest_summary(log: str) -> str:
    """The last pytest result line of a log ("12 passed, 3 skipped in 40.1s"), or what stopped it."""
    lines = [line.strip("= ") for line in log.splitlines()
             if re.search(r"\d+ (passed|failed|errors?|skipped|deselected)|no tests ran", line)]
    return lines[-1] if lines else "no pytest summary (the step did not finish)"


def _format_ms(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value * 1e3:.1f} µs" if value < 1 else f"{value:.3f} ms"


def results(out_dir: str) -> int:
    out = Path(out_dir)
    env = json.loads(_read(out / "env.json") or "{}")
    rows = [json.loads(line) for line in _read(out / "goals.jsonl").splitlines() if line.strip()]
    gpu = env.get("gpu") or "unknown GPU"
    date = env.get("date") or datetime.date.today().isoformat()
    lines = [f"# sparsekern on {gpu}: first GPU run ({date})", "",
             "Written by `benchmarks/gpu_check.sh` (`python3 -m benchmarks.gpu_goals results`); each goal is timed "
             "as the median of 5 samples of back-to-back calls between CUDA events.", "",
             "## Environment", "",
             f"- GPU: {gpu} (compute capability {env.get('capability')}, {env.get('sms')} SMs, "
             f"{env.get('memory_gb')} GB); driver, max SM clock, power limit: {env.get('driver')}",
             f"- torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), triton {env.get('triton')}, "
             f"Python {env.get('python')}, numpy {env.get('numpy')}, setuptools {env.get('setuptools')}, "
             f"{env.get('nvcc')}",
             f"- sparsekern commit {env.get('commit')}; extension {env.get('extension')}; CUDA kernels: "
             f"{env.get('cuda_kernels')}; backends chosen: {env.get('backends')}", "",
             "## GPU tests", "",
             f"- `pytest -m gpu`: {pytest_summary(_read(out / 'tests.log'))}"]
    sanitizer = [line.strip() for line in _read(out / "sanitize.log").splitlines()
                 if re.search(r"ERROR SUMMARY|RACECHECK SUMMARY|workload finished|FAILED", line)]
    lines.append(f"- compute-sanitizer (memcheck, racecheck): {'; '.join(sanitizer) or 'not run'}")
    lines += ["", "## Goals", "",
              "| goal | case | implementation | time | torch baseline | baseline time | time / baseline | target "
              "| met |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    missed = []
    for row in rows:
        if row.get("kind") == "goal":
            met = {True: "yes", False: "**no**", None: "-"}[row.get("met")]
            extra = "" if row.get("exact") is None else f" (exact: {row['exact']})"
            extra += "" if row.get("rel_err") is None else f" (rel. error {row['rel_err']:.1e})"
            lines.append(f"| {row['goal']} | {row['case']} | {row['impl']}{extra} | {_format_ms(row['ms'])} | "
                         f"{row['baseline']} | {_format_ms(row['baseline_ms'])} | {row['time_ratio']:.3f} | "
                         f"{row['target']} | {met} |")
            if row.get("met") is False and row["impl"].startswith("sparsekern"):
                missed.append(f"- {row['goal']}, {row['case']}, {row['impl']}: {_format_ms(row['ms'])}, "
                              f"{row['time_ratio']:.3f}x the baseline's time; target {row['target']}")
        elif row.get("kind") == "memory":
            from sparsekern.bench.cases.training_step import DENSE, RIGL, STATIC
            peak = row["peak_mib"]
            shown = ", ".join(f"{kind} {value:.0f} MiB" for kind, value in peak.items())
            worst = max(peak[STATIC], peak[RIGL]) / peak[DENSE] if peak[DENSE] else None
            met = "-" if worst is None else ("yes" if worst <= 1.0 else "**no**")
            lines.append(f"| peak memory of a training step | {row['case']} | static, RigL | {shown} | dense | - | "
                         f"{'-' if worst is None else f'{worst:.3f}'} | {row['target']} | {met} |")
        elif row.get("kind") == "error":
            lines.append(f"| {row['goal']} | failed: {row['error'][:150]} | | | | | | | |")
    crossover = [row for row in rows if row.get("kind") == "crossover"]
    if crossover:
        batches = sorted({row["batch"] for row in crossover})
        lines += ["", "## sparse_linear: kernel time / dense time (below 1: the kernel wins)", "",
                  "| density | " + " | ".join(f"batch {b}" for b in batches) + " |",
                  "| --- |" + " --- |" * len(batches)]
        for density in sorted({row["density"] for row in crossover}):
            cells = {row["batch"]: row["time_ratio"] for row in crossover if row["density"] == density}
            lines.append(f"| {density} | " + " | ".join(f"{cells[b]:.2f}" if b in cells else "-" for b in batches)
                         + " |")
        lines += ["", f"Routing these figures give: {suggest_limits(crossover)}"]
    lines += ["", "## Where a goal is missed", ""] + (missed or ["- none"])
    lines += ["", "Profiles: `profile.log` of the run (ncu, when it ran); the analysis and the next step go here.", ""]
    target = out / "results" / f"{date}-{gpu_label(gpu)}.md"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("\n".join(lines))
    print(f"wrote {target} (commit it as benchmarks/results/{target.name})")
    return 0


def suggest_limits(crossover: list[dict]) -> str:
    """SPARSE_LINEAR_LIMITS["cuda"]["max_density_by_rows"] from the sweep, with a 10% margin: for each batch
    measured, the largest density up to which the kernel takes under 0.9x dense's time at every density;
    rows beyond the first batch where it never does go dense."""
    limits = []
    for batch in sorted({row["batch"] for row in crossover}):
        ratios = sorted((row["density"], row["time_ratio"]) for row in crossover if row["batch"] == batch)
        best = None
        for density, ratio in ratios:
            if ratio >= 0.9:
                break
            best = density
        if best is None:
            break
        limits.append((batch, best))
    return f'SPARSE_LINEAR_LIMITS["cuda"]["max_density_by_rows"] = {tuple(limits)}'


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m benchmarks.gpu_goals", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="the CPU with tiny sizes (no GPU needed)")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("env").add_argument("out_dir")
    warm_parser = commands.add_parser("warm")
    warm_parser.add_argument("index", type=int)
    warm_parser.add_argument("workers", type=int)
    commands.add_parser("sanitize").add_argument("--small", action="store_true", help="one case of each kind")
    goals_parser = commands.add_parser("goals")
    goals_parser.add_argument("jsonl")
    goals_parser.add_argument("--only", nargs="*", choices=sorted(GOALS))
    commands.add_parser("profile")
    commands.add_parser("results").add_argument("out_dir")
    args = parser.parse_args(argv)
    if args.command == "env":
        return environment(args.out_dir, args.dry_run)
    if args.command == "warm":
        return warm(args.index, args.workers, args.dry_run)
    if args.command == "sanitize":
        return sanitize_workload(args.dry_run, args.small)
    if args.command == "goals":
        return run_goals(args.jsonl, args.dry_run, args.only)
    if args.command == "profile":
        return profile_workload(args.dry_run)
    return results(args.out_dir)


if __name__ == "__main__":
    sys.exit(main())
