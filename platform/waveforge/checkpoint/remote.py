"""Checkpoints in object storage: upload (files, then the manifest, then `latest`) by a background Uploader,
download with verification, listing and pruning of remote checkpoints."""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import sys
import threading
import time
from pathlib import Path

from waveforge import storage as wstorage
from waveforge.checkpoint.files import LATEST, MANIFEST, CheckpointError, _hash_file, _step_of, read_manifest
from waveforge.config import StorageConfig

log = logging.getLogger("waveforge.checkpoint")

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

