"""Dynamic sparse training: SET, RigL, MEST and the pruning criteria of "Fantastic Weights".

Every `update_every` steps until `end_step`, each sparse layer (or, with scope="global", all of
them together) drops n = round(r(t) · active) active weights by a pruning criterion and grows n
by a growth criterion (`sparsekern.algorithms.criteria`, `sparsekern.algorithms.schedules`); the active count is
unchanged. Usage, once per training step:

    loss.backward()
    algo.step()          # after backward, before the optimizer step
    optimizer.step()

Masking path. The sparse modules mask the weight gradient inside their op, so on steps that do
not update masks inactive weights get gradient 0 and, with their optimizer state at 0, stay
exactly 0 under SGD (momentum, weight decay) and Adam/AdamW; `step()` then only counts. Dense
gradients are produced only for update steps: at the end of the step before one, `dense_grad` is
set on every sparse module (only if a criterion reads gradients) and cleared at the update.
No gradient buffer is kept between steps.
"""
from __future__ import annotations

import zlib

import dataclasses

import torch
from torch import Tensor, nn

from .. import ops
from . import criteria, schedules
from ..nn import sparse_modules

SCOPES = ("layer", "global")



def _stream_seed(seed: int) -> int:
    """DST's own seed for `seed`: deterministic, and not `seed` itself (see DST's `seed`)."""
    return zlib.crc32(f"sparsekern.DST/{seed}".encode())

class DST:
    """Drop-and-grow mask updates on the sparse modules of `model`.

    Args:
        model: holds sparse modules (`sparsekern.sparsify`); their masks and weights are updated
            in place, and must stay on one device.
        optimizer: the torch optimizer of the model's parameters; its per-weight state tensors
            (momentum, Adam moments: every state tensor shaped like the weight) are zeroed at
            inactive positions on update steps.
        prune: pruning criterion, one of `sparsekern.algorithms.criteria.PRUNE` (drop the lowest score):
            "magnitude", "set", "mest", "snip", "sensitivity", "rsensitivity", "random".
        grow: growth criterion, "gradient" (largest |g| among inactive) or "random".
        drop_fraction: α, the schedule's initial fraction (default per schedule: 0.3 cosine and
            constant, 0.5 annealed).
        final_drop_fraction: the annealed schedule's final fraction (default 0.005).
        schedule: "cosine" (RigL), "constant" (SET) or "annealed" (Fantastic Weights).
        update_every: ΔT, steps between mask updates.
        end_step, end_fraction: the end point T_end, no updates from it on: a step, or a
            fraction of total_steps (at most one of them; default 0.75 for cosine and constant,
            as RigL's paper runs RigL and SET, 1.0 for annealed).
        total_steps: length of training, in `step()` calls.
        scope: "layer" (each layer keeps its count; `ops.prune_grow`) or "global" (one selection
            of the drop and one of the growth over all layers; `ops.topk_mask`; layer counts may
            change, the total stays).
        reset_state: zero the optimizer state at newly grown positions (RigL). Dropped positions'
            state is always zeroed, because momentum left there would move an inactive weight off
            0; so with SGD and Adam, whose state at an inactive weight is then 0, False (the
            Fantastic Weights code) changes nothing, and it matters only for optimizers that keep
            non-zero state at zero-gradient entries.
        block: None, or (bh, bw): masks are all-or-nothing per bh×bw block of the weight viewed
            as (out, rest) (edge blocks may be smaller). Scores are summed per block and whole
            blocks are dropped and grown, n = round(r · active blocks). Masks that are not block
            structured are made so at construction: each layer keeps round(active / (bh·bw))
            blocks, those holding the most active weights (ties to the lower block). Not with
            prune="set", whose score is a rank, not a per-weight quantity.
        mest_gamma: γ of the MEST criterion |θ| + γ|g|.
        seed, generator: random criteria draw from `generator` (a torch.Generator on the
            weights' device), or from a new one whose stream is derived from `seed` (default 0)
            and differs from `torch.Generator().manual_seed(seed)`'s, the generator a user most
            likely gave `sparsify`: growing from the stream that drew the masks would score the
            active positions highest and regrow exactly what was dropped. Equal seeds give equal
            masks, on every rank of a distributed run too.

    Calling `step()` after `optimizer.step()` instead is ALGORITHMS.md's "after" option: the
    optimizer step then sees the dense gradient of an update step and may move inactive weights,
    and the update that follows zeroes them again (and their optimizer state) off the new mask.

    n is clamped to min(active, inactive) (prune_grow's range), so an update never changes the
    active count. Step t counts `step()` calls from 1; updates happen at multiples of
    update_every below end_step. Newly grown weights start at 0; a just-dropped weight may be
    grown again and then keeps its value. After an update the gradients are masked by the new
    masks, so the optimizer step that follows sees masked gradients (grown weights get theirs).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, prune: str = "magnitude",
                 grow: str = "gradient", drop_fraction: float | None = None,
                 final_drop_fraction: float | None = None, schedule: str = "cosine",
                 update_every: int = 100, end_step: int | None = None, end_fraction: float | None = None,
                 total_steps: int,
                 scope: str = "layer", reset_state: bool = True, block: tuple[int, int] | None = None,
                 mest_gamma: float = 1.0, seed: int = 0, generator: torch.Generator | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self._prune = criteria.lookup(prune, criteria.PRUNE, "prune")
        self._grow = criteria.lookup(grow, criteria.GROW, "grow")
        self.schedule = schedules.make(schedule, total_steps, update_every=update_every, end_step=end_step,
                                       end_fraction=end_fraction, drop_fraction=drop_fraction,
                                       final_drop_fraction=final_drop_fraction)
        if not isinstance(scope, str):
            raise TypeError(f"scope must be a str, got {type(scope).__name__}")
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {list(SCOPES)}, got {scope!r}")
        if not isinstance(reset_state, bool):
            raise TypeError(f"reset_state must be a bool, got {type(reset_state).__name__}")
        block = _check_block(block)
        if block is not None and prune not in criteria.ELEMENTWISE:
            raise ValueError(f"block needs an elementwise pruning criterion, got prune={prune!r}")
        if isinstance(mest_gamma, bool) or not isinstance(mest_gamma, (int, float)):
            raise TypeError(f"mest_gamma must be a float, got {type(mest_gamma).__name__}")
        if not mest_gamma >= 0:
            raise ValueError(f"mest_gamma must be >= 0, got {mest_gamma}")
        self.modules = sparse_modules(model)
        if not self.modules:
            raise ValueError("model has no sparse modules; sparsify it first (sparsekern.sparsify)")
        device = self.modules[0][1].weight.device
        for name, module in self.modules:
            if module.weight.device != device:
                raise ValueError(f"sparse modules must share one device: {name} is on "
                                 f"{module.weight.device}, {self.modules[0][0]} on {device}")
        if generator is None:
            if isinstance(seed, bool) or not isinstance(seed, int):
                raise TypeError(f"seed must be an int, got {type(seed).__name__}")
            generator = torch.Generator(device=device).manual_seed(_stream_seed(seed))
        elif not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        elif generator.device.type != device.type:
            raise ValueError(f"generator is on {generator.device} but the weights are on {device}")

        self.optimizer = optimizer
        self.prune, self.grow, self.scope = prune, grow, scope
        self.reset_state, self.block, self.mest_gamma = reset_state, block, float(mest_gamma)
        self.generator = generator
        self.step_count = 0
        self._reads_gradient = prune in criteria.READS_GRADIENT or grow in criteria.READS_GRADIENT
        if block is not None:
            self._make_block_structured()
        # State left at inactive positions (say, from dense training before sparsify) would move
        # inactive weights off 0.
        with torch.no_grad():
            for _, module in self.modules:
                for tensor in self._state(module.weight):
                    tensor.masked_fill_(~module.mask, 0)
        self._set_dense_grad(self._dense_grad_next())

    def step(self) -> bool:
        """Counts one training step; on update steps updates the masks. Returns whether it did.

        Call after backward and before optimizer.step(). On steps that neither update nor precede
        an update it only counts.
        """
        self.step_count += 1
        updated = self.schedule.is_update(self.step_count)
        if updated:
            self._update(self.schedule.fraction(self.step_count))
        if updated or self.schedule.is_update(self.step_count + 1):
            self._set_dense_grad(self._dense_grad_next())
        return updated

    def state_dict(self) -> dict:
        """Step count, masks (by module name), schedule and random-generator state."""
        return {"step_count": self.step_count,
                "masks": {name: module.mask.clone() for name, module in self.modules},
                "schedule": dataclasses.asdict(self.schedule),
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        """Restores a `state_dict()`: step count, masks (weights are zeroed off them), schedule and
        generator. Checked completely before anything changes."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict, got {type(state).__name__}")
        missing = {"step_count", "masks", "schedule", "generator"} - set(state)
        if missing:
            raise ValueError(f"state lacks {sorted(missing)}")
        step_count = state["step_count"]
        if isinstance(step_count, bool) or not isinstance(step_count, int) or step_count < 0:
            raise ValueError(f"state['step_count'] must be an int >= 0, got {step_count!r}")
        masks = state["masks"]
        names = [name for name, _ in self.modules]
        if not isinstance(masks, dict) or sorted(masks) != sorted(names):
            raise ValueError(f"state['masks'] must hold the masks of {names}, got "
                             f"{sorted(masks) if isinstance(masks, dict) else type(masks).__name__}")
        for name, module in self.modules:
            mask = masks[name]
            if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != module.mask.shape:
                raise ValueError(f"state['masks'][{name!r}] must be a bool tensor of shape "
                                 f"{tuple(module.mask.shape)}")
        try:
            schedule = schedules.Schedule(**state["schedule"])
        except TypeError as error:
            raise ValueError(f"state['schedule'] is not a schedule: {error}") from None
        if not isinstance(state["generator"], Tensor):
            raise TypeError(f"state['generator'] must be a Tensor, got {type(state['generator']).__name__}")
        for name, module in self.modules:
            module.set_mask(masks[name].to(module.mask.device))
        self.schedule = schedule
        self.step_count = step_count
        self.generator.set_state(state["generator"])
        self._set_dense_grad(self._dense_grad_next())

    # -- internals ------------------------------------------------------------------------

    def _dense_grad_next(self) -> bool:
        return self._reads_gradient and self.schedule.is_update(self.step_count + 1)

    def _set_dense_grad(self, value: bool) -> None:
        for _, module in self.modules:
            module.dense_grad = value

    @torch.no_grad()
    def _update(self, fraction: float) -> None:
        weights = [module.weight for _, module in self.modules]
        grads = [w.grad for w in weights]
        if self._reads_gradient and any(g is None for g in grads):
            name = self.modules[[g is None for g in grads].index(True)][0]
            raise RuntimeError(f"{name}.weight has no gradient at update step {self.step_count}: call "
                               f"DST.step() after backward (prune={self.prune!r}, grow={self.grow!r} read it)")
        if self.scope == "layer":
            for (_, module), grad in zip(self.modules, grads):
                self._update_layer(module, grad, fraction)
        else:
            self._update_global(grads, fraction)

    def _scores(self, weights, grads, masks) -> tuple[list[Tensor], list[Tensor]]:
        options = dict(generator=self.generator, gamma=self.mest_gamma)
        prune = self._prune(weights, grads, masks, **options)
        grow = self._grow(weights, grads, masks, **options)
        dtype = prune[0].dtype
        for score in prune + grow:
            dtype = torch.promote_types(dtype, score.dtype)
        return [s.to(dtype) for s in prune], [s.to(dtype) for s in grow]

    def _update_layer(self, module, grad, fraction: float) -> None:
        weight, mask = module.weight, module.mask
        (prune,), (grow,) = self._scores([weight], [grad], [mask])
        state = self._state(weight)
        if self.block is None:
            n = _swap_count(fraction, mask)
            new = ops.prune_grow(weight, mask, prune, grow, n, state if self.reset_state else [])
        else:
            blocks = _Blocks(weight.shape, self.block)
            block_mask = blocks.mask(mask)
            n = _swap_count(fraction, block_mask)
            new_blocks = ops.prune_grow(torch.zeros(block_mask.shape, device=weight.device), block_mask,
                                        blocks.sum(prune), blocks.sum(grow), n)
            new = blocks.expand(new_blocks)
            self._zero_grown(weight, mask, new, state)
        self._finish(module, new, grad, state)

    def _update_global(self, grads, fraction: float) -> None:
        modules = [module for _, module in self.modules]
        prune, grow = self._scores([m.weight for m in modules], grads, [m.mask for m in modules])
        if self.block is None:
            masks = [m.mask for m in modules]
        else:
            blocking = [_Blocks(m.weight.shape, self.block) for m in modules]
            masks = [b.mask(m.mask) for b, m in zip(blocking, modules)]
            prune = [b.sum(s) for b, s in zip(blocking, prune)]
            grow = [b.sum(s) for b, s in zip(blocking, grow)]
        active = sum(int(m.sum()) for m in masks)
        n = min(round(fraction * active), active, sum(m.numel() for m in masks) - active)
        nan = torch.tensor(float("nan"), dtype=prune[0].dtype, device=prune[0].device)
        # NaN marks the entries a selection may not take (topk_mask never selects NaN), so real
        # NaN scores become -inf: still ranked last, but eligible.
        kept = ops.topk_mask([torch.where(m, _nan_last(s), nan) for m, s in zip(masks, prune)], active - n)
        grown = ops.topk_mask([torch.where(k, nan, _nan_last(s)) for k, s in zip(kept, grow)], n)
        new_masks = [k | g for k, g in zip(kept, grown)]
        if self.block is not None:
            new_masks = [b.expand(m) for b, m in zip(blocking, new_masks)]
        for module, new, grad in zip(modules, new_masks, grads):
            state = self._state(module.weight)
            self._zero_grown(module.weight, module.mask, new, state)
            self._finish(module, new, grad, state)

    def _zero_grown(self, weight: Tensor, old: Tensor, new: Tensor, state: list[Tensor]) -> None:
        """What prune_grow does at newly grown positions, for updates that select masks otherwise."""
        grown = new & ~old
        weight.masked_fill_(grown, 0)
        if self.reset_state:
            for tensor in state:
                tensor.masked_fill_(grown, 0)

    @staticmethod
    def _finish(module, new: Tensor, grad: Tensor | None, state: list[Tensor]) -> None:
        inactive = ~new
        module.set_mask(new)
        for tensor in state:
            tensor.masked_fill_(inactive, 0)
        if grad is not None:
            grad.masked_fill_(inactive, 0)

    def _state(self, weight: Tensor) -> list[Tensor]:
        """The optimizer's per-entry state tensors of `weight` (not scalars such as Adam's step)."""
        return [value for value in self.optimizer.state.get(weight, {}).values()
                if isinstance(value, Tensor) and value.shape == weight.shape]

    def _make_block_structured(self) -> None:
        for _, module in self.modules:
            blocks = _Blocks(module.weight.shape, self.block)
            per_block = blocks.sum(module.mask.to(torch.float32))
            keep = min(round(int(module.mask.sum()) / (self.block[0] * self.block[1])), per_block.numel())
            module.set_mask(blocks.expand(ops.topk_mask([per_block], [keep])[0]))


class _Blocks:
    """A weight seen as a grid of bh×bw blocks of its (out, rest) matrix, edge blocks smaller."""

    def __init__(self, shape: torch.Size, block: tuple[int, int]):
        self.shape = shape
        self.rows, self.cols = shape[0], (shape.numel() // shape[0] if shape[0] else 0)
        self.block = block
        self.grid = (-(-self.rows // block[0]), -(-self.cols // block[1]))

    def sum(self, values: Tensor) -> Tensor:
        """Per-block sums (float32 at least) of a tensor shaped like the weight."""
        (bh, bw), (gr, gc) = self.block, self.grid
        matrix = values.reshape(self.rows, self.cols).to(torch.promote_types(values.dtype, torch.float32))
        padded = torch.nn.functional.pad(matrix, (0, gc * bw - self.cols, 0, gr * bh - self.rows))
        return padded.view(gr, bh, gc, bw).sum((1, 3))

    def mask(self, mask: Tensor) -> Tensor:
        """Bool grid: which blocks are active (any active entry)."""
        return self.sum(mask.to(torch.float32)) > 0

    def expand(self, block_mask: Tensor) -> Tensor:
        """The entry mask, shaped like the weight, of a bool block grid."""
        bh, bw = self.block
        entries = block_mask.repeat_interleave(bh, 0).repeat_interleave(bw, 1)
        return entries[:self.rows, :self.cols].reshape(self.shape)


def _swap_count(fraction: float, mask: Tensor) -> int:
    """n = round(fraction · active), clamped to [0, min(active, inactive)] as prune_grow requires."""
    active = int(mask.sum())
    return min(round(fraction * active), active, mask.numel() - active)


def _nan_last(score: Tensor) -> Tensor:
    return torch.where(torch.isnan(score), float("-inf"), score)


def _check_block(block):
    if block is None:
        return None
    if not isinstance(block, (tuple, list)) or len(block) != 2:
        raise TypeError(f"block must be None or a pair (bh, bw), got {block!r}")
    for size in block:
        if isinstance(size, bool) or not isinstance(size, int):
            raise TypeError(f"block must hold two ints, got {block!r}")
        if size < 1:
            raise ValueError(f"block sizes must be >= 1, got {block!r}")
    return tuple(block)


def RigL(model: nn.Module, optimizer: torch.optim.Optimizer, **options) -> DST:
    """RigL (Evci et al. 2020): magnitude pruning, gradient growth, cosine schedule (α = 0.3,
    ΔT = 100, T_end = 75% of training). Every DST option may be overridden."""
    return DST(model, optimizer, **{"prune": "magnitude", "grow": "gradient", "schedule": "cosine", **options})


def SET(model: nn.Module, optimizer: torch.optim.Optimizer, **options) -> DST:
    """SET (Mocanu et al. 2018): drop the smallest positive and the negative weights closest to
    zero in proportion to their counts, random growth, constant fraction 0.3, no update after 75%
    of training (RigL's T_end, under which RigL's paper compares SET). Every DST option may be
    overridden (end_fraction=1.0 updates to the end, as Mocanu's code)."""
    return DST(model, optimizer, **{"prune": "set", "grow": "random", "schedule": "constant", **options})


def MEST(model: nn.Module, optimizer: torch.optim.Optimizer, **options) -> DST:
    """MEST (Yuan et al. 2021): prune by |θ| + γ|g| (mest_gamma, default 1), random growth,
    constant fraction 0.3, no update after 75% of training. Every DST option may be overridden."""
    return DST(model, optimizer, **{"prune": "mest", "grow": "random", "schedule": "constant", **options})
