"""OptG: optimizing gradient-driven criteria in network sparsity (Zhang et al. 2022).

Each prunable weight has a score s, initialised to 0. The forward uses θ ⊙ m where m keeps the
highest scores; the scores are trained with the straight-through gradient
∂L/∂s = ∂L/∂(θ ⊙ m) ⊙ θ at every position, pruned ones included, so with plain SGD
s accumulates −Σ η_t g_t ⊙ θ_t and a removed weight returns when its score rises again.
The sparsity ramps up as p_e = p·σ(β(e − E/2)) / σ(β(E/2 − 1)), the mask is recomputed once per
epoch by one global top-k over the scores, and the score learning rate is lr_e·σ(β(e − E/2)) with
the weights' cosine learning rate lr_e. Scores have no weight decay.

The ramp differs from the reference code's p·σ(β(e − E/2)), which ends at p·σ(β(E/2 − 1)), short
of the target: a nominal density 0.05 over 10 epochs ends at 0.067. Dividing by σ(β(E/2 − 1))
makes the last epoch (e = E − 1) train at exactly the sparsity asked for; `reach_target=False`
gives the reference ramp. The scores need enough epochs to settle: on scikit-learn's digits (an
MLP, SGD) OptG collapses below MIN_EPOCHS_DIGITS epochs, where magnitude pruning on the same ramp
(`criterion="magnitude"`, the baseline) does not.

Pruned weights keep their values while pruned, as in the paper's code (the forward multiplies the
weight by the mask instead of zeroing it): their own gradient is 0, so only the weight optimizer's
weight decay and leftover momentum (if any) move them, and they come back with the value they then
hold. So, unlike the other algorithms, OptG breaks the modules' "zero off the mask" invariant on
purpose: it sets their masks without zeroing the weight. The model's state dict carries both the
masks and the pruned values (sparse modules load weights as saved).
"""
from __future__ import annotations

import math
import warnings
from decimal import Decimal
from typing import Callable

import torch
from torch import Tensor, nn

from .. import ops
from ..nn import tying
from ..ops import _checks, _masked_linear_op
from . import _tickets, distributed
from ._gradients import GradientWatch, all_finite
from ._stack import user_stacklevel


CRITERIA = ("learned", "magnitude")
# Measured with `sparsekern reproduce` (claim e, 3 seeds, a full run of 2026-12-02, 19:00 UTC) on digits: at 10
# epochs OptG collapses (35.1 ± 3.4% at final density 0.02 and 38.0 ± 8.9% at 0.05, where magnitude pruning on the
# same ramp reaches 48.1 ± 8.4% and 77.1 ± 5.5%); at 0.02 it trails magnitude within noise at 20 (82.7 ± 9.7
# against 92.1 ± 2.1, one seed of three lagging) and ties it at 30 (96.3 ± 0.9 against 94.9 ± 0.9), as README's
# reproduce table says. The CLI warns below it.
MIN_EPOCHS_DIGITS = 30


def sparsity_at(epoch: int, sparsity: float, epochs: int, beta: float = 1.0, reach_target: bool = True) -> float:
    """p_e = p·σ(β(e − E/2)) / σ(β(E/2 − 1)), capped at p, so that epoch E − 1 trains at p; with
    reach_target=False the reference code's p·σ(β(e − E/2))."""
    ramp = _sigmoid(beta * (epoch - epochs / 2))
    if not reach_target:
        return sparsity * ramp
    return sparsity * min(1.0, ramp / _sigmoid(beta * (epochs / 2 - 1)))


def cosine_lr(lr: float, epochs: int) -> Callable[[int], float]:
    """lr_e = lr/2·(1 + cos(π e / E)), the weights' schedule OptG assumes unless given another."""
    return lambda epoch: 0.5 * lr * (1 + math.cos(math.pi * epoch / epochs))


def complement(fraction: float) -> float:
    """1 - fraction, computed on the decimal that `fraction` prints as (its shortest repr): a density of 0.7 gives
    the sparsity 0.3, where float subtraction gives 0.30000000000000004, a value that can round a count the other
    way (round(0.30000000000000004 * 15) = 5, round(0.3 * 15) = 4), and back: the complement of 0.9 is 0.1, not
    0.09999999999999998. A fraction that is no short decimal (1/3) gets float subtraction's result."""
    return float(1 - Decimal(repr(float(fraction))))


def _target_sparsity(sparsity, density) -> tuple[float, str]:
    """The sparsity OptG prunes to, from exactly one of `sparsity` (in [0, 1)) and `density` (in (0, 1], the
    fraction kept, as sparsify and IMP's and SWAMP's next_cycle and run take it), and the argument as the caller
    wrote it, for errors to name."""
    if (sparsity is None) == (density is None):
        raise TypeError(f"OptG takes exactly one of sparsity= (the fraction of the weights pruned) and density= "
                        f"(the fraction kept, 1 - sparsity), got {'neither' if sparsity is None else 'both'}")
    if density is None:
        sparsity = _checks.number(sparsity, "sparsity", lambda value: 0 <= value < 1, "in [0, 1)")
        return sparsity, f"sparsity={sparsity!r}"
    density = _checks.number(density, "density", lambda value: 0 < value <= 1, "in (0, 1]")
    return complement(density), f"density={density!r}"


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def _frozen_layers(groups: list[tying.Group]) -> list[str]:
    """The names of the layers whose weight does not require grad, which learned scores leave alone
    (ValueError when that is every layer)."""
    frozen = [group[0][0] for group in groups if not group[0][1].weight.requires_grad]
    if frozen and len(frozen) == len(groups):
        raise ValueError(f"no sparse layer of the model is trained: the weights of {frozen} do not require grad, "
                         f"so their scores would never move")
    return frozen


class OptG(distributed.CatchesUp):
    """Score-based sparse training with a sigmoid sparsity ramp, driven by your loop.

    Args:
        model: a model of `sparsekern.nn` sparse modules (any masks; OptG sets them). With
            criterion="learned", a layer whose weight does not require grad is left alone, with a
            warning: it gets no gradient, so its scores would stay 0 and the global top-k would
            prune it by position; `sparsity` then counts the other layers' weights only, and it may stay in
            inference mode (`to_inference()`), which the layers OptG sets are refused in (ValueError: to_training
            first). One frozen after OptG was built is left alone while it stays frozen (warned once): see
            "Frozen layers". criterion="magnitude" prunes frozen layers with the rest: |θ| needs no gradient.
        sparsity: p, the final fraction of prunable weights removed (globally), in [0, 1) (the paper's
            notation; the second positional argument).
        density: the final fraction kept instead, in (0, 1], keyword only, as `sparsify` and IMP's and SWAMP's
            `next_cycle` and `run` take it (DST takes none: it keeps the density `sparsify` set): give exactly
            one of the two. density=d trains exactly as sparsity=1 - d written as
            a decimal (density=0.7 as sparsity=0.3: `complement`), same masks and same `state_dict()`.
            `optg.sparsity` and the read-only `optg.density` hold the target either way.
        epochs: E, the number of training epochs (required).
        lr: the weights' base learning rate, read for the scores' only: OptG holds no optimizer of the
            weights and sets none of their learning rates. 0.1 by default, not read from the weights' optimizer (a
            torch optimizer holds no base lr once a scheduler moves it): pass the base lr that optimizer trains with.
            The score lr of epoch e is lr_e·σ(β(e − E/2)), lr_e following `cosine_lr(lr, epochs)` unless
            `lr_schedule` (epoch -> lr_e) is given, as
            `optg.lr_schedule`: give the weights' optimizer that schedule (the loop below does), or pass
            the schedule it follows. An error lr_schedule raises (OptG calls it at construction and at every
            next_epoch) is raised as RuntimeError naming it (torch.OutOfMemoryError as it is).
        beta: β of the sigmoid.
        momentum, nesterov: of the scores' SGD (the paper uses the weights' momentum). The scores are
            kept in float32 at least (a half-precision layer's too), so that small steps add up.
        dense_while_scores_tie: keep every weight while all scores are equal (epoch 0, where they
            are all 0). The paper's code keeps every entry tied with the threshold, so its epoch 0
            is dense; an exact top-k over equal scores would instead prune the tail of the last
            layers (ties go to the lower flat position). False applies p_0 by that rule. With it,
            E = 1 is refused (ValueError): the only epoch would be dense, and the run would end
            dense whatever `sparsity` asks; with E = 2 (and reach_target) epoch 1 trains at `sparsity`.
        reach_target: ramp to exactly `sparsity` at the last epoch (default), or follow the
            reference code's ramp, which stops short of it (module docstring).
        criterion: "learned" (OptG's trained scores) or "magnitude": each epoch's mask keeps the
            largest |θ| instead, with no scores trained — gradual magnitude pruning on the same
            ramp, the baseline OptG is measured against.
        host_checks: skip the score update of a step whose gradients are not all finite (a step
            that torch.amp.GradScaler skips: its scores would become inf or NaN for good), at one
            device-to-host read per step. False trusts the gradients and reads nothing back.

    Loop: call `step()` after `backward()` and before the weight optimizer's step (it turns the
    dense gradient into the scores' gradient, masks the weights' gradient and updates the
    scores); call `next_epoch()` after each epoch (it recomputes the mask for the next epoch; after the
    last one the model keeps the mask it trained with).

        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        optg = OptG(model, density=0.1, epochs=E, lr=0.1)   # or sparsity=0.9
        for epoch in range(optg.epoch, E):
            for group in optimizer.param_groups:
                group["lr"] = optg.lr_schedule(epoch)   # the weights' lr_e, which the scores' lr follows
            for x, y in loader:
                loss_fn(model(x), y).backward()
                optg.step(); optimizer.step(); optimizer.zero_grad()
            optg.next_epoch()

    `state_dict()` holds the epoch, the scores, their optimizer and the current masks; the weights
    (pruned values included) are in the model's state dict, checkpointed beside it.

    Frozen layers (criterion="learned"): a layer whose weight stops requiring grad after OptG was
    built keeps its mask while it stays frozen, and is warned about once. Its scores cannot move (no
    gradient), so ranking them would keep or prune it by where they stopped, regardless of what the
    others learn since; its weights cannot move either, so weights grown in it would stay at their
    old values. `step()` leaves its scores and their momentum as they are (it still masks a gradient
    the layer holds); each `next_epoch()` keeps its mask and takes its active count out of the
    epoch's global budget, so that the top-k over the other layers' scores keeps exactly the rest:
    the model stays on the ramp, and ends on `sparsity`, as without freezing. Where that cannot be
    (the frozen layers hold more weights than the epoch keeps, or so few that the others would have
    to keep more than they have), `next_epoch()` raises RuntimeError naming them, with nothing
    changed: unfreeze them, or build OptG after freezing them, which leaves them out of `sparsity`.
    Unfrozen, a layer takes part in the next epoch's top-k with the scores it kept, which move again
    from its next `step()`. A layer frozen at construction is not OptG's (above), so a state saved by
    an OptG that trained it is refused, naming it: to resume a run that froze a layer later, build
    OptG before freezing it. Freezing is the model's, not part of `state_dict()`.

    Under an initialised torch.distributed process group of several ranks (DistributedDataParallel)
    the construction is collective and refuses (ValueError on every rank) masks, or weights under
    them, that differ across ranks, and settings that differ across ranks (sparsity, epochs, beta,
    criterion, reach_target, dense_while_scores_tie, momentum, nesterov, host_checks, and lr unless
    `lr_schedule` is given: a function, which the ranks cannot compare; the masks would diverge at the
    next epoch), naming each and the ranks holding each value, and ranks that rank other layers (a layer
    frozen on some ranks only, with criterion="learned"); a layer frozen on some ranks only after
    construction is refused by `broadcast_masks(algorithm=)`, not by `step()` or `next_epoch()`, which
    make no collective (the masks diverge from the next epoch: freeze the same layers on every rank,
    at the same step); an argument refused on one rank only is
    refused on every rank (the others' error names that rank), so that none waits for it. `group` (a torch.distributed
    process group, None: the default one) names the ranks holding replicas, those the check compares:
    independent runs on each rank of one job (masks differing on purpose) give each rank a group of its
    own, `torch.distributed.new_subgroups(1)[0]`, which compares nothing. For uneven inputs, see
    `join_hook`.
    """

    _holds_its_optimizer = False   # the weights' optimizer is the caller's (join_hook)

    def __init__(self, model: nn.Module, sparsity: float | None = None, epochs: int | None = None, lr: float = 0.1,
                 beta: float = 1.0, momentum: float = 0.9, nesterov: bool = False,
                 lr_schedule: Callable[[int], float] | None = None, dense_while_scores_tie: bool = True,
                 reach_target: bool = True, criterion: str = "learned", host_checks: bool = True,
                 group=None, *, density: float | None = None):
        # Collective: a check that fails on one rank fails on every rank (one raising alone would leave the
        # others waiting in the replica check), and masks that start apart across ranks are refused.
        with distributed.ReplicaCheck("OptG", group) as replicas:
            # A frozen layer that learned scores leave out may stay in inference mode: those OptG keeps are refused
            # in it below (check_masks_writable), as DST refuses only the layers it trains.
            self._groups = _tickets.sparse_layers(model, "OptG", prunes_every_layer=False)
            # Its text, as IMP's and DST's settings are: a NumPy str_ kept went into state_dict(), which
            # sparsekern.checkpoint.save then refused; TypeError for a non-str, as every other wrong type.
            criterion = _checks.choice(criterion, "criterion", CRITERIA)
            frozen = _frozen_layers(self._groups) if criterion == "learned" else []
            self._groups = [tied for tied in self._groups if tied[0][0] not in frozen]
            self.layers = _tickets.primaries(self._groups)
            # The first epoch's masks are written below, as at every next_epoch
            _tickets.check_masks_writable(self._groups, "OptG")
            sparsity, target = _target_sparsity(sparsity, density)
            if epochs is None:   # a default only so that density= can be given by keyword in sparsity's place
                raise TypeError("OptG needs epochs, the number of training epochs")
            self.epochs = _checks.count(epochs, "epochs", 1)
            lr = _checks.number(lr, "lr", lambda v: v >= 0, ">= 0")
            beta = _checks.number(beta, "beta", lambda v: v > 0, "> 0")
            momentum = _checks.number(momentum, "momentum", lambda v: 0 <= v < 1, "in [0, 1)")
            _checks.flag(nesterov, "nesterov")
            _checks.flag(dense_while_scores_tie, "dense_while_scores_tie")
            _checks.flag(host_checks, "host_checks")
            _checks.flag(reach_target, "reach_target")
            if nesterov and momentum == 0:
                raise ValueError("nesterov=True needs momentum > 0")
            if lr_schedule is not None:
                _tickets.check_callable(lr_schedule, "lr_schedule", "epoch")
            total = sum(layer.weight.numel() for layer in self.layers)
            if total - round(sparsity * total) == 0:
                raise ValueError(f"{target} would prune all {total} prunable weights")
            if epochs == 1 and sparsity > 0 and criterion == "learned" and dense_while_scores_tie:
                # The mask is a top-k of scores trained in earlier epochs; the only epoch has none (all tie at 0).
                raise ValueError(f"epochs=1 would end dense, not at {target}: OptG's only epoch starts "
                                 f"with every score tied at 0, which dense_while_scores_tie keeps dense; use "
                                 f"epochs >= 2")
            self.sparsity = float(sparsity)
            self.beta = beta
            self.lr_schedule = lr_schedule if lr_schedule is not None else cosine_lr(lr, epochs)
            self.dense_while_scores_tie = dense_while_scores_tie
            self.reach_target = reach_target
            self.criterion = criterion
            self.host_checks = host_checks
            # In float32 at least: a half-precision score would round each step's small increment away.
            self.scores = [torch.zeros_like(layer.weight, dtype=_score_dtype(layer.weight))
                           for layer in self.layers]
            self.score_optimizer = torch.optim.SGD(self.scores, lr=0.0, momentum=momentum, nesterov=nesterov,
                                                   weight_decay=0.0)
            # The settings that decide the masks, host_checks among them (it skips a score update whose gradients
            # are not all finite), and the scores' learning rate: lr, unless lr_schedule (a callable, which the
            # ranks cannot compare) replaces it.
            replicas.compare(model, {**self._settings(), "host_checks": host_checks,
                                     **({"lr": lr} if lr_schedule is None else {"lr_schedule": "given"})},
                             updated=self._layers_updated())
        super().__init__(model, replicas.group)   # for Join's catching up (join_hook)
        if frozen:  # warned once every argument has passed
            warnings.warn(f"OptG leaves the masks of {frozen} alone: their weights do not require grad, so their "
                          f"scores would stay 0 and the global top-k would prune them by position",
                          stacklevel=user_stacklevel())
        if lr == 0 and lr_schedule is None:
            warnings.warn("lr=0: the scores never move, so the mask only follows the sparsity ramp over "
                          "all-equal scores", stacklevel=user_stacklevel())
        self._gradients = GradientWatch()
        self._frozen_warned: set[str] = set()   # layers frozen after construction, warned about
        self.epoch = 0
        self._start_epoch()

    @property
    def density(self) -> float:
        """The final fraction of the prunable weights kept, `complement(sparsity)` (read-only: set by the
        constructor's sparsity= or density=)."""
        return complement(self.sparsity)

    def score_lr(self, epoch: int) -> float:
        """lr_e·σ(β(e − E/2)); ValueError naming lr_schedule unless lr_e is a finite number >= 0 (TypeError unless
        a real number, not a bool; an int or a NumPy float is taken as the float it is), RuntimeError naming it for
        an error it raises."""
        lr = _checks.users_call(self.lr_schedule, "lr_schedule", f" at epoch {epoch}", epoch)
        lr = _checks.number(lr, f"the lr lr_schedule gave at epoch {epoch}", lambda value: value >= 0, ">= 0")
        return lr * _sigmoid(self.beta * (epoch - self.epochs / 2))

    def sparsity_at(self, epoch: int) -> float:
        """The fraction of the weights pruned while epoch `epoch` (from 0) trains, on OptG's ramp (module
        function `sparsity_at`): `sparsity` from epoch `epochs` - 1 on, unless reach_target=False. The ramp's
        value, not what an epoch whose scores all tie trains at: with dense_while_scores_tie, that epoch (epoch 0
        of criterion="learned", its scores all 0) trains dense, whatever this returns for it."""
        return sparsity_at(epoch, self.sparsity, self.epochs, self.beta, self.reach_target)

    @torch.no_grad()
    def _start_epoch(self) -> None:
        score_lr = self.score_lr(self.epoch)
        frozen = self._frozen()   # none under "magnitude", whose scores are written here
        if self.criterion == "magnitude":
            for layer, score in zip(self.layers, self.scores):
                score.copy_(layer.weight).abs_()
        ranked = [index for index in range(len(self.layers)) if index not in frozen]
        total = sum(score.numel() for score in self.scores)
        keep = total - round(self.sparsity_at(self.epoch) * total)
        capacity = sum(self.scores[index].numel() for index in ranked)
        if self.dense_while_scores_tie and self._all_equal([self.scores[index] for index in ranked]):
            keep = capacity   # every ranked weight: the frozen layers keep their masks as ever
        elif frozen:
            # The frozen layers' active weights count against the epoch's budget: the others keep the rest.
            held = sum(int(self.layers[index].mask.sum()) for index in frozen)
            keep -= held
            if not (1 if ranked else 0) <= keep <= capacity:
                self._refuse_budget(frozen, held, keep + held, capacity)
        self._warn_frozen(frozen)
        masks = ops.topk_mask([self.scores[index] for index in ranked], keep) if ranked else []
        for index, mask in zip(ranked, masks):
            self.layers[index].mask.copy_(mask)   # not set_mask: pruned weights keep their values, so the
        for layer in self.layers:                 # forward must select
            layer.zero_off_mask = False
            layer.dense_grad = self._learns
        tying.sync(self._groups)
        for group in self.score_optimizer.param_groups:
            group["lr"] = score_lr

    def _refuse_budget(self, frozen: list[int], held: int, keep: int, capacity: int) -> None:
        """RuntimeError: the layers at `frozen`, holding `held` active weights, leave the others (which hold
        `capacity`) no count of at least 1 that makes the model keep `keep`, the epoch's budget."""
        names = [_tickets.layer_names(self._groups)[index] for index in frozen]
        raise RuntimeError(
            f"OptG.next_epoch(): the layers frozen after OptG was built, {names}, keep their masks, with {held} "
            f"active weights, and epoch {self.epoch} keeps {keep} of all {sum(s.numel() for s in self.scores)} "
            f"at sparsity {self.sparsity_at(self.epoch):.6g}, so the other layers (which hold {capacity}) would "
            f"have to keep {keep - held}: unfreeze them before next_epoch(), or build OptG after freezing them, "
            f"which leaves them out of `sparsity`")

    def _frozen(self) -> list[int]:
        """The positions of the layers frozen since OptG was built (weight not requiring grad), which learned
        scores leave alone (see the class); none with criterion="magnitude", which prunes them with the rest."""
        if not self._learns:
            return []
        return [index for index, layer in enumerate(self.layers) if not layer.weight.requires_grad]

    def _layers_updated(self) -> list[str]:
        """The names of the layers the next epoch's top-k ranks: those not frozen (construction and
        `broadcast_masks` compare them across ranks)."""
        frozen = self._frozen()
        return [name for index, name in enumerate(_tickets.layer_names(self._groups)) if index not in frozen]

    def _warn_frozen(self, frozen: list[int]) -> None:
        """Warns once about each layer at `frozen` that no warning named yet."""
        names = _tickets.layer_names(self._groups)
        unwarned = [names[index] for index in frozen if names[index] not in self._frozen_warned]
        if unwarned:
            warnings.warn(f"OptG leaves the masks and scores of {unwarned} alone while their weights do not "
                          f"require grad (frozen after OptG was built); the other layers keep what remains of "
                          f"each epoch's budget", stacklevel=user_stacklevel())
            self._frozen_warned.update(unwarned)

    @staticmethod
    def _all_equal(scores: list[Tensor]) -> bool:
        if not scores:
            return False
        first = scores[0].flatten()[:1]
        return all(bool((score == first).all()) for score in scores)

    @property
    def _learns(self) -> bool:
        return self.criterion == "learned"

    @torch.no_grad()
    def step(self) -> None:
        """Scores' gradient g ⊙ θ at every position, weights' gradient g ⊙ m, one score update.

        Reads the dense gradient g = ∂L/∂(θ ⊙ m) that the modules' `dense_grad` gives; a layer
        whose weight received no gradient contributes none, but with criterion="learned" a step at which no
        trained parameter of the model has one (step() called before backward) raises RuntimeError, with nothing
        changed: the backward to come would give the optimizer dense gradients. With criterion="magnitude" it only
        masks the weights' gradient. A gradient unchanged since the previous `step()` (no backward in
        between) raises RuntimeError, with nothing changed: it would count the same gradient twice in
        the scores; so does (ValueError naming it) one that cannot be masked in place (an expanded view, an
        inference tensor). A step whose gradients are not all finite leaves the scores and their optimizer
        alone (with host_checks), as torch.amp.GradScaler skips its step; with a GradScaler, call
        scaler.unscale_(optimizer) before step(), or the scores add up gradients times a scale that
        changes over training. Under DDP, call it after the backward outside no_sync() (inside it,
        RuntimeError: the gradients are not averaged yet, and each rank's scores would move apart).
        """
        self._refuse_leading_join()
        self._refuse_no_sync()
        _tickets.check_own_weights(self._groups, "OptG")
        weights = [layer.weight for layer in self.layers]
        frozen = self._frozen()   # a frozen layer's gradient is not read: it may be left over from before freezing
        stale = self._gradients.unchanged(weights, skip=frozen)
        if stale is not None:
            raise RuntimeError(f"OptG.step(): the gradient of sparse layer {stale} has not changed since the "
                               f"previous step() (step() called twice, or without a backward in between)")
        grads = [weight.grad for weight in weights]
        if self._learns and all(parameter.grad is None for parameter in self._replicas.parameters()
                                if parameter.requires_grad):
            # A step() before backward (DST's rule; a frozen parameter may hold a gradient from before it was
            # frozen): the scores would learn nothing, and the dense gradient of the backward to come would reach the
            # optimizer unmasked, moving the pruned weights. Sparse layers alone without one are layers this step did
            # not use (a branch, an adapter): they keep their scores.
            raise RuntimeError("OptG.step(): no trained parameter of the model has a gradient: call step() after "
                               "backward, before the optimizer step")
        for name, layer, grad in zip(_tickets.layer_names(self._groups), self.layers, grads):
            if grad is not None:   # masked below, after the layers before it: checked for all of them first
                _checks.maskable_in_place(grad, f"{name}.weight.grad", layer.mask, f"{name}.mask")
        self._warn_frozen(frozen)
        learn = self._learns and (not self.host_checks or all_finite(
            [grad for index, grad in enumerate(grads) if grad is not None and index not in frozen]))
        for index, (layer, score, grad) in enumerate(zip(self.layers, self.scores, grads)):
            # The next backward must be dense again. Assigned only where cleared: an assignment goes through
            # nn.Module.__setattr__, some hundred times a read (8 layers: ~2% of a step).
            if self._learns and not layer.dense_grad:
                layer.dense_grad = True
            if grad is None or index in frozen:
                score.grad = None   # the score optimizer skips it, momentum included: the score stays
            elif learn:
                _score_gradient(score, grad, layer.weight)
            if grad is not None:
                # A select, as every sparse layer masks its weight gradient: +0.0 off the mask even where
                # the dense gradient is inf or NaN (a multiply would leave NaN on the pruned values OptG keeps).
                # ops.mask_in_place without its checks, which ran above.
                _masked_linear_op.mask_in_place(grad, layer.mask)
        if learn:
            self.score_optimizer.step()
        tying.sync(self._groups)
        self._gradients.remember(weights)

    def next_epoch(self) -> None:
        """Ends the epoch: the next epoch's sparsity, score lr and global top-k mask.

        After the last epoch it only counts it (`epoch` becomes `epochs`): no epoch follows, and the
        model keeps the mask it trained with, not a top-k of scores that moved during that epoch,
        which would bring back weights that did not train in it. RuntimeError, with nothing changed,
        once all `epochs` have ended."""
        _tickets.check_own_weights(self._groups, "OptG")
        if self.epoch >= self.epochs:
            raise RuntimeError(f"next_epoch() after the last of the {self.epochs} epochs")
        if self.epoch == self.epochs - 1:
            self.epoch += 1
            return
        # Under "learned", a layer frozen since OptG was built keeps its mask (`_frozen`).
        _tickets.check_masks_writable(self._groups, "OptG", frozen_kept=self._learns)
        self.epoch += 1
        try:
            self._start_epoch()
        except BaseException:
            self.epoch -= 1
            raise

    @property
    def masks(self) -> list[Tensor]:
        """Copies of the current masks of the layers OptG prunes (not those frozen when it was built), in model
        order (tied layers once)."""
        return _tickets.masks_of(self._groups)

    def state_dict(self) -> dict:
        """Epoch, scores, their optimizer's state and the masks, as copies: training on leaves a state kept in
        memory as it was. Scores and masks are keyed by layer name, as is the optimizer's state (its
        parameters are the names in place of torch's positions), so that the state loads into a model that lists
        its layers in another order, and is refused by one with other layers; the names are those of the model
        OptG was built on, wrapper prefixes included ("module." under DistributedDataParallel)."""
        names = _tickets.layer_names(self._groups)
        return _tickets.map_tensors(Tensor.clone, {
            "algorithm": "OptG", "epoch": self.epoch, "scores": dict(zip(names, self.scores)),
            "score_optimizer": _tickets.optimizer_by_name(self.score_optimizer.state_dict(), self.score_optimizer,
                                                          self._score_names()),
            "masks": dict(zip(names, self.masks)), **self._settings()})

    def _score_names(self) -> dict[int, list[str]]:
        """The names a layer's scores are saved under in the score optimizer's state, by the scores' id: those of
        the modules holding the layer's weight, its primary module's first (`_tickets.in_layer_order`)."""
        return {id(score): [name for name, _ in group] for score, group in zip(self.scores, self._groups)}

    def _settings(self) -> dict:
        """The arguments a state is saved with and must be loaded under (`load_state_dict`)."""
        return {"sparsity": self.sparsity, "epochs": self.epochs, "beta": self.beta, "criterion": self.criterion,
                "reach_target": self.reach_target, "dense_while_scores_tie": self.dense_while_scores_tie,
                # The saved score optimizer's would replace this OptG's own without a word.
                "momentum": self.score_optimizer.defaults["momentum"],
                "nesterov": self.score_optimizer.defaults["nesterov"]}

    def load_state_dict(self, state: dict) -> None:
        """Restores a `state_dict()`, the current epoch's masks included (they came from the scores at
        the epoch's start, not those saved mid-epoch), so it does not matter whether the model's state
        dict was loaded before this OptG was built (which sets epoch-0 masks) or after. A state without
        "masks" (older versions) keeps the model's own. Checked completely first (entries, the layer names,
        tensors against the layers, the score optimizer's hyperparameters and momentum buffers, and that it is an
        OptG state saved with this OptG's sparsity (saved as "sparsity" whether given as sparsity= or density=;
        an older command line's `1 - density` in floats is taken as its density, and so is a float a rounding away
        that prunes the same counts: sparsity=2/3 for density=1/3), epochs, beta, criterion, reach_target,
        dense_while_scores_tie, momentum and nesterov, and with its lr or lr_schedule, which the score optimizer's
        saved score lr gives away, holding no entry that OptG does not save but the first versions' "pruned_weights",
        which loads ignored, as it did): a bad state raises TypeError or ValueError and changes nothing; a layer
        missing from it, or one this model lacks, is named (a layer frozen after the saving OptG was built is in its
        state: build this one before freezing it, "Frozen layers"), and so is an entry OptG does not save (a
        misspelled or tampered setting, which would go unchecked). A state of older versions, which hold scores,
        masks and the optimizer's state by position (lists), loads by position, as it did."""
        self._prepare_load(state)()

    def _check_saved_score_lr(self, loaded: torch.optim.SGD, epoch: int) -> None:
        """ValueError unless the score lr of the state `loaded` holds is the one this OptG's lr (or lr_schedule),
        beta and epochs give its epoch: a state saved under another lr went on at the saved lr to the epoch's end
        and at this OptG's from the next, a run of neither, with nothing said. The state keeps no lr of its own
        (lr_schedule, a callable, cannot be saved), but its score optimizer's is that run's score lr of the epoch
        (the last epoch's once all have ended)."""
        expected = self.score_lr(min(epoch, self.epochs - 1))
        saved = float(loaded.param_groups[0]["lr"])
        if not math.isclose(saved, expected, rel_tol=1e-9, abs_tol=0.0):
            raise ValueError(f"state['score_optimizer'] holds the score lr {saved!r} for epoch {epoch}, but this "
                             f"OptG's lr (or lr_schedule) and beta give {expected!r}: the state was saved with "
                             f"another lr or lr_schedule; build the OptG with the saving run's")

    def _check_saved_score_hyperparameters(self, loaded: torch.optim.SGD) -> None:
        """ValueError unless the score optimizer's hyperparameters of the update in the state `loaded` holds, but
        its lr (`_check_saved_score_lr`), are this OptG's own: OptG makes its score optimizer itself (momentum and
        nesterov its settings, the rest SGD's defaults), and a state's momentum of 2.5, or -1, replaced them without
        a word (its "momentum" setting says only what the run was built with). The flags that default to None
        (`_tickets.OPTIONAL_FLAGS`: foreach and fused), which a state of an older torch holds as False or lacks and
        SGD fills as False, must be off where OptG's are (None or False), or be OptG's own; differentiable, a bool
        by default (False, which SGD fills too) and so by `_tickets.check_hyperparameters` before, compares as the
        rest do."""
        def off(value) -> bool:
            return value is None or value is False

        for index, group in enumerate(loaded.param_groups):
            for key, own in self.score_optimizer.defaults.items():
                if key in _tickets.OPTIONAL_FLAGS:
                    differs = not (group[key] is own or (off(group[key]) and off(own)))
                else:
                    differs = key != "lr" and group[key] != own
                if differs:
                    raise ValueError(f"state['score_optimizer']['param_groups'][{index}][{key!r}] is {group[key]!r}, "
                                     f"but this OptG's score optimizer has {own!r}: OptG makes its score optimizer "
                                     f"itself, and a state holds its hyperparameters as saved")

    def _holds_target_as_another_float(self, saved) -> bool:
        """Whether `saved`, a state's sparsity, is this OptG's target written as another float: `1 - density` in
        floats, which the command line passed before OptG took density= (0.30000000000000004 for density 0.7, where
        this OptG holds 0.3), or a float a rounding away (relative 1e-12), which loads where it prunes the same
        counts (`_check_rounded_target`). False for this very float and for anything else, which
        `_tickets.check_saved_settings` judges."""
        if type(saved) is not float or saved == self.sparsity:
            return False
        return saved == 1 - self.density or math.isclose(saved, self.sparsity, rel_tol=1e-12, abs_tol=0.0)

    def _check_rounded_target(self, saved: float) -> None:
        """ValueError unless `saved`, a state's sparsity that `_holds_target_as_another_float`, prunes the same count
        as this OptG's at every epoch on this model, so the same masks from the same scores (density=1/3 holds the
        sparsity 0.6666666666666667, sparsity=2/3 0.6666666666666666): one a rounding away may prune another (a
        state of sparsity=1 - 0.7 under density=0.7, on 15 weights: 0.3 x 15 = 4.5 rounds to 4, 4.500000000000001
        to 5). `1 - density` is the command line's density and loads as it. Checked once the state's other settings
        are this OptG's: its epochs, beta and reach_target decide the counts."""
        if saved == 1 - self.density:
            return
        total = sum(layer.weight.numel() for layer in self.layers)
        for epoch in range(self.epochs):
            pruned = [round(sparsity_at(epoch, target, self.epochs, self.beta, self.reach_target) * total)
                      for target in (saved, self.sparsity)]
            if pruned[0] != pruned[1]:
                raise ValueError(f"state['sparsity']={saved!r} is this OptG's {self.sparsity!r} but for float "
                                 f"rounding, yet prunes {pruned[0]} of the {total} weights at epoch {epoch}, where "
                                 f"this OptG prunes {pruned[1]}: the state was saved with sparsity={saved!r}; build "
                                 f"the OptG with it")

    def _prepare_load(self, state: dict):
        """Checks `state` completely and returns the function that installs it (load_state_dict runs
        both; broadcast_masks checks on every rank before any rank installs)."""
        _tickets.check_own_weights(self._groups, "OptG")
        _tickets.check_masks_writable(self._groups, "OptG")   # the install copies the saved masks in
        _tickets.check_saved_by(state, "OptG")
        # "pruned_weights" (the values off the masks) was saved by the first versions, and ignored since the model's
        # own state dict holds them: a state holding it loads as it did.
        _tickets.check_state_keys(state, ("epoch", "scores", "score_optimizer"),
                                  ("algorithm", "masks", *self._settings()), "OptG", legacy=("pruned_weights",))
        settings = self._settings()
        another_float = self._holds_target_as_another_float(state.get("sparsity"))
        if another_float:
            del settings["sparsity"]
        _tickets.check_saved_settings(state, settings)
        if another_float:
            self._check_rounded_target(state["sparsity"])
        saved_scores, saved_masks, saved_optimizer = state["scores"], state.get("masks"), state["score_optimizer"]
        if not isinstance(saved_optimizer, dict):
            raise TypeError(f"state['score_optimizer'] must be an optimizer state dict, got "
                            f"{type(saved_optimizer).__name__}")
        keys = None   # the layers' positions, in a state of older versions
        if isinstance(saved_scores, dict):
            keys = _tickets.in_layer_order(saved_scores, self._groups, "state['scores']", "OptG")
            saved_scores = [saved_scores[key] for key in keys]
            if "masks" in state:
                if not isinstance(saved_masks, dict):
                    raise TypeError(f"state['masks'] must be a dict of masks by layer name, as state['scores'] "
                                    f"is, got {type(saved_masks).__name__}")
                saved_masks = [saved_masks[key] for key in _tickets.in_layer_order(
                    saved_masks, self._groups, "state['masks']", "OptG")]
        elif not isinstance(saved_scores, (list, tuple)):
            raise TypeError(f"state['scores'] must be a dict of score tensors by layer name, got "
                            f"{type(saved_scores).__name__}")
        elif isinstance(saved_masks, dict):
            # Named first: which of the two is amiss the state cannot tell (scores=[] in this version's state, or
            # masks by name in an older one), and the masks' own check named them alone ("must be a list").
            raise ValueError(f"state['scores'] is a {type(saved_scores).__name__} (by position, as older versions "
                             f"saved it) and state['masks'] a dict by layer name: they must be keyed alike, both "
                             f"dicts by layer name as this version saves them")
        masks = None if "masks" not in state else _tickets.check_masks(saved_masks, self._groups,
                                                                        "state['masks']", keys)
        epoch = _tickets.state_count(state, "epoch")
        if epoch > self.epochs:
            raise ValueError(f"state['epoch'] must be at most epochs={self.epochs}, got {epoch}")
        if isinstance(saved_scores, (list, tuple)):   # older versions kept a half-precision layer's in its dtype
            saved_scores = [_widened(saved, score) for saved, score in zip(saved_scores, self.scores)] + list(
                saved_scores[len(self.scores):])
        scores = _tickets.check_tensors(saved_scores, self.scores, "state['scores']", keys)
        if scores is None:   # (check_tensors refuses inf and NaN)
            raise ValueError("state['scores'] must hold finite score tensors, one per sparse layer")
        score_optimizer = torch.optim.SGD(self.scores, **self.score_optimizer.defaults)
        saved_optimizer = _tickets.optimizer_in_order(saved_optimizer, score_optimizer, self._score_names(),
                                                      "state['score_optimizer']", "OptG",
                                                      by_position=keys is None)
        _tickets.check_state_dtypes(saved_optimizer, "state['score_optimizer']", score_optimizer)
        try:  # into a fresh optimizer, so that a state that does not fit leaves the current one alone
            # A copy: torch's optimizer would keep the caller's tensors as its own and train them in place.
            score_optimizer.load_state_dict(_tickets.map_tensors(Tensor.clone, saved_optimizer))
        except torch.OutOfMemoryError:   # the device, not the state: as it is
            raise
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as error:
            raise ValueError(f"state['score_optimizer'] does not fit the scores' optimizer: "
                             f"{type(error).__name__}: {error}") from None
        _tickets.check_hyperparameters(score_optimizer, "state['score_optimizer']")
        self._check_saved_score_hyperparameters(score_optimizer)
        _tickets.check_optimizer_state(score_optimizer, list(zip(_tickets.layer_names(self._groups), self.scores)),
                                       "state['score_optimizer']", "layer")
        self._check_saved_score_lr(score_optimizer, epoch)

        @torch.no_grad()
        def install() -> None:
            self.epoch = epoch
            for score, saved in zip(self.scores, scores):
                score.copy_(saved)
            self.score_optimizer = score_optimizer
            for layer, mask in zip(self.layers, masks or ()):
                layer.mask.copy_(mask)       # not set_mask: pruned weights keep their values
            for layer in self.layers:
                layer.zero_off_mask = False
                layer.dense_grad = self._learns
            tying.sync(self._groups)
            self._gradients.remember([layer.weight for layer in self.layers])
        return install


def _score_gradient(score: Tensor, grad: Tensor, weight: Tensor) -> None:
    """score.grad = grad ⊙ weight, written into the buffer the previous step left there: a fresh product
    would be allocated while that buffer is still held, one more weight-sized tensor per layer at the
    step's peak. A buffer that is None (the first step, a layer without gradient last step, or the score
    optimizer's zero_grad(set_to_none=True)) is allocated anew, as is one that no longer fits."""
    held = score.grad
    if held is None or held.shape != grad.shape or held.dtype != score.dtype or held.device != score.device:
        score.grad = grad.to(score.dtype) * weight
    elif grad.dtype == held.dtype:
        torch.mul(grad, weight, out=held)
    else:   # a half-precision layer: the product in the scores' float32, where it does not underflow
        held.copy_(grad).mul_(weight)


def _score_dtype(weight: Tensor) -> torch.dtype:
    """The dtype of a layer's scores: its weight's, or float32 where that is narrower."""
    return torch.promote_types(weight.dtype, torch.float32)


def _widened(saved, score: Tensor):
    """`saved` in `score`'s dtype where it is a half-precision score saved by an older version, which kept the
    scores in the weights' dtype; anything else as it is, for the checks to judge."""
    if isinstance(saved, Tensor) and saved.dtype in (torch.float16, torch.bfloat16) and score.dtype == torch.float32:
        return saved.to(score.dtype)
    return saved

