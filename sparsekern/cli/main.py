"""The `sparsekern` command: `train` one run, `compare` a grid of runs, `reproduce` the seed papers' findings,
`bench` the kernels.

With no subcommand it runs `compare` with its defaults on scikit-learn's bundled digits.
Every bad input (an argument, the dataset's content, a resume checkpoint, the output folder or a file it is to hold,
SPARSEKERN_BACKEND) fails with a one-line error and exit code 2 before any training, which starts with the
subcommand as argparse's own errors do (`sparsekern train: error: ...`), as do warnings. `train` also runs
data-parallel on the ranks torchrun starts (README.md, `sparsekern train`), where a bad input on any rank stops every
rank with that error. A device that runs out of memory (torch.OutOfMemoryError: loading --resume, training) stops
the command with one such line and exit code 2 too. A Ctrl-C while train, compare or reproduce checks its inputs or
runs stops it with one line (`sparsekern train: interrupted`, and how to go on once training started) and exit code
130, as it stops bench (`sparsekern bench: interrupted`).
"""
from __future__ import annotations

import argparse
import difflib
import math
import os
import sys
import textwrap
import time
import warnings
from dataclasses import asdict

import torch

from . import compare as compare_module
from . import data_parallel
from . import reproduce as reproduce_module
from ..algorithms.criteria import ELEMENTWISE, GROW, OWN_COUNT, PARAMETER_MAX, PRUNE
from ..algorithms.dst import SCOPES, SWAP_ROUNDINGS
from ..algorithms.optg import MIN_EPOCHS_DIGITS
from ..bench import report
from ..ops._backend import backends
from ..ops._checks import thread_count
from .counts import check_counts, sparse_layers
from .data import check_dataset, load_dataset
from .models import MODELS, build_model
from .output import check_outputs, counted, first_line, make_output_folders
from .recipes import (CRITERION_PARAMETERS, DST_PRESETS, TICKET_METHODS, TICKET_SCOPE, criteria_of, dst_settings,
                      ticket_scope_of)
from .runs import RUNS_FOLDER
from .training import (CHECKPOINT_NAME, DISTRIBUTIONS, INITS, METHODS, OUTPUT_FILES, SCHEDULES, Diverged,
                       TrainConfig, check_cycle_steps, prepare, read_checkpoint, total_epochs)

TRAIN_OUT = "runs/train"   # train's --out unless told, or resuming
# The ops a training run calls: a SPARSEKERN_BACKEND that cannot run one of them is refused before training.
TRAINING_OPS = ("masked_linear", "topk_mask", "topk_mask_per_tensor", "prune_grow")
_SPARSE_METHODS = tuple(method for method in METHODS if method != "dense")


class _Parser(report.OneLineParser):
    """argparse that reports a bad argument on one line (no usage block), exit code 2, takes options as spelled
    only (`report.OneLineParser`), and shows defaults."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)
        self._commands: dict[str, argparse.ArgumentParser] = {}

    def add_subparsers(self, **kwargs):
        action = super().add_subparsers(**kwargs)
        self._commands = action.choices
        return action

    def command(self, name: str) -> argparse.ArgumentParser:
        """The parser of subcommand `name` (this one for -h and --help): every error and warning of a command
        starts with its parser's prog, `sparsekern train: error: ...`, as argparse's own errors do. A name that
        is no subcommand exits with one error line naming the closest subcommand (argparse's own listed the
        choices only)."""
        if name in ("-h", "--help"):
            return self
        if name not in self._commands:
            close = difflib.get_close_matches(name, self._commands, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            self.error(f"unknown command {name!r}{hint} (commands: {', '.join(self._commands)})")
        return self._commands[name]


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help gives every option's default (a list as it is typed, comma-separated) unless its help says it."""

    def _get_help_string(self, action):
        help_text = action.help or ""
        unset = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if "default" in help_text or unset or not action.option_strings:
            return help_text
        default = action.default
        shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{help_text} (default: {shown.replace('%', '%%')})".lstrip()


def _number(text: str, what: str, low: float, high: float, low_open: bool = True) -> float:
    """A finite number in (low, high] (or [low, high] unless `low_open`); high may be math.inf, then open."""
    bounds = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if math.isinf(high) else ']'}"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what} must be a number in {bounds}, got {text!r}") from None
    if not (math.isfinite(value) and (low < value if low_open else low <= value) and value <= high):
        raise argparse.ArgumentTypeError(f"{what} must be in {bounds}, got {text}")
    return value


def _density(text: str) -> float:
    return _number(text, "density", 0, 1)


def _fraction(name: str):
    return lambda text: _number(text, name, 0, 1)


# The optimizers step float32 weights by -lr x gradient, and torch refuses an lr that float32 cannot hold (a traceback:
# "value cannot be converted to type float without overflow"): --lr ends at float32's largest number.
LR_MAX = torch.finfo(torch.float32).max


def _learning_rate(text: str) -> float:
    return _number(text, "lr", 0, LR_MAX)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


# torch.manual_seed takes 64 bits, but the data-order seeds multiply the seed (seed * 1_000_003 + ...): 32 bits, NumPy's
# seed range, keep every derived seed in range; a negative seed (-1 meaning "random" elsewhere) would be fixed here.
MAX_SEED = 2 ** 32 - 1
# A compare grid holding more runs than this is a typo (say --seeds 1000000000000), not a plan: building it
# would hang before the first run.
MAX_RUNS = 100_000
# So is a run of more epochs than this, all segments together (say --epochs 100000000000000000000): it would train
# for ever.
MAX_EPOCHS = 100_000
_SEGMENTS = {"imp": " (--epochs x --cycles)", "swamp": " (--epochs x --cycles x --particles)"}
_LOWER = {"imp": "--epochs or --cycles", "swamp": "--epochs, --cycles or --particles"}


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed in [0, {MAX_SEED}], got {text!r}") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"seed must be in [0, {MAX_SEED}], got {text}")
    return value


def _block(text: str) -> tuple[int, int]:
    """DST's (bh, bw) from "BHxBW"."""
    sizes = text.lower().split("x")
    try:
        if len(sizes) == 2:
            return _positive(sizes[0]), _positive(sizes[1])
    except argparse.ArgumentTypeError:
        pass
    raise argparse.ArgumentTypeError(f"block must be two positive integers BHxBW, such as 4x4, got {text!r}")


def _threads(text: str) -> int:
    try:
        return thread_count(_positive(text), "threads")
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _choices(allowed: tuple[str, ...], what: str):
    """A comma-separated list whose every item is in `allowed`."""

    def parse(text: str) -> list[str]:
        items = list(dict.fromkeys(item.strip() for item in text.split(",") if item.strip()))
        unknown = [item for item in items if item not in allowed]
        if unknown or not items:
            raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(unknown) or repr(text)}; "
                                             f"choose from {', '.join(allowed)}")
        return items

    return parse


def _densities(text: str) -> list[float]:
    densities = list(dict.fromkeys(_density(item) for item in text.split(",") if item.strip()))
    if not densities:
        raise argparse.ArgumentTypeError(f"expected comma-separated densities, got {text!r}")
    # The tables, plots and run labels show a density as {:g}: two that read alike would be two columns of one name.
    shown = [f"{density:g}" for density in densities]
    alike = [density for density, label in zip(densities, shown) if shown.count(label) > 1]
    if alike:
        raise argparse.ArgumentTypeError(f"densities {', '.join(map(repr, alike))} read alike in the results "
                                         f"({shown[densities.index(alike[0])]}): give distinct densities")
    return densities


def _add_run_options(parser: argparse.ArgumentParser, defaults: TrainConfig) -> None:
    """Options shared by train and compare: the model, data and optimisation."""
    parser.add_argument("--model", choices=MODELS, default=defaults.model,
                        help="network: an MLP (width 256) or a small CNN that adapts to the image size")
    parser.add_argument("--dataset", type=report.path_argument, default=defaults.dataset,
                        help="'digits' (bundled with scikit-learn), a .npz with arrays x and y, or an image folder "
                             "with one subfolder per class")
    parser.add_argument("--distribution", choices=DISTRIBUTIONS,
                        help=f"how the density is spread over the layers of the runs that start sparse (static, "
                             f"DST); imp, swamp, optg and gmp prune from dense, all layers together (imp and "
                             f"swamp per layer with --scope layer) "
                             f"(default: {defaults.distribution})")
    parser.add_argument("--init", choices=INITS, default=defaults.init,
                        help="initial weights: 'sparse' (variance 1/fan-in over the active inputs), 'layer-scaled' "
                             "(dense variance / density) or 'dense' (torch's default, masked); dense runs and the "
                             "runs that start dense use it at density 1 (default: %(default)s)")
    parser.add_argument("--epochs", type=_positive, default=defaults.epochs,
                        help="epochs of one training segment (IMP trains --cycles of them, SWAMP --cycles x "
                             "--particles)")
    parser.add_argument("--batch-size", type=_positive, default=defaults.batch_size, help="training batch size")
    parser.add_argument("--lr", type=_learning_rate, default=defaults.lr,
                        help=f"SGD learning rate (momentum {defaults.momentum:g}, weight decay "
                             f"{defaults.weight_decay:g}), cosine-annealed to 0 over each segment (SWAMP: to half of it, "
                             f"held there while it averages)")
    parser.add_argument("--scope", choices=SCOPES,
                        help=f"DST: per layer or global updates (default: {defaults.scope}); IMP, SWAMP: magnitude "
                             f"pruning per layer or over all layers together (default: {TICKET_SCOPE})")
    parser.add_argument("--update-every", type=_positive,
                        help=f"DST: steps between mask updates (default: {defaults.update_every})")
    parser.add_argument("--end-fraction", type=_fraction("end fraction"),
                        help="DST: no mask update from this fraction of training on (default: the schedule's, 0.75 "
                             "for cosine and constant, as RigL's paper runs RigL and SET; 1 for annealed)")
    parser.add_argument("--swap-rounding", choices=SWAP_ROUNDINGS,
                        help="DST: the swap count r x active weights made whole by round (halves to even), floor, "
                             "as RigL's code, or ceil, as the Fantastic Weights code (default: round)")
    # The criteria's parameters end at float32's largest number (the library's limit, where their scores are
    # computed): refused here in the options' names, not in the library's (mest_gamma=...) once the run is built.
    parser.add_argument("--mest-gamma", type=lambda text: _number(text, "mest gamma", 0, PARAMETER_MAX,
                                                                  low_open=False),
                        help="DST: γ of the mest pruning criterion |θ| + γ|g| (default: 1)")
    parser.add_argument("--sensitivity-offset", type=lambda text: _number(text, "sensitivity offset", 0, PARAMETER_MAX),
                        help="DST: what the sensitivity and rsensitivity pruning criteria add to their denominators "
                             "(default: 1e-8, a guard; the Fantastic Weights code adds 1)")
    parser.add_argument("--snip-shift", type=lambda text: _number(text, "snip shift", 0, PARAMETER_MAX,
                                                                  low_open=False),
                        help="DST: what the snip pruning criterion adds to its score |θ·g| (default: 0; the "
                             "Fantastic Weights code adds 1e-5)")
    parser.add_argument("--block", type=_block, metavar="BHxBW",
                        help="DST: masks made of whole BHxBW blocks of each weight (as a matrix: its first dimension "
                             "by the rest), dropped and grown whole by their summed scores; not with the set, set_fw "
                             "or set_fixed criteria (default: none, single weights)")
    parser.add_argument("--cycles", type=_positive,
                        help=f"IMP, SWAMP: training cycles, a pruning between two, the last to --density (IMP: "
                             f"--epochs epochs each; SWAMP: --particles x --epochs) (default: {defaults.cycles})")
    parser.add_argument("--particles", type=_positive,
                        help=f"SWAMP: particles per cycle (default: {defaults.particles})")
    _add_machine_options(parser, defaults)


def _add_machine_options(parser: argparse.ArgumentParser, defaults: TrainConfig) -> None:
    parser.add_argument("--device", choices=("cpu", "cuda"), default=defaults.device, help="where to train")
    parser.add_argument("--threads", type=_threads, default=1,
                        help="torch CPU threads (default 1: these small models run fastest on one, and a "
                             "run is bit-reproducible only with the same count)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_jobs_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--jobs", type=_positive, default=_usable_cpus(),
                        help="runs trained at once, one process each (default: the CPUs this process may use, "
                             "%(default)s); results do not depend on it")


def _usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _paragraph(text: str) -> str:
    """A subcommand's description, wrapped (the raw formatter, which keeps the top help's lines, wraps nothing)."""
    return textwrap.fill(text, width=100)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sparsekern", description=__doc__)
    commands = parser.add_subparsers(dest="command", parser_class=_Parser)

    train_parser = commands.add_parser(
        "train", help="train one model and write metrics and a checkpoint (data-parallel on the ranks torchrun "
                      "starts)",
        description=_paragraph(
            "Trains one model, writing its metrics and checkpoint to --out after every epoch, and prints "
            "its final test accuracy (in percent), loss, density and gradient flow. Methods: dense; static "
            "(a fixed random mask); set, rigl and mest (DST presets) and dst (DST with any --prune, --grow "
            "and --schedule); imp (iterative magnitude pruning, rewinding); swamp (IMP whose mask averages "
            "SWA particles); optg (pruning scores trained with the weights); gmp (gradual magnitude "
            "pruning). Densities are fractions of the weights kept. README.md, `sparsekern train`, says "
            "more."))
    train_parser.add_argument("--method", choices=METHODS, default=TrainConfig.method,
                              help="how the mask is found (README.md, `sparsekern train`)")
    train_parser.add_argument("--density", type=_density,
                              help=f"fraction of weights kept, in (0, 1]; not for dense, which keeps every weight "
                                   f"(default: {TrainConfig.density})")
    train_parser.add_argument("--prune", choices=PRUNE, help="DST pruning criterion (default: the method's)")
    train_parser.add_argument("--grow", choices=GROW, help="DST growth criterion (default: the method's)")
    train_parser.add_argument("--schedule", choices=SCHEDULES, help="DST drop-fraction schedule (default: the "
                              "method's: cosine for rigl and dst, constant for set and mest)")
    train_parser.add_argument("--drop-fraction", type=_fraction("drop fraction"),
                              help="DST initial fraction of active weights moved per update (default: the schedule's)")
    train_parser.add_argument("--seed", type=_seed, default=TrainConfig.seed,
                              help="initial weights, masks, data order and random criteria (the test split is fixed)")
    _add_run_options(train_parser, TrainConfig())
    train_parser.add_argument("--out", type=report.path_argument,
                              help="directory for the metrics (metrics.json, metrics.csv, gradient_flow.csv) and "
                                   f"checkpoint.pt, rewritten after every epoch (default: {TRAIN_OUT}; with --resume, "
                                   f"the checkpoint's folder)")
    train_parser.add_argument("--resume", type=report.path_argument, metavar="CKPT",
                              help="continue the run saved in this checkpoint (given the arguments it was started "
                                   "with)")
    train_parser.add_argument("--stop-after", type=_positive, metavar="EPOCH",
                              help="stop after this epoch (resume later with --resume)")

    compare_defaults = TrainConfig(epochs=compare_module.DEFAULT_EPOCHS)
    compare_parser = commands.add_parser(
        "compare", help="train a grid of methods, criteria and densities",
        description=_paragraph(
            "Trains every method (and, for dst, every pruning criterion) at every density for every seed, "
            "then prints test accuracy in percent, mean ± sd over seeds, the best sparse line of each "
            "density in bold, and writes results.md, results.csv, runs.csv, accuracy_vs_density.png and "
            "grid.json to --out (README.md, `The command line`, describes them)."))
    compare_parser.add_argument("--methods", type=_choices(METHODS, "method"),
                                default=list(compare_module.DEFAULT_METHODS),
                                help=f"comma-separated methods, one line each, from {', '.join(METHODS)}")
    compare_parser.add_argument("--criteria", type=_choices(tuple(PRUNE), "criterion"),
                                help=f"comma-separated pruning criteria, one line each when --methods has "
                                     f"{compare_module.CRITERION_METHOD}, from {', '.join(PRUNE)} (default: "
                                     f"{','.join(compare_module.DEFAULT_CRITERIA)})")
    compare_parser.add_argument("--grow", choices=GROW,
                                help=f"growth criterion of the criteria lines (default: {compare_module.DEFAULT_GROW})")
    compare_parser.add_argument("--schedule", choices=SCHEDULES,
                                help="drop-fraction schedule of the criteria lines: cosine (RigL's, 0.3 to 75%% of "
                                     "training), annealed (Fantastic Weights': 0.5 to 0.005 over all of it) or "
                                     f"constant (default: {compare_module.DEFAULT_SCHEDULE})")
    compare_parser.add_argument("--densities", type=_densities,
                                help=f"comma-separated target densities, one column each, of the lines other than "
                                     f"dense (default: {','.join(map(str, compare_module.DEFAULT_DENSITIES))})")
    compare_parser.add_argument("--seeds", type=_positive, default=compare_module.DEFAULT_SEEDS,
                                help="N: seeds 0..N-1 per point")
    _add_run_options(compare_parser, compare_defaults)
    compare_parser.add_argument("--out", type=report.path_argument, default="runs/compare",
                                help="directory for the tables, CSVs and plot; finished runs are kept in its runs/ "
                                     "folder, and a rerun into it trains only what is missing")
    compare_parser.add_argument("--fresh", action="store_true", help="train every run again, ignoring finished "
                                                                     "runs in --out (after a change to the code)")
    _add_jobs_option(compare_parser)

    reproduce_parser = commands.add_parser(
        "reproduce", help="one small experiment per claim of the seed papers, reported with verdicts, plots and "
                          "CSVs",
        description=_paragraph(
            "Runs one small experiment on digits per claim of the seed papers (DST vs static, pruning "
            "criteria, lottery tickets, SWAMP, OptG, gradient flow) and writes report.md (each claim's "
            "numbers, mean ± sd over seeds, and its verdict), a plot and a CSV per claim and runs.csv to "
            "--out."))
    reproduce_parser.add_argument("--quick", action="store_true",
                                  help="a smoke test of every claim (fewer seeds, epochs and densities): under a "
                                       "minute of CPU time, so a minute or more of waiting on a busy machine")
    reproduce_parser.add_argument("--out", type=report.path_argument, default="runs/reproduce",
                                  help="directory for report.md, plots and CSVs; finished runs are kept in its runs/ "
                                       "folder, and a rerun into it trains only what is missing")
    reproduce_parser.add_argument("--fresh", action="store_true",
                                  help="train every run again, ignoring finished runs in --out")
    _add_jobs_option(reproduce_parser)
    _add_machine_options(reproduce_parser, TrainConfig())

    commands.add_parser("bench", help="run the kernel benchmark report on the GPU if there is one, else the CPU "
                                      "(`sparsekern bench --help` lists its options)")
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["compare", *argv]
    command = parser.command(argv[0])
    if command is not parser and not {"-h", "--help"} & set(argv):   # help answers anywhere, a launched rank too
        _refuse_launcher(command, argv[0])
    if argv[0] == "bench":  # its arguments belong to the report's own parser
        sys.exit(_bench(argv[1:]))
    # argparse reports a subcommand's unknown arguments under the top prog ("sparsekern: error:"); under the
    # subcommand's, they read as its other errors do
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        command.unrecognized(unknown)
    try:
        _run(command, args)
    finally:  # the process group train started on several ranks, also after an error
        data_parallel.end()


def _run(parser: argparse.ArgumentParser, args) -> None:
    """Checks the inputs, then runs the command of `parser` (its subcommand's, whose prog starts every line).
    Warnings raised while checking the inputs are held back: a refused input gets its one error line only, an
    accepted one each warning on one line."""
    with warnings.catch_warnings(record=True) as held:
        warnings.simplefilter("always")
        try:
            torch.set_num_threads(args.threads)
            job = {"train": _prepare_train, "compare": _prepare_compare,
                   "reproduce": _prepare_reproduce}[args.command]
            start = job(args)
        except (ValueError, torch.OutOfMemoryError) as error:   # a bad input; a device too small to load the run
            parser.error(str(error))
        except KeyboardInterrupt:   # checking the inputs, reading the data, joining the other ranks: nothing done yet
            _stop_interrupted(parser.prog)
    _warn_each(parser.prog, held)
    with warnings.catch_warnings(record=True) as held:  # shown after the results, one line each
        warnings.simplefilter("always")
        found = _checkpoint_written(args)
        try:
            start()
        except KeyboardInterrupt:
            _stop_interrupted(parser.prog, f"; finished work is kept in {args.out} ({_rerun(args, found)} to go on)")
        except Diverged as error:   # an --lr too high for the run: its finished epochs stay in --out
            parser.error(str(error))
        except (OSError, torch.OutOfMemoryError) as error:
            # --out checked writable before, but a disk fills up or a folder goes away; or the device's memory runs out
            once = "it can be written" if isinstance(error, OSError) else "the device has the memory"
            parser.error(f"{first_line(error)}; finished work is kept in {args.out} ({_rerun(args, found)} to go on "
                         f"once {once})")
        finally:
            _warn_each(parser.prog, held)


def _stop_interrupted(prog: str, hint: str = "") -> None:
    """Ends the command after a Ctrl-C: one line, `sparsekern train: interrupted` and `hint` (rank 0 only), and exit
    code 130, the shell's for a command that SIGINT ended (128 + 2), rather than KeyboardInterrupt's traceback."""
    if _leads():
        print(f"{prog}: interrupted{hint}", file=sys.stderr)
    sys.exit(130)


def _rerun(args, found: tuple[int, int] | None) -> str:
    """How to go on after an interruption: compare and reproduce, run again, reuse the runs they finished, but train
    starts over unless told to resume, and overwrites the checkpoint of its last finished epoch; `found`, the
    checkpoint in --out as the command started (`_checkpoint_written`), tells one this run wrote from an older run's,
    which resuming with this run's arguments would refuse."""
    written = _checkpoint_written(args)
    if args.command == "train" and written is not None and written != found:
        return f"rerun the same command with --resume {os.path.join(args.out, CHECKPOINT_NAME)}"
    return "rerun the same command"


def _checkpoint_written(args) -> tuple[int, int] | None:
    """(inode, modification time) of train's checkpoint in --out, None where there is none: each save replaces the
    file whole (`sparsekern.checkpoint.save`), so a save since changes both."""
    try:
        stat = os.stat(os.path.join(args.out, CHECKPOINT_NAME))
    except OSError:
        return None
    return stat.st_ino, stat.st_mtime_ns


def _refuse_launcher(parser: argparse.ArgumentParser, command: str) -> None:
    """One error line when torchrun (or another torch.distributed launcher, which sets WORLD_SIZE) started
    several copies of a command other than train: each copy would train the same runs and write the same
    files, in a job that looks distributed. Also one for launcher variables that describe no rank."""
    world_size = os.environ.get("WORLD_SIZE", "1").strip()
    if command != "train" and world_size not in ("", "1"):
        parser.error(f"only train runs data-parallel on the ranks of a torch.distributed launcher (torchrun), but "
                     f"WORLD_SIZE={world_size} says one started this {command!r} on several, each of which would "
                     f"do the same work{' into the same --out' if command != 'bench' else ''}: run it without the "
                     f"launcher (compare and reproduce train runs in parallel with --jobs)")
    try:
        data_parallel.from_environment()
    except ValueError as error:
        parser.error(str(error))


def _leads() -> bool:
    """Whether this process prints progress, results and warnings: rank 0 of a data-parallel train (every rank
    prints its errors: each is why that rank stopped)."""
    try:
        return data_parallel.from_environment().rank == 0
    except ValueError:
        return True


def _warn_each(prog: str, held: list) -> None:
    """Each distinct warning of `held` on one line, `sparsekern train: warning: ...` (rank 0 only)."""
    if _leads():
        for message in dict.fromkeys(str(warning.message) for warning in held):
            print(f"{prog}: warning: {' '.join(message.split())}", file=sys.stderr)


def check_backend(device: str) -> None:
    """ValueError (one line) if SPARSEKERN_BACKEND is unknown or names a backend that cannot run training's ops."""
    report = backends()  # raises ValueError for an unknown name
    for op in TRAINING_OPS:
        error = report["ops"][op][device].get("error")
        if error is not None:
            raise ValueError(error)


def _warn_short_optg(method: str, epochs: int) -> None:
    if method == "optg" and epochs < MIN_EPOCHS_DIGITS:
        warnings.warn(f"OptG needs about {MIN_EPOCHS_DIGITS} epochs for its scores to settle (measured on digits, 3 "
                      f"seeds, at 10 epochs: 35% at density 0.02 and 38% at 0.05, where magnitude pruning on the same "
                      f"ramp reaches 48% and 77%); with --epochs {epochs} its mask may collapse far below magnitude "
                      f"pruning on the same ramp (--method gmp)")


# Options that only some methods read (with None defaults, so that one given explicitly is known): the methods.
# Dense trains every weight: train's --density, and compare's --densities when dense is its only line.
_METHOD_OPTIONS = {"density": _SPARSE_METHODS, "densities": _SPARSE_METHODS,
                   "distribution": ("static", *DST_PRESETS),
                   "scope": (*DST_PRESETS, *TICKET_METHODS),
                   "update_every": tuple(DST_PRESETS), "end_fraction": tuple(DST_PRESETS),
                   "swap_rounding": tuple(DST_PRESETS), "mest_gamma": tuple(DST_PRESETS),
                   "sensitivity_offset": tuple(DST_PRESETS), "snip_shift": tuple(DST_PRESETS),
                   "block": tuple(DST_PRESETS),
                   "cycles": TICKET_METHODS, "particles": ("swamp",)}
_CRITERIA_OPTIONS = ("criteria", "grow", "schedule")   # compare: of the criteria lines only
# train's own: its DST criteria and schedule (compare's grow and schedule are of its criteria lines: above)
_TRAIN_OPTIONS = {name: tuple(DST_PRESETS) for name in ("prune", "grow", "schedule", "drop_fraction")}


def _check_options_apply(args, methods: list[str]) -> None:
    """ValueError for an option given explicitly that none of `methods` reads (it would be silently ignored); an
    option of the other command (density, densities) is absent from `args`."""
    for name, readers in {**_METHOD_OPTIONS, **(_TRAIN_OPTIONS if args.command == "train" else {})}.items():
        if getattr(args, name, None) is not None and not set(methods) & set(readers):
            raise ValueError(f"--{name.replace('_', '-')} applies to the methods {', '.join(readers)}, not "
                             f"{', '.join(map(repr, methods))}")
    if args.command == "compare" and compare_module.CRITERION_METHOD not in methods:
        for name in _CRITERIA_OPTIONS:
            if getattr(args, name) is not None:
                raise ValueError(f"--{name} applies to the criteria lines of --methods "
                                 f"{compare_module.CRITERION_METHOD}, which --methods {','.join(methods)} lacks")


def _check_epochs(configs: list[TrainConfig]) -> None:
    """ValueError for a run of more than MAX_EPOCHS epochs in all, naming the options that multiply to them."""
    longest = max(configs, key=total_epochs)
    if total_epochs(longest) > MAX_EPOCHS:
        raise ValueError(f"{longest.method} runs of {total_epochs(longest)} epochs{_SEGMENTS.get(longest.method, '')} "
                         f"are more than {MAX_EPOCHS}: lower {_LOWER.get(longest.method, '--epochs')}")


def _check_criterion_parameters(args, configs: list[TrainConfig]) -> None:
    """ValueError for --mest-gamma, --sensitivity-offset or --snip-shift given where no DST run prunes by a criterion
    reading it (DST would silently ignore it)."""
    prunes = {criteria_of(config)[0] for config in configs if config.method in DST_PRESETS}
    for name, readers in CRITERION_PARAMETERS.items():
        if getattr(args, name) is not None and not prunes & set(readers):
            raise ValueError(f"--{name.replace('_', '-')} applies to runs pruning by {', '.join(readers)}, not "
                             f"{', '.join(sorted(prunes)) or 'none'}")


def _check_block_criterion(args, configs: list[TrainConfig]) -> None:
    """ValueError for --block given where a DST run prunes by a criterion that scores no single weight (set and
    its threshold rules)."""
    ranked = sorted({criteria_of(config)[0] for config in configs if config.method in DST_PRESETS} - ELEMENTWISE)
    if args.block is not None and ranked:
        reasons = [f"{name} (a threshold rule: it decides how many it drops)" if name in OWN_COUNT
                   else f"{name} (a rank over the layer)" for name in ranked]
        raise ValueError(f"--block applies to runs pruning by a criterion that scores each weight, not "
                         f"{', '.join(reasons)}")


def _prepare_train(args):
    if args.out is None:   # a resumed run goes on writing where it was written, not into the default folder
        args.out = TRAIN_OUT if args.resume is None else os.path.dirname(args.resume) or "."
    ranks = data_parallel.from_environment()
    if ranks.several:
        data_parallel.start(ranks, args.device)
    config, dataset, resumed_epoch = _agreed(ranks, lambda: _check_train(args, ranks))
    if ranks.several:   # before prepare(), whose algorithms would refuse some differences in their own terms only
        data_parallel.agree_on_run(_lockstep_arguments(args, config, dataset, resumed_epoch))
    run = prepare(config, dataset)  # collective on several ranks: the algorithms check that the ranks' masks agree
    _agreed(ranks, lambda: _check_run(args, run, ranks))
    _warn_short_optg(config.method, config.epochs)

    def start():
        resumed_at = run.epoch
        result = run.train(args.out, args.stop_after, progress=not args.quiet)
        final = result.final
        done = "finished" if final["epoch"] == total_epochs(config) else f"stopped after epoch {final['epoch']}"
        if final["epoch"] == resumed_at:   # a resumed run already there: say so rather than seem to have trained
            done = f"{done} (nothing trained: the checkpoint was already at epoch {resumed_at})"
        on = f" on {ranks.world_size} ranks" if ranks.several else ""
        if _leads():
            summary = result.summary()
            print(f"{config.method} {done}{on}: test accuracy {100 * final['test_accuracy']:.2f}%, test loss "
                  f"{final['test_loss']:.4f}, density {final['density']:.4f}, gradient flow "
                  f"{final['gradient_flow']:.4g} (mean over epochs {summary['gradient_flow_mean']:.4g})"
                  f"{_costs_text(summary)}; metrics and checkpoint in {args.out}")

    return start


def _costs_text(summary: dict) -> str:
    """A run's costs as its end-of-run line says them, each after a comma, where its metrics counted them: a run
    resumed from a checkpoint of earlier versions has no training FLOPs, and no inference MACs either where it had
    no epoch left to train."""
    text = ""
    if "inference_macs" in summary:
        text += (f", inference {summary['inference_macs']:,} MACs per example "
                 f"({summary['inference_flops_fraction']:.3g} of dense)")
    if "training_flops_fraction" in summary:
        text += f", training FLOPs {summary['training_flops_fraction']:.3g} of dense"
    return text


def _agreed(ranks: data_parallel.Ranks, check):
    """check()'s result. On several ranks each runs its check, then all agree: a ValueError (or
    torch.OutOfMemoryError) on any rank is raised on every rank as a ValueError, where one rank stopping alone would
    leave the others waiting in their next collective."""
    if not ranks.several:
        return check()
    result = error = None
    try:
        result = check()
    except (ValueError, torch.OutOfMemoryError) as failed:   # a rank out of memory restoring --resume, say
        error = str(failed)
    data_parallel.agree(error)
    return result


def _lockstep_arguments(args, config: TrainConfig, dataset, resumed_epoch: int | None) -> dict:
    """What every rank of a data-parallel run must share, by option name: the config's options but --dataset's path,
    the data read from it, --stop-after and the epoch --resume's checkpoint holds (None without --resume). Paths may
    differ from one machine to another; the same path may hold other data on another. A DST option is compared as
    the run takes it (`dst_settings`): --prune magnitude given on one rank and left to rigl's own on another agree;
    so is an IMP or SWAMP run's --scope, which sets its ticket_scope (`_config`)."""
    settings = {**asdict(config), **dst_settings(config)}
    del settings["ticket_scope"]
    if config.method in TICKET_METHODS:
        settings["scope"] = ticket_scope_of(config)
    options = {f"--{name.replace('_', '-')}": value for name, value in settings.items() if name != "dataset"}
    return {**options, "--dataset (its data)": dataset.fingerprint(), "--stop-after": args.stop_after,
            "--resume (its epoch)": resumed_epoch}


def _check_train(args, ranks: data_parallel.Ranks):
    """(config, dataset, the epoch of --resume's checkpoint or None) of a train command, every input but --resume's
    state and whether --out can be created and written in checked (ValueError, one line)."""
    _check_options_apply(args, [args.method])
    density = TrainConfig.density if args.density is None else args.density
    config = _config(args, method=args.method, density=density, seed=args.seed, prune=args.prune,
                     grow=args.grow, schedule=args.schedule, drop_fraction=args.drop_fraction)
    _check_criterion_parameters(args, [config])
    _check_block_criterion(args, [config])
    _check_epochs([config])
    if args.stop_after is not None and args.stop_after > total_epochs(config):
        raise ValueError(f"--stop-after {args.stop_after} is past the run's last epoch, {total_epochs(config)}"
                         f"{_SEGMENTS.get(config.method, '')}: it would stop nothing")
    data_parallel.check_config(config, ranks)
    check_dataset(config.dataset)
    check_backend(config.device)
    if ranks.rank == 0:   # the rank that writes
        check_outputs(args.out, list(OUTPUT_FILES))
    dataset = load_dataset(config.dataset)
    check_cycle_steps(config, dataset)
    check_counts(config, sparse_layers(build_model(config.model, dataset.input_shape, dataset.num_classes,
                                                   config.width)))
    resumed_epoch = None if args.resume is None else _check_resume(args.resume, config)
    return config, dataset, resumed_epoch


def _check_run(args, run, ranks: data_parallel.Ranks) -> None:
    """Restores --resume into `run` (on every rank, so that all continue alike), then checks --stop-after against
    it and, last because it creates the folder, --out (on rank 0, which writes it)."""
    if args.resume is not None:
        run.restore(args.resume)
        if args.stop_after is not None and args.stop_after < run.epoch:
            raise ValueError(f"--stop-after {args.stop_after} is before epoch {run.epoch}, where the resume "
                             f"checkpoint already is: nothing would be trained")
    if ranks.rank == 0:
        make_output_folders(args.out, list(OUTPUT_FILES))


def _prepare_compare(args):
    _check_options_apply(args, args.methods)
    base = _config(args)
    densities = args.densities or list(compare_module.DEFAULT_DENSITIES)
    lines = compare_module.grid_lines(args.methods, args.criteria or list(compare_module.DEFAULT_CRITERIA),
                                      args.grow or compare_module.DEFAULT_GROW,
                                      args.schedule or compare_module.DEFAULT_SCHEDULE)
    runs = len(lines) * len(densities) * args.seeds
    if runs > MAX_RUNS:
        raise ValueError(f"the grid has {runs} runs ({len(lines)} lines x {len(densities)} densities x "
                         f"{counted(args.seeds, 'seed')}), more than {MAX_RUNS}: lower --seeds or --densities")
    # each line's settings are checked before the first run starts
    configs = [compare_module.line_config(base, line, density, seed=0) for line in lines for density in densities]
    _check_epochs(configs)
    _check_criterion_parameters(args, configs)
    _check_block_criterion(args, configs)
    check_dataset(base.dataset)
    check_backend(base.device)
    outputs = compare_module.output_files(lines, densities, args.seeds, base)
    check_outputs(args.out, outputs)
    dataset = load_dataset(base.dataset)
    layers = sparse_layers(build_model(base.model, dataset.input_shape, dataset.num_classes, base.width))
    for config in configs:
        check_cycle_steps(config, dataset)
        check_counts(config, layers, "--densities")
    make_output_folders(args.out, outputs)
    if "optg" in args.methods:
        _warn_short_optg("optg", base.epochs)

    def start():
        started = time.perf_counter()
        comparison = compare_module.run_compare(lines, densities, args.seeds, base, args.out,
                                                progress=not args.quiet, dataset=dataset, fresh=args.fresh,
                                                workers=args.jobs)
        print(compare_module.markdown_table(comparison.rows, base, args.seeds), end="")
        grid = " x ".join((counted(len(lines), "line"), counted(len(densities), "density", "densities"),
                           counted(args.seeds, "seed")))
        print(f"{grid}: {_runs_trained(comparison.runs, comparison.trained, args.out)} in "
              f"{time.perf_counter() - started:.1f} s; tables, CSVs and plot in {args.out}")

    return start


def _prepare_reproduce(args):
    check_backend(args.device)
    plan = reproduce_module.plan(quick=args.quick, device=args.device)
    outputs = reproduce_module.output_files(plan)
    check_outputs(args.out, outputs)
    dataset = load_dataset(plan.dataset)
    make_output_folders(args.out, outputs)

    def start():
        started = time.perf_counter()
        report = reproduce_module.run(plan, args.out, dataset=dataset, progress=not args.quiet, fresh=args.fresh,
                                      workers=args.jobs)
        print(report.summary_table(), end="")
        print(f"{len(report.claims)} claims from {_runs_trained(report.runs, report.trained, args.out)} in "
              f"{time.perf_counter() - started:.1f} s; report, plots and CSVs in {args.out}")

    return start


def _runs_trained(runs: int, trained: int, out: str) -> str:
    """'12 runs (3 trained now, 9 found in OUT/runs)': a rerun that trained nothing read as a fast one."""
    found = f", {runs - trained} found in {os.path.join(out, RUNS_FOLDER)}" if trained < runs else ""
    return f"{counted(runs, 'run')} ({trained} trained now{found})"


def _check_resume(path: str, config: TrainConfig) -> int:
    """The epoch of the checkpoint at `path`; ValueError unless `config` wrote it and its epoch is an int."""
    state = read_checkpoint(path, map_location="cpu")
    saved = state["config"]
    changed = [f"{name} {saved.get(name)!r} -> {value!r}" for name, value in asdict(config).items()
               if saved.get(name) != value]
    if changed:
        raise ValueError(f"resume checkpoint {path!r} was written with other arguments ({', '.join(changed)}); "
                         f"resume with the arguments of the interrupted run")
    if type(state["epoch"]) is not int:   # named here, on its rank: the ranks' comparison would show it as no --resume
        raise ValueError(f"resume checkpoint {path!r} is inconsistent (epoch {state['epoch']!r})")
    return state["epoch"]


def _bench(bench_args: list[str]) -> int:
    """The benchmark report on the CUDA device when there is one, else on the CPU (unless --device is given)."""
    if torch.cuda.is_available() and not any(arg.startswith("--device") for arg in bench_args):
        bench_args = ["--device", "cuda", *bench_args]
    return report.main(bench_args, prog="sparsekern bench", parser_class=_Parser)


def _config(args, **run) -> TrainConfig:
    """The run of `args` (`run`: train's method, density, seed and criteria; compare's lines set theirs later, and
    `compare.line_config` keeps ticket_scope for its IMP and SWAMP lines only). --scope sets DST's scope, or the
    tickets' ticket_scope: a field of its own, where runs stored before it hold DST's default scope."""
    given = {name: getattr(args, name) for name in ("distribution", "update_every", "cycles", "particles")
             if getattr(args, name) is not None}
    method = run.get("method")   # None: compare's base, for lines of both
    if args.scope is not None and method not in TICKET_METHODS:
        given["scope"] = args.scope
    if args.scope is not None and method in (None, *TICKET_METHODS):   # their own written out: the same run
        given["ticket_scope"] = None if args.scope == TICKET_SCOPE else args.scope
    return TrainConfig(init=args.init, model=args.model, dataset=args.dataset,
                       epochs=args.epochs, device=args.device, batch_size=args.batch_size, lr=args.lr,
                       end_fraction=args.end_fraction, swap_rounding=args.swap_rounding,
                       mest_gamma=args.mest_gamma, sensitivity_offset=args.sensitivity_offset,
                       snip_shift=args.snip_shift, block=args.block,
                       **given, **run)
