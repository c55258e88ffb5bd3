"""SparseAveragedModel: torch.optim.swa_utils.AveragedModel (EMA, SWA) for a model with sparse layers.

An average of a sparse training run's weights spans every mask the run had (DST moves the masks), so the
averaged weights are non-zero off the current ones. The averaged model computes with them under the live
masks, which each `update_parameters` copies in: its sparse layers hold values off their masks, and say so
(`zero_off_mask = False`). Torch's own AveragedModel copies the masks in place behind the layers' backs;
a layer notices at its next forward in eager mode, but neither a compiled model nor
nn.TransformerEncoderLayer's fused eval-mode kernel (which reads the weights without running the layers)
does. With `use_buffers=True` torch also averages the bool masks, into the union of every mask seen: here
the other buffers (BatchNorm statistics) are averaged and the masks copied.
"""
from __future__ import annotations

from torch import nn
from torch.optim import swa_utils

from .modules import sparse_modules


class SparseAveragedModel(swa_utils.AveragedModel):
    """torch.optim.swa_utils.AveragedModel (same arguments; `get_ema_multi_avg_fn` for an EMA) whose sparse
    layers compute with the averaged weights under the source model's current masks (module docstring).

    `update_parameters(model)` refuses (ValueError, nothing changed) a model whose sparse layers differ in
    number or shape from the averaged model's: torch pairs parameters by position and would average
    mismatched ones silently, or stop half-way."""

    def __init__(self, model: nn.Module, *args, **kwargs):
        super().__init__(model, *args, **kwargs)
        self._hold_values_off_the_masks()

    def update_parameters(self, model: nn.Module) -> None:
        averaged, live = sparse_modules(self.module), sparse_modules(model)
        shapes = [tuple(module.mask.shape) for _, module in averaged]
        if [tuple(module.mask.shape) for _, module in live] != shapes:
            raise ValueError(f"model holds other sparse layers than the averaged model (mask shapes "
                             f"{[tuple(module.mask.shape) for _, module in live]}, averaged {shapes}): "
                             f"pass the model this SparseAveragedModel was made from")
        super().update_parameters(model)
        if self.use_buffers:   # torch averaged the bool masks with the other buffers: the live ones instead
            for (_, mine), (_, theirs) in zip(averaged, live):
                mine.mask.copy_(theirs.mask)
        self._hold_values_off_the_masks()

    def _hold_values_off_the_masks(self) -> None:
        # No pass over the weights to check: after any mask update the average is non-zero off the new
        # masks, and an averaged model is evaluated, where the masked path's one select per layer is cheap.
        for _, module in sparse_modules(self.module):
            module.zero_off_mask = False

