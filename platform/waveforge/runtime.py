"""Where a process runs: distributed init from any launcher, the stop flag, the code version, free ports.

One training process per GPU (or per CPU task). The same `init_distributed()` works for
- one plain process (no launcher variables: a world of 1 on a free local port),
- torchrun / deepspeed launchers (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT),
- srun inside a Slurm allocation and submitit jobs (SLURM_PROCID, SLURM_NTASKS, ...: translated here).

Preemption: Slurm (through submitit) sends USR2 to global rank 0 only, and a signal handler cannot run a
collective checkpoint. `StopFlag` turns USR2/SIGTERM/SIGINT into a flag that the trainer ORs over all
ranks at the next step boundary (`dist.any_rank`), so every rank saves together and exits cleanly.

This module is the bottom of the platform: it imports only `waveforge.dist` (and DeepSpeed, lazily, to
initialise the process group).
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType

import torch

from waveforge import dist
from waveforge.config import ConfigError

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 now (the OS picks it; someone may take it before you bind)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_slurm_host(nodelist: str) -> str:
    """First host of a Slurm node list, via scontrol when available (handles n[1-4] forms)."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=30, check=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    head = nodelist.split(",")[0]
    if "[" in head:
        prefix, rng = head.split("[", 1)
        return prefix + rng.rstrip("]").split(",")[0].split("-")[0]
    return head


def export_env_from_launcher() -> None:
    """Fill torch's RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* from Slurm, or for a single process."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        env.setdefault("LOCAL_RANK", "0")
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(free_port()))
        return
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        env["RANK"] = env["SLURM_PROCID"]
        env["WORLD_SIZE"] = env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        env["LOCAL_WORLD_SIZE"] = env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0]
        env.setdefault("MASTER_ADDR", first_slurm_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1")))
        # stable across requeues of the same job: seeded by the job id
        env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
        return
    env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    env.setdefault("MASTER_PORT", str(free_port()))


def launched_world() -> int:
    """The number of ranks this process was launched with (1 for a plain process), before any init."""
    return int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))


def init_distributed(backend: str = "auto") -> torch.device:
    """Initialise torch.distributed (through DeepSpeed) for whatever launched us; return our device."""
    export_env_from_launcher()
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(dist.device())
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if not dist.is_initialized():
        import deepspeed

        if not torch.cuda.is_available() and int(os.environ["WORLD_SIZE"]) == 1:
            _without_shm_comm_op()
        deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(minutes=30), verbose=False)
    return dist.device()


def _without_shm_comm_op() -> None:
    """One CPU rank shares no memory with anyone: keep DeepSpeed from JIT-compiling its shared-memory
    all-reduce op (~77 s on 2 cores, the first time on every machine: most of the embedded default's start).
    DeepSpeed builds it only for ops its install marked compatible; this marks it not. The one place that
    touches `deepspeed.ops.__compatible_ops__` (tests/test_runtime.py fails if DeepSpeed stops honouring it)."""
    import deepspeed.ops

    compatible = getattr(deepspeed.ops, "__compatible_ops__", None)
    if isinstance(compatible, dict):
        compatible["deepspeed_shm_comm"] = False


def shutdown() -> None:
    """Destroy the process group (NCCL warns, and may leak, when a process exits with its group alive)."""
    if dist.is_initialized():
        dist.forget_control_group()
        torch.distributed.destroy_process_group()


class StopFlag:
    """Set by USR2 (submitit/Slurm preemption or time limit), SIGTERM or SIGINT; read at step boundaries."""

    def __init__(self) -> None:
        self.signals: set[int] = set()  # every signal received (Slurm preemption: SIGTERM, then USR2)
        self._previous: dict[int, object] = {}

    def install(self) -> StopFlag:
        for sig in (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signals.add(signum)
        print(f"[rank {dist.rank()}] received {signal.Signals(signum).name}: stopping at the next step boundary "
              "with a checkpoint", flush=True)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    @property
    def requested(self) -> bool:
        return bool(self.signals)

    @property
    def preempted(self) -> bool:
        """USR2 came: Slurm's preemption / time-limit warning (through submitit), so the job should requeue."""
        return signal.SIGUSR2 in self.signals


def code_version() -> str:
    """The git commit of the platform (with '+dirty' when the work tree has changes), or 'unknown'."""
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def platform_version() -> str:
    from waveforge import __version__

    return __version__


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask the kernel to send `sig` to this process when its parent dies (Linux prctl PR_SET_PDEATHSIG; a
    no-op elsewhere). A trainer whose launcher (torchrun, submitit's local controller, a shell) is killed
    then stops like on a preemption (SIGTERM: checkpoint at the next step, exit) instead of running on
    unseen beside the next run of the same folder."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(sig), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before the request: the signal would never come
        os.kill(os.getpid(), sig)


class RunLock:
    """One trainer per run folder: rank 0 holds `<run>/.trainer.lock` (host, pid, Slurm job id, start) for the
    life of a run. A second trainer of the same folder is refused (ConfigError naming the holder) while the
    holder lives: on the same host its pid (and start time) still run; on another host its Slurm job is
    still queued or running. A lock left by a killed trainer, or by an earlier attempt of this very Slurm
    job (a requeue), is taken over."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / ".trainer.lock"
        self.held = False

    def acquire(self) -> None:
        me = {"host": socket.gethostname(), "pid": os.getpid(), "job_id": os.environ.get("SLURM_JOB_ID", ""),
              "started": time.time(), "since": datetime.now(UTC).isoformat(timespec="seconds")}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read()
                if holder is not None and self._alive(holder, me):
                    job = f", Slurm job {holder['job_id']}" if holder.get("job_id") else ""
                    raise ConfigError(f"run folder {self.path.parent} is in use by another trainer: pid "
                                      f"{holder.get('pid')} on host {holder.get('host')}{job}, since "
                                      f"{holder.get('since')}; wait for it to end, or use another run.dir "
                                      f"(if it is gone for sure, delete {self.path})") from None
                self.path.unlink(missing_ok=True)  # stale: its trainer is gone
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return
        raise ConfigError(f"cannot take {self.path}: other trainers keep taking it")

    def _read(self) -> dict | None:
        for _ in range(3):
            try:
                return json.loads(self.path.read_text())
            except FileNotFoundError:
                return None
            except ValueError:  # being written right now
                time.sleep(0.2)
        return {}  # unreadable: treated as stale

    @staticmethod
    def _alive(holder: dict, me: dict) -> bool:
        if not holder:
            return False
        if holder.get("job_id") and holder["job_id"] == me["job_id"]:
            return False  # an earlier attempt of this job (requeued): it is over
        if holder.get("host") == me["host"]:
            try:
                import psutil

                proc = psutil.Process(int(holder["pid"]))
                return proc.create_time() <= float(holder.get("started", 0)) + 1.0  # not a reused pid
            except Exception:  # noqa: BLE001 - no such process (or not ours to see): gone
                return False
        if holder.get("job_id") and shutil.which("squeue"):
            r = subprocess.run(["squeue", "-h", "-j", str(holder["job_id"]), "-o", "%T"], capture_output=True,
                               text=True, timeout=30)
            return r.returncode == 0 and bool(r.stdout.strip())
        return True  # another host, no Slurm job to ask about: cannot tell, so do not take it

    def release(self) -> None:
        if self.held:
            holder = self._read()
            if holder and holder.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False
