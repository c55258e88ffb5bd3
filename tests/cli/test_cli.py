"""End to end: `sparsekern compare` outputs agree with each other, an interrupted `train` resumes to the same
result bit for bit, bad arguments exit 2 with one line, and local datasets load."""
import csv
import json
import math
import os
import statistics
import subprocess
import sys

import numpy as np
import pytest
import torch

from sparsekern import checkpoint
from sparsekern.cli import main
from sparsekern.cli.data import load_dataset



def _read_csv(path):
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def test_compare_outputs_exist_and_agree(tmp_path, capsys):
    out = tmp_path / "compare"
    main(["compare", "--methods", "dense,dst", "--criteria", "snip", "--densities", "0.5,0.1", "--seeds", "2",
          "--epochs", "1", "--update-every", "5", "--out", str(out), "--quiet"])
    runs = _read_csv(out / "runs.csv")
    rows = _read_csv(out / "results.csv")
    table = (out / "results.md").read_text()
    assert capsys.readouterr().out.startswith(table)

    # results.csv is the mean and sample std over seeds of runs.csv
    assert rows and all(int(row["seeds"]) == 2 for row in rows)
    for row in rows:
        mine = [float(run["test_accuracy"]) for run in runs if run["method"] == row["method"]
                and (run["prune"] or "") == row["prune"] and float(run["density"]) == float(row["density"])]
        assert len(mine) == 2
        assert float(row["accuracy_mean"]) == pytest.approx(statistics.fmean(mine), abs=1e-12)
        assert float(row["accuracy_std"]) == pytest.approx(statistics.stdev(mine), abs=1e-12)
    sparse_densities = {float(row["density"]) for row in rows if row["method"] != "dense"}
    assert sparse_densities == {0.5, 0.1}
    assert {row["label"] for row in rows} == {"dense", "snip (+random)"}

    # the Markdown table shows the CSV's numbers (percent, one decimal); dense fills every column
    lines = table.strip().splitlines()
    assert lines[0] == "| method | density 0.5 | density 0.1 |"
    cells = {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]] for line in lines[2:]}
    assert set(cells) == {row["label"] for row in rows}
    for row in rows:
        expected = f"{100 * float(row['accuracy_mean']):.1f} ± {100 * float(row['accuracy_std']):.1f}"
        columns = [0, 1] if row["method"] == "dense" else [[0.5, 0.1].index(float(row["density"]))]
        assert all(cells[row["label"]][column] == expected for column in columns)

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


@pytest.mark.parametrize("method, options, epochs, stop_after", [
    ("rigl", ["--epochs", "3", "--update-every", "10"], 3, 1),  # mask updates before and after the stop
    ("set", ["--epochs", "2", "--update-every", "5", "--scope", "global"], 2, 1),
    ("imp", ["--epochs", "2", "--cycles", "2"], 4, 3),  # stopped mid-cycle, after a pruning
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


@pytest.mark.parametrize("argv", [
    ["train", "--density", "0"],
    ["train", "--density", "1.5"],
    ["train", "--density", "nan"],
    ["train", "--method", "magic"],
    ["train", "--dataset", "/no/such/dataset.npz"],
    ["train", "--dataset", "cifar10"],
    ["train", "--resume", "/no/such/checkpoint.pt"],
    ["train", "--epochs", "0"],
    ["train", "--method", "rigl", "--prune", "biggest"],
    ["train", "--method", "static", "--prune", "snip"],  # a criterion only DST methods take
    ["train", "--method", "imp", "--cycles", "1"],
    ["compare", "--methods", "static,magic"],
    ["compare", "--criteria", "magnitude,nope"],
    ["compare", "--densities", "0.5,2"],
    ["--densities", "-0.1"],  # no subcommand: compare
])
def test_bad_arguments_exit_2_with_one_line_before_training(argv, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--out", str(out)])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert len(captured.err.strip().splitlines()) == 1 and "error" in captured.err
    assert not out.exists()


def test_download_dataset_message_says_how_to_pass_a_local_copy(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--dataset", "mnist"])
    assert "--dataset PATH" in capsys.readouterr().err


def test_installed_command_reports_bad_density_on_one_line():
    done = subprocess.run([sys.executable, "-m", "sparsekern.cli", "train", "--density", "1.01"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["sparsekern train: error: argument --density: density must be in "
                                                "(0, 1], got 1.01"]


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
    assert (tmp_path / "run" / "checkpoint.pt").exists()


def test_npz_without_labels_is_refused(tmp_path, capsys):
    path = tmp_path / "bad.npz"
    np.savez(path, x=np.zeros((4, 2)))
    with pytest.raises(ValueError, match="arrays x and y"):
        load_dataset(str(path))


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
