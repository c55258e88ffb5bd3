"""The progress bar of `compare` and `reproduce`: the epochs of all their runs, moving as each epoch of any run in
training ends (in this process or a worker, `sparsekern.cli.runs.Progress`), and saying what runs."""
from __future__ import annotations

from .data import Dataset
from .runs import Job, Progress, RunStore, execute, unique, warn_once
from .training import total_epochs


class RunsBar:
    """A tqdm bar over the epochs of `jobs`, each run once as `runs.execute` trains them (`runs.unique`), named
    `name`, each run named by `describe(job)`; nothing is shown unless `enabled`. Its text: the runs done, then the
    latest news, "<run>: epoch 3/20, test accuracy 81.2%", and how many other runs are training. `progress` and
    `done` take `runs.execute`'s callbacks."""

    def __init__(self, jobs: list[Job], name: str, describe, enabled: bool = True):
        runs = unique(jobs)
        self._describe = describe
        self._runs = len(runs)
        self._epochs: dict[str, int] = {}     # epochs shown of each run started or done
        self._running: dict[int, str] = {}    # the run each worker process trains
        self._done: set[str] = set()
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=sum(total_epochs(job.config) for job in runs), desc=name,
                             unit="epoch", dynamic_ncols=True)
            self._show("starting")

    def progress(self, update: Progress) -> None:
        name = update.job.key   # `runs.execute` sends none after a run is done
        self._running[update.worker] = name
        self._advance(name, update.epoch)
        news = ("started" if update.epoch == 0 else
                f"epoch {update.epoch}/{update.epochs}, test accuracy {100 * update.test_accuracy:.1f}%")
        self._show(f"{self._describe(update.job)}: {news}", update.worker)

    def done(self, job: Job, record: dict, trained: bool) -> None:
        name = job.key
        self._running = {worker: run for worker, run in self._running.items() if run != name}
        self._done.add(name)
        self._advance(name, total_epochs(job.config))
        how = "finished" if trained else "already in the folder"
        self._show(f"{self._describe(job)} {how}: test accuracy {100 * record['test_accuracy']:.1f}%")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def _advance(self, name: str, epochs: int) -> None:
        """To `epochs` of run `name` (a stored run's all at once)."""
        gained, self._epochs[name] = epochs - self._epochs.get(name, 0), epochs
        if self._bar is not None:
            self._bar.update(gained)

    def _show(self, news: str, worker: int | None = None) -> None:
        if self._bar is None:
            return
        others = len(self._running) - (worker in self._running)
        also = f" (and {others} more training)" if others else ""
        # set_postfix_str redraws the bar whatever tqdm's mininterval: every epoch shows
        self._bar.set_postfix_str(f"{len(self._done)}/{self._runs} runs done; {news}{also}")


def execute_shown(jobs: list[Job], store: RunStore, dataset: Dataset, workers: int, name: str, describe,
                  enabled: bool = True) -> tuple[dict[str, dict], int]:
    """`runs.execute` of `jobs` under a `RunsBar` (`name`, `describe`, `enabled` as there), closed however it
    ends, then each distinct warning the runs kept once (`runs.warn_once`). Returns every job's record by key and
    how many runs were trained now (the others were found in `store`)."""
    bar = RunsBar(jobs, name, describe, enabled)
    trained = []

    def done(job: Job, record: dict, was_trained: bool) -> None:
        trained.append(was_trained)
        bar.done(job, record, was_trained)

    try:
        records = execute(jobs, store, dataset, workers, done, bar.progress)
    finally:
        bar.close()
    warn_once(records.values())
    return records, sum(trained)
