"""benchmarks/gpu_check.sh, the prepared GPU run, kept from rotting where there is no GPU: its dry run
executes every step's logic on the CPU with tiny sizes, and the results file comes out of it."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from benchmarks import gpu_goals
from tests.helpers import ROOT

SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def test_the_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_shellcheck_finds_nothing():
    result = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "OUT": str(out), "GPU_CHECK_DRY_RUN": "1", "GPU_CHECK_PYTHON": sys.executable,
           "GPU_CHECK_BUDGET": "900"}  # generous: a busy machine must not make the run skip a step
    result = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=900)
    return out, result


def test_the_dry_run_runs_every_step(dry_run):
    out, result = dry_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = (out / "summary.txt").read_text()
    for name in ("install", "build", "sanitize_workload", "tests", "goals", "profile"):
        assert f"{name}: rc=0" in summary, summary
    # What the build would build (pip's own dry run, which shows it only with -v), once.
    assert summary.count("[sparsekern build] C++ CPU kernels: yes; CUDA kernels: ") == 1, summary
    assert "SKIPPED" not in summary and "failed steps: 0" in summary
    assert result.stdout.rstrip().endswith(summary.rstrip())  # the summary is printed last
    assert "tests collected" in (out / "tests.log").read_text()  # the GPU test selection, with the plugin
    assert ": ok in" in (out / "warm.log").read_text()


def test_the_dry_run_measures_every_goal_and_writes_the_results_file(dry_run):
    out, _ = dry_run
    rows = [json.loads(line) for line in (out / "goals.jsonl").read_text().splitlines()]
    assert not [row for row in rows if row["kind"] == "error"], rows
    goals = {row["goal"] for row in rows if row["kind"] == "goal"}
    assert goals == {"global topk_mask", "RigL update (layer)", "RigL update (global)", "masked linear fwd+bwd",
                     "block-sparse 32x32", "sparse_linear"}
    assert {row["kind"] for row in rows} == {"goal", "crossover", "memory"}
    results = list((out / "results").glob("*.md"))
    assert len(results) == 1
    text = results[0].read_text()
    for heading in ("## Environment", "## GPU tests", "## Goals", "## sparse_linear: kernel time / dense time",
                    "## Where a goal is missed"):
        assert heading in text
    assert text.count("| global topk_mask |") >= 1 and "| sparse_linear |" in text and "Routing" in text
    assert "| peak memory of a training step |" in text


@pytest.mark.parametrize("switches, error", [
    ({"SPARSEKERN_CPP": "0", "SPARSEKERN_CUDA": "bad"}, "SPARSEKERN_CUDA must be 0 or 1 (or unset), got 'bad'"),
    ({"SPARSEKERN_CUDA": "1"}, "SPARSEKERN_CUDA=1 forces the CUDA kernels in, but no CUDA toolkit was found"),
])
def test_setup_refuses_a_bad_build_switch_in_one_line(switches, error):
    # SPARSEKERN_CPP=0 passed a bad SPARSEKERN_CUDA without a word; SPARSEKERN_CUDA=1 without a toolkit ended in
    # torch's OSError traceback ("CUDA_HOME environment variable is not set").
    from torch.utils.cpp_extension import CUDA_HOME
    if "SPARSEKERN_CPP" not in switches and CUDA_HOME:
        pytest.skip("a CUDA toolkit is installed: SPARSEKERN_CUDA=1 is valid here")
    env = {key: value for key, value in os.environ.items() if key not in ("SPARSEKERN_CPP", "SPARSEKERN_CUDA")}
    result = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, env={**env, **switches},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"[sparsekern build] error: {error}"), result.stderr


def test_a_build_that_fails_says_why_in_the_summary(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "GPU_CHECK_DRY_RUN": "1", "GPU_CHECK_PYTHON": sys.executable,
           "GPU_CHECK_BUDGET": "900", "GPU_CHECK_SKIP": "install warm sanitize tests goals profile",
           "SPARSEKERN_CUDA": "yes"}   # a switch setup.py refuses
    result = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=600)
    summary = (tmp_path / "summary.txt").read_text()
    assert result.returncode == 1 and "build: rc=1" in summary, summary
    assert "[sparsekern build] error: SPARSEKERN_CUDA must be 0 or 1 (or unset), got 'yes'" in summary, summary


@pytest.mark.parametrize("name, label", [("NVIDIA H200", "h200"), ("NVIDIA H100 80GB HBM3", "h100"),
                                         ("NVIDIA A100-SXM4-80GB", "a100"), ("Some GPU", "some-gpu")])
def test_results_file_names_the_gpu(name, label):
    assert gpu_goals.gpu_label(name) == label


def test_routing_suggestion_from_the_crossover():
    def rows(table):
        return [{"density": d, "batch": b, "time_ratio": r} for (d, b), r in table.items()]
    sweep = {(0.1, 1): 0.2, (0.1, 4): 0.3, (0.1, 16): 0.95, (0.3, 1): 0.5, (0.3, 4): 0.7, (0.5, 1): 0.8,
             (0.5, 4): 0.95, (0.3, 16): 0.5}  # a win above a loss does not count
    assert gpu_goals.suggest_limits(rows(sweep)).endswith("= ((1, 0.5), (4, 0.3))")
    assert gpu_goals.suggest_limits(rows({(0.1, 1): 1.2})).endswith("= ()")


# A decorator skipping a test by its own check of CUDA, rather than by the gpu marker.
CUDA_SKIPIF = re.compile(r"^\s*@pytest\.mark\.skipif\(\s*not\s+torch\.cuda\.is_available\(\)")


def test_every_test_needing_cuda_is_marked_gpu():
    # The script runs `pytest -m gpu`, which selects no test skipped by CUDA_SKIPIF (test_given_masks.py held one).
    unmarked = [f"{path.relative_to(ROOT)}:{number}"
                for path in sorted((ROOT / "tests").rglob("*.py"))
                for number, line in enumerate(path.read_text().splitlines(), 1) if CUDA_SKIPIF.match(line)]
    assert not unmarked, f"mark them @pytest.mark.gpu instead: {unmarked}"
