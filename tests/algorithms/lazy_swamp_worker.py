"""One rank of test_swamp.py's lazy-module test (torch.distributed.run, gloo, CPU): SWAMP refuses a lazy module
that the forward never made on every rank when it is unmade on one, rather than leave the others waiting in its
next collective, and so a layer left in inference mode on one rank at the step that keeps θ_k. Each rank trains
its own particle's batches, and a data-dependent branch runs the lazy module on particle 0's alone (rank 0's), so
rank 1's stays unmade.

Each scenario returns a bool (True: as it should be); they run in order, and a hang in one shows as the test's
timeout. Writes {scenario: bool} to <out>/rank<r>.pt.
"""
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

import sparsekern
from sparsekern.algorithms import SWAMP

from ..helpers import end_rank


class _Branching(nn.Module):
    """A sparse layer, and a lazy one that runs only on batches holding a feature above 50."""

    def __init__(self):
        super().__init__()
        self.body = sparsekern.sparsify(nn.Sequential(nn.Linear(8, 4)), 1.0)
        self.rare = nn.LazyLinear(4)

    def forward(self, x):
        h = self.body(x)
        if bool((x > 50).any()):
            h = h + self.rare(h)
        return h


def _swamp(model):
    return SWAMP(model, lambda p: torch.optim.SGD(p, lr=0.1), particles=2, rewind_step=2, swa_start=None)


def _built():
    torch.manual_seed(0)
    model = _Branching()
    return model, _swamp(model)


def _train_step(model, swamp):
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(swamp.data_seed + 100 * swamp.step_in_cycle))
    if swamp.particle == 0:
        x[0, 0] = 100.0
    model(x).sum().backward()
    swamp.optimizer.step()
    swamp.optimizer.zero_grad()
    swamp.step()


def _refused(call, words):
    """Whether call() raised ValueError holding each of `words`."""
    try:
        call()
    except ValueError as error:
        return all(word in str(error) for word in words)
    return False


def _words(rank, who):
    named = "'rare' (LazyLinear) have not made their parameters yet"
    return [named] if rank == 1 else [f"{who} failed on rank 1", named]


def load_is_refused_on_every_rank(rank):
    """A state loaded while rank 1's lazy module is unmade: refused on both ranks, neither SWAMP changed."""
    model, swamp = _built()
    _train_step(model, swamp)
    state = swamp.state_dict()
    fresh = _swamp(model)
    refused = _refused(lambda: fresh.load_state_dict(state), _words(rank, "SWAMP.load_state_dict()"))
    return refused and fresh.step_in_cycle == 0


def step_k_is_refused_on_every_rank_and_goes_on_once_made(rank):
    """The step that reaches rewind_step with rank 1's lazy module unmade: refused on both ranks before anything
    changed; run once on rank 1, the next call keeps rank 0's θ_k on both."""
    model, swamp = _built()
    _train_step(model, swamp)
    refused = _refused(lambda: _train_step(model, swamp), _words(rank, "SWAMP.step()"))
    unchanged = swamp.step_in_cycle == 1 and swamp.rewind_state is None
    if rank == 1:
        with torch.no_grad():
            model.rare(torch.zeros(1, 4))
    swamp.step()
    kept = torch.cat([value.flatten().float() for value in swamp.rewind_state.values()])
    rank0 = kept.clone()
    dist.broadcast(rank0, src=0)   # on every rank: no `and` may skip the collective
    return refused and unchanged and swamp.step_in_cycle == 2 and torch.equal(kept, rank0)


def step_k_is_refused_on_every_rank_for_a_layer_left_in_inference_mode(rank):
    """The step that reaches rewind_step with a layer left in inference mode on rank 1 alone (an evaluation there
    that forgot to_training): refused on both ranks before anything changed, where rank 0 waited in the broadcast of
    its θ_k."""
    model, swamp = _built()
    with torch.no_grad():
        model.rare(torch.zeros(1, 4))   # made on both ranks: only the inference mode differs
    _train_step(model, swamp)
    if rank == 1:
        sparsekern.nn.to_inference(model)
    named = "layer 'body.0' is in inference mode"
    words = [named] if rank == 1 else ["SWAMP.step() failed on rank 1", named]
    refused = _refused(swamp.step, words)
    return refused and swamp.step_in_cycle == 1 and swamp.rewind_state is None


if __name__ == "__main__":
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    results = {scenario.__name__: scenario(rank)
               for scenario in (load_is_refused_on_every_rank, step_k_is_refused_on_every_rank_and_goes_on_once_made,
                                step_k_is_refused_on_every_rank_for_a_layer_left_in_inference_mode)}
    torch.save(results, os.path.join(sys.argv[1], f"rank{rank}.pt"))
    end_rank()
