"""SWAMP with 2 particles, one per rank, for test_swamp (run under torch.distributed.run with gloo).

`run()` trains 3 cycles and returns the final model state; the script saves each rank's to the
path given (with {} for the rank). Without a process group, `run()` trains the particles in sequence.
"""
import sys

import torch
import torch.distributed as dist

from sparsekern.algorithms import SWAMP

from ..helpers import batch, end_rank, mlp


def run() -> dict:
    g = torch.Generator().manual_seed(11)
    x, y = torch.randn(96, 64, generator=g), torch.randint(0, 10, (96,), generator=g)
    model = mlp(12, hidden=16, batch_norm=True)
    loader = [x[i:i + 32] for i in range(0, len(x), 32)]
    swamp = SWAMP(model, lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9), particles=2,
                  prune_fraction=0.3, rewind_step=3, swa_start=5, bn_loader=loader, seed=3)
    while True:
        for t in range(swamp.step_in_cycle, 10):
            inputs, targets = batch(x, y, swamp.data_seed, t, 16)
            torch.nn.functional.cross_entropy(model(inputs), targets).backward()
            swamp.optimizer.step()
            swamp.optimizer.zero_grad()
            swamp.step()
        if swamp.next_particle():
            continue
        if swamp.cycle == 2:
            return {name: value.clone() for name, value in model.state_dict().items()}
        swamp.next_cycle()


if __name__ == "__main__":
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    state = run()
    torch.save(state, sys.argv[1].format(dist.get_rank()))
    end_rank()
