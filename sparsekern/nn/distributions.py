"""Per-layer densities: how a global density d is spread over the sparsified layers.

Layers are given by their weight shapes, e.g. (out, in) for a linear layer,
(out, in / groups, *kernel) for a 1-d, 2-d or 3-d convolution and (in, out / groups, *kernel) for a
transposed one; N_l is the number of weights of layer l.

- `uniform`: every layer at density d; optionally the first layer dense (RigL's uniform setting),
  which puts the total above d * sum N_l.
- `erk` (Erdos-Renyi-Kernel, RigL's `get_sparsities_erdos_renyi`): d_l = eps * (sum(shape_l) /
  prod(shape_l)) ** power, with eps solved so that sum d_l * N_l = d * sum N_l; for a convolution
  of any number of kernel dims that is (n_out + n_in + sum of kernel dims) / (n_out * n_in * prod of
  kernel dims). A layer whose d_l would exceed 1 is made dense and eps is solved again over the
  others, until none exceeds 1.

`layer_counts` turns densities into exact non-zero counts: round(d_l * N_l), rounding half to even
(Python's `round`).
"""
from __future__ import annotations

import math
import numbers
from typing import Sequence

from ..ops import _checks

DISTRIBUTIONS = ("erk", "uniform")


def check_density(density) -> float:
    """`density` as a float, or ValueError/TypeError naming it unless it is a number in (0, 1]."""
    return _checks.number(density, "density", lambda value: 0 < value <= 1, "in (0, 1]")


def layer_densities(shapes: Sequence[Sequence[int]], density: float, distribution: str = "erk", *,
                    power: float = 1.0, dense_first_layer: bool = False,
                    names: Sequence[str] | None = None) -> list[float]:
    """Densities for layers of weight shapes `shapes` under `distribution` ("erk" or "uniform"); `names`: the
    layers' names, for errors (see `erk`)."""
    _checks.flag(dense_first_layer, "dense_first_layer")
    if distribution == "erk":
        return erk(shapes, density, power=power, dense_first_layer=dense_first_layer, names=names)
    if distribution == "uniform":
        return uniform(shapes, density, dense_first_layer=dense_first_layer)
    raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")


def uniform(shapes: Sequence[Sequence[int]], density: float, *, dense_first_layer: bool = False) -> list[float]:
    """Every layer at `density`; with `dense_first_layer` the first layer at 1."""
    sizes = [math.prod(shape) for shape in _shapes(shapes)]
    density = check_density(density)
    return [1.0 if dense_first_layer and i == 0 else density for i in range(len(sizes))]


def erk(shapes: Sequence[Sequence[int]], density: float, *, power: float = 1.0,
        dense_first_layer: bool = False, names: Sequence[str] | None = None) -> list[float]:
    """Erdos-Renyi-Kernel densities (module docstring), total non-zeros d * sum N_l.

    `dense_first_layer` keeps the first layer dense and spreads the rest of the same total over
    the others (ValueError if the first layer alone holds more than d * sum N_l, naming it by
    `names[0]` when the layers' names are given).
    """
    shapes = _shapes(shapes)
    sizes = [math.prod(shape) for shape in shapes]
    density = check_density(density)
    power = _checks.number(power, "power")
    # log of (sum(shape) / size) ** power: a large |power| would overflow or underflow the power itself.
    log_raw = [power * math.log(sum(shape) / size) for shape, size in zip(shapes, sizes)]
    budget = density * sum(sizes)
    dense = {0} if dense_first_layer and sizes else set()
    if dense_first_layer and sizes and sizes[0] > budget:
        first = f" {names[0]!r}" if names else ""
        raise ValueError(f"density={density} is below what the dense first layer{first} alone holds "
                         f"({sizes[0] / sum(sizes):.6g} of all weights): raise density, or drop "
                         f"dense_first_layer")
    while True:
        sparse = [i for i in range(len(sizes)) if i not in dense]
        if not sparse:
            return [1.0] * len(sizes)
        # Scaled by the largest raw value among the sparse layers (eps absorbs the scale), so the largest
        # is 1 and the sum below is at least one layer's size, whatever the power.
        top = max(log_raw[i] for i in sparse)
        raw = {i: math.exp(log_raw[i] - top) for i in sparse}
        epsilon = (budget - sum(sizes[i] for i in dense)) / sum(raw[i] * sizes[i] for i in sparse)
        saturated = {i for i in sparse if epsilon * raw[i] > 1}
        if not saturated:
            return [1.0 if i in dense else epsilon * raw[i] for i in range(len(sizes))]
        # Making a saturated layer dense frees budget, so eps only grows: every layer saturated
        # now stays saturated, and taking them all at once reaches the same end as one by one.
        dense |= saturated


def layer_counts(shapes: Sequence[Sequence[int]], densities: Sequence[float]) -> list[int]:
    """Exact non-zero counts round(d_l * N_l), each within [0, N_l]."""
    sizes = [math.prod(shape) for shape in _shapes(shapes)]
    densities = list(densities)
    if len(densities) != len(sizes):
        raise ValueError(f"densities has {len(densities)} entries but shapes has {len(sizes)}")
    for i, d in enumerate(densities):
        if isinstance(d, bool) or not isinstance(d, numbers.Real) or not 0 <= d <= 1:
            raise ValueError(f"densities[{i}] must be a number in [0, 1], got {d!r}")
    return [min(size, max(0, round(d * size))) for d, size in zip(densities, sizes)]


def _shapes(shapes: Sequence[Sequence[int]]) -> list[tuple[int, ...]]:
    """`shapes` as a list of tuples of positive ints, or ValueError naming the bad entry."""
    if isinstance(shapes, (str, bytes)) or not hasattr(shapes, "__iter__"):
        raise TypeError(f"shapes must be a sequence of weight shapes, got {type(shapes).__name__}")
    checked = []
    for i, shape in enumerate(shapes):
        if not hasattr(shape, "__iter__"):
            raise ValueError(f"shapes[{i}] must be a non-empty tuple of positive ints, got {shape!r}")
        shape = tuple(shape)
        if not shape or any(isinstance(n, bool) or not hasattr(n, "__index__") or n < 1 for n in shape):
            raise ValueError(f"shapes[{i}] must be a non-empty tuple of positive ints, got {shape}")
        checked.append(tuple(int(n) for n in shape))
    return checked
