"""What a run costs in multiply-accumulates (MACs; FLOPs = 2 x MACs), counted as sparse-training papers count it.

Inference: `sk.flops` of the model on one example, its sparse MACs and their ratio to the dense model's (SET, RigL,
MEST report this fraction).

Training: the accounting of RigL's paper (Evci et al. 2020, Sec. 4 and Appendix H), applied step by step to what the
run did. With f_S the sparse forward MACs of one example at the step's masks and f_D the dense ones, a step costs
f_S for the forward and 2 f_S for the backward (the gradients of the activations and of the active weights), 3 f_S
in all; where a layer computes the dense weight gradient in that step (its `dense_grad` set: DST's update steps,
which RigL's growth reads; OptG's every step, whose scores read it) its weight gradient costs its dense MACs instead
of its sparse ones (RigL's update step: 2 f_S + f_D). This DST computes the dense gradient on the update steps of
every criterion, SET's and MEST's too (grown weights get their first gradient step at the update; without it MEST
trained measurably worse: `DST._dense_grad_next`), so they count what RigL counts, where RigL's paper counts SET at
3 f_S throughout. Each step counts its examples (the epoch's last, shorter batch fewer); steps a rewound ticket
skips count nothing; the masks are read at each step, so a method
that trains denser first (IMP's dense first cycle, SWAMP, OptG's and GMP's ramps) counts the density it used. The
fraction divides by a dense run of the same epochs and batches: 3 f_D per example of each of --epochs epochs (one
segment: IMP's cycles and SWAMP's particles each cost a training of their own). Gradient-flow measurements and
evaluation are not training and are not counted, nor are the mask updates' own selections (a few operations per
weight, as the paper leaves them out). These are the papers' theoretical counts for kernels that skip the masked-out
products, not what this package's kernels execute (a masked dense product costs dense compute).

Counted layers are the CLI's models': Linear and Conv layers, sparse or dense, where each weight entry costs the
same MACs per example (its positions), so that a layer's sparse MACs are its active entries times those.
"""
from __future__ import annotations

import torch
from torch import nn

from ..nn import flops


class TrainingCost:
    """Counts the MACs of a run's training steps (module docstring) on `model`, measured on `example` (one input of
    batch 1) once: each counted layer's positions per example, f_D. The masks and `dense_grad` flags are read at
    each `step`."""

    def __init__(self, model: nn.Module, example: torch.Tensor):
        counted = flops(model, example, print_fn=None)
        modules = dict(model.named_modules())
        self._layers = []
        for row in counted["layers"]:
            module = modules[row["name"]]
            weight = getattr(module, "weight", None)
            positions, left = divmod(row["dense_macs"], weight.numel()) if isinstance(weight, torch.Tensor) else (0, 1)
            if left:
                raise ValueError(f"training cost: layer {row['name']!r} ({row['type']}) is not a Linear or Conv "
                                 f"layer, whose weight entries each cost the same MACs per example")
            self._layers.append((module, positions, weight.numel()))
        self.dense_macs = counted["dense_macs"]
        self._active: dict[int, tuple[torch.Tensor, int, int]] = {}

    def step(self, examples: int) -> int:
        """The MACs of a training step on `examples` examples at the layers' current masks and `dense_grad` flags
        (read before the step's forward: the forward saves them for its backward)."""
        per_example = 0
        for module, positions, size in self._layers:
            active = self._active_entries(module, size)
            weight_gradient = size if getattr(module, "dense_grad", False) else active
            per_example += positions * (2 * active + weight_gradient)
        return examples * per_example

    def dense_step(self, examples: int) -> int:
        """A dense step's MACs on `examples` examples: 3 f_D."""
        return examples * 3 * self.dense_macs

    def _active_entries(self, module: nn.Module, size: int) -> int:
        """The active entries of `module`'s weight (all for a dense layer), read back only when its mask changed
        (another tensor, or written in place: its version moved), so that a step between mask updates reads
        nothing from the device."""
        mask = getattr(module, "mask", None)
        if mask is None:
            return size
        seen = self._active.get(id(module))
        if seen is None or seen[0] is not mask or seen[1] != mask._version:
            seen = (mask, mask._version, int(mask.count_nonzero()))   # holds the mask: its id is not reused
            self._active[id(module)] = seen
        return seen[2]


def inference(model: nn.Module, example: torch.Tensor) -> dict:
    """{"inference_macs": sparse MACs of one forward on `example` (one input of batch 1), "inference_flops_fraction":
    their ratio to the dense model's}: `sk.flops`, printing nothing."""
    counted = flops(model, example, print_fn=None)
    return {"inference_macs": counted["sparse_macs"], "inference_flops_fraction": counted["ratio"]}
