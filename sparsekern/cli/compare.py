"""`sparsekern compare`: a grid of methods x pruning criteria x densities x seeds, summarised as a Markdown table,
a CSV (mean and sample standard deviation over seeds) and a plot of accuracy against density with error bars,
one line per method or criterion, in the manner of the figures of "Fantastic Weights" (Nowak et al. 2023).

Every table says what it ran: the init (one for the whole grid, dense baseline included), each line's mask
schedule and the epochs it trained in all (IMP and SWAMP train several segments). Each run is filed under the
density it ended at: its target, unless it ended more than FILING_TOLERANCE away from it (then a column of its
own). Each finished run is written as it completes (`sparsekern.cli.runs`), so a rerun of the same comparison into
the same folder trains only what is missing.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, replace

from .data import Dataset, load_dataset
from .output import DENSITY_LABEL, counted, csv_text, density_axis, flops_cell, save_figure, write_text
from .progress import execute_shown
from .recipes import CRITERION_PARAMETERS, TICKET_METHODS, criteria_of, start_density, ticket_scope_of
from .runs import RUNS_FOLDER, Job, RunStore, key, record_files, unique, warnings_cell
from .training import COST_KEYS, TrainConfig, cost_means

DEFAULT_METHODS = ("dense", "static", "set", "rigl", "dst")
DEFAULT_CRITERIA = ("magnitude", "snip", "random")
DEFAULT_GROW = "random"
DEFAULT_SCHEDULE = "cosine"
DEFAULT_DENSITIES = (0.2, 0.05, 0.02, 0.01)
DEFAULT_SEEDS = 3
DEFAULT_EPOCHS = 20
CRITERION_METHOD = "dst"  # the method whose lines the criteria axis makes; presets keep their own criteria
# A run that ends within this relative distance of its target density is filed under the target: exact per-layer
# counts round d_l·N_l, so the overall density of a small model misses the target by a fraction of a percent.
FILING_TOLERANCE = 0.01
# What `run_compare` writes into its out_dir once the runs are done (their records go to RUNS_FOLDER as each finishes).
RESULT_FILES = ("runs.csv", "results.csv", "results.md", "accuracy_vs_density.png", "grid.json")
RUN_FIELDS = ("label", "method", "prune", "grow", "schedule", "init", "density", "final_density", "seed",
              "epochs_trained", "test_accuracy", "gradient_flow", "gradient_flow_mean", *COST_KEYS, "seconds", "key",
              "warnings")
SUMMARY_FIELDS = ("label", "method", "prune", "grow", "schedule", "init", "epochs", "density", "target_density",
                  "final_density_mean", "accuracy_mean", "accuracy_std", "seeds", "gradient_flow_final_mean",
                  "gradient_flow_training_mean", "gradient_flow_training_std", *(f"{name}_mean" for name in COST_KEYS))


@dataclass(frozen=True)
class Comparison:
    """What `run_compare` did: the summary `rows` of results.csv, and of its `runs` (each run once) how many it
    `trained` (the others were already in its folder)."""

    rows: list[dict]
    runs: int
    trained: int


@dataclass(frozen=True)
class Line:
    """One line of the plot and one row of the table."""

    label: str
    method: str
    prune: str | None = None
    grow: str | None = None
    schedule: str | None = None


def grid_lines(methods: list[str], criteria: list[str], grow: str, schedule: str | None = None) -> list[Line]:
    """One line per method, except that the criterion method gives one line per pruning criterion with `grow`
    and `schedule` (None: DST's default, cosine)."""
    lines = []
    for method in methods:
        if method == CRITERION_METHOD:
            lines += [Line(f"{criterion} (+{grow})", method, criterion, grow, schedule) for criterion in criteria]
        else:
            lines.append(Line(method, method))
    return lines


def line_config(base: TrainConfig, line: Line, density: float, seed: int) -> TrainConfig:
    """The run of `line` at `density` (dense: 1) and `seed`; ValueError if the line cannot run so. The base's
    end_fraction, swap_rounding and block apply to DST lines only, mest_gamma, sensitivity_offset and snip_shift to
    those whose pruning criterion reads them, ticket_scope to IMP and SWAMP lines (the other lines keep their run
    keys)."""
    dst = line.method in ("set", "rigl", "mest", CRITERION_METHOD)
    config = replace(base, method=line.method, prune=line.prune, grow=line.grow, schedule=line.schedule, seed=seed,
                     density=1.0 if line.method == "dense" else density,
                     ticket_scope=base.ticket_scope if line.method in TICKET_METHODS else None,
                     end_fraction=base.end_fraction if dst else None,
                     swap_rounding=base.swap_rounding if dst else None, block=base.block if dst else None,
                     **{name: None for name in CRITERION_PARAMETERS})
    if not dst:
        return config
    return replace(config, **{name: getattr(base, name) for name, readers in CRITERION_PARAMETERS.items()
                              if criteria_of(config)[0] in readers})


def grid(lines: list[Line], densities: list[float], seeds: int, base: TrainConfig) -> list[tuple[Line, TrainConfig]]:
    """Every run of the comparison: each line at each density (dense once) for seeds 0..seeds-1."""
    return [(line, line_config(base, line, density, seed)) for line in lines
            for density in ([1.0] if line.method == "dense" else densities) for seed in range(seeds)]


def output_files(lines: list[Line], densities: list[float], seeds: int, base: TrainConfig) -> list[str]:
    """Every file `run_compare` of these arguments may write, relative to its out_dir."""
    return [*RESULT_FILES, *record_files([Job(config) for _, config in grid(lines, densities, seeds, base)])]


def run_compare(lines: list[Line], densities: list[float], seeds: int, base: TrainConfig, out_dir: str,
                progress: bool = True, dataset: Dataset | None = None, fresh: bool = False,
                workers: int = 1) -> Comparison:
    """Trains the grid on `workers` processes, keeping each finished run in `out_dir`/runs (and reusing those
    already there unless `fresh`), then writes runs.csv, results.csv, results.md, accuracy_vs_density.png and
    grid.json to `out_dir`."""
    planned = grid(lines, densities, seeds, base)
    dataset = dataset if dataset is not None else load_dataset(base.dataset)
    store = RunStore(os.path.join(out_dir, RUNS_FOLDER), fresh)
    jobs = [Job(config) for _, config in planned]
    labels = {key(config): line.label for line, config in planned}   # the criteria lines share their method
    started = time.perf_counter()
    records, trained = execute_shown(jobs, store, dataset, workers, "compare",
                                     lambda job: f"{labels[key(job.config)]} at density {job.config.density:g}, "
                                                 f"seed {job.config.seed}", progress)
    runs = [run_row(line, config, records[key(config)]) for line, config in planned]
    rows = summarise(lines, runs)
    write_text(os.path.join(out_dir, "runs.csv"), csv_text(list(RUN_FIELDS), runs))
    write_text(os.path.join(out_dir, "results.csv"), csv_text(list(SUMMARY_FIELDS), rows))
    write_text(os.path.join(out_dir, "results.md"), markdown_table(rows, base, seeds))
    plot(rows, os.path.join(out_dir, "accuracy_vs_density.png"), base)
    write_text(os.path.join(out_dir, "grid.json"), json.dumps(
        {"base": asdict(base), "lines": [asdict(line) for line in lines], "densities": list(densities),
         "seeds": seeds, "workers": workers, "seconds": time.perf_counter() - started}, indent=2))
    return Comparison(rows, len(unique(jobs)), trained)


def run_row(line: Line, config: TrainConfig, record: dict) -> dict:
    """One row of runs.csv: the run's line and config, what it measured, and what its training warned."""
    prune, grow = criteria_of(config)
    return {"label": line.label, "method": config.method, "prune": prune, "grow": grow, "init": config.init,
            "density": config.density, "seed": config.seed,
            **{name: record[name] for name in ("schedule", "final_density", "epochs_trained", "test_accuracy",
                                               "gradient_flow", "gradient_flow_mean", "seconds", "key")},
            **{name: record.get(name) for name in COST_KEYS},   # None (an empty cell) in a record stored before them
            "warnings": warnings_cell(record)}


def filed_density(target: float, final: float) -> float:
    """The density a run is reported under: its target, or where it ended if that is more than FILING_TOLERANCE
    (relative) away, rounded to 3 significant digits."""
    if abs(final - target) <= FILING_TOLERANCE * target:
        return target
    return float(f"{final:.3g}")


def summarise(lines: list[Line], runs: list[dict]) -> list[dict]:
    """Per line and filed density: mean and sample standard deviation of test accuracy (None for one seed, which
    measures no spread: an empty CSV cell), the mean final density, and gradient flow (final, and the mean over
    training's epochs), averaged over seeds, with the sample standard deviation of the latter (None for one
    seed), and the costs averaged over seeds (`cost_means`: None where a run's record has none)."""
    rows = []
    for line in lines:
        mine = [run for run in runs if run["label"] == line.label]
        groups: dict[float, list[dict]] = {}
        for run in mine:
            groups.setdefault(filed_density(run["density"], run["final_density"]), []).append(run)
        for density in sorted(groups, reverse=True):
            at = groups[density]
            accuracies = [run["test_accuracy"] for run in at]
            flows = [run["gradient_flow_mean"] for run in at]
            rows.append({"label": line.label, "method": line.method, "prune": at[0]["prune"],
                         "grow": at[0]["grow"], "schedule": at[0]["schedule"], "init": at[0]["init"],
                         "epochs": at[0]["epochs_trained"], "density": density, "target_density": at[0]["density"],
                         "final_density_mean": statistics.fmean(run["final_density"] for run in at),
                         "accuracy_mean": statistics.fmean(accuracies),
                         "accuracy_std": statistics.stdev(accuracies) if len(accuracies) > 1 else None,
                         "seeds": len(accuracies),
                         "gradient_flow_final_mean": statistics.fmean(run["gradient_flow"] for run in at),
                         "gradient_flow_training_mean": statistics.fmean(flows),
                         "gradient_flow_training_std": statistics.stdev(flows) if len(flows) > 1 else None,
                         **cost_means(at)})
    return rows


def caption(base: TrainConfig, seeds: int, methods) -> str:
    """What every line of a comparison of `methods` shares."""
    dense_too = " (dense baseline too)" if "dense" in methods and len(methods) > 1 else ""
    return (f"{base.model} (width {base.width}) on {base.dataset}, {layer_densities(base, methods)}"
            f"init {base.init}{dense_too}, SGD lr {base.lr:g} cosine, batch {base.batch_size}, "
            f"{counted(seeds, 'seed')}")


def layer_densities(base: TrainConfig, methods) -> str:
    """How the lines of `methods` spread their density over the layers, "" for dense alone: --distribution's
    layer densities for those that start sparse; those that prune from dense rank all layers together, or, IMP
    and SWAMP under --scope layer, each layer's weights apart."""
    spread = [method for method in methods if start_density(method, 0.5) < 1]
    pruned = [method for method in methods if method != "dense" and method not in spread]
    per_layer = [method for method in pruned if method in TICKET_METHODS and ticket_scope_of(base) == "layer"]
    together = [method for method in pruned if method not in per_layer]
    ranked = "; ".join(f"{', '.join(names)} pruned {how}" for names, how in
                       ((together, "over all layers together"), (per_layer, "per layer")) if names)
    if not spread:
        return f"{ranked}, " if pruned else ""
    return f"{base.distribution} layer densities{f' ({ranked})' if pruned else ''}, "


def best_rows(rows: list[dict]) -> list[dict]:
    """The sparse rows with the highest mean accuracy at their density, where two sparse lines or more ran there
    (all of them on a tie): the cells a table marks as the best."""
    best = []
    for density in {row["density"] for row in rows if row["method"] != "dense"}:
        at = [row for row in rows if row["method"] != "dense" and row["density"] == density]
        top = max(row["accuracy_mean"] for row in at)
        best += [row for row in at if row["accuracy_mean"] == top] if len(at) > 1 else []
    return best


def markdown_table(rows: list[dict], base: TrainConfig, seeds: int) -> str:
    """A caption, then test accuracy in percent, mean ± std over seeds (the value alone for one seed): one row per
    line with its mask schedule and total epochs, one column per density (dense: the same value in every column),
    the best sparse line's cell of each density in bold (`best_rows`); then the same grid of gradient flow averaged
    over training, and of inference and training FLOPs as fractions of the dense model's, "–" where a run's record
    has none."""
    columns = sorted({row["density"] for row in rows if row["method"] != "dense"}, reverse=True) or [1.0]
    header = ("| line | schedule | epochs | " + " | ".join(f"density {density:g}" for density in columns) + " |\n"
              + "| --- | --- | --- |" + " --- |" * len(columns) + "\n")

    def body(cell) -> str:
        text = ""
        for label in dict.fromkeys(row["label"] for row in rows):
            mine = {row["density"]: row for row in rows if row["label"] == label}
            first = next(iter(mine.values()))
            cells = [first if first["method"] == "dense" else mine.get(density) for density in columns]
            text += (f"| {label} | {first['schedule'] or '–'} | {first['epochs']} | "
                     + " | ".join("–" if row is None else cell(row) for row in cells) + " |\n")
        return text

    def spread(mean: float, std: float | None, digits: str, std_digits: str) -> str:
        return f"{mean:{digits}}" + ("" if std is None else f" ± {std:{std_digits}}")

    best = [id(row) for row in best_rows(rows)]

    def accuracy_cell(row) -> str:
        text = spread(100 * row["accuracy_mean"], None if row["accuracy_std"] is None else 100 * row["accuracy_std"],
                      ".1f", ".1f")
        return f"**{text}**" if id(row) in best else text

    accuracy = body(accuracy_cell)
    flow = body(lambda row: spread(row["gradient_flow_training_mean"], row["gradient_flow_training_std"], ".3g",
                                    ".2g"))
    costs = body(flops_cell)
    over_seeds = ", mean ± sd over seeds" if seeds > 1 else ""
    marked = " In bold: the best sparse line at each density (highest mean)." if best else ""
    methods = list(dict.fromkeys(row["method"] for row in rows))
    named = (" A line \"c (+g)\" is DST pruning by criterion c (--criteria) and growing by g (--grow)."
             if "dst" in methods else "")
    return (f"Test accuracy (%){over_seeds}. {caption(base, seeds, methods)}.{marked}{named}\n\n"
            f"{header}{accuracy}\n"
            f"Gradient flow ‖g⊙m‖₂ on a fixed batch, each run's mean over the epochs of training{over_seeds}.\n\n"
            f"{header}{flow}\n"
            f"FLOPs as a fraction of the dense model's, inference / training"
            f"{', mean over seeds' if seeds > 1 else ''}: "
            f"inference, the final model's forward pass; training, every step's forward and backward as RigL's "
            f"paper counts them (a dense weight gradient where the method computed one), over a dense run of "
            f"{counted(base.epochs, 'epoch')}.\n\n{header}{costs}")


def plot(rows: list[dict], path: str, base: TrainConfig) -> None:
    """Accuracy (%) against density on a log axis, sparser to the right; error bars are ± one std over seeds (none,
    and a null std in the stored series, for one seed); the dense line is dashed across; lines are nudged sideways
    a little so their error bars do not hide each other; a line that trained more epochs than --epochs says how
    many. The plotted series are stored in the PNG's "Description" text as JSON."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(6.4, 4.4), dpi=120)
    series = {}
    sparse_densities = sorted({row["density"] for row in rows if row["method"] != "dense"})
    labels = list(dict.fromkeys(row["label"] for row in rows))
    for index, label in enumerate(labels):
        mine = [row for row in rows if row["label"] == label]
        means = [100 * row["accuracy_mean"] for row in mine]
        stds = [None if row["accuracy_std"] is None else 100 * row["accuracy_std"] for row in mine]
        legend = label if mine[0]["epochs"] == base.epochs else f"{label} ({mine[0]['epochs']} epochs)"
        if mine[0]["method"] == "dense":
            axes.axhline(means[0], color="black", linestyle="--", linewidth=1, label=legend)
            if stds[0] is not None:
                axes.axhspan(means[0] - stds[0], means[0] + stds[0], color="black", alpha=0.08)
            series[label] = {"density": [1.0], "mean": means, "std": stds}
            continue
        xs = [row["density"] for row in mine]
        dodge = 1 + 0.025 * (index - (len(labels) - 1) / 2)  # side by side, so error bars stay readable
        axes.errorbar([x * dodge for x in xs], means, yerr=[math.nan if sd is None else sd for sd in stds],
                      marker="o", markersize=4, capsize=3, linewidth=1.5, label=legend)
        series[label] = {"density": xs, "mean": means, "std": stds}
    if sparse_densities:
        density_axis(axes, sparse_densities)
    else:
        axes.set_xlabel(DENSITY_LABEL)
    axes.set_ylabel("test accuracy (%)")
    seeds = max(row["seeds"] for row in rows)
    bars = f"; mean ± sd over {seeds} seeds" if seeds > 1 else "; 1 seed"
    # The layer densities as the caption says them: --distribution only where the lines start sparse by it.
    spread = layer_densities(base, list(dict.fromkeys(row["method"] for row in rows))).removesuffix(", ")
    axes.set_title(f"{base.model} on {base.dataset}, {counted(base.epochs, 'epoch')}, init {base.init}{bars}"
                   f"{chr(10) + spread if spread else ''}", fontsize=10)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8, frameon=False)
    save_figure(figure, path, {"Description": json.dumps(series)})
