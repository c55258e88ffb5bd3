"""SparseAveragedModel: torch.optim.swa_utils.AveragedModel (EMA, SWA) for a model with sparse layers.

An average of a sparse training run's weights spans every mask the run had (DST moves the masks), so the
averaged weights are non-zero off the current ones. The averaged model computes with them under the live
masks, which each `update_parameters` copies in: its sparse layers hold values off their masks, and say so
(`zero_off_mask = False`). Torch's own AveragedModel copies the masks in place behind the layers' backs;
a layer notices at its next forward in eager mode, but neither a compiled model nor
nn.TransformerEncoderLayer's fused eval-mode kernel (which reads the weights without running the layers)
does. With `use_buffers=True` torch also averages the bool masks: an EMA into the union of every mask seen,
SWA (its default average) not at all, raising at the second update (it subtracts bools). Here the other
buffers (BatchNorm statistics) are averaged and the bool ones, the masks, copied.
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn
from torch.optim import swa_utils

from ..ops import _checks
from .modules import _PACKED_FIELDS, SparseModule, check_own_masks, sparse_modules
from ._wrappers import unwrapped


class SparseAveragedModel(swa_utils.AveragedModel):
    """torch.optim.swa_utils.AveragedModel (same arguments; `get_ema_multi_avg_fn` for an EMA) whose sparse
    layers compute with the averaged weights under the source model's current masks (module docstring).

    `update_parameters(model)` refuses (ValueError, nothing changed) a model whose sparse layers, or whose
    parameters (and buffers, with `use_buffers`), differ in number, shape, order or name (wrappers aside: DDP's
    "module.", torch.compile's "_orig_mod.", around the model or a submodule) from the averaged model's: torch
    pairs them by position and would average mismatched ones silently, or stop half-way; so is a model sharing
    parameters with the average (this SparseAveragedModel itself, or its `.module`), which would be averaged with
    itself; and so is a model holding a tensor on the meta device, or an averaged model made from one.

    A non-callable `avg_fn` or `multi_avg_fn`, both given, or a `use_buffers` that is no bool are refused here
    (TypeError/ValueError naming the argument): torch's AveragedModel takes them, and fails, or ignores avg_fn,
    only at the second update (the first copies the weights).

    A `model` with no sparse layer is averaged as torch's AveragedModel averages it, with a warning naming
    `model`: the average is right (a dense baseline may share the code), but a model meant to be sparse was
    not sparsified (`sparsekern.sparsify`), or the wrong model was passed."""

    def __init__(self, model: nn.Module, device=None, avg_fn=None, multi_avg_fn=None, use_buffers: bool = False):
        _check_model(model)
        # torch takes any of these and fails, or ignores avg_fn, only at the second update: the first copies.
        for name, function in (("avg_fn", avg_fn), ("multi_avg_fn", multi_avg_fn)):
            if function is not None and not callable(function):
                raise TypeError(f"{name} must be callable or None, got {type(function).__name__}")
        if avg_fn is not None and multi_avg_fn is not None:
            raise ValueError("avg_fn and multi_avg_fn were both given, and torch's AveragedModel would use "
                             "multi_avg_fn alone: give one of them")
        _checks.flag(use_buffers, "use_buffers")
        if not sparse_modules(model):
            warnings.warn(f"model ({type(model).__name__}) holds no sparse layer: SparseAveragedModel averages it "
                          f"as torch.optim.swa_utils.AveragedModel does; sparsify it first "
                          f"(sparsekern.sparsify) if it is meant to be sparse", stacklevel=2)
        # SWA by default, in a multi-tensor form of its own (`_swa`): torch's, which it picks on CUDA, raises on an
        # integer buffer (BatchNorm's num_batches_tracked) under use_buffers=True, and its one-tensor form, which
        # it picks on CPU, costs a few Python-side ops per tensor.
        multi = multi_avg_fn is not None or avg_fn is None
        average = _MasksCopied(multi_avg_fn if multi_avg_fn is not None else avg_fn, multi)
        super().__init__(model, device, avg_fn=None if multi else average, multi_avg_fn=average if multi else None,
                         use_buffers=use_buffers)
        self._hold_values_off_the_masks()

    def update_parameters(self, model: nn.Module) -> None:
        """AveragedModel's update from `model`, the model this was made from, whose current masks the averaged
        sparse layers then compute under; ValueError, nothing changed, for a model with other sparse layers.

        A layer in inference mode (`sparsekern.nn.to_inference`), of the averaged model or of `model`, stays in it,
        the averaged one packed again from the new average and mask."""
        self._check_update(model)
        # torch pairs the two models' buffers by position (copying the model's into the averaged one's without
        # use_buffers): the packs, which only a layer in inference mode holds, are taken out for the update, then
        # made anew (torch copied a mask into a pack, or stopped at the model's extra one, after averaging weights).
        serving = [module for source in (self.module, model) for module in _serving(source)]
        for module in serving:
            module.to_training()
        try:
            super().update_parameters(model)
        finally:
            for module in serving:
                module.to_inference()
        self._hold_values_off_the_masks()

    def _check_update(self, model: nn.Module) -> None:
        """ValueError or TypeError for a `model` that `update_parameters` must refuse (see the class), before anything
        changes."""
        _check_model(model)
        averaged_parameters = {id(parameter) for parameter in self.module.parameters()}
        if any(id(parameter) in averaged_parameters for parameter in model.parameters()):
            # torch would average the tensors with themselves, or stop half-way on a mismatch of its own pairing.
            raise ValueError("model shares parameters with the averaged model (this SparseAveragedModel or its "
                             ".module was passed): pass the trained model this SparseAveragedModel was made from")
        for owner, checked in (("model", model), ("the averaged model", self.module)):
            on_meta = _on_meta(checked)
            if on_meta:   # torch raised NotImplementedError ("Cannot copy out of meta tensor"), naming no tensor
                raise ValueError(f"{owner} holds tensors on the meta device, which holds no values to average: "
                                 f"{on_meta}; materialize it first (to_empty, then initialise it or load its state "
                                 f"dict)")
        # Under use_buffers the live masks are copied into the averaged ones, torch's copy refusing an expanded one
        # only after the layers before it were averaged.
        check_own_masks(sparse_modules(model), "update_parameters: model", written=False)
        check_own_masks(sparse_modules(self.module), "update_parameters: the averaged model", written=self.use_buffers)
        averaged, live = _layers(self.module), _layers(model)
        if live != averaged:
            raise ValueError(f"model holds other sparse layers than the averaged model (names and mask shapes "
                             f"{live}, averaged {averaged}): pass the model this SparseAveragedModel was made from")
        mismatch = _first_mismatch(_paired(self.module, self.use_buffers), _paired(model, self.use_buffers))
        if mismatch:
            # torch pairs the tensors by position: it averaged the first ones and stopped at a shape mismatch, or
            # averaged tensors of different layers of one shape, or left the extra ones out, silently.
            raise ValueError(f"model holds other {'tensors' if self.use_buffers else 'parameters'} than the averaged "
                             f"model ({mismatch}): pass the model this SparseAveragedModel was made from")

    def _hold_values_off_the_masks(self) -> None:
        # No pass over the weights to check: after any mask update the average is non-zero off the new
        # masks, and an averaged model is evaluated, where the masked path's one select per layer is cheap.
        for _, module in sparse_modules(self.module):
            module.zero_off_mask = False


class _MasksCopied:
    """An AveragedModel averaging function (`multi`: a multi_avg_fn, over lists of one device and dtype, as
    torch groups them; else an avg_fn; SWA's, `_swa`, if None) under which a bool tensor, a mask, takes the
    live model's values: averaged, masks would become their union (an EMA) or raise (SWA subtracts them). A
    class, not a closure, so that an averaged model with the default average pickles as torch's does."""

    def __init__(self, function, multi: bool):
        self.function, self.multi = function, multi

    def __call__(self, averaged, current, num_averaged):
        if self.multi:
            if averaged[0].dtype == torch.bool:
                torch._foreach_copy_(averaged, current)
                return None
            return (self.function or _swa)(averaged, current, num_averaged)
        if averaged.dtype == torch.bool:
            return current
        # SWA's one-tensor form: the default of an averaged model pickled before the default was `_swa`.
        return (self.function or swa_utils.get_swa_avg_fn())(averaged, current, num_averaged)


# Entries per multi-tensor call of `_swa`: its temporaries (current - averaged) stay in cache between its three
# calls. Measured on one CPU thread, an update of ResNet-50's 161 weight and BatchNorm tensors (25.6M entries):
# 42-56 ms in batches of 64K-256K entries, 48-62 ms of 1M, 112-135 ms all in one call, 106-135 ms one tensor at
# a time (torch's one-tensor form); ResNet-50/16 (0.1M): 0.7-0.8 ms in batches or in one call, 2.7-3.0 ms one
# tensor at a time.
_SWA_BATCH = 1 << 17


@torch.no_grad()
def _swa(averaged: list[Tensor], current: list[Tensor], num_averaged: Tensor) -> None:
    """SWA's running mean in place, over lists of one device and dtype: the ops of torch's one-tensor form
    (get_swa_avg_fn: averaged + (current - averaged) / (num_averaged + 1)), in that order and so with the same
    results bit for bit, as three multi-tensor calls per batch of tensors (`_SWA_BATCH`) rather than four calls
    per tensor and an allocation for each. Torch's own multi-tensor form interpolates (lerp), which rounds
    otherwise. An integer buffer (BatchNorm's num_batches_tracked) takes the one-tensor form: true division,
    then the copy back truncates, as torch's one-tensor path does."""
    if not averaged[0].is_floating_point():
        average = swa_utils.get_swa_avg_fn()
        for averaged_tensor, current_tensor in zip(averaged, current):
            averaged_tensor.copy_(average(averaged_tensor, current_tensor, num_averaged))
        return
    divisor = num_averaged + 1
    start = 0
    while start < len(averaged):
        end, entries = start + 1, averaged[start].numel()
        while end < len(averaged) and entries + averaged[end].numel() <= _SWA_BATCH:
            entries += averaged[end].numel()
            end += 1
        steps = torch._foreach_sub(current[start:end], averaged[start:end])
        torch._foreach_div_(steps, divisor)
        torch._foreach_add_(averaged[start:end], steps)
        start = end


def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def _layers(model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """(name without wrappers, mask shape) of each sparse layer, in the order torch pairs their parameters."""
    return [(unwrapped(name), tuple(module.mask.shape)) for name, module in sparse_modules(model)]


def _paired(model: nn.Module, use_buffers: bool) -> list[tuple[str, tuple[int, ...]]]:
    """(name without wrappers, shape) of each tensor AveragedModel.update_parameters pairs by position: the
    parameters, then, with `use_buffers`, the buffers."""
    packs = {id(module._buffers[f"packed_{field}"]) for module in _serving(model) for field in _PACKED_FIELDS}
    buffers = [(name, buffer) for name, buffer in model.named_buffers() if id(buffer) not in packs]  # taken out
    tensors = [*model.named_parameters(), *(buffers if use_buffers else ())]
    return [(unwrapped(name), tuple(tensor.shape)) for name, tensor in tensors]


def _serving(model: nn.Module) -> list[SparseModule]:
    """The sparse layers of `model` in inference mode (`SparseLinear.to_inference`), which hold packs."""
    return [module for _, module in sparse_modules(model) if module._in_inference_mode]


def _on_meta(model: nn.Module) -> list[str]:
    """The names (without wrappers) of `model`'s parameters and buffers on the meta device: update_parameters copies
    or averages them all (the buffers are copied where they are not averaged)."""
    return [unwrapped(name) for name, tensor in (*model.named_parameters(), *model.named_buffers()) if tensor.is_meta]


def _first_mismatch(averaged: list, live: list) -> str:
    """Where two lists of `_paired` differ, in words ("" where they do not)."""
    for position, (mine, theirs) in enumerate(zip(averaged, live)):
        if mine != theirs:
            return (f"at position {position}: {theirs[0]!r} of shape {theirs[1]}, averaged {mine[0]!r} of shape "
                    f"{mine[1]}")
    if len(averaged) != len(live):
        return f"{len(live)} of them, the averaged model {len(averaged)}"
    return ""
