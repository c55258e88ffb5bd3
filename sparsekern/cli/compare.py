"""`sparsekern compare`: a grid of methods x pruning criteria x densities x seeds, summarised as a Markdown table,
a CSV (mean and sample standard deviation over seeds) and a plot of accuracy against density with error bars,
one line per method or criterion, in the manner of the figures of "Fantastic Weights" (Nowak et al. 2023).
"""
from __future__ import annotations

import csv
import json
import os
import statistics
import time
from dataclasses import dataclass, replace

from .data import load_dataset
from .training import TrainConfig, train

DEFAULT_METHODS = ("dense", "static", "set", "rigl", "dst")
DEFAULT_CRITERIA = ("magnitude", "mest", "snip")
DEFAULT_GROW = "random"
DEFAULT_DENSITIES = (0.5, 0.2, 0.1, 0.05)
DEFAULT_SEEDS = 3
DEFAULT_EPOCHS = 10
CRITERION_METHOD = "dst"  # the method whose lines the criteria axis makes; presets keep their own criteria
SUMMARY_FIELDS = ("label", "method", "prune", "grow", "density", "accuracy_mean", "accuracy_std", "seeds",
                  "gradient_flow_mean")


@dataclass(frozen=True)
class Line:
    """One line of the plot and one row of the table."""

    label: str
    method: str
    prune: str | None = None
    grow: str | None = None


def grid_lines(methods: list[str], criteria: list[str], grow: str) -> list[Line]:
    """One line per method, except that the criterion method gives one line per pruning criterion with `grow`."""
    lines = []
    for method in methods:
        if method == CRITERION_METHOD:
            lines += [Line(f"{criterion} (+{grow})", method, criterion, grow) for criterion in criteria]
        else:
            lines.append(Line(method, method))
    return lines


def line_config(base: TrainConfig, line: Line, density: float, seed: int) -> TrainConfig:
    """The run of `line` at `density` (dense: 1) and `seed`; ValueError if the line cannot run so."""
    return replace(base, method=line.method, prune=line.prune, grow=line.grow, seed=seed,
                   density=1.0 if line.method == "dense" else density)


def run_compare(lines: list[Line], densities: list[float], seeds: int, base: TrainConfig, out_dir: str,
                progress: bool = True) -> list[dict]:
    """Trains every line at every density (dense once) for seeds 0..seeds-1 and writes runs.csv, results.csv,
    results.md and accuracy_vs_density.png to `out_dir`. Returns the summary rows of results.csv."""
    configs = [line_config(base, line, density, seed) for line in lines
               for density in ([1.0] if line.method == "dense" else densities) for seed in range(seeds)]
    dataset = load_dataset(base.dataset)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(configs), desc="compare", unit="run", dynamic_ncols=True)
    runs = []
    started = time.perf_counter()
    for config in configs:
        result = train(config, progress=False, dataset=dataset)
        runs.append({"method": config.method, "prune": config.prune, "grow": config.grow, "density": config.density,
                     "seed": config.seed, "test_accuracy": result.final["test_accuracy"],
                     "final_density": result.final["density"], "gradient_flow": result.final["gradient_flow"]})
        if bar is not None:
            bar.update()
            bar.set_postfix(method=config.method, density=config.density, acc=f"{runs[-1]['test_accuracy']:.3f}")
    if bar is not None:
        bar.close()
    rows = summarise(lines, runs)
    os.makedirs(out_dir, exist_ok=True)
    _write_csv(os.path.join(out_dir, "runs.csv"), list(runs[0]), runs)
    _write_csv(os.path.join(out_dir, "results.csv"), list(SUMMARY_FIELDS), rows)
    table = markdown_table(rows, densities)
    with open(os.path.join(out_dir, "results.md"), "w") as file:
        file.write(table)
    plot(rows, os.path.join(out_dir, "accuracy_vs_density.png"), base)
    with open(os.path.join(out_dir, "grid.json"), "w") as file:
        json.dump({"base": base.__dict__, "lines": [line.__dict__ for line in lines], "densities": list(densities),
                   "seeds": seeds, "seconds": time.perf_counter() - started}, file, indent=2)
    return rows


def summarise(lines: list[Line], runs: list[dict]) -> list[dict]:
    """Mean and sample standard deviation (0 for one seed) of test accuracy per line and density."""
    rows = []
    for line in lines:
        mine = [run for run in runs if (run["method"], run["prune"], run["grow"]) ==
                (line.method, line.prune, line.grow)]
        for density in sorted({run["density"] for run in mine}, reverse=True):
            at = [run for run in mine if run["density"] == density]
            accuracies = [run["test_accuracy"] for run in at]
            rows.append({"label": line.label, "method": line.method, "prune": line.prune or "",
                         "grow": line.grow or "", "density": density,
                         "accuracy_mean": statistics.fmean(accuracies),
                         "accuracy_std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
                         "seeds": len(accuracies),
                         "gradient_flow_mean": statistics.fmean(run["gradient_flow"] for run in at)})
    return rows


def markdown_table(rows: list[dict], densities: list[float]) -> str:
    """Test accuracy in percent, mean ± std over seeds: one row per line, one column per density (dense: the
    same value in every column)."""
    columns = sorted(densities, reverse=True)
    header = "| method | " + " | ".join(f"density {density:g}" for density in columns) + " |\n"
    header += "| --- |" + " --- |" * len(columns) + "\n"
    body = ""
    for label in dict.fromkeys(row["label"] for row in rows):
        mine = {row["density"]: row for row in rows if row["label"] == label}
        cells = [mine.get(1.0) if set(mine) == {1.0} else mine.get(density) for density in columns]
        body += f"| {label} | " + " | ".join(_cell(row) for row in cells) + " |\n"
    return header + body


def plot(rows: list[dict], path: str, base: TrainConfig) -> None:
    """Accuracy (%) against density on a log axis, sparser to the right; error bars are ± one std over seeds; the
    dense line is dashed across; lines are nudged sideways a little so their error bars do not hide each other.
    The plotted series are stored in the PNG's "Description" text as JSON."""
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
        stds = [100 * row["accuracy_std"] for row in mine]
        if mine[0]["method"] == "dense":
            axes.axhline(means[0], color="black", linestyle="--", linewidth=1, label=label)
            axes.axhspan(means[0] - stds[0], means[0] + stds[0], color="black", alpha=0.08)
            series[label] = {"density": [1.0], "mean": means, "std": stds}
            continue
        xs = [row["density"] for row in mine]
        dodge = 1 + 0.025 * (index - (len(labels) - 1) / 2)  # side by side, so error bars stay readable
        axes.errorbar([x * dodge for x in xs], means, yerr=stds, marker="o", markersize=4, capsize=3,
                      linewidth=1.5, label=label)
        series[label] = {"density": xs, "mean": means, "std": stds}
    axes.set_xscale("log")
    if sparse_densities:
        axes.set_xticks(sparse_densities, [f"{density:g}" for density in sparse_densities])
        axes.minorticks_off()
    axes.invert_xaxis()
    axes.set_xlabel("density (fraction of weights kept)")
    axes.set_ylabel("test accuracy (%)")
    axes.set_title(f"{base.model} on {base.dataset}, {base.epochs} epochs, {base.distribution}")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8, frameon=False)
    figure.tight_layout()
    figure.savefig(path, metadata={"Description": json.dumps(series)})
    pyplot.close(figure)


def _cell(row: dict | None) -> str:
    if row is None:
        return "–"
    return f"{100 * row['accuracy_mean']:.1f} ± {100 * row['accuracy_std']:.1f}"


def _write_csv(path: str, fieldnames: list[str], rows: list[dict]) -> None:
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)
