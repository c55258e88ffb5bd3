"""The `sparsekern` command: `train` one run, `compare` a grid of runs, `bench` the kernels.

With no subcommand it runs `compare` with its defaults on scikit-learn's bundled digits.
Bad arguments fail with a one-line error and exit code 2 before any training.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import asdict

import torch

from .. import checkpoint
from . import compare as compare_module
from ..algorithms.dst import SCOPES
from ..algorithms.criteria import GROW, PRUNE
from .data import check_dataset
from .models import MODELS
from .training import DISTRIBUTIONS, METHODS, SCHEDULES, TrainConfig, total_epochs, train


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument on one line (no usage block), exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _density(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"density must be a number in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"density must be in (0, 1], got {text}")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _choices(allowed: tuple[str, ...], what: str):
    """A comma-separated list whose every item is in `allowed`."""

    def parse(text: str) -> list[str]:
        items = [item.strip() for item in text.split(",") if item.strip()]
        unknown = [item for item in items if item not in allowed]
        if unknown or not items:
            raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(unknown) or repr(text)}; "
                                             f"choose from {', '.join(allowed)}")
        return items

    return parse


def _densities(text: str) -> list[float]:
    densities = [_density(item) for item in text.split(",") if item.strip()]
    if not densities:
        raise argparse.ArgumentTypeError(f"expected comma-separated densities, got {text!r}")
    return densities


def _add_run_options(parser: argparse.ArgumentParser, defaults: TrainConfig) -> None:
    """Options shared by train and compare: the model, data and optimisation."""
    parser.add_argument("--model", choices=MODELS, default=defaults.model)
    parser.add_argument("--dataset", default=defaults.dataset,
                        help="'digits' (bundled with scikit-learn), a .npz with arrays x and y, or an image folder "
                             "with one subfolder per class")
    parser.add_argument("--distribution", choices=DISTRIBUTIONS, default=defaults.distribution,
                        help="per-layer densities")
    parser.add_argument("--epochs", type=_positive, default=defaults.epochs)
    parser.add_argument("--batch-size", type=_positive, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr, help="SGD learning rate (cosine-annealed)")
    parser.add_argument("--scope", choices=SCOPES, default=defaults.scope, help="DST: per layer or global updates")
    parser.add_argument("--update-every", type=_positive, default=defaults.update_every,
                        help="DST: steps between mask updates")
    parser.add_argument("--cycles", type=_positive, default=defaults.cycles,
                        help="IMP, SWAMP: pruning cycles of --epochs epochs each")
    parser.add_argument("--particles", type=_positive, default=defaults.particles,
                        help="SWAMP: particles per cycle")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=defaults.device)
    parser.add_argument("--threads", type=_positive, default=1,
                        help="torch CPU threads (default 1: these small models run fastest on one, and a "
                             "run is bit-reproducible only with the same count)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sparsekern", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", parser_class=_Parser)

    train_parser = commands.add_parser("train", help="train one model and write metrics and a checkpoint")
    train_parser.add_argument("--method", choices=METHODS, default=TrainConfig.method)
    train_parser.add_argument("--density", type=_density, default=TrainConfig.density,
                              help="fraction of weights kept, in (0, 1]")
    train_parser.add_argument("--prune", choices=PRUNE, help="DST pruning criterion (default: the method's)")
    train_parser.add_argument("--grow", choices=GROW, help="DST growth criterion (default: the method's)")
    train_parser.add_argument("--schedule", choices=SCHEDULES, help="DST drop-fraction schedule (default: the "
                              "method's: cosine for rigl and dst, constant for set and mest)")
    train_parser.add_argument("--drop-fraction", type=float,
                              help="DST initial fraction of active weights moved per update (default: the schedule's)")
    train_parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    _add_run_options(train_parser, TrainConfig())
    train_parser.add_argument("--out", default="runs/train", help="directory for metrics and the checkpoint")
    train_parser.add_argument("--resume", metavar="CKPT", help="continue the run saved in this checkpoint")
    train_parser.add_argument("--stop-after", type=_positive, metavar="EPOCH",
                              help="stop after this epoch (resume later with --resume)")
    train_parser.add_argument("--quiet", action="store_true", help="no progress bar")

    compare_defaults = TrainConfig(epochs=compare_module.DEFAULT_EPOCHS)
    compare_parser = commands.add_parser("compare", help="train a grid of methods, criteria and densities")
    compare_parser.add_argument("--methods", type=_choices(METHODS, "method"),
                                default=list(compare_module.DEFAULT_METHODS))
    compare_parser.add_argument("--criteria", type=_choices(tuple(PRUNE), "criterion"),
                                default=list(compare_module.DEFAULT_CRITERIA),
                                help=f"pruning criteria, one line each when --methods has "
                                     f"{compare_module.CRITERION_METHOD}")
    compare_parser.add_argument("--grow", choices=GROW, default=compare_module.DEFAULT_GROW,
                                help="growth criterion of the criteria lines")
    compare_parser.add_argument("--densities", type=_densities, default=list(compare_module.DEFAULT_DENSITIES))
    compare_parser.add_argument("--seeds", type=_positive, default=compare_module.DEFAULT_SEEDS,
                                help="seeds 0..N-1 per point")
    _add_run_options(compare_parser, compare_defaults)
    compare_parser.add_argument("--out", default="runs/compare", help="directory for the table, CSV and plot")
    compare_parser.add_argument("--quiet", action="store_true", help="no progress bar")

    commands.add_parser("bench", help="run the kernel benchmark report on the GPU if there is one, else the CPU "
                                      "(`sparsekern bench --help` lists its options)")
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["compare", *argv]
    if argv[0] == "bench":  # its arguments belong to the report's own parser
        sys.exit(_bench(argv[1:]))
    args = parser.parse_args(argv)
    try:
        check_dataset(args.dataset)
        torch.set_num_threads(args.threads)
        if args.command == "train":
            config = _config(args, method=args.method, density=args.density, seed=args.seed, prune=args.prune,
                             grow=args.grow, schedule=args.schedule, drop_fraction=args.drop_fraction)
            if args.resume is not None:
                _check_resume(args.resume, config)
        else:
            config = _config(args)
            lines = compare_module.grid_lines(args.methods, args.criteria, args.grow)
            for line in lines:  # each line's settings are checked before the first run starts
                for density in args.densities:
                    compare_module.line_config(config, line, density, seed=0)
    except ValueError as error:
        parser.error(str(error))
    if args.command == "train":
        _train(config, args)
    else:
        _compare(lines, config, args)


def _check_resume(path: str, config: TrainConfig) -> None:
    if not os.path.isfile(path):
        raise ValueError(f"resume checkpoint {path!r} does not exist")
    saved = checkpoint.load(path)["config"]
    changed = [f"{name} {saved.get(name)!r} -> {value!r}" for name, value in asdict(config).items()
               if saved.get(name) != value]
    if changed:
        raise ValueError(f"resume checkpoint {path!r} was written with other arguments ({', '.join(changed)}); "
                         f"resume with the arguments of the interrupted run")


def _bench(bench_args: list[str]) -> int:
    """The benchmark report on the CUDA device when there is one, else on the CPU (unless --device is given)."""

    from ..bench import report

    if torch.cuda.is_available() and not any(arg.startswith("--device") for arg in bench_args):
        bench_args = ["--device", "cuda", *bench_args]
    return report.main(bench_args, prog="sparsekern bench")


def _config(args, **run) -> TrainConfig:
    return TrainConfig(distribution=args.distribution, model=args.model, dataset=args.dataset, epochs=args.epochs,
                       device=args.device, batch_size=args.batch_size, lr=args.lr, scope=args.scope,
                       update_every=args.update_every, cycles=args.cycles, particles=args.particles, **run)


def _train(config: TrainConfig, args) -> None:
    result = train(config, out_dir=args.out, resume=args.resume, stop_after=args.stop_after,
                   progress=not args.quiet)
    final = result.final
    done = "finished" if final["epoch"] == total_epochs(config) else f"stopped after epoch {final['epoch']}"
    print(f"{config.method} {done}: test accuracy {100 * final['test_accuracy']:.2f}%, test loss "
          f"{final['test_loss']:.4f}, density {final['density']:.4f}, gradient flow {final['gradient_flow']:.4g}; "
          f"metrics and checkpoint in {args.out}")


def _compare(lines, base: TrainConfig, args) -> None:
    started = time.perf_counter()
    rows = compare_module.run_compare(lines, args.densities, args.seeds, base, args.out, progress=not args.quiet)
    print(compare_module.markdown_table(rows, args.densities), end="")
    print(f"{len(lines)} lines x {len(args.densities)} densities x {args.seeds} seeds in "
          f"{time.perf_counter() - started:.1f} s; table, CSV and plot in {args.out}")

