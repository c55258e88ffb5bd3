"""`sparsekern reproduce --quick` end to end: a report with every claim, its plots and CSVs, and a rerun that reuses
the finished runs."""
import csv
import io
import os
from dataclasses import asdict

import pytest

from sparsekern.cli import main
from sparsekern.cli import reproduce
from sparsekern.cli.output import csv_text
from sparsekern.cli.runs import unique

CLAIMS = ("a", "b", "c", "d", "e", "f")


def test_quick_reproduce_writes_a_report_of_every_claim(tmp_path, capsys, monkeypatch):
    out = tmp_path / "reproduce"
    axes_drawn = {}
    save_figure = reproduce.save_figure

    def keep_axes(figure, path, *args):
        axes_drawn[os.path.basename(path)] = [(axes.get_xlabel(), axes.get_ylabel(), axes.get_yscale(),
                                               [tick.get_text() for tick in axes.get_xticklabels()], axes.get_ylim(),
                                               bool(axes.patches)) for axes in figure.axes]
        save_figure(figure, path, *args)

    monkeypatch.setattr(reproduce, "save_figure", keep_axes)
    main(["reproduce", "--quick", "--jobs", "1", "--out", str(out)])
    printed, progress = capsys.readouterr()
    # the bar counts epochs, and names each run as its epochs end (it moved once per finished run)
    assert "imp, dense init at density 0.2, seed 0: epoch 6/6, test accuracy" in progress
    assert "static, dense init at density 0.2, seed 1000, on an IMP run's mask: epoch 3/3" in progress
    assert "runs done; " in progress and "epoch/s" in progress
    report = (out / "report.md").read_text()
    assert printed.startswith("| claim | the paper says | ours (mean ± sd over seeds) | verdict |")
    table = "\n".join(line for line in printed.splitlines() if line.startswith("|"))
    assert table in report  # the printed table is the report's
    for claim in CLAIMS:
        assert f"## ({claim}) " in report and f"| ({claim}) " in report
        with open(out / f"{claim}.csv", newline="") as file:
            rows = list(csv.DictReader(file))
        # compare's results.csv names it accuracy_std; accuracy_sd, its earlier name here, stays (deprecated)
        assert rows and all(float(row["accuracy_std"]) >= 0 and row["accuracy_sd"] == row["accuracy_std"]
                            for row in rows)
        # each compared line's costs (runs trained now have them all), and the table's column for them
        assert all(float(row["training_flops_fraction_mean"]) > 0 for row in rows)
        section = report.split(f"## ({claim}) ")[1].split("## ")[0]
        # (d)'s table is (c)'s, shown once, under (c), and its rows are c.csv's
        assert "FLOPs inf./train." in section if claim != "d" else "under (c) above" in section
    assert (out / "c.csv").read_text() == (out / "d.csv").read_text()
    dense = next(row for row in csv.DictReader(io.StringIO((out / "a.csv").read_text())) if row["line"] == "dense")
    assert float(dense["inference_flops_fraction_mean"]) == float(dense["training_flops_fraction_mean"]) == 1.0
    verdicts = [line.rsplit("|", 2)[1].strip() for line in printed.splitlines()[2:] if line.startswith("| (")]
    assert len(verdicts) >= 10
    assert set(verdicts[:3]) <= {reproduce.HOLDS, reproduce.FAILS, reproduce.TIE}
    for figure in ("a.png", "b.png", "c_d.png", "e.png", "f.png"):
        assert (out / figure).stat().st_size > 5_000 and f"({figure})" in report
    # every axis says what it shows, the y axes their unit; density ticks are numbers (c_d.png's read "d = 0.2", under
    # no label); f.png's gradient flow at one density was on a log axis with no tick but 10^-1
    for figure, panels in axes_drawn.items():
        for xlabel, ylabel, _, ticks, ylim, bars in panels:
            assert xlabel and ylabel.endswith(")"), (figure, xlabel, ylabel)
            # bars start at 0, or their heights do not compare (c_d.png's started 10 points below the lowest)
            assert not bars or ylim[0] == 0, (figure, ylim)
            assert not xlabel.startswith("density") or xlabel == "density (fraction of weights kept)" and \
                all(float(tick) > 0 for tick in ticks), (figure, xlabel, ticks)
    assert axes_drawn["f.png"][0][2] == "linear"
    with open(out / "runs.csv", newline="") as file:
        criteria = {(row["method"], row["prune"], row["grow"]) for row in csv.DictReader(file)}
    assert {("rigl", "magnitude", "gradient"), ("set", "set", "random"), ("static", "", "")} <= criteria
    runs = len(unique(reproduce.jobs(reproduce.plan(quick=True))))
    assert len([name for name in os.listdir(out / "runs") if name.endswith(".json")]) == runs
    # what reproduce wrote is what its --out was checked for before training (test_bad_inputs.py)
    written = {os.path.relpath(os.path.join(folder, name), out) for folder, _, names in os.walk(out) for name in names}
    assert written == set(reproduce.output_files(reproduce.plan(quick=True)))

    assert f" {runs} runs ({runs} trained now) in " in report

    main(["reproduce", "--quick", "--jobs", "1", "--quiet", "--out", str(out)])  # everything reused
    again = (out / "report.md").read_text()
    assert f" {runs} runs (0 trained now, the other {runs} reused from earlier runs in this folder) in " in again
    assert f"claims from {runs} runs (0 trained now, {runs} found in {out / 'runs'}) in " in capsys.readouterr().out
    strip = lambda text: [line for line in text.splitlines() if "trained now" not in line]  # noqa: E731
    assert strip(again) == strip(report)


def test_verdicts_follow_two_standard_errors():
    assert reproduce.verdict([0.9, 0.92, 0.91], [0.8, 0.82, 0.81])[0] == reproduce.HOLDS
    assert reproduce.verdict([0.8, 0.82, 0.81], [0.9, 0.92, 0.91])[0] == reproduce.FAILS
    assert reproduce.verdict([0.9, 0.7, 0.8], [0.82, 0.81, 0.83])[0] == reproduce.TIE
    # equal seeds do not make a hair's difference significant: se is at least FLOOR of the scale
    assert reproduce.verdict([0.9001, 0.9001], [0.9, 0.9])[0] == reproduce.TIE
    result, detail = reproduce.verdict([0.95, 0.96], [0.90, 0.91])
    assert result == reproduce.HOLDS and detail.startswith("Δ +5")


def test_one_value_is_shown_alone_not_with_a_zero_spread():
    assert reproduce._cell([0.971]) == "97.1" and reproduce._cell([0.5], percent=False) == "0.5"
    assert reproduce._cell([0.97, 0.95]) == "96.0 ± 1.4"
    config = reproduce.TrainConfig()
    record = {"test_accuracy": 0.971, "final_density": 0.1, "gradient_flow_mean": 1.0}
    row = reproduce._row("a", "line", config, [record])
    assert row["accuracy_std"] is None and row["accuracy_sd"] is None


def test_runs_csv_names_the_criteria_of_the_dst_presets_as_compare_does():
    # The presets' configs name no criteria: runs.csv left prune and grow empty for (a)'s SET and RigL runs.
    rows = {}
    config_of = reproduce.TrainConfig
    for config in (config_of(method="set"), config_of(method="rigl"), config_of(method="dst", prune="snip", grow="random"),
                   config_of(method="static")):
        record = {"key": config.method, "config": asdict(config), "test_accuracy": 0.9, "history": [], "flow": []}
        rows[config.method] = reproduce.run_row(record, config)
    assert {method: (row["prune"], row["grow"]) for method, row in rows.items()} == {
        "set": ("set", "random"), "rigl": ("magnitude", "gradient"), "dst": ("snip", "random"), "static": ("", "")}
    # the config's fields are columns of their own; its dict is not one more (a Python repr in a CSV cell)
    assert list(rows["set"])[:2] == ["key", "test_accuracy"] and not {"config", "history", "flow"} & set(rows["set"])
    assert rows["set"]["method"] == "set" and rows["set"]["density"] == reproduce.TrainConfig().density


def test_runs_csv_warnings_are_plain_text_in_compare_and_reproduce_alike():
    # reproduce wrote the record's list as its Python repr ("['...']"); compare left the warnings out.
    import io

    from sparsekern.cli import compare
    from sparsekern.cli.output import csv_text

    config = reproduce.TrainConfig(method="static")
    measured = {"key": "k", "config": asdict(config), "test_accuracy": 0.9, "final_density": 0.1, "schedule": "none",
                "epochs_trained": 1, "gradient_flow": 1.0, "gradient_flow_mean": 1.0, "seconds": 1.0,
                "history": [], "flow": []}
    warned = ["layers left dense: 'head', \"it's\"", "a message\nover two lines"]
    for warnings, cell in ((warned, "layers left dense: 'head', \"it's\" | a message over two lines"), ([], "")):
        record = measured | {"warnings": warnings}
        rows = {"reproduce": reproduce.run_row(record, config),
                "compare": compare.run_row(compare.Line("static", "static"), config, record)}
        for command, row in rows.items():
            fields = list(compare.RUN_FIELDS) if command == "compare" else list(row)
            read = list(csv.DictReader(io.StringIO(csv_text(fields, [row]), newline="")))
            assert len(read) == 1 and read[0]["warnings"] == cell, command


def test_criteria_tie_counts_only_the_criteria_other_than_the_best():
    close, far = [0.90, 0.91, 0.92], [0.60, 0.61, 0.62]
    accuracy = {("magnitude", 0.2): [0.91, 0.92, 0.93], ("snip", 0.2): close, ("set", 0.2): far,
                ("random", 0.2): far}
    # one of three others ties: not most, though with the best itself counted it was 2 of 4, "half"
    assert reproduce.criteria_tying_the_best(accuracy, ["magnitude", "snip", "set", "random"], [0.2]) == (1, 3)
    accuracy["set", 0.2] = close
    assert reproduce.criteria_tying_the_best(accuracy, ["magnitude", "snip", "set", "random"], [0.2]) == (2, 3)


# (f)'s densities in the legend tests: enough for the initialisation panel's markers to fill it too.
FLOW_DENSITIES = tuple(0.3 * 0.8 ** index for index in range(16))


def _flow_record(config, steps: int = 60) -> dict:
    """A made-up record of `config` whose gradient flow zigzags over its whole range at every step, and whose RigL
    updates do too, and whose flow at init zigzags across FLOW_DENSITIES (within a factor 7: a linear axis): markers
    fill both panels corner to corner, so no place inside either is free for a legend."""
    init = (FLOW_DENSITIES.index(config.density) * 3 + config.seed * 2 + (config.init == "dense")) % 7 + 1
    flow = [{"when": "init", "step": 0, "gradient_flow": init / 7}]
    for step in range(1, steps + 1):
        flow.append({"when": "epoch", "step": step, "gradient_flow": float(step % 2)})
        if config.method == "rigl":
            flow += [{"when": "before update", "step": step, "gradient_flow": (step % 7) / 6},
                     {"when": "after update", "step": step, "gradient_flow": ((step + 3) % 7) / 6}]
    return {"flow": flow, "gradient_flow_mean": 0.5, "test_accuracy": 0.5 + 0.01 * config.seed,
            "final_density": config.density}


def test_the_legends_of_f_s_panels_cover_none_of_their_markers(tmp_path, monkeypatch):
    # The legends sat inside the panels wherever matplotlib found the fewest points ("best"), over markers when
    # they filled them: the training panel's first, then the initialisation panel's.
    import dataclasses

    import numpy as np

    checked = []
    save_figure = reproduce.save_figure

    def check_legends(figure, path, *args):
        figure.tight_layout()   # as save_figure lays it out
        figure.canvas.draw()
        for panel in figure.axes:
            box = panel.get_legend().get_window_extent(figure.canvas.get_renderer()).padded(2)   # a marker's half
            points = [line.get_xydata() for line in panel.get_lines() if line.get_marker() not in ("None", None, "")]
            points += [collection.get_offsets() for collection in panel.collections
                       if len(collection.get_offsets())]   # the error bars' LineCollections have none
            drawn = panel.transData.transform(np.concatenate(points))
            checked.append((panel.get_title(), len(drawn), [point for point in drawn if box.contains(*point)]))
            # the loss is in nats, its gradient's norm in nats per unit of weight (it said nats)
            assert panel.get_ylabel().endswith("(nats/unit weight)"), panel.get_ylabel()
        save_figure(figure, path, *args)

    monkeypatch.setattr(reproduce, "save_figure", check_legends)
    plan = dataclasses.replace(reproduce.plan(quick=True), dst_densities=FLOW_DENSITIES)
    reproduce.GradientFlow.analyse(plan, lambda config, masks_from=None: _flow_record(config), str(tmp_path))
    assert len(checked) == 2
    for title, count, inside in checked:
        assert count > 90 and not inside, f"{title}: {len(inside)} of {count} markers under the legend"
    assert (tmp_path / "f.png").exists()


def test_the_readme_counts_the_quick_runs_as_the_plan_has_them():
    # The README sizes --quick by its runs and their CPU time (its wall time depends on the machine's load: "well
    # under a minute" took 153 s on 2 shared cores); the count must follow the plan.
    from pathlib import Path

    readme = " ".join((Path(__file__).resolve().parents[2] / "README.md").read_text().split())
    runs = len(unique(reproduce.jobs(reproduce.plan(quick=True))))
    assert f"to mean much): {runs} short runs, under a minute of CPU time" in readme


def _costed_record(config, masks_from=None, costless=()) -> dict:
    """A made-up record of `config` with costs that differ by line, density, epochs and seed (so that a cell shows
    its own line's mean over seeds), none where (method, seed) is in `costless` (a record stored before them)."""
    record = _made_up_record(config)
    seed = config.seed % reproduce.REINIT_SEED_OFFSET
    if (config.method, seed) not in costless:
        inference = config.density * (1.1 if masks_from is None else 1.2)
        training = inference + 0.001 * config.epochs + 0.01 * len(config.method) + 0.002 * seed
        record |= {"inference_macs": round(1000 * inference), "inference_flops_fraction": inference,
                   "training_flops_fraction": training}
    return record


def _made_up_record(config) -> dict:
    """A record of `config` as `reproduce`'s analyses read it, without costs (stored before them)."""
    seed = config.seed % reproduce.REINIT_SEED_OFFSET
    flow = [{"when": "init", "step": 0, "gradient_flow": 0.1 + 0.01 * seed}]
    for step in range(1, 4):
        flow.append({"when": "epoch", "step": step, "gradient_flow": 0.2 * step})
        if config.method == "rigl":
            flow += [{"when": "before update", "step": step, "gradient_flow": 0.1},
                     {"when": "after update", "step": step, "gradient_flow": 0.3}]
    return {"flow": flow, "gradient_flow_mean": 0.4, "test_accuracy": 0.5 + 0.01 * seed + 0.02 * config.density,
            "final_density": config.density, "schedule": "made up"}


def _claims(tmp_path, plan, record) -> dict:
    """Every claim of `plan` analysed on the made-up records `record(config, masks_from)`, by key."""
    claims = [claim for experiment in reproduce.EXPERIMENTS
              for claim in experiment.analyse(plan, record, str(tmp_path))]
    return {claim.key: claim for claim in claims}


def _table_cells(table: str) -> tuple[list[str], list[list[str]]]:
    """A Markdown table's header and rows, as lists of cells."""
    header, _, *rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in table.splitlines()]
    return header, rows


def test_each_compared_line_shows_its_flops_as_its_records_say_in_table_and_csv(tmp_path):
    plan = reproduce.plan(quick=True)
    claims = _claims(tmp_path, plan, _costed_record)
    for key in "abcdef":
        claim = claims[key]
        header = claim.table.splitlines()[0]
        assert header.count("FLOPs inf./train.") >= 1, (key, header)
        for row in claim.rows:
            configs = _configs_of(plan, key, row)
            records = [_costed_record(config, masks_from) for config, masks_from in configs]
            for name in ("inference_macs", "inference_flops_fraction", "training_flops_fraction"):
                assert row[f"{name}_mean"] == pytest.approx(sum(r[name] for r in records) / len(records)), (key, row)
            shown = f"{row['inference_flops_fraction_mean']:.3g} / {row['training_flops_fraction_mean']:.3g}"
            assert _shown_flops(key, claim.table, row) == [shown], (key, row)
        # the CSV: the same values, columns named as compare's results.csv names them
        text = csv_text(reproduce._fields(claim.rows), claim.rows)
        for read, row in zip(csv.DictReader(io.StringIO(text, newline="")), claim.rows):
            assert float(read["training_flops_fraction_mean"]) == row["training_flops_fraction_mean"]
    assert "**FLOPs inf./train.**" in reproduce.Report(plan, list(claims.values()), 0, 0, 0, 0, 1).markdown()


def _shown_flops(key: str, table: str, row: dict) -> list[str]:
    """The FLOPs cells of a claim's table for the line of its CSV `row` (the dense line's repeat under every
    density)."""
    header, table_rows = _table_cells(table)
    at = f"{row['epochs_trained']} epochs" if key == "e" else f"d = {row['density']:g}"
    # (f)'s rows are a line at one density each, its one FLOPs column theirs
    columns = [index for index, name in enumerate(header) if name in (f"FLOPs inf./train., {at}", "FLOPs inf./train.")
               or row["line"] == "dense" and name.startswith("FLOPs")]
    name = {"optg": "OptG", "gmp": "magnitude (GMP)"}.get(row["line"], row["line"])
    [shown] = [cells for cells in table_rows
               if cells[0] == name and (key not in "ef" or cells[1] == f"{row['density']:g}")]
    return sorted({shown[column] for column in columns})


def _configs_of(plan, key: str, row: dict) -> list[tuple]:
    """The (config, masks_from) of each seed of a claim's CSV row."""
    density = row["density"]
    if key == "a":
        return [(config, None) for config in reproduce.DSTvsStatic.configs(plan, row["method"], density)]
    if key == "b":
        return [(config, None) for config in reproduce.CriteriaGrid.configs(plan, row["line"], density)]
    if key in "cd":
        tickets = reproduce.Tickets
        return {"IMP-WR": [(c, None) for c in tickets.imp(plan, density)],
                "SWAMP": [(c, None) for c in tickets.swamp(plan, density)],
                "reinit (same init)": tickets.reinit(plan, density, "dense"),
                "reinit (sparsity-aware init)": tickets.reinit(plan, density, "sparse")}[row["line"]]
    if key == "f":
        return [(config, None) for config in reproduce.GradientFlow.configs(plan, row["method"], row["init"], density)]
    epochs = row["epochs_trained"]
    return [(config, None) for config in reproduce.OptGvsMagnitude.configs(plan, row["method"], density, epochs)]


def test_a_table_that_claims_share_is_shown_once_and_each_of_them_points_at_it(tmp_path):
    # (c) and (d) compare lines of one experiment, one table: the report showed it twice, in full
    plan = reproduce.plan(quick=True)
    claims = _claims(tmp_path, plan, _costed_record)
    assert claims["c"].table == claims["d"].table and claims["c"].rows == claims["d"].rows
    report = reproduce.Report(plan, list(claims.values()), 0, 0, 0, 0, 1).markdown()
    for key, claim in claims.items():
        assert report.count(claim.table) == 1, key
    sections = {key: report.split(f"## ({key}) ")[1].split("## ")[0] for key in claims}
    assert f"The lines of (c) and (d):\n\n{claims['c'].table}" in sections["c"]
    assert "**Table**: the lines of (c) and (d), under (c) above." in sections["d"]
    assert claims["d"].table not in sections["d"] and "Numbers: `d.csv`" in sections["d"]
    assert all("The lines of" not in sections[key] and "**Table**" not in sections[key] for key in "abef")
    # and so is their figure, c_d.png
    assert report.count("(c_d.png)") == 1 and "](c_d.png)" in sections["c"]
    assert "**Figure**: `c_d.png`, under (c) above." in sections["d"]
    assert all(report.count(f"({key}.png)") == 1 and "**Figure**" not in sections[key] for key in "abef")


def test_a_line_with_a_record_without_costs_gets_empty_cells_and_the_same_verdicts(tmp_path):
    # a record stored before the costs: the line's cells are empty, not the mean of the other seeds' costs
    plan = reproduce.plan(quick=True)
    costless = {("rigl", 1), ("swamp", 0), ("optg", 1), ("dst", 0)}
    claims = _claims(tmp_path, plan, lambda config, masks_from=None: _costed_record(config, masks_from, costless))
    for key, line in (("a", "rigl"), ("b", "magnitude"), ("d", "SWAMP"), ("e", "optg"), ("f", "RigL, sparse init")):
        rows = [row for row in claims[key].rows if row["line"] == line]
        assert rows and all(row[f"{name}_mean"] is None for row in rows
                            for name in ("inference_macs", "inference_flops_fraction", "training_flops_fraction"))
        read = list(csv.DictReader(io.StringIO(csv_text(reproduce._fields(claims[key].rows), claims[key].rows),
                                               newline="")))
        assert all(row["training_flops_fraction_mean"] == "" for row in read if row["line"] == line)
        assert all(_shown_flops(key, claims[key].table, row) == ["– / –"] for row in rows), key
    # the other lines keep theirs; the verdicts are those of records without any costs
    assert all(row["training_flops_fraction_mean"] is not None for row in claims["a"].rows if row["line"] == "static")
    bare = _claims(tmp_path, plan, lambda config, masks_from=None: _made_up_record(config))
    assert all(claim.findings == bare[key].findings for key, claim in claims.items())
