"""`sparsekern train` on several ranks under torchrun: who this rank is, its process group, and the agreement that
stops every rank on the same bad input.

torchrun starts one copy of the command per rank and says in environment variables which rank it is (RANK,
LOCAL_RANK, WORLD_SIZE) and where rank 0 waits for the others (MASTER_ADDR, MASTER_PORT); the process group is
initialised from them. Every rank trains the same run in lockstep: `training.Run.train` wraps the model in
DistributedDataParallel and gives each rank its slice of every batch (`batch_slice`).

A rank that stopped on a bad input alone would leave the others waiting in their next collective. So the ranks
join the group first, then each checks its inputs, catching the error, and they `agree`: if any rank failed,
every rank raises the same error.
"""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..algorithms import distributed


@dataclass(frozen=True)
class Ranks:
    """This process's rank among `world_size` (its device is cuda:`local_rank` when it trains on CUDA)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def several(self) -> bool:
        return self.world_size > 1


def from_environment() -> Ranks:
    """The ranks a torch.distributed launcher set (a single process when WORLD_SIZE is unset or 1); ValueError
    (one line) for variables that do not describe a rank."""
    world_size = _variable("WORLD_SIZE", default=1, low=1)
    if world_size == 1:
        return Ranks()
    rank = _variable("RANK", low=0)
    if rank >= world_size:
        raise ValueError(f"RANK={rank} is not below WORLD_SIZE={world_size}")
    return Ranks(rank, _variable("LOCAL_RANK", low=0), world_size)


def _variable(name: str, low: int, default: int | None = None) -> int:
    text = os.environ.get(name, "").strip()
    if not text and default is not None:
        return default
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < low:
        context = "" if name == "WORLD_SIZE" else f"; WORLD_SIZE={os.environ.get('WORLD_SIZE')!r}"
        raise ValueError(f"{name}={text!r} must be an integer >= {low} (torchrun sets it on every rank it starts"
                         f"{context})")
    return value


def check_config(config, ranks: Ranks) -> None:
    """ValueError (one line) for a run that cannot train data-parallel on `ranks`."""
    if not ranks.several:
        return
    if config.method == "swamp":
        raise ValueError(f"--method swamp cannot train data-parallel (WORLD_SIZE={ranks.world_size}): SWAMP spreads "
                         f"its particles over the ranks itself, each rank training another particle on its own data "
                         f"order, which DistributedDataParallel would average into one; train it in one process")
    if config.batch_size < ranks.world_size:
        raise ValueError(f"--batch-size {config.batch_size} is the global batch, split over the {ranks.world_size} "
                         f"ranks (WORLD_SIZE), so some ranks would train on no sample: use at least "
                         f"{ranks.world_size}")


def start(ranks: Ranks, device: str) -> None:
    """Initialises the default process group from torchrun's environment: NCCL, on cuda:LOCAL_RANK, when the run
    trains on CUDA; gloo otherwise (also when CUDA was asked for but is missing, so that the ranks can agree on
    that error)."""
    cuda = device == "cuda" and torch.cuda.is_available()
    if cuda:
        if ranks.local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={ranks.local_rank} has no CUDA device of its own (torch sees "
                             f"{torch.cuda.device_count()}): start at most that many ranks per machine")
        torch.cuda.set_device(ranks.local_rank)
    with contextlib.nullcontext() if cuda else _stdout_silenced():
        dist.init_process_group("nccl" if cuda else "gloo", init_method="env://", rank=ranks.rank,
                                world_size=ranks.world_size)


@contextlib.contextmanager
def _stdout_silenced():
    """Sends file descriptor 1 to /dev/null: the Gloo of torch 2.9 (before pytorch/gloo#466, which made it a log
    line off by default) writes "[Gloo] Rank r is connected to n peer ranks..." to stdout from C++ as each rank
    joins, on every rank, where the ranks print nothing but rank 0's report. Exceptions still propagate."""
    if sys.stdout is not None:
        sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # descriptor 1 closed: nothing to silence
        yield
        return
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def end() -> None:
    """Destroys the default process group, if one was started (also after an error)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def agree(error: str | None) -> None:
    """Collective: ValueError on every rank when any rank's `error` is not None, carrying the first failing rank's
    message (named by rank unless every rank failed alike)."""
    errors: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    failed = [(rank, message) for rank, message in enumerate(errors) if message is not None]
    if not failed:
        return
    rank, message = failed[0]
    if len(failed) == len(errors) and len({message for _, message in failed}) == 1:
        raise ValueError(message)
    raise ValueError(f"rank {rank} of {len(errors)}: {message}")


def agree_on_run(options: dict) -> None:
    """Collective: ValueError (one line, the same on every rank) naming each of `options` (this rank's value of each,
    by its name on the command line) whose value differs across the ranks, with the ranks holding each value.
    torchrun gives every rank one command line, but ranks started by hand, or on several machines each with its own
    command, may differ: they would not train one run. Some differences stop it at the first update (DST's
    settings), others only after an epoch, as a divergence that looks like a bug (another --lr), or never (another
    --batch-size trains a run that is neither rank's), and ranks with other step counts (--epochs, --stop-after, a
    --resume given on some ranks only) pair their collectives wrongly, or wait for one that never comes."""
    held: list[dict | None] = [None] * dist.get_world_size()
    dist.all_gather_object(held, options)
    differing = distributed.differing_values(held)
    if differing:
        raise ValueError(f"the ranks were started with other arguments ({'; '.join(differing)}), under which they "
                         f"would not train one run: start every rank with the same command")


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def batch_slice(batch: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's part of a batch: `world_size` contiguous slices as even as possible (sizes differ by one at
    most, the first ones longer; a batch shorter than `world_size` leaves the last ranks empty slices)."""
    return torch.tensor_split(batch, world_size)[rank]
