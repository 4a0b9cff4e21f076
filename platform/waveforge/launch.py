"""Where a process runs: distributed init from any launcher, the stop flag, code version.

One training process per GPU (or per CPU task). The same `init_distributed()` works for
- one plain process (no launcher variables: a world of 1 on a free local port),
- torchrun / deepspeed launchers (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT),
- srun inside a Slurm allocation and submitit jobs (SLURM_PROCID, SLURM_NTASKS, ...: translated here).

Preemption: Slurm (through submitit) sends USR2 to global rank 0 only, and a signal handler cannot run a
collective checkpoint. `StopFlag` turns USR2/SIGTERM/SIGINT into a flag that the trainer ORs over all
ranks at the next step boundary (`dist.any_rank`), so every rank saves together and exits cleanly.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from datetime import timedelta
from pathlib import Path
from types import FrameType
from typing import Any

import torch

from waveforge import config, dist

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _first_slurm_host(nodelist: str) -> str:
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
        env.setdefault("MASTER_PORT", str(_free_port()))
        return
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        env["RANK"] = env["SLURM_PROCID"]
        env["WORLD_SIZE"] = env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        env["LOCAL_WORLD_SIZE"] = env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0]
        env.setdefault("MASTER_ADDR", _first_slurm_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1")))
        # stable across requeues of the same job: seeded by the job id
        env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
        return
    env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    env.setdefault("MASTER_PORT", str(_free_port()))


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

        deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(minutes=30), verbose=False)
    return dist.device()


def shutdown() -> None:
    if dist.is_initialized():
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


# --------------------------------------------------------------------------------------------------
# Submission through submitit: Slurm, or local processes (the embedded default)
# --------------------------------------------------------------------------------------------------

JOBS = ("train", "evaluate", "sample")


def backend_of(cfg_backend: str) -> str:
    """auto -> slurm when sbatch is on PATH, else local processes."""
    import shutil

    if cfg_backend != "auto":
        return cfg_backend
    return "slurm" if shutil.which("sbatch") else "local"


def slurm_parameters(cfg: Any, job: str = "train") -> dict[str, Any]:
    """submitit's Slurm parameters for the recipe's resources: one task per GPU (tasks_per_node on CPU)."""
    c = cfg.cluster
    tasks = c.tasks_per_node or c.gpus_per_node
    params: dict[str, Any] = {
        "job_name": f"wf-{job}-{cfg.recipe}-{cfg.run.name}",
        "nodes": c.nodes,
        "ntasks_per_node": tasks,
        "cpus_per_task": c.cpus_per_task,
        "time": config.time_limit_minutes(c.time),
        "signal_delay_s": c.signal_delay_s,
        "stderr_to_stdout": True,
    }
    if c.gpus_per_node and not c.tasks_per_node:
        params["gpus_per_task"] = 1  # one GPU per task (rank); gpus_per_node tasks per node
    for key in ("partition", "account", "qos", "constraint", "exclude", "mem"):
        if getattr(c, key):
            params[key] = getattr(c, key)
    params["additional_parameters"] = {"requeue": True}
    # A task that exits non-zero ends the whole step: otherwise the other ranks wait for it in the rendezvous
    # or in their next collective until the 30-minute timeout, holding every GPU of the job. A stopped task
    # exits non-zero only after the collective checkpoint, when the others have nothing left to do.
    params["srun_args"] = ["--kill-on-bad-exit=1"]
    return params


def submitit_command(folder: Path) -> str:
    """The command submitit runs in every task (the same string its SlurmExecutor writes)."""
    import shlex
    import sys

    return " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])


def sbatch_script(cfg: Any, job: str = "train") -> str:
    """The full sbatch script `submit` would use (for --dry-run), without needing a cluster."""
    from submitit.slurm import slurm

    folder = log_folder(run_folder(cfg))
    return slurm._make_sbatch_string(command=submitit_command(folder), folder=folder, **slurm_parameters(cfg, job))


def run_folder(cfg: Any) -> Path:
    from datetime import UTC, datetime

    if not cfg.run.name:
        cfg.run.name = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    if not cfg.run.dir:
        cfg.run.dir = str(Path("runs") / cfg.recipe / cfg.run.name)
    cfg.run.dir = str(Path(cfg.run.dir).absolute())
    return Path(cfg.run.dir)


def log_folder(run_dir: Path) -> Path:
    return run_dir / "logs"


class Task:
    """What every submitted task runs (picklable): set up torch's environment from submitit/Slurm, run the
    job, and after a USR2-triggered collective checkpoint let rank 0 requeue the job."""

    def __init__(self, cfg: Any, job: str = "train", job_args: dict[str, Any] | None = None) -> None:
        self.cfg = cfg
        self.job = job
        self.job_args = job_args or {}

    def __call__(self) -> str:
        import submitit

        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        if self.job == "train":
            if self.cfg.data.num_workers:
                from waveforge.data import start_worker_server

                start_worker_server()  # as jobs/train.py does: the workers' server imports while we do
            from waveforge import train

            stop = StopFlag()
            status = train.main(self.cfg, stop)
            preempted = dist.any_rank(signal.SIGUSR2 in stop.signals)
            requeued = status == "stopped" and preempted and _requeue(self.cfg)
            shutdown()
            # Stopped by a signal under Slurm (our own requeue, or Slurm's: scontrol requeue, preemption, time
            # limit, scancel): exit without a result, as submitit does, so that no client mistakes this attempt
            # for the job's end; a requeued attempt resumes from the checkpoint just written.
            if requeued or (status == "stopped" and os.environ.get("SLURM_JOB_ID")):
                raise SystemExit(-1)
            return status
        if self.job == "evaluate":
            from waveforge import evaluate

            return str(evaluate.run_job(self.cfg, **self.job_args))
        if self.job == "sample":
            from waveforge import sampling

            return str(sampling.run_job(self.cfg, **self.job_args))
        raise ValueError(f"unknown job {self.job!r}: one of {', '.join(JOBS)}")


class JobFailed(RuntimeError):
    """A submitted job ended with a failed task (the message names it and quotes its error)."""


def failed_task(handle: Any) -> str | None:
    """A task of the submitit job `handle` that has already failed, as 'task I failed: <last line of its
    error> (log: PATH)', or None. Read from the tasks' result files, which submitit writes (atomically) when a
    task ends; a task still running, or one that ended without a result (stopped for a requeue), is not one."""
    import pickle

    tasks = [handle.task(i) for i in range(handle.num_tasks)] if handle.num_tasks > 1 else [handle]
    for i, task in enumerate(tasks):
        try:
            with open(task.paths.result_pickle, "rb") as f:
                outcome, payload = pickle.load(f)
        except Exception:  # noqa: BLE001 - no result (yet), or a result this process cannot unpickle
            continue
        if outcome == "error":
            lines = [x for x in str(payload).strip().splitlines() if x.strip()]
            return f"task {i} failed: {lines[-1].strip() if lines else 'no traceback'} (log: {task.paths.stdout})"
    return None


def follow(handle: Any, poll_s: float = 2.0, out: Any = None) -> list[Any]:
    """Stream rank 0's log of a submitit job to `out` (stdout) until the job ends; return every task's result.

    When a task fails while others still run (a rank that died before the rendezvous or in rank-0-only work
    leaves the others waiting for it until the 30-minute timeout), the job is cancelled at once and JobFailed
    names the task. Under Slurm `--kill-on-bad-exit` already ends the step; this also covers local jobs."""
    import sys
    import time

    out = out or sys.stdout
    pos, failure, cancelled_at = 0, None, 0.0
    while True:
        done = handle.done()
        path = handle.paths.stdout
        if path.exists():
            with open(path, errors="replace") as f:
                f.seek(pos)
                chunk = f.read()
                pos = f.tell()
            if chunk:
                print(chunk, end="", file=out, flush=True)
        if done:
            break
        if failure is None:
            failure = failed_task(handle)
            if failure is not None:
                print(f"task {failure.split()[1]} failed: stopping the other tasks", file=out, flush=True)
                _cancel(handle)
                cancelled_at = time.monotonic()
        elif time.monotonic() - cancelled_at > 60:
            break  # cancelled a minute ago and still not reported done: report the failure anyway
        time.sleep(poll_s)
    failure = failed_task(handle) or failure
    if failure is not None:
        raise JobFailed(f"job {handle.job_id}: {failure}")
    try:
        return handle.results()
    except Exception as e:  # a task ended without a result (killed, out of memory, ...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise JobFailed(f"job {handle.job_id} failed: {first}") from None


def _cancel(handle: Any) -> None:
    """End a job whose task failed. A local job's tasks are killed directly: the submitit controller then sees
    them exit and returns (cancelling the controller itself ends it with a KeyboardInterrupt traceback)."""
    import psutil

    controller = getattr(handle, "_process", None)  # a LocalJob's controller process (None under Slurm)
    if controller is not None:
        try:
            tasks = psutil.Process(controller.pid).children()
        except psutil.NoSuchProcess:
            tasks = []
        for task in tasks:
            try:
                task.kill()  # SIGKILL: SIGINT/SIGTERM only set the stop flag, which a rank in a rendezvous never reads
            except psutil.NoSuchProcess:
                pass
        if tasks:
            return
    handle.cancel(check=False)


def _requeue(cfg: Any) -> bool:
    """Rank 0 requeues this Slurm job (after every rank has saved), at most cluster.max_requeue times.
    Returns on every rank whether the job was requeued."""
    import json

    requeued = False
    if dist.rank() == 0:
        job_id = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
        count_file = Path(cfg.run.dir) / "requeues.json"
        count = json.loads(count_file.read_text())["count"] if count_file.exists() else 0
        if not job_id:
            print("stopped with a checkpoint; not a Slurm job, so nothing to requeue", flush=True)
        elif count >= cfg.cluster.max_requeue:
            print(f"stopped with a checkpoint; not requeued: cluster.max_requeue={cfg.cluster.max_requeue} reached",
                  flush=True)
        else:
            count_file.write_text(json.dumps({"count": count + 1}))
            print(f"requeueing Slurm job {job_id} (requeue {count + 1}/{cfg.cluster.max_requeue})", flush=True)
            r = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
            requeued = r.returncode == 0
            if not requeued:
                print(f"scontrol requeue {job_id} failed: {r.stderr.strip()}", flush=True)
    return bool(dist.broadcast_object(requeued))


def submit(cfg: Any, job: str = "train", job_args: dict[str, Any] | None = None) -> Any:
    """Submit `job` for `cfg` (validated) through submitit; returns the submitit Job."""
    import submitit

    run_dir = run_folder(cfg)
    config.check_resources(cfg, config.world_size(cfg))
    backend = backend_of(cfg.cluster.backend)
    run_dir.mkdir(parents=True, exist_ok=True)
    config.save(cfg, run_dir / "recipe.yaml")
    (run_dir / "code_version.txt").write_text(code_version() + "\n")
    folder = log_folder(run_dir)
    if backend == "slurm":
        executor: Any = submitit.SlurmExecutor(folder=folder, max_num_timeout=cfg.cluster.max_requeue)
        executor.update_parameters(**slurm_parameters(cfg, job))
    else:
        executor = submitit.LocalExecutor(folder=folder, max_num_timeout=cfg.cluster.max_requeue)
        executor.update_parameters(nodes=1, tasks_per_node=config.world_size(cfg),
                                   timeout_min=config.time_limit_minutes(cfg.cluster.time))
        # The local tasks inherit this process's environment. Without MASTER_PORT, submitit derives the port
        # from the job id (a pid here) without checking it: a port some other socket holds fails rank 0's
        # rendezvous with EADDRINUSE. A port free now is taken by rank 0 seconds later.
        previous = os.environ.get("MASTER_PORT")
        os.environ["MASTER_PORT"] = str(_free_port())
        try:
            return executor.submit(Task(cfg, job, job_args))
        finally:
            if previous is None:
                del os.environ["MASTER_PORT"]
            else:
                os.environ["MASTER_PORT"] = previous
    return executor.submit(Task(cfg, job, job_args))
