"""Iterative magnitude pruning with rewinding (lottery tickets; Frankle et al. 2019, 2020).

Train to the rewind step k and keep θ_k; then each cycle: train to the end, remove ⌈p·remaining⌉
weights by magnitude (globally by default), reset the survivors to θ_k ⊙ m, train again. k = 0 is
the original lottery-ticket reset to the initialisation. With `rewind="learning_rate"` (Renda et
al. 2020) the survivors keep their trained values and only the training schedule is rewound.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import Tensor, nn

from ..ops import _checks
from . import _tickets, distributed

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
REWINDS = ("weights", "learning_rate")


class IMP(distributed.CatchesUp):
    """Iterative magnitude pruning with weight (or learning-rate) rewinding, driven by your loop.

    Args:
        model: a model whose prunable layers are `sparsekern.nn` sparse modules (start dense:
            `sparsekern.sparsify(model, 1.0)`); its weights are pruned and reset in place. Frozen
            layers (weight not requiring grad, before or after IMP was built) are pruned with the
            rest: magnitude pruning reads only the weights, which a frozen (typically pretrained) layer
            has, and lottery-ticket practice prunes every prunable layer; its surviving weights stay
            as they are, and the trained layers learn to make up for the rest. Weight rewinding
            restores the whole model to step k, a layer frozen after k included. To keep a layer as
            it is, leave it out of `sparsify` (`exclude=`). A lazy module (nn.LazyBatchNorm1d, ...) must have
            made its parameters (a forward pass) before IMP keeps θ_0 as it is built (rewind_step=0, weight
            rewinding: refused naming it otherwise); a later θ_k is kept after the first forward made them (one
            the forward never runs is refused by name at step k, before anything changes).
        optimizer_factory: called with `model.parameters()` at construction and after every
            pruning; IMP starts each cycle with a fresh optimizer, `imp.optimizer`. Use that one: one it
            replaced (at next_cycle() or load_state_dict()) refuses to step (RuntimeError, nothing changed),
            since its momentum would move pruned weights off 0. An error it raises is raised as RuntimeError
            naming it (torch.OutOfMemoryError as it is).
        prune_fraction: p, the fraction of the remaining weights removed per cycle (⌈p·remaining⌉).
        rewind_step: k, the number of optimizer steps (calls of `step()`) after which θ_k is kept.
        scope: "global" ranks all sparse layers' weights together; "layer" prunes each layer by p.
        rewind: "weights" resets survivors to θ_k ⊙ m (and every other parameter and buffer, BatchNorm
            statistics included, to its value at step k); "learning_rate" keeps the trained values.

    Loop: after every optimizer step call `step()` (after it, where DST's and OptG's `step()` go before it: step
    k's θ_k holds k optimizer steps); at the end of a cycle call `next_cycle()`.
    `step_in_cycle` counts steps within the cycle; after `next_cycle()` it restarts at k, so a
    learning-rate schedule indexed by it is rewound to step k as well (in both rewind modes).
    Every cycle trains a new optimizer, so an LR scheduler built on the first cycle's `imp.optimizer` silently
    stops driving the later cycles (it steps the replaced one): build the scheduler on `imp.optimizer` anew at the
    start of every cycle, or set each group's lr from `step_in_cycle` before every step.

        imp = IMP(model, lambda params: torch.optim.SGD(params, lr=0.1), rewind_step=k)
        for cycle in range(cycles):
            for t in range(imp.step_in_cycle, steps):
                loss_fn(model(x[t]), y[t]).backward()
                imp.optimizer.step(); imp.optimizer.zero_grad(); imp.step()
            if cycle < cycles - 1:
                imp.next_cycle()

    `state_dict()` holds the counters, θ_k and the optimizer's state, not the model: checkpoint
    `model.state_dict()` beside it and load the model first.

    Under an initialised torch.distributed process group of several ranks (DistributedDataParallel)
    the construction is collective and refuses (ValueError on every rank) masks, or weights under
    them, that differ across ranks, and settings that differ across ranks (prune_fraction, rewind_step,
    scope, rewind: the masks, or the weights rewound under them, would diverge at the first pruning),
    naming each and the ranks holding each value; an argument refused on one rank only is refused on
    every rank (the others' error names that rank), so that none waits for it. So are `next_cycle()` and `run()`,
    which refuse a density (and run's cycles) that differs across ranks alike. `group` (a
    torch.distributed process group, None: the default one) names the ranks holding replicas, those the
    check compares: independent runs on each rank of one job (masks differing on purpose) give each rank
    a group of its own, `torch.distributed.new_subgroups(1)[0]`, which compares nothing. For uneven
    inputs, see `join_hook`.
    """

    optimizer = _tickets.FreshOptimizer()   # a replaced one refuses to step

    def __init__(self, model: nn.Module, optimizer_factory: OptimizerFactory, prune_fraction: float = 0.2,
                 rewind_step: int = 0, scope: str = "global", rewind: str = "weights", group=None):
        # Collective: a check that fails on one rank fails on every rank (one raising alone would leave the
        # others waiting in the replica check), and masks that start apart across ranks are refused.
        with distributed.ReplicaCheck("IMP", group) as replicas:
            self._groups = _tickets.sparse_layers(model, "IMP")
            self.layers = _tickets.primaries(self._groups)
            _tickets.check_callable(optimizer_factory, "optimizer_factory", "parameters")
            self.prune_fraction = _tickets.check_fraction(prune_fraction)
            self.rewind_step = _checks.count(rewind_step, "rewind_step")
            self.scope = _checks.choice(scope, "scope", _tickets.SCOPES)
            self.rewind = _checks.choice(rewind, "rewind", REWINDS)
            if self.rewind == "weights" and self.rewind_step == 0:   # θ_0 is kept as IMP is built
                _tickets.refuse_unmaterialised_when_built(model, "IMP")
            replicas.compare(model, self._settings())
        super().__init__(model, replicas.group)   # for Join's catching up (join_hook)
        self.model = model
        self.optimizer_factory = optimizer_factory
        self.cycle = 0
        self.step_in_cycle = 0
        self.rewind_state: dict[str, Tensor] | None = None
        self.optimizer = _tickets.make_optimizer(optimizer_factory, model)
        self._capture_if_due()

    def step(self) -> None:
        """Counts one optimizer step; keeps θ_k when the k-th step of the first cycle is done. ValueError, nothing
        counted, for a layer training in inference mode (`to_inference()` with `to_training()` forgotten after an
        evaluation: it gives its weight no gradient, and would stop training silently), as DST's and OptG's step()."""
        self._refuse_leading_join()
        _tickets.refuse_count_end(self.step_in_cycle, "step_in_cycle", "IMP")
        _tickets.refuse_training_in_inference_mode(self._groups, "IMP")
        if self._capture_due(self.step_in_cycle + 1):   # before the count moves on
            # On this rank alone, unlike SWAMP's: step() makes no collective (under Join a rank out of inputs stops
            # calling it while the others go on), so no other rank waits in one of IMP's. Under DDP a lazy module
            # unmade on some ranks only is one of buffers alone, with broadcast_buffers=False (DDP refuses unmade
            # parameters, and cannot broadcast unmade buffers), which a branch ran on the other ranks' batches; they
            # wait in DDP's next all_reduce, as for any error of one rank's loop, until this rank's process ends.
            _tickets.refuse_unmaterialised_at_step(self.model, "IMP", self.rewind_step)
        self.step_in_cycle += 1
        self._capture_if_due()

    def _capture_due(self, step_in_cycle: int) -> bool:
        """Whether θ_k is kept once the first cycle has counted `step_in_cycle` steps."""
        return (self.rewind == "weights" and self.cycle == 0 and step_in_cycle == self.rewind_step
                and self.rewind_state is None)

    def _capture_if_due(self) -> None:
        if self._capture_due(self.step_in_cycle):
            self.rewind_state = _tickets.snapshot(self.model)

    def _layers_updated(self) -> list[str]:
        """The names of the layers pruned: all of them, frozen or not (`broadcast_masks` compares them across
        ranks)."""
        return _tickets.layer_names(self._groups)

    def prune_masks(self, density: float | None = None) -> list[Tensor]:
        """The next masks from the current weights (nothing is changed); `density` as in `next_cycle`."""
        _tickets.check_own_weights(self._groups, "IMP")
        density = _tickets.check_target_density(density)
        return _tickets.magnitude_masks(self._groups, self.prune_fraction, self.scope, density)

    def next_cycle(self, density: float | None = None) -> list[Tensor]:
        """Prunes ⌈p·remaining⌉ weights by magnitude, rewinds, and starts a fresh optimizer.

        `density` (in (0, 1]), for the last pruning of a run aimed at a density: prune to exactly
        round(density·N) weights instead, N every weight of the pruned layers (scope "layer":
        round(density·N_l) of each layer), whatever ⌈p·remaining⌉'s rounding left before (with p =
        1 - density^(1/prunings) the earlier prunings end a weight or two short of it); ValueError, nothing
        changed, if that keeps more weights than remain.

        Returns the new masks (one bool tensor per sparse module, in `sparse_modules` order).
        RuntimeError if weight rewinding is asked before step k was reached.

        Collective under a process group of several ranks (as the construction): every rank of `group` calls it, and
        a call refused on one rank, or given another `density` on some ranks (whose masks would diverge), is refused
        on every rank, nothing changed on any.
        """
        with distributed.Agreement("IMP.next_cycle()", self.group) as agreement:
            if self.rewind == "weights" and self.rewind_state is None:
                raise self._before_rewind("next_cycle()")
            _tickets.check_masks_writable(self._groups, "IMP")   # before the pruning reads them (reset writes them)
            agreement.shared = {"density": _tickets.check_target_density(density)}
        distributed.check_same_arguments("IMP.next_cycle()", agreement.gathered)
        masks = self.prune_masks(density)
        self.reset(masks)
        return masks

    def _before_rewind(self, call: str) -> RuntimeError:
        # No step counted at all is a loop that never calls step(): the count is the only clue it has.
        return RuntimeError(f"{call} before the rewind step: rewind_step={self.rewind_step} but only "
                            f"{self.step_in_cycle} steps were counted: call imp.step() after every optimizer step")

    def reset(self, masks: list[Tensor]) -> None:
        """Starts the next cycle on `masks`: rewinds (per `rewind`), sets them, fresh optimizer.

        `masks` (one bool tensor per layer, as `masks` returns) are checked first, and weight
        rewinding before step k is refused, with nothing changed."""
        _tickets.check_own_weights(self._groups, "IMP")
        _tickets.check_masks_writable(self._groups, "IMP")
        masks = _tickets.check_masks(masks, self._groups)
        if self.rewind == "weights" and self.rewind_state is None:
            raise self._before_rewind("reset()")
        optimizer = _tickets.make_optimizer(self.optimizer_factory, self.model)
        if self.rewind == "weights":
            _tickets.restore(self.model, self.rewind_state)
        _tickets.set_masks(self._groups, masks)
        self.cycle += 1
        self.step_in_cycle = self.rewind_step
        self.optimizer = optimizer

    def run(self, train_fn: Callable[["IMP"], None], cycles: int, *, density: float | None = None) -> None:
        """Runs (or resumes) `cycles` training cycles with pruning between them.

        `train_fn(imp)` trains one cycle from step `imp.step_in_cycle` to its end with
        `imp.optimizer`, calling `imp.step()` after every optimizer step. The model ends trained
        at the last cycle's masks (cycles - 1 prunings). `density` (in (0, 1]) makes the last pruning
        `next_cycle(density)`, so that the last cycle trains at exactly that density (with
        `prune_fraction` = 1 - density^(1/(cycles - 1)) the earlier ones prune evenly towards it); it needs
        cycles >= 2 (ValueError otherwise: no pruning would reach it), and is refused before training (ValueError)
        where it keeps no weight (of a layer, with scope="layer") or the prunings before the last would leave fewer
        weights than it keeps. Collective under a process group of several ranks, as `next_cycle`: arguments refused
        on one rank, or another `cycles` or `density` on some ranks, are refused on every rank before training.
        """
        cycles, density = distributed.agreed_run_arguments(self, train_fn, cycles, density)
        while self.cycle < cycles:
            train_fn(self)
            if self.cycle == cycles - 1:
                break
            self.next_cycle(density if self.cycle == cycles - 2 else None)

    @property
    def masks(self) -> list[Tensor]:
        """Copies of the current masks of the layers IMP prunes, in model order (tied layers once)."""
        return _tickets.masks_of(self._groups)

    def state_dict(self) -> dict:
        """Counters, θ_k and the optimizer's state, as copies: training on leaves a state kept in memory as it was.
        θ_k is keyed by parameter and buffer name, as the model's state dict is, and so is the optimizer's state
        (its parameters are the names in place of torch's positions; an optimizer training a parameter that is not
        the model's is saved by position), so that the state loads into a model that lists its layers in another
        order, and is refused by one with other layers; the names are those of the model IMP was built on,
        wrapper prefixes included ("module." under DistributedDataParallel)."""
        return _tickets.map_tensors(Tensor.clone, {
            "algorithm": "IMP", "cycle": self.cycle, "step_in_cycle": self.step_in_cycle,
            "rewind_state": self.rewind_state,
            "optimizer": _tickets.optimizer_by_name(self.optimizer.state_dict(), self.optimizer,
                                                    _tickets.parameter_names(self.model)),
            **self._settings()})

    def _settings(self) -> dict:
        """The arguments a state is saved with and must be loaded under (`load_state_dict`)."""
        return {"rewind_step": self.rewind_step, "rewind": self.rewind, "prune_fraction": self.prune_fraction,
                "scope": self.scope}

    def load_state_dict(self, state: dict) -> None:
        """Restores a `state_dict()`; load the model's own state first (its masks live there).

        Checked completely first (entries, counts, θ_k against the model, the optimizer state against a
        fresh optimizer, and that it is an IMP state saved with this IMP's rewind, rewind_step,
        prune_fraction and scope, holding no entry that IMP does not save): a bad state raises TypeError or
        ValueError and changes nothing; a parameter missing from the optimizer's state, or one this model lacks, is
        named, and so is an entry IMP does not save (a misspelled or tampered setting, which would go unchecked).
        An optimizer state of older versions, by position (torch's own), loads by position, as it did.
        """
        self._prepare_load(state)()

    def _prepare_load(self, state: dict):
        """Checks `state` completely and returns the function that installs it (load_state_dict runs
        both; broadcast_masks checks on every rank before any rank installs)."""
        _tickets.check_own_weights(self._groups, "IMP")
        # On this rank alone, as every check here: IMP's state may be loaded on one rank alone (broadcast_masks(
        # algorithm=) copies it to the others, running these checks on every rank in one Agreement).
        _tickets.refuse_unmaterialised_when_loading(self.model, "IMP")
        _tickets.check_saved_by(state, "IMP")
        _tickets.check_state_keys(state, ("cycle", "step_in_cycle", "rewind_state", "optimizer"),
                                  ("algorithm", *self._settings()), "IMP")
        # The settings before the counters, which a state saved under another rewind_step or rewind fails with a
        # guess at which (check_rewind_point), whatever else differs.
        _tickets.check_saved_settings(state, self._settings())
        cycle = _tickets.state_count(state, "cycle")
        step_in_cycle = _tickets.state_count(state, "step_in_cycle")
        rewind_state = state["rewind_state"]
        _tickets.check_rewind_point(cycle, step_in_cycle, rewind_state is not None, self.rewind_step,
                                    self.rewind == "weights")
        if rewind_state is not None:
            rewind_state = _tickets.check_snapshot(rewind_state, self.model, "state['rewind_state']", "IMP")
        optimizer = _tickets.loaded_optimizer(self.optimizer_factory, self.model, state["optimizer"],
                                              "state['optimizer']", "IMP")

        def install() -> None:
            self.cycle, self.step_in_cycle = cycle, step_in_cycle
            self.rewind_state = rewind_state
            self.optimizer = optimizer
        return install
