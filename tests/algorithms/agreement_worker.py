"""One rank of test_distributed.py's agreement tests (torch.distributed.run, gloo, CPU): a call that fails on
one rank fails on every rank, with nothing changed on any, rather than leave the others waiting in a collective.

Each scenario returns a bool (True: as it should be); they run in order, and a hang in one shows as the
test's timeout. Writes {scenario: bool} to <out>/rank<r>.pt.
"""
import copy
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms import Join
from torch.nn.parallel import DistributedDataParallel

import sparsekern
from sparsekern.algorithms import distributed
from sparsekern.nn import sparse_modules

from ..helpers import end_rank


def ddp_model():
    torch.manual_seed(0)
    model = sparsekern.sparsify(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)), 0.3,
                                generator=torch.Generator().manual_seed(0))
    return model, DistributedDataParallel(model, broadcast_buffers=False)


def masks_of(model):
    return [module.mask.clone() for _, module in sparse_modules(model)]


def raised(call, kind, words):
    """Whether call() raised `kind` with `words` in its message."""
    try:
        call()
    except kind as error:
        return words in str(error)
    return False


def refused_load_changes_nothing(rank):
    """broadcast_masks(algorithm=) whose state does not load on rank 1 (its DST was built on the unwrapped
    model, so its layer names lack DDP's "module."): ValueError on both ranks, masks and step counts as before."""
    model, ddp = ddp_model()
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    algorithm = sparsekern.SET(ddp if rank == 0 else model, optimizer, update_every=2, total_steps=20)
    algorithm.step_count = 3 + rank
    first = sparse_modules(model)[0][1]
    if rank == 1:
        first.set_mask(first.mask.roll(1, 0))
    before = masks_of(model)
    refused = raised(lambda: distributed.broadcast_masks(ddp, algorithm=algorithm), ValueError,
                     "state['masks']" if rank == 1 else "failed on rank 1")
    unchanged = all(torch.equal(a, b) for a, b in zip(before, masks_of(model))) and algorithm.step_count == 3 + rank
    identical = distributed.masks_identical(ddp)   # on every rank: no `and` may skip the collective
    return refused and unchanged and not identical


def finish_is_carried(rank):
    """Rank 0 called finish() on the step before an update; broadcast_masks(algorithm=) makes rank 1's DST
    finished too: on both, the next backward is masked and the due step() makes no update, so the replicas
    stay identical (rank 1 updated alone, from masked gradients, when finish() was not carried)."""
    model, ddp = ddp_model()
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    algorithm = sparsekern.SET(ddp, optimizer, update_every=4, total_steps=20)
    data = torch.Generator().manual_seed(5)
    def train_step():
        optimizer.zero_grad()
        nn.functional.cross_entropy(ddp(torch.randn(8, 16, generator=data)),
                                    torch.randint(0, 4, (8,), generator=data)).backward()
        updated = algorithm.step()
        optimizer.step()
        return updated
    for _ in range(3):
        train_step()
    if rank == 0:
        algorithm.finish()
    distributed.broadcast_masks(ddp, optimizer=optimizer, algorithm=algorithm)
    masked = not any(module.dense_grad for _, module in sparse_modules(model))
    updated = train_step()   # every rank runs each collective: no `and` may skip one
    identical = distributed.masks_identical(ddp)
    return masked and not updated and algorithm.step_count == 4 and identical


def constructors_fail_together(rank):
    """DST, IMP and OptG given an argument that fails on rank 1 only: ValueError on both ranks (rank 0 waited
    in the replica check's collective, and rank 1's next collective paired with it)."""
    model, ddp = ddp_model()
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    factory = lambda parameters: torch.optim.SGD(parameters, lr=0.1)
    calls = {"DST": lambda: sparsekern.SET(ddp, optimizer, update_every=2 - 2 * rank, total_steps=20),
             "IMP": lambda: sparsekern.IMP(ddp, factory, prune_fraction=0.2 + rank),
             "OptG": lambda: sparsekern.OptG(ddp, sparsity=0.5 + rank, epochs=2)}
    refused = {who: raised(call, ValueError, "failed on rank 1" if rank == 0 else "must be")
               for who, call in calls.items()}
    return all(refused.values())


def dst_checks_replicas_by_one_gather(rank):
    """DST's construction compares its random stream and the masks by one all_gather_object."""
    model, ddp = ddp_model()
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    gather, calls = dist.all_gather_object, []

    def counted(*args, **kwargs):
        calls.append(1)
        return gather(*args, **kwargs)
    dist.all_gather_object = counted
    try:
        sparsekern.SET(ddp, optimizer, update_every=2, total_steps=20)
    finally:
        dist.all_gather_object = gather
    return len(calls) == 1


def per_rank_runs_with_a_group_of_one(rank):
    """Independent per-rank experiments (no DDP, a seed and masks of each rank's own) build DST, IMP and OptG
    when each is given a group of one rank, by which the replica checks compare nothing; over the default
    group they are refused."""
    group, _ = dist.new_subgroups(1)
    torch.manual_seed(rank)
    model = sparsekern.sparsify(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)), 0.3,
                                generator=torch.Generator().manual_seed(rank))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    factory = lambda parameters: torch.optim.SGD(parameters, lr=0.1)
    sparsekern.SET(model, optimizer, update_every=2, total_steps=20, seed=rank, group=group)
    sparsekern.IMP(model, factory, group=group)
    sparsekern.OptG(model, sparsity=0.5, epochs=2, group=group)
    return raised(lambda: sparsekern.SET(model, optimizer, update_every=2, total_steps=20, seed=rank), ValueError,
                  "differs across ranks")


def uneven_inputs_under_join(rank):
    """Join([ddp, dst]) with 6 batches on rank 0 and 3 on rank 1: after the context, rank 1's DST has caught up
    with rank 0's (step count, random stream, masks, momentum), and the replicas stay identical through two
    more mask updates (under Join([ddp]) its step count stayed behind, and the replicas came apart), biases
    and their momentum included (rank 1 kept its own momentum of the biases, which moved them apart).
    Join([dst, ddp]) is refused on every rank at the first step()."""
    model, ddp = ddp_model()
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    algorithm = sparsekern.SET(ddp, optimizer, update_every=2, total_steps=40)
    train_step = uneven_training(rank, ddp, algorithm, lambda: optimizer, (6, 3))
    caught_up = algorithm.step_count == 6
    for _ in range(4):
        train_step()
    identical = distributed.masks_identical(ddp) and same_on_every_rank((model.state_dict(), optimizer.state_dict()))
    return caught_up and identical and refused_when_first(algorithm, ddp, train_step)


def join_with_a_rank_without_inputs(rank):
    """Join([ddp, dst]) with 4 batches on rank 0 and none on rank 1, SGD with momentum: rank 1's optimizer
    never stepped, and takes rank 0's momentum of the sparse weights with its DST state (every rank raised
    ValueError at the block's end, rank 1's optimizer holding no state); the replicas stay identical after."""
    model, ddp = ddp_model()
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    algorithm = sparsekern.SET(ddp, optimizer, update_every=2, total_steps=40)
    train_step = uneven_training(rank, ddp, algorithm, lambda: optimizer, (4, 0))
    momentum = [optimizer.state[module.weight].get("momentum_buffer") for _, module in sparse_modules(model)]
    caught_up = algorithm.step_count == 4 and same_on_every_rank((algorithm.state_dict(), momentum))
    for _ in range(4):
        train_step()
    return caught_up and distributed.masks_identical(ddp)


def adam_catches_up_under_join(rank):
    """Join([ddp, dst]) with Adam, 5 batches on rank 0 and 2 on rank 1: rank 1 takes rank 0's Adam step count of
    the sparse weights with their moments (it kept its own, 2, whose bias correction then moved its weights
    apart from rank 0's at the next optimizer step), the state of every other parameter, and the learning rate
    (as set on each rank here, the rank that trained longer lower)."""
    model, ddp = ddp_model()
    optimizer = torch.optim.Adam(ddp.parameters(), lr=0.01 / (1 + rank))
    algorithm = sparsekern.RigL(ddp, optimizer, update_every=2, total_steps=40)
    train_step = uneven_training(rank, ddp, algorithm, lambda: optimizer, (5, 2))
    caught_up = same_on_every_rank(optimizer.state_dict()) and optimizer.param_groups[0]["lr"] == 0.01
    for _ in range(3):
        train_step()
    return caught_up and distributed.masks_identical(ddp)



def a_scheduler_catches_up_under_join(rank):
    """Join([ddp, dst], lr_scheduler=scheduler) with a LambdaLR stepped per batch, 5 batches on rank 0 and 2 on
    rank 1: rank 1's scheduler takes rank 0's step count with its learning rate, and the replicas stay identical
    through 3 more steps (the learning rate alone was copied: rank 1's scheduler, 3 steps behind, set a higher
    one at its next step, and the weights came apart). A scheduler named on rank 1 only: ValueError on both
    ranks."""
    model, ddp = ddp_model()
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (1 + step))
    algorithm = sparsekern.SET(ddp, optimizer, update_every=2, total_steps=40)
    data = torch.Generator().manual_seed(11 + rank)

    def train(batches, **join):
        with Join([ddp, algorithm], **join):
            for _ in range(batches[rank]):
                optimizer.zero_grad()
                nn.functional.cross_entropy(ddp(torch.randn(8, 16, generator=data)),
                                            torch.randint(0, 4, (8,), generator=data)).backward()
                algorithm.step()
                optimizer.step()
                scheduler.step()
    train((5, 2), lr_scheduler=scheduler)
    caught_up = scheduler.last_epoch == 5
    train((3, 3), lr_scheduler=scheduler)
    identical = same_on_every_rank((model.state_dict(), optimizer.state_dict())) and distributed.masks_identical(ddp)
    refused = raised(lambda: train((1, 1), **({"lr_scheduler": scheduler} if rank else {})), ValueError,
                     "some ranks only")
    return caught_up and identical and refused

def join_keywords_are_checked_on_every_rank(rank):
    """Join's keywords refused, or given, on rank 1 only: Join([ddp, dst], optimizer=another) and the OptG's
    Join(optimizer=) of a keyword optimizer on rank 1 only raise ValueError on both ranks as Join starts, with no
    step taken (rank 1 raised alone and rank 0 waited in DDP's first all-reduce for good); a collective after
    each works on both."""
    model, ddp = ddp_model()
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    dst = sparsekern.SET(ddp, optimizer, update_every=2, total_steps=40)
    optg = sparsekern.OptG(ddp, sparsity=0.5, epochs=3)
    wrong = {"optimizer": torch.optim.SGD(ddp.parameters(), lr=0.1)} if rank else {}
    given = {"optimizer": optimizer} if rank else {}
    before, outcomes = copy.deepcopy(model.state_dict()), []
    for algorithm, join, words in ((dst, wrong, "names another optimizer" if rank else "failed on rank 1"),
                                   (optg, given, "Join(optimizer=...) is given on some ranks only")):
        outcomes.append(raised(lambda: uneven_training(rank, ddp, algorithm, lambda: optimizer, (2, 2), **join),
                               ValueError, words))
        outcomes.append(equal(before, model.state_dict()) and not optimizer.state)
        outcomes.append(distributed.masks_identical(ddp))
    return all(outcomes)


def other_parameter_order_is_refused_under_join(rank):
    """Join([ddp, dst]) where rank 1's optimizer holds the parameters in the other order (as many per group, the
    same state counts): ValueError on both ranks as the block ends, step counts and optimizer state as they were
    (the tensor broadcasts paired a weight's momentum with a bias's, and gloo aborted the process)."""
    model, ddp = ddp_model()
    parameters = list(ddp.parameters())
    optimizer = torch.optim.SGD(parameters[::-1] if rank else parameters, lr=0.1, momentum=0.9)
    algorithm = sparsekern.SET(ddp, optimizer, update_every=2, total_steps=40)
    data, seen = torch.Generator().manual_seed(11 + rank), {}

    def train():
        with Join([ddp, algorithm]):
            for _ in range((3, 2)[rank]):
                optimizer.zero_grad()
                nn.functional.cross_entropy(ddp(torch.randn(8, 16, generator=data)),
                                            torch.randint(0, 4, (8,), generator=data)).backward()
                algorithm.step()
                optimizer.step()
            seen["state"] = copy.deepcopy(optimizer.state_dict())
    refused = raised(train, ValueError, "other parameter groups")
    return refused and equal(seen["state"], optimizer.state_dict()) and algorithm.step_count == (3, 2)[rank]

def same_on_every_rank(value) -> bool:
    """Whether `value` (tensors in nested dicts, lists and tuples) is equal on every rank."""
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return all(equal(other, gathered[0]) for other in gathered)


def equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(equal(a[key], b[key]) for key in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b))
    return a == b


def uneven_training(rank, ddp, algorithm, current_optimizer, batches, **join):
    """Trains `ddp` under Join([ddp, algorithm], **join) on `batches[rank]` batches of this rank's own data,
    calling `algorithm.step()` where its loop does (IMP after the optimizer's step, DST and OptG before), and
    returns the training step, to go on with. `current_optimizer()`: the optimizer training `ddp` (IMP makes
    new ones)."""
    data = torch.Generator().manual_seed(11 + rank)

    def train_step():
        current_optimizer().zero_grad()
        nn.functional.cross_entropy(ddp(torch.randn(8, 16, generator=data)),
                                    torch.randint(0, 4, (8,), generator=data)).backward()
        if isinstance(algorithm, sparsekern.IMP):
            current_optimizer().step()
            algorithm.step()
        else:
            algorithm.step()
            current_optimizer().step()
    with Join([ddp, algorithm], **join):
        for _ in range(batches[rank]):
            train_step()
    return train_step


def imp_under_join(rank):
    """Join([ddp, imp]) with 6 batches on rank 0 and 3 on rank 1, rewind step 4 (which rank 1 never reaches):
    after the context rank 1 has caught up (step count, rewind point θ_k, optimizer momentum), so the next
    cycle prunes the same weights and rewinds them to the same θ_k on both ranks; Join([imp, ddp]) is refused
    on every rank at the first step()."""
    model, ddp = ddp_model()
    imp = sparsekern.IMP(ddp, lambda parameters: torch.optim.SGD(parameters, lr=0.1, momentum=0.9),
                         rewind_step=4)
    train_step = uneven_training(rank, ddp, imp, lambda: imp.optimizer, (6, 3))
    caught_up = imp.step_in_cycle == 6 and same_on_every_rank(imp.state_dict())
    imp.next_cycle()
    for _ in range(2):
        train_step()
    identical = same_on_every_rank(imp.state_dict()) and distributed.masks_identical(ddp)
    return caught_up and identical and refused_when_first(imp, ddp, train_step)


def optg_under_join(rank):
    """Join([ddp, optg], optimizer=optimizer) with 6 batches on rank 0 and 3 on rank 1, the weights trained with
    momentum: after the context rank 1's scores, their momentum and the weights' momentum have caught up with
    rank 0's, so the next epoch's top-k picks the same masks on both ranks and the weights stay the same;
    Join([optg, ddp]) is refused on every rank at the first step()."""
    model, ddp = ddp_model()
    optg = sparsekern.OptG(ddp, sparsity=0.5, epochs=3, lr=0.5)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    train_step = uneven_training(rank, ddp, optg, lambda: optimizer, (6, 3), optimizer=optimizer)
    caught_up = same_on_every_rank((optg.state_dict(), optimizer.state_dict()))
    optg.next_epoch()
    for _ in range(2):
        train_step()
    identical = same_on_every_rank((optg.state_dict(), model.state_dict())) and distributed.masks_identical(ddp)
    return caught_up and identical and refused_when_first(optg, ddp, train_step)


def refused_when_first(algorithm, ddp, train_step) -> bool:
    """Whether Join([algorithm, ddp]) is refused at the first step(): the algorithm cannot tell Join, before
    DDP's collectives, that this rank has inputs."""
    def first():
        with Join([algorithm, ddp]):
            train_step()
    return raised(first, RuntimeError, "list the DistributedDataParallel model first")


class Refused(ValueError):
    """A ValueError of a kind the other ranks cannot name (as torch's or a library's own subclasses)."""


def error_kinds_follow_their_bases(rank):
    """A ValueError subclass raised in an Agreement on rank 1 is a ValueError on rank 0 too (it became a
    RuntimeError there, by its class name), and rank 1 raises its own."""
    def fails_on_rank_1():
        with distributed.Agreement("the check", None):
            if rank == 1:
                raise Refused("refused on rank 1")
    if rank == 1:
        return raised(fails_on_rank_1, Refused, "refused on rank 1")
    try:
        fails_on_rank_1()
    except ValueError as error:
        return type(error) is ValueError and "failed on rank 1 (Refused: refused on rank 1)" in str(error)
    return False


def masks_identical_fails_together(rank):
    """masks_identical on a model that rank 1 alone refuses (as it refuses a sharded model): ValueError on
    both ranks (rank 0 waited in the layers' gather, which rank 1 later paired with another collective)."""
    model, ddp = ddp_model()
    checked = distributed.refuse_sharded

    def refused_on_rank_1(model, who):
        if rank == 1:
            raise ValueError(f"{who}: refused on rank 1")
    distributed.refuse_sharded = refused_on_rank_1
    try:
        return raised(lambda: distributed.masks_identical(ddp), ValueError, "rank 1")
    finally:
        distributed.refuse_sharded = checked


def swamp_fails_together(rank):
    """SWAMP given an argument that fails on rank 1 only: ValueError on both ranks (rank 0 waited in the
    broadcast of its ticket, taken at construction with rewind_step=0)."""
    model, _ = ddp_model()
    return raised(lambda: sparsekern.SWAMP(model, lambda parameters: torch.optim.SGD(parameters, lr=0.1),
                                           particles=2, prune_fraction=0.2 + rank),
                  ValueError, "failed on rank 1" if rank == 0 else "prune_fraction")


def imp_densities_differing_across_ranks_are_refused(rank):
    """IMP.next_cycle(density) and IMP.run(density=) given another density on each rank: ValueError on both ranks
    naming it, with nothing changed (the ranks pruned their masks apart, which masks_identical found only later); the
    same density prunes alike. A train_fn refused on rank 1 alone is refused on both (rank 0 trained on alone)."""
    model, ddp = ddp_model()
    imp = sparsekern.IMP(ddp, lambda parameters: torch.optim.SGD(parameters, lr=0.1))
    before = masks_of(model)
    words = "was called with other arguments on some ranks (density: 0.1 on rank 0, 0.2 on rank 1)"
    refused = [raised(lambda: imp.next_cycle(0.1 + 0.1 * rank), ValueError, f"IMP.next_cycle() {words}"),
               raised(lambda: imp.run(lambda imp: None, 2, density=0.1 + 0.1 * rank), ValueError, f"IMP.run() {words}"),
               raised(lambda: imp.run(rank or (lambda imp: None), 2), TypeError,
                      "failed on rank 1" if rank == 0 else "train_fn")]
    unchanged = imp.cycle == 0 and all(torch.equal(a, b) for a, b in zip(before, masks_of(model)))
    imp.next_cycle(0.1)
    return all(refused) and unchanged and distributed.masks_identical(ddp)


def swamp_densities_differing_across_ranks_are_refused(rank):
    """SWAMP.next_cycle(density) and SWAMP.run(density=) given another density on each rank, once the particles (one
    per rank) are averaged into one θ̄: ValueError on both ranks naming it, nothing changed (the ranks pruned θ̄ to
    other masks); the same density prunes alike."""
    model, _ = ddp_model()
    swamp = sparsekern.SWAMP(model, lambda parameters: torch.optim.SGD(parameters, lr=0.1), particles=2)
    swamp.step()
    swamp.next_particle()
    before = masks_of(model)
    words = "was called with other arguments on some ranks (density: 0.1 on rank 0, 0.2 on rank 1)"
    refused = [raised(lambda: swamp.next_cycle(0.1 + 0.1 * rank), ValueError, f"SWAMP.next_cycle() {words}"),
               raised(lambda: swamp.run(lambda swamp: None, 2, density=0.1 + 0.1 * rank), ValueError,
                      f"SWAMP.run() {words}")]
    unchanged = (swamp.cycle, swamp.averaged) == (0, True) and all(
        torch.equal(a, b) for a, b in zip(before, masks_of(model)))
    swamp.next_cycle(0.1)
    return all(refused) and unchanged and distributed.masks_identical(model)


def swamp_per_rank_with_a_group_of_one(rank):
    """SWAMP given a group of one rank trains all its particles on that rank (rank 0 of its group), as other
    runs on the other ranks do; over the default group one particle on two ranks is refused."""
    group, _ = dist.new_subgroups(1)
    model, _ = ddp_model()
    factory = lambda parameters: torch.optim.SGD(parameters, lr=0.1)
    swamp = sparsekern.SWAMP(model, factory, particles=1, group=group)
    return (swamp.rank, swamp.world_size) == (0, 1) and raised(lambda: sparsekern.SWAMP(model, factory, particles=1),
                                                               ValueError, "number of ranks")


SCENARIOS = (refused_load_changes_nothing, finish_is_carried, constructors_fail_together,
             dst_checks_replicas_by_one_gather, per_rank_runs_with_a_group_of_one, uneven_inputs_under_join,
             imp_under_join, optg_under_join, join_with_a_rank_without_inputs, adam_catches_up_under_join,
             other_parameter_order_is_refused_under_join, a_scheduler_catches_up_under_join,
             join_keywords_are_checked_on_every_rank,
             error_kinds_follow_their_bases,
             masks_identical_fails_together, swamp_fails_together, swamp_per_rank_with_a_group_of_one,
             imp_densities_differing_across_ranks_are_refused, swamp_densities_differing_across_ranks_are_refused)


def main(out):
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    results = {scenario.__name__: scenario(rank) for scenario in SCENARIOS}
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    end_rank()


if __name__ == "__main__":
    main(sys.argv[1])
