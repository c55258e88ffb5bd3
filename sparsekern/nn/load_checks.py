"""A model's state dict checked whole before any of its modules loads.

torch's load_state_dict loads module by module, and each sparse layer refuses what it cannot load (a mask of values
other than 0 and 1, a torch.sparse or meta entry it cannot take, its own mask replaced by something else) as torch
reaches it: the modules before it were loaded by then. So `sparsify` registers `check_before_loading` as a
load_state_dict pre-hook of the model it returns, which torch runs before that model's first module loads: every
sparse layer's checks run on the whole state dict first, and a refusal leaves the model as it was. A model holding
sparse layers built by hand has no such hook (a layer knows nothing of the modules holding it, and torch has no load
hook common to every module): each layer checks its own entries as torch reaches it.
"""
from __future__ import annotations

from torch import nn

from .attention import SparseMultiheadAttention
from .modules import SparseModule
from .recurrent import SparseRNNBase

# What checks its entries before loading them (`_check_loadable`): the sparse layers, and the modules converted whole,
# which rename a plain module's entries to their layers' keys.
_CHECKED = (SparseModule, SparseMultiheadAttention, SparseRNNBase)


def check_before_loading(model: nn.Module, state_dict, prefix: str, local_metadata: dict, strict: bool,
                         missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
    """A load_state_dict pre-hook (`register`): every sparse module of `model` checks its entries in `state_dict`, in
    the order torch loads them, on a copy of it that the modules converted whole rename as their loads will."""
    entries = dict(state_dict)
    metadata = getattr(state_dict, "_metadata", None) or {}
    assign = local_metadata.get("assign_to_params_buffers", False)
    for name, module in model.named_modules(prefix=prefix[:-1], remove_duplicate=False):   # each name torch loads
        if isinstance(module, _CHECKED):
            own = {**metadata.get(name, {}), **({"assign_to_params_buffers": True} if assign else {})}
            module._check_loadable(entries, f"{name}." if name else "", own)


def register(model: nn.Module) -> None:
    """Makes `model` check its whole state dict before any module loads (`check_before_loading`), once."""
    if not any(_is_check(hook) for hook in model._load_state_dict_pre_hooks.values()):
        model.register_load_state_dict_pre_hook(check_before_loading)


def forget(model: nn.Module) -> None:
    """Takes `register`'s hook off `model` (densify's dense model needs no sparsekern to load)."""
    hooks = model._load_state_dict_pre_hooks
    for key in [key for key, hook in hooks.items() if _is_check(hook)]:
        del hooks[key]


def _is_check(hook) -> bool:
    # torch keeps a hook registered with its module wrapped (`.hook`, the function itself)
    return getattr(hook, "hook", hook) is check_before_loading
