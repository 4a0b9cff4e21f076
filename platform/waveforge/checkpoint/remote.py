"""Checkpoints in object storage: upload (files, then the manifest, then `latest`) by a background Uploader
(a separate low-priority process with a bandwidth bound), download with verification, listing and pruning of
remote checkpoints."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

from waveforge import storage as wstorage
from waveforge.checkpoint.files import (
    LATEST,
    MANIFEST,
    CheckpointError,
    _digest_of,
    _hash_file,
    _step_of,
    read_manifest,
)
from waveforge.config import StorageConfig

log = logging.getLogger("waveforge.checkpoint")

CHUNK = 1 << 20  # bytes per write of a rate-limited copy: the bound is enforced at this grain
PART = 8 << 20  # S3 multipart part size of a rate-limited upload


class RateLimit:
    """At most `mb_s` MB (1e6 bytes) per second on average since the first byte (0 = unbounded)."""

    def __init__(self, mb_s: float) -> None:
        self.rate = mb_s * 1e6
        self.t0: float | None = None
        self.sent = 0

    def take(self, n: int) -> None:
        """Account for `n` bytes about to be sent; sleeps while the average would exceed the bound."""
        if self.rate <= 0:
            return
        now = time.monotonic()
        if self.t0 is None:
            self.t0 = now
        self.sent += n
        ahead = self.sent / self.rate - (now - self.t0)
        if ahead > 0:
            time.sleep(ahead)


def _copy(src: IO[bytes], dst: IO[bytes], limit: RateLimit) -> None:
    while chunk := src.read(CHUNK):
        limit.take(len(chunk))
        dst.write(chunk)


def put_file(local: Path, url: str, storage: StorageConfig | None = None, limit: RateLimit | None = None) -> None:
    """Copy the local file `local` to `url`, at the rate `limit` allows (None: unbounded), retried like
    waveforge.storage's helpers. A local destination is written to a temporary name and renamed; an S3
    object appears when its (multipart) upload completes."""
    if limit is None or limit.rate <= 0:
        wstorage.put_file(str(local), url, storage)
        return

    def put() -> None:
        with open(local, "rb") as src:
            if wstorage.is_local(url):
                path = wstorage.local_path(url)
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
                tmp = f"{path}.tmp{os.getpid()}"
                with open(tmp, "wb") as dst:
                    _copy(src, dst, limit)
                os.replace(tmp, path)
            else:
                fs, path = wstorage.filesystem(url, storage)
                with fs.open(path, "wb", block_size=PART) as dst:
                    _copy(src, dst, limit)

    wstorage.with_retries(put, url, "uploading to", scfg=storage)


def upload(ckpt: Path, url: str, storage: StorageConfig | None = None, mb_s: float = 0.0) -> str:
    """Copy the complete local checkpoint `ckpt` to `url/<its name>/`: files, then the manifest, then
    `url/latest`, at most `mb_s` MB/s on average (0 = unbounded). Returns the remote checkpoint URL.
    Transient errors are retried (waveforge.storage)."""
    m = read_manifest(ckpt)
    remote = wstorage.join(url, ckpt.name)
    limit = RateLimit(mb_s)
    for rel in m["files"]:
        put_file(ckpt / rel, wstorage.join(remote, rel), storage, limit)
    put_file(ckpt / MANIFEST, wstorage.join(remote, MANIFEST), storage, limit)
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
    verifying sizes and digests; published atomically like a save. `files`: only these (plus the manifest;
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
        got = _hash_file(tmp / rel, algo=_digest_of(m["files"][rel])[0])
        if got != m["files"][rel]:
            raise CheckpointError(f"{url}/{rel}: downloaded file differs from the manifest ({got} vs "
                                  f"{m['files'][rel]})")
    (tmp / MANIFEST).write_bytes(manifest_bytes)
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    return final


class Uploader:
    """Uploads published checkpoints to `url`, in order, in a separate process (rank 0 only).

    The process (`python -m waveforge.checkpoint.upload_worker`) runs at CPU priority `nice` (19 = the
    lowest) and the lowest best-effort I/O priority, dies with the trainer, and copies at most `mb_s` MB/s
    on average (0 = unbounded); it gets the storage
    settings, credentials included, through a pipe (never its command line or a file). One thread of
    this process feeds it and reads its results. Each checkpoint: files, then the manifest, then
    `url/latest`; then remote checkpoints beyond `keep_last` (milestones kept) are deleted when keep_last
    > 0. Failures are retried with exponential backoff, then logged loudly (stderr + logging) and counted
    in `errors` (`failed` names them); a dead upload process fails the checkpoint it was copying (counted
    the same way) and is started again for the next one. Never dropped silently. `wait()` blocks until
    the queue is empty and returns the number of failed uploads; `cpu_s` is the upload process's CPU
    seconds (all its runs, start-ups included: `startup_cpu_s`), `uploaded_bytes` what it copied.
    """

    def __init__(self, url: str, storage: StorageConfig | None = None, *, keep_last: int = 0, retries: int = 5,
                 backoff_s: float = 1.0, mb_s: float = 0.0, nice: int = 19) -> None:
        if not url:
            raise ValueError("Uploader needs a url")
        self.url = url.rstrip("/")
        self.storage = storage
        self.keep_last = keep_last
        self.retries = retries
        self.backoff_s = backoff_s
        self.mb_s = mb_s
        self.nice = nice
        self.errors = 0
        self.failed: list[str] = []
        self.uploaded: list[str] = []
        self.cpu_s = 0.0
        self.uploaded_bytes = 0
        self.pid: int | None = None  # the upload process's, while it runs
        self._cpu_done = 0.0  # CPU seconds of upload processes that ended
        self._queue: queue.Queue[Path | None] = queue.Queue()
        self._pending: set[str] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._proc: subprocess.Popen[str] | None = None
        self._results: IO[str] | None = None
        self.startup_cpu_s = 0.0  # CPU seconds the upload processes spent starting (imports), part of cpu_s

    def submit(self, ckpt: Path) -> None:
        """Queue a published local checkpoint for upload (returns at once)."""
        with self._lock:
            self._pending.add(ckpt.name)
            if self._thread is None or not self._thread.is_alive():
                # A long-lived thread starts the process: its death signal follows the thread that forked it.
                self._thread = threading.Thread(target=self._work, name="checkpoint-upload", daemon=True)
                self._thread.start()
        self._queue.put(ckpt)

    def pending(self) -> set[str]:
        """Names of checkpoints queued or uploading (the local pruning keeps them)."""
        with self._lock:
            return set(self._pending)

    def _start(self) -> subprocess.Popen[str]:
        """A new upload process; its results come back through a pipe of their own (its stdout and stderr
        are this process's: retries and library messages land in the job's log)."""
        package_root = str(Path(__file__).resolve().parents[2])  # the folder that holds waveforge/
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [package_root, *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]])}
        r, w = os.pipe()
        try:
            proc = subprocess.Popen([sys.executable, "-m", "waveforge.checkpoint.upload_worker"],
                                    stdin=subprocess.PIPE, text=True, env=env, pass_fds=(w,))
        finally:
            os.close(w)
        self._results = os.fdopen(r, "r")
        settings = {"url": self.url, "storage": dataclasses.asdict(self.storage or StorageConfig()),
                    "keep_last": self.keep_last, "retries": self.retries, "backoff_s": self.backoff_s,
                    "mb_s": self.mb_s, "nice": self.nice, "results_fd": w}
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(settings) + "\n")
        proc.stdin.flush()
        self.pid = proc.pid
        ready = self._results.readline()  # {"ready": true, "cpu_s": its start-up's CPU seconds}
        if ready:
            self.startup_cpu_s += float(json.loads(ready)["cpu_s"])
        return proc

    def _ask(self, ckpt: Path) -> dict[str, Any]:
        """The upload process's answer for `ckpt` (a failure when it died)."""
        if self._proc is None or self._proc.poll() is not None:
            self._proc = self._start()
        proc = self._proc
        assert proc.stdin is not None and self._results is not None
        try:
            proc.stdin.write(json.dumps({"ckpt": str(ckpt)}) + "\n")
            proc.stdin.flush()
            line = self._results.readline()
        except OSError:
            line = ""
        if line:
            return json.loads(line)
        code = proc.wait()
        self._results.close()
        self._proc, self._results, self.pid, self._cpu_done = None, None, None, self.cpu_s
        return {"name": ckpt.name, "ok": False, "error": f"the upload process ended (exit code {code})"}

    def _work(self) -> None:
        while True:
            ckpt = self._queue.get()
            if ckpt is None:
                self._queue.task_done()
                return
            try:
                result = self._ask(ckpt)
                if "cpu_s" in result:
                    self.cpu_s = self._cpu_done + float(result["cpu_s"])
                if not result["ok"]:
                    raise CheckpointError(result["error"])
                self.uploaded_bytes += sum(f["size"] for f in read_manifest(ckpt)["files"].values())
                self.uploaded.append(result["remote"])
                log.info("checkpoint uploaded: %s (%.1f s)", result["remote"], result["seconds"])
            except Exception as e:  # noqa: BLE001 - reported loudly and counted, training goes on
                with self._lock:
                    self.errors += 1
                    self.failed.append(ckpt.name)
                msg = (f"CHECKPOINT UPLOAD FAILED: {ckpt} -> {self.url}/{ckpt.name}: {e} "
                       f"(the local copy is intact; {self.errors} failed upload(s) so far)")
                log.error(msg)
                print(msg, file=sys.stderr, flush=True)
            finally:
                with self._lock:
                    self._pending.discard(ckpt.name)
                self._queue.task_done()

    def wait(self) -> int:
        """Block until every queued upload is done; return the number of failed uploads so far."""
        self._queue.join()
        return self.errors

    def close(self) -> int:
        """Wait for the queued uploads, then end the upload process; the number of failed uploads."""
        errors = self.wait()
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        if self._proc is not None:
            if self._proc.stdin is not None:
                self._proc.stdin.close()
            self._proc.wait()
            self._proc = None
        if self._results is not None:
            self._results.close()
            self._results = None
        return errors
