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
import logging
import os
import pickle
import re
import shlex
import shutil
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from waveforge import config, dist, runtime, storage
from waveforge.config import Recipe
from waveforge.data.shards import manifest_url, synthetic_allowed
from waveforge.data.workers import start_worker_server

JOBS = ("train", "evaluate", "sample")


def slurm_answers() -> tuple[bool, str]:
    """(True, "") when a Slurm controller answers `sinfo`, else (False, why)."""
    if shutil.which("sinfo") is None:
        return False, "no sinfo on PATH"
    try:
        r = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as e:
        return False, f"sinfo: {e}"
    if r.returncode != 0:
        first = (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[0]
        return False, f"sinfo: {first}"
    return True, ""


def choose_backend(cfg_backend: str) -> str:
    """cluster.backend -> "slurm" or "local". auto: Slurm when its controller answers, else local processes
    (saying why). slurm when it does not answer: ConfigError, before anything is written."""
    if cfg_backend == "local":
        return "local"
    ok, why = slurm_answers()
    if cfg_backend == "slurm":
        if not ok:
            raise config.ConfigError(f"cluster=slurm: the Slurm cluster does not answer ({why}); set SLURM_CONF "
                                     "for its slurm.conf, or use cluster=local")
        return "slurm"
    if not ok:
        print(f"cluster=auto: no Slurm cluster answers ({why}); running as local processes", flush=True)
    return "slurm" if ok else "local"


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
        if self.job == "train" and self.cfg.data.num_workers:
            start_worker_server()  # as jobs/train.py does: the workers' server imports torch while we do
        # The job bodies (torch, DeepSpeed, clean-fid: seconds of imports) are imported here, in the task:
        # the submitting process never needs them.
        from waveforge import jobs, train

        if self.job == "evaluate":
            return str(jobs.evaluate(self.cfg, **self.job_args))
        if self.job == "sample":
            return str(jobs.sample(self.cfg, **self.job_args))
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


def submit(cfg: Recipe, job: str = "train", job_args: dict[str, Any] | None = None, backend: str = "") -> Any:
    """Submit `job` for `cfg` (validated) through submitit on `backend` ("slurm" or "local"; default:
    `choose_backend(cluster.backend)`); returns the submitit Job. Names the run folder if the recipe does
    not (config.with_run_folder) and writes its recipe.yaml and code version first; a submission that is
    refused leaves no new run folder behind (ConfigError with the scheduler's reason)."""
    import submitit

    cfg = config.with_run_folder(cfg, datetime.now(UTC).strftime("%Y%m%d-%H%M%S"))
    backend = backend or choose_backend(cfg.cluster.backend)
    run_dir = Path(cfg.run.dir)
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    config.save(cfg, run_dir / "recipe.yaml")
    (run_dir / "code_version.txt").write_text(runtime.code_version() + "\n")
    folder = log_folder(run_dir)
    # The task is pickled into the job's folder (submitit's <job>_submitted.pkl): it carries no credential.
    # Credentials given in the recipe reach the job through its environment, which sbatch and the local
    # executor hand on (never written to the run folder), or through storage.credentials_file on the node.
    task = Task(config.without_secrets(cfg), job, job_args)
    credentials = {"AWS_ACCESS_KEY_ID": cfg.storage.access_key, "AWS_SECRET_ACCESS_KEY": cfg.storage.secret_key}
    saved_env = {k: os.environ.get(k) for k in (*credentials, "MASTER_PORT")}
    os.environ.update({k: v for k, v in credentials.items() if v})
    try:
        if backend == "slurm":
            executor: Any = submitit.SlurmExecutor(folder=folder, max_num_timeout=cfg.cluster.max_requeue)
            executor.update_parameters(**slurm_parameters(cfg, job))
            return executor.submit(task)
        executor = submitit.LocalExecutor(folder=folder, max_num_timeout=cfg.cluster.max_requeue)
        executor.update_parameters(nodes=1, tasks_per_node=config.world_size(cfg), stderr_to_stdout=True,
                                   timeout_min=config.time_limit_minutes(cfg.cluster.time))
        # The local tasks inherit this process's environment. Without MASTER_PORT, submitit derives the port
        # from the job id (a pid here) without checking it: a port some other socket holds fails rank 0's
        # rendezvous with EADDRINUSE. A port free now is taken by rank 0 seconds later.
        os.environ["MASTER_PORT"] = str(runtime.free_port())
        return executor.submit(task)
    except Exception as e:  # noqa: BLE001 - sbatch's refusal (or a local start that failed): one line for the user
        if created:
            shutil.rmtree(run_dir, ignore_errors=True)
        lines = [x.strip() for x in str(e).splitlines() if x.strip() and "Traceback" not in x]
        reason = next((x for x in lines if "error" in x.lower()), lines[-1] if lines else type(e).__name__)
        raise config.ConfigError(f"the {backend} submission was refused: {reason}") from e
    finally:
        for k, v in saved_env.items():  # the submitting process's environment as it was
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# --------------------------------------------------------------------------------------------------
# Pre-flight: what can be checked from the submitting machine before anything is written or submitted
# --------------------------------------------------------------------------------------------------


def preflight(cfg: Recipe, job: str, job_args: dict[str, Any], backend: str) -> None:
    """UserError (one line: exit 2 at the command line) for what would fail or never start: a Slurm job the
    partition can never run (nodes, CPUs, GPUs per node), training data that is not there or not readable
    with the given credentials, a tracking server that does not answer, a model to sample that is not
    there. `jobs/submit.py --no-preflight` skips it."""
    if backend == "slurm":
        check_partition(cfg)
    if job == "train" or (job == "evaluate" and not job_args.get("real")):
        check_data(cfg)
    source = str(job_args.get("checkpoint") or job_args.get("run") or "")
    if job in ("evaluate", "sample") and source and storage.is_local(source) \
            and not Path(storage.local_path(source)).exists():
        raise config.ConfigError(f"run={source}: no such run, checkpoint or export folder")
    if job == "train" and cfg.tracking.enabled:
        check_tracking(cfg)


def _partitions() -> dict[str, dict[str, Any]]:
    """{partition: {"default", "nodes", "cpus", "gpus"}} from sinfo (nodes summed over its states; the
    smallest CPU and GPU counts of its node groups: what every node of the job is sure to have)."""
    r = subprocess.run(["sinfo", "-h", "-o", "%P|%F|%c|%G"], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise config.ConfigError(f"sinfo failed: {(r.stderr.strip().splitlines() or ['?'])[0]}")
    out: dict[str, dict[str, Any]] = {}
    for line in r.stdout.splitlines():
        try:
            name, counts, cpus, gres = line.strip().split("|")
        except ValueError:
            continue
        default = name.endswith("*")
        p = out.setdefault(name.rstrip("*"), {"default": default, "nodes": 0, "cpus": 1 << 30, "gpus": 1 << 30})
        p["nodes"] += int(counts.split("/")[-1])
        p["cpus"] = min(p["cpus"], int(re.sub(r"\D.*", "", cpus) or 0))
        gpus = sum(int(m.group(1)) for m in re.finditer(r"gpu(?::[^:,(]+)?:(\d+)", gres))
        p["gpus"] = min(p["gpus"], gpus)
    return out


def check_partition(cfg: Recipe) -> None:
    """The partition has the nodes, CPUs and GPUs a node that the recipe asks for (else the job would wait
    in the queue forever: Slurm's PartitionNodeLimit and friends)."""
    c = cfg.cluster
    parts = _partitions()
    if c.partition:
        if c.partition not in parts:
            raise config.ConfigError(f"cluster.partition={c.partition}: no such partition (this cluster has "
                                     f"{', '.join(sorted(parts)) or 'none'})")
        name = c.partition
    else:
        defaults = [n for n, p in parts.items() if p["default"]]
        if not defaults:
            return  # no default partition: sbatch itself will say
        name = defaults[0]
    p = parts[name]
    if c.nodes > p["nodes"]:
        raise config.ConfigError(f"cluster.nodes={c.nodes}: partition {name} has {p['nodes']} node(s); the job "
                                 "would stay pending forever")
    tasks = c.tasks_per_node or c.gpus_per_node
    if tasks * c.cpus_per_task > p["cpus"]:
        raise config.ConfigError(f"{tasks} tasks x cluster.cpus_per_task={c.cpus_per_task} = "
                                 f"{tasks * c.cpus_per_task} CPUs a node, but partition {name}'s nodes have "
                                 f"{p['cpus']}")
    if not c.tasks_per_node and c.gpus_per_node > p["gpus"]:
        raise config.ConfigError(f"cluster.gpus_per_node={c.gpus_per_node}: partition {name}'s nodes have "
                                 f"{p['gpus']} GPU(s)" + (" (for CPU tasks set cluster.tasks_per_node)"
                                                         if p["gpus"] == 0 else ""))


def check_data(cfg: Recipe) -> None:
    """The training data set is there and readable with the given credentials (or is the embedded default's
    synthetic set, drawn at the start)."""
    if synthetic_allowed(cfg):
        return
    if not cfg.data.url:
        raise config.ConfigError("data.url is empty: set it to a shard folder written by python jobs/make_shards.py")
    murl = manifest_url(cfg.data.url)
    if not storage.exists(murl, cfg.storage, retries=1):
        raise config.ConfigError(f"data.url={cfg.data.url}: no data set there ({murl} not found); write one with "
                                 "python jobs/make_shards.py, or fix the URL")


def check_tracking(cfg: Recipe) -> None:
    """A tracking server (tracking.uri or MLFLOW_TRACKING_URI over http) answers its health check."""
    uri = cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=10) as r:
            r.read()
    except (OSError, ValueError) as e:
        raise config.ConfigError(f"tracking.uri={uri}: the MLflow server does not answer ({e}); start it or fix "
                                 "the URI (or submit with --no-preflight)") from None


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


# What rank 0's log holds beside the platform's own lines, kept out of the console that follows a job (the
# log file keeps everything): third-party INFO/DEBUG records, Python warnings with their source line, and
# progress bars.
_NOISE = re.compile(
    r"^(submitit (INFO|DEBUG)\b"
    r"|\d{4}/\d\d/\d\d \d\d:\d\d:\d\d (INFO|DEBUG) "          # MLflow's own format
    r"|\[\d{4}-\d\d-\d\d [\d:,]+\] \[(INFO|DEBUG|WARNING)\] "       # DeepSpeed's format
    r"|[WI]\d{4} [\d:.]+ \d+ .*\] "                              # torch's C++/glog-style warnings
    r"|.*\b\w*Warning: "                                      # Python warnings
    r"|.*\d+%\|.*\| \d+/\d+ \["                               # tqdm bars
    r"|.*img \[[\d:]+, [\d.?]+img/s\]"
    r"|DeepSpeed .* built successfully)")


class ConsoleFilter:
    """Turns chunks of a job's log into what a person following it wants to see: the platform's lines,
    errors and tracebacks (third-party noise dropped, see _NOISE); on a terminal, consecutive progress lines
    ("step N/M ...") overwrite each other in place."""

    def __init__(self, out: Any) -> None:
        self.out, self.tty = out, bool(getattr(out, "isatty", lambda: False)())
        self.partial = ""
        self.skip_source = False  # the source line Python prints after a warning
        self.in_place = False

    def write(self, chunk: str) -> None:
        text = self.partial + chunk
        *lines, self.partial = text.split("\n")
        for line in lines:
            self.line(line.split("\r")[-1])

    def line(self, line: str) -> None:
        if not line.strip():
            return
        if self.skip_source:
            self.skip_source = False
            if line.startswith("  "):
                return
        if _NOISE.match(line):
            self.skip_source = "Warning: " in line
            return
        progress = self.tty and line.startswith("step ")
        if progress:
            print(f"\r\033[K{line}", end="", file=self.out, flush=True)
        else:
            print(("\n" if self.in_place else "") + line, file=self.out, flush=True)
        self.in_place = progress

    def close(self) -> None:
        if self.partial:
            self.line(self.partial)
            self.partial = ""
        if self.in_place:
            print(file=self.out, flush=True)
            self.in_place = False


def follow(handle: Any, poll_s: float = 2.0, out: Any = None) -> list[Any]:
    """Stream rank 0's log of a submitit job to `out` (stdout; third-party noise left in the file, see
    ConsoleFilter) until the job ends; return every task's result.

    When a task fails while others still run (a rank that died before the rendezvous or in rank-0-only work
    leaves the others waiting for it until the 30-minute timeout), the job is cancelled at once and JobFailed
    names the task. Under Slurm `--kill-on-bad-exit` already ends the step; this also covers local jobs."""
    console = ConsoleFilter(out or sys.stdout)
    # submitit warns on every poll of a cluster without accounting ("Bypassing sacct error"): not news
    logging.getLogger("submitit").setLevel(logging.ERROR)
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
                console.write(chunk)
        if done:
            console.close()
            break
        if failure is None:
            failure = failed_task(handle)
            if failure is not None:
                console.close()
                print(f"task {failure[0]} failed: stopping the other tasks", file=console.out, flush=True)
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
