"""End to end: `sparsekern compare` outputs agree with each other and say what ran, an interrupted `compare` or
`train` loses no finished work, runs record gradient flow and stop updating at their end point, and local
datasets load. Bad inputs: test_bad_inputs.py."""
import csv
import inspect
import json
import math
import os
import re
import statistics
import warnings

import numpy as np
import pytest
import torch

from sparsekern import checkpoint
from sparsekern.algorithms import IMP, SWAMP
from sparsekern.algorithms.optg import MIN_EPOCHS_DIGITS
from sparsekern.cli import compare as compare_module
from sparsekern.cli import main
from sparsekern.cli.data import load_dataset
from sparsekern.cli.main import _config, _warn_short_optg, build_parser
from sparsekern.cli.recipes import TICKET_SCOPE
from sparsekern.cli.runs import key
from sparsekern.cli import training
from sparsekern.cli.training import TrainConfig, prepare

from .stored_runs import stored_and_run_again
from sparsekern.nn import SparseConv1d, sparse_modules


def _read_csv(path):
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def test_compare_outputs_exist_and_agree(tmp_path, capsys):
    out = tmp_path / "compare"
    main(["compare", "--methods", "dense,dst", "--criteria", "snip", "--densities", "0.5,0.1", "--seeds", "2",
          "--epochs", "1", "--update-every", "5", "--schedule", "annealed", "--init", "layer-scaled", "--jobs", "1",
          "--out", str(out), "--quiet"])
    runs = _read_csv(out / "runs.csv")
    rows = _read_csv(out / "results.csv")
    table = (out / "results.md").read_text()
    assert capsys.readouterr().out.startswith(table)

    # results.csv is the mean and sample std over seeds of runs.csv; the gradient flow columns average each run's
    # final value and its mean over epochs
    assert rows and all(int(row["seeds"]) == 2 for row in rows)
    for row in rows:
        mine = [run for run in runs if run["label"] == row["label"] and float(run["density"]) == float(row["density"])]
        accuracies = [float(run["test_accuracy"]) for run in mine]
        assert len(mine) == 2
        assert float(row["accuracy_mean"]) == pytest.approx(statistics.fmean(accuracies), abs=1e-12)
        assert float(row["accuracy_std"]) == pytest.approx(statistics.stdev(accuracies), abs=1e-12)
        assert float(row["gradient_flow_training_mean"]) == pytest.approx(
            statistics.fmean(float(run["gradient_flow_mean"]) for run in mine))
        assert row["init"] == "layer-scaled" and int(row["epochs"]) == 1
    sparse_densities = {float(row["density"]) for row in rows if row["method"] != "dense"}
    assert sparse_densities == {0.5, 0.1}
    assert {row["label"] for row in rows} == {"dense", "snip (+random)"}
    assert {row["schedule"] for row in rows if row["method"] == "dst"} == {"annealed 0.5→0.005, ΔT 5, to 100%"}

    # the Markdown table names the init in its caption, each line's schedule and epochs, and shows the CSV's
    # numbers (percent, one decimal); dense fills every column
    caption, accuracy_table = table.split("\n\n")[:2]
    assert "init layer-scaled (dense baseline too)" in caption and "2 seeds" in caption
    assert 'A line "c (+g)" is DST pruning by criterion c (--criteria) and growing by g (--grow).' in caption
    lines = accuracy_table.strip().splitlines()
    assert lines[0] == "| line | schedule | epochs | density 0.5 | density 0.1 |"
    cells = {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]] for line in lines[2:]}
    assert set(cells) == {row["label"] for row in rows}
    assert cells["snip (+random)"][:2] == ["annealed 0.5→0.005, ΔT 5, to 100%", "1"]
    assert cells["dense"][:2] == ["–", "1"]
    for row in rows:
        expected = f"{100 * float(row['accuracy_mean']):.1f} ± {100 * float(row['accuracy_std']):.1f}"
        columns = [2, 3] if row["method"] == "dense" else [2 + [0.5, 0.1].index(float(row["density"]))]
        assert all(cells[row["label"]][column] == expected for column in columns)
    assert "Gradient flow" in table  # and a second grid: gradient flow over training
    # what compare wrote is what its --out was checked for before training (test_bad_inputs.py)
    written = {os.path.relpath(os.path.join(folder, name), out) for folder, _, names in os.walk(out) for name in names}
    assert written == {*compare_module.RESULT_FILES, *(os.path.join("runs", f"{run['key']}.json") for run in runs)}

    # the plot is a PNG whose plotted series (stored in its metadata) are the CSV's
    from PIL import Image

    with Image.open(out / "accuracy_vs_density.png") as image:
        assert image.format == "PNG" and image.size[0] > 200
        series = json.loads(image.text["Description"])
    assert set(series) == set(cells)
    for row in rows:
        line = series[row["label"]]
        at = line["density"].index(float(row["density"]))
        assert line["mean"][at] == pytest.approx(100 * float(row["accuracy_mean"]))
        assert line["std"][at] == pytest.approx(100 * float(row["accuracy_std"]))


def test_compare_names_the_criteria_each_dst_line_used(tmp_path):
    # The presets name no criteria in their configs; their columns were left empty.
    main(["compare", "--methods", "static,set,rigl,mest,dst", "--criteria", "snip", "--densities", "0.3", "--seeds",
          "1", "--epochs", "1", "--jobs", "1", "--out", str(tmp_path), "--quiet"])
    expected = {"static": ("", ""), "set": ("set", "random"), "rigl": ("magnitude", "gradient"),
                "mest": ("mest", "random"), "snip (+random)": ("snip", "random")}
    for name in ("results.csv", "runs.csv"):
        rows = _read_csv(tmp_path / name)
        assert {row["label"]: (row["prune"], row["grow"]) for row in rows} == expected, name


@pytest.mark.parametrize("method", ["set", "rigl", "mest", "dst"])
def test_the_criteria_reported_are_those_the_algorithm_uses(method):
    from sparsekern.cli import recipes

    for config in (TrainConfig(method=method), TrainConfig(method=method, prune="snip"),
                   TrainConfig(method=method, grow="random")):
        run = prepare(config, dataset=load_dataset("digits"))
        algorithm = run.recipe.algorithm
        assert recipes.criteria_of(config) == (algorithm.prune, algorithm.grow)


@pytest.mark.parametrize("method", ["set", "rigl", "mest", "dst"])
def test_the_dst_settings_a_config_leaves_to_the_method_are_those_the_algorithm_takes(method):
    from sparsekern.cli import recipes

    config = TrainConfig(method=method)
    settings = recipes.dst_settings(config)
    algorithm = prepare(config, dataset=load_dataset("digits")).recipe.algorithm
    schedule = algorithm.schedule
    assert (settings["prune"], settings["grow"], settings["schedule"], settings["drop_fraction"]) == \
           (algorithm.prune, algorithm.grow, schedule.name, schedule.drop_fraction)
    assert schedule.end_step == max(1, round(settings["end_fraction"] * schedule.total_steps))
    for name in ("swap_rounding", *recipes.CRITERION_PARAMETERS):
        assert settings[name] == getattr(algorithm, name), name
    assert recipes.dst_settings(TrainConfig(method=method, **settings)) == settings   # written out: read alike


def test_ranks_compare_the_dst_settings_a_run_takes_not_how_they_were_given():
    # `--prune magnitude` on one rank and rigl's own (magnitude) on the other were refused as other arguments.
    from types import SimpleNamespace

    from sparsekern.cli.main import _lockstep_arguments

    args, dataset = SimpleNamespace(stop_after=None), load_dataset("digits")
    left = _lockstep_arguments(args, TrainConfig(method="rigl"), dataset, None)
    written = TrainConfig(method="rigl", prune="magnitude", grow="gradient", schedule="cosine", drop_fraction=0.3,
                          end_fraction=0.75, swap_rounding="round")
    assert _lockstep_arguments(args, written, dataset, None) == left
    other = _lockstep_arguments(args, TrainConfig(method="rigl", schedule="annealed"), dataset, None)
    assert {name for name in left if other[name] != left[name]} == {"--schedule", "--drop-fraction", "--end-fraction"}


def test_one_seed_shows_no_spread_rather_than_a_measured_zero(tmp_path, capsys):
    main(["compare", "--methods", "dense,static", "--densities", "0.3", "--seeds", "1", "--epochs", "1", "--jobs",
          "1", "--out", str(tmp_path), "--quiet"])
    rows = _read_csv(tmp_path / "results.csv")
    assert rows and all(row["seeds"] == "1" and row["accuracy_std"] == "" for row in rows)
    table = (tmp_path / "results.md").read_text()
    assert "±" not in table and "mean ± sd" not in table
    assert "(+g)" not in table   # no DST criteria line to name
    for row in rows:
        assert f"| {100 * float(row['accuracy_mean']):.1f} |" in table
    from PIL import Image

    with Image.open(tmp_path / "accuracy_vs_density.png") as image:
        series = json.loads(image.text["Description"])
    assert all(line["std"] == [None] for line in series.values())
    assert "2 lines x 1 density x 1 seed: 2 runs (2 trained now) in " in capsys.readouterr().out


def test_compare_s_last_line_says_how_many_runs_it_trained_and_how_many_it_found(tmp_path, capsys):
    # A rerun that found every run in --out said "... in 2.1 s", as if it had trained them that fast.
    argv = ["compare", "--methods", "static,dense", "--densities", "0.3", "--seeds", "1", "--epochs", "1", "--jobs",
            "1", "--out", str(tmp_path), "--quiet"]
    main(argv)
    first = capsys.readouterr().out.splitlines()[-1]
    main(argv[:4] + ["0.3,0.2"] + argv[5:])   # one more density: one more static run, the dense one found
    again = capsys.readouterr().out.splitlines()[-1]
    assert first.startswith("2 lines x 1 density x 1 seed: 2 runs (2 trained now) in "), first
    assert again.startswith(f"2 lines x 2 densities x 1 seed: 3 runs (1 trained now, 2 found in "
                            f"{tmp_path / 'runs'}) in "), again
    assert again.endswith(f"s; tables, CSVs and plot in {tmp_path}")


def test_compare_says_how_long_each_line_trained(tmp_path, capsys):
    main(["compare", "--methods", "static,imp", "--densities", "0.3", "--seeds", "1", "--epochs", "1", "--cycles",
          "2", "--jobs", "1", "--out", str(tmp_path), "--quiet"])
    rows = {row["label"]: row for row in _read_csv(tmp_path / "results.csv")}
    assert rows["static"]["epochs"] == "1" and rows["imp"]["epochs"] == "2"
    assert rows["imp"]["schedule"] == "2 cycles, rewind to 10%"
    assert "| imp | 2 cycles, rewind to 10% | 2 |" in (tmp_path / "results.md").read_text()


def test_interrupted_compare_keeps_finished_runs_and_a_rerun_trains_only_the_rest(tmp_path, monkeypatch):
    argv = ["compare", "--methods", "static,rigl", "--densities", "0.3,0.1", "--seeds", "2", "--epochs", "2",
            "--update-every", "5", "--jobs", "1", "--out", str(tmp_path / "out"), "--quiet"]
    from sparsekern.cli import runs as runs_module

    real_train, calls, kept_going = runs_module.train, [], []

    def train_then_interrupt(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 5 and not kept_going:
            raise KeyboardInterrupt
        return real_train(*args, **kwargs)

    monkeypatch.setattr(runs_module, "train", train_then_interrupt)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 130
    kept = sorted(os.listdir(tmp_path / "out" / "runs"))
    assert len(kept) == 4 and all(name.endswith(".json") for name in kept)
    calls.clear()
    kept_going.append(True)
    main(argv)
    assert len(calls) == 4  # the 4 runs that were missing, none again
    rerun = _read_csv(tmp_path / "out" / "runs.csv")
    monkeypatch.undo()
    main([*argv[:-3], "--out", str(tmp_path / "whole"), "--fresh", "--quiet"])
    whole = _read_csv(tmp_path / "whole" / "runs.csv")
    assert [run["test_accuracy"] for run in rerun] == [run["test_accuracy"] for run in whole]


def _cut_short(path):
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])


def _edited_masks(edit):
    def damage(path):
        masks = checkpoint.load(path)
        edit(masks)
        checkpoint.save(masks, path)
    return damage


@pytest.mark.parametrize("damage", [
    _cut_short, _edited_masks(lambda masks: masks.update({"1": masks["1"][:3]})),
    _edited_masks(lambda masks: masks.update(renamed=masks.pop("1"))),
    _edited_masks(lambda masks: masks.update({"1": torch.empty_like(masks["1"], device="meta")})),
    _edited_masks(lambda masks: masks.clear()),
    _edited_masks(lambda masks: masks.update({name: ~mask for name, mask in masks.items()})),
    _edited_masks(lambda masks: masks.update({"1": masks["1"][:1].expand_as(masks["1"])})),
    _edited_masks(lambda masks: masks.update({"1": masks["1"].to_sparse()}))],
    ids=["cut short", "a mask of another shape", "a layer renamed", "a mask on the meta device", "no masks",
         "masks flipped", "a mask of its first row", "a sparse tensor"])
def test_a_damaged_stored_ticket_is_trained_again_by_a_rerun(tmp_path, damage):
    # A run whose masks another starts from (reproduce's lottery tickets) keeps them in <key>.masks.pt. A damaged
    # one, cut short, counted as stored: the rerun did not train its run again and stopped on loading it. Campaign
    # 21: so did masks of another layer or shape, or on the meta device (a ValueError or NotImplementedError
    # traceback from the run starting from them). Campaign 30: masks of another density than the ticket's record
    # (flipped, one row repeated) started the run from them, and a sparse tensor counted as a mask.
    from sparsekern.cli.runs import Job, RunStore, execute, key

    dataset = load_dataset("digits")
    ticket = TrainConfig(method="imp", density=0.3, epochs=1, cycles=2, batch_size=256)
    jobs = [Job(ticket), Job(TrainConfig(method="static", density=0.3, epochs=1, batch_size=256), ticket)]
    first = execute(jobs, RunStore(str(tmp_path)), dataset)
    damage(tmp_path / f"{key(ticket)}.masks.pt")
    (tmp_path / f"{key(jobs[1].config, ticket)}.json").unlink()
    trained = []
    again = execute(jobs, RunStore(str(tmp_path)), dataset, on_done=lambda job, record, new: trained.append(new))
    assert trained == [True, True]
    assert [again[name]["test_accuracy"] for name in first] == [record["test_accuracy"] for record in first.values()]


@pytest.mark.parametrize("init", ["sparse", "dense"])
def test_a_run_started_from_masks_is_the_model_sparsified_with_them(init):
    # Reproduce's reinitialised tickets: the run's model is its fresh one given those masks by sparsify, the init
    # drawn from the run's seed.
    from sparsekern.cli.models import build_model
    from sparsekern.nn import sparsify

    dataset = load_dataset("digits")
    config = TrainConfig(method="static", density=0.3, epochs=1, batch_size=256, init=init, seed=4)
    draw = torch.Generator().manual_seed(3)
    masks = {name: torch.rand(shape, generator=draw) < 0.2
             for name, shape in training.mask_layout(config, dataset).items()}
    run = prepare(config, dataset, masks=masks)
    torch.manual_seed(config.seed)
    model = build_model(config.model, dataset.input_shape, dataset.num_classes, config.width)
    sparsify(model, None, mask=masks, init=init, generator=torch.Generator().manual_seed(config.seed))
    assert run.model.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(value, model.state_dict()[name]) for name, value in run.model.state_dict().items())
    assert all(torch.equal(module.mask, masks[name]) for name, module in sparse_modules(run.model))


def test_masks_that_do_not_fit_the_run_are_refused_on_one_line():
    dataset = load_dataset("digits")
    config = TrainConfig(method="static", density=0.3, epochs=1, batch_size=256)
    masks = {name: torch.ones(shape, dtype=torch.bool) for name, shape in training.mask_layout(config, dataset).items()}
    first = next(iter(masks))
    renamed = {("renamed" if name == first else name): mask for name, mask in masks.items()}
    refusals = [
        (config, renamed, rf"^mask must give a mask to exactly the layers sparsified; missing: '{first}'; not among "
                          rf"them: 'renamed'"),
        (config, {**masks, first: torch.zeros(3, dtype=torch.bool)}, rf"^mask\['{first}'\] must have the shape of"),
        (config, {**masks, first: torch.zeros_like(masks[first])}, rf"^mask\['{first}'\] has no active entry"),
        (TrainConfig(method="imp", density=0.3, epochs=1, cycles=2), masks, r"^masks apply to static and DST runs"),
    ]
    for run_config, given, match in refusals:
        with pytest.raises(ValueError, match=match) as refused:
            prepare(run_config, dataset, masks=given)
        assert "\n" not in str(refused.value)


def test_warnings_of_the_runs_are_kept_with_them_and_shown_once_each(tmp_path, capsys, monkeypatch):
    from sparsekern.cli import runs as runs_module

    real_train = runs_module.train

    def train_with_a_warning(config, **kwargs):
        warnings.warn(f"odd thing\nat density {config.density}")
        return real_train(config, **kwargs)

    monkeypatch.setattr(runs_module, "train", train_with_a_warning)
    argv = ["compare", "--methods", "static", "--densities", "0.3,0.1", "--seeds", "2", "--epochs", "1", "--jobs",
            "1", "--out", str(tmp_path), "--quiet"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none may escape: the command line prints them itself
        main(argv)
    expected = ["sparsekern compare: warning: 2 runs: odd thing at density 0.3",
                "sparsekern compare: warning: 2 runs: odd thing at density 0.1"]
    assert capsys.readouterr().err.splitlines() == expected
    main(argv)  # reused runs keep their warnings
    assert capsys.readouterr().err.splitlines() == expected


def test_compare_results_do_not_depend_on_the_number_of_worker_processes(tmp_path):
    argv = ["compare", "--methods", "static,set", "--densities", "0.2", "--seeds", "2", "--epochs", "1", "--quiet"]
    main([*argv, "--jobs", "1", "--out", str(tmp_path / "one")])
    main([*argv, "--jobs", "2", "--out", str(tmp_path / "two")])

    def results(name):
        return [(run["label"], run["seed"], run["test_accuracy"], run["gradient_flow_mean"])
                for run in _read_csv(tmp_path / name / "runs.csv")]

    assert results("one") == results("two")


def test_compare_on_worker_processes_leaves_the_caller_s_dataset_where_it_is(tmp_path):
    """Campaign 20: run_compare moved the caller's dataset tensors into shared memory (share_memory_ in place), so
    that a NumPy array made from one no longer saw the tensor's memory."""
    dataset = load_dataset("digits")
    view = dataset.train_x.numpy()
    tensors = (dataset.train_x, dataset.train_y, dataset.test_x, dataset.test_y)
    addresses = [tensor.data_ptr() for tensor in tensors]
    lines = compare_module.grid_lines(["static"], ["magnitude"], ["gradient"], ["cosine"])
    compare_module.run_compare(lines, [0.5, 0.3], 1, TrainConfig(epochs=1), str(tmp_path), progress=False,
                               dataset=dataset, workers=2)
    assert [tensor.data_ptr() for tensor in tensors] == addresses
    assert not any(tensor.is_shared() for tensor in tensors)
    assert view.__array_interface__["data"][0] == dataset.train_x.data_ptr()


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_compare_progress_moves_with_every_epoch_of_every_run_and_names_it(tmp_path, capsys, jobs):
    # With --jobs 2 the bar sat at 0 while the workers started, then moved once per finished run: minutes without
    # a sign on a long run. It counts epochs now, each run's reported as it ends, from the workers too.
    main(["compare", "--methods", "static", "--densities", "0.3,0.1", "--seeds", "1", "--epochs", "2", "--jobs",
          jobs, "--out", str(tmp_path)])
    shown = [line.strip() for line in capsys.readouterr().err.replace("\r", "\n").splitlines() if line.strip()]
    for density in ("0.3", "0.1"):
        news = [found for line in shown for found in re.findall(
            f"static at density {density}, seed 0: (started|epoch \\d+/\\d+)", line)]
        assert list(dict.fromkeys(news)) == ["started", "epoch 1/2", "epoch 2/2"], shown   # a redraw repeats one
        assert any(f"static at density {density}, seed 0 finished: test accuracy" in line for line in shown)
    assert "4/4 [" in shown[-1] and "2/2 runs done" in shown[-1], shown


def test_a_repeated_run_is_trained_once_and_counted_once_by_the_bar(tmp_path, capsys):
    # runs.execute and the bar each dropped repeated runs by their own rule; runs.unique is the one both follow
    from sparsekern.cli.progress import RunsBar
    from sparsekern.cli.runs import Job, RunStore, execute, unique

    first, second = (Job(TrainConfig(method="static", density=0.3, epochs=epochs)) for epochs in (1, 2))
    jobs = [first, second, Job(TrainConfig(method="static", density=0.3, epochs=1)), second]
    assert unique(jobs) == [first, second] and unique(jobs)[0] is first
    bar = RunsBar(jobs, "test", lambda job: f"{job.config.epochs} epochs")
    done = []

    def finished(job, record, trained):
        done.append(job)
        bar.done(job, record, trained)

    try:
        records = execute(jobs, RunStore(str(tmp_path)), load_dataset("digits"), on_done=finished,
                          on_progress=bar.progress)
    finally:
        bar.close()
    assert done == unique(jobs) and set(records) == {job.key for job in unique(jobs)}
    shown = capsys.readouterr().err.replace("\r", "\n").splitlines()
    assert "3/3 [" in shown[-1] and "2/2 runs done" in shown[-1], shown   # 1 + 2 epochs, 2 runs


@pytest.mark.parametrize("target, final, filed", [(0.05, 0.0502, 0.05), (0.05, 0.0671, 0.0671), (0.2, 1.0, 1.0),
                                                  (0.01, 0.0101, 0.01), (0.01, 0.0102, 0.0102)])
def test_a_run_is_filed_under_the_density_it_ended_at(target, final, filed):
    assert compare_module.filed_density(target, final) == filed


def test_the_recorded_density_counts_every_convolution_and_linear_layer():
    conv1d, linear = SparseConv1d(4, 6, 3), torch.nn.Linear(5, 2)
    conv1d.set_mask(torch.arange(conv1d.weight.numel()).view_as(conv1d.weight) < 7)
    model = torch.nn.Sequential(conv1d, torch.nn.Conv3d(2, 3, 2), linear)
    assert training.density(model) == (7 + 3 * 2 * 8 + 10) / (72 + 3 * 2 * 8 + 10)


def test_compare_files_a_run_under_the_density_it_reached(tmp_path):
    # width 4 rounds the layers' counts to 0.0224 overall at density 0.02, more than 1% away: a column of its own.
    # (One epoch of OptG, which ended dense, was the example here; it is refused now: test_bad_inputs.py.)
    lines = compare_module.grid_lines(["static"], [], "random")
    compare_module.run_compare(lines, [0.02], 1, TrainConfig(epochs=1, width=4), str(tmp_path), progress=False)
    rows = _read_csv(tmp_path / "results.csv")
    assert [(float(row["density"]), float(row["target_density"])) for row in rows] == [(0.0224, 0.02)]
    assert "density 0.0224 |" in (tmp_path / "results.md").read_text()


def test_optg_ends_at_the_target_density_and_warns_when_short(tmp_path, capsys):
    main(["train", "--method", "optg", "--density", "0.2", "--epochs", "3", "--out", str(tmp_path), "--quiet"])
    history = json.loads((tmp_path / "metrics.json").read_text())["epochs"]
    assert history[-1]["density"] == pytest.approx(0.2, abs=2e-4)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "warning" in err[0] and f"about {MIN_EPOCHS_DIGITS} epochs" in err[0]


def test_the_short_optg_warning_quotes_the_collapse_readmes_reproduce_table_measured():
    # The warning said OptG "collapses to about 36%" at 10 epochs, the README's reproduce table 33.1 ± 3.5; a full
    # reproduce run of 2026-12-02 measured 35.3 ± 5.4 (37.05, 39.55, 29.25 over seeds 0-2 at density 0.02), and one of
    # the code of that evening 35.1 ± 3.4 (37.05, 31.20, 37.05), magnitude pruning 48.1 ± 8.4 (51.3 ± 9.8 before).
    from pathlib import Path
    readme = " ".join((Path(__file__).resolve().parents[2] / "README.md").read_text().split())
    optg, gmp = re.search(r"\| \(e\) epochs OptG needs, d = 0.02 \|.*?10 epochs: OptG ([\d.]+) ± [\d.]+ vs GMP "
                          r"([\d.]+) ± ", readme).groups()
    with pytest.warns(UserWarning) as caught:
        _warn_short_optg("optg", 10)
    [message] = [str(warning.message) for warning in caught]
    assert f"at 10 epochs: {float(optg):.0f}% at density 0.02" in message
    assert f"magnitude pruning on the same ramp reaches {float(gmp):.0f}%" in message


def test_dst_warnings_name_the_options_the_user_typed(tmp_path, capsys):
    # They named DST's arguments instead (update_every=25 ... end_step=17 (total_steps=23), block=(3, 3)).
    main(["train", "--method", "rigl", "--epochs", "1", "--block", "3x3", "--out", str(tmp_path / "train"), "--quiet"])
    idle = ("no mask update will ever happen: --update-every 25 reaches no step before the updates end, at step 17 "
            "(--end-fraction 0.75 of the 23 steps of --epochs 1); raise --epochs or lower --update-every")
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == f"sparsekern train: warning: {idle}"
    assert err[:-1] and all(line.startswith("sparsekern train: warning: --block 3x3 does not tile layer ")
                            for line in err[:-1])
    main(["compare", "--methods", "rigl", "--densities", "0.1", "--seeds", "1", "--epochs", "1", "--end-fraction",
          "0.5", "--jobs", "1", "--out", str(tmp_path / "compare"), "--quiet"])
    assert capsys.readouterr().err.splitlines() == [
        "sparsekern compare: warning: 1 run: no mask update will ever happen: --update-every 25 reaches no step "
        "before the updates end, at step 12 (--end-fraction 0.5 of the 23 steps of --epochs 1); raise --epochs or "
        "lower --update-every"]


def test_dst_no_update_warning_is_found_by_its_kind_not_its_words(tmp_path, capsys, monkeypatch):
    # The CLI found it by the start of its message: reworded in the library, it came out twice, once in DST's
    # argument names (update_every=25 ... end_step=17).
    from sparsekern.algorithms import dst
    warn_if_idle = dst._warn_if_idle

    def reworded(*args):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            warn_if_idle(*args)
        for warning in caught:
            warnings.warn(f"reworded: {warning.message}", warning.category)

    monkeypatch.setattr(dst, "_warn_if_idle", reworded)
    main(["train", "--method", "rigl", "--epochs", "1", "--out", str(tmp_path), "--quiet"])
    assert capsys.readouterr().err.splitlines() == [
        "sparsekern train: warning: no mask update will ever happen: --update-every 25 reaches no step before the "
        "updates end, at step 17 (--end-fraction 0.75 of the 23 steps of --epochs 1); raise --epochs or lower "
        "--update-every"]


def test_a_drop_fraction_that_swaps_nothing_is_warned_in_option_names(tmp_path, capsys):
    main(["train", "--method", "set", "--epochs", "3", "--update-every", "5", "--drop-fraction", "0.00001",
          "--swap-rounding", "floor", "--stop-after", "1", "--out", str(tmp_path), "--quiet"])
    assert capsys.readouterr().err.splitlines() == [
        "sparsekern train: warning: no mask update swaps a weight: the largest fraction any update drops, 1e-05 "
        "(--drop-fraction 1e-05), of each layer's active weights rounds down to 0 (--swap-rounding floor)"]


def test_dst_warnings_are_worded_from_the_arguments_they_carry_not_from_their_text(tmp_path, capsys, monkeypatch):
    # The CLI replaced the text "block=(3, 3)", "drop_fraction=1e-05" and "swap_rounding='floor'" in DST's messages:
    # a library that said an argument otherwise (here "drop_fraction := 1e-05") left it in DST's words.
    from sparsekern.algorithms import dst
    monkeypatch.setattr(dst, "as_argument", lambda name, value: f"{name} := {value}")
    assert str(dst.ArgumentWarning("{block} x", {"block": (3, 3)}, {})) == "block := (3, 3) x"
    main(["train", "--method", "set", "--epochs", "3", "--update-every", "5", "--drop-fraction", "0.00001",
          "--swap-rounding", "floor", "--stop-after", "1", "--out", str(tmp_path / "swaps"), "--quiet"])
    assert capsys.readouterr().err.splitlines() == [
        "sparsekern train: warning: no mask update swaps a weight: the largest fraction any update drops, 1e-05 "
        "(--drop-fraction 1e-05), of each layer's active weights rounds down to 0 (--swap-rounding floor)"]
    main(["train", "--method", "rigl", "--epochs", "3", "--update-every", "5", "--block", "3x3", "--stop-after",
          "1", "--out", str(tmp_path / "blocks"), "--quiet"])
    err = capsys.readouterr().err.splitlines()
    assert err and all(line.startswith("sparsekern train: warning: --block 3x3 does not tile layer ") for line in err)


def test_a_drop_fraction_left_to_the_method_is_named_as_the_method_s_schedule_s(tmp_path, capsys):
    # The last layer keeps 3 weights (round(0.001 x 2560)), of which SET's 0.3 swaps floor(0.9) = 0.
    main(["train", "--method", "set", "--density", "0.001", "--distribution", "uniform", "--epochs", "3",
          "--update-every", "5", "--swap-rounding", "floor", "--stop-after", "1", "--out", str(tmp_path), "--quiet"])
    assert capsys.readouterr().err.splitlines() == [
        "sparsekern train: warning: the masks of ['5'] never change: the largest fraction any update drops, 0.3 (the "
        "set schedule's drop fraction 0.3), of each one's active weights rounds down to 0 (--swap-rounding floor)"]


def test_dense_trains_at_density_1_unless_told_a_density(tmp_path, capsys):
    main(["train", "--method", "dense", "--epochs", "1", "--out", str(tmp_path), "--quiet"])   # --density's default
    assert "density 1.0000" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exited:   # given, it would be ignored
        main(["train", "--method", "dense", "--density", "0.5", "--epochs", "1", "--out", str(tmp_path), "--quiet"])
    assert exited.value.code == 2 and "--density applies to the methods static" in capsys.readouterr().err


def test_gradient_flow_is_recorded_at_init_per_epoch_and_around_every_mask_update(tmp_path):
    main(["train", "--method", "rigl", "--density", "0.1", "--epochs", "3", "--update-every", "10", "--out",
          str(tmp_path), "--quiet"])
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    flow = metrics["gradient_flow"]
    assert [{name: row[name] for name in ("step", "epoch", "when", "gradient_flow")} for row in flow] == \
        [{"step": int(row["step"]), "epoch": int(row["epoch"]), "when": row["when"],
          "gradient_flow": float(row["gradient_flow"])} for row in _read_csv(tmp_path / "gradient_flow.csv")]
    assert flow[0]["when"] == "init" and flow[0]["step"] == 0
    assert [row["gradient_flow"] for row in flow if row["when"] == "epoch"] == \
        [epoch["gradient_flow"] for epoch in metrics["epochs"]]
    before = [row for row in flow if row["when"] == "before update"]
    after = [row for row in flow if row["when"] == "after update"]
    steps = math.ceil(1438 / 64) * 3
    assert [row["step"] for row in before] == [row["step"] for row in after] == list(range(10, round(0.75 * steps), 10))
    assert len(before) == sum(epoch["mask_updates"] for epoch in metrics["epochs"])
    assert all(b["gradient_flow"] != a["gradient_flow"] for b, a in zip(before, after))


@pytest.mark.parametrize("method, end_fraction, last_update_epoch", [("set", None, 3), ("set", "0.5", 2),
                                                                     ("mest", None, 3), ("rigl", "1", 4)])
def test_dst_stops_updating_at_its_end_point(tmp_path, method, end_fraction, last_update_epoch):
    options = [] if end_fraction is None else ["--end-fraction", end_fraction]
    main(["train", "--method", method, "--density", "0.2", "--epochs", "4", "--update-every", "5", *options,
          "--out", str(tmp_path), "--quiet"])
    updates = [epoch["mask_updates"] for epoch in json.loads((tmp_path / "metrics.json").read_text())["epochs"]]
    assert updates[last_update_epoch - 1] > 0 and not any(updates[last_update_epoch:])


@pytest.mark.parametrize("init, std", [("sparse", 1 / 8), ("layer-scaled", 1 / 8), ("dense", 1 / (8 * math.sqrt(3)))])
def test_the_dense_baseline_uses_the_stated_init(init, std):
    # first layer: 64 inputs; sparse and layer-scaled are Var 1/fan_in at density 1, dense is torch's default
    run = prepare(TrainConfig(method="dense", init=init, seed=1))
    weight = next(run.model.parameters()).detach()
    assert weight.shape == (256, 64) and float(weight.std()) == pytest.approx(std, rel=0.05)


@pytest.mark.parametrize("method, options, epochs, stop_after", [
    ("rigl", ["--epochs", "3", "--update-every", "10"], 3, 1),  # mask updates before and after the stop
    ("set", ["--epochs", "2", "--update-every", "5", "--scope", "global"], 2, 1),
    ("imp", ["--epochs", "2", "--cycles", "2"], 4, 3),  # stopped mid-cycle, after a pruning
    ("imp", ["--epochs", "1", "--cycles", "3", "--scope", "layer"], 3, 2),
    ("swamp", ["--epochs", "1", "--cycles", "2", "--particles", "2"], 4, 1),  # between particles
    ("optg", ["--epochs", "3"], 3, 2),
])
def test_interrupted_train_resumes_to_the_uninterrupted_result(tmp_path, method, options, epochs, stop_after):
    common = ["train", "--method", method, "--density", "0.2", "--seed", "3", *options, "--quiet"]
    main([*common, "--out", str(tmp_path / "whole")])
    main([*common, "--out", str(tmp_path / "split"), "--stop-after", str(stop_after)])
    stopped = json.loads((tmp_path / "split" / "metrics.json").read_text())["epochs"]
    assert [epoch["epoch"] for epoch in stopped] == list(range(1, stop_after + 1))
    resume = ["--out", str(tmp_path / "split"), "--resume", str(tmp_path / "split" / "checkpoint.pt")]
    with pytest.raises(SystemExit) as exit_info:  # other arguments than the interrupted run's: refused
        main([*common, "--lr", "0.05", *resume])
    assert exit_info.value.code == 2
    main([*common, *resume])

    def metrics(run):
        epochs = json.loads((tmp_path / run / "metrics.json").read_text())["epochs"]
        return [{key: value for key, value in epoch.items() if key != "seconds"} for epoch in epochs]

    assert len(metrics("whole")) == epochs
    assert metrics("split") == metrics("whole")
    flows = [json.loads((tmp_path / run / "metrics.json").read_text())["gradient_flow"] for run in ("whole", "split")]
    assert flows[0] == flows[1] and flows[0][0]["when"] == "init"
    if method in ("rigl", "set"):
        assert sum(epoch["mask_updates"] for epoch in metrics("whole")) > 0
    with open(tmp_path / "split" / "metrics.csv", newline="") as file:
        assert [int(row["epoch"]) for row in csv.DictReader(file)] == list(range(1, epochs + 1))
    whole = checkpoint.load(tmp_path / "whole" / "checkpoint.pt")
    split = checkpoint.load(tmp_path / "split" / "checkpoint.pt")
    assert whole["model"].keys() == split["model"].keys()
    for name, tensor in whole["model"].items():
        assert torch.equal(tensor, split["model"][name]), name
    assert whole["epoch"] == split["epoch"] == epochs


def _optimizer_reversed(optimizer: dict, names: list[str]) -> None:
    """As a model listing its parameters the other way round would have saved it."""
    for group in optimizer["param_groups"]:
        group["params"].reverse()
    optimizer["state"] = dict(reversed(optimizer["state"].items()))


def _optimizer_by_position(optimizer: dict, names: list[str]) -> None:
    """As versions before the names saved it: torch's own state dict, by the parameters' positions."""
    position = {name: index for index, name in enumerate(names)}
    for group in optimizer["param_groups"]:
        group["params"] = [position[name] for name in group["params"]]
    optimizer["state"] = {position[name]: value for name, value in optimizer["state"].items()}


@pytest.mark.parametrize("edit", [_optimizer_reversed, _optimizer_by_position])
def test_a_checkpoint_s_optimizer_state_goes_to_the_parameters_it_was_saved_for(edit, tmp_path):
    # It was saved by parameter position: a checkpoint listing the parameters in another order loaded each momentum
    # into the tensor at its position, of another shape (a traceback at the first step) or of the same (trained on
    # the wrong momentum without a word).
    common = ["train", "--method", "rigl", "--density", "0.2", "--epochs", "2", "--update-every", "10", "--quiet"]
    main([*common, "--out", str(tmp_path / "whole")])
    main([*common, "--out", str(tmp_path / "split"), "--stop-after", "1"])
    path = tmp_path / "split" / "checkpoint.pt"
    saved = checkpoint.load(path)
    edit(saved["recipe"]["optimizer"], [name for name in saved["model"] if not name.endswith(".mask")])
    checkpoint.save(saved, path)
    main([*common, "--out", str(tmp_path / "split"), "--resume", str(path)])
    whole, split = (checkpoint.load(tmp_path / run / "checkpoint.pt") for run in ("whole", "split"))
    assert all(torch.equal(tensor, split["model"][name]) for name, tensor in whole["model"].items())


@pytest.mark.parametrize("method, options", [
    ("set", ["--epochs", "3", "--update-every", "7", "--end-fraction", "1", "--scope", "global"]),  # random growth
    ("swamp", ["--epochs", "1", "--cycles", "2", "--particles", "2"]),
])
def test_a_run_killed_mid_epoch_resumes_from_its_last_checkpoint_to_the_uninterrupted_result(tmp_path, monkeypatch,
                                                                                           method, options):
    # Killed in the middle of epoch 2 (between two mask updates of SET, in SWAMP's second particle): the folder
    # holds epoch 1's files, complete, and nothing else; resumed from them, the run ends as one never killed.
    from sparsekern.cli import recipes

    common = ["train", "--method", method, "--density", "0.2", "--seed", "4", "--batch-size", "128", *options,
              "--quiet"]
    main([*common, "--out", str(tmp_path / "whole")])

    class Killed(BaseException):
        pass

    steps = []
    recipe = recipes.SWAMPRecipe if method == "swamp" else recipes.Recipe
    step = recipe.after_optimizer_step

    def killed_in_epoch_2(self):
        steps.append(None)
        if len(steps) == 17:   # 12 steps an epoch
            raise Killed
        step(self)

    monkeypatch.setattr(recipe, "after_optimizer_step", killed_in_epoch_2)
    with pytest.raises(Killed):
        main([*common, "--out", str(tmp_path / "killed")])
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path / "killed")) == ["checkpoint.pt", "gradient_flow.csv", "metrics.csv",
                                                       "metrics.json"]
    assert checkpoint.load(tmp_path / "killed" / "checkpoint.pt")["epoch"] == 1
    main([*common, "--out", str(tmp_path / "killed"), "--resume", str(tmp_path / "killed" / "checkpoint.pt")])
    runs = [json.loads((tmp_path / run / "metrics.json").read_text()) for run in ("whole", "killed")]
    for run in runs:
        for epoch in run["epochs"]:
            del epoch["seconds"]
    assert runs[0] == runs[1]
    saved = [checkpoint.load(tmp_path / run / "checkpoint.pt") for run in ("whole", "killed")]
    for name, tensor in saved[0]["model"].items():
        assert torch.equal(tensor, saved[1]["model"][name]), name


def test_a_run_resumed_from_a_checkpoint_without_world_size_records_it_in_every_row(tmp_path):
    """Checkpoints written before train ran on several ranks hold epochs without world_size (all trained in
    one process): metrics.csv took its columns from the first row and dropped world_size for the whole run."""
    common = ["train", "--method", "rigl", "--density", "0.2", "--epochs", "2", "--quiet", "--out", str(tmp_path)]
    main([*common, "--stop-after", "1"])
    saved = checkpoint.load(tmp_path / "checkpoint.pt")
    for epoch in saved["history"]:
        del epoch["world_size"]
    checkpoint.save(saved, tmp_path / "checkpoint.pt")
    main([*common, "--resume", str(tmp_path / "checkpoint.pt")])
    assert [row["world_size"] for row in _read_csv(tmp_path / "metrics.csv")] == ["1", "1"]
    epochs = json.loads((tmp_path / "metrics.json").read_text())["epochs"]
    assert [list(epoch) for epoch in epochs] == [list(epochs[1])] * 2


@pytest.mark.parametrize("broken", ["optimizer", "algorithm"])
def test_a_refused_resume_state_leaves_the_recipes_optimizer_as_it_was(broken):
    """A resume checks the optimizer state on an optimizer of its own, and the algorithm's state completely, before
    the run's optimizer changes: a refusal of either leaves it as it was (and a state that fits loads whole)."""
    import copy

    from sparsekern import sparsify
    from sparsekern.cli import recipes
    from sparsekern.cli.models import build_model

    torch.manual_seed(0)
    model = sparsify(build_model("mlp", (1, 8, 8), 10, width=16), 0.3, generator=torch.Generator().manual_seed(0))
    recipe = recipes.make_recipe(TrainConfig(method="rigl", density=0.3, epochs=1, width=16, update_every=2), model,
                                 10)

    def train_step():
        recipe.optimizer.zero_grad()
        model(torch.randn(4, 1, 8, 8)).square().mean().backward()
        recipe.after_backward()
        recipe.optimizer.step()

    train_step()
    saved = copy.deepcopy(recipe.state_dict())
    train_step()   # an update: other masks, other momentum
    before = copy.deepcopy(recipe.optimizer.state_dict())
    assert not torch.equal(before["state"][2]["momentum_buffer"], saved["optimizer"]["state"]["3.weight"][
        "momentum_buffer"])
    state = copy.deepcopy(saved)
    if broken == "optimizer":
        state["optimizer"]["state"]["3.weight"]["momentum_buffer"][0, 0] = float("nan")
    else:
        state["algorithm"]["masks"]["5"] = state["algorithm"]["masks"]["5"][:, :-1]
    with pytest.raises(ValueError):
        recipe.load_state_dict(state)
    after = recipe.optimizer.state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert all(torch.equal(after["state"][key][entry], value) for key, entries in before["state"].items()
               for entry, value in entries.items())
    recipe.load_state_dict(saved)
    loaded = recipe.optimizer.state_dict()
    names = [name for name, _ in model.named_parameters()]
    assert all(torch.equal(entry["momentum_buffer"], saved["optimizer"]["state"][names[index]]["momentum_buffer"])
               for index, entry in loaded["state"].items())


@pytest.mark.parametrize("method, options", [("imp", ["--cycles", "3"]),
                                             ("swamp", ["--cycles", "2", "--particles", "1"])])
def test_tickets_end_at_exactly_round_d_n_weights(method, options, tmp_path):
    # The digits MLP holds 64·256 + 256·256 + 256·10 = 84,480 weights; d = 0.02 targets round(1689.6) = 1690. With
    # p = 1 - 0.02^(1/(cycles-1)) and ⌈p·remaining⌉ removed each time, the last cycle kept 1689 (2 or 3 cycles:
    # ⌈0.98·84480⌉ = 82,791 removed; ⌈0.8586·84480⌉ = 72,533 -> 11,947, then ⌈0.8586·11947⌉ = 10,258
    # -> 1689).
    out = tmp_path / method
    main(["train", "--method", method, "--density", "0.02", "--epochs", "1", *options, "--out", str(out), "--quiet"])
    model = checkpoint.load(out / "checkpoint.pt")["model"]
    masks = [tensor for name, tensor in model.items() if name.endswith(".mask")]
    assert sum(mask.numel() for mask in masks) == 84480
    assert sum(int(mask.sum()) for mask in masks) == 1690


def test_swamp_averages_at_a_constant_rate_while_imp_anneals_to_zero(tmp_path, monkeypatch):
    # SWAMP (Choi et al.): each particle's SWA mean is taken at a constant rate (0.05 after 0.1 in its setup).
    # A rate annealed to 0 over the averaged steps, as IMP's, makes the mean the particle's last point.
    from sparsekern.cli import recipes

    seen = {}

    def record(recipe):
        step = recipe.algorithm.step_in_cycle  # before the algorithm counts the step just taken
        seen.setdefault(type(recipe).__name__, []).append((step, recipe.optimizer.param_groups[0]["lr"]))
        recipe.algorithm.step()

    monkeypatch.setattr(recipes.TicketRecipe, "after_optimizer_step", record)
    for method, options in (("swamp", ["--cycles", "2", "--particles", "2"]), ("imp", ["--cycles", "2"])):
        main(["train", "--method", method, "--density", "0.5", "--epochs", "2", "--lr", "0.1", *options,
              "--out", str(tmp_path / method), "--quiet"])
    swa_start = math.ceil(0.75 * 46)  # digits: 23 steps of 64 per epoch, 2 epochs a segment
    swamp = seen["SWAMPRecipe"]
    assert len(swamp) == 46 + 3 * (46 - 4)  # the first particle from step 0, the others from the rewind step, 4
    averaged = [lr for step, lr in swamp if step >= swa_start]
    annealed = [lr for step, lr in swamp if step < swa_start]
    assert len(averaged) == 4 * (46 - swa_start) and all(lr == pytest.approx(0.05) for lr in averaged)
    assert swamp[0] == (0, pytest.approx(0.1)) and min(annealed) > 0.05
    imp = seen["TicketRecipe"]
    assert imp[-1][0] == 45 and imp[-1][1] < 1e-3


def test_npz_dataset_loads_and_trains(tmp_path, generator):
    x = torch.randint(0, 256, (30, 6, 6), generator=generator).numpy().astype(np.uint8)
    y = torch.randint(0, 3, (30,), generator=generator).numpy()
    y[:3] = [0, 1, 2]
    path = tmp_path / "small.npz"
    np.savez(path, x=x, y=y)
    data = load_dataset(str(path), seed=1)
    assert data.input_shape == (1, 6, 6) and data.num_classes == 3
    assert len(data.train_y) + len(data.test_y) == 30 and len(data.test_y) == 6
    merged = torch.cat([data.train_x, data.test_x]).flatten(1)
    expected = torch.from_numpy(x.reshape(30, -1).astype(np.float32) / x.max())
    # the split is a permutation of the samples, scaled to [0, 1]
    assert sorted(map(tuple, merged.tolist())) == sorted(map(tuple, expected.tolist()))
    again = load_dataset(str(path), seed=1)
    assert torch.equal(again.train_x, data.train_x) and torch.equal(again.test_y, data.test_y)
    main(["train", "--method", "static", "--model", "cnn", "--dataset", str(path), "--epochs", "1",
          "--out", str(tmp_path / "run"), "--quiet"])
    # what train wrote is what its --out was checked for before training (test_bad_inputs.py)
    assert sorted(os.listdir(tmp_path / "run")) == sorted(training.OUTPUT_FILES)


def test_image_folder_dataset_loads(tmp_path, generator):
    from PIL import Image

    pixels = {}
    for name in ("cat", "ant"):  # labels follow sorted names: ant 0, cat 1
        os.makedirs(tmp_path / "images" / name)
        for index in range(4):
            array = torch.randint(0, 256, (5, 7), generator=generator).numpy().astype(np.uint8)
            Image.fromarray(array, mode="L").save(tmp_path / "images" / name / f"{index}.png")
            pixels[array.tobytes()] = 0 if name == "ant" else 1
    (tmp_path / "images" / "notes.txt").write_text("not an image")
    data = load_dataset(str(tmp_path / "images"), seed=0)
    assert data.input_shape == (1, 5, 7) and data.num_classes == 2
    x = torch.cat([data.train_x, data.test_x])
    y = torch.cat([data.train_y, data.test_y])
    assert len(y) == 8
    for image, label in zip(x, y):
        raw = np.rint(image[0].numpy() * 255).astype(np.uint8).tobytes()
        assert pixels[raw] == int(label)


def test_colour_image_folder_gives_three_channels(tmp_path):
    from PIL import Image

    for name, colour in (("red", (255, 0, 0)), ("blue", (0, 0, 255))):
        os.makedirs(tmp_path / name)
        Image.new("RGB", (4, 4), colour).save(tmp_path / name / "a.png")
        Image.new("RGB", (6, 6), colour).save(tmp_path / name / "b.png")  # resized to the first image's size
    data = load_dataset(str(tmp_path), seed=0)
    assert data.input_shape == (3, 4, 4)
    x = torch.cat([data.train_x, data.test_x])
    y = torch.cat([data.train_y, data.test_y])
    for image, label in zip(x, y):  # blue is label 0
        assert math.isclose(float(image[2 if label == 0 else 0].mean()), 1.0)
        assert float(image[0 if label == 0 else 2].max()) == 0.0


def test_every_option_of_train_compare_and_reproduce_says_what_it_does_and_its_default():
    import argparse

    from sparsekern.cli.main import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name in ("train", "compare", "reproduce"):
        parser = commands[name]
        formatter = parser._get_formatter()
        for action in parser._actions:
            if not action.option_strings or action.dest == "help":
                continue
            option = f"sparsekern {name} {action.option_strings[0]}"
            assert action.help, f"{option} has no help"
            if action.default is None or action.default is False:
                continue
            shown = ",".join(map(str, action.default)) if isinstance(action.default, list) else str(action.default)
            expanded = " ".join(formatter._expand_help(action).split())
            assert "default" in expanded and shown in expanded.split("default", 1)[1], (option, expanded)


def test_help_points_users_at_the_readme_not_at_internal_modules(capsys):
    from pathlib import Path

    import sparsekern.cli

    commands = {"train", "compare", "reproduce", "bench"}   # named alike by a module and by a command
    internal = {path.stem for path in Path(sparsekern.cli.__file__).parent.glob("*.py")} - commands
    for command in ([], ["train"], ["compare"], ["reproduce"]):
        with pytest.raises(SystemExit):
            main([*command, "--help"])
        text = capsys.readouterr().out
        assert not [name for name in internal if f"`{name}`" in text], (command, text)


def test_help_counts_cycles_as_they_train(capsys):
    # --cycles was "pruning cycles of --epochs epochs each": a SWAMP cycle trains --particles x --epochs epochs, and
    # the last cycle is not followed by a pruning.
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert ("--cycles CYCLES IMP, SWAMP: training cycles, a pruning between two, the last to --density (IMP: "
            "--epochs epochs each; SWAMP: --particles x --epochs)") in text


@pytest.mark.parametrize("densities", [[0.1], [0.2, 0.05, 0.01]])
def test_the_plot_keeps_room_around_its_densities_so_nudged_lines_stay_beside_them(monkeypatch, densities):
    figures = []
    monkeypatch.setattr(compare_module, "save_figure", lambda figure, path, metadata=None: figures.append(figure))
    rows = [{"label": label, "method": label, "density": density, "accuracy_mean": 0.9, "accuracy_std": 0.01,
             "epochs": 1, "seeds": 2} for label in ("static", "set", "rigl") for density in densities]
    compare_module.plot(rows, "unused.png", TrainConfig(epochs=1))
    axes = figures[0].axes[0]
    left, right = axes.get_xlim()
    assert left > right                                   # sparser to the right
    assert left >= 1.2 * max(densities) and right <= min(densities) / 1.2   # not the nudges' ±2.5% alone


@pytest.mark.parametrize("methods, densities", [
    (["dense", "imp", "gmp"], "imp, gmp pruned over all layers together"),
    (["static", "imp"], "uniform layer densities (imp pruned over all layers together)"),
    (["static", "rigl"], "uniform layer densities"),
    (["dense"], None)])
def test_the_plot_title_names_the_layer_densities_its_lines_share(monkeypatch, methods, densities):
    # The title named --distribution whatever the lines: "uniform" over imp and gmp, which prune all layers together.
    figures = []
    monkeypatch.setattr(compare_module, "save_figure", lambda figure, path, metadata=None: figures.append(figure))
    rows = [{"label": method, "method": method, "density": 1.0 if method == "dense" else 0.1, "accuracy_mean": 0.9,
             "accuracy_std": None, "epochs": 1, "seeds": 1} for method in methods]
    compare_module.plot(rows, "unused.png", TrainConfig(epochs=1, distribution="uniform"))
    title = figures[0].axes[0].get_title().split("\n")
    assert title[0] == "mlp on digits, 1 epoch, init sparse; 1 seed"
    assert title[1:] == ([densities] if densities else [])


@pytest.mark.parametrize("argv, expected", [([], "round"), (["--swap-rounding", "round"], "round"),
                                            (["--swap-rounding", "floor"], "floor"),
                                            (["--swap-rounding", "ceil"], "ceil")])
def test_train_hands_the_swap_rounding_to_dst(argv, expected):
    args = build_parser().parse_args(["train", "--method", "rigl", *argv])
    config = _config(args, method=args.method)
    assert config.swap_rounding == (None if not argv else expected)
    assert prepare(config).recipe.algorithm.swap_rounding == expected


def test_compare_hands_the_swap_rounding_to_its_dst_lines_only():
    args = build_parser().parse_args(["compare", "--methods", "static,rigl,dst", "--swap-rounding", "floor"])
    base = _config(args)
    lines = compare_module.grid_lines(args.methods, ["snip"], "gradient", "cosine")
    configs = {line.method: compare_module.line_config(base, line, 0.1, seed=0) for line in lines}
    assert {method: config.swap_rounding for method, config in configs.items()} == {
        "static": None, "rigl": "floor", "dst": "floor"}


def test_a_run_at_the_default_swap_rounding_keeps_the_key_it_had_before_the_option():
    # Finished runs stored in a compare or reproduce folder are found by this key: an option added later must not
    # make them all train again.
    assert key(TrainConfig()) == "b8b67aca5b27ded4c05e"
    assert key(TrainConfig(method="static")) == "3033dd5ff0330a70aef6"
    assert key(TrainConfig(swap_rounding="floor")) != key(TrainConfig())
    assert key(TrainConfig(method="mest", mest_gamma=0.5)) != key(TrainConfig(method="mest"))


def test_ticket_runs_without_scope_keep_their_keys_and_prune_globally_as_before_the_option():
    # --scope reached DST only: IMP and SWAMP pruned globally (the library's default) under a config holding DST's
    # scope "layer". Their runs stored so must still be found, and a ticket's --scope layer must be another run.
    assert key(TrainConfig(method="imp")) == "f76e9e6e3d086e185e2a"
    assert key(TrainConfig(method="swamp")) == "d1902e9d605388bb4b4e"
    assert key(TrainConfig(method="imp", ticket_scope="layer")) != key(TrainConfig(method="imp"))
    for algorithm in (IMP, SWAMP):
        assert inspect.signature(algorithm).parameters["scope"].default == TICKET_SCOPE == "global"


@pytest.mark.parametrize("method", ["imp", "swamp"])
@pytest.mark.parametrize("argv, scope", [([], "global"), (["--scope", "layer"], "layer"),
                                         (["--scope", "global"], "global")])
def test_train_hands_the_scope_to_imp_and_swamp(method, argv, scope):
    args = build_parser().parse_args(["train", "--method", method, *argv])
    config = _config(args, method=method)
    # DST's scope untouched; the tickets' own scope written out is the run left to it (same key, same checkpoint)
    assert (config.scope, config.ticket_scope) == ("layer", None if scope == "global" else scope)
    assert prepare(config).recipe.algorithm.scope == scope


def test_imp_under_scope_layer_prunes_each_layer_to_its_density_and_resumes_only_with_it(tmp_path, capsys):
    common = ["train", "--method", "imp", "--density", "0.2", "--epochs", "1", "--cycles", "2", "--batch-size",
              "256", "--quiet"]
    main([*common, "--scope", "layer", "--out", str(tmp_path / "layer")])
    main([*common, "--out", str(tmp_path / "global")])
    shapes = {}
    for run in ("layer", "global"):
        state = checkpoint.load(tmp_path / run / "checkpoint.pt")
        shapes[run] = {name: (int(mask.sum()), mask.numel()) for name, mask in state["model"].items()
                       if name.endswith("mask")}
    assert all(active == round(0.2 * size) for active, size in shapes["layer"].values())
    assert any(active != round(0.2 * size) for active, size in shapes["global"].values())   # ranked together
    saved = checkpoint.load(tmp_path / "layer" / "checkpoint.pt")["config"]
    assert (saved["scope"], saved["ticket_scope"]) == ("layer", "layer")
    assert checkpoint.load(tmp_path / "global" / "checkpoint.pt")["config"]["ticket_scope"] is None
    capsys.readouterr()
    for run, other in (("layer", []), ("global", ["--scope", "layer"])):   # a checkpoint of the other scope
        with pytest.raises(SystemExit) as exit_info:
            main([*common, *other, "--resume", str(tmp_path / run / "checkpoint.pt"), "--out", str(tmp_path / run)])
        assert exit_info.value.code == 2
        line, = capsys.readouterr().err.strip().splitlines()
        assert "written with other arguments (ticket_scope" in line, line


def test_compare_hands_the_scope_to_its_ticket_lines_and_its_caption_says_how_they_prune(tmp_path):
    args = build_parser().parse_args(["compare", "--methods", "static,rigl,imp,swamp,gmp", "--scope", "layer"])
    base = _config(args)
    lines = compare_module.grid_lines(args.methods, ["snip"], "gradient", "cosine")
    configs = {line.method: compare_module.line_config(base, line, 0.1, seed=0) for line in lines}
    assert {method: config.ticket_scope for method, config in configs.items()} == {
        "static": None, "rigl": None, "imp": "layer", "swamp": "layer", "gmp": None}
    assert configs["rigl"].scope == "layer"
    assert compare_module.layer_densities(base, args.methods) == \
        "erk layer densities (gmp pruned over all layers together; imp, swamp pruned per layer), "
    assert compare_module.layer_densities(_config(build_parser().parse_args(["compare"])), ["imp", "gmp"]) == \
        "imp, gmp pruned over all layers together, "

    main(["compare", "--methods", "imp", "--scope", "layer", "--densities", "0.2", "--seeds", "1", "--epochs", "1",
          "--cycles", "2", "--batch-size", "256", "--jobs", "1", "--out", str(tmp_path), "--quiet"])
    assert "on digits, imp pruned per layer, init sparse" in (tmp_path / "results.md").read_text()
    record, = [json.loads(path.read_text()) for path in (tmp_path / "runs").glob("*.json")]
    assert record["config"]["ticket_scope"] == "layer"


def test_runs_and_checkpoints_stored_before_the_later_options_are_still_found_and_resume(tmp_path):
    # Their stored configs lack swap_rounding, mest_gamma and sensitivity_offset: the key matched, but the record's
    # config was compared whole, so every stored run of a compare folder trained again, and a checkpoint was
    # refused as "written by a different configuration".
    from sparsekern.cli.training import LATER_OPTIONS

    def drop_later_options(record):
        record["config"] = {name: value for name, value in record["config"].items() if name not in LATER_OPTIONS}

    config = TrainConfig(method="rigl", density=0.3, epochs=2, batch_size=256)
    assert stored_and_run_again(tmp_path, config, drop_later_options)[0] == [False]

    common = ["train", "--method", "rigl", "--density", "0.2", "--epochs", "2", "--quiet", "--out", str(tmp_path)]
    main([*common, "--stop-after", "1"])
    saved = checkpoint.load(tmp_path / "checkpoint.pt")
    saved["config"] = {name: value for name, value in saved["config"].items() if name not in LATER_OPTIONS}
    checkpoint.save(saved, tmp_path / "checkpoint.pt")
    main([*common, "--resume", str(tmp_path / "checkpoint.pt")])
    assert len(json.loads((tmp_path / "metrics.json").read_text())["epochs"]) == 2


def test_gradient_flow_is_recorded_per_layer_and_in_total_around_every_mask_update(tmp_path):
    # The metric is the norm per layer and in total; only the total was logged, so a layer whose gradient flow an
    # update raised could not be told from one it lowered.
    main(["train", "--method", "rigl", "--density", "0.1", "--epochs", "1", "--update-every", "10", "--out",
          str(tmp_path), "--quiet"])
    flow = json.loads((tmp_path / "metrics.json").read_text())["gradient_flow"]
    layers = [name for name, module in prepare(TrainConfig(method="rigl", density=0.1)).model.named_modules()
              if any(parameter.requires_grad for parameter in module.parameters(recurse=False))]
    assert {row["when"] for row in flow} == {"init", "before update", "after update", "epoch"}
    for row in flow:
        assert list(row["layers"]) == layers
        assert row["gradient_flow"] == pytest.approx(math.sqrt(sum(v * v for v in row["layers"].values())), rel=1e-9)
    rows = _read_csv(tmp_path / "gradient_flow.csv")
    assert list(rows[0]) == ["step", "epoch", "when", "gradient_flow", *(f"gradient_flow[{name}]" for name in layers)]
    assert [[float(row[f"gradient_flow[{name}]"]) for name in layers] for row in rows] == \
        [list(row["layers"].values()) for row in flow]
    before = [row for row in flow if row["when"] == "before update"]
    after = [row for row in flow if row["when"] == "after update"]
    sparse = [name for name, _ in sparse_modules(prepare(TrainConfig(method="rigl")).model)]
    assert before and all(b["layers"][name] != a["layers"][name] for b, a in zip(before, after) for name in sparse)


@pytest.mark.parametrize("method, options, updates", [
    ("imp", ["--epochs", "1", "--cycles", "3"], [1, 2]),
    ("swamp", ["--epochs", "1", "--cycles", "2", "--particles", "2"], [2]),
    ("optg", ["--epochs", "3"], [1, 2]),
    ("gmp", ["--epochs", "3"], [1, 2]),
])
def test_masks_changed_between_epochs_get_gradient_flow_just_before_and_after_the_change(tmp_path, method, options,
                                                                                         updates):
    # OptG's next epoch and a ticket's next cycle change the masks at an epoch's end: only the epoch's record was
    # kept, so the flow a pruning left (on a rewound ticket, say) was never measured.
    main(["train", "--method", method, "--density", "0.2", "--batch-size", "256", *options, "--out", str(tmp_path),
          "--quiet"])
    flow = json.loads((tmp_path / "metrics.json").read_text())["gradient_flow"]
    before = [row for row in flow if row["when"] == "before update"]
    after = [row for row in flow if row["when"] == "after update"]
    assert [row["epoch"] for row in before] == [row["epoch"] for row in after] == updates
    epochs = {row["epoch"]: row for row in flow if row["when"] == "epoch"}
    for b, a in zip(before, after):
        assert b["gradient_flow"] == epochs[b["epoch"]]["gradient_flow"] != a["gradient_flow"]
        assert b["step"] == a["step"] == epochs[b["epoch"]]["step"]


@pytest.mark.parametrize("argv, expected", [
    (["--method", "mest"], (1.0, 1e-8)),
    (["--method", "mest", "--mest-gamma", "0.5"], (0.5, 1e-8)),
    (["--method", "dst", "--prune", "mest", "--mest-gamma", "0"], (0.0, 1e-8)),
    (["--method", "dst", "--prune", "rsensitivity", "--sensitivity-offset", "1"], (1.0, 1.0)),
])
def test_train_hands_the_criterion_parameters_to_dst(argv, expected):
    args = build_parser().parse_args(["train", *argv])
    config = _config(args, method=args.method, prune=args.prune)
    algorithm = prepare(config).recipe.algorithm
    assert (algorithm.mest_gamma, algorithm.sensitivity_offset) == expected


@pytest.mark.parametrize("rule", ["set_fw", "set_fixed"])
def test_train_prunes_by_the_fantastic_weights_set_rules(rule):
    args = build_parser().parse_args(["train", "--method", "dst", "--prune", rule, "--grow", "random"])
    config = _config(args, method=args.method, prune=args.prune, grow=args.grow)
    assert (prepare(config).recipe.algorithm.prune, prepare(config).recipe.algorithm.grow) == (rule, "random")


@pytest.mark.parametrize("argv, expected", [([], 0.0), (["--snip-shift", "1e-5"], 1e-5)])
def test_train_hands_the_snip_shift_to_dst(argv, expected):
    args = build_parser().parse_args(["train", "--method", "dst", "--prune", "snip", *argv])
    config = _config(args, method=args.method, prune=args.prune)
    assert prepare(config).recipe.algorithm.snip_shift == expected


def test_compare_hands_the_criterion_parameters_to_the_lines_whose_criterion_reads_them():
    args = build_parser().parse_args(["compare", "--methods", "rigl,mest,dst", "--criteria", "mest,sensitivity,snip",
                                      "--mest-gamma", "0.25", "--sensitivity-offset", "1", "--snip-shift", "1e-5"])
    lines = compare_module.grid_lines(args.methods, args.criteria, "gradient", "cosine")
    configs = [compare_module.line_config(_config(args), line, 0.1, seed=0) for line in lines]
    assert [(config.method, config.prune, config.mest_gamma, config.sensitivity_offset, config.snip_shift)
            for config in configs] == [
        ("rigl", None, None, None, None), ("mest", None, 0.25, None, None), ("dst", "mest", 0.25, None, None),
        ("dst", "sensitivity", None, 1.0, None), ("dst", "snip", None, None, 1e-5)]


@pytest.mark.parametrize("argv, expected", [([], None), (["--block", "2x4"], (2, 4)), (["--block", "1X1"], (1, 1))])
def test_train_hands_the_block_to_dst(argv, expected):
    args = build_parser().parse_args(["train", "--method", "rigl", *argv])
    config = _config(args, method=args.method)
    assert config.block == expected
    assert prepare(config).recipe.algorithm.block == expected


def test_compare_hands_the_block_to_its_dst_lines_only():
    args = build_parser().parse_args(["compare", "--methods", "static,rigl,dst", "--block", "2x2"])
    lines = compare_module.grid_lines(args.methods, ["snip"], "gradient", "cosine")
    configs = {line.method: compare_module.line_config(_config(args), line, 0.1, seed=0) for line in lines}
    assert {method: config.block for method, config in configs.items()} == {"static": None, "rigl": (2, 2),
                                                                             "dst": (2, 2)}
    assert key(configs["static"]) == key(TrainConfig(method="static", density=0.1, epochs=configs["static"].epochs))


def test_a_run_with_blocks_is_found_again_and_its_checkpoint_resumes(tmp_path):
    # A record's config comes back from JSON with the block as a list, the config holds a tuple: compared as they
    # were, every stored run with --block trained again.
    config = TrainConfig(method="rigl", density=0.3, epochs=1, batch_size=256, block=(2, 2))
    assert key(config) != key(TrainConfig(method="rigl", density=0.3, epochs=1, batch_size=256))
    assert stored_and_run_again(tmp_path, config)[0] == [False]

    common = ["train", "--method", "rigl", "--density", "0.2", "--epochs", "2", "--batch-size", "256", "--block",
              "2x2", "--quiet", "--out", str(tmp_path)]
    main([*common, "--stop-after", "1"])
    main([*common, "--resume", str(tmp_path / "checkpoint.pt")])
    assert len(json.loads((tmp_path / "metrics.json").read_text())["epochs"]) == 2


@pytest.mark.parametrize("block", [[2, 2], (2,), (2, 2, 2), (0, 2), (True, 2), (2.0, 2), "2x2"])
def test_a_config_refuses_a_block_that_is_not_two_positive_ints(block):
    # A list would make the frozen config unhashable, and would come back from a checkpoint as it went in.
    with pytest.raises(ValueError, match="block must be None or a tuple of two positive ints"):
        TrainConfig(block=block)


def test_a_stored_run_with_damaged_gradient_flow_records_is_trained_again(tmp_path):
    # reproduce reads a record's flow (claim f: the record at init): a damaged one ended it in a KeyError.
    config = TrainConfig(method="static", density=0.3, epochs=1, batch_size=256)
    trained, records = stored_and_run_again(tmp_path, config, lambda record: record["flow"][0].pop("when"))
    assert trained == [True] and records[key(config)]["flow"][0]["when"] == "init"


def _throughout(metric: str, value, summary: str | None = None):
    """Sets the last epoch's `metric` to `value`, and the record's summary entry to match (damaged_summary's check)."""
    def damage(record):
        record["history"][-1][metric] = value
        record.update({summary: value} if summary else {})
        record["seconds"] = sum(epoch["seconds"] for epoch in record["history"])
    return damage


def _update_records_swapped(record):
    first = next(index for index, entry in enumerate(record["flow"]) if entry["when"] == "before update")
    record["flow"][first:first + 2] = reversed(record["flow"][first:first + 2])


def _without_last_after_update(record):
    last = max(index for index, entry in enumerate(record["flow"]) if entry["when"] == "after update")
    del record["flow"][last]


@pytest.mark.parametrize("damage", [
    _throughout("test_accuracy", float("nan"), "test_accuracy"), _throughout("test_accuracy", 1.5, "test_accuracy"),
    _throughout("density", -1.0, "final_density"), _throughout("test_loss", -0.5, "test_loss"),
    _throughout("seconds", float("inf")), _throughout("mask_updates", -2), _without_last_after_update,
    lambda record: [entry for entry in record["flow"] if entry["when"] == "epoch"][-1].update(gradient_flow=0.5),
    _update_records_swapped, lambda record: record.update(accuracy_mean=0.99),
    lambda record: record["config"].update(seed=False)],
    ids=["NaN accuracy", "accuracy 1.5", "negative density", "negative loss", "infinite seconds",
         "negative mask updates", "an update's after record dropped", "an epoch's flow not its metrics'",
         "an update's records swapped", "a key no record holds", "seed False for 0"])
def test_a_stored_run_with_values_no_run_gives_is_trained_again(tmp_path, damage):
    # Campaign 30: each was taken as stored, its summary made to match: a NaN or 150% accuracy, a negative density
    # or loss, infinite seconds went into the tables; reproduce pairs the updates' flow records in order (one dropped
    # paired the rest across other updates) and finds the epochs' by step; an unknown key became a column of its
    # runs.csv, and a config of False for 0 (equal in Python) was written there as False.
    config = TrainConfig(method="rigl", density=0.3, epochs=2, batch_size=256, update_every=3)
    trained, records = stored_and_run_again(tmp_path, config, damage)
    assert trained == [True]
    record = records[key(config)]
    assert 0 <= record["test_accuracy"] <= 1 and type(record["config"]["seed"]) is int and "accuracy_mean" not in record
    assert training.damaged_records(record["history"], record["flow"], 2) == ""


@pytest.fixture(scope="module")
def rigl_records():
    """(history, flow) of a small RigL run with mask updates."""
    result = training.train(TrainConfig(method="rigl", density=0.3, epochs=2, batch_size=256, update_every=3),
                            progress=False)
    return result.history, result.flow


def _flow_entry(when: str, index: int = 0):
    """The record's `index`-th gradient-flow record taken `when`."""
    return lambda flow: [entry for entry in flow if entry["when"] == when][index]


@pytest.mark.parametrize("damage", [
    lambda flow: _flow_entry("before update")(flow).update(gradient_flow=-0.1),
    lambda flow: _flow_entry("after update")(flow).setdefault("layers", {}).update({"fc": -1.0}),
    lambda flow: flow.append(dict(flow[-1], when="before update")),
    lambda flow: flow.insert(1, dict(flow[0])),
    lambda flow: _flow_entry("after update", 1)(flow).update(step=0)],
    ids=["a negative flow", "a negative layer's flow", "a trailing before update", "a second init",
         "a step going back"])
def test_flow_records_out_of_place_or_negative_are_damaged(rigl_records, damage):
    # Campaign 30's checks of the flow records (stored runs, train --resume): no test failed without each.
    history, flow = rigl_records
    assert training.damaged_records(history, flow, len(history)) == ""
    flow = [dict(entry, layers=dict(entry.get("layers", {}))) for entry in flow]
    damage(flow)
    assert training.damaged_records(history, flow, len(history)) != ""


def test_a_stored_record_nested_too_deep_for_json_or_not_a_file_is_trained_again(tmp_path):
    # Campaign 30: JSON nested too deep raised RecursionError out of compare and reproduce; a FIFO at a record's name
    # blocked them for good (and a link to /dev/zero filled the memory) on reading it.
    import threading

    from sparsekern.cli.runs import Job, RunStore

    config = TrainConfig(method="static", density=0.3, epochs=1, batch_size=256)
    record = tmp_path / f"{key(config)}.json"
    record.write_text("[" * 100_000)
    assert RunStore(str(tmp_path)).get(Job(config)) is None
    record.unlink()
    os.mkfifo(record)
    found = []
    reader = threading.Thread(target=lambda: found.append(RunStore(str(tmp_path)).get(Job(config))), daemon=True)
    reader.start()
    reader.join(timeout=20)
    blocked = reader.is_alive()
    if blocked:   # let the reader go: a writer opening the FIFO ends its wait
        with open(record, "w") as fifo:
            fifo.write("{}")
    assert not blocked and found == [None]


def test_compare_marks_the_best_line_and_gives_gradient_flow_a_spread(tmp_path, capsys):
    # A researcher had to scan every column for the best line, and the gradient-flow grid gave means over seeds
    # with no spread; the progress bar named a criteria line by its method (dst) alone.
    out = tmp_path / "out"
    main(["compare", "--methods", "dense,static,dst", "--criteria", "snip,random", "--densities", "0.3,0.1",
          "--seeds", "2", "--epochs", "1", "--update-every", "5", "--jobs", "1", "--out", str(out)])
    rows = _read_csv(out / "results.csv")
    runs = _read_csv(out / "runs.csv")
    table = (out / "results.md").read_text()
    assert "In bold: the best sparse line at each density" in table
    accuracy_table, flow_table = table.split("Gradient flow")
    cells = {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[4:-1]]
             for line in accuracy_table.strip().splitlines()[-4:]}
    for column, density in enumerate(("0.3", "0.1")):
        sparse = [row for row in rows if row["method"] != "dense" and row["density"] == density]
        top = max(float(row["accuracy_mean"]) for row in sparse)
        best = {row["label"] for row in sparse if float(row["accuracy_mean"]) == top}
        assert {label for label, row in cells.items() if row[column].startswith("**")} == best
    for row in rows:
        flows = [float(run["gradient_flow_mean"]) for run in runs
                 if run["label"] == row["label"] and float(run["density"]) == float(row["density"])]
        assert float(row["gradient_flow_training_std"]) == pytest.approx(statistics.stdev(flows))
        assert (f"| {float(row['gradient_flow_training_mean']):.3g} ± "
                f"{float(row['gradient_flow_training_std']):.2g} |") in flow_table
    assert "snip (+random) at density 0.1, seed 1 finished: test accuracy " in capsys.readouterr().err


def test_a_resumed_train_goes_on_writing_into_the_checkpoint_s_folder(tmp_path, monkeypatch):
    # Without --out, a resumed run wrote its metrics and checkpoints into runs/train, leaving the run's own folder
    # at the epoch it stopped.
    monkeypatch.chdir(tmp_path)
    arguments = ["train", "--method", "static", "--density", "0.3", "--epochs", "2", "--quiet"]
    main([*arguments, "--stop-after", "1", "--out", "run"])
    main([*arguments, "--resume", os.path.join("run", "checkpoint.pt")])
    assert not (tmp_path / "runs").exists()
    assert [row["epoch"] for row in _read_csv(tmp_path / "run" / "metrics.csv")] == ["1", "2"]
    assert training.read_checkpoint(str(tmp_path / "run" / "checkpoint.pt"))["epoch"] == 2


def test_resuming_a_finished_run_says_nothing_was_trained(tmp_path, capsys):
    # It printed "finished" as if it had trained the run again.
    arguments = ["train", "--method", "static", "--density", "0.3", "--epochs", "1", "--quiet", "--out",
                 str(tmp_path / "run")]
    main(arguments)
    assert "nothing trained" not in capsys.readouterr().out
    main([*arguments, "--resume", str(tmp_path / "run" / "checkpoint.pt")])
    assert "static finished (nothing trained: the checkpoint was already at epoch 1)" in capsys.readouterr().out


def test_resuming_a_finished_run_into_another_folder_writes_it_there(tmp_path, capsys):
    # The line said "metrics and checkpoint in OUT" of a folder left empty: only a trained epoch wrote it.
    arguments = ["train", "--method", "static", "--density", "0.3", "--epochs", "2", "--stop-after", "1", "--quiet"]
    main([*arguments, "--out", str(tmp_path / "run")])
    main([*arguments, "--resume", str(tmp_path / "run" / "checkpoint.pt"), "--out", str(tmp_path / "copy")])
    assert f"metrics and checkpoint in {tmp_path / 'copy'}" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / "copy")) == sorted(training.OUTPUT_FILES)
    for name in ("metrics.csv", "gradient_flow.csv"):
        assert (tmp_path / "copy" / name).read_text() == (tmp_path / "run" / name).read_text()
    assert training.read_checkpoint(str(tmp_path / "copy" / "checkpoint.pt"))["epoch"] == 1


_CHOSEN = ", and its next mask is chosen from them"


@pytest.mark.parametrize("argv, chosen", [
    (["train", "--method", "imp", "--cycles", "2", "--epochs", "1"], _CHOSEN),
    (["train", "--method", "gmp", "--epochs", "2"], _CHOSEN),
    (["compare", "--methods", "imp", "--densities", "0.1", "--seeds", "1", "--epochs", "1", "--cycles", "2", "--jobs",
      "1"], _CHOSEN),
    # Campaign 18: the methods that choose no mask from the weights trained on and ended "test loss nan", no warning.
    (["train", "--method", "rigl", "--epochs", "2"], ""), (["train", "--method", "static", "--epochs", "1"], "")],
    ids=lambda value: " ".join(value) if isinstance(value, list) else "")
def test_a_run_diverged_by_a_high_lr_stops_with_one_line_naming_lr(argv, chosen, tmp_path, capsys):
    # A mask chosen from NaN weights ended in the library's traceback: "layer '1' has NaN weights" (IMP), "k=8448 is
    # more than the 0 non-NaN scores available" (GMP).
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--lr", "1e6", "--out", str(tmp_path / "out"), "--quiet"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1, lines
    assert re.fullmatch(r"sparsekern \w+: error: \w+ at density 0.1, seed 0, diverged: after epoch \d the weights of "
                        rf"layer '1' are not finite{chosen}; lower --lr \(it was 1e\+06\)", lines[0]), lines[0]


_HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")


def _finite_check(model, monkeypatch) -> tuple[int, str | None]:
    """(tensor-to-Python conversions, each a host read and a sync on a GPU, of training._check_finite on `model`;
    the message of the Diverged it raised, or None)."""
    reads = []
    with monkeypatch.context() as patch:
        for name in _HOST_READS:
            original = getattr(torch.Tensor, name)
            patch.setattr(torch.Tensor, name,
                          lambda self, *a, _f=original, **k: (reads.append(1), _f(self, *a, **k))[1])
        try:
            training._check_finite(model, TrainConfig(method="static"), 1, False)
        except training.Diverged as error:
            return len(reads), str(error)
    return len(reads), None


def test_the_finite_check_reads_every_parameter_back_at_once_and_names_the_first_diverged_layer(monkeypatch):
    # It read isfinite().all() of each parameter in turn: one host read per parameter, every epoch.
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    assert _finite_check(model, monkeypatch) == (1, None)
    with torch.no_grad():
        model[3].bias[1] = float("inf")
        model[2].weight[0, 0] = float("nan")
    reads, message = _finite_check(model, monkeypatch)
    assert reads == 1 and "the weights of layer '2' are not finite" in message


def test_only_a_density_where_two_sparse_lines_ran_gets_a_best_line():
    # Bold compares lines: at 0.1 rigl ran alone beside the dense baseline, with nothing to beat.
    rows = [{"method": "dense", "density": 1.0, "accuracy_mean": 0.9},
            {"method": "rigl", "density": 0.1, "accuracy_mean": 0.8},
            {"method": "rigl", "density": 0.05, "accuracy_mean": 0.7},
            {"method": "set", "density": 0.05, "accuracy_mean": 0.75}]
    assert compare_module.best_rows(rows) == [rows[3]]


def test_the_caption_says_which_lines_spread_their_density_by_distribution():
    # The caption said "erk layer densities" of every comparison, imp's and gmp's too, which prune all layers together.
    base = TrainConfig(distribution="uniform")
    assert "uniform layer densities (imp, gmp pruned over all layers together), init" in \
        compare_module.caption(base, 1, ["dense", "static", "imp", "gmp"])
    only_pruned = compare_module.caption(base, 1, ["dense", "imp"])
    assert "uniform" not in only_pruned and "on digits, imp pruned over all layers together, init" in only_pruned
    assert "digits, init sparse" in compare_module.caption(base, 1, ["dense"])
    assert "digits, uniform layer densities, init" in compare_module.caption(base, 1, ["static", "rigl"])


def test_the_caption_names_a_dense_baseline_only_beside_other_lines():
    # "(dense baseline too)" said that the dense line shares the init: a comparison without a dense line claimed one.
    base = TrainConfig()
    assert "init sparse (dense baseline too), SGD" in compare_module.caption(base, 2, ["dense", "rigl"])
    assert "init sparse, SGD" in compare_module.caption(base, 2, ["static", "rigl"])
    assert "init sparse, SGD" in compare_module.caption(base, 2, ["dense"])
