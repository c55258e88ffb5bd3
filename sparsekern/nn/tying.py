"""Sparse modules that share one weight Parameter (tied weights).

Two distinct modules may hold the same weight Parameter (weight tying, `b.weight = a.weight`).
A weight has one set of active entries, so every sparse module holding it must carry the same
mask: `sparsify` gives them one, and the algorithms update the first module of each group (its
*primary*, in `named_modules()` order) and copy the result to the others with `sync`. `sparsify` also tells
each member the others (`record`, weak references that `SparseModule.set_mask` checks again at each call: still
alive, still holding the weight), so that `set_mask` (or `load_state_dict`) on any member sets every member's mask;
deepcopy and pickling carry the record over to the copies. A module reachable under two names is one module and
needs none of this.
"""
from __future__ import annotations

from torch import nn

from .modules import SparseModule

Group = list[tuple[str, SparseModule]]


def group_by_weight(named: list[tuple[str, SparseModule]]) -> list[Group]:
    """`named` (name, module) pairs grouped by weight Parameter, groups and members in input order."""
    groups: dict[int, Group] = {}
    for name, module in named:
        groups.setdefault(id(module.weight), []).append((name, module))
    return list(groups.values())


def check_groups(groups: list[Group]) -> None:
    """ValueError when modules sharing a weight carry different masks (the weight has one mask). A mask on the meta
    device holds no values to compare: the algorithms refuse it by name (`refuse_meta`) after this check."""
    for group in groups:
        (first, primary), others = group[0], group[1:]
        for name, module in others:
            if primary.mask.is_meta or module.mask.is_meta:
                continue
            if not primary.mask.equal(module.mask):
                raise ValueError(f"modules {first!r} and {name!r} share one weight but have different "
                                 f"masks; give them one mask (sparsekern.sparsify does)")


def sync(groups: list[Group]) -> None:
    """Copies each primary's mask, `dense_grad` and `zero_off_mask` to the other modules holding its weight.

    The weight itself is shared, so zeroing it off the mask through the primary already did it
    for all of them; only the modules' own mask buffers and flags need to follow.
    """
    for group in groups:
        primary = group[0][1]
        for _, module in group[1:]:
            module.mask.copy_(primary.mask)
            module.dense_grad = primary.dense_grad
            module.zero_off_mask = primary.zero_off_mask


def record(modules: list[SparseModule]) -> None:
    """Tells each of `modules`, the sparse modules holding one weight Parameter, the others (`sparsify` calls it for
    every group it masks), so that `set_mask` on any of them sets all their masks."""
    for module in modules:
        module._record_tie(modules)


def holders(model: nn.Module) -> dict[int, list[tuple[str, nn.Module]]]:
    """For every Parameter held directly by a module of `model`: id -> [(module name, module)], each
    distinct module once, in `named_modules()` order."""
    held: dict[int, list[tuple[str, nn.Module]]] = {}
    for name, module in model.named_modules():
        for parameter in module._parameters.values():
            if parameter is not None:
                held.setdefault(id(parameter), []).append((name, module))
    return held
