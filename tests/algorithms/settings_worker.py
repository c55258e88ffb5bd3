"""One rank of test_distributed.py's settings tests (torch.distributed.run, gloo, 2 ranks, CPU).

1. DST, IMP, OptG and SWAMP built with a setting that differs across the ranks (rank 0's value, rank 1's) are
   refused, on both ranks, by one ValueError naming the setting and each rank's value, with the model's masks
   as they were. Runs in order: a construction let through on one rank only would pair its collectives with
   the next scenario's (SWAMP broadcasting its ticket at rewind_step 0), and show as an error or the timeout.
2. DST and OptG built on ranks that freeze different sparse layers (which they leave alone) are refused, on
   both ranks, by one ValueError naming each such layer and the ranks updating it; a layer frozen on every rank,
   or frozen on some under an algorithm that prunes frozen layers with the rest (IMP, OptG's magnitude), builds.
   A layer frozen on one rank after construction is refused likewise by broadcast_masks(algorithm=...), whose
   copy would diverge again at the next update.
3. Equal settings build (a sparsekern.Criterion of one name, flags and score function on both ranks, a schedule
   function of one name, total_steps that time no update), in one all_gather_object, and DST trains under DDP to the
   same masks and weights as a DST whose group of one rank compares nothing.
Writes {"refused": {scenario: error message or None}, "unchanged": {scenario: masks as before},
"accepted": {scenario: bool}, "frozen_apart": {scenario: (error message or None, masks as before)},
"gathers": int, "trains_as_unchecked": bool} to <out>/rank<r>.pt.
"""
import os
import sys
import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import sparsekern
from sparsekern.nn import sparse_modules

from ..helpers import end_rank


def _magnitude(weights, grads, masks, *, generator):
    return [w.abs() for w in weights]


def _square(weights, grads, masks, *, generator):
    return [w.square() for w in weights]


def _magnitude_given_any_count(weights, grads, masks, *, generator, n=None):
    """|θ| + 1, which a criterion deciding its own count may return too (it drops nothing: no score is 0)."""
    return [w.abs() + 1 for w in weights]


def _linear(step):
    return 0.3 * (1 - step / 20)


def _halving(step):
    return 0.3 * 0.5 ** (step // 4)


def mine(score=_magnitude, **flags):
    return sparsekern.Criterion("mine", score, **{"reads_gradient": False, "elementwise": True, **flags})


def sparse_model(density=0.3):
    torch.manual_seed(0)
    return sparsekern.sparsify(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)), density,
                               generator=torch.Generator().manual_seed(0))


def dst(model, **options):
    options = {"update_every": 2, "total_steps": 20, **options}
    return sparsekern.DST(model, torch.optim.SGD(model.parameters(), lr=0.1), **options)


def imp(model, **options):
    return sparsekern.IMP(model, lambda parameters: torch.optim.SGD(parameters, lr=0.1), **options)


def optg(model, **options):
    return sparsekern.OptG(model, **{"sparsity": 0.5, "epochs": 3, **options})


def swamp(model, **options):
    return sparsekern.SWAMP(model, lambda parameters: torch.optim.SGD(parameters, lr=0.1),
                            **{"particles": 2, **options})


# scenario: (algorithm, density, rank 0's options, rank 1's options)
DIFFERING = {
    "DST prune": (dst, 0.3, {"prune": "magnitude"}, {"prune": "set"}),
    "DST grow": (dst, 0.3, {"grow": "gradient"}, {"grow": mine()}),
    # A sparsekern.Criterion of one name with other flags, or another score function (compared by its name).
    "DST prune_elementwise": (dst, 0.3, {"prune": mine()}, {"prune": mine(elementwise=False)}),
    "DST grow_reads_gradient": (dst, 0.3, {"grow": mine()}, {"grow": mine(reads_gradient=True)}),
    "DST prune_decides_count": (dst, 0.3, {"prune": mine(_magnitude_given_any_count, elementwise=False)},
                                {"prune": mine(_magnitude_given_any_count, elementwise=False, decides_count=True)}),
    "DST prune_score": (dst, 0.3, {"prune": mine()}, {"prune": mine(_square)}),
    "DST scope": (dst, 0.3, {}, {"scope": "global"}),
    "DST block": (dst, 0.3, {}, {"block": (2, 2)}),
    "DST drop_fraction": (dst, 0.3, {}, {"drop_fraction": 0.5}),
    "DST update_every": (dst, 0.3, {}, {"update_every": 4}),
    "DST end_step": (dst, 0.3, {"end_step": 10}, {"end_step": 12}),
    "DST schedule": (dst, 0.3, {}, {"schedule": "constant"}),
    # Schedule functions of the same timing, compared by their qualified names.
    "DST schedule_function": (dst, 0.3, {"schedule": _linear}, {"schedule": _halving}),
    "DST final_drop_fraction": (dst, 0.3, {"schedule": "annealed"},
                                {"schedule": "annealed", "final_drop_fraction": 0.01}),
    "DST reset_state": (dst, 0.3, {}, {"reset_state": False}),
    "DST swap_rounding": (dst, 0.3, {}, {"swap_rounding": "floor"}),
    "DST mest_gamma": (dst, 0.3, {"prune": "mest"}, {"prune": "mest", "mest_gamma": 0.5}),
    "DST snip_shift": (dst, 0.3, {"prune": "snip"}, {"prune": "snip", "snip_shift": 1e-5}),
    "DST host_checks": (dst, 0.3, {}, {"host_checks": False}),
    "IMP prune_fraction": (imp, 1.0, {}, {"prune_fraction": 0.5}),
    "IMP rewind_step": (imp, 1.0, {}, {"rewind_step": 2}),
    "IMP scope": (imp, 1.0, {}, {"scope": "layer"}),
    "IMP rewind": (imp, 1.0, {}, {"rewind": "learning_rate"}),
    "OptG sparsity": (optg, 1.0, {}, {"sparsity": 0.8}),
    "OptG epochs": (optg, 1.0, {}, {"epochs": 4}),
    "OptG beta": (optg, 1.0, {}, {"beta": 2.0}),
    "OptG criterion": (optg, 1.0, {}, {"criterion": "magnitude"}),
    "OptG momentum": (optg, 1.0, {}, {"momentum": 0.5}),
    "OptG nesterov": (optg, 1.0, {}, {"nesterov": True}),
    "OptG lr": (optg, 1.0, {}, {"lr": 0.2}),
    "OptG reach_target": (optg, 1.0, {}, {"reach_target": False}),
    "OptG dense_while_scores_tie": (optg, 1.0, {}, {"dense_while_scores_tie": False}),
    "OptG host_checks": (optg, 1.0, {}, {"host_checks": False}),
    "SWAMP particles": (swamp, 1.0, {}, {"particles": 4}),
    "SWAMP rewind_step": (swamp, 1.0, {}, {"rewind_step": 2, "swa_start": 2}),
    "SWAMP prune_fraction": (swamp, 1.0, {}, {"prune_fraction": 0.5}),
    "SWAMP scope": (swamp, 1.0, {}, {"scope": "layer"}),
    "SWAMP swa_start": (swamp, 1.0, {}, {"swa_start": 3}),
    "SWAMP swa_every": (swamp, 1.0, {}, {"swa_every": 2}),
    "SWAMP seed": (swamp, 1.0, {}, {"seed": 1}),
}

# scenario: (algorithm, density, options, the layers rank 0 freezes, those rank 1 freezes)
FROZEN_APART = {
    "DST": (dst, 0.3, {}, [], ["0"]),
    "DST, each rank its own layer": (dst, 0.3, {}, ["0"], ["2"]),
    "OptG": (optg, 1.0, {}, ["2"], []),
}
# scenario: (algorithm, density, options), built alike, and then given to broadcast_masks after rank 1 froze a layer
FROZEN_LATER = {"DST": (dst, 0.3, {}), "OptG": (optg, 1.0, {})}
# Built on both ranks: a layer that every rank freezes, or one that the algorithm prunes frozen or not.
FROZEN_ALIKE = {
    "DST frozen on every rank": (dst, 0.3, {}, ["0"], ["0"]),
    "OptG magnitude": (optg, 1.0, {"criterion": "magnitude"}, [], ["0"]),
    "IMP": (imp, 1.0, {}, ["0"], []),
}

EQUAL = {
    "DST with a Criterion of one name": (dst, 0.3, {"prune": mine()}, {"prune": mine()}),
    "DST with a schedule function of one name": (dst, 0.3, {"schedule": _linear}, {"schedule": _linear}),
    "DST total_steps past end_step": (dst, 0.3, {"end_step": 10}, {"end_step": 10, "total_steps": 40}),
    "OptG with an lr_schedule": (optg, 1.0, {"lr_schedule": lambda epoch: 0.1}, {"lr_schedule": lambda epoch: 0.1}),
}


def masks_of(model):
    return [module.mask.clone() for _, module in sparse_modules(model)]


def refusal(build, density, options, frozen=()):
    """The message of the ValueError that building raised, or None; and whether the masks stayed as they were. The
    sparse layers named in `frozen` are frozen first (DST and OptG warn that they leave them alone)."""
    model = sparse_model(density)
    for name, module in sparse_modules(model):
        module.weight.requires_grad_(name not in frozen)
    before = masks_of(model)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "(DST|OptG) leaves the masks")
            build(model, **options)
        message = None
    except ValueError as error:
        message = str(error)
    return message, all(torch.equal(a, b) for a, b in zip(before, masks_of(model)))


def frozen_later(build, density, options):
    """Built alike on both ranks, then layer '0' frozen on rank 1 only: the message of the ValueError that
    broadcast_masks(algorithm=) raised, or None; and whether the masks stayed as they were."""
    model = sparse_model(density)
    algorithm = build(model, **options)
    if dist.get_rank() == 1:
        sparse_modules(model)[0][1].weight.requires_grad_(False)
    before = masks_of(model)
    try:
        sparsekern.distributed.broadcast_masks(model, algorithm=algorithm)
        message = None
    except ValueError as error:
        message = str(error)
    return message, all(torch.equal(a, b) for a, b in zip(before, masks_of(model)))


def train(model, ddp, group):
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    algorithm = sparsekern.RigL(ddp, optimizer, update_every=2, total_steps=12, group=group)
    data = torch.Generator().manual_seed(100 + dist.get_rank())
    for _ in range(6):
        optimizer.zero_grad()
        nn.functional.cross_entropy(ddp(torch.randn(8, 16, generator=data)),
                                    torch.randint(0, 4, (8,), generator=data)).backward()
        algorithm.step()
        optimizer.step()
    return [(module.mask.clone(), module.weight.detach().clone()) for _, module in sparse_modules(model)]


def trains_as_unchecked():
    """RigL under DDP, built by the checked construction and by one whose group of one rank compares nothing."""
    own, _ = dist.new_subgroups(1)
    runs = []
    for group in (None, own):
        model = sparse_model()
        runs.append(train(model, DistributedDataParallel(model, broadcast_buffers=False), group))
    return all(torch.equal(a, b) for checked, unchecked in zip(*runs) for a, b in zip(checked, unchecked))


def main(out):
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    refused, unchanged = {}, {}
    for scenario, (build, density, *options) in DIFFERING.items():
        refused[scenario], unchanged[scenario] = refusal(build, density, options[rank])
    accepted = {scenario: refusal(build, density, options[rank]) == (None, True)
                for scenario, (build, density, *options) in EQUAL.items()}
    frozen_apart = {scenario: refusal(build, density, options, frozen[rank])
                    for scenario, (build, density, options, *frozen) in FROZEN_APART.items()}
    frozen_apart.update({f"{scenario} frozen later": frozen_later(build, density, options)
                         for scenario, (build, density, options) in FROZEN_LATER.items()})
    accepted.update({scenario: refusal(build, density, options, frozen[rank])[0] is None   # (OptG sets masks)
                     for scenario, (build, density, options, *frozen) in FROZEN_ALIKE.items()})
    gathers, all_gather_object = [], dist.all_gather_object
    dist.all_gather_object = lambda *args, **kwargs: gathers.append(args) or all_gather_object(*args, **kwargs)
    dst(sparse_model())
    dist.all_gather_object = all_gather_object
    torch.save({"refused": refused, "unchanged": unchanged, "accepted": accepted, "frozen_apart": frozen_apart,
                "gathers": len(gathers),
                "trains_as_unchecked": trains_as_unchecked()}, os.path.join(out, f"rank{rank}.pt"))
    end_rank()


if __name__ == "__main__":
    main(sys.argv[1])
