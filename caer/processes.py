"""Spawned helper processes (the store's writers, ``caer boxes``'s detectors) that leave Ctrl-C to their parent and
end with it.

Kept apart from ``runtime`` so that a helper process imports no more than it needs (torch takes seconds).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor


def spawned_pool(processes: int, initializer: Callable, *initargs) -> ProcessPoolExecutor:
    """``processes`` spawned processes, all started now, each running ``initializer(*initargs)`` first.

    A Ctrl-C is this process's to handle (it still waits for, or cancels, the work it handed out): the helpers
    ignore SIGINT from their first instruction, since one that came while a helper still imports would kill it
    mid-start and read as a dead helper. And each helper ends as soon as this process does, so a killed run
    leaves none behind waiting for work."""
    with _sigint_blocked():
        pool = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_start_helper, initargs=(initializer, *initargs))
        for _ in range(processes):  # a process starts per task submitted: start them all while SIGINT is ignored
            pool.submit(int)
    return pool


@contextlib.contextmanager
def _sigint_blocked():
    """Spawned processes start with SIGINT ignored (Python keeps an ignored SIGINT ignored, instead of raising
    KeyboardInterrupt). A Ctrl-C meanwhile waits, blocked, and reaches this process when the block ends (Linux
    keeps a blocked signal pending even while it is ignored). Off the main thread signals cannot be changed:
    ``_start_helper`` still ignores SIGINT, a little later."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _start_helper(initializer: Callable, *initargs) -> None:
    """Initializer of a helper process: Ctrl-C ignored, an exit when the parent ends, then ``initializer``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()
    initializer(*initargs)


def _exit_with(parent: multiprocessing.process.BaseProcess) -> None:
    """End this process when ``parent`` ends: a pool's worker would otherwise wait for work forever (its queue's
    other end lives on in itself), and a store writer could still be writing when the next run starts."""
    multiprocessing.connection.wait([parent.sentinel])
    os._exit(1)
