"""The costs in FLOPs that the command line reports (`sparsekern.cli.costs`): inference MACs per example and their
fraction of dense, and training FLOPs as a fraction of dense as RigL's paper counts them, in train's metrics and
last line and in compare's tables; stored runs without them are still reused, and damaged ones trained again."""
import csv
import json

import pytest
import torch

import sparsekern as sk
from sparsekern import checkpoint
from sparsekern.cli import main
from sparsekern.cli.costs import TrainingCost
from sparsekern.cli.data import load_dataset
from sparsekern.cli.models import build_model
from sparsekern.cli.runs import key
from sparsekern.cli.training import COST_KEYS, TrainConfig, summary_of, train
from sparsekern.nn import sparse_modules

from .stored_runs import stored_and_run_again

SAMPLES = 1438   # digits' training images
BATCH = 256


def _read_csv(path):
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def _batches(samples: int = SAMPLES, batch: int = BATCH) -> list[int]:
    return [min(batch, samples - start) for start in range(0, samples, batch)]


def test_a_run_s_inference_macs_are_sk_flops_of_its_final_model_and_its_active_weights():
    dataset = load_dataset("digits")
    result = train(TrainConfig(method="rigl", density=0.2, epochs=2, update_every=3, batch_size=BATCH),
                   progress=False, dataset=dataset)
    summary = result.summary()
    counted = sk.flops(result.model, dataset.train_x[:1], print_fn=None)
    assert summary["inference_macs"] == counted["sparse_macs"]
    assert summary["inference_flops_fraction"] == counted["ratio"]
    # an MLP applies each weight entry once per example: its MACs are its active weights
    active = sum(int(module.mask.sum()) for _, module in sparse_modules(result.model))
    total = sum(module.weight.numel() for _, module in sparse_modules(result.model))
    assert summary["inference_macs"] == active and summary["inference_flops_fraction"] == pytest.approx(active / total)


# SET and MEST, whose random growth reads no inactive weight's gradient, compute the dense one too, as RigL does: for
# their grown weights' first step at the update (`DST._dense_grad_next`).
@pytest.mark.parametrize("method", ["rigl", "set", "mest"])
def test_dst_s_training_flops_count_a_dense_weight_gradient_on_its_update_steps_only(tmp_path, method):
    main(["train", "--method", method, "--density", "0.2", "--epochs", "2", "--update-every", "3", "--batch-size",
          str(BATCH), "--end-fraction", "1", "--out", str(tmp_path), "--quiet"])
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    model = build_model("mlp", (1, 8, 8), 10)
    dense = sum(module.weight.numel() for module in model if isinstance(module, torch.nn.Linear))
    sparse = metrics["epochs"][0]["inference_macs"]   # DST keeps every layer's count: the same at every step
    assert [epoch["inference_macs"] for epoch in metrics["epochs"]] == [sparse, sparse]
    updates = {record["step"] for record in metrics["gradient_flow"] if record["when"] == "before update"}
    assert updates and len(updates) == sum(epoch["mask_updates"] for epoch in metrics["epochs"])
    batches = _batches()
    for epoch, row in enumerate(metrics["epochs"]):
        steps = range(epoch * len(batches) + 1, (epoch + 1) * len(batches) + 1)
        macs = sum(size * (2 * sparse + (dense if step in updates else sparse)) for step, size in zip(steps, batches))
        assert row["training_flops_fraction"] == pytest.approx(macs / (3 * dense * SAMPLES), rel=1e-12)
    assert sum(row["training_flops_fraction"] for row in metrics["epochs"]) / 2 > sparse / dense
    columns = _read_csv(tmp_path / "metrics.csv")[0]
    assert all(name in columns for name in COST_KEYS)


@pytest.mark.parametrize("method, options, expected", [
    ("static", ["--density", "0.2", "--epochs", "2"], lambda fractions: fractions == [fractions[0]] * 2),
    # the first cycle trains dense, the second at its pruned density, from a rewind point 10% into the cycle
    ("imp", ["--density", "0.2", "--cycles", "2", "--epochs", "2"], lambda fractions: fractions[:2] == [1.0, 1.0]
     and 0.1 < fractions[2] < 0.2 and fractions[3] == pytest.approx(0.2, rel=0.01)),
    ("dense", ["--epochs", "2"], lambda fractions: fractions == [1.0, 1.0]),
])
def test_training_flops_integrate_the_density_each_step_trained_at(tmp_path, method, options, expected):
    main(["train", "--method", method, *options, "--batch-size", str(BATCH), "--out", str(tmp_path), "--quiet"])
    rows = json.loads((tmp_path / "metrics.json").read_text())["epochs"]
    fractions = [row["training_flops_fraction"] for row in rows]
    assert expected(fractions), fractions
    if method == "static":   # 3 f_S at every step: exactly the inference fraction
        assert fractions[0] == rows[0]["inference_flops_fraction"]


def test_the_training_flops_fraction_divides_every_segment_s_steps_by_one_segment_of_dense_training():
    # IMP's 3 cycles of 1 epoch, each at 0.2 of a dense epoch: 0.6 of one dense segment (--epochs), as the papers
    # count a ticket's cost; divided by the 3 epochs of its history it read 0.2.
    history = [{"epoch": epoch, "test_accuracy": 0.5, "test_loss": 1.0, "density": 0.5, "gradient_flow": 1.0,
                "seconds": 1.0, "training_flops_fraction": 0.2} for epoch in (1, 2, 3)]
    assert summary_of(history, "imp", epochs=1)["training_flops_fraction"] == pytest.approx(0.6)


def test_the_training_cost_of_a_convolution_counts_its_positions_and_follows_its_mask():
    torch.manual_seed(0)
    model = build_model("cnn", (1, 8, 8), 10, width=16)
    sk.sparsify(model, 0.3, generator=torch.Generator().manual_seed(0))
    example = torch.randn(1, 1, 8, 8)
    cost = TrainingCost(model, example)
    assert cost.step(5) == 5 * 3 * sk.flops(model, example, print_fn=None)["sparse_macs"]
    assert cost.dense_step(5) == 5 * 3 * sk.flops(model, example, print_fn=None)["dense_macs"]
    conv = model[0]
    conv.mask.fill_(True)   # in place: the cost reads the mask again
    conv.dense_grad = True
    counted = sk.flops(model, example, print_fn=None)
    dense_conv = counted["layers"][0]["dense_macs"]
    assert counted["layers"][0]["sparse_macs"] == dense_conv
    assert cost.step(1) == 3 * counted["sparse_macs"]   # a dense layer's weight gradient is dense anyway
    model[2].dense_grad = True
    second = counted["layers"][1]
    assert cost.step(1) == 3 * counted["sparse_macs"] + second["dense_macs"] - second["sparse_macs"]


def test_compare_tables_show_the_costs_of_each_line(tmp_path, capsys):
    out = tmp_path / "out"
    main(["compare", "--methods", "dense,static,rigl", "--densities", "0.3", "--seeds", "2", "--epochs", "1",
          "--batch-size", str(BATCH), "--update-every", "2", "--jobs", "1", "--out", str(out), "--quiet"])
    runs, rows = _read_csv(out / "runs.csv"), _read_csv(out / "results.csv")
    for run in runs:
        assert all(run[name] for name in COST_KEYS), run
    for row in rows:
        mine = [run for run in runs if run["label"] == row["label"]]
        for name in COST_KEYS:
            assert float(row[f"{name}_mean"]) == pytest.approx(sum(float(run[name]) for run in mine) / len(mine))
    by_label = {row["label"]: row for row in rows}
    assert float(by_label["dense"]["inference_flops_fraction_mean"]) == 1.0
    assert float(by_label["dense"]["training_flops_fraction_mean"]) == 1.0
    assert float(by_label["static"]["inference_flops_fraction_mean"]) == pytest.approx(0.3, rel=0.01)
    # RigL computes dense weight gradients on its update steps: dearer to train than static at one density
    assert float(by_label["rigl"]["training_flops_fraction_mean"]) > float(
        by_label["rigl"]["inference_flops_fraction_mean"])
    costs_table = (out / "results.md").read_text().split("FLOPs as a fraction")[1]
    for row in rows:
        cell = (f"{float(row['inference_flops_fraction_mean']):.3g} / "
                f"{float(row['training_flops_fraction_mean']):.3g}")
        assert f"| {row['label']} |" in costs_table and f"| {cell} |" in costs_table


def _without_costs(record):
    """As a record stored before the costs: none in its summary or in its epochs."""
    for name in COST_KEYS:
        record.pop(name)
        for epoch in record["history"]:
            epoch.pop(name)


def test_a_record_stored_before_the_costs_is_reused_and_its_cells_are_empty(tmp_path, capsys):
    argv = ["compare", "--methods", "dense,static", "--densities", "0.3", "--seeds", "1", "--epochs", "1",
            "--batch-size", str(BATCH), "--jobs", "1", "--out", str(tmp_path), "--quiet"]
    main(argv)
    capsys.readouterr()
    static = next(run for run in _read_csv(tmp_path / "runs.csv") if run["method"] == "static")
    path = tmp_path / "runs" / f"{static['key']}.json"
    record = json.loads(path.read_text())
    _without_costs(record)
    path.write_text(json.dumps(record))
    main(argv)
    assert "(0 trained now" in capsys.readouterr().out
    runs = {run["method"]: run for run in _read_csv(tmp_path / "runs.csv")}
    assert all(runs["static"][name] == "" for name in COST_KEYS) and all(runs["dense"][name] for name in COST_KEYS)
    rows = {row["method"]: row for row in _read_csv(tmp_path / "results.csv")}
    assert all(rows["static"][f"{name}_mean"] == "" for name in COST_KEYS)
    costs_table = (tmp_path / "results.md").read_text().split("FLOPs as a fraction")[1]
    assert "| static | – | 1 | – / – |" in costs_table and "| dense | – | 1 | 1 / 1 |" in costs_table


def _consistently(name, value):
    """Sets every epoch's `name` to `value`, and the summary's to what that history gives (the run is of one epoch),
    so that the value alone can tell the damage."""
    def edit(record):
        for epoch in record["history"]:
            epoch[name] = value
        record[name] = value
    return edit


@pytest.mark.parametrize("edit, trained", [
    (_without_costs, False),
    (lambda record: [record.pop(name) for name in COST_KEYS], False),   # the summary's are optional
    (lambda record: record.update(inference_macs="many"), True),
    (lambda record: record.update(inference_macs=float(record["inference_macs"])), True),
    (lambda record: record.update(inference_flops_fraction=0.5), True),
    (lambda record: record.update(training_flops_fraction=True), True),
    (lambda record: record["history"][0].pop("training_flops_fraction"), True),   # the record's, from no history
    (lambda record: record["history"][0].update(inference_macs="many"), True),
    (_consistently("training_flops_fraction", float("nan")), True),
    (_consistently("training_flops_fraction", 1e300), True),
    (_consistently("inference_flops_fraction", -0.3), True),
    (_consistently("inference_flops_fraction", 1.5), True),
    (_consistently("inference_macs", 1234.0), True),
    (_consistently("inference_macs", -5), True),
    (_consistently("inference_macs", 0), False),   # every weight pruned: no MACs, but a count
], ids=["none anywhere", "none in the summary", "a str", "a float for an int", "another fraction", "a bool",
        "one the history does not give", "a str in the history", "NaN throughout", "huge throughout",
        "negative throughout", "above 1 throughout", "a float for an int throughout", "negative MACs throughout",
        "no MACs throughout"])
def test_a_record_with_a_damaged_cost_is_trained_again(tmp_path, edit, trained):
    config = TrainConfig(method="static", density=0.3, epochs=1, batch_size=BATCH)
    again, records = stored_and_run_again(tmp_path, config, edit)
    record = records[key(config)]
    assert again == [trained]
    if trained:
        assert all(isinstance(record[name], float if "fraction" in name else int) for name in COST_KEYS)


def test_train_says_its_costs_and_a_run_resumed_from_an_older_checkpoint_counts_none_it_cannot(tmp_path, capsys):
    common = ["train", "--method", "static", "--density", "0.3", "--epochs", "2", "--batch-size", str(BATCH),
              "--quiet", "--out", str(tmp_path)]
    main(common)
    whole = capsys.readouterr().out
    fraction = json.loads((tmp_path / "metrics.json").read_text())["epochs"][-1]["inference_flops_fraction"]
    assert f"({fraction:.3g} of dense), training FLOPs {fraction:.3g} of dense;" in whole
    main([*common, "--stop-after", "1"])
    saved = checkpoint.load(tmp_path / "checkpoint.pt")
    for epoch in saved["history"]:   # as a checkpoint of earlier versions holds them
        for name in COST_KEYS:
            del epoch[name]
    checkpoint.save(saved, tmp_path / "checkpoint.pt")
    capsys.readouterr()
    main([*common, "--resume", str(tmp_path / "checkpoint.pt")])
    line = capsys.readouterr().out
    assert f"({fraction:.3g} of dense);" in line and "training FLOPs" not in line
    rows = _read_csv(tmp_path / "metrics.csv")   # the columns of every row, empty where an epoch has none
    assert [row["inference_flops_fraction"] for row in rows] == ["", str(fraction)]
    # a finished run of earlier versions, resumed: nothing trained, and no cost to say (it raised a KeyError)
    saved = checkpoint.load(tmp_path / "checkpoint.pt")
    del saved["history"][-1]["inference_macs"], saved["history"][-1]["inference_flops_fraction"]
    checkpoint.save(saved, tmp_path / "checkpoint.pt")
    main([*common, "--resume", str(tmp_path / "checkpoint.pt")])
    line = capsys.readouterr().out
    assert "nothing trained" in line and "MACs" not in line and "FLOPs" not in line


def test_a_checkpoint_whose_epoch_holds_a_cost_no_run_counts_is_refused_on_resume(tmp_path, capsys):
    # The run went on from it: the summary and train's last line said "training FLOPs nan of dense".
    common = ["train", "--method", "static", "--density", "0.3", "--epochs", "2", "--batch-size", str(BATCH),
              "--quiet", "--out", str(tmp_path)]
    main([*common, "--stop-after", "1"])
    saved = checkpoint.load(tmp_path / "checkpoint.pt")
    saved["history"][0]["training_flops_fraction"] = float("nan")
    checkpoint.save(saved, tmp_path / "checkpoint.pt")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([*common, "--resume", str(tmp_path / "checkpoint.pt")])
    assert exit_info.value.code == 2
    assert "history[0]'s training_flops_fraction is nan, which no run counts" in capsys.readouterr().err
