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

import torch
from torch import nn
from torch.optim import swa_utils

from .modules import sparse_modules


class SparseAveragedModel(swa_utils.AveragedModel):
    """torch.optim.swa_utils.AveragedModel (same arguments; `get_ema_multi_avg_fn` for an EMA) whose sparse
    layers compute with the averaged weights under the source model's current masks (module docstring).

    `update_parameters(model)` refuses (ValueError, nothing changed) a model whose sparse layers differ in
    number, shape, order or name (wrappers aside: DDP's "module.", torch.compile's "_orig_mod.", around the
    model or a submodule) from the averaged model's: torch pairs parameters by position and would average
    mismatched ones silently, or stop half-way."""

    def __init__(self, model: nn.Module, device=None, avg_fn=None, multi_avg_fn=None, use_buffers: bool = False):
        _check_model(model)
        # SWA by default, through its one-tensor form on every device: torch's multi-tensor form, which it picks
        # on CUDA, raises on an integer buffer (BatchNorm's num_batches_tracked) under use_buffers=True.
        multi = multi_avg_fn is not None
        average = _MasksCopied(multi_avg_fn if multi else avg_fn, multi)
        super().__init__(model, device, avg_fn=None if multi else average, multi_avg_fn=average if multi else None,
                         use_buffers=use_buffers)
        self._hold_values_off_the_masks()

    def update_parameters(self, model: nn.Module) -> None:
        _check_model(model)
        averaged, live = _layers(self.module), _layers(model)
        if live != averaged:
            raise ValueError(f"model holds other sparse layers than the averaged model (names and mask shapes "
                             f"{live}, averaged {averaged}): pass the model this SparseAveragedModel was made from")
        super().update_parameters(model)
        self._hold_values_off_the_masks()

    def _hold_values_off_the_masks(self) -> None:
        # No pass over the weights to check: after any mask update the average is non-zero off the new
        # masks, and an averaged model is evaluated, where the masked path's one select per layer is cheap.
        for _, module in sparse_modules(self.module):
            module.zero_off_mask = False


class _MasksCopied:
    """An AveragedModel averaging function (`multi`: a multi_avg_fn, over lists of one device and dtype, as
    torch groups them; else an avg_fn, SWA's if None) under which a bool tensor, a mask, takes the live
    model's values: averaged, masks would become their union (an EMA) or raise (SWA subtracts them). A class,
    not a closure, so that an averaged model with the default average pickles as torch's does."""

    def __init__(self, function, multi: bool):
        self.function, self.multi = function, multi

    def __call__(self, averaged, current, num_averaged):
        if self.multi:
            if averaged[0].dtype == torch.bool:
                torch._foreach_copy_(averaged, current)
                return None
            return self.function(averaged, current, num_averaged)
        if averaged.dtype == torch.bool:
            return current
        return (self.function or swa_utils.get_swa_avg_fn())(averaged, current, num_averaged)


def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


# The attributes under which DDP and torch.compile hold the model they wrap (at the root or on a submodule): the
# averaged model is often made from the unwrapped model, or the other way round.
_WRAPPERS = ("module", "_orig_mod")


def _layers(model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """(name without wrappers, mask shape) of each sparse layer, in the order torch pairs their parameters."""
    return [(".".join(part for part in name.split(".") if part not in _WRAPPERS), tuple(module.mask.shape))
            for name, module in sparse_modules(model)]
