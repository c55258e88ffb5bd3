"""Finished runs of `compare` and `reproduce`, kept one file each as they complete, trained in parallel.

A run's record is named by a hash of everything that decides its result (its `TrainConfig` and, for a run started
from another run's final masks, that run's config), and written atomically, so an interrupted grid loses no
finished run and a rerun into the same folder trains only what is missing. After a change to the code, rerun with
`fresh=True` (`--fresh`): records do not know which code produced them.

Runs are independent and seeded, and every worker process trains on the parent's thread count, so a result does
not depend on how many workers share the work. Each run reports its progress (`Progress`: started, then every epoch)
to the caller as it trains, from a worker through a queue that the parent reads while it waits for the runs.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import warnings
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, replace

import torch

from .. import checkpoint
from ..nn import masks as model_masks   # `masks` names the masks a run starts from
from .data import Dataset
from .interrupts import held_while_starting_workers, ignore_in_this_worker
from .output import write_text
from .training import (COST_KEYS, TrainConfig, damaged_records, damaged_summary, mask_layout, settings, total_epochs,
                       train)

# How often the parent looks for progress from its workers while none of their runs finishes: a bar moves this
# much after the epoch it shows, at most.
PROGRESS_POLL_S = 0.2


@dataclass(frozen=True)
class Job:
    """One run: `config`, started from the final masks of the run of `masks_from` if given (a lottery ticket
    reinitialised, say)."""

    config: TrainConfig
    masks_from: TrainConfig | None = None

    @property
    def key(self) -> str:
        """The name of its record (`key`): two jobs of one key are one run."""
        return key(self.config, self.masks_from)


def unique(jobs: list[Job]) -> list[Job]:
    """Each run of `jobs` once (the first job of each key), in order: what `execute` trains and a progress bar
    counts, decided here only (plans repeat runs: reproduce's experiments share some)."""
    runs: dict[str, Job] = {}
    for job in jobs:
        runs.setdefault(job.key, job)
    return list(runs.values())


@dataclass(frozen=True)
class Progress:
    """Where a run being trained is: `epoch` of its `epochs` (all segments: `training.total_epochs`) done, 0 when it
    has just started, and its test accuracy after that epoch (None at 0); `worker`, the id of the process training
    it (a worker that starts a run has finished its previous one)."""

    job: Job
    epoch: int
    epochs: int
    test_accuracy: float | None
    worker: int


def key(config: TrainConfig, masks_from: TrainConfig | None = None) -> str:
    """The name of a run's record: a hash of what decides its result (`training.settings`: options added to
    TrainConfig later leave it unchanged at their default, so that runs stored before them are still found)."""
    text = json.dumps({"config": settings(config), "masks_from": None if masks_from is None else key(masks_from)},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


# The folder under a compare's or reproduce's --out that holds its `RunStore`.
RUNS_FOLDER = "runs"
RECORD_SUFFIX, MASKS_SUFFIX = ".json", ".masks.pt"


def record_files(jobs: list[Job]) -> list[str]:
    """What `execute` may write for `jobs` into a store in RUNS_FOLDER, as paths relative to that folder's parent:
    each run's record, and the final masks of each run that another run starts from (`RunStore.train`)."""
    runs = unique(jobs)
    sources = _mask_sources(runs)
    return [os.path.join(RUNS_FOLDER, job.key + suffix) for job in runs
            for suffix in (RECORD_SUFFIX, *([MASKS_SUFFIX] if job.key in sources else []))]


def _mask_sources(runs: list[Job]) -> set[str]:
    """The keys of the runs whose final masks another of `runs` starts from."""
    return {key(job.masks_from) for job in runs if job.masks_from is not None}


# What a record holds (RunStore.train) and its readers rely on.
RECORD_KEYS = ("key", "config", "test_accuracy", "test_loss", "final_density", "gradient_flow", "gradient_flow_mean",
               "epochs_trained", "schedule", "seconds", "history", "flow", "warnings")


class RunStore:
    """Records of finished runs under `directory`: `<key>.json`, and `<key>.masks.pt` for runs whose final masks
    another run starts from."""

    def __init__(self, directory: str, fresh: bool = False):
        self.directory, self.fresh = directory, fresh

    def get(self, job: Job, masks: dict[str, tuple[int, ...]] | None = None) -> dict | None:
        """The stored record of `job` (None if there is none, it is unreadable, or its masks are needed, `masks`
        giving their layers and shapes (`mask_layout`), and missing, unreadable or of other layers, or the store is
        fresh)."""
        if self.fresh:
            return None
        name = job.key
        if not os.path.isfile(self._path(name, RECORD_SUFFIX)):   # a FIFO blocked the read, /dev/zero filled memory
            return None
        try:
            with open(self._path(name, RECORD_SUFFIX)) as file:
                record = json.load(file)
        except (OSError, ValueError, RecursionError):   # RecursionError: JSON nested too deep to read
            return None
        # The config compared as JSON text: 1 == True == 1.0 in Python, and runs.csv writes the stored one
        if not isinstance(record, dict) or not isinstance(record.get("config"), dict) or \
                json.dumps(settings(record["config"]), sort_keys=True) != \
                json.dumps(settings(job.config), sort_keys=True) or \
                not all(name in record for name in RECORD_KEYS) or not record.keys() <= {*RECORD_KEYS, *COST_KEYS} or \
                not isinstance(record["history"], list) or \
                damaged_records(record["history"], record["flow"], len(record["history"])) or \
                damaged_summary(record) or record["key"] != name or not isinstance(record["warnings"], list) or \
                not all(isinstance(warning, str) for warning in record["warnings"]):
            # damaged or cut down: trained again (reproduce reads the flow records, the tables its summary)
            return None
        if masks is not None and not _readable_masks(self._path(name, MASKS_SUFFIX), masks, record["final_density"]):
            return None   # the run is trained again, rather than the run starting from its masks failing
        return record

    def train(self, job: Job, dataset: Dataset, keep_masks: bool = False, on_epoch=None) -> dict:
        """Trains `job` and stores its record: `RunResult.summary()` plus "key", "config", "history" (per epoch),
        "flow" (every gradient-flow record) and "warnings" (what training warned, once each); with `keep_masks`,
        its final masks too. `on_epoch(metrics)`: called after each epoch (`training.Run.train`)."""
        name = job.key
        masks = None if job.masks_from is None else checkpoint.load(self._path(key(job.masks_from), MASKS_SUFFIX))
        with warnings.catch_warnings(record=True) as caught:  # kept with the run, shown once by the caller
            warnings.simplefilter("always")
            result = train(job.config, progress=False, dataset=dataset, masks=masks, on_epoch=on_epoch)
        record = {"key": name, "config": asdict(job.config), **result.summary(), "history": result.history,
                  "flow": result.flow, "warnings": list(dict.fromkeys(str(w.message) for w in caught))}
        if keep_masks:
            checkpoint.save({layer: mask.cpu() for layer, mask in model_masks(result.model).items()},
                            self._path(name, MASKS_SUFFIX))
        write_text(self._path(name, RECORD_SUFFIX), json.dumps(record))  # last: a record means all of it is there
        return record

    def _path(self, name: str, suffix: str) -> str:
        return os.path.join(self.directory, name + suffix)


def _readable_masks(path: str, layout: dict[str, tuple[int, ...]], density: float) -> bool:
    """Whether `path` holds masks as `RunStore.train` keeps them: a dict of bool CPU (strided) tensors by layer name,
    of the layers and shapes of `layout` (a run starting from masks of others failed with a traceback), keeping
    the `density` of its run's record (its final density, over the same layers: masks flipped, emptied or made
    of one row started a run from other masks than the record's)."""
    try:
        masks = checkpoint.load(path)
    except (OSError, ValueError):
        return False
    if not (isinstance(masks, dict) and all(isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and
                                            mask.device.type == "cpu" and mask.layout == torch.strided
                                            for mask in masks.values()) and
            {name: tuple(mask.shape) for name, mask in masks.items()} == layout):
        return False
    total = sum(mask.numel() for mask in masks.values())
    return (sum(int(mask.sum()) for mask in masks.values()) / total if total else 1.0) == density   # as density()


def execute(jobs: list[Job], store: RunStore, dataset: Dataset, workers: int = 1, on_done=None,
            on_progress=None) -> dict[str, dict]:
    """Runs each run of `jobs` once (`unique`) unless it is already in `store` (those that start from another run's
    masks after it), on `workers` processes (1: in this one), and returns every job's record by `key`.
    `on_done(job, record, trained)` is called as each run is done (stored ones first, with trained False);
    `on_progress(Progress)` as each run being trained starts and ends an epoch, in this process whatever `workers`
    is (a run's updates in order, each before its on_done)."""
    runs = unique(jobs)
    by_key = {job.key: job for job in runs}

    def report(message: tuple) -> None:   # (key, epoch, test accuracy, process id), as `_train_one` sends it
        if on_progress is not None:
            name, epoch, accuracy, worker = message
            on_progress(Progress(by_key[name], epoch, total_epochs(by_key[name].config), accuracy, worker))

    sources = _mask_sources(runs)
    records: dict[str, dict] = {}
    for phase in ([job for job in runs if job.masks_from is None], [job for job in runs if job.masks_from]):
        pending = []
        for job in phase:
            record = store.get(job, masks=mask_layout(job.config, dataset) if job.key in sources else None)
            if record is None:
                pending.append(job)
            else:
                records[job.key] = record
                if on_done is not None:
                    on_done(job, record, False)
        for job, record in _train_all(pending, store, dataset, workers, sources, report):
            records[job.key] = record
            if on_done is not None:
                on_done(job, record, True)
    return records


def warn_once(records) -> None:
    """Re-raises the distinct warnings that the runs of `records` kept, each once, saying how many runs gave it."""
    counts: dict[str, int] = {}
    for record in records:
        for message in record.get("warnings", []):
            counts[message] = counts.get(message, 0) + 1
    for message, count in counts.items():
        warnings.warn(f"{count} run{'s' if count > 1 else ''}: {message}", stacklevel=2)


def warnings_cell(record: dict) -> str:
    """A record's warnings as one CSV cell of plain text: the messages, each on one line, joined by " | "
    ("" when there are none)."""
    return " | ".join(" ".join(message.split()) for message in record.get("warnings", []))


def _train_all(jobs: list[Job], store: RunStore, dataset: Dataset, workers: int, sources: set[str], report):
    """(job, record) for each job, as each finishes; `report(message)` gets `_train_one`'s progress messages here,
    those of each job before it is yielded."""
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            yield job, _train_one(store, job, dataset, key(job.config) in sources, report)
        return
    context = multiprocessing.get_context("spawn")  # torch and fork do not mix
    others = set(multiprocessing.active_children())
    # A SimpleQueue writes each message into its pipe before put returns, so a worker's messages are there before
    # the result of its run (a Queue's feeder thread could still hold the last epoch's).
    messages = context.SimpleQueue()
    # Shared now, not while Ctrl-C is held off (the workers' start), where pickling it for the first worker would: the
    # workers map these pages rather than get a copy each (torch's pickling for processes).
    shared = _in_shared_memory(dataset)
    with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=context, initializer=_start_worker,
                             initargs=(store.directory, shared, torch.get_num_threads(), messages)) as pool:
        try:
            # The workers start here (spawned by submit), holding off Ctrl-C, which this process answers for them
            with held_while_starting_workers():
                futures = {pool.submit(_train_in_worker, job, key(job.config) in sources): job for job in jobs}
            pending = set(futures)
            while pending:
                finished, pending = wait(pending, timeout=PROGRESS_POLL_S, return_when=FIRST_COMPLETED)
                while not messages.empty():
                    report(messages.get())
                for future in finished:
                    yield futures[future], future.result()
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            for worker in set(multiprocessing.active_children()) - others:   # the pool's: their runs are lost,
                worker.terminate()                                             # not waited for
            raise


def _in_shared_memory(dataset: Dataset) -> Dataset:
    """`dataset` with its tensors in shared memory: copies of those that are not, the caller's own left as they are
    (share_memory_ would move their storage, so that a NumPy array or pinned buffer made from one no longer sees it)."""
    tensors = {name: getattr(dataset, name) for name in ("train_x", "train_y", "test_x", "test_y")}
    return replace(dataset, **{name: tensor if tensor.is_shared() else tensor.clone().share_memory_()
                                           for name, tensor in tensors.items()})


def _train_one(store: RunStore, job: Job, dataset: Dataset, keep_masks: bool, report) -> dict:
    """`store.train(job, ...)`, sending `report` (key, 0, None, process id) as it starts and (key, epoch, test
    accuracy, process id) after each epoch: plain tuples, which pass between processes."""
    name, worker = job.key, os.getpid()
    report((name, 0, None, worker))
    return store.train(job, dataset, keep_masks, on_epoch=lambda metrics: report(
        (name, metrics["epoch"], metrics["test_accuracy"], worker)))


_WORKER: dict = {}


def _start_worker(directory: str, dataset: Dataset, threads: int, messages) -> None:
    ignore_in_this_worker()
    torch.set_num_threads(threads)
    _WORKER["store"] = RunStore(directory, fresh=True)
    _WORKER["dataset"] = dataset
    _WORKER["messages"] = messages


def _train_in_worker(job: Job, keep_masks: bool) -> dict:
    return _train_one(_WORKER["store"], job, _WORKER["dataset"], keep_masks, _WORKER["messages"].put)
