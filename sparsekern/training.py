"""The training loop behind `sparsekern train` and `sparsekern compare`.

One run = one `TrainConfig`. Everything random comes from the seed: the model's initial weights and mask from
torch's RNG seeded once, the data order of epoch e from its own generator seeded with (seed, e), so a run resumed
from the checkpoint of epoch k replays epochs k+1.. exactly as an uninterrupted run does.
"""
from __future__ import annotations

import csv
import json
import math
import os
import time
from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

from . import checkpoint
from .data import Dataset, load_dataset
from .models import build_model

METHODS = ("dense", "static")
DISTRIBUTIONS = ("erk", "uniform")
CHECKPOINT_NAME = "checkpoint.pt"
GRADIENT_FLOW_BATCH = 256


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a run's result (the output directory and progress display do not)."""

    method: str = "static"
    density: float = 0.1
    prune: str | None = None  # None: the method's own criterion
    grow: str | None = None
    distribution: str = "erk"
    model: str = "mlp"
    dataset: str = "digits"
    epochs: int = 20
    seed: int = 0
    device: str = "cpu"
    batch_size: int = 64
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    update_every: int = 25
    drop_fraction: float = 0.3
    width: int = 256

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not 0 < self.density <= 1:
            raise ValueError(f"density must be in (0, 1], got {self.density}")
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(f"distribution must be one of {', '.join(DISTRIBUTIONS)}, got {self.distribution!r}")
        for name in ("epochs", "batch_size", "update_every", "width"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0 < self.drop_fraction < 1:
            raise ValueError(f"drop_fraction must be in (0, 1), got {self.drop_fraction}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda, got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for, but torch sees no CUDA device")


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
    `dataset`: an already loaded `load_dataset(config.dataset, config.seed)`, to save reloading it.
    """
    device = torch.device(config.device)
    data = dataset if dataset is not None else load_dataset(config.dataset, config.seed)
    torch.manual_seed(config.seed)
    model = build_model(config.model, data.input_shape, data.num_classes, config.width)
    if config.method != "dense":
        from . import sparsify

        sparsify(model, config.density, distribution=config.distribution,
                 generator=torch.Generator().manual_seed(config.seed))
    model.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(data.train_y) / config.batch_size)
    total_steps = config.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    algorithm = _build_algorithm(config, model, optimizer, total_steps)

    history: list[dict] = []
    start_epoch = 0
    if resume is not None:
        state = checkpoint.load(resume, map_location=device)
        if state["config"] != asdict(config):
            raise ValueError(f"resume checkpoint {resume!r} was written by a different configuration")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if algorithm is not None:
            algorithm.load_state_dict(state["algorithm"])
        torch.set_rng_state(state["rng"])
        history, start_epoch = state["history"], state["epoch"]
    last_epoch = config.epochs if stop_after is None else min(config.epochs, stop_after)

    train_x, train_y = data.train_x.to(device), data.train_y.to(device)
    test_x, test_y = data.test_x.to(device), data.test_y.to(device)
    flow_batch = (train_x[:GRADIENT_FLOW_BATCH], train_y[:GRADIENT_FLOW_BATCH])
    loss_fn = nn.CrossEntropyLoss()
    bar = _progress_bar(progress, (last_epoch - start_epoch) * steps_per_epoch, config)
    for epoch in range(start_epoch, last_epoch):
        started = time.perf_counter()
        model.train()
        order = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(_epoch_seed(config, epoch)))
        loss_sum, updates = 0.0, 0
        for start in range(0, len(order), config.batch_size):
            batch = order[start:start + config.batch_size].to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(train_x[batch]), train_y[batch])
            loss.backward()
            if algorithm is not None:
                updates += bool(algorithm.step())
            optimizer.step()
            scheduler.step()
            loss_sum += loss.item() * len(batch)
            if bar is not None:
                bar.update()
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}", refresh=False)
        metrics = {"epoch": epoch + 1, "train_loss": loss_sum / len(order), **_evaluate(model, test_x, test_y),
                   "density": density(model), "gradient_flow": _gradient_flow(model, loss_fn, flow_batch),
                   "mask_updates": updates, "seconds": time.perf_counter() - started}
        optimizer.zero_grad(set_to_none=True)
        history.append(metrics)
        if bar is not None:
            bar.set_postfix(epoch=epoch + 1, loss=f"{metrics['train_loss']:.3f}",
                            acc=f"{metrics['test_accuracy']:.3f}")
        if out_dir is not None:
            checkpoint.save({"config": asdict(config), "epoch": epoch + 1, "model": model.state_dict(),
                             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                             "algorithm": None if algorithm is None else algorithm.state_dict(),
                             "rng": torch.get_rng_state(), "history": history},
                            os.path.join(out_dir, CHECKPOINT_NAME))
            write_metrics(config, history, out_dir)
    if bar is not None:
        bar.close()
    return RunResult(config, history, model)


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


def config_fields() -> list[str]:
    return [field.name for field in fields(TrainConfig)]


def _epoch_seed(config: TrainConfig, epoch: int) -> int:
    return config.seed * 1_000_003 + epoch


def _build_algorithm(config: TrainConfig, model: nn.Module, optimizer, total_steps: int):
    """The mask-updating algorithm for `config.method`, or None for dense and static training."""
    return None


@torch.no_grad()
def _evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    model.eval()
    logits = model(x)
    return {"test_loss": nn.functional.cross_entropy(logits, y).item(),
            "test_accuracy": (logits.argmax(1) == y).float().mean().item()}


def _gradient_flow(model: nn.Module, loss_fn, batch) -> float:
    """Total gradient flow (ALGORITHMS.md) on a fixed training batch, in eval mode."""
    from . import gradient_flow

    model.eval()
    return float(gradient_flow(model, loss_fn, batch)["total"])


def _progress_bar(enabled: bool, total: int, config: TrainConfig):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=f"{config.method} d={config.density:g}", unit="step", dynamic_ncols=True)
