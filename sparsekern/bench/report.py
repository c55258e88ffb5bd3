"""The benchmark report: times every case and prints one table, optionally saved as JSON or CSV.

Command line (`python -m benchmarks`, `sparsekern bench`): see `main`.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import difflib
import io
import json
import math
import os
import platform
import sys

import torch

from .. import checkpoint
from ..ops import _checks
from . import core

HEADER = ("op", "size", "implementation", "time (ms)", "speed-up vs baseline")


def run(device: torch.device, quick: bool = False, only: str | None = None, budget_s: float | None = None,
        progress=None) -> list[core.Row]:
    """Measures every discovered case on `device` and returns the rows of the report.

    budget_s: seconds of timed calls per implementation (default 2, or 0.05 when quick).
    progress: called with one line per case as it starts being timed ("timing <op> [<size>]: <implementations>"),
        or None.
    """
    if budget_s is None:
        budget_s = 0.05 if quick else 2.0
    rows = []
    for case in core.discover(device, quick, only):
        if progress is not None:
            progress(f"timing {case.op} [{case.size}]: {', '.join(case.runs)}")
        rows.extend(core.measure(case, device, budget_s))
    return rows


def environment(device: torch.device) -> str:
    """One line saying where the figures were taken."""
    from ..ops import _extension

    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    extension = "loaded" if _extension.LOAD_ERROR is None else "not loaded"
    return f"device {device.type} ({where}), torch {torch.__version__}, sparsekern._C {extension}"


def format_table(rows: list[core.Row]) -> str:
    """A Markdown table: one line per (op, size, implementation); ratio = baseline time / time."""
    lines = [_line(HEADER), _line(["---"] * len(HEADER))]
    for row in rows:
        if row.error is not None:
            time_text, ratio_text = "failed", row.error
        else:
            time_text = f"{row.time_ms:.3f}" if row.time_ms < 10 else f"{row.time_ms:.1f}"
            ratio_text = (f"{row.ratio:.2f}x" if row.ratio >= 0.1 else f"{row.ratio:.2g}x") + (
                " (baseline)" if row.implementation == row.baseline else "")
        lines.append(_line([row.op, row.size, row.implementation, time_text, ratio_text]))
    return "\n".join(lines)


def _line(cells) -> str:
    return "| " + " | ".join(cells) + " |"


def write(rows: list[core.Row], path: str, kind: str, environment_line: str = "") -> None:
    """Saves the rows as JSON ({"environment": ..., "rows": [...]}) or CSV (one header line, one line
    per row), atomically (`sparsekern.checkpoint.write_atomically`); NaN becomes null / empty."""
    records = [{key: (None if isinstance(value, float) and math.isnan(value) else value)
                for key, value in dataclasses.asdict(row).items()} for row in rows]
    stream = io.StringIO(newline="")
    if kind == "json":
        json.dump({"environment": environment_line, "rows": records}, stream, indent=1)
        stream.write("\n")
    else:
        writer = csv.DictWriter(stream, fieldnames=[field.name for field in dataclasses.fields(core.Row)])
        writer.writeheader()
        writer.writerows(records)
    checkpoint.write_atomically(path, lambda file: file.write(stream.getvalue().encode()))


def path_argument(text: str) -> str:
    """A path option's value (argparse's `type`), `~` and `~user` expanded: the shell expands neither in
    `--out=~/runs`, nor anywhere in a quoted path, and a folder named `~` would be made in the working one."""
    return os.path.expanduser(text)


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad argument on one line (no usage block), exit code 2, takes options as spelled
    only (an abbreviation is refused, with the option it abbreviates suggested: `sparsekern compare --seed 5` read
    as --seeds 5, five seeds from 0, where train's --seed 5 is seed 5), and names the closest known option to a
    misspelled one. The CLI's parser derives from it (and also shows defaults in --help), so that
    `python -m benchmarks` and `sparsekern` read arguments and report errors alike."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")

    def parse_args(self, args=None, namespace=None):
        namespace, unknown = self.parse_known_args(args, namespace)
        if unknown:
            self.unrecognized(unknown)
        return namespace

    def unrecognized(self, unknown: list[str]):
        """Exits with argparse's error for arguments that no option takes, adding the known option closest to
        the first of them spelled as an option: Python 3.11's argparse suggests none."""
        message = f"unrecognized arguments: {' '.join(unknown)}"
        # names compared without their dashes, which alone made --out look close to --budget
        spelled = next((argument.split("=", 1)[0][2:] for argument in unknown if argument.startswith("--")), None)
        names = {option[2:]: option for action in self._actions for option in action.option_strings
                 if option.startswith("--")}
        close = difflib.get_close_matches(spelled, names, n=1) if spelled else []
        self.error(f"{message}; did you mean {names[close[0]]}?" if close else message)


def main(argv: list[str] | None = None, prog: str = "python -m benchmarks",
         parser_class: type[argparse.ArgumentParser] = OneLineParser) -> int:
    """Command line: [--device cpu|cuda] [--quick] [--only OP] [--json PATH] [--csv PATH] [--threads N]
    [--budget SECONDS].

    Prints the table on stdout, and on stderr a line `<prog>: timing <case>` as each case starts. Returns 0, or 1
    when some implementation failed. `prog` is the command name shown in help, errors and those lines
    (`sparsekern bench` from the CLI), and `parser_class` the argument parser (both the default and the CLI's report
    errors on one line, exit code 2). Arguments, --json and --csv paths and --only included, are checked before any
    case is built. Modules run on request only (compiled_training_step) run when --only names them or their ops.

    A Ctrl-C stops it with one line on stderr, `<prog>: interrupted`, and returns 130 (the shell's code for a command
    that SIGINT ended), as it stops `sparsekern train`: what was printed stays, and a --json or --csv file is
    written whole or not at all (`sparsekern.checkpoint.write_atomically`).
    """
    try:
        return _report(argv, prog, parser_class)
    except KeyboardInterrupt:   # rather than its traceback
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def _report(argv: list[str] | None, prog: str, parser_class: type[argparse.ArgumentParser]) -> int:
    parser = parser_class(prog=prog, description="Times sparsekern's ops against the torch code they replace.")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where to time the ops (default: cpu; `sparsekern bench` uses cuda when there is a GPU)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks that every case runs")
    parser.add_argument("--only", metavar="OP",
                        help="one case module (e.g. topk_mask), or the cases whose op starts with OP; "
                             "compiled_training_step (torch.compile, minutes of compiling) runs only when named")
    parser.add_argument("--json", type=path_argument, metavar="PATH", help="also write the rows as JSON")
    parser.add_argument("--csv", type=path_argument, metavar="PATH", help="also write the rows as CSV")
    parser.add_argument("--threads", type=int, metavar="N", help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--budget", type=float, metavar="SECONDS",
                        help="seconds of timed calls per implementation (default 2, 0.05 with --quick)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.budget is not None and not 0 < args.budget < math.inf:   # inf: no count of timed rounds fits in it
        parser.error(f"--budget must be a finite number > 0, got {args.budget}")
    if args.threads is not None:
        try:
            _checks.thread_count(args.threads, "--threads")
        except ValueError as error:
            parser.error(str(error))
    for option, path in (("--json", args.json), ("--csv", args.csv)):
        if path is not None and not path.strip():   # an unset shell variable: no file would be written, silently
            parser.error(f"{option} needs a file path, got {path!r}")
        if path:  # checked before the timings, which a failed write at the end would throw away
            try:
                checkpoint.check_destination(path, option)   # a folder, a trailing separator, a device
                checkpoint.check_writable_folder(os.path.dirname(os.path.abspath(path)), f"{option}'s folder")
            except ValueError as error:
                parser.error(str(error))
    if args.only is not None:
        try:
            modules = core.case_modules(args.only)
        except ValueError as error:
            parser.error(str(error))
        reasons = core.unavailable(modules, torch.device(args.device))
        if len(reasons) == len(modules):  # nothing it selects can run here: say why, before building anything
            parser.error(f"--only {args.only!r}: {'; '.join(reasons)}")
        for reason in reasons:  # the rest runs; a table without the modules asked for must say why, as a warning
            print(f"{parser.prog}: warning: skipped {reason}", file=sys.stderr)   # under the command's name
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    # Messages, not a bar redrawn in place: a case can time for minutes (compiled_training_step compiles first), and
    # in a log the last line names the one running. Under the command's name, as its warnings and errors are.
    rows = run(device, args.quick, args.only, args.budget,
               progress=lambda line: print(f"{parser.prog}: {line}", file=sys.stderr, flush=True))
    if not rows:  # its modules have no case at these sizes on this device (triton_masked_linear on CPU)
        parser.error(f"--only {args.only!r}: no case of it runs on {args.device}"
                     f"{'' if args.quick else ' without --quick'}")
    where = environment(device)
    print(where)
    # The ratio is paired per round (core.measure): on a loaded machine it can be far from the ratio of the two
    # medians in the time column, which the header said it was.
    print("speed-up = baseline time / time in the same round, the median over rounds (each times every "
          "implementation once), so not always the ratio of the median times shown (it is for an implementation "
          "too slow to time more than once): above 1 is faster than the case's baseline, the torch code it "
          "replaces.")
    if args.quick:
        print("--quick: tiny sizes, to check that every case runs; its times and speed-ups are not measurements.")
    print(format_table(rows))
    if args.json:
        write(rows, args.json, "json", where)
    if args.csv:
        write(rows, args.csv, "csv")
    return 1 if any(row.error is not None for row in rows) else 0
