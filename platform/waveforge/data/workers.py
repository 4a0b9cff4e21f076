"""How data worker processes start: from a forkserver (light module: no torch import here).

    ctx = worker_context()        # the multiprocessing context of loader workers and shard writers
    start_worker_server()         # launch that server now, in the background (jobs/train.py does, first)
"""

from __future__ import annotations

from typing import Any

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
    return ctx


def start_worker_server() -> None:
    """Launch the forkserver now, without waiting: it imports torch and the loader (~4 s on 2 busy cores)
    while this process goes on (imports, model build), so the loader's workers, asked for later, start in
    ~0.2 s instead of making the first training step wait for that import."""
    ctx = worker_context()
    if ctx.get_start_method() == "forkserver":
        from multiprocessing import forkserver

        forkserver.ensure_running()
