"""Dynamic sparse training: one full RigL mask update, and the cost DST adds to ordinary steps.

- "RigL update (layer)" / "RigL update (global)": one `DST.step()` that updates every mask of a
  ResNet-50-shaped model (its 54 conv/linear weights, ERK at 90% sparsity, dense gradients and
  SGD momentum buffers present): magnitude drop, gradient growth, r = 0.3, weights and momentum
  zeroed, gradients masked. DST makes one `sparsekern.ops.prune_grow` call for every layer. Each
  call first copies the saved dense gradients back (the previous call masked them), in both the
  sparsekern and the baseline runs (about 7 ms of each on 2 CPU cores). Baseline: the same update
  in plain torch as DST libraries write it (per layer `torch.topk` of |θ| among active and of |g|
  among the rest; global: `torch.cat` and one `torch.topk` for each), on an identical model of its
  own.
- "training step": forward, backward and SGD step of an MLP (batch 256), dense `nn.Linear`
  (the baseline) against the same model sparsified at 90% with no DST and with RigL on a step
  that does not update masks; and "DST.step() (no update)" alone against `optimizer.step()`.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ...nn import sparsify
from ...algorithms import RigL
from ...nn import sparse_modules
from ..core import Case, sparsekern_runs
from ..shapes import RESNET50, RESNET50_TINY

OPS = ("RigL update (layer)", "RigL update (global)", "training step", "DST.step() (no update)")

DENSITY = 0.1
DROP_FRACTION = 0.3


def resnet50_shaped(shapes, device: torch.device) -> nn.Module:
    """Sparse conv/linear modules with ResNet-50's weight shapes (no forward: masks only)."""
    layers = nn.ModuleList()
    for _, shape in shapes:
        if len(shape) == 4:
            layers.append(nn.Conv2d(shape[1], shape[0], shape[2:], bias=False, device=device))
        else:
            layers.append(nn.Linear(shape[1], shape[0], bias=False, device=device))
    return sparsify(layers, DENSITY, distribution="erk", init="dense", generator=torch.Generator().manual_seed(0))


def torch_rigl_layer_update(modules, optimizer) -> None:
    """Per-layer RigL update with torch.topk (what a plain-PyTorch DST library does)."""
    with torch.no_grad():
        for module in modules:
            weight, mask, grad = module.weight, module.mask, module.weight.grad
            active = int(mask.sum())
            n = round(DROP_FRACTION * active)  # just-dropped entries may grow back
            drop_score = torch.where(mask, weight.abs(), float("-inf")).flatten()
            kept = torch.zeros_like(drop_score, dtype=torch.bool)
            kept[drop_score.topk(active - n, sorted=False).indices] = True
            grow_score = torch.where(kept, float("-inf"), grad.abs().flatten())
            grown = torch.zeros_like(kept)
            grown[grow_score.topk(n, sorted=False).indices] = True
            _apply(module, optimizer, kept.view(mask.shape), grown.view(mask.shape))


def torch_rigl_global_update(modules, optimizer) -> None:
    """Global RigL update: torch.cat of every layer's scores and one torch.topk for each step."""
    with torch.no_grad():
        masks = [m.mask for m in modules]
        active = sum(int(m.sum()) for m in masks)
        n = round(DROP_FRACTION * active)
        drop_score = torch.cat([torch.where(m.mask, m.weight.abs(), float("-inf")).flatten() for m in modules])
        kept = torch.zeros_like(drop_score, dtype=torch.bool)
        kept[drop_score.topk(active - n, sorted=False).indices] = True
        grow_score = torch.cat([m.weight.grad.abs().flatten() for m in modules]).masked_fill_(kept, float("-inf"))
        grown = torch.zeros_like(kept)
        grown[grow_score.topk(n, sorted=False).indices] = True
        sizes = [m.numel() for m in masks]
        for module, k, g in zip(modules, kept.split(sizes), grown.split(sizes)):
            _apply(module, optimizer, k.view(module.mask.shape), g.view(module.mask.shape))


def _apply(module, optimizer, kept: Tensor, grown: Tensor) -> None:
    new = kept | grown
    newly_grown = grown & ~module.mask
    module.weight.masked_fill_(~new | newly_grown, 0)
    optimizer.state[module.weight]["momentum_buffer"].masked_fill_(~new | newly_grown, 0)
    module.weight.grad.masked_fill_(~new, 0)
    module.mask.copy_(new)


def _rigl_world(shapes, device: torch.device):
    """(model, its sparse modules, their optimizer, the dense gradients to restore before each update)."""
    model = resnet50_shaped(shapes, device)
    modules = [m for _, m in sparse_modules(model)]
    generator = torch.Generator(device=device).manual_seed(1)
    dense_grads = [torch.randn(m.weight.shape, generator=generator, device=device) for m in modules]
    for module, grad in zip(modules, dense_grads):
        module.weight.grad = grad.clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    optimizer.step()  # creates the momentum buffers the update zeroes
    return model, modules, optimizer, dense_grads


def _update_case(scope: str, device: torch.device, quick: bool) -> Case:
    shapes = RESNET50_TINY if quick else RESNET50
    # Two identical models: the baseline's masks never change under DST (which would then count its
    # masks again, as it does after any change it did not make) and vice versa.
    worlds = [_rigl_world(shapes, device) for _ in range(2)]
    baseline = torch_rigl_layer_update if scope == "layer" else torch_rigl_global_update
    model, modules, optimizer, _ = worlds[1]
    # update_every=1 and a long horizon: every step() is an update with r(t) ≈ 0.3.
    algo = RigL(model, optimizer, update_every=1, total_steps=10 ** 9, scope=scope)

    def restore_grads(world):
        _, world_modules, _, dense_grads = world
        torch._foreach_copy_([m.weight.grad for m in world_modules], dense_grads)

    def sparsekern_update():
        restore_grads(worlds[1])
        algo.step()

    def torch_update():
        restore_grads(worlds[0])
        baseline(worlds[0][1], worlds[0][2])

    runs = {f"torch topk ({'per layer' if scope == 'layer' else 'cat'})": torch_update}
    runs.update(sparsekern_runs("prune_grow", device, sparsekern_update))
    size = f"{'resnet50/16' if quick else 'resnet50'}, {sum(m.weight.numel() for m in modules) / 1e6:.3g}M, d={DENSITY}"
    return Case(f"RigL update ({scope})", size, runs, baseline=next(iter(runs)))


def _mlp(width: int, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(width, 2 * width), nn.ReLU(), nn.Linear(2 * width, 2 * width), nn.ReLU(),
                         nn.Linear(2 * width, 10)).to(device)


def _step_cases(device: torch.device, quick: bool) -> list[Case]:
    width, batch = (64, 32) if quick else (1024, 256)
    generator = torch.Generator(device=device).manual_seed(2)
    x = torch.randn(batch, width, generator=generator, device=device)
    y = torch.randint(0, 10, (batch,), generator=generator, device=device)
    dense = _mlp(width, device)
    static = sparsify(_mlp(width, device), DENSITY, generator=torch.Generator().manual_seed(0))
    dynamic = sparsify(_mlp(width, device), DENSITY, generator=torch.Generator().manual_seed(0))
    optimizers = {name: torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
                  for name, model in (("dense", dense), ("static", static), ("dynamic", dynamic))}
    # A step count no update ever reaches: every step() is an ordinary, non-update step.
    algo = RigL(dynamic, optimizers["dynamic"], update_every=10 ** 9, total_steps=10 ** 10)

    def step(model, optimizer, algorithm=None):
        def run():
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            if algorithm is not None:
                algorithm.step()
            optimizer.step()
        return run

    step(dynamic, optimizers["dynamic"], algo)()  # gradients and momentum for the optimizer.step() run
    size = f"MLP {width}-{2 * width}-{2 * width}-10, batch {batch}, d={DENSITY}"
    training = Case("training step", size, {
        "dense nn.Linear": step(dense, optimizers["dense"]),
        "sparse, static": step(static, optimizers["static"]),
        "sparse + RigL (no update)": step(dynamic, optimizers["dynamic"], algo),
    }, baseline="dense nn.Linear")
    alone = Case("DST.step() (no update)", size, {
        "optimizer.step()": optimizers["dynamic"].step,
        "DST.step()": algo.step,
    }, baseline="optimizer.step()")
    return [training, alone]


def cases(device: torch.device, quick: bool) -> list[Case]:
    return [_update_case("layer", device, quick), _update_case("global", device, quick)] + _step_cases(device, quick)
