"""Checkpoints: sharded DeepSpeed save, atomic publication, background upload, resume, reshard, export.

A checkpoint is one folder `RUN_DIR/checkpoints/step-000000123/`:

    manifest.json            written last: every file below with its size and sha256, the world size, step
    state.pt                 the trainer's state dict (step, images, loader state, run id, recipe, code version)
    ema.safetensors          the EMA generator (full, not sharded)
    rng/rank-00000.pt        each rank's RNG states (torch, cuda, numpy, python)
    G/, D/                   each DeepSpeed engine's own checkpoint (ZeRO partitions written by every rank)
    G_universal/, ...        (only after a resume on another world size) DeepSpeed's universal format, derived

Publication is atomic: every rank writes under `checkpoints/.tmp-000000123/`, rank 0 checks and hashes the
files (the hashing is spread over the ranks), writes the manifest, renames the folder to `step-...` and
only then replaces the `latest` pointer file (temp file + fsync + os.replace). A process killed at any
moment leaves the previous checkpoint loadable; `.tmp-*` leftovers are removed by the next save or resume.
A checkpoint is complete iff its manifest exists and every file it lists has the listed size.

Object storage: DeepSpeed writes local paths only, so a checkpoint is published locally first and then
copied by `Uploader` (rank 0, one background thread) to `URL/step-.../`: the files, then the manifest
(a remote checkpoint is complete iff its manifest exists), then `URL/latest`. The URL is used as given:
it is the remote twin of `RUN_DIR/checkpoints/` (pass a per-run URL).

Call order in a trainer (every function marked COLLECTIVE is called by every rank):

    ckpt = find_resume(run_dir, cfg.run.resume, url=..., storage=...)   # COLLECTIVE, before the engines
    patch = ds_config_patch(ckpt, world) if ckpt else {}                 # COLLECTIVE; add to each DS config
    engines = {"G": deepspeed.initialize(...), "D": ...}
    state = load(ckpt, engines, ema) if ckpt else fresh                  # COLLECTIVE
    uploader = Uploader(url, storage) if url and rank == 0 else None
    ... save(run_dir, step, engines, ema, state, keep_last=..., uploader=uploader) ...  # COLLECTIVE
    uploader.wait()                                                      # at the end; returns the error count

(`waveforge.checkpointer.Checkpointer` does all of this for the trainer.)

Everything this module writes itself is loaded as data (`torch.load(weights_only=True)`, safetensors);
DeepSpeed's own shard files are read by DeepSpeed, which uses `torch.load(weights_only=False)` internally:
only resume from checkpoints you trust.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import random
import shutil
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch

from waveforge import dist
from waveforge import storage as wstorage
from waveforge.config import StorageConfig, UserError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
LATEST = "latest"
STATE = "state.pt"
EMA = "ema.safetensors"
FORMAT = "waveforge-checkpoint"
VERSION = 1
UNIVERSAL_SUFFIX = "_universal"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or does not fit the run."""


# --------------------------------------------------------------------------------------------------
# Names, manifests, small file helpers
# --------------------------------------------------------------------------------------------------


def ckpt_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_name(step: int) -> str:
    return f"step-{step:09d}"


def _step_of(name: str) -> int | None:
    """The step of a folder named step-NNN (None for anything else)."""
    if not name.startswith("step-") or not name[5:].isdigit():
        return None
    return int(name[5:])


def _is_url(text: str) -> bool:
    return not wstorage.is_local(text)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that a reader sees the old or the new content, never a part."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _hash_file(path: Path) -> dict[str, Any]:
    """Size and sha256 of a file; also fsyncs it (the checkpoint must be on disk before it is published)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
        os.fsync(f.fileno())
    return {"size": path.stat().st_size, "sha256": h.hexdigest()}


def _list_files(folder: Path) -> list[str]:
    """Every regular file under `folder`, as sorted relative POSIX paths."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def read_manifest(ckpt: Path) -> dict[str, Any]:
    path = Path(ckpt) / MANIFEST
    try:
        m = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{ckpt} is not a complete checkpoint: no {MANIFEST}") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable manifest ({e})") from e
    if m.get("format") != FORMAT or m.get("version") != VERSION:
        raise CheckpointError(f"{path}: not a {FORMAT} v{VERSION} manifest")
    return m


def is_complete(ckpt: Path, hashes: bool = False) -> bool:
    """The manifest exists and every listed file has its size (and, with hashes=True, its sha256)."""
    try:
        m = read_manifest(ckpt)
    except CheckpointError:
        return False
    for rel, info in m["files"].items():
        p = Path(ckpt) / rel
        if not p.is_file() or p.stat().st_size != info["size"]:
            return False
        if hashes and _hash_file(p)["sha256"] != info["sha256"]:
            return False
    return True


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root` (a run's checkpoints/ folder), oldest first."""
    if not Path(root).is_dir():
        return []
    found = [(s, p) for p in Path(root).iterdir() if (s := _step_of(p.name)) is not None and p.is_dir()]
    return [p for _, p in sorted(found) if is_complete(p)]


def _remove_leftovers(root: Path, keep: str = "") -> None:
    """Delete `.tmp-*` folders/files of interrupted saves, downloads and prunes (not `keep`)."""
    if not root.is_dir():
        return
    for p in root.iterdir():
        if p.name.startswith((".tmp-", f".{LATEST}.tmp-")) and p.name != keep:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def _delete_checkpoint(ckpt: Path) -> None:
    """Remove a checkpoint folder atomically (rename aside first, so it never looks half deleted)."""
    aside = ckpt.with_name(f".tmp-delete-{ckpt.name}-{os.getpid()}")
    os.rename(ckpt, aside)
    shutil.rmtree(aside, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# RNG states (per rank) and the trainer's state
# --------------------------------------------------------------------------------------------------


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state(legacy=False)
    out: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"bit_generator": np_state["bit_generator"],
                  "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def _set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    n = s["numpy"]
    np.random.set_state({"bit_generator": n["bit_generator"],
                         "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    v, internal, g = s["python"]
    random.setstate((v, tuple(internal), g))
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])


_PLAIN = (str, int, float, bool, type(None), torch.Tensor)


def _check_plain(obj: Any, where: str = "state") -> None:
    """The trainer's state must load with weights_only=True: dicts/lists of numbers, strings, tensors."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where}: key {k!r} is a {type(k).__name__}; use str or int keys")
            _check_plain(v, f"{where}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
    elif not isinstance(obj, _PLAIN):
        raise TypeError(f"{where} is a {type(obj).__name__}: a checkpoint state holds only dicts, lists, "
                        "numbers, strings, None and torch tensors (convert numpy arrays with torch.from_numpy)")


# --------------------------------------------------------------------------------------------------
# Save (COLLECTIVE)
# --------------------------------------------------------------------------------------------------


def save(run_dir: Path, step: int, engines: dict[str, Any], ema: torch.nn.Module, state: dict[str, Any], *,
         keep_last: int, milestone_every_images: int = 0, uploader: Uploader | None = None) -> Path:
    """COLLECTIVE: write and publish checkpoint `step-<step>` of `run_dir`; return its path on every rank.

    engines: {"G": engine, "D": engine} (names become the engines' folders); ema: the EMA module (identical
    on every rank; rank 0 writes it); state: the trainer's dict (plain data: see _check_plain), which must
    hold "images" when milestone_every_images > 0. After publication, keeps the newest `keep_last`
    complete checkpoints plus milestones (the first checkpoint at or after every multiple of
    milestone_every_images images) and deletes the others (not those still queued for upload).
    uploader: rank 0's Uploader when checkpoints are copied to object storage (its url); the upload runs in
    the background (None on the other ranks, and without object storage).
    """
    if keep_last < 1:
        raise ValueError(f"keep_last={keep_last}: must be >= 1")
    if milestone_every_images > 0 and "images" not in state:
        raise ValueError("milestone_every_images needs state['images']")
    _check_plain(state)
    rank, world = dist.rank(), dist.world()
    root = ckpt_root(run_dir)
    name = step_name(step)
    tmp = root / f".tmp-{step:09d}"
    sums_dir = root / f".tmp-{step:09d}-sums"  # outside tmp: ranks may still list tmp while others write

    # 1. A fresh temporary folder (rank 0 clears leftovers of interrupted saves first).
    def prepare() -> None:
        root.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(root)
        (tmp / "rng").mkdir(parents=True)
        sums_dir.mkdir()

    dist.on_rank0(prepare)

    # 2. Every rank writes: the engines' ZeRO partitions (DeepSpeed barriers inside), its RNG states;
    #    rank 0 also the EMA and the state.
    for tag, engine in engines.items():
        engine.save_checkpoint(str(tmp), tag=tag, client_state={}, save_latest=False)
    torch.save(_rng_state(), tmp / "rng" / f"rank-{rank:05d}.pt")
    if rank == 0:
        safetensors.torch.save_model(ema, str(tmp / EMA))
        torch.save(state, tmp / STATE)
    dist.barrier()

    # 3. Hash (and fsync) the files, spread over the ranks; each rank leaves its share in a sums file.
    files = _list_files(tmp)
    sums = {rel: _hash_file(tmp / rel) for rel in files[rank::world]}
    _write_atomic(sums_dir / f"rank-{rank:05d}.json", json.dumps(sums).encode())
    dist.barrier()

    # 4. Rank 0 checks, writes the manifest, publishes, points `latest` at it, prunes, queues the upload.
    final = root / name

    def publish() -> None:
        all_sums: dict[str, Any] = {}
        for r in range(world):
            all_sums.update(json.loads((sums_dir / f"rank-{r:05d}.json").read_text()))
        shutil.rmtree(sums_dir)
        missing = [f"rng/rank-{r:05d}.pt" for r in range(world) if f"rng/rank-{r:05d}.pt" not in all_sums]
        if sorted(all_sums) != files or missing or not all(t in {f.split("/")[0] for f in files} for t in engines):
            raise CheckpointError(f"checkpoint {tmp} is incomplete after every rank wrote: "
                                  f"missing {missing or sorted(set(files) - set(all_sums))}")
        previous = complete_checkpoints(root)
        images = int(state.get("images", 0))
        milestone = False
        if milestone_every_images > 0:
            prev = [p for p in previous if _step_of(p.name) < step]
            prev_images = int(read_manifest(prev[-1]).get("images", 0)) if prev else 0
            milestone = images // milestone_every_images > prev_images // milestone_every_images
        manifest = {
            "format": FORMAT, "version": VERSION, "step": step, "images": images, "world": world,
            "engines": {t: {"zero_stage": int(e.zero_optimization_stage())} for t, e in engines.items()},
            "milestone": milestone, "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "files": all_sums,
        }
        for sub in [p for p in tmp.rglob("*") if p.is_dir()]:
            _fsync_dir(sub)  # the files' names are durable too (their data was fsynced when hashed)
        _write_atomic(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
        if final.exists():  # re-saving a step (a resume from an older checkpoint): replace it
            _delete_checkpoint(final)
        os.rename(tmp, final)
        _fsync_dir(root)
        _write_atomic(root / LATEST, (name + "\n").encode())
        if uploader is not None:
            uploader.submit(final)
        _prune(root, keep_last, busy=uploader.pending() if uploader is not None else set())

    def publish_or_explain() -> None:
        try:
            publish()
        except OSError as e:
            raise CheckpointError(f"saving checkpoint {name} failed: {type(e).__name__}: {e}") from e

    dist.on_rank0(publish_or_explain)  # every rank learns of a failure, none waits for rank 0
    return final


def _prune(root: Path, keep_last: int, busy: set[str]) -> list[str]:
    """Delete complete checkpoints beyond the newest keep_last, keeping milestones and `busy` names."""
    ckpts = complete_checkpoints(root)
    removed = []
    for p in ckpts[:-keep_last]:
        if p.name in busy or read_manifest(p).get("milestone"):
            continue
        _delete_checkpoint(p)
        removed.append(p.name)
    return removed


# --------------------------------------------------------------------------------------------------
# Object storage
# --------------------------------------------------------------------------------------------------


def upload(ckpt: Path, url: str, storage: StorageConfig | None = None) -> str:
    """Copy the complete local checkpoint `ckpt` to `url/<its name>/`: files, then the manifest, then
    `url/latest`. Returns the remote checkpoint URL. Transient errors are retried (waveforge.storage)."""
    m = read_manifest(ckpt)
    remote = wstorage.join(url, ckpt.name)
    for rel in m["files"]:
        wstorage.put_file(str(ckpt / rel), wstorage.join(remote, rel), storage)
    wstorage.put_file(str(ckpt / MANIFEST), wstorage.join(remote, MANIFEST), storage)
    wstorage.write_text(wstorage.join(url, LATEST), ckpt.name + "\n", storage)
    return remote


def _remote_checkpoints(url: str, storage: StorageConfig | None) -> list[str]:
    """Names of complete remote checkpoints (those with a manifest) under `url`, oldest first."""
    names = [n for n in wstorage.listdir(url, storage) if _step_of(n) is not None]
    complete = [n for n in names if wstorage.exists(wstorage.join(url, n, MANIFEST), storage)]
    return sorted(complete, key=lambda n: _step_of(n))


def _prune_remote(url: str, storage: StorageConfig | None, keep_last: int) -> None:
    """Delete remote checkpoints beyond the newest keep_last (milestones kept): manifest first."""
    for name in _remote_checkpoints(url, storage)[:-keep_last]:
        m = json.loads(wstorage.read_bytes(wstorage.join(url, name, MANIFEST), storage))
        if m.get("milestone"):
            continue
        wstorage.remove(wstorage.join(url, name, MANIFEST), storage)
        wstorage.remove(wstorage.join(url, name), storage, recursive=True)


def download(url: str, dest_root: Path, storage: StorageConfig | None = None, *,
             files: list[str] | None = None) -> Path:
    """Download the remote checkpoint `url` (a step-... folder with a manifest) into `dest_root/<name>/`,
    verifying sizes and sha256; published atomically like a save. `files`: only these (plus the manifest;
    the result is then not a complete checkpoint and lives in a `.partial-` folder). Returns the folder."""
    url = url.rstrip("/")
    name = url.rsplit("/", 1)[-1]
    if _step_of(name) is None:
        raise CheckpointError(f"{url}: not a checkpoint folder (expected .../step-NNNNNNNNN)")
    try:
        manifest_bytes = wstorage.read_bytes(wstorage.join(url, MANIFEST), storage)
    except FileNotFoundError:
        raise CheckpointError(f"{url} is not a complete checkpoint: no {MANIFEST} (upload unfinished?)") from None
    m = json.loads(manifest_bytes)
    wanted = list(m["files"]) if files is None else files
    unknown = [rel for rel in wanted if rel not in m["files"]]
    if unknown:
        raise CheckpointError(f"{url}: {unknown} not in the checkpoint")
    final = dest_root / (name if files is None else f".partial-{name}")
    if final.is_dir() and all((final / rel).is_file() and (final / rel).stat().st_size == m["files"][rel]["size"]
                              for rel in wanted):
        return final
    tmp = dest_root / f".tmp-download-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for rel in wanted:
        wstorage.get_file(wstorage.join(url, rel), str(tmp / rel), storage)
        got = _hash_file(tmp / rel)
        if got != m["files"][rel]:
            raise CheckpointError(f"{url}/{rel}: downloaded file differs from the manifest ({got} vs "
                                  f"{m['files'][rel]})")
    (tmp / MANIFEST).write_bytes(manifest_bytes)
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    return final


class Uploader:
    """Uploads published checkpoints to `url` in one background thread (rank 0 only), in order.

    Each checkpoint: files, then the manifest, then `url/latest`; then remote checkpoints beyond
    `keep_last` (milestones kept) are deleted when keep_last > 0. Failures are retried with exponential
    backoff, then logged loudly (stderr + logging) and counted in `errors`; never dropped silently.
    `wait()` blocks until the queue is empty and returns the number of failed uploads.
    """

    def __init__(self, url: str, storage: StorageConfig | None = None, *, keep_last: int = 0, retries: int = 5,
                 backoff_s: float = 1.0) -> None:
        if not url:
            raise ValueError("Uploader needs a url")
        self.url = url.rstrip("/")
        self.storage = storage
        self.keep_last = keep_last
        self.retries = retries
        self.backoff_s = backoff_s
        self.errors = 0
        self.failed: list[str] = []
        self.uploaded: list[str] = []
        self._queue: queue.Queue[Path] = queue.Queue()
        self._pending: set[str] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def submit(self, ckpt: Path) -> None:
        """Queue a published local checkpoint for upload (returns at once)."""
        with self._lock:
            self._pending.add(ckpt.name)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._work, name="checkpoint-upload", daemon=True)
                self._thread.start()
        self._queue.put(ckpt)

    def pending(self) -> set[str]:
        """Names of checkpoints queued or uploading (the local pruning keeps them)."""
        with self._lock:
            return set(self._pending)

    def _work(self) -> None:
        try:  # lowest CPU priority for this thread only (Linux: threads are tasks): training comes first
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except (OSError, AttributeError):
            pass
        while True:
            ckpt = self._queue.get()
            t0 = time.perf_counter()
            try:
                remote = self._upload_with_retries(ckpt)
                if self.keep_last > 0:
                    _prune_remote(self.url, self.storage, self.keep_last)
                self.uploaded.append(remote)
                log.info("checkpoint uploaded: %s (%.1f s)", remote, time.perf_counter() - t0)
            except Exception as e:  # noqa: BLE001 - reported loudly and counted, training goes on
                with self._lock:
                    self.errors += 1
                    self.failed.append(ckpt.name)
                msg = (f"CHECKPOINT UPLOAD FAILED: {ckpt} -> {self.url}/{ckpt.name}: {type(e).__name__}: {e} "
                       f"(the local copy is intact; {self.errors} failed upload(s) so far)")
                log.error(msg)
                print(msg, file=sys.stderr, flush=True)
            finally:
                with self._lock:
                    self._pending.discard(ckpt.name)
                self._queue.task_done()

    def _upload_with_retries(self, ckpt: Path) -> str:
        for attempt in range(self.retries + 1):
            try:
                return upload(ckpt, self.url, self.storage)
            except Exception as e:  # noqa: BLE001 - whole-checkpoint retry on top of storage's own retries
                if attempt == self.retries:
                    raise
                wait = self.backoff_s * 2 ** attempt
                log.warning("checkpoint upload of %s failed (%s: %s); attempt %d/%d again in %.0f s", ckpt.name,
                            type(e).__name__, e, attempt + 2, self.retries + 1, wait)
                time.sleep(wait)
        raise AssertionError("unreachable")

    def wait(self) -> int:
        """Block until every queued upload is done; return the number of failed uploads so far."""
        self._queue.join()
        return self.errors


# --------------------------------------------------------------------------------------------------
# Resume (COLLECTIVE)
# --------------------------------------------------------------------------------------------------


def _newest_local(root: Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def _resolve_local(path: Path) -> Path:
    """A checkpoint folder, a run's checkpoints/ folder or a run folder -> its (newest) complete checkpoint."""
    if (path / MANIFEST).is_file() or _step_of(path.name) is not None:
        if not is_complete(path):
            raise CheckpointError(f"{path} is not a complete checkpoint (missing manifest or files)")
        return path
    for root in (path, ckpt_root(path)):
        newest = _newest_local(root)
        if newest is not None:
            return newest
    raise CheckpointError(f"no complete checkpoint in {path} (nor in {ckpt_root(path)})")


def _resolve_remote(url: str, storage: StorageConfig | None) -> str:
    """A remote checkpoint URL, or a remote checkpoints root -> URL of its (newest) complete checkpoint."""
    url = url.rstrip("/")
    if _step_of(url.rsplit("/", 1)[-1]) is not None:
        if not wstorage.exists(wstorage.join(url, MANIFEST), storage):
            raise CheckpointError(f"{url} is not a complete checkpoint: no {MANIFEST} (upload unfinished?)")
        return url.rstrip("/")
    names = _remote_checkpoints(url, storage)
    if not names:
        raise CheckpointError(f"no complete checkpoint under {url}")
    return f"{url.rstrip('/')}/{names[-1]}"


def _find_resume_rank0(run_dir: Path, resume: str, url: str, storage: StorageConfig | None) -> Path | None:
    root = ckpt_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(root)
    if resume == "never":
        return None
    if resume == "auto":
        local = _newest_local(root)
        if url:
            names = _remote_checkpoints(url, storage)
            if names and (local is None or _step_of(names[-1]) > _step_of(local.name)):
                return download(wstorage.join(url, names[-1]), root, storage)
        return local
    if _is_url(resume):
        return download(_resolve_remote(resume, storage), root, storage)
    return _resolve_local(Path(wstorage.local_path(resume)))


def find_resume(run_dir: Path, resume: str, url: str = "", storage: StorageConfig | None = None) -> Path | None:
    """COLLECTIVE: the checkpoint to resume from, the same Path on every rank, or None.

    resume="never": None. "auto": the newest complete checkpoint of run_dir, or of `url` when that one is
    newer (downloaded into run_dir/checkpoints/), or None. Anything else: a checkpoint folder, a run folder,
    a checkpoints folder, or a URL of either (downloaded); CheckpointError when missing or incomplete.
    Rank 0 decides and downloads; the others wait for the answer. Also removes `.tmp-*` leftovers.
    """
    def decide() -> str | None:
        try:
            found = _find_resume_rank0(Path(run_dir), resume, url, storage)
        except CheckpointError as e:
            raise CheckpointError(f"cannot resume from {resume!r}: {e}") from e
        except OSError as e:  # storage unreachable, denied, ...
            raise CheckpointError(f"cannot resume from {resume!r}: {type(e).__name__}: {e}") from e
        return str(found) if found is not None else None

    path = dist.on_rank0(decide)
    return Path(path) if path is not None else None


def needs_universal(ckpt: Path, world: int) -> bool:
    """True when `ckpt` was saved with another world size (DeepSpeed must load the universal format)."""
    return int(read_manifest(ckpt)["world"]) != world


def prepare_universal(ckpt: Path) -> None:
    """COLLECTIVE: rank 0 converts each engine's folder to DeepSpeed's universal format (`<tag>_universal`,
    next to it, cached: done once per checkpoint); the other ranks wait. Raises on every rank on failure."""
    def convert() -> None:
        for tag in read_manifest(ckpt)["engines"]:
            _convert_universal(Path(ckpt), tag)

    dist.on_rank0(convert)


def _convert_universal(ckpt: Path, tag: str) -> None:
    """DeepSpeed's own converter (`python -m deepspeed.checkpoint.ds_to_universal`, its public command line) in
    a child process: a process pool forked from a trainer that holds NCCL/gloo state is not safe, and the
    conversion's memory is returned when it ends."""
    out = ckpt / f"{tag}{UNIVERSAL_SUFFIX}"
    if (out / ".complete").is_file():
        return
    tmp = ckpt / f".tmp-{tag}{UNIVERSAL_SUFFIX}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ckpt / tag),
           "--output_folder", str(tmp), "--num_extract_workers", "1", "--num_merge_workers", "1",
           "--inject_missing_state"]  # ZeRO-1/2 checkpoints lack the universal info
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}  # no GPU needed to convert
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise CheckpointError(f"ds_to_universal {ckpt / tag} failed (exit {r.returncode}):\n"
                              f"{(r.stdout + r.stderr)[-3000:]}")
    (ckpt / "latest_universal").unlink(missing_ok=True)  # DeepSpeed's pointer (ZeRO-3); tags are explicit
    (tmp / ".complete").write_text("ok\n")
    os.rename(tmp, out)


def ds_config_patch(ckpt: Path, world: int) -> dict[str, Any]:
    """COLLECTIVE when a conversion is needed: what to merge into each engine's DeepSpeed config before
    deepspeed.initialize to load `ckpt` at `world` ranks ({} when the world size matches). Prepares the
    universal format when needed."""
    if not needs_universal(ckpt, world):
        return {}
    prepare_universal(ckpt)
    return {"checkpoint": {"load_universal": True}}


def read_state(ckpt: Path) -> dict[str, Any]:
    """The trainer's state dict of a checkpoint (plain data, loaded with weights_only=True): counters, loader
    position, recipe, run id. Cheap: read it to check a checkpoint before loading any weight."""
    try:
        return torch.load(Path(ckpt) / STATE, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{ckpt} is not a checkpoint: no {STATE}") from None
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file
        raise CheckpointError(f"{Path(ckpt) / STATE}: unreadable ({type(e).__name__}: {e})") from e


def load(ckpt: Path, engines: dict[str, Any], ema: torch.nn.Module) -> dict[str, Any]:
    """COLLECTIVE: restore every engine (module, optimizer, LR scheduler), the EMA and, when the world
    size matches, this rank's RNG states (else they are left as they are: a trainer that re-seeds per
    step from (seed, step, rank) does not need them). Returns the trainer's state dict."""
    ckpt = Path(ckpt)
    m = read_manifest(ckpt)
    if sorted(m["engines"]) != sorted(engines):
        raise CheckpointError(f"{ckpt} holds engines {sorted(m['engines'])}, the trainer has {sorted(engines)}")
    universal = m["world"] != dist.world()
    for tag, engine in engines.items():
        if universal:
            if not engine.load_universal_checkpoint():
                raise CheckpointError(f"{ckpt} was saved at {m['world']} ranks, this run has {dist.world()}: build "
                                      "the engines with ds_config_patch(ckpt, world) merged into their configs")
            if not (ckpt / f"{tag}{UNIVERSAL_SUFFIX}" / ".complete").is_file():
                raise CheckpointError(f"{ckpt}: no universal copy of {tag}; call ds_config_patch first")
        path, _ = engine.load_checkpoint(str(ckpt), tag=tag + (UNIVERSAL_SUFFIX if universal else ""),
                                         load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load engine {tag} from {ckpt}")
    missing, unexpected = safetensors.torch.load_model(ema, str(ckpt / EMA), strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{ckpt / EMA} does not fit the EMA module: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    if not universal:
        _set_rng_state(torch.load(ckpt / "rng" / f"rank-{dist.rank():05d}.pt", weights_only=True))
    state = read_state(ckpt)
    dist.barrier()
    return state


# --------------------------------------------------------------------------------------------------
# Export (one process)
# --------------------------------------------------------------------------------------------------


def export(ckpt_or_run: str, out: Path | None = None, *, checkpoint: str = "",
           storage: StorageConfig | None = None) -> Path:
    """Write the EMA generator of a checkpoint as `generator_ema.safetensors` + `model_config.json`
    (the recipe's model and diffusion sections) into `out` (default: RUN_DIR/export/). Returns `out`.

    ckpt_or_run: a run folder, a checkpoints folder, a checkpoint folder, or an s3:// URL of a checkpoint
    or of a checkpoints root (then `out` is required). checkpoint: pick a step (e.g. "step-000001000" or
    "1000") instead of the newest complete one.
    """
    import tempfile

    source: Path
    if _is_url(ckpt_or_run):
        if out is None:
            raise CheckpointError("export from a URL needs out=PATH")
        url = ckpt_or_run.rstrip("/")
        if checkpoint:
            url = f"{url}/{_pick_name(checkpoint)}"
        url = _resolve_remote(url, storage)
        tmpdir = Path(tempfile.mkdtemp(prefix="waveforge-export-"))
        try:
            part = download(url, tmpdir, storage, files=[EMA, STATE])
            return _write_export(part, Path(out), source=url)
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)
    path = Path(wstorage.local_path(ckpt_or_run))
    if checkpoint:
        base = path if path.name == "checkpoints" else ckpt_root(path)
        path = base / _pick_name(checkpoint)
    source = _resolve_local(path)
    run_dir = source.parent.parent
    return _write_export(source, Path(out) if out is not None else run_dir / "export", source=str(source))


def _pick_name(checkpoint: str) -> str:
    if checkpoint.isdigit():
        return step_name(int(checkpoint))
    if _step_of(checkpoint) is None:
        raise CheckpointError(f"checkpoint={checkpoint!r}: expected a step number or a step-NNNNNNNNN name")
    return checkpoint


def _write_export(ckpt: Path, out: Path, source: str) -> Path:
    m = read_manifest(ckpt)
    state = read_state(ckpt)
    recipe = state.get("recipe")
    if not isinstance(recipe, dict) or "model" not in recipe or "diffusion" not in recipe:
        raise CheckpointError(f"{ckpt / STATE}: no recipe with model and diffusion sections")
    tensors = safetensors.torch.load_file(str(ckpt / EMA))
    meta = {"source": source, "step": str(m["step"]), "images": str(m.get("images", 0))}
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".generator_ema.safetensors.tmp"
    safetensors.torch.save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, out / "generator_ema.safetensors")
    cfg = {"model": recipe["model"], "diffusion": recipe["diffusion"], "step": m["step"],
           "images": m.get("images", 0), "recipe": recipe.get("recipe", ""), "source": source,
           "code_version": state.get("code_version", "")}
    _write_atomic(out / "model_config.json", (json.dumps(cfg, indent=1) + "\n").encode())
    return out
