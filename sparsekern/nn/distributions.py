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
  others, until none exceeds 1. power > 0: below 1 it softens ERK towards uniform, which power 0 would be.

- a function of your own, `rule(shapes, density, *, names)` -> one d_l per layer, each in (0, 1] (a rule of a paper
  the package does not offer): it sees the weight shapes and names of the layers sparsify selected, in model order,
  and the global d, which it may follow or not; the total is what its densities make.
- a mapping {layer name: d_l}: the densities given (a paper's per-layer table, a profile read off a sparsified
  model with `sparsekern.nn.densities`), one per layer, each in (0, 1]; the total is what they make, so the
  global d is None.

`layer_counts` turns densities into exact non-zero counts: round(d_l * N_l), rounding half to even
(Python's `round`).
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Sequence

from ..ops import _checks
from ._wrappers import added_prefix

DISTRIBUTIONS = ("erk", "uniform")


def check_density(density) -> float:
    """`density` as a float, or ValueError/TypeError naming it unless it is a number in (0, 1]."""
    return _checks.number(density, "density", lambda value: 0 < value <= 1, "in (0, 1]")


def check_power(power) -> float:
    """ERK's exponent as a float, or TypeError/ValueError naming it unless it is a finite number > 0: at 0 every layer
    gets the global density (distribution="uniform" says so), below 0 the larger layers get the higher densities,
    the reverse of ERK."""
    return _checks.number(power, "power", lambda value: value > 0,
                          "> 0 (ERK's exponent; 0 is distribution='uniform', below 0 reverses ERK)")


def check_distribution(distribution, density, *, power: float = 1.0, dense_first_layer: bool = False):
    """(`distribution`, `density`) checked, before any layer is looked at: a name of DISTRIBUTIONS with a density in
    (0, 1] (power 1 unless it is "erk", the only one that reads it), or a mapping {layer name: density in (0, 1]}
    (returned as a dict of floats) with density None, power 1 and dense_first_layer False, which only shape a
    computed distribution. TypeError or ValueError naming the
    argument (a mapping's entry by its layer) otherwise."""
    power = check_power(power)
    _checks.flag(dense_first_layer, "dense_first_layer")
    if callable(distribution) and not isinstance(distribution, Mapping):
        if dense_first_layer or power != 1.0:
            raise ValueError("power and dense_first_layer only shape ERK and uniform: leave them at their defaults "
                             "with a distribution function of your own, which decides every layer's density itself")
        _checks.callable_as(distribution, "distribution", "rule(shapes, density, *, names)", [], 0.5, names=[])
        return distribution, check_density(density)
    if not isinstance(distribution, Mapping):
        if not isinstance(distribution, str) or distribution not in DISTRIBUTIONS:
            raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, a function rule(shapes, density, *, "
                             f"names) or a mapping from layer name to density, got {distribution!r}")
        if density is None:
            raise TypeError(f"density must be a number with distribution={distribution!r}, got None (None goes "
                            f"with a mapping of per-layer densities as the distribution)")
        if distribution != "erk" and power != 1.0:
            # Only ERK reads it: another distribution would ignore it silently.
            raise ValueError(f"power is ERK's exponent and must stay 1.0 with distribution={distribution!r}, "
                             f"got {power!r}")
        return distribution, check_density(density)
    if density is not None:
        # The mapping fixes every layer, hence the total: a second figure could only disagree with it.
        raise ValueError(f"density must be None when distribution is a mapping of per-layer densities (they "
                         f"set the total), got {density!r}")
    if power != 1.0:
        raise ValueError(f"power is ERK's exponent and must stay 1.0 with a mapping of per-layer densities, "
                         f"got {power!r}")
    if dense_first_layer:
        raise ValueError("dense_first_layer must be False with a mapping of per-layer densities: give the first "
                         "layer density 1.0 in it instead")
    return {name: _checks.number(value, f"distribution[{name!r}]", lambda d: 0 < d <= 1, "in (0, 1]")
            for name, value in distribution.items()}, None


def layer_densities(shapes: Sequence[Sequence[int]], density: float | None, distribution: str | Mapping = "erk", *,
                    power: float = 1.0, dense_first_layer: bool = False,
                    names: Sequence[str] | None = None) -> list[float]:
    """Densities for layers of weight shapes `shapes` under `distribution` ("erk", "uniform", or a mapping {layer
    name: density}, with density None, which needs `names`: ValueError naming the layers it misses and those it
    names that are not among `names`); `names`: the layers' names, for errors (see `erk`)."""
    distribution, density = check_distribution(distribution, density, power=power,
                                               dense_first_layer=dense_first_layer)
    if isinstance(distribution, dict):
        return given(shapes, distribution, names)
    if callable(distribution):
        return _ruled(distribution, shapes, density, names)
    if distribution == "erk":
        return erk(shapes, density, power=power, dense_first_layer=dense_first_layer, names=names)
    if distribution == "uniform":
        return uniform(shapes, density, dense_first_layer=dense_first_layer)


def _ruled(rule, shapes: Sequence[Sequence[int]], density: float, names: Sequence[str] | None) -> list[float]:
    """`rule(shapes, density, names=names)`'s densities, checked: a sequence of one number in (0, 1] per layer
    (TypeError or ValueError naming the rule and the layer otherwise; RuntimeError naming the rule for an error it
    raises)."""
    shapes = _shapes(shapes)
    names = [str(index) for index in range(len(shapes))] if names is None else list(names)
    rule_name = _checks.qualified_name(rule)
    densities = _checks.users_call(rule, f"distribution {rule_name}", "", [tuple(shape) for shape in shapes], density,
                                   names=list(names))
    if isinstance(densities, (str, bytes, Mapping)) or not isinstance(densities, Sequence):
        raise TypeError(f"distribution {rule_name} must return a list of densities, one per layer, got "
                        f"{type(densities).__name__}")
    if len(densities) != len(shapes):
        raise ValueError(f"distribution {rule_name} returned {len(densities)} densities for {len(shapes)} layers "
                         f"({', '.join(map(repr, names[:5]))}{', ...' if len(names) > 5 else ''})")
    return [_checks.number(value, f"distribution {rule_name}'s density of layer {name!r}", lambda d: 0 < d <= 1,
                           "in (0, 1]") for name, value in zip(names, densities)]


def given(shapes: Sequence[Sequence[int]], densities: Mapping, names: Sequence[str] | None) -> list[float]:
    """The densities of `densities` (checked by `check_distribution`) in the order of `names`, the layers' names;
    ValueError naming the layers it misses and the names it holds that are no layer's."""
    shapes = _shapes(shapes)
    if names is None or len(names) != len(shapes):
        raise ValueError("a mapping of per-layer densities needs names, one per shape")
    check_layer_names(densities, names, "distribution", "a density", "profile")
    return [densities[name] for name in names]


def check_layer_names(mapping: Mapping, names: Sequence[str], argument: str, entry: str, source: str) -> None:
    """ValueError unless `mapping` (the argument named `argument`, giving `entry` per layer: "a density"; what it
    holds is called `source` in the hint about a wrapper's prefix: "profile") has exactly the keys `names`, the layers
    sparsified, naming the layers it misses and the names it holds that are no layer's."""
    missing = [name for name in names if name not in mapping]
    layers = set(names)
    unexpected = [name for name in mapping if name not in layers]
    if missing or unexpected:
        raise ValueError(f"{argument} must give {entry} to exactly the layers sparsified"
                         + (f"; missing: {', '.join(map(repr, missing))}" if missing else "")
                         + (f"; not among them: {', '.join(map(repr, unexpected))}" if unexpected else "")
                         + " (layers are named as sparsekern.nn.densities names them: tied layers by their first "
                           "name, an attention's projections '<attention>.in_proj', ..., a recurrent module's "
                           "'<rnn>.ih_l0', ...; include/exclude leave layers out)"
                         + _wrapping_hint(missing, unexpected, source))


def _wrapping_hint(missing: list[str], unexpected: list, source: str) -> str:
    """Why a `source`'s names ("profile", "masks") may be the layers' with one prefix more or less: it was read
    (`densities`) on the other side of a wrapper (DistributedDataParallel's module., torch.compile's _orig_mod.) than
    the model it is given to."""
    added = added_prefix(unexpected, missing)
    if added is None:
        return ""
    prefix, in_source = added
    owner = (source + ("'" if source.endswith("s") else "'s")) if in_source else "model's"
    return (f"; the {owner} names carry the prefix {prefix!r} of a wrapper, DistributedDataParallel's or "
            f"torch.compile's: read the {source} from the model as it is wrapped here")


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
    power = check_power(power)
    # logs of sum(shape) / size: (sum(shape) / size) ** power, for a large |power|, would overflow or underflow.
    logs = [math.log(sum(shape) / size) for shape, size in zip(shapes, sizes)]
    budget = density * sum(sizes)
    dense = {0} if dense_first_layer and sizes else set()
    if dense_first_layer and sizes and sizes[0] > budget:
        first = f" {names[0] or '(root)'!r}" if names else ""
        raise ValueError(f"density={density} is below what the dense first layer{first} alone holds "
                         f"({sizes[0] / sum(sizes):.6g} of all weights): raise density, or drop "
                         f"dense_first_layer")
    while True:
        sparse = [i for i in range(len(sizes)) if i not in dense]
        if not sparse:
            return [1.0] * len(sizes)
        # Scaled by the largest raw value among the sparse layers (eps absorbs the scale), so the largest
        # is 1 and the sum below is at least one layer's size, whatever the power. Its exponent is a power times
        # a difference of logs: power * log(...) itself may be infinite (power=1e308), and inf - inf NaN.
        top = max(logs[i] for i in sparse)   # power > 0 (check_power): the largest raw value's log
        raw = {i: math.exp(power * (logs[i] - top)) for i in sparse}
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
