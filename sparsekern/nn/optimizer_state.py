"""The optimizer's per-weight state (momentum, Adam's moments) that a mask change must reset off the new mask: left
there, the next step would move pruned weights off 0. Reset means zeroed, or, for the few states that do not start at
0 (Rprop's step sizes, Adagrad's sums: `fresh_state`), set to the value they start at, for weights grown there
later. Shared by every writer of masks that takes an optimizer (`sparsify`, `SparseModule.set_mask`, the algorithms,
`broadcast_masks`)."""

from __future__ import annotations

import sys

import torch
from torch import Tensor

from .. import ops
from ..ops import _checks


def check_optimizer(optimizer, instead: str) -> None:
    """TypeError unless `optimizer` is a torch.optim.Optimizer or None; ValueError for an LBFGS, whose
    state (its last steps and gradient changes, each flattened over all its parameters) cannot be
    zeroed off new masks: its next step would move the weights they prune off 0 (its closure's
    backward also recomputes the gradients an algorithm has masked). `instead`: what to do."""
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
    if isinstance(optimizer.optim if state_is_sharded(optimizer) else optimizer, torch.optim.LBFGS):
        raise ValueError("optimizer is a torch.optim.LBFGS, whose history of flattened steps cannot be zeroed off "
                         f"the masks: its next step would move pruned weights off 0; {instead}")


def trained_parameters(optimizer: torch.optim.Optimizer) -> set[int]:
    """The ids of the parameters `optimizer` trains (in any of its groups): an optimizer that trains none of the weights
    a caller masks is another model's, passed by mistake, whose state could be zeroed off no mask."""
    return {id(parameter) for group in optimizer.param_groups for parameter in group["params"]}


def optimizer_state(optimizer: torch.optim.Optimizer, weight: Tensor) -> list[Tensor]:
    """The optimizer's per-entry state tensors of `weight` (not scalars such as Adam's step; none of a 0-d
    weight, whose every state is shaped like that step, which Adam keeps on the CPU, not on the weight's
    device). A ZeroRedundancyOptimizer keeps this rank's shard of its state in its local optimizer, not in its
    own `state` (empty): that shard is read, and every rank, which runs the same code, masks its own."""
    return list(_weight_shaped_state(optimizer, weight).values())


def _weight_shaped_state(optimizer: torch.optim.Optimizer, weight: Tensor) -> dict[str, Tensor]:
    """`optimizer_state(optimizer, weight)` by the optimizer's key ("momentum_buffer", "exp_avg", ...)."""
    return {key: value for key, value in _state(optimizer).get(weight, {}).items()
            if isinstance(value, Tensor) and weight.dim() and value.shape == weight.shape}


@torch.no_grad()   # as mask_state_in_place writes: a state tensor that requires grad is no refusal
def check_state_writable(optimizer: torch.optim.Optimizer, weight: Tensor, mask: Tensor | None, layer: str) -> None:
    """ValueError naming the entry for an `optimizer_state` tensor of `weight` that `mask_state_in_place` could not
    zero off `mask` (the layer's mask; None for one not made yet), checked before anything changes: an expanded or
    overlapping view, one sharing memory with the mask, an inference tensor (`ops._checks.writable_in_place`), one on
    another device than the weight (on the meta device, it has no values to zero, and was passed over silently).
    Found only once written, it would leave the layers before it zeroed and the ones after not."""
    mask = weight.new_empty(0, dtype=torch.bool) if mask is None else mask   # a new mask shares no memory
    for key, tensor in _weight_shaped_state(optimizer, weight).items():
        name = f"optimizer.state[{layer}.weight][{key!r}]"
        if tensor.device != weight.device:
            raise ValueError(f"{name} is on {tensor.device}, its weight on {weight.device}: it cannot be zeroed off "
                             f"the mask{' (the meta device holds no values)' if tensor.is_meta else ''}")
        _checks.writable_in_place(tensor, name, mask, f"{layer}.mask")


def fresh_state(optimizer: torch.optim.Optimizer, weight: Tensor) -> list[tuple[Tensor, float | complex | Tensor]]:
    """The `optimizer_state` tensors of `weight` whose fresh state (what the optimizer makes for a weight it has not
    stepped) is not 0, each with that value: Rprop's `step_size` starts at the lr of the weight's group, Adagrad's
    `sum` at its `initial_accumulator_value` (the constructor's, which torch gives every group). Off a mask they hold
    it, so that a weight grown there starts as a fresh one would: zeroed, Rprop's steps would start at its
    step_sizes minimum (1e-6) and Adagrad's first step would be lr·g/|g|. Every other torch.optim state shaped like
    the weight starts at 0 (checked against torch 2.13's `_init_group`s), so this is empty for them, and the zeroing
    kernels alone reset it. A complex state holds the value in both parts, as torch starts it. A Tensor lr is kept a
    tensor (0-d, on the weight's device unless on the CPU), not read to the host (a sync on GPU at every update of
    every layer): `fill_fresh` writes it."""
    local = optimizer.optim if state_is_sharded(optimizer) else optimizer
    if isinstance(local, torch.optim.Rprop):
        group = next((group for group in local.param_groups if any(p is weight for p in group["params"])), None)
        values = {} if group is None else {"step_size": _lr_value(group["lr"], weight)}
    elif isinstance(local, torch.optim.Adagrad):
        initial = float(local.defaults["initial_accumulator_value"])
        values = {"sum": initial} if initial else {}   # 0, its default, is what the zeroing leaves
    else:
        return []
    return [(tensor, values[key] * (1 + 1j) if tensor.is_complex() else values[key])
            for key, tensor in _weight_shaped_state(optimizer, weight).items() if key in values]


def _lr_value(lr: float | Tensor, weight: Tensor) -> float | Tensor:
    """Rprop's `lr` as `fill_fresh` takes it: a float, or a 1-element Tensor as a 0-d one, which torch.where reads on
    the device (moved to the weight's unless it is on the CPU, whose 0-d tensors any device's ops take as numbers)."""
    if not isinstance(lr, Tensor):
        return float(lr)
    lr = lr.detach().reshape(())
    return lr if lr.device.type == "cpu" else lr.to(weight.device)


def fill_fresh(tensor: Tensor, where: Tensor, value: float | complex | Tensor) -> None:
    """Sets `tensor` (a state of `fresh_state`) to its fresh `value` at `where` (bool, its shape), in place. A Tensor
    value goes through torch.where, which reads it on the device: masked_fill_ would read it to the host."""
    if isinstance(value, Tensor):
        torch.where(where, value, tensor, out=tensor)
    else:
        tensor.masked_fill_(where, value)


def reset_state_off_mask(optimizer: torch.optim.Optimizer, weight: Tensor, mask: Tensor) -> None:
    """Resets every `optimizer_state` tensor of `weight` off `mask` (bool, the weight's shape and device) to the
    optimizer's fresh value there (`fresh_state`), 0 for all but a few (`mask_state_in_place`). Checked first by
    `check_state_writable`."""
    fresh = {id(tensor): value for tensor, value in fresh_state(optimizer, weight)}
    for tensor in optimizer_state(optimizer, weight):
        if id(tensor) in fresh:
            fill_fresh(tensor, ~mask, fresh[id(tensor)])
        else:
            mask_state_in_place(tensor, mask)


def mask_state_in_place(tensor: Tensor, mask: Tensor) -> None:
    """Zeroes one of `optimizer_state`'s tensors off `mask` (bool, its shape), in place: by `ops.mask_in_place` (one
    pass, no `~mask` temporary, the same +0.0 off the mask as masked_fill_) where it takes the tensor, a plain floating
    one on the mask's device; by masked_fill_(~mask, 0) otherwise, as before, for any other state an optimizer may
    keep (integer, or a quantized optimizer's tensor subclass, which the extension's kernel cannot read)."""
    if (type(tensor) is Tensor and tensor.dtype in _checks.SCORE_DTYPES and tensor.layout == torch.strided
            and tensor.device == mask.device):
        ops.mask_in_place(tensor, mask)
    else:
        tensor.masked_fill_(~mask, 0)


def state_is_sharded(optimizer: torch.optim.Optimizer) -> bool:
    """Whether each rank holds the state of its own share of the parameters only (ZeroRedundancyOptimizer).

    Imports nothing: only a loaded module can have made the optimizer, and importing torch.distributed.optim
    warns (its modules call the deprecated torch.jit.script), which the command line showed after every run."""
    module = sys.modules.get("torch.distributed.optim.zero_redundancy_optimizer")
    zero = getattr(module, "ZeroRedundancyOptimizer", None)
    return zero is not None and isinstance(optimizer, zero)


def _state(optimizer: torch.optim.Optimizer) -> dict:
    return optimizer.optim.state if state_is_sharded(optimizer) else optimizer.state
