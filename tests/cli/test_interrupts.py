"""Ctrl-C on `compare` with worker processes: the command stops with one line, exit code 130, whenever it comes,
and the workers, which a terminal's Ctrl-C reaches too, neither die of it with tracebacks nor lose it. `bench` stops
alike.

A worker is caught as it starts by wrapping multiprocessing's spawn: the Ctrl-C comes while the parent is still
starting it, however fast or loaded the machine (it used to be lost then, at random: a sleep was to wait out the
start)."""
import multiprocessing.util
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from sparsekern.cli.data import load_dataset
from sparsekern.cli.runs import Job, RunStore, execute
from sparsekern.cli.training import TrainConfig

JOBS = [Job(TrainConfig(method="static", density=density, epochs=1, batch_size=256)) for density in (0.3, 0.1)]
INTERRUPTED = "sparsekern compare: interrupted; finished work is kept in {} (rerun the same command to go on)"
WAIT_S = 600   # for a worker to start or a run to finish, on a loaded machine


@pytest.fixture(autouse=True)
def ctrl_c_answered():
    """Python's Ctrl-C handler in this process while a test runs, as in a terminal: a shell that starts a command in
    the background (`cmd &`, as a CI script may) starts it with SIGINT ignored, which its processes inherit, and a
    Ctrl-C then reaches nothing."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def default_ctrl_c() -> None:
    """For a child process, before it runs its program (Popen's preexec_fn): SIGINT as a terminal starts it, not
    ignored (see `ctrl_c_answered`); Python then installs its handler."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def is_worker(args) -> bool:
    """Whether multiprocessing.util.spawnv_passfds's `args` start a pool's worker (not the resource tracker)."""
    return "--multiprocessing-fork" in args


def on_each_worker_start(monkeypatch, call) -> None:
    """call(pid) for each worker process of a pool started in this process, as soon as it runs, while this
    process is still starting it."""
    spawn = multiprocessing.util.spawnv_passfds

    def spawn_and_call(path, args, passfds):
        pid = spawn(path, args, passfds)
        if is_worker(args):
            call(pid)
        return pid

    monkeypatch.setattr(multiprocessing.util, "spawnv_passfds", spawn_and_call)


def test_a_ctrl_c_while_the_workers_start_is_raised_once_they_have(tmp_path, monkeypatch):
    # The parent ignored SIGINT while they started, for them to inherit "ignore": the runs trained to the end.
    on_each_worker_start(monkeypatch, lambda worker: os.kill(os.getpid(), signal.SIGINT))
    before = set(multiprocessing.active_children())
    with pytest.raises(KeyboardInterrupt):
        execute(JOBS, RunStore(str(tmp_path)), load_dataset("digits"), workers=2)
    deadline = time.monotonic() + WAIT_S
    while set(multiprocessing.active_children()) - before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not set(multiprocessing.active_children()) - before
    assert os.listdir(tmp_path) == []   # the workers were stopped: they finished no run


def test_a_ctrl_c_that_reaches_a_worker_as_it_starts_is_left_to_its_parent(tmp_path, monkeypatch, capfd):
    # A worker that is sent SIGINT before it can ignore it holds it (blocked) until then: it does not die.
    on_each_worker_start(monkeypatch, lambda worker: os.kill(worker, signal.SIGINT))
    records = execute(JOBS, RunStore(str(tmp_path)), load_dataset("digits"), workers=2)
    assert set(records) == {job.key for job in JOBS}
    assert capfd.readouterr().err == ""
    assert sorted(os.listdir(tmp_path)) == sorted(f"{job.key}.json" for job in JOBS)


# `sparsekern ARGS...` whose first worker, once started, waits for the file SENT before its parent goes on
# starting it; the parent writes the file STARTING when it is there.
HELD_AT_FIRST_WORKER = textwrap.dedent("""
    import multiprocessing.util, os, sys, time
    from sparsekern.cli import main

    starting, sent, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
    spawn = multiprocessing.util.spawnv_passfds

    def spawn_and_wait(path, args, passfds):
        pid = spawn(path, args, passfds)
        if "--multiprocessing-fork" in args and not os.path.exists(starting):
            open(starting, "w").close()
            deadline = time.monotonic() + {wait_s}
            while not os.path.exists(sent) and time.monotonic() < deadline:
                time.sleep(0.01)
        return pid

    multiprocessing.util.spawnv_passfds = spawn_and_wait
    main(argv)
""").replace("{wait_s}", str(WAIT_S))


def interrupted(argv: list[str], ready, then=lambda: None) -> subprocess.CompletedProcess:
    """Runs `argv` in a process group of its own, sends the group SIGINT, as a terminal's Ctrl-C does, once
    ready() is true, calls then(), and returns how it ended."""
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, preexec_fn=default_ctrl_c)
    try:
        deadline = time.monotonic() + WAIT_S
        while not ready():
            if process.poll() is not None or time.monotonic() > deadline:
                stdout, stderr = process.communicate(timeout=WAIT_S)
                pytest.fail(f"never ready to be interrupted: exit code {process.returncode}\n{stdout}{stderr}")
            time.sleep(0.01)
        os.killpg(process.pid, signal.SIGINT)
        then()
        stdout, stderr = process.communicate(timeout=WAIT_S)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return subprocess.CompletedProcess(argv, process.returncode, stdout, stderr)


def test_ctrl_c_on_compare_while_its_workers_start_prints_one_line(tmp_path):
    # It was lost (ignored by the parent while the workers started): compare trained to its end, exit code 0.
    # And each spawned worker still importing died with its own traceback, and the pool's thread added one more
    # (InvalidStateError on a cancelled future).
    starting, sent, out = tmp_path / "starting", tmp_path / "sent", tmp_path / "out"
    done = interrupted([sys.executable, "-c", HELD_AT_FIRST_WORKER, str(starting), str(sent), "compare",
                        "--methods", "static", "--densities", "0.3,0.1", "--seeds", "1", "--epochs", "1", "--jobs",
                        "2", "--out", str(out), "--quiet"], starting.exists, sent.touch)
    assert done.returncode == 130 and done.stdout == "", done.stderr
    assert done.stderr.splitlines() == [INTERRUPTED.format(out)]
    assert os.listdir(out / "runs") == []


def test_ctrl_c_on_compare_while_its_workers_train_prints_one_line(tmp_path):
    # Sent once a run has finished, while the others train: the workers ignore it, the parent stops them.
    out = tmp_path / "out"
    runs = out / "runs"
    done = interrupted([sys.executable, "-m", "sparsekern.cli", "compare", "--methods", "static,rigl", "--densities",
                        "0.3,0.1", "--seeds", "2", "--epochs", "2", "--jobs", "2", "--out", str(out), "--quiet"],
                       lambda: runs.is_dir() and any(name.endswith(".json") for name in os.listdir(runs)))
    assert done.returncode == 130 and done.stdout == "", done.stderr
    assert done.stderr.splitlines() == [INTERRUPTED.format(out)]
    finished = [name for name in os.listdir(runs) if name.endswith(".json")]
    assert 1 <= len(finished) < 8


# `sparsekern ARGS...` (bench) whose first timed case, once measured, writes the file TIMING and waits there.
HELD_AFTER_FIRST_CASE = textwrap.dedent("""
    import sys, time
    from sparsekern.bench import core
    from sparsekern.cli import main

    timing, argv = sys.argv[1], sys.argv[2:]
    measure = core.measure

    def measure_and_wait(*args, **kwargs):
        rows = measure(*args, **kwargs)
        open(timing, "w").close()
        time.sleep({wait_s})
        return rows

    core.measure = measure_and_wait
    main(argv)
""").replace("{wait_s}", str(WAIT_S))


def test_ctrl_c_on_bench_while_it_times_prints_one_line(tmp_path):
    # It printed KeyboardInterrupt's traceback, and the process died of SIGINT.
    timing, table = tmp_path / "timing", tmp_path / "table.json"
    done = interrupted([sys.executable, "-c", HELD_AFTER_FIRST_CASE, str(timing), "bench", "--device", "cpu",
                        "--quick", "--only", "topk_mask", "--json", str(table)], timing.exists)
    assert done.returncode == 130 and done.stdout == "", done.stderr
    lines = done.stderr.splitlines()
    assert lines[-1] == "sparsekern bench: interrupted", done.stderr
    assert all(line.startswith("sparsekern bench: timing ") for line in lines[:-1]) and len(lines) > 1
    assert os.listdir(tmp_path) == ["timing"]   # no table, whole or in part


# `sparsekern ARGS...` (bench) whose torch.compile starts Inductor's compile workers first, as a CUDA run's first
# Triton kernel does (and torch's `backend="inductor"` entry at every compile; a CPU compile starts none), its pid in
# the file PID.
COMPILING_WITH_WORKERS = textwrap.dedent("""
    import os, sys
    import torch
    from torch._inductor.async_compile import AsyncCompile
    from sparsekern.cli import main

    pid, argv = sys.argv[1], sys.argv[2:]
    with open(pid, "w") as file:
        file.write(str(os.getpid()))
    compile = torch.compile

    def compile_with_workers(*args, **kwargs):
        AsyncCompile.warm_pool()
        return compile(*args, **kwargs)

    torch.compile = compile_with_workers
    main(argv)
""")


def compile_worker_answers_ctrl_c(parent_pid: str) -> bool:
    """Whether a compile worker of the process `parent_pid` runs Python with its Ctrl-C handler (KeyboardInterrupt):
    importing torch, before torch ignores SIGINT there."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline") as file:
                command = file.read().split("\0")
            with open(f"/proc/{pid}/status") as file:
                caught = next(line for line in file if line.startswith("SigCgt:")).split()[1]
        except (OSError, StopIteration):
            continue
        if (any("compile_worker" in part for part in command) and f"--parent={parent_pid}" in command
                and int(caught, 16) & 1 << (signal.SIGINT - 1)):
            return True
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the processes' signal state in /proc")
def test_ctrl_c_on_bench_while_inductors_compile_workers_start_prints_one_line(tmp_path, monkeypatch):
    # Each worker still importing torch died of it with a traceback where its output is not suppressed.
    monkeypatch.setenv("TORCHINDUCTOR_WORKER_SUPPRESS_LOGGING", "0")
    pid = tmp_path / "pid"
    done = interrupted([sys.executable, "-c", COMPILING_WITH_WORKERS, str(pid), "bench", "--device", "cpu", "--quick",
                        "--only", "compiled_training_step"],
                       lambda: pid.exists() and compile_worker_answers_ctrl_c(pid.read_text()))
    assert done.returncode == 130 and done.stdout == "", done.stderr
    assert done.stderr.splitlines() == ["sparsekern bench: interrupted"]
