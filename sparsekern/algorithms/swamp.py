"""SWAMP: sparse weight averaging with multiple particles (Choi et al., ICLR 2024).

IMP with weight rewinding in which each cycle trains N particles from the same ticket θ_k ⊙ m,
differing only in data order; each particle keeps an equal-weight running mean of its weights
over the last phase of the cycle (SWA); the N averages are averaged into θ̄, BatchNorm
statistics are recomputed for θ̄, and the next mask is the global magnitude pruning of θ̄.

Particles run one after another in one process, or spread over the ranks of an initialised
`torch.distributed` process group (`group`, default the default one: rank r trains particles r,
r + W, ...; the averages are summed with `all_reduce`). Every rank then holds the same θ̄ and so
prunes to the same mask.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Callable, Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..ops import _checks
from . import _tickets, distributed
from .imp import OptimizerFactory


def data_seed(seed: int, cycle: int, particle: int) -> int:
    """The data-order seed of one particle in one cycle: distinct for each (cycle, particle)."""
    return seed * 1_000_003 + cycle * 10_007 + particle


class SWAMP:
    """Iterative magnitude pruning whose mask comes from the average of N SWA particles.

    Args:
        model: as for `IMP` (sparse modules, start dense); trained, averaged and pruned in place.
            Frozen layers are pruned with the rest by the magnitude of their θ̄, as IMP prunes them
            (frozen from the start, every particle holds their weights as they are, so θ̄ does too). A lazy
            module (nn.LazyBatchNorm1d, ...) must have made its parameters (a forward pass) before SWAMP keeps θ_0
            as it is built (rewind_step=0: refused naming it otherwise); a later θ_k is kept after the first
            forward made them, and trains as the module it becomes (one the forward never runs, on any rank, is
            refused by name on every rank at step k, before anything changes).
        optimizer_factory: called with `model.parameters()` for every particle; use `swamp.optimizer` (one it
            replaced refuses to step, as IMP's do). So an LR scheduler built on the first particle's optimizer
            silently stops driving the later particles: build it on `swamp.optimizer` anew for every particle,
            or set each group's lr from `step_in_cycle` before every step. An error it raises is raised as
            RuntimeError naming it (torch.OutOfMemoryError as it is).
        particles: N, the number of particles per cycle (default 4).
        prune_fraction, rewind_step, scope: as for `IMP` (weight rewinding only).
        swa_start: the step within the cycle after which the particle's running mean starts: the
            weights after every `swa_every`-th step past `swa_start` are averaged with equal weight.
            Set it to where the cycle's last phase begins (the default 0 averages the whole cycle);
            it must be >= rewind_step.
            None: no SWA, a particle contributes its final weights (N = 1 is then IMP-WR exactly, BatchNorm
            statistics included: θ̄ is then the trained model itself, whose statistics are not recomputed).
        swa_every: steps between two SWA samples.
        bn_loader: an iterable of batches (a tensor, or a tuple/list whose first element is the
            input) for recomputing BatchNorm statistics of θ̄ (`torch.optim.swa_utils.update_bn`), read again
            at every cycle (a DataLoader or a list: an iterator used up by one cycle, an empty loader, or one of
            empty batches only, is refused where it yields no batch holding data, and batches that make a statistic
            NaN or infinite where they do, the statistics and the global random streams left as they were; a str, a
            mapping, a tensor or a NumPy array, which iterate by characters, keys or rows, is refused here);
            required when the model has BatchNorm layers and θ̄ is an average (particles > 1 or
            swa_start given), unused otherwise.
        seed: base of `data_seed`, the data order the current particle must use.
        group: the torch.distributed process group whose ranks share the particles (None: the default
            group); a group of one rank, `torch.distributed.new_subgroups(1)[0]`, trains them all on this
            rank, as for independent runs on each rank of one job.

    Loop (the data order of a particle must follow `swamp.data_seed`):

        while True:                          # one cycle
            for t in range(swamp.step_in_cycle, steps):
                x, y = batch(swamp.data_seed, t)   # step t of the order that data_seed draws
                loss_fn(model(x), y).backward()
                swamp.optimizer.step(); swamp.optimizer.zero_grad(); swamp.step()
            if swamp.next_particle():        # True: the model was reset for the next particle
                continue
            evaluate(model)                  # the model holds θ̄ (BatchNorm recomputed)
            if swamp.cycle == cycles - 1: break
            swamp.next_cycle()               # prune θ̄, reset to θ_k ⊙ m, first particle

    or `swamp.run(train_fn, cycles)` with `train_fn(swamp)` training one particle from
    `swamp.step_in_cycle` to the end of the cycle in the order of `swamp.data_seed`.

    Cycle 0 starts dense from the initialisation: the first particle trains from step 0 and θ_k
    (with the optimizer state at k) is kept at step k; the other particles of cycle 0 start from
    θ_k and that optimizer state at step k. Later cycles start every particle from θ_k ⊙ m with a
    fresh optimizer, as IMP does. Under torch.distributed, rank 0's θ_k is broadcast at step k, and
    the construction is collective: an argument refused on one rank only is refused on every rank (the
    others' error names that rank), so that none waits for it in a broadcast, and so are settings that
    differ across ranks (ValueError naming each and the ranks holding each value): particles and
    rewind_step, which would have the ranks enter the cycle's all_reduce or the ticket's broadcast at other
    steps, prune_fraction and scope, which would prune θ̄ to other masks, and swa_start, swa_every and
    seed, under which the ranks would train the particles of no one run.
    `state_dict()` holds everything but the model (checkpoint `model.state_dict()` beside it); under
    torch.distributed, each rank's holds its own particles, so each rank saves and loads its own.
    """

    optimizer = _tickets.FreshOptimizer()   # a replaced one refuses to step

    def __init__(self, model: nn.Module, optimizer_factory: OptimizerFactory, particles: int = 4,
                 prune_fraction: float = 0.2, rewind_step: int = 0, scope: str = "global",
                 swa_start: int | None = 0, swa_every: int = 1, bn_loader: Iterable | None = None,
                 seed: int = 0, group=None):
        # Collective: a check that fails on one rank fails on every rank, which would otherwise wait for it
        # in the broadcast of rank 0's ticket (at construction with rewind_step=0) or the cycle's all_reduce.
        with distributed.Agreement("SWAMP", group) as agreement:
            self._groups = _tickets.sparse_layers(model, "SWAMP")
            self.layers = _tickets.primaries(self._groups)
            _tickets.check_callable(optimizer_factory, "optimizer_factory", "parameters")
            self.particles = _checks.count(particles, "particles", 1)
            self.prune_fraction = _tickets.check_fraction(prune_fraction)
            self.rewind_step = _checks.count(rewind_step, "rewind_step")
            self.scope = _checks.choice(scope, "scope", _tickets.SCOPES)
            if self.rewind_step == 0:   # θ_0 is kept as SWAMP is built
                _tickets.refuse_unmaterialised_when_built(model, "SWAMP")
            self.swa_start = None if swa_start is None else _checks.count(swa_start, "swa_start")
            if self.swa_start is not None and self.swa_start < self.rewind_step:
                # Particles after the first start at step k: none can average weights from before it.
                raise ValueError(f"swa_start must be >= rewind_step ({self.rewind_step}), got {swa_start}")
            self.swa_every = _checks.count(swa_every, "swa_every", 1)
            # A str iterates by characters, a mapping by keys, a tensor or a NumPy array (anything with __array__) by
            # rows (each row taken for a batch): none gives batches, and each would be refused only at the first
            # average.
            if bn_loader is not None and (isinstance(bn_loader, (str, bytes, Mapping))
                                          or hasattr(bn_loader, "__array__") or not hasattr(bn_loader, "__iter__")):
                kind = "a Tensor (it iterates by rows: pass [tensor])" if isinstance(bn_loader, Tensor) else \
                    f"an array, {type(bn_loader).__name__} (it iterates by rows: pass [torch.as_tensor(array)])" \
                    if hasattr(bn_loader, "__array__") else type(bn_loader).__name__
                raise TypeError(f"bn_loader must be an iterable of batches or None, got {kind}")
            if _batch_norms(model) and self._averages():
                if bn_loader is None:
                    raise ValueError("bn_loader is None but the model has BatchNorm layers, whose statistics "
                                     "SWAMP must recompute for the averaged weights")
                if hasattr(bn_loader, "__len__") and len(bn_loader) == 0:
                    raise ValueError(f"bn_loader is empty ({type(bn_loader).__name__} of length 0): SWAMP must "
                                     f"recompute the BatchNorm statistics of the averaged weights from its batches")
            self.seed = _checks.count(seed, "seed")
            self.rank, self.world_size = ((dist.get_rank(group), dist.get_world_size(group))
                                          if dist.is_available() and dist.is_initialized() else (0, 1))
            if self.particles < self.world_size:
                raise ValueError(f"particles ({particles}) must be >= the number of ranks ({self.world_size})")
            agreement.shared = self._settings()
        # Settings that differ across ranks would have them enter the ticket's broadcast (rewind_step) or the cycle's
        # all_reduce (particles) at other steps, prune θ̄ to other masks (prune_fraction, scope), or train particles
        # of different runs (swa_start, swa_every, seed).
        distributed.check_same_settings("SWAMP", agreement.gathered)
        self.model, self.group = model, group
        self.optimizer_factory = optimizer_factory
        self.bn_loader = bn_loader
        self.averaged_parameters = [p for p in model.parameters()]
        self.cycle = 0
        self.particle = self.rank
        self.step_in_cycle = 0
        self.averaged = False               # True once every particle of the cycle is in θ̄
        self.rewind_state: dict[str, Tensor] | None = None
        self.rewind_optimizer_state: dict | None = None
        self.particle_average: list[Tensor] | None = None   # this particle's SWA running mean
        self.average_count = 0
        self.particle_sum: list[Tensor] | None = None       # sum of this rank's finished particles
        self.optimizer = _tickets.make_optimizer(optimizer_factory, model)
        self._capture_if_due()

    @property
    def data_seed(self) -> int:
        """The seed of the current particle's data order."""
        return data_seed(self.seed, self.cycle, self.particle)

    def step(self) -> None:
        """Counts one optimizer step of the current particle; keeps θ_k; updates its SWA mean.

        Call it after every batch, also one whose step a GradScaler skipped: steps count batches, so
        that every particle's cycle has the same length in data. A skipped step that falls on an SWA
        sample adds the unchanged weights once more, as `torch.optim.swa_utils.AveragedModel` would.
        ValueError, nothing counted, for a layer training in inference mode, as `IMP.step`: on this rank alone, as
        DST's and OptG's step() (a loop evaluating on one rank that forgot `to_training()` there fails there), but on
        every rank at the step that keeps θ_k, whose broadcast the others would wait in.
        """
        if self.averaged:
            raise RuntimeError("step() after the cycle's last particle: call next_cycle() first")
        _tickets.refuse_count_end(self.step_in_cycle, "step_in_cycle", "SWAMP")
        if self._capture_due(self.step_in_cycle + 1):   # before the count moves on
            # Collective, as the broadcast of rank 0's θ_k that follows: each rank trains its own particle's batches,
            # and a lazy module that only some ranks' batches run (a data-dependent branch) is made on those ranks
            # alone, as a rank's evaluation may leave its layers alone in inference mode. Refused on one rank only,
            # either left the others waiting in that broadcast.
            with distributed.Agreement("SWAMP.step()", self.group):
                _tickets.refuse_training_in_inference_mode(self._groups, "SWAMP")
                _tickets.refuse_unmaterialised_at_step(self.model, "SWAMP", self.rewind_step)
        else:
            _tickets.refuse_training_in_inference_mode(self._groups, "SWAMP")
        self.step_in_cycle += 1
        self._capture_if_due()
        if self._samples_by(self.step_in_cycle) > self._samples_by(self.step_in_cycle - 1):   # an SWA sample's step
            self._update_average()

    @torch.no_grad()
    def _update_average(self) -> None:
        self.average_count += 1
        if self.particle_average is None:
            self.particle_average = [p.detach().clone() for p in self.averaged_parameters]
            return
        for average, p in zip(self.particle_average, self.averaged_parameters):
            average.add_(p.detach() - average, alpha=1 / self.average_count)

    def _samples_by(self, step_in_cycle: int) -> int:
        """The SWA samples a particle has taken once its cycle has counted `step_in_cycle` steps: one after every
        `swa_every`-th step past `swa_start` (every particle starts at or before it, at 0 or rewind_step). The one
        rule of the samples: `step` takes one where the count grows, `load_state_dict` checks a state's count."""
        return 0 if self.swa_start is None else max(0, (step_in_cycle - self.swa_start) // self.swa_every)

    def _capture_due(self, step_in_cycle: int) -> bool:
        """Whether θ_k is kept once the first cycle has counted `step_in_cycle` steps."""
        return self.cycle == 0 and step_in_cycle == self.rewind_step and self.rewind_state is None

    def _capture_if_due(self) -> None:
        if not self._capture_due(self.step_in_cycle):
            return
        if self.world_size > 1:
            self._adopt_rank0_state()
        self.rewind_state = _tickets.snapshot(self.model)
        self.rewind_optimizer_state = _tickets.map_tensors(Tensor.clone, self.optimizer.state_dict())

    @torch.no_grad()
    def _adopt_rank0_state(self) -> None:
        # Every rank trained to step k on its own data; the ticket must be one, so take rank 0's.
        for value in self.model.state_dict(keep_vars=True).values():
            dist.broadcast(value.data, src=self._first_rank(), group=self.group)
        self.optimizer.load_state_dict(distributed.broadcast_object(self.optimizer.state_dict(), self._first_rank(),
                                                                    self.group))

    def _first_rank(self) -> int:
        """The global rank of `group`'s rank 0, whose ticket every rank of the group takes."""
        return dist.get_global_rank(self.group, 0) if self.group is not None else 0

    @torch.no_grad()
    def next_particle(self) -> bool:
        """Ends the current particle and folds its SWA mean (or final weights) into the sum.

        Returns True when this rank has another particle to train (the model is then reset to
        the ticket, with a fresh optimizer, at step k); False when the cycle's particles are all
        done: the model then holds θ̄, the mean of all N particles' averages (all-reduced across
        ranks), with BatchNorm statistics recomputed on `bn_loader`.
        """
        if self.averaged:
            raise RuntimeError("next_particle() after the cycle's last particle: call next_cycle() first")
        _tickets.check_masks_writable(self._groups, "SWAMP")   # the next particle's start sets them
        if self.rewind_state is None:
            raise RuntimeError(f"particle ended before the rewind step {self.rewind_step} was reached (only "
                               f"{self.step_in_cycle} steps were counted): call swamp.step() after every optimizer "
                               f"step")
        if self.particle_average is None and self.swa_start is not None:
            raise RuntimeError(f"particle ended with no SWA sample: swa_start={self.swa_start} "
                               f"but only {self.step_in_cycle} steps were taken")
        another = self.particle + self.world_size < self.particles
        optimizer = self._particles_optimizer(self.cycle) if another else None   # before anything changes
        if self.particle_average is None:
            self.particle_average = [p.detach().clone() for p in self.averaged_parameters]
        if self.particle_sum is None:
            self.particle_sum = self.particle_average
        else:
            for total, average in zip(self.particle_sum, self.particle_average):
                total.add_(average)
        self.particle_average, self.average_count = None, 0
        if another:
            self.particle += self.world_size
            self._start_particle(optimizer)
            return True
        self._average()
        return False

    def _average(self) -> None:
        if self.world_size > 1:
            for total in self.particle_sum:
                dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.group)
        for p, total in zip(self.averaged_parameters, self.particle_sum):
            p.copy_(total / self.particles if self.particles > 1 else total)
        self.particle_sum = None
        self.averaged = True
        if self.bn_loader is not None and self._averages():
            self._recompute_batch_norm()

    def _averages(self) -> bool:
        """Whether θ̄ is an average of weights, whose BatchNorm statistics no training step kept: not so for one
        particle's final weights (particles=1, swa_start=None), whose statistics training kept, as IMP-WR's."""
        return self.particles > 1 or self.swa_start is not None

    def _recompute_batch_norm(self) -> None:
        """update_bn on bn_loader; if a batch fails, or the loader yields none, every BatchNorm layer gets back its
        statistics, momentum and mode (update_bn would leave them half recomputed, momentum None; over no batch, reset
        to mean 0 and variance 1)."""
        norms = _batch_norms(self.model)
        saved = [({k: v.clone() for k, v in m.state_dict().items()}, m.momentum, m.training) for m in norms]
        training = self.model.training
        # The forward passes draw from the global random streams (dropout): put back with the statistics on failure
        random_states = (torch.get_rng_state(), _cuda_rng_states())
        batches = 0

        def counted():
            nonlocal batches
            for batch in self.bn_loader:
                # A batch of no rows updates no statistic: over those alone, update_bn's reset (mean 0, variance 1)
                # would stay, as over no batch
                data = batch[0] if isinstance(batch, (list, tuple)) and batch else batch
                batches += not (isinstance(data, Tensor) and data.numel() == 0)
                yield batch
        try:
            torch.optim.swa_utils.update_bn(counted(), self.model)
            if norms and not batches:
                raise ValueError("bn_loader yielded no batch holding data (empty, only empty batches, or an iterator "
                                 "used up by an earlier cycle: pass one that can be iterated again, a DataLoader or a "
                                 "list)")
            _refuse_non_finite_statistics(self.model)
        except Exception as error:
            torch.set_rng_state(random_states[0])
            if random_states[1] is not None:
                torch.cuda.set_rng_state_all(random_states[1])
            self.model.train(training)   # first: it sets every submodule's mode, the layers' own come after
            for module, (state, momentum, mode) in zip(norms, saved):
                module.load_state_dict(state)
                module.momentum = momentum
                module.train(mode)
            if isinstance(error, torch.OutOfMemoryError):   # as it is, for a handler that retries smaller
                raise
            raise RuntimeError(f"recomputing BatchNorm statistics on bn_loader failed ({type(error).__name__}: "
                               f"{error}); the model holds the particles' average with its BatchNorm "
                               f"statistics as they were: call torch.optim.swa_utils.update_bn(loader, model) "
                               f"with a working loader") from error

    def _particles_optimizer(self, cycle: int) -> torch.optim.Optimizer:
        """A new particle's optimizer in `cycle`: the factory's, holding the state at step k in cycle 0, whose particles
        all start from it. Made before anything changes, so that a factory that fails leaves SWAMP as it was."""
        optimizer = _tickets.make_optimizer(self.optimizer_factory, self.model)
        if cycle == 0:
            optimizer.load_state_dict(_tickets.map_tensors(Tensor.clone, self.rewind_optimizer_state))
        return optimizer

    def _start_particle(self, optimizer: torch.optim.Optimizer) -> None:
        _tickets.restore(self.model, self.rewind_state)
        if self.cycle > 0:
            _tickets.set_masks(self._groups, self.masks)
        self.step_in_cycle = self.rewind_step
        self.optimizer = optimizer

    def prune_masks(self, density: float | None = None) -> list[Tensor]:
        """The next masks from the current weights (θ̄ once the cycle is averaged); `density` as in
        `next_cycle`."""
        _tickets.check_own_weights(self._groups, "SWAMP")
        density = _tickets.check_target_density(density)
        return _tickets.magnitude_masks(self._groups, self.prune_fraction, self.scope, density)

    def next_cycle(self, density: float | None = None) -> list[Tensor]:
        """Prunes θ̄ by magnitude and starts the next cycle's first particle from θ_k ⊙ m. `density`: prune to
        exactly that density instead of by ⌈p·remaining⌉, as `IMP.next_cycle` does.

        Collective under a process group of several ranks, as `IMP.next_cycle`: θ̄ is the same on every rank, and a
        call refused on one rank, or given another `density` on some ranks (whose masks would diverge), is refused on
        every rank, nothing changed on any."""
        with distributed.Agreement("SWAMP.next_cycle()", self.group) as agreement:
            _tickets.check_own_weights(self._groups, "SWAMP")
            if not self.averaged:
                raise RuntimeError("next_cycle() before the cycle's particles were averaged (next_particle())")
            _tickets.check_masks_writable(self._groups, "SWAMP")
            agreement.shared = {"density": _tickets.check_target_density(density)}
        distributed.check_same_arguments("SWAMP.next_cycle()", agreement.gathered)
        masks = self.prune_masks(density)
        optimizer = self._particles_optimizer(self.cycle + 1)
        _tickets.set_masks(self._groups, masks)
        self.cycle += 1
        self.particle = self.rank
        self.averaged = False
        self._start_particle(optimizer)
        return masks

    def run(self, train_fn: Callable[["SWAMP"], None], cycles: int, *, density: float | None = None) -> None:
        """Runs (or resumes) `cycles` cycles; the model ends holding the last cycle's θ̄. `density`: the last
        pruning is `next_cycle(density)`, as in `IMP.run` (cycles >= 2). Collective, as `IMP.run`: arguments
        refused on one rank, or another `cycles` or `density` on some ranks, are refused on every rank before training.
        """
        cycles, density = distributed.agreed_run_arguments(self, train_fn, cycles, density)
        while self.cycle < cycles:
            if not self.averaged:
                train_fn(self)
                if self.next_particle():
                    continue
            if self.cycle == cycles - 1:
                return
            self.next_cycle(density if self.cycle == cycles - 2 else None)

    @property
    def masks(self) -> list[Tensor]:
        """Copies of the current masks of the layers SWAMP prunes, in model order (tied layers once)."""
        return _tickets.masks_of(self._groups)

    def state_dict(self) -> dict:
        """This rank's state, as copies (training on leaves a state kept in memory as it was): under
        torch.distributed, each rank's holds the particles it trained, so each rank saves its own, and it
        resumes on the same rank of as many ranks. Everything is keyed by parameter (and buffer) name: θ_k as the
        model's state dict is, the particle's average and the particles' sum, and the optimizer's states (their
        parameters are the names in place of torch's positions; an optimizer training a parameter that is not
        the model's is saved by position), so that the state loads into a model that lists its layers in another
        order, and is refused by one with other layers; the names are those of the model SWAMP was built on,
        wrapper prefixes included ("module." under DistributedDataParallel)."""
        names = _tickets.parameter_names(self.model)
        rewind_optimizer_state = self.rewind_optimizer_state
        if rewind_optimizer_state is not None:   # kept by position, for the optimizer of each particle to load
            rewind_optimizer_state = _tickets.optimizer_by_name(rewind_optimizer_state, self.optimizer, names)
        return _tickets.map_tensors(Tensor.clone, {
            "algorithm": "SWAMP", "cycle": self.cycle, "particle": self.particle, "step_in_cycle": self.step_in_cycle,
            "averaged": self.averaged, "rewind_state": self.rewind_state,
            "rewind_optimizer_state": rewind_optimizer_state,
            "particle_average": _tickets.tensors_by_name(self.particle_average, names, self.averaged_parameters),
            "average_count": self.average_count,
            "particle_sum": _tickets.tensors_by_name(self.particle_sum, names, self.averaged_parameters),
            "optimizer": _tickets.optimizer_by_name(self.optimizer.state_dict(), self.optimizer, names),
            "world_size": self.world_size, **self._settings()})

    def _settings(self) -> dict:
        """The arguments a state is saved with and must be loaded under (`load_state_dict`)."""
        return {"rewind_step": self.rewind_step, "particles": self.particles, "prune_fraction": self.prune_fraction,
                "scope": self.scope, "swa_start": self.swa_start, "swa_every": self.swa_every, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        """Restores a `state_dict()` saved by this rank of as many ranks (each rank's holds only the particles
        it trained); load the model's own state first.

        Checked completely first (entries, counts, tensors against the model, and that it is a SWAMP state
        saved on as many ranks with this SWAMP's rewind_step, particles, prune_fraction, scope, swa_start,
        swa_every and seed, holding no entry that SWAMP does not save, at a point of a cycle that SWAMP reaches: an
        averaged state is one of the cycle's last particle, past its first SWA sample, another one counts the SWA
        samples its step_in_cycle took): a bad state raises TypeError or ValueError and changes nothing; a parameter
        missing from it, or one this model lacks, is named, and so is an entry SWAMP does not save (a misspelled or
        tampered setting, which would go unchecked). A state of older versions, which hold the particles' tensors and
        the optimizers' states by position (lists, torch's own), loads by position, as it did. Under
        torch.distributed, collective (every rank loads its own state): a state refused on one rank is refused on
        every rank (the others' error names that rank), none of which changes.
        """
        # A rank refused alone would leave the others waiting in the next broadcast of θ_k or all_reduce of the
        # particles: its own state can be bad, or its model hold a lazy module that only its own batches left unmade.
        with distributed.Agreement("SWAMP.load_state_dict()", self.group):
            install = self._prepare_load(state)
        install()

    def _check_cycle_point(self, averaged: bool, particle: int, step_in_cycle: int, has_rewind_state: bool,
                           has_average: bool, has_sum: bool, average_count: int) -> None:
        """ValueError naming the entries of a state whose point in the cycle SWAMP never reaches. Averaged (by
        `next_particle` at this rank's last particle): at that particle, θ_k kept, past the first SWA sample, every
        average folded into θ̄ (no particle's average nor sum left); resumed from one saved mid-cycle, the next cycle
        pruned a model holding one particle's weights as θ̄. Not averaged: the particles' sum held exactly from this
        rank's second particle of the cycle on (without it, the particles before were lost from θ̄), and as many SWA
        samples counted as `step` takes by step_in_cycle (`_samples_by`: another count weighs the samples to come
        unequally in the particle's running mean)."""
        first, last = particle < self.world_size, particle + self.world_size >= self.particles
        if not averaged:
            if has_sum == first:
                raise ValueError(f"state['particle_sum'] is {'set' if has_sum else 'None'}, but state['particle']="
                                 f"{particle} is {'' if first else 'not '}this rank's first particle of the cycle, "
                                 f"which {'starts no' if first else 'adds to the'} sum of the particles before it")
            if average_count != self._samples_by(step_in_cycle):
                raise ValueError(f"state['average_count']={average_count}, but state['step_in_cycle']="
                                 f"{step_in_cycle} comes after {self._samples_by(step_in_cycle)} SWA samples of the "
                                 f"particle (swa_start={self.swa_start}, swa_every={self.swa_every})")
            return
        if not last:
            raise ValueError(f"state['averaged']=True, but state['particle']={particle} is not this rank's last of "
                             f"particles={self.particles}: a cycle is averaged once its last particle has ended")
        if not has_rewind_state:
            raise ValueError("state['averaged']=True, but state['rewind_state'] is None: a particle ends once θ_k is "
                             "kept")
        if self.swa_start is not None and step_in_cycle < self.swa_start + self.swa_every:
            raise ValueError(f"state['averaged']=True, but state['step_in_cycle']={step_in_cycle} is before the first "
                             f"SWA sample (step {self.swa_start + self.swa_every}: swa_start={self.swa_start}, "
                             f"swa_every={self.swa_every}), which a particle ends after")
        if has_average or has_sum:
            held = "particle_average" if has_average else "particle_sum"
            raise ValueError(f"state['averaged']=True, but state[{held!r}] is set: averaging folds every particle's "
                             f"average into θ̄ and keeps neither")

    def _prepare_load(self, state: dict):
        """Checks `state` completely and returns the function that installs it."""
        _tickets.check_own_weights(self._groups, "SWAMP")
        _tickets.refuse_unmaterialised_when_loading(self.model, "SWAMP")
        _tickets.check_saved_by(state, "SWAMP")
        _tickets.check_state_keys(state, ("cycle", "particle", "step_in_cycle", "averaged", "rewind_state",
                                          "rewind_optimizer_state", "particle_average", "average_count",
                                          "particle_sum", "optimizer"),
                                  ("algorithm", "world_size", *self._settings()), "SWAMP")
        _tickets.check_saved_settings(state, self._settings())
        counts = {name: _tickets.state_count(state, name)
                  for name in ("cycle", "particle", "step_in_cycle", "average_count")}
        particle = counts["particle"]
        if "world_size" in state:   # not in a state saved before it was kept
            saved_world = _tickets.state_count(state, "world_size", 1)
            if saved_world != self.world_size:
                saved_by = (f"rank {particle % saved_world} of {saved_world} ranks" if saved_world > 1
                            else "a single process")
                raise ValueError(f"state['world_size']={saved_world}: the state was saved by {saved_by}, and this "
                                 f"SWAMP runs {_on_ranks(self.world_size)}; each rank's state holds only the "
                                 f"particles it trained, so resume {_on_ranks(saved_world)}"
                                 f"{', each rank loading its own' if saved_world > 1 else ''}")
        if particle >= self.particles or particle % self.world_size != self.rank:
            raise ValueError(f"state['particle']={particle} is not a particle of rank {self.rank} of "
                             f"{self.world_size} with particles={self.particles}")
        averaged = state["averaged"]
        _checks.flag(averaged, "state['averaged']")
        rewind_state = state["rewind_state"]
        _tickets.check_rewind_point(counts["cycle"], counts["step_in_cycle"], rewind_state is not None,
                                    self.rewind_step, keeps_weights=True)
        if rewind_state is not None:
            rewind_state = _tickets.check_snapshot(rewind_state, self.model, "state['rewind_state']", "SWAMP")
        rewind_optimizer_state = state["rewind_optimizer_state"]
        if (rewind_optimizer_state is None) != (rewind_state is None):
            raise ValueError("state['rewind_optimizer_state'] must be given exactly when state['rewind_state'] is")
        if rewind_optimizer_state is not None:  # it must load into this optimizer when a particle starts
            # Kept as the fresh optimizer (of no other use) holds it: by position, in this model's order.
            rewind_optimizer_state = _tickets.loaded_optimizer(
                self.optimizer_factory, self.model, rewind_optimizer_state, "state['rewind_optimizer_state']",
                "SWAMP").state_dict()
        names = _tickets.parameter_names(self.model)
        particle_average = _tickets.check_tensors_by_name(state["particle_average"], names, self.averaged_parameters,
                                                          "state['particle_average']", "SWAMP")
        if (particle_average is None) != (counts["average_count"] == 0):
            raise ValueError(f"state['particle_average'] and state['average_count']="
                             f"{counts['average_count']} disagree")
        particle_sum = _tickets.check_tensors_by_name(state["particle_sum"], names, self.averaged_parameters,
                                                      "state['particle_sum']", "SWAMP")
        self._check_cycle_point(averaged, particle, counts["step_in_cycle"], rewind_state is not None,
                                particle_average is not None, particle_sum is not None, counts["average_count"])
        optimizer = _tickets.loaded_optimizer(self.optimizer_factory, self.model, state["optimizer"],
                                              "state['optimizer']", "SWAMP")

        def install() -> None:
            for name, value in counts.items():
                setattr(self, name, value)
            self.averaged = averaged
            self.rewind_state = rewind_state
            self.rewind_optimizer_state = rewind_optimizer_state
            self.particle_average = particle_average
            self.particle_sum = particle_sum
            self.optimizer = optimizer
        return install


def _on_ranks(world_size: int) -> str:
    return f"on {world_size} ranks" if world_size > 1 else "in a single process"


def _cuda_rng_states() -> list[Tensor] | None:
    """The random states of the CUDA devices, where CUDA has been initialised (reading them would initialise it)."""
    return torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None


def _batch_norms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _refuse_non_finite_statistics(model: nn.Module) -> None:
    """ValueError naming the BatchNorm layers whose recomputed running statistics hold NaN or infinity (a batch of
    bn_loader did; one host read): the averaged model would compute NaN from them, silently."""
    named = [(name, module) for name, module in model.named_modules()
             if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None]
    if not named:
        return
    finite = torch.stack([torch.isfinite(module.running_mean).all() & torch.isfinite(module.running_var).all()
                          for _, module in named]).tolist()
    bad = [name for (name, _), ok in zip(named, finite) if not ok]
    if bad:
        raise ValueError(f"the BatchNorm statistics recomputed on bn_loader's batches are not finite in layers {bad} "
                         f"(a batch holds NaN or infinity)")
