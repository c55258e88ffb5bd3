"""The training loop behind `sparsekern train`, `compare` and `reproduce`.

One run = one `TrainConfig`; `sparsekern.cli.recipes` says how its method drives the loop. Everything random comes
from the seed: the model's initial weights and mask from torch's RNG seeded once, each epoch's data order from its
own generator seeded with (seed, epoch), random criteria from the algorithm's own seeded generator, so a run
resumed from the checkpoint of epoch k replays epochs k+1.. exactly as an uninterrupted run does.

`prepare` builds a run and checks everything it is given (config, dataset, resume checkpoint, masks) before the
first step, raising ValueError; `Run.train` then trains. `train` does both.
"""
from __future__ import annotations

import inspect
import json
import math
import os
import pickle
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .. import checkpoint
from ..algorithms import _tickets, criteria, distributed, schedules
from ..algorithms.dst import SCOPES, SWAP_ROUNDINGS
from ..nn import gradient_flow, sparsify
from ..nn import masks as model_masks   # `masks` names the masks given to a run
from ..nn import init as sparse_init
from ..nn.sparsify import SPARSIFIABLE
from ..ops import reference
from . import costs, data_parallel
from .data import Dataset, load_dataset
from .models import build_model
from .output import csv_text, first_line, write_text
from .recipes import DST_PRESETS, METHODS, RAMP_METHODS, TICKET_METHODS, SWAMPRecipe, make_recipe, start_density

DISTRIBUTIONS = ("erk", "uniform")
INITS = tuple(sparse_init.INITS)
SCHEDULES = tuple(schedules.DEFAULT_DROP_FRACTION)
CHECKPOINT_NAME = "checkpoint.pt"
# What a run given an out_dir writes there after every epoch (`Run.save`): the checkpoint, then `write_metrics`'s.
OUTPUT_FILES = (CHECKPOINT_NAME, "metrics.json", "metrics.csv", "gradient_flow.csv")
GRADIENT_FLOW_BATCH = 256
CHECKPOINT_KEYS = ("config", "epoch", "model", "recipe", "rng", "history", "gradient_flow")
# What every epoch's metrics and every gradient-flow record of a checkpoint hold, in every version that wrote one
# (records hold "layers" too since the per-layer flow), and the moments a record is taken at.
HISTORY_KEYS = ("epoch", "train_loss", "test_loss", "test_accuracy", "density", "gradient_flow", "mask_updates",
                "seconds")
FLOW_KEYS = ("step", "epoch", "when", "gradient_flow")
FLOW_MOMENTS = ("init", "before update", "after update", "epoch")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a run's result (the output directory and progress display do not).

    density is the target: where training starts (static, DST) or ends (IMP, SWAMP, OptG, GMP). prune, grow,
    schedule, drop_fraction, end_fraction, swap_rounding: None keeps the DST method's own (RigL: magnitude,
    gradient, cosine 0.3 ending at 75%, swap counts rounded); mest_gamma, sensitivity_offset, snip_shift: None keeps
    DST's (1, 1e-8, 0), read only by criteria using them; block: DST's (bh, bw) blocks or None, single weights. init:
    how sparse weights start (`sparsekern.nn.init`: "sparse" draws Var = 1/fan_in over the active inputs,
    "layer-scaled" the dense variance over the density, "dense" keeps torch's default init, masked); the dense
    method and the methods that start dense use it at density 1, where "sparse" and "layer-scaled" are both Var =
    1/fan_in. epochs counts one segment: IMP trains `cycles` of them, SWAMP `cycles` x `particles`. scope is DST's
    (per layer or global updates); ticket_scope IMP's and SWAMP's pruning, per layer or global: None keeps theirs,
    global (a field of its own: runs stored before it hold scope "layer" and pruned globally).
    """

    method: str = "rigl"
    density: float = 0.1
    prune: str | None = None
    grow: str | None = None
    schedule: str | None = None
    drop_fraction: float | None = None
    end_fraction: float | None = None
    swap_rounding: str | None = None
    mest_gamma: float | None = None
    sensitivity_offset: float | None = None
    snip_shift: float | None = None
    block: tuple[int, int] | None = None
    scope: str = "layer"
    ticket_scope: str | None = None
    update_every: int = 25
    distribution: str = "erk"
    init: str = "sparse"
    model: str = "mlp"
    dataset: str = "digits"
    epochs: int = 20
    cycles: int = 4
    particles: int = 2
    seed: int = 0
    device: str = "cpu"
    batch_size: int = 64
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    width: int = 256

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not 0 < self.density <= 1:
            raise ValueError(f"density must be in (0, 1], got {self.density}")
        _check_choice("prune", self.prune, criteria.PRUNE)
        _check_choice("grow", self.grow, criteria.GROW)
        _check_choice("schedule", self.schedule, SCHEDULES)
        _check_choice("scope", self.scope, SCOPES)
        _check_choice("ticket_scope", self.ticket_scope, SCOPES)
        _check_choice("swap_rounding", self.swap_rounding, SWAP_ROUNDINGS)
        _check_choice("distribution", self.distribution, DISTRIBUTIONS)
        _check_choice("init", self.init, INITS)
        _check_choice("device", self.device, ("cpu", "cuda"))
        dst_only = [name for name in ("prune", "grow", "schedule", "drop_fraction", "end_fraction",
                                         "swap_rounding", "mest_gamma", "sensitivity_offset", "snip_shift",
                                         "block")
                    if getattr(self, name) is not None]
        if dst_only and self.method not in DST_PRESETS:
            raise ValueError(f"{dst_only[0]} applies to the methods {', '.join(DST_PRESETS)}, not {self.method!r}")
        for name in ("epochs", "batch_size", "update_every", "width", "cycles", "particles"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.method in TICKET_METHODS and self.cycles < 2:
            raise ValueError(f"--cycles must be >= 2 for {self.method} (one training before each pruning and one "
                             f"after the last), got {self.cycles}")
        if self.method in (*TICKET_METHODS, *RAMP_METHODS) and self.density == 1:
            raise ValueError(f"{self.method} prunes to its density, which must be below 1, got 1")
        if self.method == "optg" and self.epochs < 2:
            raise ValueError(f"--epochs must be >= 2 for optg, got {self.epochs}: its mask is a top-k of scores "
                             f"trained in earlier epochs, so a 1-epoch run would end dense (gmp prunes by magnitude "
                             f"from the start)")
        if not 0 < self.lr <= torch.finfo(torch.float32).max:   # an optimizer steps float32 weights by it
            raise ValueError(f"lr must be a positive number at most float32's largest, got {self.lr}")
        for name in ("drop_fraction", "end_fraction"):
            value = getattr(self, name)
            if value is not None and not 0 < value <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {value}")
        for name, low in (("mest_gamma", 0.0), ("sensitivity_offset", None), ("snip_shift", 0.0)):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and (value >= low if low is not None else value > 0)):
                raise ValueError(f"{name} must be a finite number {'>= 0' if low is not None else '> 0'}, got {value}")
        if self.block is not None and not (isinstance(self.block, tuple) and len(self.block) == 2 and all(
                isinstance(size, int) and not isinstance(size, bool) and size >= 1 for size in self.block)):
            raise ValueError(f"block must be None or a tuple of two positive ints (bh, bw), got {self.block!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for, but torch sees no CUDA device")


# Options added to TrainConfig after runs and checkpoints were stored: a config's settings leave them out at
# their default, None, so that those runs are still found (runs.key) and those checkpoints still resume.
LATER_OPTIONS = ("swap_rounding", "mest_gamma", "sensitivity_offset", "snip_shift", "block", "ticket_scope")


def settings(config: TrainConfig | dict) -> dict:
    """What decides a run's result, as stored: `config`'s fields (or a stored config's entries), without the
    LATER_OPTIONS at None, which a config stored before them lacks, and with tuples as lists (block), as a record's
    JSON holds them."""
    values = asdict(config) if isinstance(config, TrainConfig) else config
    return {name: list(value) if isinstance(value, tuple) else value for name, value in values.items()
            if not (name in LATER_OPTIONS and value is None)}


def _check_choice(name: str, value, allowed) -> None:
    if value is not None and value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")


@dataclass
class RunResult:
    """Per-epoch metrics (`history`, one dict per epoch), the gradient-flow records (`flow`: at init, per epoch,
    and just before and after each mask update) and the trained model."""

    config: TrainConfig
    history: list[dict]
    model: nn.Module
    flow: list[dict] = field(default_factory=list)
    schedule: str = ""

    @property
    def final(self) -> dict:
        return self.history[-1]

    def summary(self) -> dict:
        """What a comparison keeps of a finished run: final metrics, its gradient flow over training, its
        schedule and the epochs it trained, and its costs in FLOPs where its history has them (COST_KEYS)."""
        return summary_of(self.history, self.schedule, self.config.epochs)


# The entries of a summary that records stored before them lack: a record without them is whole (a table shows an
# empty cell), one with them holds what its history gives, as for the others.
COST_KEYS = ("inference_macs", "inference_flops_fraction", "training_flops_fraction")


def cost_means(records: list[dict]) -> dict:
    """The costs of runs of one line over its seeds, as `compare`'s and `reproduce`'s tables show them: for each of
    COST_KEYS, "<key>_mean", the mean over `records` (records or rows holding the key), or None (an empty cell) if
    any lacks it or holds None (stored before the costs): the mean of some seeds' would pass for all of theirs."""
    means = {}
    for name in COST_KEYS:
        values = [record.get(name) for record in records]
        means[f"{name}_mean"] = None if any(value is None for value in values) else statistics.fmean(values)
    return means


def summary_of(history: list[dict], schedule: str, epochs: int) -> dict:
    """`RunResult.summary()` of a run whose metrics per epoch are `history` (not empty), of `epochs` epochs a
    segment. Its costs (`sparsekern.cli.costs`): "inference_macs" and "inference_flops_fraction", the final model's
    sparse MACs per example and their fraction of the dense model's, where the last epoch's metrics hold them;
    "training_flops_fraction", the FLOPs of all its training steps as a fraction of a dense run's of `epochs` epochs,
    where every epoch's hold its own (a run resumed from a checkpoint of earlier versions has none)."""
    flows = [epoch["gradient_flow"] for epoch in history]
    summary = {"test_accuracy": history[-1]["test_accuracy"], "test_loss": history[-1]["test_loss"],
               "final_density": history[-1]["density"], "gradient_flow": history[-1]["gradient_flow"],
               "gradient_flow_mean": sum(flows) / len(flows), "epochs_trained": len(history), "schedule": schedule,
               "seconds": sum(epoch["seconds"] for epoch in history)}
    summary |= {name: history[-1][name] for name in ("inference_macs", "inference_flops_fraction")
                if name in history[-1]}
    if all("training_flops_fraction" in epoch for epoch in history):
        summary["training_flops_fraction"] = sum(epoch["training_flops_fraction"] for epoch in history) / epochs
    return summary


def prepare(config: TrainConfig, dataset: Dataset | None = None, resume: str | None = None,
            masks: dict[str, torch.Tensor] | None = None) -> "Run":
    """Builds the model, its masks and the method's recipe; with `resume`, restores the checkpoint of an
    interrupted run of the same config. ValueError (one line) for anything that does not fit.

    `dataset`: an already loaded `load_dataset(config.dataset)`, to save reloading it. `masks`: start a static
    or DST run from these masks (by sparse module name) instead of random ones, the weights drawn afresh by
    `config.init` on them ("dense": torch's default init of the dense layer, masked), e.g. to reinitialise a
    lottery ticket.
    """
    data = dataset if dataset is not None else load_dataset(config.dataset)
    torch.manual_seed(config.seed)
    model = build_model(config.model, data.input_shape, data.num_classes, config.width)
    generator = torch.Generator().manual_seed(config.seed)
    if masks is not None:
        _start_from_masks(model, config, masks, generator)
    elif config.method != "dense" or config.init != "dense":
        sparsify(model, start_density(config.method, config.density), distribution=config.distribution,
                 init=config.init, generator=generator)
    model.to(torch.device(config.device))
    run = Run(config, data, model)
    if resume is not None:
        run.restore(resume)
    return run


def train(config: TrainConfig, out_dir: str | None = None, resume: str | None = None,
          stop_after: int | None = None, progress: bool = True, dataset: Dataset | None = None,
          masks: dict[str, torch.Tensor] | None = None, on_epoch=None) -> RunResult:
    """`prepare(config, dataset, resume, masks).train(out_dir, stop_after, progress, on_epoch)`."""
    return prepare(config, dataset, resume, masks).train(out_dir, stop_after, progress, on_epoch)


class Run:
    """A prepared run: model, recipe, data and what has been trained so far."""

    def __init__(self, config: TrainConfig, data: Dataset, model: nn.Module):
        self.config, self.data, self.model = config, data, model
        self.steps_per_epoch = math.ceil(len(data.train_y) / config.batch_size)
        self.recipe = make_recipe(config, model, self.steps_per_epoch)
        self.history: list[dict] = []
        self.flow: list[dict] = []
        self.epoch = 0

    def restore(self, path: str) -> None:
        """Continues the run saved in the checkpoint at `path` (written by `train` for the same config, on any
        number of ranks). ValueError for a checkpoint that does not fit this run, and torch.OutOfMemoryError as it is
        (the device, not the checkpoint: a handler may load it elsewhere), the model rolled back after either."""
        state = read_checkpoint(path, map_location=_onto(self.model))
        if settings(state["config"]) != settings(self.config):
            raise ValueError(f"resume checkpoint {path!r} was written by a different configuration")
        epoch = state["epoch"]
        if isinstance(epoch, bool) or not isinstance(epoch, int) or not 0 < epoch <= total_epochs(self.config) or \
                not isinstance(state["history"], list) or len(state["history"]) != epoch:
            history = len(state["history"]) if isinstance(state["history"], list) else "?"
            raise ValueError(f"resume checkpoint {path!r} is inconsistent (epoch {epoch!r}, {history} epochs of "
                             f"history)")
        damaged = damaged_records(state["history"], state["gradient_flow"], epoch)
        if damaged:   # else the metrics files written after the next epoch fail, or carry the damage on
            raise ValueError(f"resume checkpoint {path!r} is inconsistent: {damaged}")
        non_finite = _non_finite_entry(state["model"])
        if non_finite is not None:   # train stops at an epoch that diverged before it saves (_check_finite)
            raise ValueError(f"resume checkpoint {path!r} is damaged: its model state's {non_finite!r} holds inf or "
                             f"NaN, which no checkpoint of train holds")
        # Everything is checked before anything is kept: the random state on a scratch generator (it is set last),
        # the model's and the recipe's as they load, the model rolled back if either is refused (torch's
        # load_state_dict copies the tensors that fit before it raises for the others; the recipe's loads last).
        before = {name: tensor.clone() for name, tensor in self.model.state_dict().items()}
        counts = _active_counts(self.model)
        try:
            torch.Generator().set_state(state["rng"])
            try:
                self.model.load_state_dict(state["model"])
            except torch.OutOfMemoryError:   # to the rollback below, as it is
                raise
            except RuntimeError as error:   # torch's names the keys missing, unexpected or misshapen, a line each
                raise ValueError(f"its model state: {' '.join(str(error).split())}") from None
            # The model's masks, then those of DST's state, which its load puts in place of the model's: checked
            # before the recipe loads, which the rollback does not undo.
            _check_counts_kept(self.config, counts, _active_counts(self.model))
            _check_counts_kept(self.config, counts, _saved_algorithm_counts(state["recipe"]))
            self.recipe.load_state_dict(state["recipe"], steps=epoch * self.steps_per_epoch)
        except (RuntimeError, KeyError, TypeError, ValueError, IndexError) as error:
            self.model.load_state_dict(before)
            if isinstance(error, torch.OutOfMemoryError):   # the device, not the checkpoint: as it is
                raise
            raise ValueError(f"resume checkpoint {path!r} does not fit this run: {first_line(error)}") from None
        torch.set_rng_state(state["rng"])
        self.history = [_with_world_size(row) for row in state["history"]]
        self.flow, self.epoch = state["gradient_flow"], epoch

    def train(self, out_dir: str | None = None, stop_after: int | None = None, progress: bool = True,
              on_epoch=None) -> RunResult:
        """Trains to the end (or through epoch `stop_after`); with `out_dir`, writes metrics.json, metrics.csv,
        gradient_flow.csv and checkpoint.pt there after every epoch, each atomically (once at the end where no epoch is
        left to train). `on_epoch(metrics)` is called
        with each epoch's metrics (its row of the history) once the epoch is done and saved (`compare` and
        `reproduce` show their runs' progress by it); it must not change the run.

        Under an initialised torch.distributed process group of several ranks (`sparsekern train` under
        torchrun, `data_parallel`), every rank trains the same run data-parallel: the model is wrapped in
        DistributedDataParallel and each rank takes its `data_parallel.batch_slice` of every batch of the same
        order. A rank's loss is its slice's summed loss over the batch's size / the world size, so the gradient
        DDP averages is the whole batch's mean, as in one process (the epoch's last, shorter batch included).
        Every rank evaluates, records gradient flow and keeps the history (the same on all); after every epoch
        `sparsekern.distributed.masks_identical` confirms that the replicas agree (RuntimeError if not), and
        only rank 0 shows progress and writes `out_dir`.

        The train/test split is the same for every seed, so seeds vary only the training (init, mask, data
        order, random criteria). Epochs are counted over all segments (IMP cycles, SWAMP particles):
        `total_epochs(config)` in all. Gradient flow (`sparsekern.nn.gradient_flow`, on the first
        GRADIENT_FLOW_BATCH training samples in eval mode) is recorded, in total and per layer ("layers": {module
        name: norm}), at step 0, after every epoch, and just before and just after every mask update: a DST
        method's, and those between epochs (OptG's and GMP's next epoch, IMP's and SWAMP's next cycle, whose "after
        update" record is at the rewound ticket).
        """
        config, recipe, model = self.config, self.recipe, self.model
        device = torch.device(config.device)
        rank, world_size = data_parallel.world()
        forward = model if world_size == 1 else _data_parallel(model)
        epochs = total_epochs(config)
        last_epoch = epochs if stop_after is None else min(epochs, stop_after)
        train_x, train_y = self.data.train_x.to(device), self.data.train_y.to(device)
        test_x, test_y = self.data.test_x.to(device), self.data.test_y.to(device)
        flow_batch = (train_x[:GRADIENT_FLOW_BATCH], train_y[:GRADIENT_FLOW_BATCH])
        example = train_x[:1]   # what the costs are measured on: one example of the dataset's shape
        cost = costs.TrainingCost(model, example)
        loss_fn = nn.CrossEntropyLoss()
        summed_loss = nn.CrossEntropyLoss(reduction="sum")

        def record_flow(step: int, epoch: int, when: str) -> float:
            flow = gradient_flow(model, loss_fn, flow_batch)
            self.flow.append({"step": step, "epoch": epoch, "when": when, "gradient_flow": flow["total"],
                              "layers": flow["layers"]})
            return flow["total"]

        model.eval()
        if self.epoch == 0 and not self.flow:
            record_flow(0, 0, "init")
        first_epoch = self.epoch
        bar = _progress_bar(progress and rank == 0, (last_epoch - self.epoch) * self.steps_per_epoch, config)
        for epoch in range(self.epoch, last_epoch):
            started = time.perf_counter()
            epoch_in_segment = epoch % config.epochs
            last_of_segment = epoch_in_segment == config.epochs - 1
            last_segment = epoch // config.epochs == recipe.segments - 1
            position = recipe.position()
            model.train()
            order = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(
                recipe.data_seed(epoch_in_segment)))
            loss_sum, samples, updates, training_macs = 0.0, 0, 0, 0
            for batch_index, start in enumerate(range(0, len(order), config.batch_size)):
                step = epoch_in_segment * self.steps_per_epoch + batch_index
                global_step = epoch * self.steps_per_epoch + batch_index + 1
                if bar is not None:
                    bar.update()
                if step < recipe.first_step:  # a rewound ticket resumes its cycle at step k
                    continue
                for group in recipe.optimizer.param_groups:
                    group["lr"] = recipe.learning_rate(step)
                batch = order[start:start + config.batch_size]
                mine = data_parallel.batch_slice(batch, rank, world_size).to(device)
                recipe.optimizer.zero_grad(set_to_none=True)
                training_macs += cost.step(len(batch))   # the whole batch's, on every rank alike
                loss = summed_loss(forward(train_x[mine]), train_y[mine])
                (loss / (len(batch) / world_size)).backward()  # in one process: the batch's mean loss
                around_update = recipe.updates_masks_next()
                if around_update:
                    model.eval()
                    record_flow(global_step, epoch + 1, "before update")
                updates += recipe.after_backward()
                if around_update:
                    record_flow(global_step, epoch + 1, "after update")
                    model.train()
                recipe.optimizer.step()
                recipe.after_optimizer_step()
                loss_sum += loss.item()
                samples += len(mine)
                if bar is not None:
                    bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item() / max(len(mine), 1):.3f}", refresh=False)
            recipe.optimizer.zero_grad(set_to_none=True)
            if world_size > 1:
                loss_sum, samples = _summed_over_ranks([loss_sum, samples], device)
            if last_of_segment:
                recipe.end_segment_before_evaluation(last_segment)
            evaluation = _evaluate(model, test_x, test_y)
            metrics = {"epoch": epoch + 1, **position, "train_loss": loss_sum / max(samples, 1), **evaluation,
                       "density": density(model),
                       "gradient_flow": record_flow((epoch + 1) * self.steps_per_epoch, epoch + 1, "epoch"),
                       "mask_updates": updates, **costs.inference(model, example),
                       "training_flops_fraction": training_macs / cost.dense_step(len(train_y)),
                       "world_size": world_size, "seconds": time.perf_counter() - started}
            self.history.append(metrics)
            self.epoch = epoch + 1
            # Masks that change between epochs (OptG, IMP, SWAMP) get the records of a DST update around the change.
            updates_masks = recipe.updates_masks_after_epoch(last_of_segment, last_segment)
            _check_finite(model, config, epoch + 1, updates_masks)
            if updates_masks:
                record_flow((epoch + 1) * self.steps_per_epoch, epoch + 1, "before update")
            recipe.end_epoch_after_evaluation(last_of_segment)
            if last_of_segment:
                recipe.end_segment_after_evaluation(last_segment)
            if updates_masks:
                record_flow((epoch + 1) * self.steps_per_epoch, epoch + 1, "after update")
            if world_size > 1 and not distributed.masks_identical(model):
                raise RuntimeError(f"after epoch {epoch + 1} the ranks hold different masks or weights under them, "
                                   f"which data-parallel training keeps identical: a bug, please report it")
            if bar is not None:
                bar.set_postfix(epoch=epoch + 1, loss=f"{metrics['train_loss']:.3f}",
                                test_accuracy=f"{100 * metrics['test_accuracy']:.1f}%")
            if out_dir is not None and rank == 0:
                self.save(out_dir)
            if on_epoch is not None:
                on_epoch(dict(metrics))
        if bar is not None:
            bar.close()
        if self.epoch == first_epoch and out_dir is not None and rank == 0:
            # Resumed where nothing is left to train: out_dir, another folder than the checkpoint's, stayed empty.
            self.save(out_dir)
        return RunResult(config, self.history, model, self.flow, recipe.describe())

    def save(self, out_dir: str) -> None:
        """checkpoint.pt and the metrics files, each written atomically."""
        checkpoint.save({"config": asdict(self.config), "epoch": self.epoch, "model": self.model.state_dict(),
                         "recipe": self.recipe.state_dict(), "rng": torch.get_rng_state(), "history": self.history,
                         "gradient_flow": self.flow}, os.path.join(out_dir, CHECKPOINT_NAME))
        write_metrics(self.config, self.history, self.flow, out_dir)


def read_checkpoint(path: str, map_location=None) -> dict:
    """The checkpoint `train` wrote at `path`, its tensors placed as `torch.load`'s `map_location` says; ValueError
    (one line) if it is missing, unreadable or not one."""
    if not os.path.isfile(path):
        raise ValueError(f"resume checkpoint {path!r} does not exist or is not a file")
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickles on stderr: the error says it all
            warnings.simplefilter("ignore")
            state = checkpoint.load(path, map_location=map_location)
    except torch.OutOfMemoryError:   # the device, not the file (restore lets it pass)
        raise
    except Exception as error:  # torch.load raises many types for a damaged file; all mean the same here
        # torch.load(weights_only=True) raises UnpicklingError where its unpickler refuses what the file holds (an
        # object other than tensors and containers), which checkpoint.load's ValueError has for its cause: told by
        # that type, not by the words of either message.
        if isinstance(error.__cause__, pickle.UnpicklingError):
            raise ValueError(f"resume checkpoint {path!r} cannot be read: it holds objects other than tensors and "
                             f"plain containers, which sparsekern never loads") from None
        raise ValueError(f"resume checkpoint {path!r} cannot be read ({type(error).__name__}: "
                         f"{first_line(error)})") from None
    missing = [key for key in CHECKPOINT_KEYS if key not in state] if isinstance(state, dict) else CHECKPOINT_KEYS
    if missing or not isinstance(state["config"], dict):
        raise ValueError(f"resume checkpoint {path!r} is not a checkpoint of sparsekern train "
                         f"(lacks {', '.join(missing) or 'a config'})")
    # Compared with the run's options next: a tensor of two entries there failed the comparison (RuntimeError)
    odd = next((name for name, value in state["config"].items() if not _is_plain(value)), None)
    if odd is not None:
        kind = type(state["config"][odd]).__name__
        raise ValueError(f"resume checkpoint {path!r} is damaged: its config holds a {kind} for {odd!r}, where "
                         f"train's options are numbers, strings, None or lists of them")
    return state


def _non_finite_entry(model_state) -> str | None:
    """The key of the first floating-point tensor of `model_state` (a checkpoint's model state dict) holding inf or
    NaN, or None: resumed, such a run trained a whole epoch before it stopped as diverged ("lower --lr")."""
    if not isinstance(model_state, dict):
        return None   # refused by load_state_dict, naming it
    return next((key for key, value in model_state.items()
                 if _tickets.dense_values(value) and not _tickets.finite(value)), None)


def _active_counts(model: nn.Module) -> dict[str, int]:
    """{layer name: active weights of its mask} of `model`'s sparse layers."""
    return _counts(model_masks(model))


def _saved_algorithm_counts(recipe_state) -> dict[str, int] | None:
    """{layer name: active weights} of the masks a recipe state's DST state holds, which its load puts in place of
    the model's; None where it holds none as bool tensors (another method's, or a damaged one, which DST's load
    refuses, naming the entry)."""
    algorithm = recipe_state.get("algorithm") if isinstance(recipe_state, dict) else None
    masks = algorithm.get("masks") if isinstance(algorithm, dict) else None
    if not isinstance(masks, dict) or not all(isinstance(mask, torch.Tensor) and mask.dtype == torch.bool
                                              for mask in masks.values()):
        return None
    return _counts(masks)


def _counts(masks: dict[str, torch.Tensor]) -> dict[str, int]:
    """{name: True entries} of `masks`, read from the device at once."""
    return dict(zip(masks, reference.active_counts(list(masks.values()))))


def _check_counts_kept(config: TrainConfig, built: dict[str, int], loaded: dict[str, int] | None) -> None:
    """ValueError where a resumed run's masks hold other active weight counts than the run's config gives (`built`,
    those of the model prepared for it), for the methods whose counts never change: dense and static, and DST's
    (per layer, or in total under --scope global; not with --block, whose edge blocks hold fewer weights). A mask
    of all True in the checkpoint trained its layer dense while the run was reported at --density. `loaded` None, or
    of other layers than `built`: nothing to compare (a state that its load refuses, naming what it lacks)."""
    if loaded is None or loaded.keys() != built.keys():
        return
    if config.method not in ("dense", "static", *DST_PRESETS) or config.block is not None:
        return
    if config.method in DST_PRESETS and config.scope == "global":
        built, loaded = {"all layers": sum(built.values())}, {"all layers": sum(loaded.values())}
    differ = next((name for name in built if loaded.get(name) != built[name]), None)
    if differ is not None:
        expected = "the dense method keeps all" if config.method == "dense" else f"--density {config.density:g} gives"
        raise ValueError(f"its masks hold {loaded.get(differ)} active weights in {differ!r} where {expected} "
                         f"{built[differ]}, which {config.method} never changes (a damaged or doctored checkpoint)")


def _is_plain(value) -> bool:
    """Whether `value` is of a kind a TrainConfig holds: None, a bool, number or str, or a tuple or list of those."""
    if isinstance(value, (tuple, list)):
        return all(_is_plain(item) for item in value)
    return value is None or isinstance(value, (bool, int, float, str))


def damaged_records(history: list, flow, epochs: int) -> str:
    """What is wrong with a checkpoint's metrics of its `epochs` epochs and its gradient-flow records (from step 0,
    one per epoch and around each mask update), "" if nothing."""
    for index, row in enumerate(history):
        # Every metric a number (a tensor failed the comparison below or the metrics files' JSON, a str was written
        # into them), the epoch an int
        if not isinstance(row, dict) or any(name not in row for name in HISTORY_KEYS) or \
                not all(_is_number(value) for value in row.values()) or not _is_int(row["epoch"]) or \
                row["epoch"] != index + 1:
            return f"history[{index}] is not the metrics of epoch {index + 1}"
        damaged = _uncounted(row)
        if damaged:
            return f"history[{index}]'s {damaged} is {row[damaged]!r:.40}, which no run counts"
    if not isinstance(flow, list):
        return f"its gradient-flow records are a {type(flow).__name__}, not a list"
    for index, record in enumerate(flow):
        if not isinstance(record, dict) or any(name not in record for name in FLOW_KEYS) or \
                not _is_int(record["step"]) or not _is_int(record["epoch"]) or \
                record["when"] not in FLOW_MOMENTS or not _is_number(record["gradient_flow"]) or \
                not isinstance(record.get("layers", {}), dict) or \
                not all(_is_number(value) for value in record.get("layers", {}).values()) or \
                any(value < 0 for value in (record["gradient_flow"], *record.get("layers", {}).values())):
            return f"gradient-flow record {index} is damaged ({record!r:.100})"   # norms: none is < 0
    if not flow or flow[0]["when"] != "init" or \
            [record["epoch"] for record in flow if record["when"] == "epoch"] != list(range(1, epochs + 1)):
        return f"its gradient-flow records are not those of step 0 and epochs 1 to {epochs}"
    return _misplaced_flow(history, flow)


def _misplaced_flow(history: list[dict], flow: list[dict]) -> str:
    """What is out of place in gradient-flow records that `damaged_records` found whole, "" if nothing: recorded in
    order (step and epoch never fall back), init once at step 0, each "before update" just before the "after
    update" of its step, each epoch's at the step that ends it with the value its metrics hold. Reproduce pairs
    the updates' records in order and finds the epochs' by step: records dropped, repeated or moved went into its
    numbers (the rise across an update taken between two others) or failed its plot."""
    steps_per_epoch = next((record["step"] for record in flow if record["when"] == "epoch"), 0)
    for index, record in enumerate(flow):
        previous = flow[index - 1] if index else {"step": 0, "epoch": 0, "when": "init"}
        where, previous_where = (record["step"], record["epoch"]), (previous["step"], previous["epoch"])
        paired = (previous["when"] == "before update", record["when"] == "after update")
        epoch_end = record["when"] != "epoch" or (
            record["step"] == record["epoch"] * steps_per_epoch and
            _same_number(record["gradient_flow"], history[record["epoch"] - 1]["gradient_flow"]))
        if (record["when"] == "init") != (index == 0) or (index == 0 and where != (0, 0)) or \
                where[0] < previous_where[0] or where[1] < previous_where[1] or not epoch_end or \
                (any(paired) and not (all(paired) and where == previous_where)):
            return f"gradient-flow record {index} is out of place ({record!r:.100})"
    if flow[-1]["when"] == "before update":
        return f"gradient-flow record {len(flow) - 1} is a \"before update\" with no \"after update\""
    return ""


def damaged_summary(record: dict) -> str:
    """What is wrong with the `RunResult.summary()` entries of a run record whose "history" `damaged_records` passed
    and whose "config" is its run's: each must be what its history gives (a value of another type failed the
    tables' writing, or went into them, and a number of another value, a final density say, filed the run
    elsewhere), the COST_KEYS too where the record has them; "" if nothing."""
    if not record["history"] or not isinstance(record["schedule"], str):
        return "it holds no epoch" if not record["history"] else "its schedule is no str"
    expected = summary_of(record["history"], record["schedule"], record["config"]["epochs"])
    unexplained = next((name for name in COST_KEYS if name in record and name not in expected), None)
    if unexplained is not None:
        return f"its {unexplained} is {record[unexplained]!r:.40}, where its history gives none"
    for name, value in expected.items():
        if name in COST_KEYS and name not in record:
            continue
        stored = record[name]
        if type(stored) is not type(value) or not _same_number(stored, value):
            return f"its {name} is {stored!r:.40}, where its history gives {value!r}"
    return ""


def _in_unit(value) -> bool:
    return 0 <= value <= 1


def _count(value) -> bool:
    return _is_int(value) and value >= 0


def _fraction(value) -> bool:
    return isinstance(value, float) and _in_unit(value)


# What each of an epoch's metrics may hold (`_uncounted`), by name.
_COUNTED = {"test_accuracy": _in_unit, "density": _in_unit, "train_loss": lambda value: not value < 0,
            "test_loss": lambda value: not value < 0, "gradient_flow": lambda value: not value < 0,
            "seconds": lambda value: 0 <= value < math.inf, "mask_updates": _count, "inference_macs": _count,
            "inference_flops_fraction": _fraction, "training_flops_fraction": _fraction}


def _uncounted(row: dict) -> str | None:
    """The first of an epoch's metrics that no run counts, or None: accuracy and density fractions in [0, 1], the
    losses and gradient flow not negative (NaN or inf only where finite weights overflowed), seconds finite and not
    negative, mask updates an int >= 0, and of its costs (those it holds: an epoch of earlier versions has none) the
    MACs an int >= 0, the fractions floats in [0, 1] (sparse MACs are at most dense, and a step's at most a dense
    step's). A NaN, a negative or another type, written by hand with the summary to match, went into the tables."""
    return next((name for name, counts in _COUNTED.items() if name in row and not counts(row[name])), None)


def _same_number(a, b) -> bool:
    """a == b, NaN equal to NaN."""
    return a == b or a != a and b != b


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def total_epochs(config: TrainConfig) -> int:
    """Epochs over all segments: `epochs`, times the cycles of IMP, times the particles too for SWAMP."""
    if config.method == "imp":
        return config.epochs * config.cycles
    if config.method == "swamp":
        return config.epochs * config.cycles * config.particles
    return config.epochs


def density(model: nn.Module) -> float:
    """Active fraction of the weights of the layers sparsify can mask (sparse ones count their mask)."""
    active = total = 0
    for module in model.modules():
        if isinstance(module, SPARSIFIABLE):
            mask = getattr(module, "mask", None)
            active += module.weight.numel() if mask is None else int(mask.sum())
            total += module.weight.numel()
    return active / total if total else 1.0


def write_metrics(config: TrainConfig, history: list[dict], flow: list[dict], out_dir: str) -> None:
    """metrics.json (config, per-epoch metrics, gradient-flow records), metrics.csv (one row per epoch) and
    gradient_flow.csv (one row per record, each layer's gradient flow in a column "gradient_flow[<layer>]") in
    `out_dir`, each written atomically."""
    write_text(os.path.join(out_dir, "metrics.json"),
               json.dumps({"config": asdict(config), "epochs": history, "gradient_flow": flow}, indent=2))
    # Every row's columns: a run resumed from a checkpoint of earlier versions has older rows without the costs
    write_text(os.path.join(out_dir, "metrics.csv"),
               csv_text(list(dict.fromkeys(name for row in history for name in row)), history))
    rows = [{**{name: value for name, value in record.items() if name != "layers"},
             **{f"gradient_flow[{layer}]": value for layer, value in record.get("layers", {}).items()}}
            for record in flow]   # a run resumed from a checkpoint of earlier versions has records without layers
    columns = list(dict.fromkeys(name for row in rows for name in row))
    write_text(os.path.join(out_dir, "gradient_flow.csv"), csv_text(columns, rows))


def _start_from_masks(model: nn.Module, config: TrainConfig, masks: dict, generator: torch.Generator) -> None:
    """Makes `model` sparse with `masks` (another run's final ones, by layer name), its weights drawn by
    `config.init` from `generator` (a lottery ticket's random reinitialisation)."""
    if config.method not in ("static", *DST_PRESETS):
        raise ValueError(f"masks apply to static and DST runs, not {config.method!r}")
    sparsify(model, None, mask=masks, init=config.init, generator=generator)


def _all_active(model: nn.Module, config: TrainConfig, generator: torch.Generator) -> None:
    """Makes `model` sparse with every mask all True: the layers that given masks (or a run's own) are of."""
    sparsify(model, 1.0, distribution=config.distribution, init="dense", generator=generator)


def mask_layout(config: TrainConfig, dataset: Dataset) -> dict[str, tuple[int, ...]]:
    """{sparse layer: mask shape} of the model of a run of `config` on `dataset`: what its final masks hold, and
    what a run started from them needs. The global random state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        model = build_model(config.model, dataset.input_shape, dataset.num_classes, config.width)
        _all_active(model, config, torch.Generator())
    return {name: tuple(mask.shape) for name, mask in model_masks(model).items()}


def _data_parallel(model: nn.Module) -> nn.Module:
    """`model` wrapped for data-parallel training over the default process group, without syncing buffers at
    each forward: the masks are these models' only buffers, the algorithms keep them identical on every rank,
    and DDP copying rank 0's at every forward would hide a disagreement (the weights under them would still
    differ) rather than prevent it."""
    from torch.nn.parallel import DistributedDataParallel

    device = next(model.parameters()).device
    # torch 2.13 renamed broadcast_buffers (and warns about the old name); torch 2.9 knows only that one.
    renamed = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                   **{"forward_sync_buffers" if renamed else "broadcast_buffers": False})


def _with_world_size(row):
    """An epoch's metrics from a checkpoint, with the world_size of one process where it was saved before runs
    recorded it (all trained in one process), in the place a new row holds it: metrics.csv takes its columns
    from the first row."""
    if not isinstance(row, dict) or "world_size" in row or "seconds" not in row:
        return row
    return {**{key: value for key, value in row.items() if key != "seconds"}, "world_size": 1,
            "seconds": row["seconds"]}


def _summed_over_ranks(values: list[float], device: torch.device) -> list[float]:
    totals = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(totals)
    return totals.tolist()


def _onto(model: nn.Module) -> dict | None:
    """map_location putting a checkpoint's CUDA tensors on `model`'s CUDA device (each rank's own, where rank 0
    saved from cuda:0) and leaving its CPU tensors (RNG states) on the CPU; None for a model on the CPU."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        return None
    return {f"cuda:{index}": str(device) for index in range(torch.cuda.device_count())}


def check_cycle_steps(config: TrainConfig, data: Dataset) -> None:
    """ValueError, in the command line's options, for a SWAMP run whose cycles are too short for a particle to
    average any step (SWAMP would refuse its first particle's end in its own words, swa_start=...)."""
    if config.method != "swamp":
        return
    per_epoch = math.ceil(len(data.train_y) / config.batch_size)
    steps = config.epochs * per_epoch
    if steps <= SWAMPRecipe.swa_start(steps):
        raise ValueError(f"swamp averages each particle over the steps after the first 75% of its cycle, and "
                         f"--epochs {config.epochs} of {per_epoch} step{'s' if per_epoch > 1 else ''} (--batch-size "
                         f"{config.batch_size} of {len(data.train_y)} training samples) leave none: raise --epochs "
                         f"or lower --batch-size (4 steps a cycle at least)")


class Diverged(ValueError):
    """A run whose weights are no longer finite after an epoch: where its method would choose a mask from them (IMP's
    and SWAMP's next cycle, OptG's and GMP's next epoch) the library refuses NaN weights in its own words, and the
    others (dense, static, DST, whose updates skip non-finite gradients) trained on to a test loss of NaN."""


def _check_finite(model: nn.Module, config: TrainConfig, epoch: int, chooses_mask: bool) -> None:
    """Diverged, naming the first layer whose parameters are not all finite; `chooses_mask`: the method chooses its
    next mask from them now. One host read (a sync on a GPU) for all the parameters, every epoch."""
    owners = [(name, parameter) for name, module in model.named_modules()
              for parameter in module.parameters(recurse=False)]
    finite = torch.stack([torch.isfinite(parameter).all() for _, parameter in owners]).tolist() if owners else []
    diverged = next((name for (name, _), is_finite in zip(owners, finite) if not is_finite), None)
    if diverged is not None:
        chosen = ", and its next mask is chosen from them" if chooses_mask else ""
        raise Diverged(f"{config.method} at density {config.density:g}, seed {config.seed}, diverged: after epoch "
                       f"{epoch} the weights of layer {diverged!r} are not finite{chosen}; lower --lr (it was "
                       f"{config.lr:g})")


@torch.no_grad()
def _evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    model.eval()
    logits = model(x)
    return {"test_loss": nn.functional.cross_entropy(logits, y).item(),
            "test_accuracy": (logits.argmax(1) == y).float().mean().item()}


def _progress_bar(enabled: bool, total: int, config: TrainConfig):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=f"{config.method} d={config.density:g}", unit="step", dynamic_ncols=True)
