"""Writing a checkpoint (COLLECTIVE): every rank its ZeRO partitions and RNG states, rank 0 the EMA and the
trainer's state; atomic publication (manifest, rename, `latest`); pruning.

How a save writes (`Saver`): each DeepSpeed engine gets a waveforge checkpoint engine for the duration of its
`save_checkpoint` call, so DeepSpeed's `torch.save(state_dict, path)` calls become jobs of a small thread
pool (files written in parallel, G and D alike), each with O_DIRECT where the filesystem takes it
(`_DirectFile`: no page-cache memory allocated for it). Every file is hashed while it is written (BLAKE3 of
the bytes as they go to disk, no second read pass; the EMA, which safetensors writes itself through the page
cache, is read back once) and fsynced once. In the background mode the state is first
snapshot (each tensor's storage copied to CPU memory, the "device-to-host copy": ZeRO's optimizer state
dict references the live fp32 partitions and Adam moments the next step changes in place) and `save`
returns; the writing, the per-rank sums file and rank 0's publication continue in background threads.

Publication happens only after every rank's files are durable: each rank writes `rank-R.json` (its files'
sizes and digests) into the save's sums folder once its own files are fsynced, or `rank-R.error` when its
writing failed; rank 0 waits for one of the two from every rank (the run folder is shared between nodes;
no collective runs in a background thread), then writes the manifest, renames `.tmp-N` to `step-N`, points
`latest` at it, prunes and queues the upload. A process killed at any moment leaves the previous checkpoint
loadable. A failure in the background is raised on every rank by the next `save` (and by `close`).
"""

from __future__ import annotations

import copy
import ctypes
import errno
import json
import mmap
import os
import shutil
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import safetensors.torch
import torch

from waveforge import dist
from waveforge.checkpoint.files import (
    DIGEST,
    EMA,
    FORMAT,
    LATEST,
    MANIFEST,
    STATE,
    VERSION,
    CheckpointError,
    _check_plain,
    _delete_checkpoint,
    _fsync_dir,
    _hash_file,
    _list_files,
    _remove_leftovers,
    _rng_state,
    _step_of,
    _write_atomic,
    ckpt_root,
    complete_checkpoints,
    new_hasher,
    read_manifest,
    step_name,
)
from waveforge.checkpoint.remote import Uploader

WRITE_THREADS = 4  # files written at once per rank (writes and hashing release the GIL)
CHUNK = 8 << 20  # bytes per write (and per hashed piece) of a big record
POLL_S = 0.02  # rank 0's publisher looks for the other ranks' sums files this often
ABORT_WAIT_S = 60.0  # after an error elsewhere, how long rank 0 still waits for the other ranks' files


# --------------------------------------------------------------------------------------------------
# Snapshots and hashed writes
# --------------------------------------------------------------------------------------------------


class _Buffers:
    """CPU memory for snapshots, kept from one save to the next (pinned on a CUDA machine): a snapshot copies
    into pages already mapped instead of fresh allocations, which the first touch makes several times slower
    than the copy itself. Holds one snapshot's worth of memory between saves."""

    def __init__(self) -> None:
        self._free: dict[int, list[torch.UntypedStorage]] = {}
        self._used: list[torch.UntypedStorage] = []

    def copy(self, src: torch.UntypedStorage) -> torch.UntypedStorage:
        """A CPU copy of `src` (the device-to-host copy on a GPU)."""
        n = src.nbytes()
        free = self._free.get(n)
        dst = free.pop() if free else torch.empty(n, dtype=torch.uint8,
                                                  pin_memory=torch.cuda.is_available()).untyped_storage()
        self._used.append(dst)
        torch.empty(0, dtype=torch.uint8).set_(dst).copy_(
            torch.empty(0, dtype=torch.uint8, device=src.device).set_(src))
        return dst

    def recycle(self) -> None:
        """The last snapshot is written: its memory serves the next one (memory it did not use is freed)."""
        self._free = {}
        for b in self._used:
            self._free.setdefault(b.nbytes(), []).append(b)
        self._used = []


def _snapshot(obj: Any, buffers: _Buffers, memo: dict[int, torch.UntypedStorage] | None = None) -> Any:
    """A copy of `obj` that later training steps cannot change: every tensor's whole storage copied to CPU
    memory once (views of one storage stay views of one copy, so torch.save writes what it would have
    written from the originals), dicts/lists/tuples rebuilt, other objects deep-copied."""
    memo = {} if memo is None else memo
    if isinstance(obj, torch.Tensor):
        src = obj.untyped_storage()
        key = src.data_ptr() if src.nbytes() else id(obj)
        if key not in memo:
            memo[key] = buffers.copy(src)
        out = torch.empty(0, dtype=obj.dtype).set_(memo[key], obj.storage_offset(), obj.size(), obj.stride())
        return torch.nn.Parameter(out, obj.requires_grad) if isinstance(obj, torch.nn.Parameter) else out
    if isinstance(obj, dict):
        out_d = copy.copy(obj)  # keeps the type (OrderedDict, ...)
        for k, v in obj.items():
            out_d[k] = _snapshot(v, buffers, memo)
        return out_d
    if isinstance(obj, list):
        return [_snapshot(v, buffers, memo) for v in obj]
    if type(obj) is tuple:
        return tuple(_snapshot(v, buffers, memo) for v in obj)
    if isinstance(obj, (str, bytes, int, float, bool, type(None), torch.dtype, torch.device, torch.Size)):
        return obj
    return copy.deepcopy(obj)


def _libc_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """glibc's sync_file_range (Linux), or None where there is none."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_SYNC_FILE_RANGE = _libc_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2  # start writeback of the range's dirty pages; do not wait for it


class _HashingFile:
    """The file object torch.save writes through: every byte goes to disk and into the digest. A big record (a
    tensor's storage) goes in CHUNK pieces, each hashed by a helper thread while this one writes it (hashing
    and the write both release the GIL): the hash costs no time of its own, and the kernel takes pieces of
    this size about twice as fast as one write of a whole 100 MB storage. Every WRITEBACK bytes the kernel is
    asked to start writing them to disk (sync_file_range, no wait): the disk works while the rest is
    serialized, and the final fsync finds little left (0.3 s -> 0.01 s for 530 MB on the 2-core VM)."""

    WRITEBACK = 32 << 20

    def __init__(self, raw: BinaryIO, hasher: ThreadPoolExecutor) -> None:
        self.raw, self.sha, self.hasher = raw, new_hasher(), hasher
        self.pos = self.synced = 0

    def write(self, data: Any) -> int:
        mv = memoryview(data).cast("B")
        if len(mv) <= CHUNK:
            self.sha.update(mv)
            self.raw.write(mv)
        else:
            for i in range(0, len(mv), CHUNK):
                piece = mv[i:i + CHUNK]
                hashed = self.hasher.submit(self.sha.update, piece)  # done before write() returns: `data` lives
                self.raw.write(piece)
                hashed.result()
        self.pos += len(mv)
        if _SYNC_FILE_RANGE is not None and self.pos - self.synced >= self.WRITEBACK:
            self.raw.flush()
            _SYNC_FILE_RANGE(self.raw.fileno(), self.synced, self.pos - self.synced, _SYNC_FILE_RANGE_WRITE)
            self.synced = self.pos  # best effort: a failure here is found by the final fsync
        return len(mv)

    def flush(self) -> None:
        self.raw.flush()


DIRECT_ALIGN = 4096  # O_DIRECT: offsets, lengths and buffer addresses are multiples of this (the block size)
STAGE = 8 << 20  # bytes per direct write (a staging buffer)
STAGE_DEPTH = 4  # staging buffers per file in flight (filled by torch.save, hashed, written)


class _Staging:
    """Page-aligned staging buffers for direct writes, kept for the next file and the next save (the first
    touch of fresh memory costs more than the copy into it). Keeps at most `keep` free buffers."""

    def __init__(self, keep: int) -> None:
        self._free: list[mmap.mmap] = []
        self._lock = threading.Lock()
        self.keep = keep

    def get(self) -> mmap.mmap:
        with self._lock:
            if self._free:
                return self._free.pop()
        return mmap.mmap(-1, STAGE)

    def put(self, buf: mmap.mmap) -> None:
        with self._lock:
            if len(self._free) < self.keep:
                self._free.append(buf)
                return
        try:
            buf.close()
        except BufferError:  # a view of it is still alive somewhere: the garbage collector frees it
            pass


_STAGING = _Staging(keep=WRITE_THREADS * STAGE_DEPTH)


def _open_direct(path: Path) -> int | None:
    """A new file at `path` opened for writing with O_DIRECT (the page cache bypassed), or None where the
    platform or the filesystem does not support it (tmpfs, some network and FUSE filesystems: EINVAL)."""
    if not hasattr(os, "O_DIRECT"):
        return None
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return None
        raise


class _DirectFile:
    """The file object torch.save writes through on a filesystem that takes O_DIRECT: the bytes are copied
    into page-aligned STAGE buffers; each full buffer is hashed by one thread (in file order) and written at
    its offset by another (the disk's DMA reads it: no page-cache copy), while torch.save fills the next.
    The last buffer is padded to the block size, written, and the file truncated to its real size.

    Why: a buffered write first allocates page-cache memory for the whole file. Where the memory comes from
    matters: on the 2-core CI VM (free page reporting: memory freed for ~1 s goes back to the host), buffered
    writes of 528 MiB ran at 400-670 MiB/s into such memory and 3.7-4.6 GiB/s into memory just freed, while
    O_DIRECT wrote the same 528 MiB at 0.87-1.24 GiB/s (fsync included) every time. It also keeps a node's page
    cache free of checkpoint pages that no one reads again (a resume runs in a new process, usually on another
    node)."""

    def __init__(self, fd: int, hasher: ThreadPoolExecutor, io: ThreadPoolExecutor, staging: _Staging) -> None:
        self.fd, self.hasher, self.io, self.staging = fd, hasher, io, staging
        self.sha = new_hasher()
        self.buf, self.fill, self.offset = staging.get(), 0, 0
        self.inflight: deque[tuple[mmap.mmap, Future[None], Future[None]]] = deque()
        self.error: BaseException | None = None  # the first failed write (a full disk): every later write raises it

    def write(self, data: Any) -> int:
        if self.error is not None:
            raise self.error
        mv = memoryview(data).cast("B")
        i, n = 0, len(mv)
        while i < n:
            k = min(n - i, STAGE - self.fill)
            self.buf[self.fill:self.fill + k] = mv[i:i + k]
            self.fill += k
            i += k
            if self.fill == STAGE:
                self._submit()
        return n

    def flush(self) -> None:
        pass  # the bytes of a partial buffer go to disk in close()

    def _submit(self) -> None:
        """Hash and write the current buffer (in the background); continue in a free one."""
        buf, size, offset = self.buf, self.fill, self.offset
        whole = -(-size // DIRECT_ALIGN) * DIRECT_ALIGN  # the last buffer: padded to the block size
        hashed = self.hasher.submit(self.sha.update, memoryview(buf)[:size])
        written = self.io.submit(self._pwrite, buf, whole, offset)
        self.inflight.append((buf, hashed, written))
        self.offset += size
        self.buf, self.fill = None, 0  # type: ignore[assignment]
        while len(self.inflight) >= STAGE_DEPTH:
            self._retire()
        self.buf = self.staging.get()

    def _pwrite(self, buf: mmap.mmap, size: int, offset: int) -> None:
        mv, done = memoryview(buf), 0
        while done < size:  # short writes end on a block boundary
            done += os.pwrite(self.fd, mv[done:size], offset + done)

    def _retire(self) -> None:
        buf, hashed, written = self.inflight.popleft()
        try:
            hashed.result()
            written.result()
        except BaseException as e:
            self.error = self.error or e
            raise
        finally:
            self.staging.put(buf)

    def close(self) -> tuple[int, str]:
        """Write what is left, wait for every write, truncate the padding, fsync; (size, digest)."""
        try:
            if self.fill:
                self._submit()
            while self.inflight:
                self._retire()
        except BaseException:
            self.abandon()
            raise
        self.abandon()  # returns the current buffer
        os.ftruncate(self.fd, self.offset)
        os.fsync(self.fd)
        return self.offset, self.sha.hexdigest()

    def abandon(self) -> None:
        """After a failure: wait until no write uses a buffer any more, and give every buffer back."""
        while self.inflight:
            buf, hashed, written = self.inflight.popleft()
            hashed.exception()
            written.exception()
            self.staging.put(buf)
        if self.buf is not None:
            self.staging.put(self.buf)
            self.buf = None  # type: ignore[assignment]


def _write_buffered(obj: Any, path: Path) -> dict[str, Any]:
    """torch.save `obj` to `path` through the page cache (`_HashingFile`), hashed while written and fsynced;
    its manifest entry (size, digest)."""
    with open(path, "wb") as raw, ThreadPoolExecutor(1, thread_name_prefix="checkpoint-hash") as hasher:
        f = _HashingFile(raw, hasher)
        torch.save(obj, f)
        raw.flush()
        os.fsync(raw.fileno())
        return {"size": raw.tell(), DIGEST: f.sha.hexdigest()}


def _write_direct(obj: Any, fd: int) -> dict[str, Any]:
    """torch.save `obj` into `fd` (opened with O_DIRECT) through a `_DirectFile`; its manifest entry."""
    with ThreadPoolExecutor(1, thread_name_prefix="checkpoint-hash") as hasher, \
            ThreadPoolExecutor(1, thread_name_prefix="checkpoint-io") as io:
        direct = _DirectFile(fd, hasher, io, _STAGING)
        try:
            torch.save(obj, direct)
        except BaseException:
            direct.abandon()
            if direct.error is not None:  # torch.save reports a failed write as a confused position
                raise direct.error from None
            raise
        size, digest = direct.close()
    return {"size": size, DIGEST: digest}


_refused_direct: set[int] = set()  # filesystems (st_dev) that refused O_DIRECT: buffered writes from then on


def _write_torch(obj: Any, path: Path) -> dict[str, Any]:
    """torch.save `obj` to `path`, hashed while written and fsynced; its manifest entry (size, digest).
    With O_DIRECT where the filesystem takes it (`_DirectFile`), else buffered (`_write_buffered`): when it
    refuses O_DIRECT at open or in the writes (EINVAL), which the console says once per filesystem, and the
    process's later files on that filesystem are written buffered without trying again."""
    dev = os.stat(Path(path).parent).st_dev
    fd = _open_direct(path) if dev not in _refused_direct else None
    if fd is None:
        if hasattr(os, "O_DIRECT"):
            _say_refused(dev, f"{path} cannot be opened with O_DIRECT")
        return _write_buffered(obj, path)
    try:
        return _write_direct(obj, fd)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        _say_refused(dev, f"O_DIRECT writes to {path} are refused ({e.strerror})")
    finally:
        os.close(fd)
    return _write_buffered(obj, path)


def _say_refused(dev: int, what: str) -> None:
    """Remember that filesystem `dev` refuses O_DIRECT; one console line per filesystem and node (the first rank
    of each node says it): its checkpoint files go through the page cache."""
    if dev not in _refused_direct:
        _refused_direct.add(dev)
        if dist.local_rank() != 0:
            return
        print(f"checkpoint: {what}; this filesystem's checkpoint files are written through the page cache "
              "(checkpoint.direct_io=false says so in the recipe)", file=sys.stderr, flush=True)


class _StateDictOf:
    """What safetensors.torch.save_model needs of a module (its state_dict), from a snapshot."""

    def __init__(self, state_dict: dict[str, torch.Tensor]) -> None:
        self._sd = state_dict

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self._sd)


def _write_safetensors(state_dict: dict[str, torch.Tensor], path: Path) -> dict[str, Any]:
    """The EMA as safetensors (safetensors writes the file itself: hashed from the page cache, fsynced)."""
    safetensors.torch.save_model(_StateDictOf(state_dict), str(path))  # type: ignore[arg-type]
    return _hash_file(path)


class _CaptureEngine:
    """A DeepSpeed checkpoint engine that hands each file of `save_checkpoint` to the saver's pool (a
    snapshot of it in the background mode). Installed on an engine only for the duration of one save.

    It implements the interface of DeepSpeed's `CheckpointEngine` (deepspeed.runtime.checkpoint_engine, which
    engines only call, never type-check) without importing DeepSpeed: the jobs that only read checkpoints
    (evaluate, sample, export) and the upload process do not load it."""

    name = "WaveforgeCaptureEngine"

    def __init__(self, add: Callable[[str, Any], None]) -> None:
        self._add = add

    def create(self, info: Any) -> None:
        pass

    def save(self, state_dict: Any, path: str) -> None:
        self._add(path, state_dict)

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        os.makedirs(path, exist_ok=exist_ok)

    def load(self, path: str, map_location: Any = None) -> Any:
        return torch.load(path, map_location=map_location, weights_only=False)

    def commit(self, info: Any) -> bool:
        return True

    def is_data_parallel_writer(self, dp_rank: int) -> bool:
        return dp_rank == 0

    def is_decoupled(self) -> bool:
        return False

    def set_commit_info(self, info: Any) -> None:
        pass

    def get_commit_info(self) -> None:
        return None

    def cleanup(self) -> None:
        pass

    def preserves_storage_sharing(self) -> bool:
        return True


# --------------------------------------------------------------------------------------------------
# One save of one rank
# --------------------------------------------------------------------------------------------------


class _Save:
    """This rank's part of one checkpoint: its files' write jobs, then its sums (or error) file, then on rank 0
    the publication."""

    def __init__(self, pool: ThreadPoolExecutor, tmp: Path, sums_dir: Path, buffers: _Buffers | None,
                 write_torch: Callable[[Any, Path], dict[str, Any]]) -> None:
        self.pool, self.tmp, self.sums_dir, self.buffers = pool, tmp, sums_dir, buffers
        self.write_torch = write_torch  # _write_torch (O_DIRECT where possible) or _write_buffered
        self.jobs: dict[str, Future[dict[str, Any]]] = {}
        self._later: list[tuple[str, Callable[..., dict[str, Any]], Any]] = []
        self._memo: dict[int, torch.UntypedStorage] = {}

    def add(self, rel: str, fn: Callable[..., dict[str, Any]], obj: Any) -> None:
        """Write `obj` to `rel` with `fn`: at once (the caller waits for the save), or, for a snapshot, once
        `start` is called: writing while the rest is copied would lengthen the copy the training waits for."""
        if rel in self.jobs or rel in {r for r, _, _ in self._later}:
            raise CheckpointError(f"{self.tmp / rel} is written twice in one save")
        if self.buffers is not None:
            self._later.append((rel, fn, _snapshot(obj, self.buffers, self._memo)))
        else:
            self.jobs[rel] = self.pool.submit(fn, obj, self.tmp / rel)

    def start(self) -> None:
        """Start writing the snapshot's files."""
        self._memo.clear()
        for rel, fn, obj in self._later:
            self.jobs[rel] = self.pool.submit(fn, obj, self.tmp / rel)
        self._later.clear()

    def add_path(self, path: str, obj: Any) -> None:
        self.add(Path(path).relative_to(self.tmp).as_posix(), self.write_torch, obj)

    def finish_rank(self) -> None:
        """Wait for this rank's files; leave their sums (or the error) where rank 0 looks for them."""
        try:
            sums = {rel: job.result() for rel, job in self.jobs.items()}
        except BaseException as e:
            _leave_error(self.sums_dir, e)
            raise
        _write_atomic(self.sums_dir / f"rank-{dist.rank():05d}.json", json.dumps(sums).encode())


def _leave_error(sums_dir: Path, e: BaseException) -> None:
    """This rank's writing failed: say so where rank 0's publisher looks (best effort: it may be the disk)."""
    path = sums_dir / f"rank-{dist.rank():05d}.error"
    if sums_dir.is_dir() and not path.exists():
        try:
            _write_atomic(path, f"{type(e).__name__}: {e}".encode())
        except OSError:
            pass


def _gather_sums(sums_dir: Path, world: int, abort: threading.Event) -> dict[str, Any]:
    """Rank 0: every rank's sums, waiting for each rank's file; CheckpointError when a rank failed (its
    error file) or, once `abort` is set (this process is failing), when one did not answer in ABORT_WAIT_S."""
    all_sums: dict[str, Any] = {}
    deadline: float | None = None
    for r in range(world):
        ok, bad = sums_dir / f"rank-{r:05d}.json", sums_dir / f"rank-{r:05d}.error"
        while not ok.is_file():
            if bad.is_file():
                raise CheckpointError(f"rank {r} could not write its checkpoint files: {bad.read_text()}")
            if abort.is_set():
                deadline = deadline or time.monotonic() + ABORT_WAIT_S
                if time.monotonic() > deadline:
                    raise CheckpointError(f"rank {r} did not finish writing its checkpoint files")
            time.sleep(POLL_S)
        all_sums.update(json.loads(ok.read_text()))
    return all_sums


def _publish(tmp: Path, final: Path, step: int, state: dict[str, Any], engines: dict[str, int], world: int,
             all_sums: dict[str, Any], keep_last: int, milestone_every_images: int, uploader: Uploader | None,
             remove: Callable[[Path], Any] | None = None) -> None:
    """Rank 0, once every rank's files are durable: check, write the manifest, rename, `latest`, upload, prune
    (checkpoints set aside at once, their files removed by `remove`: see files._delete_checkpoint).
    engines: {tag: zero stage}."""
    root = tmp.parent
    files = _list_files(tmp)
    lost = sorted(set(all_sums) - set(files))
    for rel in files:  # written outside the pool (DeepSpeed's zero_to_fp32.py): hashed and fsynced here
        if rel not in all_sums:
            all_sums[rel] = _hash_file(tmp / rel)
    missing = [f"rng/rank-{r:05d}.pt" for r in range(world) if f"rng/rank-{r:05d}.pt" not in all_sums]
    missing += [t for t in engines if t not in {f.split("/")[0] for f in files}]
    if lost or missing:
        raise CheckpointError(f"checkpoint {tmp} is incomplete after every rank wrote: missing {lost + missing}")
    previous = complete_checkpoints(root)
    images = int(state.get("images", 0))
    milestone = False
    if milestone_every_images > 0:
        prev = [p for p in previous if _step_of(p.name) < step]
        prev_images = int(read_manifest(prev[-1]).get("images", 0)) if prev else 0
        milestone = images // milestone_every_images > prev_images // milestone_every_images
    manifest = {
        "format": FORMAT, "version": VERSION, "step": step, "images": images, "world": world,
        "engines": {t: {"zero_stage": stage} for t, stage in engines.items()},
        "milestone": milestone, "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "files": dict(sorted(all_sums.items())),
    }
    for sub in [p for p in tmp.rglob("*") if p.is_dir()]:
        _fsync_dir(sub)  # the files' names are durable too (their data was fsynced when written)
    _write_atomic(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
    if final.exists():  # re-saving a step (a resume from an older checkpoint): replace it
        _delete_checkpoint(final, remove)
    os.rename(tmp, final)
    _fsync_dir(root)
    _write_atomic(root / LATEST, (final.name + "\n").encode())
    if uploader is not None:
        uploader.submit(final)
    _prune(root, keep_last, busy=uploader.pending() if uploader is not None else set(), remove=remove)


# --------------------------------------------------------------------------------------------------
# The saver
# --------------------------------------------------------------------------------------------------


class Saver:
    """Saves the checkpoints of one run (every rank has one; `save` is COLLECTIVE).

    background=False: `save` returns once the checkpoint is published. background=True: `save` returns
    after the snapshot (the training loop's stall); writing, hashing, fsync and publication go on in
    background threads. A save first waits for the previous one; `wait` (COLLECTIVE) waits for the last
    one to be published and raises its failure on every rank; `close` waits and stops the threads.
    direct_io: the torch.save files (engine shards, RNG states, trainer state) are written with O_DIRECT
    where the filesystem takes it (`_DirectFile`); False: through the page cache.
    """

    def __init__(self, *, background: bool = False, threads: int = WRITE_THREADS, direct_io: bool = True) -> None:
        self.background, self.direct_io = background, direct_io
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="checkpoint-write")
        # Pruned checkpoints are set aside at once and their files removed here (freeing the pages of large
        # files took 0.24 s of a 1.9 s save, profiled on the 2-core VM); `close` waits for it.
        self._remover = ThreadPoolExecutor(1, thread_name_prefix="checkpoint-remove")
        self._finisher: threading.Thread | None = None
        self._error: BaseException | None = None
        self._abort = threading.Event()
        self._buffers = _Buffers()

    def save(self, run_dir: Path, step: int, engines: dict[str, Any], ema: torch.nn.Module, state: dict[str, Any],
             *, keep_last: int, milestone_every_images: int = 0, uploader: Uploader | None = None,
             wait: bool = False) -> Path:
        """COLLECTIVE: write checkpoint `step-<step>` of `run_dir` and publish it (in the background unless
        `wait` or background=False); return its path (where it will be) on every rank.

        engines: {"G": engine, "D": engine} (names become the engines' folders); ema: the EMA module (identical
        on every rank; rank 0 writes it); state: the trainer's dict (plain data: see _check_plain), which must
        hold "images" when milestone_every_images > 0. After publication, keeps the newest `keep_last`
        complete checkpoints plus milestones (the first checkpoint at or after every multiple of
        milestone_every_images images) and deletes the others (not those still queued for upload).
        uploader: rank 0's Uploader when checkpoints are copied to object storage (None on the other ranks).
        """
        if keep_last < 1:
            raise ValueError(f"keep_last={keep_last}: must be >= 1")
        if milestone_every_images > 0 and "images" not in state:
            raise ValueError("milestone_every_images needs state['images']")
        _check_plain(state)
        self.wait()
        rank, world = dist.rank(), dist.world()
        root = ckpt_root(run_dir)
        tmp = root / f".tmp-{step:09d}"
        sums_dir = root / f".tmp-{step:09d}-sums"  # outside tmp: its listing holds only the checkpoint's files
        final = root / step_name(step)

        def prepare() -> None:  # a fresh temporary folder (leftovers of interrupted saves removed first)
            root.mkdir(parents=True, exist_ok=True)
            _remove_leftovers(root)
            (tmp / "rng").mkdir(parents=True)
            sums_dir.mkdir()

        dist.on_rank0(prepare)
        job = _Save(self._pool, tmp, sums_dir, self._buffers if self.background and not wait else None,
                    _write_torch if self.direct_io else _write_buffered)
        try:
            for tag, engine in engines.items():
                original = getattr(engine, "checkpoint_engine", None)  # None: not a DeepSpeed engine (tests)
                if original is not None and original.is_decoupled():
                    raise CheckpointError(f"engine {tag}: DeepSpeed's decoupled checkpoint writer is not supported "
                                          "(waveforge writes in the background itself)")
                if original is not None:
                    engine.checkpoint_engine = _CaptureEngine(job.add_path)
                try:
                    engine.save_checkpoint(str(tmp), tag=tag, client_state={}, save_latest=False)
                finally:
                    if original is not None:
                        engine.checkpoint_engine = original
            job.add(f"rng/rank-{rank:05d}.pt", job.write_torch, _rng_state())
            if rank == 0:
                job.add(EMA, _write_safetensors, ema.state_dict())
                job.add(STATE, job.write_torch, state)
        except BaseException as e:
            for f in job.jobs.values():
                f.exception()
            _leave_error(sums_dir, e)  # rank 0 must not wait for this rank's files
            if job.buffers is not None:
                job.buffers.recycle()
            raise
        job.start()
        stages = {t: int(e.zero_optimization_stage()) for t, e in engines.items()}

        def publish() -> None:
            all_sums = _gather_sums(sums_dir, world, self._abort)
            shutil.rmtree(sums_dir)
            _publish(tmp, final, step, state, stages, world, all_sums, keep_last, milestone_every_images, uploader,
                     remove=self._remove_later)

        def run() -> None:
            job.finish_rank()
            if rank == 0:
                publish()

        if self.background and not wait:
            self._finisher = threading.Thread(target=self._finish, args=(job, run, final), daemon=True,
                                              name="checkpoint-finish")
            self._finisher.start()
        else:
            self._finish(job, run, final)
            self.wait()
        return final

    def _finish(self, job: _Save, run: Callable[[], None], final: Path) -> None:
        try:
            try:
                run()
            finally:
                for f in job.jobs.values():  # nothing of this save still writes when it is over
                    f.exception()
                if job.buffers is not None:
                    job.buffers.recycle()
        except BaseException as e:  # noqa: BLE001 - kept, raised on every rank by the next save/wait/close
            if not isinstance(e, CheckpointError):
                e = CheckpointError(f"saving checkpoint {final.name} failed: {type(e).__name__}: {e}")
            self._error = self._error or e
            if dist.rank() != 0:
                _leave_error(job.sums_dir, e)

    def _remove_later(self, path: Path) -> None:
        self._remover.submit(shutil.rmtree, path, ignore_errors=True)

    def _join(self) -> None:
        if self._finisher is not None:
            self._finisher.join()
            self._finisher = None

    def wait(self) -> None:
        """COLLECTIVE: wait until the last save is published (its own files on every rank, the publication
        on rank 0); raise on every rank when it failed anywhere."""
        self._join()
        mine, self._error = self._error, None
        errors = dist.gather_object(str(mine) if mine is not None else "")
        failed = [f"rank {r}: {e}" for r, e in enumerate(errors) if e]
        if failed:
            if mine is not None and len(failed) == 1:
                raise mine
            raise CheckpointError(f"a checkpoint save failed: {'; '.join(failed)}")

    def close(self, *, abort: bool = False) -> None:
        """Wait for the last save and stop the threads. Not collective: a rank's own failure is raised. With
        abort (this rank is failing anyway), rank 0 waits at most ABORT_WAIT_S for the other ranks' files
        and publishes only when they all arrived; errors are printed, not raised."""
        if abort:
            self._abort.set()
        self._join()
        self._pool.shutdown(wait=True)
        self._remover.shutdown(wait=True)
        mine, self._error = self._error, None
        if mine is not None:
            if abort:
                print(f"checkpoint: {mine}", file=sys.stderr, flush=True)
            else:
                raise mine


def save(run_dir: Path, step: int, engines: dict[str, Any], ema: torch.nn.Module, state: dict[str, Any], *,
         keep_last: int, milestone_every_images: int = 0, uploader: Uploader | None = None) -> Path:
    """COLLECTIVE: write and publish checkpoint `step-<step>` of `run_dir` (files written in parallel, hashed
    while written); returns once it is published, its path on every rank. See `Saver.save`."""
    saver = Saver(background=False)
    try:
        return saver.save(run_dir, step, engines, ema, state, keep_last=keep_last,
                          milestone_every_images=milestone_every_images, uploader=uploader)
    finally:
        saver.close()


def _prune(root: Path, keep_last: int, busy: set[str], remove: Callable[[Path], Any] | None = None) -> list[str]:
    """Delete complete checkpoints beyond the newest keep_last, keeping milestones and `busy` names."""
    ckpts = complete_checkpoints(root)
    removed = []
    for p in ckpts[:-keep_last]:
        if p.name in busy or read_manifest(p).get("milestone"):
            continue
        _delete_checkpoint(p, remove)
        removed.append(p.name)
    return removed
