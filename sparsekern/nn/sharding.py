"""Refusing models whose weights are sharded across ranks (FSDP, `fully_shard`, tensor parallelism).

A mask is chosen over a whole weight (a top-k, a drop-and-grow), and a rank that holds one shard of
it sees only part of the scores; sparsekern's ops also have no sharding rules for DTensor. Without
this check such a model fails deep inside an op ("got mixed torch.Tensor and DTensor", "does not have
a sharding strategy registered"), and after a constructor has accepted it. Replicated training
(DistributedDataParallel) keeps whole weights on every rank and is supported.
"""
from __future__ import annotations

import sys

from torch import nn


# Why the algorithms, sparsify and the other writers of masks refuse a sharded model, and what to do instead.
_MASKS_NEED_WHOLE_WEIGHTS = ("masks are chosen over whole weights, which a sharded rank does not hold: wrap the model "
                             "in DistributedDataParallel instead (every rank keeps whole weights)")


def refuse_sharded(model: nn.Module, who: str, why: str = _MASKS_NEED_WHOLE_WEIGHTS) -> None:
    """ValueError naming the first sharded piece of `model`, if any; nothing is read or changed. `why` ends the
    message: what `who` needs whole weights for, and what to do instead (by default, the writers of masks' reason).

    Only wrappers whose modules are loaded can have sharded the model, so this imports nothing and
    costs one pass over the modules when neither FSDP nor DTensor was ever imported."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    wrapper = getattr(fsdp, "FullyShardedDataParallel", None)
    for name, module in model.named_modules():
        if wrapper is not None and isinstance(module, wrapper):
            found = f"module {name or '(root)'!r} is wrapped in FullyShardedDataParallel"
        elif any(is_dtensor(p) for p in module.parameters(recurse=False)):
            found = f"module {name or '(root)'!r} holds DTensor parameters (fully_shard or tensor parallelism)"
        else:
            continue
        raise ValueError(f"{who}: model is sharded across ranks ({found}); {why}")


def is_dtensor(tensor) -> bool:
    """Whether `tensor` is a DTensor (a shard of a tensor spread over ranks); imports nothing, as above."""
    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    return dtensor is not None and isinstance(tensor, dtensor)
