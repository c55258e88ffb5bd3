"""The weights a run's density leaves each layer, checked before the library would refuse them.

`sparsify`, DST's --block, IMP and SWAMP (per layer under --scope layer) and OptG refuse a density that leaves a
layer, or the model, no weight, but in their argument names (density=..., distribution='uniform', block=(4, 4),
sparsity=...) and with remedies the command line does not offer (exclude those layers). The command line computes
the same counts first and refuses in its options.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..algorithms.optg import complement
from ..nn import distributions, sparse_modules, sparsify
from .recipes import DST_PRESETS, TICKET_METHODS, start_density, ticket_scope_of


def sparse_layers(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """The weight shape of each layer that `sparsify` would make sparse in `model` (a dense model, as
    `build_model` makes it; it is sparsified at density 1, so pass a scratch one), by name."""
    sparsify(model, 1.0, distribution="uniform", init="dense", generator=torch.Generator())
    return {name: tuple(module.weight.shape) for name, module in sparse_modules(model)}


def check_counts(config, layers: dict[str, tuple[int, ...]], option: str = "--density") -> None:
    """ValueError, naming the command line's options, for a run of `config` on a model with `layers`
    (`sparse_layers`) whose density would leave a layer with no weight, whole blocks of --block none, or the
    whole model none at the end of its pruning. `option`: how the density was given (--density, --densities)."""
    density = config.density
    sizes = {name: math.prod(shape) for name, shape in layers.items()}
    if start_density(config.method, density) < 1:
        counts = _counts(layers, density, config.distribution)
        empty = [name for name, count in counts.items() if count == 0]
        if empty:
            uniform = config.distribution == "uniform"
            erk = ", or --distribution erk, which keeps more of small layers" if uniform else ""
            raise ValueError(f"{option} {density:g} under --distribution {config.distribution} leaves "
                             f"{_layers(empty, sizes)} with no weight: raise {option}{erk}")
        if config.method in DST_PRESETS and config.block is not None:
            _check_blocks(counts, config.block, option, density)
    elif config.method != "dense":   # pruned as it trains, over the whole model to one count (or each layer to its own)
        if config.method in TICKET_METHODS and ticket_scope_of(config) == "layer":
            empty = [name for name, size in sizes.items() if round(density * size) == 0]
            if empty:
                smallest = min(sizes[name] for name in empty)
                raise ValueError(f"{option} {density:g} under --scope layer leaves {_layers(empty, sizes)} with no "
                                 f"weight: {config.method} would prune {'them' if len(empty) > 1 else 'it'} whole; "
                                 f"raise {option} to at least {at_least(1 / smallest)}, or prune all layers together "
                                 f"(--scope global)")
        total = sum(sizes.values())
        if round(density * total) == 0 or total - round(complement(density) * total) == 0:
            raise ValueError(f"{option} {density:g} keeps no weight of the model's {total} (round({density:g} x "
                             f"{total}) = 0): {config.method} would prune them all; raise {option} to at least "
                             f"{at_least(1 / total)}")


def at_least(value: float) -> str:
    """`value` rounded up to two significant figures, as a density to suggest: one rounded to nearest may fall
    below the count it is meant to reach (0.5/N rounds to no weight, 1/N of 2560 weights shown as 0.00039 too)."""
    unit = 10.0 ** (math.floor(math.log10(value)) - 1)
    return f"{math.ceil(round(value / unit, 9)) * unit:.2g}"


def _counts(layers: dict[str, tuple[int, ...]], density: float, distribution: str) -> dict[str, int]:
    """round(d_l·N_l) of each layer, as `sparsify` counts them."""
    names, shapes = list(layers), list(layers.values())
    per_layer = distributions.layer_densities(shapes, density, distribution, names=names)
    return dict(zip(names, distributions.layer_counts(shapes, per_layer)))


def _check_blocks(counts: dict[str, int], block: tuple[int, int], option: str, density: float) -> None:
    """DST keeps a layer's active count in whole blocks, rounded: a layer where that rounds to 0 would empty."""
    size = block[0] * block[1]
    emptied = [f"{name!r} ({count} weights kept: {count / size:.3g} blocks)" for name, count in counts.items()
               if round(count / size) == 0]
    if emptied:
        raise ValueError(f"--block {block[0]}x{block[1]} is too large at {option} {density:g}: in whole blocks of "
                         f"{size} weights it would empty layer{'s' if len(emptied) > 1 else ''} "
                         f"{', '.join(emptied)}; use smaller blocks or raise {option}")


def _layers(names: list[str], sizes: dict[str, int]) -> str:
    return f"layer{'s' if len(names) > 1 else ''} " + ", ".join(f"{name!r} ({sizes[name]} weights)"
                                                                 for name in names)
