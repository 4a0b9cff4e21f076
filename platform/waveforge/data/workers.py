"""How data worker processes start: from a forkserver (light module: no torch import here).

    ctx = worker_context()        # the multiprocessing context of loader workers and shard writers
    start_worker_server()         # launch that server now, in the background (jobs/train.py does, first)

The server and multiprocessing's resource tracker start with SIGINT, SIGTERM and SIGUSR2 ignored, and so
do the workers they fork: a stop signal is the trainer's to handle (Slurm sends USR2 and TERM to every
process of a job, a terminal sends Ctrl-C's SIGINT to the whole process group). Killed by it, the resource
tracker would be relaunched mid-run and print KeyError tracebacks for every shared-memory block, and the
workers would die under the trainer's collective checkpoint. A worker still ends with its trainer: it
checks that its parent lives while it waits (and the loader closes it).
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)

PRELOAD = ["waveforge.data.loader", "waveforge.data.shards", "webdataset", "s3fs", "torchvision.io"]


def worker_context() -> Any:
    """A multiprocessing context for worker processes that inherit no open storage connections.

    A forked child shares the parent's sockets and fsspec's event-loop state: after it, the parent's pooled
    S3 connections can stall. A forkserver child starts from a clean server process (which preloads the
    loader, so workers start in milliseconds, not the seconds of importing torch; the server is started
    once per process and shared by the shard writers and every loader).
    """
    import multiprocessing as mp

    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    try:
        ctx.set_forkserver_preload(PRELOAD)
    except Exception:  # noqa: BLE001 - preloading is an optimisation only
        pass
    start_worker_server()  # (a no-op once running) the server must start ignoring stop signals
    return ctx


def start_worker_server() -> None:
    """Launch the forkserver now, without waiting: it imports torch and the loader (~4 s on 2 busy cores)
    while this process goes on (imports, model build), so the loader's workers, asked for later, start in
    ~0.2 s instead of making the first training step wait for that import. Started (with multiprocessing's
    resource tracker) ignoring the stop signals, see the module docstring."""
    import multiprocessing as mp
    from multiprocessing import forkserver, resource_tracker

    if "forkserver" not in mp.get_all_start_methods():
        return
    mp.get_context("forkserver").set_forkserver_preload(PRELOAD)
    with ignoring_stop_signals():  # inherited through exec by the server, its workers and the tracker
        resource_tracker.ensure_running()
        forkserver.ensure_running()


@contextlib.contextmanager
def ignoring_stop_signals() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGUSR2 ignored while the block starts processes (restored after). Outside the
    main thread, where signal handlers cannot change, the block runs as it is."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
