"""A checkpoint's files: names, the manifest, hashing and verification, leftovers, RNG states, the state's
plain-data rule. Everything else in waveforge.checkpoint builds on these."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import blake3
import numpy as np
import torch

from waveforge import dist
from waveforge import storage as wstorage
from waveforge.config import UserError

MANIFEST = "manifest.json"
LATEST = "latest"
STATE = "state.pt"
EMA = "ema.safetensors"
FORMAT = "waveforge-checkpoint"
VERSION = 2  # 2: files hashed with BLAKE3; version-1 manifests (sha256) are still read and verified
READABLE_VERSIONS = (1, 2)
DIGEST = "blake3"  # the hash of every file of a new manifest (2.2x sha256's speed on the 2-core VM)
_HASHES: dict[str, Callable[[], Any]] = {"blake3": blake3.blake3, "sha256": hashlib.sha256}
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


def new_hasher(algo: str = DIGEST) -> Any:
    """A fresh hash object of `algo` (update/hexdigest; releases the GIL on large chunks)."""
    return _HASHES[algo]()


def _digest_of(entry: dict[str, Any]) -> tuple[str, str]:
    """(algorithm, hex digest) of a manifest's file entry: blake3 (version 2) or sha256 (version 1)."""
    for algo in _HASHES:
        if algo in entry:
            return algo, entry[algo]
    raise CheckpointError(f"a manifest entry without a digest: {entry}")


def _hash_file(path: Path, fsync: bool = True, algo: str = DIGEST) -> dict[str, Any]:
    """Size and `algo` digest of a file (its manifest entry); with fsync, also flushed to disk (a checkpoint
    must be on disk before it is published). Both hashes release the GIL: threads hash files in parallel."""
    h = new_hasher(algo)
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
        if fsync:
            os.fsync(f.fileno())
    return {"size": path.stat().st_size, algo: h.hexdigest()}


def _threads() -> int:
    """Hashing threads per process: the cores it may run on (Slurm's CPU binding counts), at most 4."""
    return max(1, min(4, len(os.sched_getaffinity(0))))


class _FileCheck:
    """One file against its manifest entry, hashed in pieces: any thread may continue it where another left
    off (one thread at a time), so a background check can hand its unfinished files to the foreground."""

    PIECE = 1 << 20  # small: a low-priority thread asked to stop is never long inside a piece

    def __init__(self, ckpt: Path, rel: str, want: dict[str, Any]) -> None:
        self.rel, self.path, self.size = rel, Path(ckpt) / rel, int(want["size"])
        self.algo, self.digest = _digest_of(want)
        self.hasher, self.pos, self.done, self.problem = new_hasher(self.algo), 0, False, ""

    def run(self, stop: threading.Event | None = None) -> None:
        """Hash on from where the last call stopped, to the end or until `stop` is set."""
        try:
            if self.pos == 0 and not self.path.is_file():
                self.problem, self.done = f"{self.rel}: missing", True
                return
            if self.pos == 0 and self.path.stat().st_size != self.size:
                self.problem = f"{self.rel}: size {self.path.stat().st_size}, manifest says {self.size}"
                self.done = True
                return
            with open(self.path, "rb") as f:
                f.seek(self.pos)
                while not (stop is not None and stop.is_set()):
                    piece = f.read(self.PIECE)
                    if not piece:
                        got = self.hasher.hexdigest()
                        if got != self.digest:
                            self.problem = f"{self.rel}: {self.algo} {got[:12]}..., manifest says {self.digest[:12]}..."
                        self.done = True
                        return
                    self.hasher.update(piece)
                    self.pos += len(piece)
        except OSError as e:
            self.problem, self.done = f"{self.rel}: cannot be read ({type(e).__name__}: {e})", True


def _checks(ckpt: Path, m: dict[str, Any], names: list[str] | None) -> tuple[list[_FileCheck], list[str]]:
    """The checks of `names` (all files of manifest `m` when None), biggest first (the threads end together),
    and the names the manifest does not list."""
    names = sorted(m["files"]) if names is None else names
    unknown = [f"{rel}: not in the manifest" for rel in names if rel not in m["files"]]
    known = sorted((rel for rel in names if rel in m["files"]), key=lambda rel: -m["files"][rel]["size"])
    return [_FileCheck(ckpt, rel, m["files"][rel]) for rel in known], unknown


def _finish(checks: list[_FileCheck], threads: int = 0) -> list[str]:
    """Run the unfinished `checks` to their end in threads of this priority; their problems, by name."""
    todo = [c for c in checks if not c.done]
    if todo:
        with ThreadPoolExecutor(min(len(todo), threads or _threads())) as pool:
            list(pool.map(lambda c: c.run(), todo))
    return [c.problem for c in sorted(checks, key=lambda c: c.rel) if c.problem]


def verify_files(ckpt: Path, names: list[str] | None = None, threads: int = 0) -> list[str]:
    """What differs between the files of `ckpt` (or `names` of them) and its manifest: one line per file
    ("rel: missing", "rel: size S, manifest says M", "rel: blake3 abc..., manifest says def..."); [] when all
    match. In this process only (threads hash in parallel); see `verify` for the collective check."""
    checks, unknown = _checks(ckpt, read_manifest(ckpt), names)
    return unknown or _finish(checks, threads)


def _lowest_priority() -> None:
    """The calling thread yields the CPU to anything else of this machine (nice 19 on Linux, where a thread
    has its own; best effort). The trainer's model building, whose OpenMP threads spin while a sibling
    waits for a core, is slowed several-fold by hashing threads of equal priority on a busy machine."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (OSError, AttributeError):
        pass


class Verification:
    """A check of `ckpt` against its manifest that starts at once, in low-priority background threads (this
    rank's share of the files, as `verify` splits them: no collective there), so that a trainer hashes a big
    checkpoint on CPU time its model building leaves; `result` (COLLECTIVE) takes the unfinished files over
    at full priority and says what `verify` says. Raises CheckpointError at once when the manifest is
    unreadable (the same on every rank: they read one file)."""

    def __init__(self, ckpt: Path, names: list[str] | None = None, background: bool = True) -> None:
        self.ckpt = Path(ckpt)
        self._t0 = time.perf_counter()
        m = read_manifest(self.ckpt)
        share = (sorted(m["files"]) if names is None else sorted(names))[dist.rank()::dist.world()]
        self._checks, self._unknown = _checks(self.ckpt, m, share)
        self._stop = threading.Event()
        self._queue = list(self._checks)
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._background, daemon=True, name="checkpoint-verify")
                         for _ in range(min(len(self._checks), _threads()) if background else 0)]
        for t in self._threads:
            t.start()

    def _background(self) -> None:
        _lowest_priority()
        while not self._stop.is_set():
            with self._lock:
                if not self._queue:
                    return
                check = self._queue.pop(0)
            check.run(self._stop)

    def result(self) -> tuple[float, float]:
        """COLLECTIVE: finish this rank's share (the background threads stop after their current piece; what
        they left is hashed here at full priority), then every rank's; raise CheckpointError on every rank
        naming what differs. Returns (the seconds the check took, the seconds `result` took), the slowest
        rank's each: the second is what the check added to the caller's time."""
        t0 = time.perf_counter()
        self._stop.set()
        for t in self._threads:
            t.join()
        problems = self._unknown or _finish(self._checks)
        now = time.perf_counter()
        parts = dist.gather_object((problems, now - self._t0, now - t0))
        found = [p for part in parts for p in part[0]]
        if found:
            raise CheckpointError(f"{self.ckpt} does not match its manifest ({len(found)} file(s)): "
                                  f"{'; '.join(found[:4])}" + (" ..." if len(found) > 4 else ""))
        return max(part[1] for part in parts), max(part[2] for part in parts)


def verify(ckpt: Path, names: list[str] | None = None) -> float:
    """COLLECTIVE: every file of `ckpt` (or `names`) checked against the manifest's size and digest before
    any of it is loaded (DeepSpeed unpickles its shards: a file that does not verify is never opened by it).
    The files are split over the ranks, each hashing its share in threads. Raises CheckpointError on every
    rank naming what differs; returns the seconds it took (the slowest rank's). `Verification` starts the
    same check in the background."""
    return Verification(ckpt, names, background=False).result()[0]


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
    if m.get("format") != FORMAT or m.get("version") not in READABLE_VERSIONS:
        raise CheckpointError(f"{path}: not a {FORMAT} manifest of a version this code reads "
                              f"({', '.join(map(str, READABLE_VERSIONS))})")
    return m


def is_complete(ckpt: Path, hashes: bool = False) -> bool:
    """The manifest exists and every listed file has its size (and, with hashes=True, its digest)."""
    try:
        m = read_manifest(ckpt)
    except CheckpointError:
        return False
    if hashes:
        return not verify_files(ckpt)
    return all((Path(ckpt) / rel).is_file() and (Path(ckpt) / rel).stat().st_size == info["size"]
               for rel, info in m["files"].items())


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


def _delete_checkpoint(ckpt: Path, remove: Callable[[Path], Any] | None = None) -> None:
    """Remove a checkpoint folder atomically: renamed aside first (a `.tmp-` name: never half deleted, never
    listed, and removed with the leftovers if its removal is interrupted), then removed by `remove` (default:
    at once; e.g. a background thread's queue, since freeing the pages of large files takes a while)."""
    aside = ckpt.with_name(f".tmp-delete-{ckpt.name}-{os.getpid()}")
    os.rename(ckpt, aside)
    (remove or _rmtree)(aside)


def _rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


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
