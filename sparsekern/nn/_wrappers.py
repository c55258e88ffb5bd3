"""The names that wrappers add: DistributedDataParallel holds the model it wraps as `module`, torch.compile as
`_orig_mod` (at the root, or on a submodule), so that one model's layers are named with a prefix or without it,
depending on which side of the wrapper they were read from. Errors comparing names use this to say so."""
from __future__ import annotations

_WRAPPERS = ("module", "_orig_mod")


def unwrapped(name: str) -> str:
    """A parameter's or module's qualified name without the wrappers' parts."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPERS)


def added_prefix(names: list, others: list[str]) -> tuple[str, bool] | None:
    """(prefix, whether `names` carry it) where the two lists of layer names are the same layers but for one prefix
    ending in "." on one side (a wrapper's: see the module's docstring; the prefix may be longer, "model.module.");
    None where they differ otherwise, or `names` holds a name that is no str."""
    if not names or len(names) != len(others) or not all(isinstance(name, str) for name in names):
        return None
    for longer, shorter, in_names in ((sorted(names), sorted(others), True),
                                      (sorted(others), sorted(names), False)):
        prefix = longer[0][:len(longer[0]) - len(shorter[0])]
        if prefix.endswith(".") and all(long == prefix + short for long, short in zip(longer, shorter)):
            return prefix, in_names
    return None
