"""Smoke tests of the benchmark suite: every case runs at quick sizes and yields a finite time and ratio.

No timing is asserted: speed claims live in the benchmark report, not in tests.
"""
import csv
import json
import math
import os
import pathlib
import subprocess
import sys
import time

import pytest
import torch

from sparsekern import ops
from sparsekern.bench import core, report
from sparsekern.ops import _backend

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def quick_rows():
    return report.run(CPU, quick=True, budget_s=0.01)


def test_every_case_module_yields_cases():
    modules = core.case_modules()
    assert modules, "no case modules found in sparsekern.bench.cases"
    for module in modules:
        cases = core.load_cases(module, CPU, quick=True)
        assert cases, f"{module}.cases() returned no case"
        for case in cases:
            assert isinstance(case, core.Case)
            assert case.baseline in case.runs
            assert case.op in core._ops(module), f"{module}.OPS lacks {case.op!r}: --only could not select it"


def test_quick_report_gives_finite_time_and_ratio_for_every_run(quick_rows):
    assert quick_rows
    for row in quick_rows:
        assert row.error is None, f"{row.op} [{row.size}] {row.implementation}: {row.error}"
        assert math.isfinite(row.time_ms) and row.time_ms > 0, row
        assert math.isfinite(row.ratio) and row.ratio > 0, row
        assert row.repeats >= 1


def test_baseline_rows_have_ratio_one(quick_rows):
    baselines = [row for row in quick_rows if row.implementation == row.baseline]
    assert baselines
    assert all(row.ratio == 1.0 for row in baselines)


def test_foundation_ops_are_timed_on_every_automatic_backend(quick_rows):
    timed = {(row.op.split()[0], row.implementation) for row in quick_rows}
    for op, registry_op in (("topk_mask", "topk_mask"), ("prune_grow", "prune_grow"),
                            ("masked_linear", "masked_linear")):
        for backend in core.usable_backends(registry_op, CPU):
            assert (op, f"sparsekern[{_backend.label(backend, 'cpu')}]") in timed


def test_case_rejects_unknown_baseline():
    with pytest.raises(ValueError, match="baseline"):
        core.Case("op", "size", {"a": lambda: None}, baseline="b")


def test_failing_run_is_reported_not_raised():
    def broken():
        raise RuntimeError("boom")

    rows = core.measure(core.Case("op", "size", {"ok": lambda: None, "broken": broken}, baseline="ok"),
                        CPU, budget_s=0.001)
    by_label = {row.implementation: row for row in rows}
    assert by_label["ok"].error is None
    assert "boom" in by_label["broken"].error and math.isnan(by_label["broken"].ratio)
    assert "failed" in report.format_table(rows)


def test_measure_adapts_rounds_to_budget_and_interleaves_the_implementations():
    calls = []
    case = core.Case("op", "size", {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, baseline="a")
    rows = core.measure(case, CPU, budget_s=0.5, max_rounds=7)
    assert [row.repeats for row in rows] == [7, 7]  # instant calls fill the round cap
    assert calls[:2] == ["a", "b"]  # one warm-up call each
    rounds = [calls[i:i + 2] for i in range(2, len(calls), 2)]
    assert len(rounds) == 7 and all(sorted(r) == ["a", "b"] for r in rounds)
    assert rounds[0] != rounds[1]  # the order rotates, so neither side always runs first
    assert all(math.isfinite(row.time_ms) for row in rows) and rows[0].ratio == 1.0


def test_a_ratio_pairs_calls_of_one_round(monkeypatch):
    # Calls cost 4 ms while the machine is loaded (the first 8 calls: warm-ups and 3 rounds) and 1 ms
    # after, and "fast" takes half of it. Paired per round the ratio is 2; timed one implementation after
    # the other, the baseline would run loaded and "fast" mostly not, and the ratio would come out near 8.
    # The calls advance a fake clock rather than sleep: real sleeps overshoot on a loaded machine.
    calls, now = [], [0.0]
    monkeypatch.setattr(core.time, "perf_counter", lambda: now[0])

    def costing(share):
        def run():
            loaded = len(calls) < 8
            calls.append(1)
            now[0] += (0.004 if loaded else 0.001) * share
        return run

    rows = core.measure(core.Case("op", "size", {"base": costing(1), "fast": costing(0.5)}, baseline="base"),
                        CPU, budget_s=0.05, max_rounds=6)
    assert len(calls) == 14
    assert 1.6 < {row.implementation: row for row in rows}["fast"].ratio < 2.5


def test_measure_times_a_call_much_longer_than_the_budget_once():
    calls = []
    rows = core.measure(core.Case("op", "size", {"slow": lambda: calls.append(time.sleep(0.005))}, baseline="slow"),
                        CPU, budget_s=0.001)
    assert rows[0].repeats == 1 and len(calls) == 1


def test_forced_backend_restores_environment(monkeypatch):
    monkeypatch.setenv("SPARSEKERN_BACKEND", "auto")
    with core.forced_backend("reference"):
        assert _backend.requested() == "reference"
    assert _backend.requested() == "auto"


def test_main_writes_json_and_csv(tmp_path, capsys):
    json_path, csv_path = tmp_path / "rows.json", tmp_path / "rows.csv"
    status = report.main(["--quick", "--only", "topk_mask", "--budget", "0.001",
                          "--json", str(json_path), "--csv", str(csv_path)])
    assert status == 0
    table = capsys.readouterr().out
    assert "| topk_mask (global) |" in table and "torch cat+topk" in table
    assert "--quick: tiny sizes" in table and "not measurements" in table   # its speed-ups are noise
    assert "in the same round, the median over rounds" in table   # not the ratio of the times shown beside it
    saved = json.loads(json_path.read_text())
    assert saved["environment"].startswith("device cpu")
    records = saved["rows"]
    assert records and all(record["op"].startswith("topk_mask") for record in records)
    with open(csv_path) as stream:
        assert len(list(csv.DictReader(stream))) == len(records)


@pytest.mark.parametrize("command", ["python -m benchmarks", "sparsekern bench"])
def test_an_unknown_only_is_reported_on_one_line_before_any_case_is_built(monkeypatch, capsys, command):
    from sparsekern.cli import main as cli_main

    monkeypatch.setattr(core, "load_cases", lambda *args: pytest.fail("built cases before checking --only"))
    argv = ["--quick", "--device", "cpu", "--only", "topk_mak"]
    with pytest.raises(SystemExit) as exit_info:
        report.main(argv) if command == "python -m benchmarks" else cli_main(["bench", *argv])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and error.startswith(f"{command}: error: --only 'topk_mak'"), error
    assert error.count("\n") == 1 and "topk_mask" in error and "RigL update (global)" in error, error


def test_an_op_prefix_builds_only_the_modules_with_such_an_op(monkeypatch):
    built = []
    monkeypatch.setattr(core, "load_cases", lambda module, device, quick: built.append(module) or [])
    assert list(core.discover(CPU, quick=True, only="RigL")) == [] and built == ["dst"]
    built.clear()
    list(core.discover(CPU, quick=True, only="topk_mask"))   # a module's name: that module alone
    assert built == ["topk_mask"]


# The baselines must do the op's work, or their ratios mean nothing: on tie-free inputs they equal the op.

def test_topk_mask_baselines_select_what_the_op_selects(generator):
    from sparsekern.bench.cases import topk_mask as cases

    scores = [torch.rand(shape, generator=generator) for shape in ((7, 5), (33,), (4, 3, 2))]
    expected = ops.topk_mask(scores, 20)
    for baseline in (cases.torch_cat_topk, cases.torch_cat_kthvalue):
        assert all(torch.equal(a, b) for a, b in zip(baseline(scores, 20), expected))
    per_layer = [3, 0, 24]
    assert all(torch.equal(a, b) for a, b in
               zip(cases.torch_per_layer_topk(scores, per_layer), ops.topk_mask(scores, per_layer)))


@pytest.mark.parametrize("global_scope", [False, True])
def test_prune_grow_baseline_updates_like_the_op(global_scope, generator):
    from sparsekern.bench.cases import prune_grow as cases

    shapes = [(12, 9), (30,), (4, 3, 2)]
    weights, grads, momenta = ([torch.randn(s, generator=generator) for s in shapes] for _ in range(3))
    masks = [torch.rand(s, generator=generator) < 0.4 for s in shapes]
    for weight, mask in zip(weights, masks):
        weight.mul_(mask)
    n = 9 if global_scope else [int(m.sum()) // 3 for m in masks]
    expected_weights, expected_momenta = [w.clone() for w in weights], [m.clone() for m in momenta]
    expected = ops.prune_grow(expected_weights, masks, expected_weights, grads, n,
                              state=[[m] for m in expected_momenta], prune_abs=True, grow_abs=True)
    new = cases.torch_prune_grow(weights, masks, grads, n, momenta, global_scope)
    assert all(torch.equal(a, b) for a, b in zip(new, expected))
    assert all(torch.equal(a, b) for a, b in zip(weights, expected_weights))
    assert all(torch.equal(a, b) for a, b in zip(momenta, expected_momenta))


def test_masked_linear_baseline_matches_the_op(generator):
    from sparsekern.bench.cases import masked_linear as cases

    x, weight, bias = (torch.randn(shape, generator=generator) for shape in ((6, 8), (5, 8), (5,)))
    mask = torch.rand(5, 8, generator=generator) < 0.5
    torch.testing.assert_close(cases.torch_mask_then_matmul(x, weight, mask, bias),
                               ops.masked_linear(x, weight, mask, bias))


def test_mask_in_place_case_times_the_op_against_both_torch_baselines_which_mask_as_it_does(generator):
    from sparsekern.bench.cases import mask_in_place as cases

    rows = [row for case in core.load_cases("mask_in_place", CPU, quick=True) for row in core.measure(case, CPU, 0.01)]
    assert {row.implementation for row in rows} == set(cases.IMPLEMENTATIONS)
    assert all(row.error is None and math.isfinite(row.ratio) for row in rows), rows
    # On finite values (the case's) the baselines do the op's work.
    tensor = torch.randn(7, 5, generator=generator)
    mask = torch.rand(7, 5, generator=generator) < 0.3
    expected = torch.where(mask, tensor, 0.0)
    for mask_them in cases.IMPLEMENTATIONS.values():
        masked = [tensor.clone()]
        mask_them(masked, [mask])
        assert torch.equal(masked[0], expected)


@pytest.mark.parametrize("shape", [(2, 6, 11), (2, 6, 7, 9)], ids=["1d", "2d"])
def test_im2col_conv_baseline_matches_the_convolution(shape, generator):
    from sparsekern.bench.cases import sparse_conv as cases

    x = torch.randn(shape, generator=generator)
    weight = torch.randn(5, shape[1], *[3] * (len(shape) - 2), generator=generator)
    mask = torch.rand(weight.shape, generator=generator) < 0.5
    convolution = torch.nn.functional.conv1d if len(shape) == 3 else torch.nn.functional.conv2d
    torch.testing.assert_close(cases.im2col_masked_linear(x, weight, mask, 1), convolution(x, weight * mask, padding=1))


def test_sparse_convolution_is_timed_in_every_dimension(quick_rows):
    from sparsekern.nn import SparseConv1d, SparseConv2d, SparseConv3d, SparseConvTranspose2d

    timed = {row.implementation for row in quick_rows if row.op.startswith("sparse conv")}
    for sparse in (SparseConv1d, SparseConv2d, SparseConv3d, SparseConvTranspose2d):
        assert any(label.startswith(f"{sparse.__name__} (") for label in timed), sorted(timed)


@pytest.mark.parametrize("option", ["--json", "--csv"])
def test_main_refuses_an_unwritable_output_path_before_timing_anything(tmp_path, monkeypatch, capsys, option):
    (tmp_path / "a_file").write_text("")
    os.mkfifo(tmp_path / "a_fifo")   # the atomic write's rename would replace it (as root, /dev/null too)
    monkeypatch.setattr(report, "run", lambda *args, **kwargs: pytest.fail("timed before checking the path"))
    # a path ending in a separator failed after the timings, with a traceback
    for path in (tmp_path / "a_file" / "rows.out", tmp_path, f"{tmp_path / 'new'}{os.sep}", tmp_path / "a_fifo"):
        with pytest.raises(SystemExit) as exit_info:
            report.main(["--quick", option, str(path)])
        error = capsys.readouterr().err
        assert exit_info.value.code == 2 and f"error: {option}" in error and error.count("\n") == 1, error
    assert not (tmp_path / "new").exists()


def test_bench_caps_threads_as_train_does_before_timing_anything(monkeypatch, capsys):
    # torch.set_num_threads with more threads than OpenMP can create aborts the process.
    from sparsekern.ops._checks import MAX_THREADS

    monkeypatch.setattr(report, "run", lambda *args, **kwargs: pytest.fail("timed before checking --threads"))
    monkeypatch.setattr(torch, "set_num_threads", lambda n: pytest.fail(f"set {n} threads"))
    for threads in (0, MAX_THREADS + 1, 10 ** 6):
        with pytest.raises(SystemExit) as exit_info:
            report.main(["--quick", "--threads", str(threads)])
        assert exit_info.value.code == 2 and "--threads must be" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--bogus"], ["--budget", "0"], ["--threads", "x"]], ids=" ".join)
def test_python_m_benchmarks_reports_a_bad_argument_on_one_line_as_sparsekern_bench_does(argv):
    done = subprocess.run([sys.executable, "-m", "benchmarks", *argv], capture_output=True, text=True, timeout=120,
                          cwd=pathlib.Path(__file__).resolve().parents[2])
    assert done.returncode == 2 and done.stdout == "", done
    assert done.stderr.startswith("python -m benchmarks: error: ") and done.stderr.count("\n") == 1, done.stderr


def test_sparsekern_bench_reports_a_bad_argument_on_one_line(tmp_path, capsys):
    from sparsekern.cli import main

    for argv in (["--budget", "0"], ["--json", str(tmp_path)]):
        with pytest.raises(SystemExit) as exit_info:
            main(["bench", *argv])
        error = capsys.readouterr().err
        assert exit_info.value.code == 2 and error.startswith("sparsekern bench: error: ") and error.count("\n") == 1


def test_a_ctrl_c_while_bench_writes_its_json_keeps_the_printed_table_and_the_old_file(tmp_path, capsys, monkeypatch):
    # It ended in KeyboardInterrupt's traceback. The table printed by then stays; the file is written whole or not at
    # all, and here not at all.
    from sparsekern import checkpoint
    from sparsekern.cli import main

    monkeypatch.setattr(report, "run", lambda *args, **kwargs: [core.Row("topk_mask", "8", "torch", 1.0, 1.0, 1,
                                                                         "torch")])
    write_atomically = checkpoint.write_atomically

    def interrupted_midway(path, write):
        def half(file):
            file.write(b'{"environment": ')
            raise KeyboardInterrupt
        write_atomically(path, half)

    monkeypatch.setattr(checkpoint, "write_atomically", interrupted_midway)
    table = tmp_path / "table.json"
    table.write_text("the last run's")
    with pytest.raises(SystemExit) as exit_info:
        try:
            main(["bench", "--device", "cpu", "--json", str(table)])
        except KeyboardInterrupt:   # as a failure of this test, not the end of pytest's session
            pytest.fail("KeyboardInterrupt left main: Python prints its traceback")
    captured = capsys.readouterr()
    assert exit_info.value.code == 130
    assert captured.err.splitlines() == ["sparsekern bench: interrupted"]
    assert "| topk_mask | 8 | torch | 1.000 | 1.00x (baseline) |" in captured.out.splitlines()
    assert table.read_text() == "the last run's" and os.listdir(tmp_path) == ["table.json"]


def test_training_step_case_labels_each_run_with_its_peak_and_keeps_the_profiler_off_stderr(capfd):
    from sparsekern.bench.cases import training_step
    cases = training_step.cases(CPU, quick=True)
    assert capfd.readouterr().err == "", "the CPU memory profile wrote to stderr"
    for case in cases:
        assert case.baseline.startswith(f"{training_step.DENSE} (step peak ")
        assert all(" (step peak " in label and label.endswith("x dense)") for label in case.runs)


def test_training_step_times_the_digits_mlp_under_adamw_default_and_fused_as_well():
    # AdamW's default CPU implementation takes the square root of a second moment that is 0 at every pruned weight
    # (slow on some CPUs), its fused kernel not: both are timed, every run of a case with the same optimizer.
    from sparsekern.bench.cases import training_step
    optimizers = {}
    for case in training_step.cases(CPU, quick=True):
        kinds = {(type(run.optimizer), run.optimizer.defaults.get("fused")) for run in case.runs.values()}
        assert len(kinds) == 1, case.size
        optimizers[case.size] = kinds.pop()
    adamw = {size: fused for size, (kind, fused) in optimizers.items() if kind is torch.optim.AdamW}
    assert sorted(map(bool, adamw.values())) == [False, True]
    assert all(size.startswith("MLP ") for size in adamw)
    assert sum(kind is torch.optim.SGD for kind, _ in optimizers.values()) == len(optimizers) - 2

def test_a_warning_in_the_profiled_training_step_still_reaches_stderr():
    # The memory profile silences file descriptor 2 for Kineto's lines; a Python warning raised in the step
    # must still be seen. A subprocess, so that stderr is the real descriptor 2 and not pytest's capture.
    script = ("import warnings, torch\n"
              "from sparsekern.bench.cases import training_step\n"
              "training_step.step_peak_bytes(lambda: warnings.warn('inside the step'), torch.device('cpu'))\n"
              "print('done')\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout == "done\n", result.stderr
    assert "UserWarning: inside the step" in result.stderr
    assert "USDT" not in result.stderr


# compiled_training_step compiles 6 models (tens of seconds each, cold): built once, and left out of the full report.

@pytest.fixture(scope="module")
def compiled_cases():
    from sparsekern.bench.cases import compiled_training_step

    if compiled_training_step.unavailable(CPU) is not None:
        pytest.skip(compiled_training_step.unavailable(CPU))
    # Past Dynamo's limit of compiled versions a model would run eager, and its figures would not be compiled ones.
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        return compiled_training_step.cases(CPU, quick=True)


def test_compiled_training_step_runs_only_when_only_names_it():
    assert "compiled_training_step" not in core.case_modules()
    assert "training_step" in core.case_modules()
    for only in ("compiled_training_step", "compiled training"):
        assert core.case_modules(only) == ["compiled_training_step"]
    assert "compiled_training_step" not in core.case_modules("training")   # its op starts with "compiled"


def test_compiled_training_step_times_the_compiled_training_step_runs(compiled_cases):
    from sparsekern.bench.cases import compiled_training_step, training_step

    assert len(compiled_cases) == len(training_step.MODELS[True])
    for case in compiled_cases:
        assert case.op in compiled_training_step.OPS
        names = [label.split(" (first step, compiling, ")[0] for label in case.runs]
        assert names == [f"compiled {name}" for name in (training_step.DENSE, training_step.STATIC,
                                                         training_step.RIGL, training_step.MASKED)], list(case.runs)
        assert case.baseline.startswith(f"compiled {training_step.DENSE} (first step, compiling, ")
        for run in case.runs.values():
            assert isinstance(run.model, torch._dynamo.eval_frame.OptimizedModule)


def test_compiled_training_step_compiles_nothing_while_timed(compiled_cases):
    with torch._dynamo.config.patch(error_on_recompile=True):
        rows = [row for case in compiled_cases for row in core.measure(case, CPU, budget_s=0.001)]
    for row in rows:
        assert row.error is None, f"{row.size} {row.implementation}: {row.error}"
        assert math.isfinite(row.ratio) and row.ratio > 0, row


@pytest.mark.parametrize("command", ["python -m benchmarks", "sparsekern bench"])
def test_an_only_that_also_selects_a_module_that_cannot_run_says_which_it_skipped(monkeypatch, capsys, command):
    # under the command's name, as its errors and the CLI's other warnings: the line had no name at all
    from torch._inductor import cpp_builder, exc

    def no_compiler():
        raise exc.InvalidCxxCompiler()

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    load_cases = core.load_cases
    monkeypatch.setattr(core, "load_cases",   # topk_mask's tiny cases stand for the modules that can run
                        lambda module, *args: load_cases(module, *args) if module == "topk_mask" else [])
    _bench_succeeds(command, ["--quick", "--device", "cpu", "--budget", "0.001", "--only", ""])
    captured = capsys.readouterr()
    assert "| topk_mask (global) |" in captured.out
    skipped = [line for line in captured.err.splitlines() if not line.startswith(f"{command}: timing ")]
    assert len(skipped) == 1 and skipped[0].startswith(
        f"{command}: warning: skipped compiled_training_step: torch.compile's Inductor needs a C++ compiler"), \
        captured.err


@pytest.mark.parametrize("command", ["python -m benchmarks", "sparsekern bench"])
def test_compiled_training_step_without_a_cpp_compiler_is_refused_on_one_line(monkeypatch, capsys, command):
    from torch._inductor import cpp_builder, exc

    from sparsekern.cli import main as cli_main

    def no_compiler():
        raise exc.InvalidCxxCompiler()

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    monkeypatch.setattr(core, "load_cases", lambda *args: pytest.fail("built cases torch cannot compile"))
    argv = ["--quick", "--device", "cpu", "--only", "compiled_training_step"]
    with pytest.raises(SystemExit) as exit_info:
        report.main(argv) if command == "python -m benchmarks" else cli_main(["bench", *argv])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and error.count("\n") == 1, error
    assert error.startswith(f"{command}: error: --only 'compiled_training_step': compiled_training_step: "
                            "torch.compile's Inductor needs a C++ compiler on CPU: No working C++ compiler"), error


@pytest.mark.parametrize("command", ["python -m benchmarks", "sparsekern bench"])
def test_every_line_on_stderr_starts_with_the_command_s_name(capsys, command):
    # "timing <case>" lines, one per case as it starts, were the only ones without it
    _bench_succeeds(command, ["--quick", "--device", "cpu", "--budget", "0.001", "--only", "topk_mask"])
    lines = capsys.readouterr().err.splitlines()
    assert lines and all(line.startswith(f"{command}: timing topk_mask") for line in lines), lines


def test_python_m_benchmarks_refuses_an_abbreviated_option_as_sparsekern_bench_does(capsys):
    # argparse took --quic for --quick there, where sparsekern's commands refuse abbreviations
    with pytest.raises(SystemExit) as exit_info:
        report.main(["--quic", "--only", "topk_mask"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == ("python -m benchmarks: error: unrecognized arguments: --quic; did you mean "
                                       "--quick?\n")


def _bench_succeeds(command: str, argv: list[str]) -> None:
    """Runs the benchmark report as `command` ("python -m benchmarks" or "sparsekern bench") and checks it exits 0."""
    from sparsekern.cli import main as cli_main

    if command == "python -m benchmarks":
        assert report.main(argv) == 0
    else:
        with pytest.raises(SystemExit) as exit_info:
            cli_main(["bench", *argv])
        assert exit_info.value.code == 0
