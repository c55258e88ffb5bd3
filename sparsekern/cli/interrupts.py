"""Ctrl-C while `compare` and `reproduce` start their worker processes (and `bench` Inductor's compile workers):
none lost, and none reaching a worker.

A Ctrl-C in a terminal reaches every process of its group, workers included; workers that got it died with a
traceback each, mid-import or mid-run, so they ignore it and the parent answers it for them. A spawned worker
must not be able to take it before it ignores it itself, which it can only do once its Python is running: it
starts with SIGINT blocked, inherited from the thread that started it, and an ignored signal that is pending is
discarded (`ignore_in_this_worker`). The parent, meanwhile, records a Ctrl-C and raises it once its workers
have started (`held_while_starting_workers`): it used to ignore SIGINT while they started, so that they
inherited "ignore" across exec, which lost a Ctrl-C that came then. Blocking SIGINT in the parent is not
enough: the kernel gives a signal sent to the whole process to any thread that does not block it (torch's),
and Python then runs its handler in the main thread. (multiprocessing's resource tracker starts the same way.)
"""
from __future__ import annotations

import contextlib
import signal
import threading

_SIGINT = {signal.SIGINT}


@contextlib.contextmanager
def held_while_starting_workers():
    """Processes started meanwhile (from this thread) start with SIGINT blocked; a SIGINT that arrives meanwhile
    is raised again on leaving, to the handler there was before (Python's: KeyboardInterrupt), even when the
    block ends by an exception. Does nothing outside the main thread, where signals can be neither handled nor
    received by Python."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGINT)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)   # one pending for this thread is recorded now
        signal.signal(signal.SIGINT, previous)
        if received:
            signal.raise_signal(signal.SIGINT)


def ignore_in_this_worker() -> None:
    """Ignores SIGINT from now on in this process, a worker started under `held_while_starting_workers`, and
    discards the one that reached it while it started (pending: it was blocked), then unblocks it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGINT)
