"""Streaming training data with exact, deterministic, world-size-independent resume.

    loader = ShardLoader("s3://bucket/ffhq256", global_batch=64, rank=r, world=w, grad_accum=2, seed=0)
    for step in ...:
        micro_batches = loader.next_step()   # grad_accum dicts {"image": uint8 (b,3,R,R), "key": [...]}
        x = normalize(micro_batches[0]["image"].to(device))   # float32 in [-1, 1], converted on the device
    state = loader.state_dict()             # small JSON-able dict, independent of the world size
    loader.load_state_dict(state)           # continue exactly there (also on another number of ranks)

Which sample comes when: `waveforge.data.order` (a function of seed, manifest and global batch only).
How shards are read, and what happens to corrupt samples and missing shards: `waveforge.data.reader`.

WORKERS. Worker processes split the rank's streams into contiguous runs (a shard is read by one worker, or
two at a run boundary); the main process reassembles their output in stream order, so num_workers never
changes the result. The workers copy each decoded image (one memcpy) into a few uint8 step batches
("slots") in shared memory, each worker into its rows; only the keys and counters of a step travel through
a pipe, and next_step hands the slot out in place (no copy in the main process). A slot is written again
only once no tensor of the caller's uses it; the main process names each step's slot to the workers, which
is the whole flow control (a worker runs up to 5 steps ahead). Images stay in the decoders' HWC layout all
the way (a batch is channels_last); `normalize` makes them contiguous on the device, and with defer_flip
mirrors the flipped samples there too. The workers are plain processes (no torch DataLoader): a worker's
exception is re-raised by next_step(), and a dead worker is a DataError within a second, never a hang.

RESUME. The state is {step, global_batch, streams, seed, total samples, ...}; restarting fast-forwards each
stream arithmetically from the manifest counts (no shard before the position is read), then skips inside
one shard (or shuffle block).
"""

from __future__ import annotations

import collections
import functools
import os
import sys
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from waveforge.config import MAX_DATA_STREAMS, ConfigError, StorageConfig
from waveforge.data.order import SampleOrder, num_streams
from waveforge.data.reader import DataError, _make_reader
from waveforge.data.shards import dataset_root, manifest_url, read_manifest
from waveforge.data.tar import register_gopen
from waveforge.data.workers import worker_context

MAX_STREAMS = MAX_DATA_STREAMS
_RING_SLOTS = 6  # step batches in the workers' shared memory (handed out, or being written ahead)
_AHEAD_MIN = 2  # a slot is lent to the caller only while this many others stay named for the workers
STATE_FORMAT = "waveforge-loader/1"


class StopFlagShared:
    """A stop flag the main process sets and its workers read: one byte in shared memory. Not a
    multiprocessing Event, whose named POSIX semaphores (/dev/shm/sem.mp-*) outlive a process killed with
    SIGKILL together with multiprocessing's resource tracker: a node that runs many jobs would accumulate them.
    A shared tensor's memory goes with the last process that maps it."""

    def __init__(self) -> None:
        self._flag = torch.zeros(1, dtype=torch.uint8).share_memory_()

    def set(self) -> None:
        self._flag[0] = 1

    def is_set(self) -> bool:
        return bool(self._flag[0])


class _Stopped(Exception):
    """The loader closed (or its process died) while a worker waited for a free ring slot."""


class _Ring:
    """Step batches in shared memory that the workers write in place and next_step hands out without a copy.

    `slots` whole (rows,R,R,3) batches; worker w owns rows [lo,hi) of each. Before it writes a step, a worker
    waits (acquire) for the main process to name, through the worker's `todo` pipe, the slot that step goes
    to; the main process names a slot only while no tensor of the caller's uses it (see ShardLoader._reclaim).
    So the named slots are the whole flow control (a worker runs as many steps ahead as slots are named) and a
    batch the caller keeps is never written under it.
    """

    def __init__(self, buf: torch.Tensor, lo: int, hi: int, todo: Any, stop: Any):
        self.buf, self.lo, self.hi, self.todo, self.stop = buf, lo, hi, todo, stop
        self.slot = -1  # the slot of the step being written
        self._ppid: int | None = None

    def acquire(self) -> np.ndarray:
        """This worker's rows of the slot named for its next step (waits for the name)."""
        if self._ppid is None:
            self._ppid = os.getppid()
        while not self.todo.poll(0.5):
            if self.stop.is_set() or os.getppid() != self._ppid:  # closed, or the main process died
                raise _Stopped
        try:
            self.slot = int(self.todo.recv())
        except EOFError:  # the main process closed the pipe: the loader is closing
            raise _Stopped from None
        return self.buf[self.slot, self.lo:self.hi].numpy()


def _worker_main(make_reader: Any, streams: list[int], ring: _Ring, conn: Any) -> None:
    """A loader worker process: its streams' steps into `ring`, one small message per step through `conn`
    ({"slot", "key", "stats"}), or {"error", "traceback"} when reading fails."""
    import gc
    import traceback

    torch.set_num_threads(1)
    # What the process holds at start (torch, numpy, fsspec: ~200k objects) is never garbage: keep the cyclic
    # collector's full collections, triggered by the samples of every shard read, from walking it again and
    # again (~0.1 s each).
    gc.freeze()
    try:
        for step in make_reader(streams).steps(ring):
            conn.send(step)
            if ring.stop.is_set():
                return
    except _Stopped:
        return
    except BaseException as e:  # noqa: BLE001 - handed to the main process, which re-raises it
        try:
            conn.send({"error": e, "traceback": traceback.format_exc()})
        except Exception:  # noqa: BLE001 - an exception that does not pickle: send its text
            conn.send({"error": RuntimeError(f"{type(e).__name__}: {e}"), "traceback": traceback.format_exc()})
    finally:
        conn.close()


class _Worker:
    """One worker process of a ShardLoader: the pipe its step messages arrive through (conn) and the one its
    slots are named through (todo)."""

    def __init__(self, ctx: Any, make_reader: Any, streams: list[int], buf: torch.Tensor, rows: tuple[int, int],
                 stop: Any, name: str):
        self.stop_event = stop
        self.conn, send = ctx.Pipe(duplex=False)
        todo, self.todo = ctx.Pipe(duplex=False)
        ring = _Ring(buf, *rows, todo, stop)
        self.proc = ctx.Process(target=_worker_main, args=(make_reader, streams, ring, send), name=name, daemon=True)
        self.proc.start()
        send.close()  # the child holds the write end: end-of-file here when it exits
        todo.close()  # and the read end of todo

    def name(self, slot: int) -> None:
        """Tell the worker that its next unnamed step goes to `slot`. A dead worker's broken pipe is left
        to recv(), which reports the death."""
        try:
            self.todo.send(slot)
        except OSError:
            pass

    def recv(self) -> dict[str, Any]:
        """The worker's next step message; a worker's exception is re-raised here, a dead worker is an error
        (checked every second while waiting: nothing waits forever)."""
        while not self.conn.poll(1.0):
            if not self.proc.is_alive() and not self.conn.poll(0):
                break
        try:
            msg = self.conn.recv()
        except EOFError:
            self.proc.join(5)
            raise DataError(f"data loader worker {self.proc.name} (pid {self.proc.pid}) exited unexpectedly "
                            f"(exit code {self.proc.exitcode})") from None
        if "error" in msg:
            err = msg["error"]
            err.add_note(f"in data loader worker {self.proc.name} (pid {self.proc.pid}):\n{msg['traceback']}")
            raise err
        return msg

    def stop(self) -> None:
        """Ask the worker to exit (it stops at its next step or slot wait), then make sure it did."""
        self.stop_event.set()
        self.todo.close()  # a worker waiting for a slot name sees end-of-file
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.conn.close()


def worker_streams(streams: list[int], num_workers: int, w: int) -> list[int]:
    """Worker w's contiguous run of the rank's streams."""
    k = len(streams)
    return streams[w * k // num_workers:(w + 1) * k // num_workers]



# --------------------------------------------------------------------------------------------------
# The loader
# --------------------------------------------------------------------------------------------------


class ShardLoader:
    """This rank's share of every global batch, split into grad_accum micro-batches (see module docstring).

    With num_workers > 0 the worker processes start at construction and again at load_state_dict (and run
    up to 5 steps ahead), so their start-up (importing torch in the forkserver, the first shard reads)
    runs while the trainer builds its models instead of stalling the first step.

    defer_flip (with hflip): the images come unflipped and each micro-batch carries "flip", a bool (b,)
    tensor of the samples to mirror: `normalize(mb["image"].to(device), mb["flip"])` mirrors them there. The
    trainer asks for it on a GPU, where the mirror is free; on the loader's CPUs it costs ~5% of the decode.
    The normalized batches are exactly those of the default (mirrored in the loader).
    """

    def __init__(self, url: str, *, global_batch: int, rank: int, world: int, grad_accum: int = 1, seed: int = 0,
                 hflip: bool = True, num_workers: int = 0, cache_dir: str = "", on_error: str = "skip",
                 retries: int = 5, storage: StorageConfig | None = None, resolution: int | None = None,
                 shuffle_window: int = 0, defer_flip: bool = False):
        if global_batch < 1 or world < 1 or not 0 <= rank < world or grad_accum < 1:
            raise ConfigError(f"bad loader geometry: global_batch={global_batch}, rank={rank}, world={world}, "
                              f"grad_accum={grad_accum}")
        S = num_streams(global_batch)
        if S % world:
            fits = [w for w in range(1, S + 1) if S % w == 0]
            raise ConfigError(f"the data loader splits global batch {global_batch} into {S} streams "
                              f"(gcd(batch, {MAX_STREAMS})); the number of ranks ({world}) must divide {S}: "
                              f"use {fits} ranks, or a global batch with more factors of two")
        if global_batch % (world * grad_accum):
            raise ConfigError(f"global batch {global_batch} is not divisible by ranks x grad_accum = "
                              f"{world} x {grad_accum}")
        if on_error not in ("skip", "fail"):
            raise ConfigError(f"on_error={on_error!r}: expected 'skip' or 'fail'")
        self.url, self.root = manifest_url(url), dataset_root(manifest_url(url))
        self.global_batch, self.rank, self.world, self.grad_accum = global_batch, rank, world, grad_accum
        self.seed, self.hflip, self.on_error, self.retries = seed, hflip, on_error, retries
        self.defer_flip = hflip and defer_flip
        self.cache_dir, self.scfg, self.shuffle_window = cache_dir, storage, max(0, shuffle_window)
        register_gopen(storage)
        try:
            self.manifest = read_manifest(self.url, storage, retries)
        except FileNotFoundError:
            raise ConfigError(f"no dataset manifest at {self.url}: write the shards with python jobs/make_shards.py "
                              f"and set data.url to their folder") from None
        if resolution is not None and int(self.manifest["resolution"]) != resolution:
            raise ConfigError(f"dataset {self.root} holds {self.manifest['resolution']} px images but the model "
                              f"needs {resolution} px: re-shard with resolution={resolution} or change data.url")
        self.resolution = int(self.manifest["resolution"])
        self.streams = S
        self.per_stream = global_batch // S
        per_rank = S // world
        self.my_streams = list(range(rank * per_rank, (rank + 1) * per_rank))
        self.num_workers = min(num_workers, per_rank)
        self.order = SampleOrder([s["samples"] for s in self.manifest["shards"]], S, seed, self.shuffle_window)
        self.total_samples = self.order.N
        self.micro = global_batch // (world * grad_accum)
        self._step = 0
        self._it: Iterator[dict[str, Any]] | None = None  # num_workers=0: the steps of an in-process reader
        self._workers: list[_Worker] = []
        self._worker_stats: dict[int, dict[str, int]] = {}
        self._slots: list[np.ndarray] = []  # the workers' shared batch slots (one numpy array each)
        self._named: collections.deque[int] = collections.deque()  # slots named for the next steps, in order
        self._lent: list[int] = []  # slots handed out: named again once no tensor of the caller's uses them
        self._starting: tuple[threading.Thread, dict[str, Any]] | None = None
        if self.num_workers:
            self._start()  # worker start-up and the first shards overlap whatever the caller does next

    # ---- pipeline ----

    def _reader_factory(self) -> Any:
        """StreamReader(streams) with everything else bound (picklable: sent to the worker processes)."""
        return functools.partial(_make_reader, self.manifest, self.root, self.order, self.per_stream, self._step,
                                 hflip=self.hflip, on_error=self.on_error, retries=self.retries, scfg=self.scfg,
                                 cache_dir=self.cache_dir, defer_flip=self.defer_flip)

    def _start(self) -> None:
        """(Re)start the pipeline at self._step. Worker processes are started by a background thread (their
        start-up blocks for seconds while the forkserver imports torch); the next next_step() joins it."""
        self.close()
        if self.num_workers == 0:
            self._it = self._reader_factory()(self.my_streams).steps()
            return
        ctx = worker_context()  # its server, and so the workers, ignore stop signals
        res, nw, make_reader = self.resolution, self.num_workers, self._reader_factory()
        runs = [worker_streams(self.my_streams, nw, w) for w in range(nw)]
        rows = len(self.my_streams) * self.per_stream
        buf = torch.empty((_RING_SLOTS, rows, res, res, 3), dtype=torch.uint8).share_memory_()
        self._slots = [buf[b].numpy() for b in range(_RING_SLOTS)]
        self._named, self._lent = collections.deque(range(_RING_SLOTS)), []
        stop = StopFlagShared()
        box: dict[str, Any] = {"workers": []}

        def start() -> None:
            try:
                lo = 0
                for w, run in enumerate(runs):
                    hi = lo + len(run) * self.per_stream
                    worker = _Worker(ctx, make_reader, run, buf, (lo, hi), stop, f"loader-r{self.rank}-w{w}")
                    box["workers"].append(worker)
                    for b in range(_RING_SLOTS):
                        worker.name(b)
                    lo = hi
            except BaseException as e:  # noqa: BLE001 - re-raised by the next next_step()
                box["error"] = e

        self._starting = (threading.Thread(target=start, name="loader-start", daemon=True), box)
        self._starting[0].start()

    def _join_start(self) -> None:
        if self._starting is not None:
            thread, box = self._starting
            thread.join()
            self._starting = None
            self._workers = box["workers"]
            if "error" in box:
                self.close()
                raise box["error"]

    def next_step(self) -> list[dict[str, Any]]:
        """The rank's share of the next global batch as grad_accum micro-batches: image uint8 (b,3,R,R) (4x
        fewer bytes to move to the GPU than floats; `normalize` it there) and key. The images are in
        channels_last memory (a (b,R,R,3) array seen as (b,3,R,R): the decoders' own layout, so no sample is
        transposed on the CPU); `normalize` returns them contiguous. With defer_flip also "flip" (see the class).

        The batch is handed out in place, in the workers' shared memory: it stays valid as long as the caller
        holds a reference to it (or to a view of it); its memory is written again only once it holds none."""
        if self._it is None and self._starting is None and not self._workers:
            self._start()
        self._join_start()
        if self._it is not None:  # num_workers=0: read in this process, into a new array per step
            part = next(self._it)
            self._worker_stats[0] = part["stats"]
            images, keys, flips = torch.from_numpy(part["image"]), part["key"], part.get("flip")
        else:
            images, keys, flips = self._collect()
        self._step += 1
        b, images = self.micro, images.permute(0, 3, 1, 2)  # (rows, 3, R, R) view, channels_last strides
        out = [{"image": images[m * b:(m + 1) * b], "key": keys[m * b:(m + 1) * b]} for m in range(self.grad_accum)]
        if flips is not None:
            flip = torch.tensor(flips, dtype=torch.bool)
            for m, mb in enumerate(out):
                mb["flip"] = flip[m * b:(m + 1) * b]
        return out

    def _collect(self) -> tuple[torch.Tensor, list[str], list[bool] | None]:
        """The next step's images (rows,R,R,3) and keys from the workers: each wrote its rows of the step's
        slot in shared memory, so the images are handed out in place, without a copy (a lent slot).

        A tensor of torch.from_numpy holds a reference to its array until the last tensor or view sharing
        its memory is gone: a slot whose array has no other references than the loader's own is free and is
        named for a later step (_reclaim). A batch the caller keeps is therefore never written under it. If
        the caller keeps so many that fewer than _AHEAD_MIN slots would remain for the workers, the step is
        handed out as a copy instead and its slot goes straight back to them: keeping batches costs memory
        copies, never a stall.
        """
        self._reclaim()
        slot = self._named.popleft()
        keys: list[str] = []
        flips: list[bool] | None = [] if self.defer_flip else None
        for w, worker in enumerate(self._workers):  # in order: worker w's streams follow worker w-1's
            part = worker.recv()
            if part["slot"] != slot:
                raise RuntimeError(f"data loader worker {w} wrote slot {part['slot']}, expected {slot}")
            self._worker_stats[w] = part["stats"]
            keys += part["key"]
            if flips is not None:
                flips += part["flip"]
        if len(self._named) >= _AHEAD_MIN:
            self._lent.append(slot)
            return torch.from_numpy(self._slots[slot]), keys, flips
        # numpy's copy is one memcpy in this thread; torch's copy_ would run on the intra-op thread pool,
        # whose threads then spin-wait on the cores the workers decode on.
        images = torch.from_numpy(self._slots[slot].copy())
        self._name(slot)
        return images, keys, flips

    def _reclaim(self) -> None:
        """Name again, for the next steps, the lent slots no tensor of the caller's uses any more."""
        for slot in list(self._lent):
            if sys.getrefcount(self._slots[slot]) <= 2:  # the list's reference and getrefcount's argument
                self._lent.remove(slot)
                self._name(slot)

    def _name(self, slot: int) -> None:
        self._named.append(slot)
        for worker in self._workers:
            worker.name(slot)

    # ---- state ----

    def state_dict(self) -> dict[str, Any]:
        """Position (JSON-able, independent of rank/world/workers): global batches delivered so far."""
        return {"format": STATE_FORMAT, "step": self._step, "samples": self._step * self.global_batch,
                "epoch": self._step * self.global_batch // self.total_samples, "global_batch": self.global_batch,
                "streams": self.streams, "seed": self.seed, "shuffle_window": self.shuffle_window,
                "total_samples": self.total_samples, "num_shards": len(self.manifest["shards"])}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Continue from a state_dict() (of any world size). ConfigError if it belongs to another order."""
        if d.get("format") != STATE_FORMAT:
            raise ConfigError(f"not a data loader state (format {d.get('format')!r}, expected {STATE_FORMAT})")
        mine = self.state_dict()
        for k in ("global_batch", "seed", "shuffle_window", "total_samples", "num_shards"):
            if d.get(k) != mine[k]:
                raise ConfigError(f"the saved data position has {k}={d.get(k)!r} but this loader has {mine[k]!r}: "
                                  f"exact resume needs the same dataset, global batch, seed and shuffle window")
        self.close()
        self._step = int(d["step"])
        if self.num_workers:
            self._start()

    def stats(self) -> dict[str, int]:
        """Counters summed over this rank's readers: corrupt_samples, missing_shards, read_retries, ..."""
        out = {"corrupt_samples": 0, "missing_shards": 0, "read_retries": 0, "shards_read": 0, "bytes_read": 0}
        for st in self._worker_stats.values():
            for k, v in st.items():
                out[k] = out.get(k, 0) + int(v)
        return out

    def worker_pids(self) -> list[int]:
        """Process ids of the worker processes (waits for their start; none with num_workers=0)."""
        self._join_start()
        return [w.proc.pid for w in self._workers]

    @property
    def step(self) -> int:
        return self._step

    def close(self) -> None:
        """Stop readers and worker processes (the next next_step() starts them again at the same position)."""
        if self._starting is not None:
            self._starting[0].join()
            self._workers, self._starting = self._starting[1]["workers"], None
        workers, self._workers, it, self._it = self._workers, [], self._it, None
        self._slots, self._named, self._lent = [], collections.deque(), []  # lent batches stay valid: no
        for w in workers:  # worker writes to these slots again
            w.stop_event.set()  # all at once, then wait for each
        for w in workers:
            w.stop()
        if it is not None and hasattr(it, "close"):
            it.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def from_config(cfg: Any, rank: int, world: int, grad_accum: int, defer_flip: bool = False) -> ShardLoader:
    """The training loader of recipe `cfg` (data.url must hold a dataset: see ensure_dataset); defer_flip:
    the caller mirrors the images (`normalize(image, flip)`), e.g. on its GPU."""
    d = cfg.data
    return ShardLoader(d.url, global_batch=cfg.train.batch_size, rank=rank, world=world, grad_accum=grad_accum,
                       seed=cfg.run.seed, hflip=d.hflip, num_workers=d.num_workers, cache_dir=d.cache_dir,
                       on_error=d.on_error, retries=d.retries, storage=cfg.storage,
                       resolution=cfg.model.resolution, shuffle_window=d.shuffle_buffer, defer_flip=defer_flip)

