"""The checkpoint upload process: `python -m waveforge.checkpoint.upload_worker`, started by `Uploader`.

It runs at a low CPU priority (nice 19 by default) and the lowest best-effort I/O priority, dies with the
trainer (the parent), and copies checkpoints at a bounded rate (`waveforge.checkpoint.remote.upload`) so that
training keeps the machine.

Protocol (JSON lines): the first line on stdin is the settings {"url", "storage" (the StorageConfig's
fields: credentials come through this pipe, never the command line or a file), "keep_last", "retries",
"backoff_s", "mb_s", "nice", "results_fd"}; every further line is {"ckpt": "<local checkpoint folder>"}. On the
inherited pipe `results_fd` it answers {"ready": true, "cpu_s"} once started, then one line per checkpoint:
{"name", "ok": true, "remote", "seconds", "cpu_s"} or {"name", "ok": false, "error", "cpu_s"} (cpu_s: this
process's CPU seconds so far). It ends when stdin closes.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

from waveforge import runtime
from waveforge.checkpoint.remote import _prune_remote, upload
from waveforge.config import StorageConfig


def lower_priority(nice: int) -> list[str]:
    """This process at CPU priority `nice` (19 = the lowest; not SCHED_IDLE, under which a trainer that keeps
    every core busy would starve the upload for good) and the lowest best-effort I/O priority; returns what
    was applied."""
    done = []
    try:
        os.nice(max(0, nice - os.nice(0)))
        done.append(f"nice {os.nice(0)}")
    except OSError:
        pass
    nr = {"x86_64": 251, "aarch64": 30}.get(os.uname().machine) if sys.platform.startswith("linux") else None
    if nr is not None:  # ioprio_set(IOPRIO_WHO_PROCESS, this process, IOPRIO_CLASS_BE << 13 | 7)
        try:
            if ctypes.CDLL(None, use_errno=True).syscall(nr, 1, 0, 2 << 13 | 7) == 0:
                done.append("best-effort I/O level 7")
        except (OSError, AttributeError):
            pass
    return done


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def upload_with_retries(ckpt: Path, settings: dict[str, Any], scfg: StorageConfig) -> dict[str, Any]:
    """Upload `ckpt` (whole-checkpoint retries with exponential backoff on top of storage's own), then prune
    the remote checkpoints; the result line for the parent."""
    url, retries, backoff_s = settings["url"], int(settings["retries"]), float(settings["backoff_s"])
    t0 = time.perf_counter()
    for attempt in range(retries + 1):
        try:
            remote = upload(ckpt, url, scfg, mb_s=float(settings["mb_s"]))
            if int(settings["keep_last"]) > 0:
                _prune_remote(url, scfg, int(settings["keep_last"]))
            return {"name": ckpt.name, "ok": True, "remote": remote, "seconds": time.perf_counter() - t0}
        except Exception as e:  # noqa: BLE001 - reported to the parent, which counts and reports it loudly
            if attempt == retries:
                return {"name": ckpt.name, "ok": False, "error": f"{type(e).__name__}: {e}"}
            wait = backoff_s * 2 ** attempt
            print(f"checkpoint upload of {ckpt.name} failed ({type(e).__name__}: {e}); attempt {attempt + 2}/"
                  f"{retries + 1} in {wait:.0f} s", file=sys.stderr, flush=True)
            time.sleep(wait)
    raise AssertionError("unreachable")


def main() -> None:
    runtime.die_with_parent()
    settings = json.loads(sys.stdin.readline())
    lower_priority(int(settings.get("nice", 19)))
    scfg = StorageConfig(**settings["storage"])
    results = os.fdopen(int(settings["results_fd"]), "w")
    results.write(json.dumps({"ready": True, "cpu_s": _cpu_s()}) + "\n")
    results.flush()
    for line in sys.stdin:
        if not line.strip():
            continue
        result = upload_with_retries(Path(json.loads(line)["ckpt"]), settings, scfg)
        result["cpu_s"] = _cpu_s()
        results.write(json.dumps(result) + "\n")
        results.flush()


if __name__ == "__main__":
    main()
