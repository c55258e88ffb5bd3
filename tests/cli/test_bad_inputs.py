"""Every bad input to the command line gets one line on stderr and exit code 2 before anything trains: bad
arguments, a dataset whose content cannot train (named by file for an image), a damaged or foreign --resume
checkpoint, an unwritable --out, a bad SPARSEKERN_BACKEND. And a killed write leaves no temporary file behind.

BAD_INPUTS lists each input once; most are tried through more than one command (train, compare, reproduce).
"""
import copy
import dataclasses
import importlib
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import numpy as np
import pytest
import torch

from sparsekern import checkpoint
from sparsekern.cli import counts, data_parallel, main, recipes, training
from sparsekern.cli import runs as runs_module

QUICK_COMPARE = ["--methods", "static", "--densities", "0.5", "--seeds", "1", "--epochs", "1", "--jobs", "1"]


def npz(**arrays):
    """A bad .npz dataset: a function of tmp_path returning its path."""

    def make(tmp_path):
        path = tmp_path / "data.npz"
        np.savez(path, **arrays)
        return str(path)

    return make


def raw_file(name, content: bytes):
    def make(tmp_path):
        path = tmp_path / name
        path.write_bytes(content)
        return str(path)

    return make


def images(damage=None, classes=("ant", "cat")):
    """An image folder with one bad file (`damage(path)` spoils ant/bad.png) or too few classes."""

    def make(tmp_path):
        from PIL import Image

        root = tmp_path / "images"
        for name in classes:
            os.makedirs(root / name)
            for index in range(3):
                Image.fromarray(np.full((5, 5), 40 * index, np.uint8), mode="L").save(root / name / f"{index}.png")
        if damage is not None:
            Image.fromarray(np.arange(100, dtype=np.uint8).reshape(10, 10), mode="L").save(root / classes[0] / "bad.png")
            damage(root / classes[0] / "bad.png")
        return str(root)

    return make


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


GOOD_X = np.random.default_rng(0).random((20, 4)).astype(np.float32)
GOOD_Y = np.arange(20) % 2


def with_x(x):
    return npz(x=x, y=GOOD_Y[:len(x)] if len(x) <= 20 else np.arange(len(x)) % 2)


def poisoned(value):
    x = GOOD_X.copy()
    x[7, 2] = value
    return with_x(x)


# (name, dataset factory, words the one-line error must hold)
BAD_DATASETS = [
    ("nan feature", poisoned(np.nan), "(the first is sample 7)"),
    ("inf feature", poisoned(np.inf), "NaN or infinity"),
    ("-inf feature", poisoned(-np.inf), "NaN or infinity"),
    ("feature beyond float32", with_x(np.where(GOOD_X > 0.5, 1e300, 0.0)), "exceed float32's range"),
    ("one class", npz(x=GOOD_X, y=np.zeros(20, np.int64)), "every label is 0"),
    ("huge label", npz(x=GOOD_X, y=np.where(GOOD_Y == 1, 10 ** 9, 0)), "label 1000000000 is out of range"),
    ("uint64 label", npz(x=GOOD_X, y=np.where(GOOD_Y == 1, np.uint64(2 ** 64 - 1), np.uint64(0))), "out of range"),
    ("negative label", npz(x=GOOD_X, y=GOOD_Y - 1), "label -1 is out of range"),
    ("float labels", npz(x=GOOD_X, y=GOOD_Y.astype(np.float64)), "integer class indices"),
    ("one-hot labels", npz(x=GOOD_X, y=np.eye(2, dtype=np.int64)[GOOD_Y]), "one integer label per sample"),
    ("scalar labels", npz(x=GOOD_X, y=np.int64(3)), "one integer label per sample"),
    ("length mismatch", npz(x=GOOD_X, y=GOOD_Y[:15]), "x has 20 samples but y has 15"),
    ("missing y", npz(x=GOOD_X), "must hold arrays x and y"),
    ("one sample", npz(x=GOOD_X[:1], y=GOOD_Y[:1]), "at least 2 samples"),
    ("1-d features", npz(x=GOOD_X[:, 0], y=GOOD_Y), "at least one feature"),
    ("no features", npz(x=GOOD_X[:, :0], y=GOOD_Y), "at least one feature"),
    ("string features", npz(x=np.array([["a"] * 4] * 20), y=GOOD_Y), "real numbers"),
    ("complex features", npz(x=GOOD_X.astype(np.complex64), y=GOOD_Y), "real numbers"),
    ("pickled objects", npz(x=np.array([{"a": 1}] * 20, dtype=object), y=GOOD_Y), "cannot be read"),
    ("not a zip", raw_file("data.npz", b"this is not an npz\n" * 10), "cannot be read"),
    ("empty file", raw_file("data.npz", b""), "cannot be read"),
    ("corrupt image", images(lambda path: path.write_bytes(os.urandom(200))), "bad.png"),
    ("truncated image", images(truncate), "bad.png"),
    ("empty image", images(lambda path: path.write_bytes(b"")), "bad.png"),
    ("one image class", images(classes=("ant",)), "every label is 0"),
    ("no images", lambda tmp_path: (os.makedirs(tmp_path / "empty" / "ant"), str(tmp_path / "empty"))[1],
     "holds no images"),
]


def trained_checkpoint(tmp_path):
    out = tmp_path / "run"
    main(["train", "--method", "static", "--epochs", "1", "--density", "0.3", "--out", str(out), "--quiet"])
    return out / "checkpoint.pt"


def edited_checkpoint(edit):
    def make(tmp_path):
        path = trained_checkpoint(tmp_path)
        state = checkpoint.load(path)
        edit(state)
        checkpoint.save(state, path)
        return str(path)

    return make


def rename_a_parameter_of_the_optimizer(state):
    """The optimizer state of a model whose first parameter had another name."""
    optimizer = state["recipe"]["optimizer"]
    params = optimizer["param_groups"][0]["params"]
    old, params[0] = params[0], f"renamed.{params[0]}"
    if old in optimizer["state"]:
        optimizer["state"][params[0]] = optimizer["state"].pop(old)


def drop_a_parameter_of_the_optimizer(state):
    """The optimizer state of a parameter set without the last parameter (another method's, another model's)."""
    optimizer = state["recipe"]["optimizer"]
    optimizer["state"].pop(optimizer["param_groups"][0]["params"].pop(), None)


def shrink_first_weight(state):
    name = next(iter(state["model"]))
    state["model"][name] = state["model"][name][:3]


def state_of_first_parameter(value):
    def edit(state):
        state["recipe"]["optimizer"]["state"]["1.weight"] = value
    return edit


def by_position_with_a_stranger(state):
    """An earlier version's optimizer state (by position), holding the state of a position no group lists."""
    optimizer = state["recipe"]["optimizer"]
    names = optimizer["param_groups"][0]["params"]
    optimizer["state"] = {len(names) + 5: entry for entry in optimizer["state"].values()}
    optimizer["param_groups"][0]["params"] = list(range(len(names)))


def complex_momentum(state):
    entry = state["recipe"]["optimizer"]["state"]["1.weight"]
    entry["momentum_buffer"] = entry["momentum_buffer"].to(torch.complex64)


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def pickled(obj):
    def make(tmp_path):
        path = tmp_path / "evil.pt"
        path.write_bytes(pickle.dumps(obj))
        return str(path)

    return make


def torch_file(obj):
    def make(tmp_path):
        path = tmp_path / "other.pt"
        torch.save(obj, path)
        return str(path)

    return make


# Resume checkpoints for `train --method static --epochs 1 --density 0.3`: (name, factory, words)
BAD_CHECKPOINTS = [
    ("garbage bytes", raw_file("ckpt.pt", os.urandom(300)), "cannot be read"),
    ("empty file", raw_file("ckpt.pt", b""), "cannot be read"),
    ("truncated checkpoint", lambda tmp_path: (truncate(trained_checkpoint(tmp_path)),
                                               str(tmp_path / "run" / "checkpoint.pt"))[1], "cannot be read"),
    ("a folder", lambda tmp_path: str(tmp_path), "is not a file"),
    ("a tensor", torch_file(torch.zeros(3)), "not a checkpoint of sparsekern train"),
    ("a dict of the wrong keys", torch_file({"model": {}, "epoch": 1}), "lacks config"),
    ("a pickled program", pickled(Evil()), "objects other than tensors"),
    ("other arguments", edited_checkpoint(lambda state: state["config"].update(lr=0.5)), "other arguments"),
    ("wrong weight shape", edited_checkpoint(shrink_first_weight), "does not fit this run"),
    ("epoch beyond the run", edited_checkpoint(lambda state: state.update(epoch=99)), "inconsistent"),
    ("history of another length", edited_checkpoint(lambda state: state.update(history=[])), "inconsistent"),
    ("bad rng state", edited_checkpoint(lambda state: state.update(rng=torch.zeros(3))), "does not fit this run"),
    # The optimizer state was saved by parameter position, and loaded into whichever parameters held those positions.
    ("optimizer state of a parameter renamed", edited_checkpoint(rename_a_parameter_of_the_optimizer),
     "does not fit this run: its optimizer state holds the parameters ['renamed.1.weight', "),
    ("optimizer state without a parameter", edited_checkpoint(drop_a_parameter_of_the_optimizer),
     "does not fit this run: its optimizer state holds the parameters ['1.weight', "),
    # Campaign 14: the metrics and gradient-flow records were taken as they came, and the first epoch trained on
    # them ended in a traceback (AttributeError, KeyError) when the metrics files were written, or wrote the damage
    # into gradient_flow.csv.
    ("epoch as a bool", edited_checkpoint(lambda state: state.update(epoch=True)), "inconsistent"),
    ("history row not a dict", edited_checkpoint(lambda state: state.update(history=["x"])), "history[0] is not"),
    ("history row without its metrics", edited_checkpoint(lambda state: state.update(history=[{}])), "history[0]"),
    ("gradient flow records None", edited_checkpoint(lambda state: state.update(gradient_flow=None)), "not a list"),
    ("gradient flow records a dict", edited_checkpoint(lambda state: state.update(gradient_flow={})), "not a list"),
    ("gradient flow records of numbers", edited_checkpoint(lambda state: state.update(gradient_flow=[1, 2])),
     "gradient-flow record 0 is damaged"),
    ("gradient flow records lost", edited_checkpoint(lambda state: state.update(gradient_flow=[])),
     "not those of step 0 and epochs 1 to 1"),
    ("gradient flow record without its moment", edited_checkpoint(lambda state: state["gradient_flow"][0].pop("when")),
     "gradient-flow record 0 is damaged"),
    ("gradient flow record of another moment",
     edited_checkpoint(lambda state: state["gradient_flow"][0].update(when="later")), "record 0 is damaged"),
    ("gradient flow record's layers not a dict",
     edited_checkpoint(lambda state: state["gradient_flow"][-1].update(layers="x")), "is damaged"),
    ("gradient flow record's value a string",
     edited_checkpoint(lambda state: state["gradient_flow"][-1].update(gradient_flow="x")), "is damaged"),
    ("gradient flow record of an epoch dropped", edited_checkpoint(lambda state: state["gradient_flow"].pop()),
     "not those of step 0 and epochs 1 to 1"),
    # Campaign 20: a parameter's state that is no dict ended in a traceback (AttributeError); the state of a position
    # no group lists (an earlier version's checkpoint, by position) loaded, and the next save ended in KeyError; a
    # complex momentum loaded without its imaginary part; torch's error for a weight missing from the model's state
    # reached the line as its first line, naming nothing; a recipe state without the optimizer's said "'optimizer'".
    ("optimizer state of a parameter not a dict", edited_checkpoint(state_of_first_parameter([1, 2])),
     "does not fit this run: its optimizer state['state']['1.weight'] must be a dict of the parameter's state"),
    ("optimizer state by position holding a stranger", edited_checkpoint(by_position_with_a_stranger),
     "does not fit this run: its optimizer state holds the state of [11], which are not its parameters"),
    ("complex momentum", edited_checkpoint(complex_momentum),
     "its optimizer state['state']['1.weight']['momentum_buffer'] must be a floating-point tensor, got "
     "torch.complex64"),
    ("model state without a weight", edited_checkpoint(lambda state: state["model"].pop("1.weight")),
     'does not fit this run: its model state: Error(s) in loading state_dict for Sequential: Missing key(s) in '
     'state_dict: "1.weight".'),
    ("recipe state without the optimizer's", edited_checkpoint(lambda state: state["recipe"].pop("optimizer")),
     "does not fit this run: its recipe state must be a dict holding ['optimizer'], got []"),
    ("recipe state a list", edited_checkpoint(lambda state: state.update(recipe=[])),
     "its recipe state must be a dict holding ['optimizer'], got list"),
    # Campaign 21: a metric or counter of another type than a number passed the checks of the history and the
    # gradient-flow records: a tensor of two entries failed their comparison (RuntimeError traceback), a 0-d one the
    # metrics files' JSON after the next epoch (TypeError traceback), and a str was written into them.
    ("history epoch a tensor of two entries", edited_checkpoint(lambda state: state["history"][0].update(
        epoch=torch.tensor([1, 1]))), "history[0] is not the metrics of epoch 1"),
    ("history epoch a 0-d tensor", edited_checkpoint(lambda state: state["history"][0].update(epoch=torch.tensor(1))),
     "history[0] is not the metrics of epoch 1"),
    ("history accuracy a tensor", edited_checkpoint(lambda state: state["history"][0].update(
        test_accuracy=torch.tensor(0.5))), "history[0] is not the metrics of epoch 1"),
    ("history loss a string", edited_checkpoint(lambda state: state["history"][0].update(train_loss="x")),
     "history[0] is not the metrics of epoch 1"),
    ("gradient flow record's epoch a tensor of two entries", edited_checkpoint(
        lambda state: state["gradient_flow"][-1].update(epoch=torch.tensor([1, 1]))),
     "gradient-flow record 1 is damaged"),
    ("gradient flow record's step a string",
     edited_checkpoint(lambda state: state["gradient_flow"][0].update(step="x")), "gradient-flow record 0 is damaged"),
    # Campaign 21: the config's values are compared with the run's options: a tensor of two entries failed the
    # comparison (RuntimeError traceback), a 0-d one passed it.
    ("config value a tensor of two entries", edited_checkpoint(lambda state: state["config"].update(
        lr=torch.tensor([0.1, 0.1]))), "is damaged: its config holds a Tensor for 'lr', where train's options are"),
    ("config value a 0-d tensor", edited_checkpoint(lambda state: state["config"].update(density=torch.tensor(0.3))),
     "is damaged: its config holds a Tensor for 'density'"),
]


def out_is_file(tmp_path):
    path = tmp_path / "taken"
    path.write_text("a file")
    return str(path)


def out_under_file(tmp_path):
    return os.path.join(out_is_file(tmp_path), "sub")


def out_read_only(tmp_path):
    path = tmp_path / "locked"
    path.mkdir()
    path.chmod(0o500)
    probe = path / "probe"
    try:
        probe.write_text("")
    except OSError:
        return str(path)
    probe.unlink()
    pytest.skip("this user can write to a read-only folder (root)")


BAD_OUTPUTS = [
    ("an existing file", out_is_file, "is a file, not a folder"),
    ("under a file", out_under_file, "is not a writable folder"),
    ("in /proc", lambda tmp_path: "/proc/sparsekern-out", "is not a writable folder"),
    ("a read-only folder", out_read_only, "is not a writable folder"),
    # said only "embedded null byte", naming no argument
    ("a path with a NUL byte", lambda tmp_path: str(tmp_path / "a\0b"), "--out '"),
]

# Triton on CPU tensors needs its interpreter, which these tests otherwise switch on. (A backend that does
# not implement an op at all, such as `compiled` for masked_linear, hands it on and is not an error.)
BAD_BACKENDS = [("bogus", "SPARSEKERN_BACKEND must be one of"), ("tensorflow", "SPARSEKERN_BACKEND must be one of"),
                ("triton", "cannot run masked_linear on cpu: CPU tensors need TRITON_INTERPRET=1")]

BAD_ARGUMENTS = [
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
    ["train", "--lr", "inf"],
    ["train", "--lr", "nan"],
    ["train", "--lr", "-0.1"],
    ["train", "--lr", "0"],
    ["train", "--end-fraction", "0"],
    ["train", "--end-fraction", "1.5"],
    ["train", "--end-fraction", "nan"],
    ["train", "--end-fraction", "three quarters"],
    ["train", "--method", "static", "--end-fraction", "0.5"],  # an end point only DST methods take
    ["train", "--drop-fraction", "0"],
    ["train", "--drop-fraction", "2"],
    ["train", "--init", "orthogonal"],
    ["train", "--method", "optg", "--density", "1"],
    ["train", "--model", "cnn", "--dataset", "FEATURES"],  # a CNN needs images, this .npz holds feature vectors
    ["compare", "--methods", "static,magic"],
    ["compare", "--criteria", "magnitude,nope"],
    ["compare", "--densities", "0.5,2"],
    ["compare", "--densities", ","],
    ["compare", "--schedule", "linear"],
    ["compare", "--jobs", "0"],
    ["compare", "--seeds", "0"],
    ["compare", "--lr", "inf"],
    ["compare", "--model", "cnn", "--dataset", "FEATURES"],
    ["--densities", "-0.1"],  # no subcommand: compare
    ["reproduce", "--jobs", "0"],
    ["reproduce", "--seeds", "3"],  # reproduce has no --seeds
    # Second campaign: a seed that is fixed where -1 means "random" elsewhere, and options given explicitly to
    # methods that never read them (they were silently ignored).
    ["train", "--seed", "-1"],
    ["train", "--method", "rigl", "--cycles", "3"],
    ["train", "--method", "imp", "--particles", "3"],
    ["train", "--method", "static", "--scope", "global"],
    ["train", "--method", "optg", "--scope", "layer"],   # OptG ranks all layers together: it has no scope
    ["compare", "--methods", "static,gmp", "--scope", "layer"],
    ["train", "--method", "imp", "--scope", "Layer"],
    ["train", "--method", "imp", "--scope", "layer", "--density", "0.0001"],   # empties the last layer only
    ["compare", "--methods", "rigl,swamp", "--scope", "layer", "--densities", "0.2,0.0001"],
    ["train", "--method", "swamp", "--update-every", "7"],
    ["compare", "--methods", "rigl", "--criteria", "snip"],
    ["compare", "--methods", "static,rigl", "--grow", "random"],
    ["compare", "--methods", "set", "--schedule", "annealed"],
    ["compare", "--methods", "static,rigl", "--cycles", "3"],
    ["compare", "--methods", "imp", "--particles", "3"],
    ["compare", "--methods", "static", "--end-fraction", "0.5"],
    ["train", "--swap-rounding", "up"],
    ["train", "--method", "static", "--swap-rounding", "floor"],  # a rounding only DST methods take
    ["compare", "--swap-rounding", "Floor"],
    ["compare", "--methods", "static,imp", "--swap-rounding", "floor"],
    ["train", "--method", "mest", "--mest-gamma", "-1"],
    ["train", "--method", "mest", "--mest-gamma", "nan"],
    ["train", "--method", "mest", "--mest-gamma", "inf"],
    ["train", "--method", "rigl", "--mest-gamma", "0.5"],  # RigL prunes by magnitude: γ would be ignored
    ["train", "--method", "dst", "--prune", "sensitivity", "--sensitivity-offset", "0"],
    ["train", "--method", "dst", "--prune", "sensitivity", "--sensitivity-offset", "inf"],
    ["train", "--method", "dst", "--prune", "snip", "--sensitivity-offset", "1"],
    ["train", "--method", "dst", "--prune", "snip", "--snip-shift", "-1e-5"],
    ["train", "--method", "dst", "--prune", "snip", "--snip-shift", "nan"],
    ["train", "--method", "dst", "--prune", "snip", "--snip-shift", "inf"],
    ["train", "--method", "dst", "--prune", "sensitivity", "--snip-shift", "1e-5"],
    ["train", "--method", "static", "--snip-shift", "1e-5"],
    ["compare", "--methods", "dst", "--criteria", "magnitude,mest", "--snip-shift", "1e-5"],
    ["train", "--method", "static", "--mest-gamma", "1"],
    ["compare", "--methods", "rigl,mest", "--sensitivity-offset", "1"],
    ["compare", "--methods", "dst", "--criteria", "magnitude,snip", "--mest-gamma", "0.5"],
    ["train", "--block", "0x2"],
    ["train", "--block", "2x"],
    ["train", "--block", "2x2x2"],
    ["train", "--block", "2,2"],
    ["train", "--block", "-1x2"],
    ["train", "--block", "2.5x2"],
    ["train", "--block", ""],
    ["train", "--method", "set", "--block", "2x2"],  # SET's score is a rank, not a per-weight quantity
    ["train", "--method", "dst", "--prune", "set_fw", "--block", "2x2"],   # nor are the Fantastic Weights SETs'
    ["train", "--method", "imp", "--block", "2x2"],
    ["train", "--method", "rigl", "--block", "100x100"],  # a block larger than a layer keeps
    ["compare", "--methods", "static,set,rigl", "--block", "2x2"],
    ["compare", "--methods", "static", "--block", "2x2"],
    ["compare", "--methods", "rigl", "--densities", "0.5,0.01", "--block", "24x24"],  # too large at 0.01 only
    ["train", "--method", "dense", "--density", "0.5"],  # dense trained at density 1, silently
    ["compare", "--methods", "dense", "--densities", "0.5"],
]

# (argv, words the one-line error must hold): inputs whose refusal used to say too little.
WORDED_ARGUMENTS = [
    (["train", "--seed", str(2 ** 70)], "argument --seed: seed must be in [0, 4294967295]"),
    (["train", "--threads", "5000"], "argument --threads: threads must be at most 1024"),
    (["train", "--method", "static", "--scope", "global"], "--scope applies to the methods set, rigl, mest, dst"),
    (["train", "--method", "gmp", "--scope", "global"],
     "--scope applies to the methods set, rigl, mest, dst, imp, swamp, not 'gmp'"),
    # A layer pruned to no weight: IMP refused it in its own words (density=...) at the last pruning, after every
    # cycle but the last had trained.
    (["train", "--method", "imp", "--scope", "layer", "--density", "0.0001"],
     "--density 0.0001 under --scope layer leaves layer '5' (2560 weights) with no weight: imp would prune it "
     "whole; raise --density to at least 0.0004, or prune all layers together (--scope global)"),
    (["compare", "--methods", "swamp", "--scope", "layer", "--densities", "0.2,0.0001"],
     "--densities 0.0001 under --scope layer leaves layer '5' (2560 weights) with no weight: swamp"),
    (["compare", "--methods", "rigl", "--criteria", "snip"], "--criteria applies to the criteria lines"),
    (["train", "--swap-rounding", "up"], "argument --swap-rounding: invalid choice: 'up'"),
    (["train", "--method", "imp", "--swap-rounding", "floor"], "--swap-rounding applies to the methods set, rigl"),
    (["train", "--method", "rigl", "--mest-gamma", "0.5"], "--mest-gamma applies to runs pruning by mest"),
    (["compare", "--methods", "rigl,mest", "--sensitivity-offset", "1"],
     "--sensitivity-offset applies to runs pruning by sensitivity, rsensitivity"),
    (["train", "--method", "mest", "--mest-gamma", "-1"],
     "argument --mest-gamma: mest gamma must be in [0, 3.40282e+38]"),
    (["train", "--method", "rigl", "--snip-shift", "1e-5"],
     "--snip-shift applies to runs pruning by snip, not magnitude"),
    (["train", "--method", "dst", "--prune", "snip", "--snip-shift", "-1"],
     "argument --snip-shift: snip shift must be in [0, 3.40282e+38]"),
    (["train", "--block", "4x0"], "argument --block: block must be two positive integers BHxBW, such as 4x4"),
    (["compare", "--methods", "set,rigl", "--block", "2x2"],
     "--block applies to runs pruning by a criterion that scores each weight, not set"),
    # set_fw was refused as "a rank over the layer", which is set's reason, not a threshold rule's.
    (["train", "--method", "dst", "--prune", "set_fw", "--block", "2x2"],
     "not set_fw (a threshold rule: it decides how many it drops)"),
    (["train", "--method", "rigl", "--block", "100x100"], "--block 100x100 is too large at --density 0.1"),
    # One epoch of OptG ended dense whatever --density asked (its only epoch's scores all tie at 0).
    (["train", "--method", "optg", "--density", "0.1", "--epochs", "1"], "epochs must be >= 2 for optg, got 1"),
    (["compare", "--methods", "optg,static", "--densities", "0.1", "--epochs", "1"], "epochs must be >= 2 for optg"),
    (["train", "--method", "dense", "--density", "0.5"],
     "--density applies to the methods static, set, rigl, mest, dst, imp, swamp, optg, gmp, not 'dense'"),
    (["compare", "--methods", "dense", "--densities", "0.5"], "--densities applies to the methods static,"),
    # Campaign 19: the library's refusals reached the command line in its argument names, with remedies the command
    # line lacks ("density=0.0001 ... under distribution='uniform': raise density or exclude those layers").
    (["train", "--density", "0.0001", "--distribution", "uniform"],
     "--density 0.0001 under --distribution uniform leaves layer '5' (2560 weights) with no weight: raise --density, "
     "or --distribution erk"),
    (["train", "--method", "static", "--density", "0.00001"], "--density 1e-05 under --distribution erk leaves layers"),
    (["compare", "--methods", "static,rigl", "--densities", "0.5,0.0001", "--distribution", "uniform"],
     "--densities 0.0001 under --distribution uniform leaves layer '5'"),
    (["compare", "--methods", "rigl", "--densities", "0.5,0.01", "--block", "24x24"],
     "--block 24x24 is too large at --densities 0.01"),
    (["train", "--method", "imp", "--density", "0.000001"], "--density 1e-06 keeps no weight of the model's 84480"),
    (["train", "--method", "optg", "--density", "0.000001"], "optg would prune them all; raise --density to at least"),
    (["compare", "--methods", "gmp", "--densities", "0.000001"], "--densities 1e-06 keeps no weight"),
    (["train", "--method", "imp", "--density", "1"], "imp prunes to its density, which must be below 1"),
    (["train", "--method", "swamp", "--cycles", "1"], "--cycles must be >= 2 for swamp"),
    # --stop-after beyond the run's end stopped nothing, silently (IMP trains --epochs x --cycles epochs)
    (["train", "--method", "imp", "--epochs", "2", "--cycles", "2", "--stop-after", "5"],
     "--stop-after 5 is past the run's last epoch, 4"),
    # --distribution spreads the density of runs that start sparse; imp and the others ignored it silently
    (["train", "--method", "imp", "--distribution", "uniform"], "--distribution applies to the methods static, set"),
    (["compare", "--methods", "dense,optg", "--distribution", "uniform"], "--distribution applies to the methods"),
    # a SWAMP cycle of under 4 steps averages no step: SWAMP's RuntimeError (swa_start=1) ended in a traceback
    (["train", "--method", "swamp", "--batch-size", "500", "--epochs", "1"],
     "--epochs 1 of 3 steps (--batch-size 500 of 1438 training samples) leave none: raise --epochs or lower"),
    (["compare", "--methods", "imp,swamp", "--densities", "0.1", "--batch-size", "5000", "--epochs", "1"],
     "swamp averages each particle over the steps after the first 75% of its cycle"),
    # Campaign 18: the criteria's parameters above float32's largest number were refused by the library, naming its
    # argument (snip_shift must be a finite number >= 0 and <= 3.403e+38 ...).
    (["train", "--method", "dst", "--prune", "snip", "--snip-shift", "1e39"],
     "argument --snip-shift: snip shift must be in [0, 3.40282e+38], got 1e39"),
    (["train", "--method", "mest", "--mest-gamma", "1e39"],
     "argument --mest-gamma: mest gamma must be in [0, 3.40282e+38]"),
    (["train", "--method", "dst", "--prune", "sensitivity", "--sensitivity-offset", "1e39"],
     "argument --sensitivity-offset: sensitivity offset must be in (0, 3.40282e+38]"),
    (["compare", "--methods", "dst", "--criteria", "snip", "--snip-shift", "1e300"], "argument --snip-shift"),
    # an lr beyond float32 ended in SGD's traceback, "value cannot be converted to type float without overflow"
    (["train", "--lr", "1e308"], "argument --lr: lr must be in (0, 3.40282e+38], got 1e308"),
    (["compare", "--lr", "1e39"], "argument --lr: lr must be in (0, 3.40282e+38]"),
    # two densities that the tables show alike (0.5) trained as two lines' columns of one name
    (["compare", "--methods", "static", "--densities", "0.5,0.5000000001"],
     "argument --densities: densities 0.5, 0.5000000001 read alike in the results (0.5): give distinct densities"),
    # Campaign 20: a run of absurdly many epochs started training, for ever (compare capped its grid's runs only).
    (["train", "--epochs", "100000000000000000000"],
     "rigl runs of 100000000000000000000 epochs are more than 100000: lower --epochs"),
    (["compare", "--methods", "static,imp", "--epochs", "25001"],
     "imp runs of 100004 epochs (--epochs x --cycles) are more than 100000"),
    (["train", "--method", "imp", "--epochs", "2", "--cycles", "50001"],
     "imp runs of 100002 epochs (--epochs x --cycles) are more than 100000: lower --epochs or --cycles"),
    (["train", "--method", "swamp", "--particles", "100000000000"],
     "swamp runs of 8000000000000 epochs (--epochs x --cycles x --particles) are more than 100000: lower --epochs, "
     "--cycles or --particles"),
    # and train's DST options given with another method were refused in the library's words ("prune applies to")
    (["train", "--method", "imp", "--prune", "set_fw"],
     "--prune applies to the methods set, rigl, mest, dst, not 'imp'"),
    (["train", "--method", "static", "--grow", "random"], "--grow applies to the methods set, rigl, mest, dst"),
    (["train", "--method", "swamp", "--schedule", "annealed"], "--schedule applies to the methods set, rigl, mest"),
    (["train", "--method", "optg", "--drop-fraction", "0.3"], "--drop-fraction applies to the methods set, rigl"),
]

# How the library names its arguments (and remedies the command line has no option for): no refusal says these.
LIBRARY_WORDS = ("density=", "distribution=", "block=", "sparsity=", "prune_fraction", "exclude", "cycles must",
                 "epochs must", "update_every", "end_step")


@pytest.fixture
def nothing_trains(monkeypatch):
    """Makes any training fail the test: a bad input must be refused before."""

    def refuse(*args, **kwargs):
        raise AssertionError("training started on a bad input")

    monkeypatch.setattr(training.Run, "train", refuse)
    monkeypatch.setattr(runs_module, "train", refuse)
    # compare --jobs > 1 trains in spawned workers, which the patches above do not reach.
    monkeypatch.setattr(runs_module, "ProcessPoolExecutor", refuse)


COMMANDS = ("train", "compare", "reproduce", "bench")


def error_prefix(argv) -> str:
    """How the error line of `argv` starts: with the subcommand, as argparse's own errors do (no subcommand is
    compare's)."""
    command = argv[0] if argv and argv[0] in COMMANDS else "compare"
    return f"sparsekern {command}: error: "


def refused(argv, capsys, words=""):
    """Runs the command line; asserts exit code 2 with one error line, `sparsekern <command>: error: ...` holding
    `words`, and nothing on stdout; returns that line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # a warning would be more lines on stderr
        main(argv)
    captured = capsys.readouterr()
    assert not caught, [str(warning.message) for warning in caught]
    assert exit_info.value.code == 2, captured.err
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(error_prefix(argv)), captured.err
    assert words in lines[0]
    return lines[0]


def features_npz(tmp_path):
    return npz(x=GOOD_X, y=GOOD_Y)(tmp_path)


# Every path option, written with `=` (where the shell expands no `~`) and naming something refused: the error line
# names the path under the home folder, where `~/...` named a folder `~` in the working one. (Bench's --only, refused
# after its paths, keeps a bench that took them from running.)
TILDE_PATHS = [
    (["train", "--out=~/afile"], "--out {} is a file"),
    (["compare", *QUICK_COMPARE, "--out=~/afile"], "--out {} is a file"),
    (["reproduce", "--quick", "--out=~/afile"], "--out {} is a file"),
    (["train", "--resume=~/missing.pt"], "resume checkpoint {} does not exist"),
    (["train", "--dataset=~/missing.npz"], "got {} (no such path)"),
    (["compare", *QUICK_COMPARE, "--dataset=~/missing.npz"], "got {} (no such path)"),
    (["bench", "--only", "no_such_op", "--json=~/afile/rows.json"], "--json {} is not a writable file"),
    (["bench", "--only", "no_such_op", "--csv=~/afile/rows.csv"], "--csv {} is not a writable file"),
]


@pytest.mark.parametrize("argv, words", TILDE_PATHS, ids=[" ".join(case[0]) for case in TILDE_PATHS])
def test_a_tilde_in_a_path_option_given_with_equals_is_the_home_folder(argv, words, tmp_path, monkeypatch, capsys,
                                                                         nothing_trains):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "afile").touch()
    path = argv[-1].partition("=")[2].replace("~", str(tmp_path / "home"), 1)
    refused(argv, capsys, words.format(repr(path)))
    assert os.listdir(tmp_path) == ["home"]


def test_a_run_written_to_a_tilde_out_lands_in_the_home_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    main(["train", "--method", "static", "--epochs", "1", "--density", "0.3", "--out=~/run", "--quiet"])
    assert os.listdir(tmp_path) == ["home"]
    assert {"checkpoint.pt", "metrics.json"} <= set(os.listdir(tmp_path / "home" / "run"))


@pytest.mark.parametrize("argv", BAD_ARGUMENTS, ids=" ".join)
def test_bad_arguments_exit_2_with_one_line_before_training(argv, tmp_path, capsys, nothing_trains):
    out = tmp_path / "out"
    argv = [features_npz(tmp_path) if item == "FEATURES" else item for item in argv]
    refused([*argv, "--out", str(out)], capsys)
    assert not out.exists()


@pytest.mark.parametrize("argv, words", WORDED_ARGUMENTS, ids=[" ".join(case[0]) for case in WORDED_ARGUMENTS])
def test_refused_arguments_name_the_flag(argv, words, tmp_path, capsys, nothing_trains):
    line = refused([*argv, "--out", str(tmp_path / "out")], capsys, words)
    assert not (tmp_path / "out").exists()
    spoken = [word for word in LIBRARY_WORDS if word in line.replace(f"--{word}", "")]
    assert not spoken, line


def test_a_history_whose_epochs_are_out_of_order_is_damaged():
    # Epoch 2's metrics in the place of epoch 1's: metrics.csv and the tables would file them under the wrong epoch.
    row = {name: 1.0 for name in training.HISTORY_KEYS} | {"epoch": 2}
    flow = [{"step": 0, "epoch": 0, "when": "init", "gradient_flow": 1.0},
            {"step": 1, "epoch": 1, "when": "epoch", "gradient_flow": 1.0}]
    assert training.damaged_records([row], flow, 1) == "history[0] is not the metrics of epoch 1"


def test_a_layer_kept_in_half_a_block_or_more_is_a_block_and_less_is_refused():
    # DST rounds a layer's count to whole blocks: 10 weights of an (8, 8) layer are 0.625 of a 4x4 block, one block;
    # 7 are 0.44, none. Truncated, 10 was refused as well.
    config = training.TrainConfig(method="rigl", block=(4, 4), distribution="uniform", density=10 / 64)
    counts.check_counts(config, {"layer": (8, 8)})
    with pytest.raises(ValueError, match="--block 4x4 is too large at --density 0.109375"):
        counts.check_counts(dataclasses.replace(config, density=7 / 64), {"layer": (8, 8)})


@pytest.mark.parametrize("argv", [["--bogus"], ["--device", "cuda"] if not torch.cuda.is_available() else ["--budget", "0"],
                                  ["--budget", "inf"]],   # raised OverflowError, with a traceback
                         ids=" ".join)
def test_bench_errors_are_one_line(argv, capsys):
    refused(["bench", *argv], capsys, "sparsekern bench: error:")


@pytest.mark.parametrize("option, path", [("--json", ""), ("--csv", " ")])
def test_bench_refuses_an_empty_result_path(option, path, capsys):
    # An unset shell variable (--json "$OUT") ran every case and wrote no file, without a word.
    refused(["bench", "--quick", "--only", "topk_mask", option, path], capsys, f"{option} needs a file path")


@pytest.mark.parametrize("argv", [["train", "--threads", "1000000", "--epochs", "1"],
                                  ["compare", "--seeds", str(10 ** 12), "--methods", "static", "--epochs", "1"]],
                         ids=["threads 10**6 (segfaulted)", "seeds 10**12 (hung)"])
def test_huge_counts_exit_2_in_the_installed_command(argv, tmp_path):
    done = subprocess.run([sys.executable, "-m", "sparsekern.cli", *argv, "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr


@pytest.mark.parametrize("command", ["compare", "reproduce"])
def test_a_runs_file_in_out_exits_2_before_training(command, tmp_path, capsys, nothing_trains):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "runs").write_text("not a folder")
    extra = {"compare": QUICK_COMPARE, "reproduce": ["--quick", "--jobs", "1"]}[command]
    refused([command, *extra, "--out", str(tmp_path / "out")], capsys, "runs folder")


# Each file a command writes into --out, its name taken by a folder. RECORD and MASKS: a run's record and the final
# masks another run starts from, under runs/. Found only when the file was written: after the training (compare's
# and reproduce's results), or after its first epoch (train's).
TAKEN_OUTPUTS = [*(("train", name) for name in ("checkpoint.pt", "metrics.json", "metrics.csv", "gradient_flow.csv")),
                 *(("compare", name) for name in ("runs.csv", "results.csv", "results.md", "accuracy_vs_density.png",
                                                  "grid.json", "RECORD")),
                 *(("reproduce", name) for name in ("report.md", "runs.csv", "a.csv", "b.csv", "c.csv", "d.csv",
                                                    "e.csv", "f.csv", "a.png", "b.png", "c_d.png", "e.png", "f.png",
                                                    "RECORD", "MASKS"))]
QUICK = {"train": ["--method", "static", "--epochs", "1"], "compare": QUICK_COMPARE,
         "reproduce": ["--quick", "--jobs", "1"]}


def record_name(command: str, kind: str, tmp_path) -> str:
    """The path under --out of a run's record (`kind` RECORD) or kept masks (MASKS) that `command` writes: a compare's
    as a first compare named it, a reproduce's by the key of a run of its plan."""
    if command == "compare":
        main(["compare", *QUICK_COMPARE, "--quiet", "--out", str(tmp_path / "first")])
        [name] = os.listdir(tmp_path / "first" / "runs")
        return os.path.join("runs", name)
    from sparsekern.cli import reproduce

    jobs = reproduce.jobs(reproduce.plan(quick=True))
    if kind == "RECORD":
        return os.path.join("runs", jobs[0].key + ".json")
    return os.path.join("runs", next(runs_module.key(job.masks_from) for job in jobs if job.masks_from) + ".masks.pt")


@pytest.mark.parametrize("command, name", TAKEN_OUTPUTS, ids=[" ".join(case) for case in TAKEN_OUTPUTS])
def test_an_output_file_taken_by_a_folder_exits_2_before_the_data_loads(command, name, tmp_path, capsys, monkeypatch,
                                                                         request):
    # compare trained its whole grid, then failed on results.md with "[Errno 21] Is a directory" (the training
    # lost); train on metrics.csv after its first epoch.
    if name in ("RECORD", "MASKS"):
        name = record_name(command, name, tmp_path)
    out = tmp_path / "out"
    (out / name).mkdir(parents=True)
    request.getfixturevalue("nothing_trains")
    monkeypatch.setattr(importlib.import_module("sparsekern.cli.main"), "load_dataset",
                        lambda *args: pytest.fail("the data loaded before the outputs were checked"))
    refused([command, *QUICK[command], "--out", str(out)], capsys,
            f"--out's file {str(out / name)!r} is a folder, not a file")
    assert [os.path.relpath(os.path.join(folder, entry), out) for folder, folders, files in os.walk(out)
            for entry in folders + files] == [part for part in (os.path.dirname(name), name) if part]   # nothing new


@pytest.mark.parametrize("command", ["train", "compare", "reproduce"])
def test_an_output_file_taken_by_a_fifo_exits_2_before_training(command, tmp_path, capsys, nothing_trains):
    # The atomic write's rename replaced it with a file (as root, a device such as /dev/null too).
    out = tmp_path / "out"
    out.mkdir()
    name = {"train": "metrics.json", "compare": "results.md", "reproduce": "report.md"}[command]
    os.mkfifo(out / name)
    refused([command, *QUICK[command], "--out", str(out)], capsys,
            f"--out's file {str(out / name)!r} is not a regular file")


@pytest.mark.parametrize("command", ["train", "compare"])
def test_an_out_with_a_trailing_separator_is_the_folder(command, tmp_path, capsys):
    main([command, *QUICK[command], "--quiet", "--out", str(tmp_path / "out") + os.sep])
    assert {"train": "metrics.json", "compare": "results.md"}[command] in os.listdir(tmp_path / "out")


def test_a_record_taken_mid_compare_exits_2_keeping_the_finished_runs(tmp_path, capsys, monkeypatch):
    # A destination that becomes unwritable while the grid trains (checked before, it was free): the runs finished
    # before it are on disk, and a rerun trains only the rest.
    out = tmp_path / "out"
    train, trained = runs_module.train, []

    def train_as_the_record_is_taken(config, **kwargs):
        trained.append(config)
        if len(trained) == 2:
            (out / "runs" / f"{runs_module.key(config)}.json").mkdir()
        return train(config, **kwargs)

    monkeypatch.setattr(runs_module, "train", train_as_the_record_is_taken)
    argv = ["compare", "--methods", "static", "--densities", "0.5,0.3", "--seeds", "1", "--epochs", "1", "--jobs",
            "1", "--quiet", "--out", str(out)]
    line = refused(argv, capsys, f"; finished work is kept in {out} (rerun the same command")
    first, second = trained
    assert "Is a directory" in line and f"{runs_module.key(second)}.json" in line
    assert json.loads((out / "runs" / f"{runs_module.key(first)}.json").read_text())["key"] == runs_module.key(first)
    (out / "runs" / f"{runs_module.key(second)}.json").rmdir()
    trained.clear()
    main(argv)
    assert trained == [second]


def test_stop_after_before_the_resumed_epoch_exits_2(tmp_path, capsys):
    arguments = ["train", "--method", "static", "--epochs", "2", "--density", "0.3", "--quiet"]
    main([*arguments, "--out", str(tmp_path / "run")])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(training.Run, "train", lambda *a, **k: pytest.fail("training started"))
        refused([*arguments, "--resume", str(tmp_path / "run" / "checkpoint.pt"), "--stop-after", "1",
                 "--out", str(tmp_path / "resumed")], capsys, "--stop-after 1 is before epoch 2")


def test_a_dst_step_count_other_than_the_run_s_steps_exits_2(tmp_path, capsys):
    """Campaign 20: a DST state counting other steps than the checkpoint's epochs took (a doctored count up to
    2**63 - 1) resumed with a warning, its schedule past its end: the run trained on without a mask update."""
    arguments = ["train", "--method", "rigl", "--epochs", "2", "--density", "0.3", "--quiet"]
    main([*arguments, "--stop-after", "1", "--out", str(tmp_path / "run")])
    path = tmp_path / "run" / "checkpoint.pt"
    state = checkpoint.load(path)
    trained = state["recipe"]["algorithm"]["step_count"]
    state["recipe"]["algorithm"]["step_count"] = 2 ** 63 - 1
    checkpoint.save(state, path)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(training.Run, "train", lambda *a, **k: pytest.fail("training started"))
        refused([*arguments, "--resume", str(path)], capsys,
                f"its DST state's step_count is 9223372036854775807, but the run had trained {trained} steps")


# A counter of IMP's, SWAMP's or OptG's state doctored to another point of its schedule: (method, options, epochs
# trained, counter, doctored value, its true value). IMP's and SWAMP's resumed silently, training another run; OptG's
# epoch was refused already, by the score lr its state holds for the epoch, in other words.
DOCTORED_COUNTERS = [
    ("imp", ["--epochs", "2", "--cycles", "2"], 3, "cycle", 0, 1),   # past the cycle boundary, back to cycle 0
    ("imp", ["--epochs", "2", "--cycles", "2"], 1, "step_in_cycle", 30, 23),
    ("swamp", ["--epochs", "2", "--cycles", "2", "--particles", "2"], 3, "particle", 0, 1),
    ("swamp", ["--epochs", "2", "--cycles", "2", "--particles", "2"], 5, "cycle", 0, 1),
    ("optg", ["--epochs", "3"], 1, "epoch", 2, 1),
]
ALGORITHMS = {"imp": "IMP", "swamp": "SWAMP", "optg": "OptG"}


@pytest.mark.parametrize("method, options, epochs, counter, doctored, true", DOCTORED_COUNTERS,
                         ids=[f"{case[0]} {case[3]}" for case in DOCTORED_COUNTERS])
def test_a_doctored_ticket_or_optg_counter_exits_2_leaving_the_run_as_it_was(method, options, epochs, counter,
                                                                              doctored, true, tmp_path, capsys):
    """Follow-up of campaign 20: the CLI compared only DST's step count with the checkpoint's epochs. IMP's and
    SWAMP's cycle, particle and step_in_cycle doctored to another point of their schedule resumed without a word,
    training another run than the one saved (a cycle trained again, a particle skipped)."""
    arguments = ["train", "--method", method, *options, "--density", "0.3", "--quiet", "--out", str(tmp_path / "run")]
    main([*arguments, "--stop-after", str(epochs)])
    path = tmp_path / "run" / "checkpoint.pt"
    state = checkpoint.load(path)
    assert state["recipe"]["algorithm"][counter] == true
    state["recipe"]["algorithm"][counter] = doctored
    checkpoint.save(state, path)
    files = {file.name: file.read_bytes() for file in (tmp_path / "run").iterdir()}
    steps = epochs * 23   # the digits' 1437 training images in batches of 64
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(training.Run, "train", lambda *a, **k: pytest.fail("training started"))
        refused([*arguments, "--resume", str(path)], capsys,
                f"its {ALGORITHMS[method]} state's {counter} is "
                f"{doctored}, but the run had trained {steps} steps, after which it is {true}")
    assert {file.name: file.read_bytes() for file in (tmp_path / "run").iterdir()} == files
    run = training.prepare(training.TrainConfig(method=method, density=0.3, **{
        option[2:]: int(value) for option, value in zip(options[::2], options[1::2])}))
    model = {name: tensor.clone() for name, tensor in run.model.state_dict().items()}
    algorithm = copy.deepcopy(run.recipe.algorithm.state_dict())
    with pytest.raises(ValueError, match="does not fit this run"):
        run.restore(str(path))
    assert all(torch.equal(model[name], tensor) for name, tensor in run.model.state_dict().items())
    assert _same(algorithm, run.recipe.algorithm.state_dict())


def _every_model_mask_all_true(state):
    state["model"] = {key: torch.ones_like(value) if key.endswith(".mask") else value
                      for key, value in state["model"].items()}


def _every_mask_all_true(state):
    _every_model_mask_all_true(state)
    masks = state["recipe"]["algorithm"]["masks"]
    state["recipe"]["algorithm"]["masks"] = {name: torch.ones_like(mask) for name, mask in masks.items()}


def _mask_dropped_from_the_model_state(state):
    del state["model"]["3.mask"]


def _no_momentum_of_the_first_weight(state):
    state["recipe"]["optimizer"]["state"]["1.weight"]["momentum_buffer"] = None


def _nan_weight(state):
    state["model"]["3.weight"] = torch.full_like(state["model"]["3.weight"], float("nan"))


# Campaign 29: masks of all True (or none, which loads as all True) resumed a static or DST run dense, reported at
# --density; a NaN weight trained a whole epoch, then stopped the run as diverged ("lower --lr"); an entry of the
# recipe's state that no recipe saves was ignored; a momentum buffer of None started that weight's momentum afresh.
@pytest.mark.parametrize("method, edit, words", [
    ("static", _every_model_mask_all_true, "its masks hold 16384 active weights in '1' where --density 0.3 gives "),
    ("static", _mask_dropped_from_the_model_state, "its masks hold 65536 active weights in '3' where --density 0.3"),
    ("rigl", _every_mask_all_true, "its masks hold 16384 active weights in '1' where --density 0.3 gives "),
    ("static", _nan_weight, "is damaged: its model state's '3.weight' holds inf or NaN"),
    ("rigl", lambda state: state["recipe"].update(optimiser={}), "its recipe state holds ['optimiser'], which this "
                                                                "method's recipe does not save"),
    ("static", lambda state: state["recipe"].update(algorithm={}), "its recipe state holds ['algorithm'], which "
                                                                  "this method's recipe does not save"),
    ("static", _no_momentum_of_the_first_weight, "its optimizer state holds for parameter '1.weight' no momentum "
                                                 "buffer")],
    ids=["static, masks all True", "static, a mask dropped", "rigl, model's and DST's masks all True",
         "static, a NaN weight", "rigl, a misspelled recipe entry", "static, another method's recipe entry",
         "static, a momentum buffer of None"])
def test_a_resume_checkpoint_of_other_counts_nan_weights_or_strange_entries_exits_2(method, edit, words, tmp_path,
                                                                                       capsys):
    arguments = ["train", "--method", method, "--epochs", "2", "--density", "0.3", "--quiet"]
    main([*arguments, "--stop-after", "1", "--out", str(tmp_path / "run")])
    path = tmp_path / "run" / "checkpoint.pt"
    state = checkpoint.load(path)
    edit(state)
    checkpoint.save(state, path)
    files = {file.name: file.read_bytes() for file in (tmp_path / "run").iterdir()}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(training.Run, "train", lambda *a, **k: pytest.fail("training started"))
        refused([*arguments, "--resume", str(path)], capsys, words)
    assert {file.name: file.read_bytes() for file in (tmp_path / "run").iterdir()} == files


@pytest.mark.parametrize("options", [dict(method="imp", epochs=2, cycles=2), dict(method="swamp", epochs=1, cycles=2,
                                                                                  particles=2),
                                     dict(method="optg", epochs=3), dict(method="gmp", epochs=3)],
                         ids=["imp", "swamp", "optg", "gmp"])
def test_every_epoch_s_checkpoint_of_imp_swamp_and_optg_resumes(options, tmp_path):
    """The counters the resume expects after each epoch are those the CLI's training leaves: across the cycle and
    particle boundaries and at the run's end too."""
    config = training.TrainConfig(density=0.3, **options)
    path = tmp_path / "checkpoint.pt"
    resumed = []
    training.train(config, out_dir=str(tmp_path), progress=False,
                   on_epoch=lambda metrics: resumed.append(training.prepare(config, resume=str(path)).epoch))
    assert resumed == list(range(1, training.total_epochs(config) + 1))


def _remove_first_weight_from_the_model_state(state):
    state["model"].pop("1.weight")


def _rename_a_parameter_of_the_optimizer_state(state):
    rename_a_parameter_of_the_optimizer(state)


@pytest.mark.parametrize("edit", [
    _remove_first_weight_from_the_model_state, _rename_a_parameter_of_the_optimizer_state,
    lambda state: state.update(rng=torch.zeros(3)),
    lambda state: state["recipe"]["optimizer"]["param_groups"][0].update(lr=float("nan")),
    lambda state: state["recipe"]["algorithm"]["masks"]["1"].fill_(True)])
def test_a_refused_resume_leaves_the_run_as_it_was(edit, tmp_path):
    """Campaign 20: Run.restore loaded the model's state before it checked the recipe's (and set the global random
    state before nothing), so that a refused checkpoint left the run holding the checkpoint's weights (its
    optimizer's and the random state too, where the random state was refused)."""
    arguments = ["train", "--method", "rigl", "--epochs", "2", "--density", "0.3", "--quiet"]
    main([*arguments, "--stop-after", "1", "--out", str(tmp_path / "run")])
    path = tmp_path / "run" / "checkpoint.pt"
    state = checkpoint.load(path)
    edit(state)
    checkpoint.save(state, path)
    run = training.prepare(training.TrainConfig(method="rigl", epochs=2, density=0.3))
    model = {name: tensor.clone() for name, tensor in run.model.state_dict().items()}
    optimizer = copy.deepcopy(run.recipe.optimizer.state_dict())
    algorithm = copy.deepcopy(run.recipe.algorithm.state_dict())
    random_state = torch.get_rng_state()
    with pytest.raises(ValueError, match="does not fit this run"):
        run.restore(str(path))
    assert all(torch.equal(model[name], tensor) for name, tensor in run.model.state_dict().items())
    assert _same(optimizer, run.recipe.optimizer.state_dict())
    assert _same(algorithm, run.recipe.algorithm.state_dict())
    assert torch.equal(random_state, torch.get_rng_state())


OUT_OF_MEMORY = "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.15 GiB"


def out_of_memory(*args, **kwargs):
    raise torch.OutOfMemoryError(OUT_OF_MEMORY)


def resumable_rigl_checkpoint(tmp_path):
    """(arguments of a 2-epoch RigL train, its checkpoint after epoch 1)."""
    arguments = ["train", "--method", "rigl", "--epochs", "2", "--density", "0.3", "--quiet"]
    main([*arguments, "--stop-after", "1", "--out", str(tmp_path / "run")])
    return arguments, tmp_path / "run" / "checkpoint.pt"


@pytest.mark.parametrize("loading", ["model", "recipe"])
def test_an_out_of_memory_error_restoring_passes_as_it_is_with_the_model_rolled_back(loading, tmp_path):
    # It was raised as ValueError "resume checkpoint ... does not fit this run": the device, not the checkpoint, for
    # a handler that catches torch.OutOfMemoryError (as sparsekern.checkpoint.load and the algorithms' loads let it
    # pass) to load elsewhere.
    _, path = resumable_rigl_checkpoint(tmp_path)
    run = training.prepare(training.TrainConfig(method="rigl", epochs=2, density=0.3))
    model = {name: tensor.clone() for name, tensor in run.model.state_dict().items()}
    if loading == "model":   # the first load, the checkpoint's; the rollback's loads
        loads = [out_of_memory, run.model.load_state_dict]
        run.model.load_state_dict = lambda *args, **kwargs: loads.pop(0)(*args, **kwargs)
    else:
        run.recipe.load_state_dict = out_of_memory
    with pytest.raises(torch.OutOfMemoryError, match="^CUDA out of memory"):
        run.restore(str(path))
    assert all(torch.equal(model[name], tensor) for name, tensor in run.model.state_dict().items())


def test_an_out_of_memory_error_reading_the_resume_checkpoint_passes_as_it_is(tmp_path, monkeypatch):
    # torch.load placing the tensors on the device, the likeliest place to run out: it read "resume checkpoint ...
    # cannot be read (OutOfMemoryError: ...)".
    _, path = resumable_rigl_checkpoint(tmp_path)
    monkeypatch.setattr(checkpoint, "load", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError, match="^CUDA out of memory"):
        training.read_checkpoint(str(path))


def test_a_resume_checkpoint_s_epoch_other_than_an_int_is_refused_where_it_is_read(tmp_path):
    # Read as "no --resume" (None) by the ranks' comparison: a rank holding a damaged checkpoint was reported as one
    # started without --resume.
    _, path = resumable_rigl_checkpoint(tmp_path)
    state = checkpoint.load(path)
    state["epoch"] = 1.0
    checkpoint.save(state, path)
    config = training.TrainConfig(method="rigl", epochs=2, density=0.3)
    with pytest.raises(ValueError, match=r"is inconsistent \(epoch 1\.0\)"):
        importlib.import_module("sparsekern.cli.main")._check_resume(str(path), config)


def test_a_dense_run_s_mask_count_error_names_no_density(tmp_path):
    # The dense method takes no --density: the line quoted the default's ("where --density 0.1 gives 16384").
    config = training.TrainConfig(method="dense")
    with pytest.raises(ValueError, match=r"holds? 64 active weights in '1' where the dense method keeps all 16384,"):
        training._check_counts_kept(config, {"1": 16384}, {"1": 64})


def test_an_out_of_memory_error_loading_the_resume_checkpoint_exits_2_with_torch_s_line(tmp_path, capsys,
                                                                                          monkeypatch):
    # It read "resume checkpoint ... does not fit this run: CUDA out of memory ..."
    arguments, path = resumable_rigl_checkpoint(tmp_path)
    monkeypatch.setattr(recipes.Recipe, "load_state_dict", out_of_memory)
    monkeypatch.setattr(training.Run, "train", lambda *a, **k: pytest.fail("training started"))
    line = refused([*arguments, "--resume", str(path)], capsys)
    assert line == f"sparsekern train: error: {OUT_OF_MEMORY}"


def test_an_out_of_memory_error_while_training_exits_2_with_one_line(tmp_path, capsys, monkeypatch):
    # A traceback, where a full disk got one line.
    monkeypatch.setattr(training.Run, "train", out_of_memory)
    out = tmp_path / "out"
    line = refused(["train", "--method", "static", "--epochs", "1", "--out", str(out), "--quiet"], capsys)
    assert line == (f"sparsekern train: error: {OUT_OF_MEMORY}; finished work is kept in {out} (rerun the same "
                    f"command to go on once the device has the memory)")


def test_an_out_of_memory_error_on_one_rank_is_agreed_by_every_rank_as_a_bad_input_is(monkeypatch):
    # It left the rank before the ranks agreed, the others waiting for it in their collective.
    told = []
    monkeypatch.setattr(data_parallel, "agree", told.append)
    assert importlib.import_module("sparsekern.cli.main")._agreed(data_parallel.Ranks(0, 0, 2), out_of_memory) is None
    assert told == [OUT_OF_MEMORY]


def _same(a, b) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[key], b[key]) for key in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    return a == b


@pytest.mark.parametrize("damage", [lambda record: [1, 2],
                                    lambda record: {key: value for key, value in record.items() if key != "test_accuracy"}],
                         ids=["a JSON list", "a record without test_accuracy"])
def test_compare_trains_again_over_a_damaged_run_record(damage, tmp_path):
    argv = ["compare", *QUICK_COMPARE, "--quiet", "--out", str(tmp_path / "out")]
    main(argv)
    records = list((tmp_path / "out" / "runs").glob("*.json"))
    assert len(records) == 1
    records[0].write_text(json.dumps(damage(json.loads(records[0].read_text()))))
    main(argv)
    assert "test_accuracy" in json.loads(records[0].read_text())


@pytest.mark.parametrize("field, value", [("test_accuracy", "x"), ("gradient_flow_mean", None), ("final_density", 7.0),
                                          ("epochs_trained", 99), ("warnings", [None]), ("warnings", "abc"),
                                          ("key", 5)])
def test_compare_trains_again_over_a_run_record_whose_summary_its_history_does_not_give(field, value, tmp_path):
    """Campaign 21: the summary entries of a run record were taken as stored: a value of another type failed the
    tables' writing (TypeError or AttributeError traceback), or went into them (a str of warnings shown a character
    a line), and a number of another value filed the run under it (a final density of 7)."""
    argv = ["compare", *QUICK_COMPARE, "--quiet", "--out", str(tmp_path / "out")]
    main(argv)
    record = next((tmp_path / "out" / "runs").glob("*.json"))
    original = json.loads(record.read_text())
    record.write_text(json.dumps({**original, field: value}))
    main(argv)
    assert json.loads(record.read_text())[field] == original[field]


@pytest.mark.parametrize("command", ["train", "compare"])
@pytest.mark.parametrize("name, make, words", BAD_DATASETS, ids=[case[0] for case in BAD_DATASETS])
def test_dataset_content_errors_exit_2_naming_the_dataset(command, name, make, words, tmp_path, capsys,
                                                          nothing_trains):
    dataset = make(tmp_path)
    extra = ["--epochs", "1"] if command == "train" else QUICK_COMPARE
    refused([command, "--dataset", dataset, *extra, "--out", str(tmp_path / "out")], capsys, words)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name, make, words", BAD_CHECKPOINTS, ids=[case[0] for case in BAD_CHECKPOINTS])
def test_bad_resume_checkpoints_exit_2(name, make, words, tmp_path, capsys):
    path = make(tmp_path)
    before = os.listdir(tmp_path)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(training.Run, "train", lambda *a, **k: pytest.fail("training started on a bad checkpoint"))
        refused(["train", "--method", "static", "--epochs", "1", "--density", "0.3", "--resume", path,
                 "--out", str(tmp_path / "resumed")], capsys, words)
    assert os.listdir(tmp_path) == before


def test_a_checkpoint_of_foreign_objects_is_told_by_torch_s_error_not_by_the_library_s_words(tmp_path, capsys,
                                                                                              monkeypatch):
    # The CLI looked for torch's words ("Weights only load failed") in sparsekern.checkpoint.load's message, which
    # quotes them: a library message that did not would have called a pickled program merely unreadable.
    load = checkpoint.load

    def reworded(*args, **kwargs):
        try:
            return load(*args, **kwargs)
        except ValueError as error:
            raise ValueError("this checkpoint cannot be loaded") from error.__cause__

    monkeypatch.setattr(checkpoint, "load", reworded)
    refused(["train", "--method", "static", "--epochs", "1", "--resume", pickled(Evil())(tmp_path), "--out",
             str(tmp_path / "resumed")], capsys, "objects other than tensors")


@pytest.mark.parametrize("command", ["train", "compare", "reproduce"])
@pytest.mark.parametrize("name, make, words", BAD_OUTPUTS, ids=[case[0] for case in BAD_OUTPUTS])
def test_unwritable_output_exits_2_before_training(command, name, make, words, tmp_path, capsys, nothing_trains):
    out = make(tmp_path)
    extra = {"train": ["--epochs", "1"], "compare": QUICK_COMPARE, "reproduce": ["--quick", "--jobs", "1"]}[command]
    refused([command, *extra, "--out", out], capsys, words)


@pytest.mark.parametrize("command", ["train", "compare", "reproduce"])
@pytest.mark.parametrize("value, words", BAD_BACKENDS)
def test_bad_backend_setting_exits_2_before_training(command, value, words, tmp_path, capsys, monkeypatch,
                                                     nothing_trains):
    monkeypatch.setenv("SPARSEKERN_BACKEND", value)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    extra = {"train": ["--epochs", "1"], "compare": QUICK_COMPARE, "reproduce": ["--quick", "--jobs", "1"]}[command]
    refused([command, *extra, "--out", str(tmp_path / "out")], capsys, words)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["compare", "reproduce", "bench"])
def test_a_torchrun_launch_of_another_command_than_train_exits_2_before_training(command, tmp_path, capsys,
                                                                                 monkeypatch, nothing_trains):
    # torchrun sets WORLD_SIZE on each rank it starts; every rank would train the same runs into one --out.
    # (train runs data-parallel there: test_data_parallel.py.)
    monkeypatch.setenv("WORLD_SIZE", "2")
    extra = {"compare": QUICK_COMPARE, "reproduce": ["--quick", "--jobs", "1"], "bench": []}[command]
    message = refused([command, *extra, *(["--out", str(tmp_path / "out")] if command != "bench" else [])], capsys,
                      "WORLD_SIZE=2")
    assert not (tmp_path / "out").exists()
    assert ("--out" in message) == (command != "bench")   # bench has no --out to speak of


@pytest.mark.parametrize("variables, words", [
    ({"WORLD_SIZE": "2"}, "RANK=''"),   # a WORLD_SIZE exported by hand, say
    ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two'"),
    ({"WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "0"}, "RANK=2 is not below WORLD_SIZE=2"),
])
def test_launcher_variables_that_name_no_rank_exit_2_before_training(variables, words, tmp_path, capsys,
                                                                      monkeypatch, nothing_trains):
    monkeypatch.delenv("RANK", raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    refused(["train", "--epochs", "1", "--out", str(tmp_path / "out")], capsys, words)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["bench", "-h"]])
def test_help_answers_where_a_launcher_set_world_size(argv, capsys, monkeypatch):
    # WORLD_SIZE refused every command line, so a shell on a rank of a distributed job (or one where
    # a job script exported WORLD_SIZE) could not even read the help.
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_library_warnings_wait_until_the_inputs_are_accepted(tmp_path, capsys, monkeypatch):
    main_module = importlib.import_module("sparsekern.cli.main")  # the module, not the function of that name
    real_prepare = main_module.prepare

    def prepare_with_a_warning(*args, **kwargs):
        warnings.warn("a warning from below\non two lines")
        return real_prepare(*args, **kwargs)

    monkeypatch.setattr(main_module, "prepare", prepare_with_a_warning)
    refused(["train", "--method", "static", "--epochs", "1", "--out", out_is_file(tmp_path)], capsys,
            "is a file")  # no warning shown
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none may escape: the command line prints them itself
        main(["train", "--method", "static", "--epochs", "1", "--out", str(tmp_path / "run"), "--quiet"])
    assert capsys.readouterr().err.splitlines() == ["sparsekern train: warning: a warning from below on two lines"]


def test_installed_command_reports_bad_density_on_one_line():
    done = subprocess.run([sys.executable, "-m", "sparsekern.cli", "train", "--density", "1.01"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["sparsekern train: error: argument --density: density must be in "
                                                "(0, 1], got 1.01"]


def test_installed_command_reports_bad_data_on_one_line(tmp_path):
    dataset = poisoned(np.nan)(tmp_path)
    done = subprocess.run([sys.executable, "-m", "sparsekern.cli", "train", "--dataset", dataset, "--out",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1 and "NaN" in done.stderr
    assert not (tmp_path / "out").exists()


def test_download_dataset_message_says_how_to_pass_a_local_copy(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--dataset", "mnist"])
    assert "--dataset PATH" in capsys.readouterr().err


@pytest.mark.skipif(not hasattr(os, "O_TMPFILE"), reason="unnamed files are a Linux feature")
@pytest.mark.parametrize("size", [10, 3_000_000])
def test_a_write_killed_midway_leaves_no_temporary_file_and_the_old_file(tmp_path, size):
    target = tmp_path / "checkpoint.pt"
    checkpoint.save({"epoch": 1}, target)
    script = textwrap.dedent(f"""
        import os, signal
        from sparsekern import checkpoint

        def write(file):
            file.write(b"x" * {size})
            file.flush()
            os.kill(os.getpid(), signal.SIGKILL)   # killed while the new file is half written

        checkpoint.write_atomically({str(target)!r}, write)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert done.returncode == -signal.SIGKILL
    assert os.listdir(tmp_path) == ["checkpoint.pt"]
    assert checkpoint.load(target) == {"epoch": 1}


def test_a_killed_train_leaves_no_temporary_file(tmp_path):
    out = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-m", "sparsekern.cli", "train", "--method", "rigl", "--epochs",
                                "500", "--update-every", "5", "--out", str(out), "--quiet"])
    try:
        # Killed a few checkpoints in. The deadline is generous: on a busy machine the start alone (torch's CUDA
        # build loading its libraries) took over a minute, and the run was killed before it wrote anything.
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and process.poll() is None:
            if (out / "metrics.csv").exists() and len((out / "metrics.csv").read_text().splitlines()) > 3:
                break
            time.sleep(0.1)
    finally:
        process.kill()
        process.wait()
    assert sorted(os.listdir(out)) == ["checkpoint.pt", "gradient_flow.csv", "metrics.csv", "metrics.json"]
    assert checkpoint.load(out / "checkpoint.pt")["epoch"] >= 3


def test_a_good_run_of_the_installed_command_prints_nothing_on_stderr(tmp_path):
    # sparsify imported torch.distributed.optim, whose modules warn that torch.jit.script is deprecated:
    # every train printed two such warnings after its results.
    done = subprocess.run([sys.executable, "-m", "sparsekern.cli", "train", "--method", "static", "--epochs", "1",
                           "--quiet", "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stderr == "", done.stderr


# Per subcommand, an error of argparse's own and one of the checks after parsing: the checks' errors (and an
# unknown option, which argparse reports under the top prog) said "sparsekern: error:" where argparse's said
# "sparsekern train: error:". `refused` asserts the subcommand's prefix.
PREFIX_CASES = [
    ["train", "--density", "2"], ["train", "--bogus"], ["train", "--method", "static", "--cycles", "3"],
    ["compare", "--seeds", "0"], ["compare", "--bogus"], ["compare", "--methods", "static", "--criteria", "snip"],
    ["--bogus"], ["--methods", "static", "--grow", "random"],   # no subcommand: compare
    ["reproduce", "--jobs", "0"], ["reproduce", "--bogus"], ["reproduce", "--quick", "--out", "FILE"],
    ["bench", "--bogus"], ["bench", "--budget", "0"],
]


@pytest.mark.parametrize("argv", PREFIX_CASES, ids=" ".join)
def test_every_error_of_a_subcommand_starts_with_its_name(argv, tmp_path, capsys, nothing_trains):
    argv = [out_is_file(tmp_path) if item == "FILE" else item for item in argv]
    assert refused(argv, capsys).startswith(error_prefix(argv))


def test_an_error_after_parsing_reads_as_argparse_s_own_in_the_installed_command(tmp_path):
    done = subprocess.run([sys.executable, "-m", "sparsekern.cli", "train", "--method", "static", "--epochs", "1",
                           "--out", out_is_file(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.startswith("sparsekern train: error: --out ") and len(done.stderr.splitlines()) == 1


def test_an_interrupted_command_says_so_under_its_name(tmp_path, capsys, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(training.Run, "train", interrupt)
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--method", "static", "--epochs", "1", "--out", str(tmp_path / "run"), "--quiet"])
    assert exit_info.value.code == 130
    assert capsys.readouterr().err.startswith("sparsekern train: interrupted; finished work is kept in ")


@pytest.mark.parametrize("command", ["train", "compare", "reproduce"])
def test_a_command_interrupted_before_it_trains_stops_with_one_line_and_exit_code_130(tmp_path, capsys, monkeypatch,
                                                                                       command):
    # While it checked the inputs, read the data or joined the other ranks, a Ctrl-C printed KeyboardInterrupt's
    # traceback; later it printed one line and exit code 130.
    def interrupt(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib.import_module("sparsekern.cli.main"), f"_prepare_{command}", interrupt)
    with pytest.raises(SystemExit) as exit_info:
        try:
            main([command, "--out", str(tmp_path / "out"), "--quiet"])
        except KeyboardInterrupt:   # as a failure of this test, not the end of pytest's session
            pytest.fail("KeyboardInterrupt left main: Python prints its traceback")
    assert exit_info.value.code == 130
    assert capsys.readouterr().err.splitlines() == [f"sparsekern {command}: interrupted"]


def test_a_train_interrupted_after_an_epoch_says_to_resume_from_its_checkpoint(tmp_path, capsys, monkeypatch):
    # It said "rerun the same command to go on", which starts train over and overwrites the epoch's checkpoint.
    save = training.Run.save

    def interrupt_after_saving(run, out_dir):
        save(run, out_dir)
        raise KeyboardInterrupt

    monkeypatch.setattr(training.Run, "save", interrupt_after_saving)
    arguments = ["train", "--method", "static", "--epochs", "2", "--density", "0.3", "--quiet"]
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        main([*arguments, "--out", str(out)])
    assert exit_info.value.code == 130
    checkpoint = out / "checkpoint.pt"
    assert capsys.readouterr().err.splitlines() == [
        f"sparsekern train: interrupted; finished work is kept in {out} (rerun the same command with --resume "
        f"{checkpoint} to go on)"]
    monkeypatch.setattr(training.Run, "save", save)
    main([*arguments, "--out", str(out), "--resume", str(checkpoint)])
    assert training.read_checkpoint(str(checkpoint))["epoch"] == 2


def test_a_train_interrupted_before_its_first_save_points_to_no_older_runs_checkpoint(tmp_path, capsys, monkeypatch):
    # An older run's checkpoint in --out, of other arguments: --resume of it would be refused.
    out = tmp_path / "run"
    arguments = ["train", "--method", "static", "--epochs", "1", "--density", "0.3", "--quiet", "--out", str(out)]
    main([*arguments, "--seed", "1"])
    capsys.readouterr()

    def interrupt(run, out_dir, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(training.Run, "train", interrupt)
    with pytest.raises(SystemExit) as exit_info:
        main([*arguments, "--seed", "2"])
    assert exit_info.value.code == 130
    assert capsys.readouterr().err.splitlines() == [
        f"sparsekern train: interrupted; finished work is kept in {out} (rerun the same command to go on)"]


@pytest.mark.parametrize("command", ["train", "compare"])
def test_an_output_that_fails_mid_run_exits_2_with_one_line(command, tmp_path, capsys, monkeypatch):
    # A full disk (or --out removed) while training ended in a traceback.
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(training, "write_metrics", disk_full)
    monkeypatch.setattr(runs_module, "write_text", disk_full)
    extra = ["--method", "static", "--epochs", "1"] if command == "train" else QUICK_COMPARE
    refused([command, *extra, "--out", str(tmp_path / "out"), "--quiet"], capsys, "No space left on device; "
            f"finished work is kept in {tmp_path / 'out'}")


@pytest.mark.parametrize("argv, line", [
    (["trian", "--epochs", "1"], "sparsekern: error: unknown command 'trian'; did you mean 'train'? (commands: train, "
                                 "compare, reproduce, bench)"),
    (["reproduec", "--help"], "sparsekern: error: unknown command 'reproduec'; did you mean 'reproduce'? (commands: "
                              "train, compare, reproduce, bench)"),
    (["digits"], "sparsekern: error: unknown command 'digits' (commands: train, compare, reproduce, bench)"),
], ids=["trian", "reproduec --help", "digits"])
def test_a_misspelled_command_gets_one_line_naming_the_closest(argv, line, capsys, nothing_trains):
    # argparse's own said "argument command: invalid choice: 'trian' (choose from ...)", suggesting nothing
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    captured = capsys.readouterr()
    assert exit_info.value.code == 2 and captured.out == ""
    assert captured.err.splitlines() == [line]


MISSPELLED_OPTIONS = [
    (["train", "--desnity", "0.1"], "unrecognized arguments: --desnity 0.1; did you mean --density?"),
    (["train", "--desnity=0.1"], "unrecognized arguments: --desnity=0.1; did you mean --density?"),
    (["--sedes", "2"], "unrecognized arguments: --sedes 2; did you mean --seeds?"),   # no subcommand: compare
    (["reproduce", "--quik"], "unrecognized arguments: --quik; did you mean --quick?"),
    (["bench", "--onyl", "topk_mask"], "unrecognized arguments: --onyl topk_mask; did you mean --only?"),
    (["train", "extra"], "unrecognized arguments: extra"),   # no option in sight: nothing to suggest
    (["bench", "--out", "x"], "unrecognized arguments: --out x"),   # was "did you mean --budget?", for the dashes
]


@pytest.mark.parametrize("argv, words", MISSPELLED_OPTIONS, ids=[" ".join(case[0]) for case in MISSPELLED_OPTIONS])
def test_a_misspelled_option_gets_the_closest_option_suggested(argv, words, tmp_path, capsys, nothing_trains):
    # Python 3.11's argparse suggests nothing (3.14's suggest_on_error is not there to lean on)
    line = refused([*argv, "--out", str(tmp_path / "out")] if argv[0] != "bench" else argv, capsys)
    assert line.endswith(words), line


@pytest.mark.parametrize("argv, words", [
    (["compare", "--seed", "5"], "unrecognized arguments: --seed 5; did you mean --seeds?"),
    (["compare", "--method", "static"], "unrecognized arguments: --method static; did you mean --methods?"),
    (["train", "--epoch", "1"], "unrecognized arguments: --epoch 1; did you mean --epochs?"),
], ids=lambda case: " ".join(case) if isinstance(case, list) else "")
def test_an_abbreviated_option_is_refused_with_the_full_name_suggested(argv, words, tmp_path, capsys, nothing_trains):
    # argparse took a prefix as the option it starts: compare --seed 5 trained seeds 0..4, where train's --seed 5
    # is seed 5
    assert refused([*argv, "--out", str(tmp_path / "out")], capsys).endswith(words)
