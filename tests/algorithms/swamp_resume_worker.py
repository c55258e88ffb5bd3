"""One rank of test_resume's SWAMP test (torch.distributed.run, gloo, CPU): 4 particles on 2 ranks, 2 particles
each. Trains 2 cycles uninterrupted; then again to particle 2 + rank of cycle 1 (each rank's second particle,
its state holding the sum of its first), where each rank saves its checkpoint to <out>/checkpoint<rank>.pt;
then resumes a new model and SWAMP from it. Writes {"uninterrupted", "resumed"} (model and SWAMP states at the
end) and "single_process_refusal" (the error a state saved by one process raises) to <out>/rank<rank>.pt."""
import os
import sys

import torch
import torch.distributed as dist

from sparsekern.algorithms import SWAMP

from ..helpers import batch, end_rank, mlp

STEPS, CYCLES = 8, 2
STOP = (1, 5)   # (cycle, step) of each rank's second particle


def build(seed: int):
    model = mlp(seed, hidden=16)
    return model, SWAMP(model, lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9), particles=4,
                        prune_fraction=0.3, rewind_step=2, swa_start=4, seed=3)


def train(model, swamp, x, y, stop=None) -> None:
    """Trains SWAMP's cycles to the end, or to `stop` (cycle, step) of this rank's second particle."""
    while True:
        at_stop = stop is not None and swamp.cycle == stop[0] and swamp.particle >= 2
        for t in range(swamp.step_in_cycle, stop[1] if at_stop else STEPS):
            inputs, targets = batch(x, y, swamp.data_seed, t, 16)
            torch.nn.functional.cross_entropy(model(inputs), targets).backward()
            swamp.optimizer.step()
            swamp.optimizer.zero_grad()
            swamp.step()
        if at_stop or swamp.next_particle():
            if at_stop:
                return
            continue
        if swamp.cycle == CYCLES - 1:
            return
        swamp.next_cycle()


def states(model, swamp) -> dict:
    return {"model": model.state_dict(), "swamp": swamp.state_dict()}


if __name__ == "__main__":
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, out = dist.get_rank(), sys.argv[1]
    g = torch.Generator().manual_seed(11)
    x, y = torch.randn(96, 64, generator=g), torch.randint(0, 10, (96,), generator=g)
    model, swamp = build(1)
    train(model, swamp, x, y)
    uninterrupted = states(model, swamp)
    model, swamp = build(1)
    train(model, swamp, x, y, stop=STOP)
    checkpoint = os.path.join(out, f"checkpoint{rank}.pt")
    torch.save(states(model, swamp), checkpoint)
    model, swamp = build(7)
    saved = torch.load(checkpoint, weights_only=True)
    model.load_state_dict(saved["model"])
    swamp.load_state_dict(saved["swamp"])
    train(model, swamp, x, y)
    try:   # a state as one process saves it, loaded on 2 ranks
        swamp.load_state_dict({**saved["swamp"], "world_size": 1, "particle": 0})
        single_process_refusal = None
    except ValueError as error:
        single_process_refusal = str(error)
    torch.save({"uninterrupted": uninterrupted, "resumed": states(model, swamp),
                "single_process_refusal": single_process_refusal}, os.path.join(out, f"rank{rank}.pt"))
    end_rank()
