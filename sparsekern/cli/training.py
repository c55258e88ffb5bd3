"""The training loop behind `sparsekern train` and `sparsekern compare`.

One run = one `TrainConfig`; `sparsekern.cli.recipes` says how its method drives the loop. Everything random comes
from the seed: the model's initial weights and mask from torch's RNG seeded once, each epoch's data order from its
own generator seeded with (seed, epoch), random criteria from the algorithm's own seeded generator, so a run
resumed from the checkpoint of epoch k replays epochs k+1.. exactly as an uninterrupted run does.
"""
from __future__ import annotations

import csv
import json
import math
import os
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .. import checkpoint
from ..algorithms import criteria, schedules
from ..algorithms.dst import SCOPES
from .data import Dataset, load_dataset
from ..nn import gradient_flow
from .models import build_model
from .recipes import DST_PRESETS, METHODS, TICKET_METHODS, make_recipe, start_density
from ..nn import sparsify

DISTRIBUTIONS = ("erk", "uniform")
SCHEDULES = tuple(schedules.DEFAULT_DROP_FRACTION)
CHECKPOINT_NAME = "checkpoint.pt"
GRADIENT_FLOW_BATCH = 256


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a run's result (the output directory and progress display do not).

    density is the target: where training starts (static, DST) or ends (IMP, SWAMP, OptG). prune, grow,
    schedule, drop_fraction: None keeps the DST method's own (RigL: magnitude, gradient, cosine 0.3).
    epochs counts one segment: IMP trains `cycles` of them, SWAMP `cycles` x `particles`.
    """

    method: str = "rigl"
    density: float = 0.1
    prune: str | None = None
    grow: str | None = None
    schedule: str | None = None
    drop_fraction: float | None = None
    scope: str = "layer"
    update_every: int = 25
    distribution: str = "erk"
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
        _check_choice("distribution", self.distribution, DISTRIBUTIONS)
        _check_choice("device", self.device, ("cpu", "cuda"))
        dst_only = [name for name in ("prune", "grow", "schedule", "drop_fraction") if getattr(self, name) is not None]
        if dst_only and self.method not in DST_PRESETS:
            raise ValueError(f"{dst_only[0]} applies to the methods {', '.join(DST_PRESETS)}, not {self.method!r}")
        for name in ("epochs", "batch_size", "update_every", "width", "cycles", "particles"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.method in TICKET_METHODS and self.cycles < 2:
            raise ValueError(f"cycles must be >= 2 for {self.method} (one training before each pruning and one "
                             f"after the last), got {self.cycles}")
        if self.method in (*TICKET_METHODS, "optg") and self.density == 1:
            raise ValueError(f"density must be below 1 for {self.method}, which prunes to it, got 1")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.drop_fraction is not None and not 0 < self.drop_fraction <= 1:
            raise ValueError(f"drop_fraction must be in (0, 1], got {self.drop_fraction}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for, but torch sees no CUDA device")


def _check_choice(name: str, value, allowed) -> None:
    if value is not None and value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")


@dataclass
class RunResult:
    """Per-epoch metrics (`history`, one dict per epoch) and the trained model."""

    config: TrainConfig
    history: list[dict]
    model: nn.Module

    @property
    def final(self) -> dict:
        return self.history[-1]


def train(config: TrainConfig, out_dir: str | None = None, resume: str | None = None,
          stop_after: int | None = None, progress: bool = True, dataset: Dataset | None = None) -> RunResult:
    """Trains `config`; with `out_dir`, writes metrics.json, metrics.csv and checkpoint.pt there after every epoch.

    `resume`: a checkpoint written by an earlier call with the same config; training continues after its epoch.
    `stop_after`: stop once this many epochs are done (the checkpoint then resumes the run).
    `dataset`: an already loaded `load_dataset(config.dataset)`, to save reloading it. The train/test split is
    the same for every seed, so seeds vary only the training (init, mask, data order, random criteria).
    Epochs are counted over all segments (IMP cycles, SWAMP particles): `total_epochs(config)` in all.
    """
    device = torch.device(config.device)
    data = dataset if dataset is not None else load_dataset(config.dataset)
    torch.manual_seed(config.seed)
    model = build_model(config.model, data.input_shape, data.num_classes, config.width)
    if config.method != "dense":
        sparsify(model, start_density(config.method, config.density), distribution=config.distribution,
                 generator=torch.Generator().manual_seed(config.seed))
    model.to(device)
    steps_per_epoch = math.ceil(len(data.train_y) / config.batch_size)
    recipe = make_recipe(config, model, steps_per_epoch)

    history: list[dict] = []
    start_epoch = 0
    if resume is not None:
        state = checkpoint.load(resume, map_location=device)
        if state["config"] != asdict(config):
            raise ValueError(f"resume checkpoint {resume!r} was written by a different configuration")
        model.load_state_dict(state["model"])
        recipe.load_state_dict(state["recipe"])
        torch.set_rng_state(state["rng"])
        history, start_epoch = state["history"], state["epoch"]
    epochs = total_epochs(config)
    last_epoch = epochs if stop_after is None else min(epochs, stop_after)

    train_x, train_y = data.train_x.to(device), data.train_y.to(device)
    test_x, test_y = data.test_x.to(device), data.test_y.to(device)
    flow_batch = (train_x[:GRADIENT_FLOW_BATCH], train_y[:GRADIENT_FLOW_BATCH])
    loss_fn = nn.CrossEntropyLoss()
    bar = _progress_bar(progress, (last_epoch - start_epoch) * steps_per_epoch, config)
    for epoch in range(start_epoch, last_epoch):
        started = time.perf_counter()
        epoch_in_segment = epoch % config.epochs
        last_of_segment = epoch_in_segment == config.epochs - 1
        last_segment = epoch // config.epochs == recipe.segments - 1
        position = recipe.position()
        model.train()
        order = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(
            recipe.data_seed(epoch_in_segment)))
        loss_sum, samples, updates = 0.0, 0, 0
        for batch_index, start in enumerate(range(0, len(order), config.batch_size)):
            step = epoch_in_segment * steps_per_epoch + batch_index
            if bar is not None:
                bar.update()
            if step < recipe.first_step:  # a rewound ticket resumes its cycle at step k
                continue
            for group in recipe.optimizer.param_groups:
                group["lr"] = config.lr * 0.5 * (1 + math.cos(math.pi * step / recipe.steps_per_segment))
            batch = order[start:start + config.batch_size].to(device)
            recipe.optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(train_x[batch]), train_y[batch])
            loss.backward()
            updates += recipe.after_backward()
            recipe.optimizer.step()
            recipe.after_optimizer_step()
            loss_sum += loss.item() * len(batch)
            samples += len(batch)
            if bar is not None:
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}", refresh=False)
        recipe.optimizer.zero_grad(set_to_none=True)
        if last_of_segment:
            recipe.end_segment_before_evaluation(last_segment)
        metrics = {"epoch": epoch + 1, **position, "train_loss": loss_sum / max(samples, 1),
                   **_evaluate(model, test_x, test_y), "density": density(model),
                   "gradient_flow": _gradient_flow(model, loss_fn, flow_batch), "mask_updates": updates,
                   "seconds": time.perf_counter() - started}
        history.append(metrics)
        recipe.end_epoch_after_evaluation(last_of_segment)
        if last_of_segment:
            recipe.end_segment_after_evaluation(last_segment)
        if bar is not None:
            bar.set_postfix(epoch=epoch + 1, loss=f"{metrics['train_loss']:.3f}",
                            acc=f"{metrics['test_accuracy']:.3f}")
        if out_dir is not None:
            checkpoint.save({"config": asdict(config), "epoch": epoch + 1, "model": model.state_dict(),
                             "recipe": recipe.state_dict(), "rng": torch.get_rng_state(), "history": history},
                            os.path.join(out_dir, CHECKPOINT_NAME))
            write_metrics(config, history, out_dir)
    if bar is not None:
        bar.close()
    return RunResult(config, history, model)


def total_epochs(config: TrainConfig) -> int:
    """Epochs over all segments: `epochs`, times the cycles of IMP, times the particles too for SWAMP."""
    if config.method == "imp":
        return config.epochs * config.cycles
    if config.method == "swamp":
        return config.epochs * config.cycles * config.particles
    return config.epochs


def density(model: nn.Module) -> float:
    """Active fraction of the weights of the model's Linear and Conv2d layers (sparse ones count their mask)."""
    active = total = 0
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            mask = getattr(module, "mask", None)
            active += module.weight.numel() if mask is None else int(mask.sum())
            total += module.weight.numel()
    return active / total if total else 1.0


def write_metrics(config: TrainConfig, history: list[dict], out_dir: str) -> None:
    """metrics.json (config and per-epoch metrics) and metrics.csv (one row per epoch) in `out_dir`."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "metrics.json"), "w") as file:
        json.dump({"config": asdict(config), "epochs": history}, file, indent=2)
    with open(os.path.join(out_dir, "metrics.csv"), "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)


@torch.no_grad()
def _evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    model.eval()
    logits = model(x)
    return {"test_loss": nn.functional.cross_entropy(logits, y).item(),
            "test_accuracy": (logits.argmax(1) == y).float().mean().item()}


def _gradient_flow(model: nn.Module, loss_fn, batch) -> float:
    """Total gradient flow (ALGORITHMS.md) on a fixed training batch, in eval mode."""
    model.eval()
    return float(gradient_flow(model, loss_fn, batch)["total"])


def _progress_bar(enabled: bool, total: int, config: TrainConfig):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=f"{config.method} d={config.density:g}", unit="step", dynamic_ncols=True)
