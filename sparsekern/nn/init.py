"""Initialisation of sparse modules, after their mask is set.

- `sparse_` (Evci et al. 2022, "Gradient Flow in Sparse Neural Networks"): each active weight
  into output unit j is drawn with Var = scale / max(1, fan_in_j), fan_in_j the number of active
  incoming weights of unit j (kernel positions included). `mode="fan_out"` uses the active
  outgoing weights of the input unit instead, `mode="fan_avg"` the mean of the two for each weight.
  scale=1.0 is the reference code's choice; scale=2.0 is He initialisation for ReLU networks.
- `layer_scaled_` (the usual baseline): the dense init variance divided by the layer's density,
  Var = scale / (density * dense fan), the same for every weight of the layer.
- `dense_`: keeps whatever the module was initialised with and zeroes the weights off the mask.

Weights are drawn normal (std sqrt(Var)) or uniform (on +-sqrt(3 Var)) on the CPU from
`generator` (the global generator if None), so one seed gives the same weights on any device.
Weights off the mask end at exactly 0; biases are left alone. Fans count connections inside a
convolution's group (an output unit of a grouped conv sees in_channels / groups input channels). A
transposed convolution's weight is laid out (in, out / groups, *kernel): its output units are along dim 1
(nn.init's fans, and so torch's default init of nn.ConvTranspose, read dim 1 as the inputs). Kernel
positions count in full, also where a stride > 1 lets only some of them reach each output position.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..ops import _checks, reference
from .modules import SparseModule, check_own_mask

MODES = ("fan_in", "fan_out", "fan_avg")
DISTRIBUTIONS = ("normal", "uniform")


def fans(mask: Tensor, mode: str = "fan_in", groups: int = 1, transposed: bool = False) -> Tensor:
    """Per-weight fan (float, shaped like `mask`) counted over the active entries of `mask`.

    mask: bool, (out, in / groups, *kernel), or with `transposed` a transposed convolution's
    (in, out / groups, *kernel). fan_in: active weights into the weight's output unit; fan_out: active
    weights out of its input unit (within its group); fan_avg: their mean.
    """
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.dim() < 2:
        got = f"{mask.dtype} of shape {tuple(mask.shape)}" if isinstance(mask, Tensor) else type(mask).__name__
        raise TypeError(f"mask must be a bool tensor of 2 or more dimensions, got {got}")
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    groups = _checks.count(groups, "groups", 1)
    if not isinstance(transposed, bool):
        raise TypeError(f"transposed must be a bool, got {type(transposed).__name__}")
    active = mask.to(torch.float32)
    rows = mask.shape[0]   # output units, or a transposed convolution's input units
    if rows % groups:
        raise ValueError(f"groups={groups} does not divide the weight's {rows} "
                         f"{'input' if transposed else 'output'} units")
    per_row = active.reshape(rows, -1).sum(1).view(-1, *[1] * (mask.dim() - 1)).expand(mask.shape)
    grouped = active.reshape(groups, rows // groups, mask.shape[1], -1)
    per_column = grouped.sum((1, 3), keepdim=True).expand(grouped.shape).reshape(mask.shape)
    fan_in, fan_out = (per_column, per_row) if transposed else (per_row, per_column)
    if mode == "fan_avg":
        return (fan_in + fan_out) / 2
    return fan_in if mode == "fan_in" else fan_out


def _fans(module: SparseModule, mask: Tensor, mode: str) -> Tensor:
    return fans(mask, mode, getattr(module, "groups", 1), getattr(module, "transposed", False))


@torch.no_grad()
def sparse_(module: SparseModule, *, distribution: str = "normal", mode: str = "fan_in",
            scale: float = 1.0, generator: torch.Generator | None = None) -> None:
    """Sparsity-aware init of `module.weight` in place: Var = scale / max(1, fan) per weight."""
    _check(module, distribution, scale, generator, "sparse_")
    variance = scale / _fans(module, module.mask, mode).clamp(min=1)
    _draw_(module, variance, distribution, generator)


@torch.no_grad()
def layer_scaled_(module: SparseModule, *, distribution: str = "normal", mode: str = "fan_in",
                  scale: float = 1.0, generator: torch.Generator | None = None) -> None:
    """Dense init variance over density: Var = scale / (density * dense fan), in place."""
    _check(module, distribution, scale, generator, "layer_scaled_")
    dense_fan = _fans(module, torch.ones_like(module.mask), mode)
    variance = scale / (max(module.density, 1 / module.mask.numel()) * dense_fan)
    _draw_(module, variance, distribution, generator)


@torch.no_grad()
def dense_(module: SparseModule, *, generator: torch.Generator | None = None) -> None:
    """Keeps the module's own initialisation; only zeroes the weights off the mask.

    `generator` is accepted for a uniform signature and not used.
    """
    _check_module(module, "dense_")
    module.weight.masked_fill_(~module.mask, 0)


INITS: dict[str, Callable[..., None]] = {"sparse": sparse_, "layer-scaled": layer_scaled_, "dense": dense_}


def resolve(init: str | Callable) -> Callable[..., None]:
    """The init function called `init` (a name of INITS), or `init` itself if callable.

    A callable is called as init(module, generator=generator) after the mask is set; use
    functools.partial for options, e.g. partial(sparse_, mode="fan_avg", scale=2.0).
    """
    if callable(init):
        _checks.callable_as(init, "init", "init(module, generator=...)", None, generator=None)
        return init
    if not isinstance(init, str) or init not in INITS:
        raise ValueError(f"init must be one of {tuple(INITS)} or a callable, got {init!r}")
    return INITS[init]


def _check_module(module, who: str) -> None:
    if not isinstance(module, SparseModule):
        raise TypeError(f"module must be a sparse module (sparsekern.nn.SparseLinear, SparseConv1d/2d/3d, "
                        f"SparseConvTranspose1d/2d/3d), got {type(module).__name__}")
    # A mask put in place through mask.data is read here unchecked: a float one failed in ~ or the fans naming no
    # argument, and one row of it broadcast over the weight.
    check_own_mask(module, f"{who}: module", written=False)
    # Before the draw: torch refused the write into an inference tensor naming no argument, after the random
    # stream had moved on.
    module._check_weight_writable()


def _check(module, distribution: str, scale: float, generator, who: str) -> None:
    _check_module(module, who)
    if not isinstance(distribution, str) or distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    _checks.number(scale, "scale", lambda value: value > 0, "> 0")
    check_generator(generator)


def check_generator(generator) -> None:
    """TypeError/ValueError naming `generator` unless it is None or a CPU torch.Generator (sparsekern
    draws masks and initial weights on the CPU, so that one seed gives the same on every device)."""
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if generator.device.type != "cpu":
        raise ValueError(f"generator must be a CPU torch.Generator (draws happen on the CPU), "
                         f"got one on {generator.device}")


def _draw_(module: SparseModule, variance: Tensor, distribution: str, generator) -> None:
    shape = module.weight.shape
    variance = variance.cpu()
    if distribution == "normal":
        values = torch.randn(shape, generator=generator) * variance.sqrt()
    else:
        values = (torch.rand(shape, generator=generator) * 2 - 1) * (3 * variance).sqrt()
    values = values.to(device=module.weight.device, dtype=module.weight.dtype)
    module.weight.copy_(reference.masked_weight(values, module.mask))
    module._refresh_pack()   # a layer in inference mode (and its tied twins) computes with the new weights
