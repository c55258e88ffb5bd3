"""`sparsify(model, density, ...)`: turn a model's Linear and Conv2d layers into sparse ones, in place."""
from __future__ import annotations

import fnmatch
from typing import Callable, Sequence

import torch
from torch import nn

from .. import ops
from . import distributions, init as sparse_init
from .modules import SparseConv2d, SparseLinear, SparseModule

# Exact types: a subclass of nn.Linear may read its weight outside forward (MultiheadAttention's
# out_proj does), where a mask would not apply.
_SPARSE_OF = {nn.Linear: SparseLinear, nn.Conv2d: SparseConv2d}


def sparsify(model: nn.Module, density: float, distribution: str = "erk",
             include: Sequence[str] | str | None = None, exclude: Sequence[str] | str | None = None,
             init: str | Callable = "sparse", power: float = 1.0, dense_first_layer: bool = False,
             generator: torch.Generator | None = None) -> nn.Module:
    """Replaces the nn.Linear and nn.Conv2d modules of `model` by sparse ones with random masks.

    Args:
        model: modified in place. Modules of exactly nn.Linear or nn.Conv2d (subclasses are left
            alone) and sparse modules already present (their masks are drawn again) are sparsified.
        density: overall fraction of active weights over the sparsified layers, in (0, 1].
        distribution: "erk" or "uniform", how density is spread over layers (see
            `sparsekern.nn.distributions`); `power` is ERK's exponent and `dense_first_layer` keeps
            the first sparsified layer (in model order) dense.
        include, exclude: fnmatch patterns on qualified module names ("features.*", "fc"); a
            module is sparsified if it matches some `include` pattern (all do when None) and no
            `exclude` pattern.
        init: "sparse" (sparsity-aware, Evci et al. 2022), "layer-scaled", "dense" (keep the
            module's current weights, masked: on an already sparse module the newly active
            positions start at 0), or a callable init(module, generator=...) (`sparsekern.nn.init`).
        generator: CPU torch.Generator for the masks and the init (the global one if None); the
            same seed gives the same masks and weights.
    Returns:
        `model`, or its replacement if `model` itself is a Linear/Conv2d.

    Layer l holds exactly round(d_l * N_l) active weights, chosen uniformly at random (the top
    entries of uniform random scores, through `sparsekern.ops.topk_mask`). Parameters are shared
    with the replaced modules, so an optimizer built before keeps working. Biases, norms and
    embeddings stay dense. Every argument is checked before the model is touched.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    density = distributions.check_density(density)
    if distribution not in distributions.DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {distributions.DISTRIBUTIONS}, got {distribution!r}")
    init_function = sparse_init.resolve(init)
    include = _patterns(include, "include")
    exclude = _patterns(exclude, "exclude")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")

    targets = [(name, module) for name, module in model.named_modules()
               if (type(module) in _SPARSE_OF or isinstance(module, SparseModule))
               and (include is None or any(fnmatch.fnmatchcase(name, p) for p in include))
               and not any(fnmatch.fnmatchcase(name, p) for p in exclude)]
    if not targets:
        raise ValueError("model has no nn.Linear or nn.Conv2d module to sparsify"
                         + ("" if include is None and not exclude else " matching include/exclude"))
    shapes = [tuple(module.weight.shape) for _, module in targets]
    densities = distributions.layer_densities(shapes, density, distribution, power=power,
                                              dense_first_layer=dense_first_layer)
    counts = distributions.layer_counts(shapes, densities)

    scores = [torch.rand(shape, generator=generator) for shape in shapes]
    masks = ops.topk_mask(scores, counts)
    replacements = {}
    for (_, module), mask in zip(targets, masks):
        sparse = module if isinstance(module, SparseModule) else _SPARSE_OF[type(module)].from_dense(module)
        sparse.set_mask(mask.to(sparse.weight.device))
        init_function(sparse, generator=generator)
        sparse.zero_weights_off_mask()  # whatever a callable init wrote: the modules promise zeros off the mask
        replacements[id(module)] = sparse
    _replace(model, replacements)
    return replacements.get(id(model), model)


def _patterns(patterns, name: str) -> list[str] | None:
    if patterns is None:
        return None if name == "include" else []
    if isinstance(patterns, str):
        return [patterns]
    patterns = list(patterns)
    for i, pattern in enumerate(patterns):
        if not isinstance(pattern, str):
            raise TypeError(f"{name}[{i}] must be a str pattern, got {type(pattern).__name__}")
    return patterns


def _replace(model: nn.Module, replacements: dict[int, nn.Module]) -> None:
    # Walk every parent (shared submodules included) so each reference to a replaced module moves.
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if id(child) in replacements:
                setattr(parent, child_name, replacements[id(child)])
