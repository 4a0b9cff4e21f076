"""Job dispatch: a train / evaluate / sample job submitted to Slurm through submitit (one task per GPU), or run
as local processes (the embedded default); following a job; requeue after preemption.

    handle = submit(cfg, "train")     # the run folder, recipe.yaml and logs/ are written first
    follow(handle)                    # stream rank 0's log until the job ends; a failed task cancels the rest

Every submitted task runs `Task`: it derives torch's distributed environment from Slurm (or the local
executor), runs the job (`waveforge.train.main`, `waveforge.jobs.evaluate`, `waveforge.jobs.sample`), and
after a USR2-triggered collective checkpoint lets rank 0 requeue the job.
"""

from __future__ import annotations

import json
import os
import pickle
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from waveforge import config, dist, jobs, runtime, train
from waveforge.config import Recipe
from waveforge.data.workers import start_worker_server

JOBS = ("train", "evaluate", "sample")


def backend_of(cfg_backend: str) -> str:
    """auto -> slurm when sbatch is on PATH, else local processes."""
    if cfg_backend != "auto":
        return cfg_backend
    return "slurm" if shutil.which("sbatch") else "local"


def slurm_parameters(cfg: Recipe, job: str = "train") -> dict[str, Any]:
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


def log_folder(run_dir: Path) -> Path:
    return run_dir / "logs"


def submitit_command(folder: Path) -> str:
    """The command submitit runs in every task (the same string its SlurmExecutor writes)."""
    return " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])


def sbatch_script(cfg: Recipe, job: str = "train") -> str:
    """The full sbatch script `submit` would use (for --dry-run), without needing a cluster.

    submitit has no public call for the script text; this is the one place that uses its private
    `_make_sbatch_string` (tests/test_submit.py's dry-run test fails loudly if submitit changes it)."""
    from submitit.slurm import slurm

    make = getattr(slurm, "_make_sbatch_string", None)
    if make is None:
        import submitit

        raise RuntimeError(f"submitit {submitit.__version__} has no slurm._make_sbatch_string: --dry-run cannot show "
                           "the sbatch script with this version (pyproject.toml pins the one it was written for)")
    return make(command=submitit_command(log_folder(Path(cfg.run.dir))), folder=log_folder(Path(cfg.run.dir)),
                **slurm_parameters(cfg, job))


class Task:
    """What every submitted task runs (picklable): set up torch's environment from submitit/Slurm, run the
    job, and after a USR2-triggered collective checkpoint let rank 0 requeue the job."""

    def __init__(self, cfg: Recipe, job: str = "train", job_args: dict[str, Any] | None = None) -> None:
        if job not in JOBS:
            raise ValueError(f"unknown job {job!r}: one of {', '.join(JOBS)}")
        self.cfg = cfg
        self.job = job
        self.job_args = job_args or {}

    def __call__(self) -> str:
        import submitit

        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        if self.job == "evaluate":
            return str(jobs.evaluate(self.cfg, **self.job_args))
        if self.job == "sample":
            return str(jobs.sample(self.cfg, **self.job_args))
        if self.cfg.data.num_workers:
            start_worker_server()  # as jobs/train.py does: the workers' server imports while we do
        stop = runtime.StopFlag()
        status = train.main(self.cfg, stop)
        requeued = status == "stopped" and dist.any_rank(stop.preempted) and _requeue(self.cfg)
        runtime.shutdown()
        # Stopped by a signal under Slurm (our own requeue, or Slurm's: scontrol requeue, preemption, time
        # limit, scancel): exit without a result, as submitit does, so that no client mistakes this attempt
        # for the job's end; a requeued attempt resumes from the checkpoint just written.
        if requeued or (status == "stopped" and os.environ.get("SLURM_JOB_ID")):
            raise SystemExit(-1)
        return status


def _requeue(cfg: Recipe) -> bool:
    """COLLECTIVE: rank 0 requeues this Slurm job (after every rank has saved), at most cluster.max_requeue
    times. Returns on every rank whether the job was requeued."""

    def requeue() -> bool:
        job_id = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
        count_file = Path(cfg.run.dir) / "requeues.json"
        count = json.loads(count_file.read_text())["count"] if count_file.exists() else 0
        if not job_id:
            print("stopped with a checkpoint; not a Slurm job, so nothing to requeue", flush=True)
            return False
        if count >= cfg.cluster.max_requeue:
            print(f"stopped with a checkpoint; not requeued: cluster.max_requeue={cfg.cluster.max_requeue} reached",
                  flush=True)
            return False
        count_file.write_text(json.dumps({"count": count + 1}))
        print(f"requeueing Slurm job {job_id} (requeue {count + 1}/{cfg.cluster.max_requeue})", flush=True)
        r = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            print(f"scontrol requeue {job_id} failed: {r.stderr.strip()}", flush=True)
        return r.returncode == 0

    return bool(dist.on_rank0(requeue))


# --------------------------------------------------------------------------------------------------
# Submitting and following
# --------------------------------------------------------------------------------------------------


def submit(cfg: Recipe, job: str = "train", job_args: dict[str, Any] | None = None) -> Any:
    """Submit `job` for `cfg` (validated; run.dir set, see config.with_run_folder) through submitit; returns
    the submitit Job. Writes the run folder's recipe.yaml and code version first."""
    import submitit

    run_dir = Path(cfg.run.dir)
    backend = backend_of(cfg.cluster.backend)
    run_dir.mkdir(parents=True, exist_ok=True)
    config.save(cfg, run_dir / "recipe.yaml")
    (run_dir / "code_version.txt").write_text(runtime.code_version() + "\n")
    folder = log_folder(run_dir)
    task = Task(cfg, job, job_args)
    if backend == "slurm":
        executor: Any = submitit.SlurmExecutor(folder=folder, max_num_timeout=cfg.cluster.max_requeue)
        executor.update_parameters(**slurm_parameters(cfg, job))
        return executor.submit(task)
    executor = submitit.LocalExecutor(folder=folder, max_num_timeout=cfg.cluster.max_requeue)
    executor.update_parameters(nodes=1, tasks_per_node=config.world_size(cfg),
                               timeout_min=config.time_limit_minutes(cfg.cluster.time))
    # The local tasks inherit this process's environment. Without MASTER_PORT, submitit derives the port
    # from the job id (a pid here) without checking it: a port some other socket holds fails rank 0's
    # rendezvous with EADDRINUSE. A port free now is taken by rank 0 seconds later.
    previous = os.environ.get("MASTER_PORT")
    os.environ["MASTER_PORT"] = str(runtime.free_port())
    try:
        return executor.submit(task)
    finally:
        if previous is None:
            del os.environ["MASTER_PORT"]
        else:
            os.environ["MASTER_PORT"] = previous


class JobFailed(RuntimeError):
    """A submitted job ended with a failed task (the message names it and quotes its error)."""

    def __init__(self, message: str, task: int | None = None) -> None:
        super().__init__(message)
        self.task = task


def failed_task(handle: Any) -> tuple[int, str] | None:
    """(index, 'task I failed: <last line of its error> (log: PATH)') of a task of the submitit job `handle`
    that has already failed, or None. Read from the tasks' result files, which submitit writes (atomically)
    when a task ends; a task still running, or one that ended without a result (stopped for a requeue), is
    not one."""
    tasks = [handle.task(i) for i in range(handle.num_tasks)] if handle.num_tasks > 1 else [handle]
    for i, task in enumerate(tasks):
        try:
            with open(task.paths.result_pickle, "rb") as f:
                outcome, payload = pickle.load(f)
        except Exception:  # noqa: BLE001 - no result (yet), or a result this process cannot unpickle
            continue
        if outcome == "error":
            lines = [x for x in str(payload).strip().splitlines() if x.strip()]
            last = lines[-1].strip() if lines else "no traceback"
            return i, f"task {i} failed: {last} (log: {task.paths.stdout})"
    return None


def follow(handle: Any, poll_s: float = 2.0, out: Any = None) -> list[Any]:
    """Stream rank 0's log of a submitit job to `out` (stdout) until the job ends; return every task's result.

    When a task fails while others still run (a rank that died before the rendezvous or in rank-0-only work
    leaves the others waiting for it until the 30-minute timeout), the job is cancelled at once and JobFailed
    names the task. Under Slurm `--kill-on-bad-exit` already ends the step; this also covers local jobs."""
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
                print(f"task {failure[0]} failed: stopping the other tasks", file=out, flush=True)
                _cancel(handle)
                cancelled_at = time.monotonic()
        elif time.monotonic() - cancelled_at > 60:
            break  # cancelled a minute ago and still not reported done: report the failure anyway
        time.sleep(poll_s)
    failure = failed_task(handle) or failure
    if failure is not None:
        raise JobFailed(f"job {handle.job_id}: {failure[1]}", task=failure[0])
    try:
        return handle.results()
    except Exception as e:  # a task ended without a result (killed, out of memory, ...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise JobFailed(f"job {handle.job_id} failed: {first}") from None


def _cancel(handle: Any) -> None:
    """End a job whose task failed. A local job's tasks (children of its controller process, whose pid is
    the job id) are killed directly: the controller then sees them exit and returns (cancelling the
    controller itself ends it with a KeyboardInterrupt traceback). A Slurm job is cancelled."""
    import psutil
    import submitit

    if isinstance(handle, submitit.LocalJob):
        try:
            tasks = psutil.Process(int(handle.job_id)).children()
        except (psutil.NoSuchProcess, ValueError):
            tasks = []
        for task in tasks:
            try:
                task.kill()  # SIGKILL: SIGINT/SIGTERM only set the stop flag, which a rank in a rendezvous never reads
            except psutil.NoSuchProcess:
                pass
        if tasks:
            return
    handle.cancel(check=False)
