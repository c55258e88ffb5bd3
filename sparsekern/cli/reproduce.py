"""`sparsekern reproduce`: one small experiment per claim of the seed papers, on scikit-learn's digits, written up
as report.md with a plot and a CSV per claim, each compared line's cost in FLOPs beside its accuracy.

    (a) DST beats static sparse training at high sparsity (RigL, Evci et al. 2020; SET, Mocanu et al. 2018)
    (b) pruning criteria mostly tie; at low density magnitude is best (Fantastic Weights, Nowak et al. 2023)
    (c) IMP with rewinding beats random reinitialisation of its mask (Frankle & Carbin 2019; Frankle et al. 2020)
    (d) SWAMP beats IMP-WR at the same density (Choi et al. 2024)
    (e) OptG beats magnitude pruning at equal final density (Zhang et al. 2022)
    (f) sparsity-aware init restores gradient flow at init; DST raises it during training (Evci et al. 2022)

Each claim gets a verdict from the seeds' numbers: for "A beats B", Δ = mean(A) − mean(B) and
se = √(s_A²/n_A + s_B²/n_B) (s the sample standard deviation, at least FLOOR of the metric's scale): "holds" if
Δ > 2·se, "does not hold at this scale" if Δ < −2·se, "tie" otherwise. A claim that things tie holds when they do.
The runs are those of `sparsekern train` (`TrainConfig`), kept as they finish (`sparsekern.cli.runs`), so an
interrupted reproduce goes on where it stopped and `--fresh` retrains everything after a change to the code.
"""
from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import dataclass, field, replace

from .data import Dataset, load_dataset
from .output import DENSITY_LABEL, counted, csv_text, density_axis, flops_cell, save_figure, write_text
from .progress import execute_shown
from .recipes import criteria_of
from .runs import RUNS_FOLDER, Job, RunStore, key, record_files, unique, warnings_cell
from .training import TrainConfig, cost_means, total_epochs

HOLDS, FAILS, TIE = "holds", "does not hold at this scale", "tie"
# The smallest standard error a verdict uses, as a fraction of the metric's scale (accuracy: 0.2 points), so that
# seeds that happen to agree exactly do not make a hair's difference significant.
FLOOR = 0.002
CRITERIA = ("magnitude", "set", "mest", "snip", "sensitivity", "rsensitivity", "random")
REINIT_SEED_OFFSET = 1000  # a reinitialised ticket draws other weights (and data order) than its IMP run
# (f)'s axes: the norm of the masked gradient ∂L/∂θ of the batch's mean cross-entropy L. L is in nats, the norm
# not: it is in nats per unit of weight (the label said nats).
FLOW_LABEL = "gradient flow ‖g⊙m‖₂ (nats/unit weight)"
# What the FLOPs columns of every claim's table hold: the methods a claim compares pay very different training costs
# at the same final density, which a verdict on accuracy alone hides.
FLOPS_NOTE = ("**FLOPs inf./train.**: what each line cost, as fractions of the dense model's, mean over seeds: "
              "inference, the final model's forward pass; training, every step's forward and backward as RigL's paper "
              "counts them (a dense weight gradient where the method computed one), over a dense run of the same "
              "epochs (IMP's cycles and SWAMP's particles each cost a training of their own, so theirs can exceed 1; "
              "a reinitialised ticket counts its own training, not the IMP run that found its mask); – where a run's "
              "record has none (stored before costs were counted).")


@dataclass(frozen=True)
class Plan:
    """How big each experiment is. `plan(quick)` gives the two sizes the command offers."""

    quick: bool
    base: TrainConfig
    seeds: int                       # (a), (c), (d), (f)
    grid_seeds: int                  # (b), (e)
    dst_densities: tuple[float, ...]
    criteria: tuple[str, ...]
    criteria_densities: tuple[float, ...]
    ticket_densities: tuple[float, ...]
    ramp_densities: tuple[float, ...]
    ramp_epochs: tuple[int, ...]

    @property
    def dataset(self) -> str:
        return self.base.dataset

    def config(self, **changes) -> TrainConfig:
        return replace(self.base, **changes)


def plan(quick: bool = False, device: str = "cpu") -> Plan:
    """The full experiment (about 6,000 epochs of a small MLP: minutes on 2 cores) or, with `quick`, a smoke test
    of every claim in under a minute of CPU time (too few seeds and epochs for its verdicts to mean much)."""
    if quick:
        return Plan(True, TrainConfig(epochs=3, device=device, cycles=2, particles=2), seeds=2, grid_seeds=2,
                    dst_densities=(0.02,), criteria=("magnitude", "snip", "random"), criteria_densities=(0.05,),
                    ticket_densities=(0.2,), ramp_densities=(0.05,), ramp_epochs=(3,))
    return Plan(False, TrainConfig(epochs=20, device=device, cycles=4, particles=2), seeds=5, grid_seeds=3,
                dst_densities=(0.05, 0.02, 0.01), criteria=CRITERIA, criteria_densities=(0.2, 0.05, 0.01),
                ticket_densities=(0.2, 0.05), ramp_densities=(0.05, 0.02), ramp_epochs=(10, 20, 30))


@dataclass
class Finding:
    """One row of the summary: what the paper says, what we measured, and the verdict."""

    claim: str
    paper: str
    ours: str
    verdict: str


@dataclass
class Claim:
    key: str
    title: str
    source: str
    statement: str
    setup: str
    table: str
    rows: list[dict]
    findings: list[Finding]
    figure: str


@dataclass
class Report:
    plan: Plan
    claims: list[Claim]
    runs: int
    trained: int
    seconds: float
    training_seconds: float
    workers: int
    rows: list[dict] = field(default_factory=list)

    def summary_table(self) -> str:
        text = "| claim | the paper says | ours (mean ± sd over seeds) | verdict |\n| --- | --- | --- | --- |\n"
        for claim in self.claims:
            for finding in claim.findings:
                text += f"| {finding.claim} | {finding.paper} | {finding.ours} | {finding.verdict} |\n"
        return text

    def _reused(self) -> str:
        """', the other 3 reused ...', or nothing where every run trained now: the report said "the rest reused"
        of a first run, which reused none."""
        reused = self.runs - self.trained
        return f", the other {reused} reused from earlier runs in this folder" if reused else ""

    def markdown(self) -> str:
        base = self.plan.base
        text = (f"# sparsekern reproduce{' --quick' if self.plan.quick else ''}: the seed papers' claims on "
                f"{base.dataset}\n\n"
                f"An MLP ({base.width}-{base.width}) on scikit-learn's 8x8 digits (1438 train, 359 test images), SGD "
                f"(lr {base.lr:g} cosine, momentum {base.momentum:g}, weight decay {base.weight_decay:g}, batch "
                f"{base.batch_size}), {base.distribution} layer densities, {base.epochs} epochs per run unless "
                f"stated, DST updates every {base.update_every} steps. {self.runs} runs ({self.trained} trained now"
                f"{self._reused()}) in {self.seconds:.0f} s on {self.workers} "
                f"process(es); the runs' training loops took {self.training_seconds:.0f} s of wall time, summed over "
                f"runs.\n\n"
                f"Verdicts: for \"A beats B\", Δ = mean(A) − mean(B) over seeds and se = √(s_A²/n_A + s_B²/n_B) "
                f"(at least {FLOOR:g} of the metric's scale); **holds** if Δ > 2 se, **does not hold at this "
                f"scale** if Δ < −2 se, **tie** otherwise. Small models and few seeds: a tie says the difference is "
                f"within noise here, not that the paper is wrong.\n\n"
                f"{FLOPS_NOTE}\n\n"
                f"{self.summary_table()}\n")
        sharing: dict[str, list[str]] = {}   # a table's text: the claims whose table it is ((c) and (d) share one)
        showing: dict[str, str] = {}   # a figure's file: the claim whose section shows it, the first naming it
        for claim in self.claims:
            sharing.setdefault(claim.table, []).append(claim.key)
            showing.setdefault(claim.figure, claim.key)
        for claim in self.claims:
            text += (f"## ({claim.key}) {claim.title}\n\n**Paper** ({claim.source}): {claim.statement}\n\n"
                     f"**Setup**: {claim.setup}\n\n{_shared_table(claim, sharing[claim.table])}\n"
                     + "".join(f"- {finding.claim}: {finding.ours} → **{finding.verdict}**\n"
                               for finding in claim.findings)
                     + f"\n{_figure_shown(claim, showing[claim.figure])}\n\nNumbers: `{claim.key}.csv`.\n\n")
        return text


def _shared_table(claim: Claim, keys: list[str]) -> str:
    """`claim`'s table as its section shows it: whole in the first claim of `keys`, those sharing it, which says so,
    and in the others a line pointing at that one."""
    if len(keys) == 1:
        return claim.table
    claims = " and ".join(f"({key})" for key in keys)
    if claim.key == keys[0]:
        return f"The lines of {claims}:\n\n{claim.table}"
    return f"**Table**: the lines of {claims}, under ({keys[0]}) above.\n"


def _figure_shown(claim: Claim, shown_by: str) -> str:
    """`claim`'s figure as its section shows it: the image in the section of `shown_by`, the first claim naming it,
    and in the others a line pointing at that one (c_d.png, (c)'s and (d)'s, was shown twice)."""
    if claim.key == shown_by:
        return f"![{claim.title}]({claim.figure})"
    return f"**Figure**: `{claim.figure}`, under ({shown_by}) above."


def jobs(plan: Plan) -> list[Job]:
    """Every run the report needs (duplicates are trained once)."""
    return [job for experiment in EXPERIMENTS for job in experiment.jobs(plan)]


def output_files(plan: Plan) -> list[str]:
    """Every file `run` of `plan` may write, relative to its out_dir."""
    return ["report.md", "runs.csv", *(name for experiment in EXPERIMENTS for name in experiment.FILES),
            *record_files(jobs(plan))]


def run(plan: Plan, out_dir: str, dataset: Dataset | None = None, progress: bool = True, fresh: bool = False,
        workers: int = 1) -> Report:
    """Trains what is missing, then writes report.md, one PNG and one CSV per claim, and runs.csv to `out_dir`."""
    dataset = dataset if dataset is not None else load_dataset(plan.dataset)
    store = RunStore(os.path.join(out_dir, RUNS_FOLDER), fresh)
    planned = jobs(plan)
    started = time.perf_counter()
    records, trained = execute_shown(planned, store, dataset, workers, "reproduce", describe, progress)
    seconds = time.perf_counter() - started

    def lookup(config: TrainConfig, masks_from: TrainConfig | None = None) -> dict:
        return records[key(config, masks_from)]

    claims = [claim for experiment in EXPERIMENTS for claim in experiment.analyse(plan, lookup, out_dir)]
    report = Report(plan, claims, len(unique(planned)), trained, seconds,
                    sum(record["seconds"] for record in records.values()), workers)
    for claim in claims:
        write_text(os.path.join(out_dir, f"{claim.key}.csv"), csv_text(_fields(claim.rows), claim.rows))
    configs = {job.key: job.config for job in unique(planned)}
    runs = [run_row(record, configs[name]) for name, record in records.items()]
    write_text(os.path.join(out_dir, "runs.csv"), csv_text(_fields(runs), runs))
    write_text(os.path.join(out_dir, "report.md"), report.markdown())
    return report


def describe(job: Job) -> str:
    """A run as the progress bar names it: method, init unless the plan's, density and seed, and whether it starts
    from another run's mask (a reinitialised ticket)."""
    config = job.config
    init = "" if config.init == TrainConfig.init else f", {config.init} init"
    ticket = "" if job.masks_from is None else ", on an IMP run's mask"
    return f"{config.method}{init} at density {config.density:g}, seed {config.seed}{ticket}"


def run_row(record: dict, config: TrainConfig) -> dict:
    """One row of runs.csv: what the run measured, then its config's fields, with prune and grow naming the
    criteria a DST preset uses although its config names none (as in compare's runs.csv)."""
    prune, grow = criteria_of(config)
    measured = {name: value for name, value in record.items() if name not in ("config", "history", "flow")}
    measured["warnings"] = warnings_cell(record)   # its list, as one plain-text cell
    return measured | record["config"] | {"prune": prune, "grow": grow}


# -- statistics and verdicts ---------------------------------------------------------------------------------


def stats(values: list[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (0 for one value) and count."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values)


def verdict(a: list[float], b: list[float], scale: float = 1.0) -> tuple[str, str]:
    """Whether A beats B (module docstring), and the Δ and 2 se it rests on, in the units of `scale` (1 for
    accuracy, shown in points; else the metric's own)."""
    (mean_a, sd_a, n_a), (mean_b, sd_b, n_b) = stats(a), stats(b)
    difference = mean_a - mean_b
    error = max(math.sqrt(sd_a ** 2 / n_a + sd_b ** 2 / n_b), FLOOR * scale)
    result = HOLDS if difference > 2 * error else FAILS if difference < -2 * error else TIE
    unit = 100 if scale == 1.0 else 1
    return result, f"Δ {unit * difference:+.3g}, 2 se {unit * 2 * error:.2g}"


def _cell(values: list[float], percent: bool = True) -> str:
    """mean ± sd, or the mean alone for one value, which measures no spread."""
    mean, sd, n = stats(values)
    if n == 1:
        return f"{100 * mean:.1f}" if percent else f"{mean:.3g}"
    return f"{100 * mean:.1f} ± {100 * sd:.1f}" if percent else f"{mean:.3g} ± {sd:.2g}"


def _error(values: list[float], unit: float) -> float:
    """An error bar's half-height: unit · sd, NaN (no bar) for one value."""
    return unit * stats(values)[1] if len(values) > 1 else math.nan


def _accuracies(records: list[dict]) -> list[float]:
    return [record["test_accuracy"] for record in records]


def _compare(claim: str, paper: str, name_a: str, a: list[float], name_b: str, b: list[float],
             percent: bool = True) -> Finding:
    scale = 1.0 if percent else max(abs(statistics.fmean(a)), abs(statistics.fmean(b)), 1e-12)
    result, detail = verdict(a, b, scale)
    return Finding(claim, paper, f"{name_a} {_cell(a, percent)} vs {name_b} {_cell(b, percent)} ({detail})", result)


def _listed(numbers) -> str:
    """Densities (or any numbers) as a report's text lists them: "0.05, 0.02, 0.01"."""
    return ", ".join(f"{number:g}" for number in numbers)


def _table(header: list[str], rows: list[list[str]]) -> str:
    return ("| " + " | ".join(header) + " |\n" + "|" + " --- |" * len(header) + "\n"
            + "".join("| " + " | ".join(row) + " |\n" for row in rows))


def _row(claim: str, line: str, config: TrainConfig, records: list[dict], **extra) -> dict:
    """One CSV row: a line at one density, over seeds."""
    mean, sd, n = stats(_accuracies(records))
    spread = sd if n > 1 else None   # empty in the CSV: one seed measures no spread
    return {"claim": claim, "line": line, "method": config.method, "init": config.init,
            "density": config.density, "final_density": statistics.fmean(r["final_density"] for r in records),
            "epochs_trained": total_epochs(config), "seeds": n, "accuracy_mean": mean,
            # accuracy_sd: accuracy_std's name here before it took compare's (results.csv), kept for the readers of
            # earlier CSVs (deprecated)
            "accuracy_std": spread, "accuracy_sd": spread,
            "gradient_flow_mean": statistics.fmean(r["gradient_flow_mean"] for r in records), **cost_means(records),
            **extra}


def _flops(records: list[dict]) -> str:
    """A line's FLOPs cell over its seeds' records: "inference / training" fractions of dense (FLOPS_NOTE)."""
    return flops_cell(cost_means(records))


def _flops_header(at: str | None = None) -> str:
    """The header of a FLOPs column (FLOPS_NOTE), of the runs `at` a density or a length where a row has several."""
    return "FLOPs inf./train." if at is None else f"FLOPs inf./train., {at}"


def _fields(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(name for row in rows for name in row))


def _figure(columns: int = 1, width: float = 5.2):
    """A figure of `columns` panels side by side, each `width` inches wide."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    return pyplot.subplots(1, columns, figsize=(width * columns, 3.8), dpi=110, squeeze=False)


def _errorbar_lines(axes, series: dict[str, tuple[list[float], list[list[float]]]], percent: bool = True) -> None:
    """One line per label: x values and, per x, the seeds' values (accuracies plotted in percent), ± one sd; lines
    are nudged sideways a little so their error bars do not hide each other."""
    unit = 100 if percent else 1
    for index, (label, (xs, values)) in enumerate(series.items()):
        dodge = 1 + 0.02 * (index - (len(series) - 1) / 2)
        axes.errorbar([x * dodge for x in xs], [unit * stats(v)[0] for v in values],
                      yerr=[_error(v, unit) for v in values], marker="o", markersize=4, capsize=3, label=label)


def _label(axes, title: str, ylabel: str = "test accuracy (%)", xlabel: str | None = None, legend: int = 8,
           beside: bool = False) -> None:
    """Title, axis labels, grid, and the legend in `legend`-point type: inside the axes, or `beside` them (where
    bars or markers fill the axes, so that it hides none)."""
    axes.set_title(title, fontsize=10)
    axes.set_ylabel(ylabel)
    if xlabel is not None:
        axes.set_xlabel(xlabel)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=legend, frameon=False, **({"loc": "upper left", "bbox_to_anchor": (1, 1)} if beside else {}))


def _bars(axes, groups: list[str], series: dict[str, list[list[float]]], xlabel: str) -> None:
    """Accuracy bars (percent, ± one sd), one group per x tick, one bar per series in each."""
    width = 0.8 / len(series)
    for index, (label, values) in enumerate(series.items()):
        positions = [g + (index - (len(series) - 1) / 2) * width for g in range(len(groups))]
        axes.bar(positions, [100 * stats(v)[0] for v in values], width, yerr=[_error(v, 100) for v in values],
                 capsize=3, label=label)
    axes.set_xticks(range(len(groups)), groups)
    axes.set_xlabel(xlabel)


# -- the experiments -----------------------------------------------------------------------------------------


class DSTvsStatic:
    """(a) static, SET and RigL against the dense baseline."""

    FILES = ("a.csv", "a.png")   # its claims' CSVs and its figure, in the out_dir

    METHODS = ("static", "set", "rigl")

    @staticmethod
    def configs(plan: Plan, method: str, density: float) -> list[TrainConfig]:
        density = 1.0 if method == "dense" else density
        return [plan.config(method=method, density=density, seed=seed) for seed in range(plan.seeds)]

    @classmethod
    def jobs(cls, plan: Plan) -> list[Job]:
        configs = cls.configs(plan, "dense", 1.0) + [config for method in cls.METHODS for density in
                                                       plan.dst_densities for config in cls.configs(plan, method, density)]
        return [Job(config) for config in configs]

    @classmethod
    def analyse(cls, plan: Plan, lookup, out_dir: str) -> list[Claim]:
        def results(method, density):
            return [lookup(config) for config in cls.configs(plan, method, density)]

        dense = results("dense", 1.0)
        rows = [_row("a", "dense", cls.configs(plan, "dense", 1.0)[0], dense)]
        table_rows = [["dense", *[_cell(_accuracies(dense))] * len(plan.dst_densities),
                       *[_flops(dense)] * len(plan.dst_densities)]]
        for method in cls.METHODS:
            cells, costs = [], []
            for density in plan.dst_densities:
                records = results(method, density)
                rows.append(_row("a", method, cls.configs(plan, method, density)[0], records,
                                 schedule=records[0]["schedule"]))
                cells.append(_cell(_accuracies(records)))
                costs.append(_flops(records))
            table_rows.append([method, *cells, *costs])
        sparsest = min(plan.dst_densities)
        static = _accuracies(results("static", sparsest))
        findings = [
            _compare(f"(a) RigL vs static, d = {sparsest:g}", "DST beats static at high sparsity", "RigL",
                     _accuracies(results("rigl", sparsest)), "static", static),
            _compare(f"(a) SET vs static, d = {sparsest:g}", "DST beats static at high sparsity", "SET",
                     _accuracies(results("set", sparsest)), "static", static),
        ]
        figure, axes = _figure()
        axes = axes[0][0]
        axes.axhline(100 * stats(_accuracies(dense))[0], color="black", linestyle="--", linewidth=1, label="dense")
        _errorbar_lines(axes, {method: (list(plan.dst_densities), [_accuracies(results(method, d))
                                                                   for d in plan.dst_densities])
                               for method in cls.METHODS})
        density_axis(axes, plan.dst_densities)
        _label(axes, "(a) DST vs static sparse training")
        save_figure(figure, os.path.join(out_dir, "a.png"))
        schedules = "; ".join(f"{m}: {results(m, sparsest)[0]['schedule']}" for m in ("set", "rigl"))
        return [Claim("a", "DST vs static sparse training at high sparsity",
                     "RigL, Evci et al. 2020; SET, Mocanu et al. 2018",
                     "dynamic sparse training, which moves connections during training, reaches higher accuracy "
                     "than training a fixed random mask of the same density, the more so the sparser the network.",
                     f"static, SET and RigL at densities {_listed(plan.dst_densities)}, "
                     f"{counted(plan.seeds, 'seed')}, init {plan.base.init}; {schedules}.",
                     _table(["line", *[f"d = {d:g}" for d in plan.dst_densities],
                             *[_flops_header(f"d = {d:g}") for d in plan.dst_densities]], table_rows), rows, findings,
                     "a.png")]


def criteria_tying_the_best(accuracy: dict, criteria, densities) -> tuple[int, int]:
    """(ties, comparisons): at each density, how many criteria other than the best (by mean accuracy) are
    within two standard errors of it. The best is left out: it ties with itself, and counting it made
    half of the comparisons look like "most"."""
    tied = total = 0
    for density in densities:
        best = max(criteria, key=lambda c: stats(accuracy[c, density])[0])
        for criterion in criteria:
            if criterion != best:
                total += 1
                tied += verdict(accuracy[best, density], accuracy[criterion, density])[0] == TIE
    return tied, total


class CriteriaGrid:
    """(b) the pruning criteria of Fantastic Weights, with random growth and its annealed schedule."""

    FILES = ("b.csv", "b.png")   # its claims' CSVs and its figure, in the out_dir

    @staticmethod
    def configs(plan: Plan, criterion: str, density: float) -> list[TrainConfig]:
        return [plan.config(method="dst", prune=criterion, grow="random", schedule="annealed", density=density,
                            seed=seed) for seed in range(plan.grid_seeds)]

    @classmethod
    def jobs(cls, plan: Plan) -> list[Job]:
        return [Job(config) for criterion in plan.criteria for density in plan.criteria_densities
                for config in cls.configs(plan, criterion, density)]

    @classmethod
    def analyse(cls, plan: Plan, lookup, out_dir: str) -> list[Claim]:
        records = {(c, d): [lookup(config) for config in cls.configs(plan, c, d)]
                   for c in plan.criteria for d in plan.criteria_densities}
        accuracy = {at: _accuracies(of) for at, of in records.items()}
        rows = [_row("b", c, cls.configs(plan, c, d)[0], records[c, d])
                for c in plan.criteria for d in plan.criteria_densities]
        table_rows = [[c, *[_cell(accuracy[c, d]) for d in plan.criteria_densities],
                       *[_flops(records[c, d]) for d in plan.criteria_densities]] for c in plan.criteria]
        sparsest = min(plan.criteria_densities)
        denser = [d for d in plan.criteria_densities if d != sparsest] or [sparsest]
        tied, total = criteria_tying_the_best(accuracy, plan.criteria, denser)
        findings = [Finding(f"(b) criteria tie, d = {_listed(denser)}",
                            "most pruning criteria perform alike",
                            f"{tied} of {total} other criteria (per density) within 2 se of the best",
                            HOLDS if tied > total / 2 else FAILS)]
        others = [c for c in plan.criteria if c != "magnitude"]
        if "magnitude" in plan.criteria and others:
            rival = max(others, key=lambda c: stats(accuracy[c, sparsest])[0])
            findings.append(_compare(f"(b) magnitude vs best other ({rival}), d = {sparsest:g}",
                                     "at low density plain magnitude is best", "magnitude",
                                     accuracy["magnitude", sparsest], rival, accuracy[rival, sparsest]))
        figure, axes = _figure()
        axes = axes[0][0]
        _errorbar_lines(axes, {c: (list(plan.criteria_densities), [accuracy[c, d] for d in plan.criteria_densities])
                               for c in plan.criteria})
        density_axis(axes, plan.criteria_densities)
        _label(axes, "(b) pruning criteria, random growth, annealed schedule", legend=7)
        save_figure(figure, os.path.join(out_dir, "b.png"))
        schedule = lookup(cls.configs(plan, plan.criteria[0], sparsest)[0])["schedule"]
        return [Claim("b", "The Fantastic Weights pruning criteria", "Nowak et al. 2023",
                     "in dynamic sparse training the choice of pruning criterion matters little: most criteria "
                     "perform alike, and at low density plain magnitude pruning is best.",
                     f"DST with each pruning criterion and random growth, the paper's schedule ({schedule}), "
                     f"densities {_listed(plan.criteria_densities)}, {counted(plan.grid_seeds, 'seed')}.",
                     _table(["criterion", *[f"d = {d:g}" for d in plan.criteria_densities],
                             *[_flops_header(f"d = {d:g}") for d in plan.criteria_densities]], table_rows), rows,
                     findings, "b.png")]


class Tickets:
    """(c) IMP with weight rewinding against its mask reinitialised, and (d) SWAMP against IMP."""

    FILES = ("c.csv", "d.csv", "c_d.png")   # its claims' CSVs and its figure, in the out_dir

    @staticmethod
    def imp(plan: Plan, density: float) -> list[TrainConfig]:
        # torch's default init, as the lottery-ticket papers use; the reinitialised tickets draw from it again.
        return [plan.config(method="imp", init="dense", density=density, seed=s) for s in range(plan.seeds)]

    @staticmethod
    def swamp(plan: Plan, density: float) -> list[TrainConfig]:
        return [plan.config(method="swamp", init="dense", density=density, seed=s) for s in range(plan.seeds)]

    @staticmethod
    def reinit(plan: Plan, density: float, init: str) -> list[tuple[TrainConfig, TrainConfig]]:
        """(reinitialised run, the IMP run whose final mask it trains) per seed."""
        return [(plan.config(method="static", init=init, density=density, seed=REINIT_SEED_OFFSET + ticket.seed),
                 ticket) for ticket in Tickets.imp(plan, density)]

    @classmethod
    def jobs(cls, plan: Plan) -> list[Job]:
        jobs = []
        for density in plan.ticket_densities:
            jobs += [Job(config) for config in cls.imp(plan, density) + cls.swamp(plan, density)]
            jobs += [Job(config, ticket) for init in ("dense", "sparse") for config, ticket in
                     cls.reinit(plan, density, init)]
        return jobs

    @classmethod
    def _results(cls, plan: Plan, lookup, density: float) -> dict[str, tuple[TrainConfig, list[dict]]]:
        return {"IMP-WR": (cls.imp(plan, density)[0], [lookup(c) for c in cls.imp(plan, density)]),
                "reinit (same init)": (cls.reinit(plan, density, "dense")[0][0],
                                       [lookup(c, t) for c, t in cls.reinit(plan, density, "dense")]),
                "reinit (sparsity-aware init)": (cls.reinit(plan, density, "sparse")[0][0],
                                                 [lookup(c, t) for c, t in cls.reinit(plan, density, "sparse")]),
                "SWAMP": (cls.swamp(plan, density)[0], [lookup(c) for c in cls.swamp(plan, density)])}

    @classmethod
    def analyse(cls, plan: Plan, lookup, out_dir: str) -> list[Claim]:
        results = {density: cls._results(plan, lookup, density) for density in plan.ticket_densities}
        rows, table_rows = [], []
        for line in results[plan.ticket_densities[0]]:
            config = results[plan.ticket_densities[0]][line][0]
            table_rows.append([line, str(total_epochs(config)),
                               *[_cell(_accuracies(results[d][line][1])) for d in plan.ticket_densities],
                               *[_flops(results[d][line][1]) for d in plan.ticket_densities]])
            rows += [_row("c/d", line, results[d][line][0], results[d][line][1]) for d in plan.ticket_densities]
        table = _table(["line", "epochs trained", *[f"d = {d:g}" for d in plan.ticket_densities],
                        *[_flops_header(f"d = {d:g}") for d in plan.ticket_densities]], table_rows)
        sparsest = min(plan.ticket_densities)
        at = {line: _accuracies(records) for line, (_, records) in results[sparsest].items()}
        tickets = [
            _compare(f"(c) IMP-WR vs its mask reinitialised, d = {sparsest:g}",
                     "a rewound ticket beats its mask randomly reinitialised", "IMP-WR", at["IMP-WR"],
                     "reinit", at["reinit (same init)"]),
            _compare(f"(c) IMP-WR vs its mask with sparsity-aware init, d = {sparsest:g}",
                     "— (a stronger baseline than the paper's)", "IMP-WR", at["IMP-WR"], "reinit",
                     at["reinit (sparsity-aware init)"]),
        ]
        swamp = [_compare(f"(d) SWAMP vs IMP-WR, d = {sparsest:g}", "SWAMP beats IMP-WR at the same sparsity",
                          "SWAMP", at["SWAMP"], "IMP-WR", at["IMP-WR"])]
        figure, axes = _figure(width=7)   # the legend beside the bars
        axes = axes[0][0]
        _bars(axes, [f"{d:g}" for d in plan.ticket_densities],
              {line: [_accuracies(results[d][line][1]) for d in plan.ticket_densities] for line in at},
              DENSITY_LABEL)
        axes.set_ylim(0, 100)   # bars from 0, so that their heights compare (a reinit at 34% drew a tenth of 93%'s)
        _label(axes, "(c, d) lottery tickets: IMP-WR, reinitialised masks, SWAMP", legend=7, beside=True)
        save_figure(figure, os.path.join(out_dir, "c_d.png"))
        imp_config = cls.imp(plan, sparsest)[0]
        setup = (f"IMP with weight rewinding to 10% of a cycle, {imp_config.cycles} cycles of {plan.base.epochs} "
                 f"epochs pruning globally by magnitude to densities "
                 f"{_listed(plan.ticket_densities)}, torch's default init; SWAMP the same with "
                 f"{imp_config.particles} SWA particles per cycle; each IMP run's final mask trained {plan.base.epochs} "
                 f"epochs from new weights (other seeds) drawn from the same init, and from the sparsity-aware init; "
                 f"{counted(plan.seeds, 'seed')}.")
        return [Claim("c", "IMP with rewinding vs random reinitialisation", "Frankle & Carbin 2019; Frankle et al. 2020",
                      "a mask found by iterative magnitude pruning, with its weights rewound to an early point of "
                      "training, trains to higher accuracy than the same mask randomly reinitialised.",
                      setup, table, rows, tickets, "c_d.png"),
                Claim("d", "SWAMP vs IMP-WR", "Choi et al. 2024",
                      "choosing each cycle's mask from the average of several SWA particles finds better sparse "
                      "networks than IMP-WR at the same sparsity.", "as (c).", table, rows, swamp, "c_d.png")]


class OptGvsMagnitude:
    """(e) OptG against gradual magnitude pruning on the same sigmoid ramp, over several training lengths."""

    FILES = ("e.csv", "e.png")   # its claims' CSVs and its figure, in the out_dir

    METHODS = ("optg", "gmp")

    @staticmethod
    def configs(plan: Plan, method: str, density: float, epochs: int) -> list[TrainConfig]:
        return [plan.config(method=method, density=density, epochs=epochs, seed=s) for s in range(plan.grid_seeds)]

    @classmethod
    def jobs(cls, plan: Plan) -> list[Job]:
        return [Job(c) for m in cls.METHODS for d in plan.ramp_densities for e in plan.ramp_epochs
                for c in cls.configs(plan, m, d, e)]

    @classmethod
    def analyse(cls, plan: Plan, lookup, out_dir: str) -> list[Claim]:
        results = {(m, d, e): [lookup(c) for c in cls.configs(plan, m, d, e)]
                   for m in cls.METHODS for d in plan.ramp_densities for e in plan.ramp_epochs}
        rows = [_row("e", m, cls.configs(plan, m, d, e)[0], results[m, d, e]) for m, d, e in results]
        names = {"optg": "OptG", "gmp": "magnitude (GMP)"}
        sparsest, longest = min(plan.ramp_densities), max(plan.ramp_epochs)
        final = {(m, d): statistics.fmean(r["final_density"] for r in results[m, d, longest])
                 for m in cls.METHODS for d in plan.ramp_densities}
        table_rows = [[names[m], f"{d:g}", f"{final[m, d]:.4f}",
                       *[_cell(_accuracies(results[m, d, e])) for e in plan.ramp_epochs],
                       *[_flops(results[m, d, e]) for e in plan.ramp_epochs]]
                      for m in cls.METHODS for d in plan.ramp_densities]
        findings = [_compare(f"(e) OptG vs magnitude pruning, d = {sparsest:g}, {longest} epochs",
                             "OptG beats magnitude pruning at equal final density", "OptG",
                             _accuracies(results["optg", sparsest, longest]), "GMP",
                             _accuracies(results["gmp", sparsest, longest]))]
        by_epochs = {e: verdict(_accuracies(results["optg", sparsest, e]), _accuracies(results["gmp", sparsest, e]))[0]
                     for e in plan.ramp_epochs}
        enough = next((e for e in sorted(plan.ramp_epochs) if all(by_epochs[later] != FAILS
                                                                 for later in plan.ramp_epochs if later >= e)), None)
        findings.append(Finding(f"(e) epochs OptG needs, d = {sparsest:g}", "— (the CLI warns below a minimum)",
                                "; ".join(f"{e} epochs: OptG {_cell(_accuracies(results['optg', sparsest, e]))} vs "
                                          f"GMP {_cell(_accuracies(results['gmp', sparsest, e]))}"
                                          for e in plan.ramp_epochs),
                                f"not significantly below GMP from {enough} epochs" if enough
                                else "below GMP at every length"))
        figure, axes = _figure(len(plan.ramp_densities))
        for panel, density in zip(axes[0], plan.ramp_densities):
            _errorbar_lines(panel, {names[m]: (list(plan.ramp_epochs), [_accuracies(results[m, density, e])
                                                                          for e in plan.ramp_epochs])
                                    for m in cls.METHODS})
            _label(panel, f"(e) final density {density:g}", xlabel="epochs")
            panel.set_xticks(plan.ramp_epochs)   # matplotlib's ticks at one length (--quick) ran 2.97 to 3.03
            room = 0.25 * max(plan.ramp_epochs)   # else at one length the lines' sideways nudges fill the axis
            panel.set_xlim(min(plan.ramp_epochs) - room, max(plan.ramp_epochs) + room)
        save_figure(figure, os.path.join(out_dir, "e.png"))
        return [Claim("e", "OptG vs magnitude pruning at equal final density", "Zhang et al. 2022",
                     "training the pruning scores with the straight-through gradient beats magnitude-based pruning "
                     "at the same final sparsity, most clearly at high sparsity.",
                     f"OptG and gradual magnitude pruning (the same sigmoid ramp, each epoch keeping the largest "
                     f"weights) to final densities {_listed(plan.ramp_densities)} over "
                     f"{', '.join(map(str, plan.ramp_epochs))} epochs, {counted(plan.grid_seeds, 'seed')}; the ramp ends at the "
                     f"target (the table's final density: its {longest}-epoch runs', mean over seeds).",
                     _table(["method", "density", f"final density ({longest} epochs)",
                             *[f"{e} epochs" for e in plan.ramp_epochs],
                             *[_flops_header(f"{e} epochs") for e in plan.ramp_epochs]],
                            table_rows), rows, findings, "e.png")]


class GradientFlow:
    """(f) gradient flow at init (sparsity-aware vs dense-style init) and during training (RigL vs static)."""

    FILES = ("f.csv", "f.png")   # its claims' CSVs and its figure, in the out_dir

    @staticmethod
    def configs(plan: Plan, method: str, init: str, density: float) -> list[TrainConfig]:
        return [plan.config(method=method, init=init, density=density, seed=s) for s in range(plan.seeds)]

    @classmethod
    def jobs(cls, plan: Plan) -> list[Job]:
        return [Job(c) for d in plan.dst_densities for method, init in (("static", "sparse"), ("static", "dense"),
                                                                         ("rigl", "sparse"))
                for c in cls.configs(plan, method, init, d)]

    @classmethod
    def analyse(cls, plan: Plan, lookup, out_dir: str) -> list[Claim]:
        lines = {"static, sparse init": ("static", "sparse"), "static, dense init": ("static", "dense"),
                 "RigL, sparse init": ("rigl", "sparse")}
        results = {(line, d): [lookup(c) for c in cls.configs(plan, *lines[line], d)]
                   for line in lines for d in plan.dst_densities}

        def at_init(records):
            return [next(r["gradient_flow"] for r in record["flow"] if r["when"] == "init")
                    for record in records]

        def over_training(records):
            return [record["gradient_flow_mean"] for record in records]

        def update_gain(records):  # per seed: mean rise of gradient flow across an update
            gains = []
            for record in records:
                before = [r["gradient_flow"] for r in record["flow"] if r["when"] == "before update"]
                after = [r["gradient_flow"] for r in record["flow"] if r["when"] == "after update"]
                gains.append(statistics.fmean(a - b for a, b in zip(after, before)) if before else 0.0)
            return gains

        rows, table_rows = [], []
        for line in lines:
            for density in plan.dst_densities:
                records = results[line, density]
                rows.append(_row("f", line, cls.configs(plan, *lines[line], density)[0], records,
                                 gradient_flow_init=statistics.fmean(at_init(records))))
                table_rows.append([line, f"{density:g}", _cell(at_init(records), False),
                                   _cell(over_training(records), False), _cell(_accuracies(records)),
                                   _flops(records)])
        sparsest = min(plan.dst_densities)
        sparse, dense, rigl = (results[line, sparsest] for line in lines)
        gains = update_gain(rigl)
        zeros = [0.0] * len(gains)
        findings = [
            _compare(f"(f) gradient flow at init, sparse vs dense init, d = {sparsest:g}",
                     "sparsity-aware init restores gradient flow at init", "sparse", at_init(sparse), "dense",
                     at_init(dense), percent=False),
            _compare(f"(f) static accuracy, sparse vs dense init, d = {sparsest:g}",
                     "... and so trains sparse networks better", "sparse", _accuracies(sparse), "dense",
                     _accuracies(dense)),
            _compare(f"(f) gradient flow over training, RigL vs static, d = {sparsest:g}",
                     "DST raises gradient flow during training", "RigL", over_training(rigl), "static",
                     over_training(sparse), percent=False),
            _compare(f"(f) gradient flow across a RigL update (after − before), d = {sparsest:g}",
                     "each mask update raises gradient flow", "rise", gains, "none", zeros, percent=False),
        ]
        figure, axes = _figure(2)
        left, right = axes[0]
        _errorbar_lines(left, {line: (list(plan.dst_densities), [at_init(results[line, d]) for d in plan.dst_densities])
                               for line in lines if lines[line][0] == "static"}, percent=False)  # RigL starts alike
        density_axis(left, plan.dst_densities)
        plotted = [value for line in lines if lines[line][0] == "static" for d in plan.dst_densities
                   for value in at_init(results[line, d])]
        if max(plotted) > 10 * min(plotted):   # a log axis ticks only powers of ten: readable over decades only
            left.set_yscale("log")
        else:
            left.set_ylim(bottom=0)   # the flows and their error bars as drawn, from 0 so that heights compare
        # beside the panel, as the right one's: inside, matplotlib's "best" place can still cover markers
        _label(left, "(f) at initialisation", FLOW_LABEL, legend=7, beside=True)
        for line, records in (("static, sparse init", sparse), ("RigL, sparse init", rigl)):
            points = records[0]["flow"]
            steps = sorted({r["step"] for r in points if r["when"] in ("init", "epoch")})
            curve = [statistics.fmean(next(r["gradient_flow"] for r in record["flow"]
                                           if r["step"] == step and r["when"] in ("init", "epoch"))
                                      for record in records) for step in steps]
            right.plot(steps, curve, marker=".", label=f"{line}, per epoch (mean of {counted(len(records), 'seed')})")
        seed0 = rigl[0]["flow"]
        for when, marker, colour in (("before update", "v", "grey"), ("after update", "^", "black")):
            points = [r for r in seed0 if r["when"] == when]
            right.scatter([r["step"] for r in points], [r["gradient_flow"] for r in points], marker=marker, s=14,
                          color=colour, label=f"RigL seed 0, {when}")
        for step in {r["step"] for r in seed0 if r["when"] == "after update"}:
            right.axvline(step, color="grey", alpha=0.15, linewidth=1)
        _label(right, f"(f) during training, d = {sparsest:g}", FLOW_LABEL,   # markers fill the panel: no room
               "training step (grey: RigL mask updates)", legend=6, beside=True)   # inside it for a legend
        save_figure(figure, os.path.join(out_dir, "f.png"))
        return [Claim("f", "Gradient flow at init and during training", "Evci et al. 2022",
                     "sparse networks start with poor gradient flow, which an init scaled to each unit's active "
                     "fan-in restores; during training DST improves gradient flow over static sparse training.",
                     f"gradient flow ‖g⊙m‖₂ on a fixed batch of 256 training images (no weight decay) at step 0, "
                     f"after every epoch and just before and after every RigL mask update; static training with the "
                     f"sparsity-aware and the dense-style (torch's default, masked) init, and RigL; densities "
                     f"{_listed(plan.dst_densities)}, {counted(plan.seeds, 'seed')}.",
                     _table(["line", "density", "gradient flow at init", "mean over training", "accuracy (%)",
                             _flops_header()], table_rows), rows, findings, "f.png")]


EXPERIMENTS = (DSTvsStatic, CriteriaGrid, Tickets, OptGvsMagnitude, GradientFlow)
