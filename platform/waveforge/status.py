"""The state of a run, from its run folder alone: `python jobs/status.py run=DIR`.

Everything a run writes locally is in its folder (recipe.yaml, logs/, metrics.jsonl, checkpoints/,
tracking.json, requeues.json), so the status needs no database: the jobs that ran it (submitit's files in
logs/, asked of Slurm with squeue or, for local jobs, of the process table), how often it was requeued,
the step it reached of its total with the ETA at its last measured speed, its last metrics and
evaluation, its newest checkpoint, its MLflow run, and the last log lines of a task that failed.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from waveforge import checkpoint, tracking
from waveforge.config import ConfigError

LOG_RE = re.compile(r"^(?P<job>[\w.-]+?)_(?P<task>\d+)_log\.out$")


def _job_state(job_id: str) -> str:
    """RUNNING / PENDING / ... from Slurm (squeue), a live local controller (its pid is the job id), or
    "ended" when neither knows it (finished, failed, or cancelled: the result files say which)."""
    if shutil.which("squeue"):
        try:
            r = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True,
                               timeout=20)
            if r.returncode == 0 and r.stdout.strip():
                return r.stdout.split()[0]
        except (OSError, subprocess.SubprocessError):
            pass
    if job_id.isdigit():
        try:
            import psutil

            proc = psutil.Process(int(job_id))
            if "submitit" in " ".join(proc.cmdline()):
                return "RUNNING (local)"
        except Exception:  # noqa: BLE001 - no such process, or not ours to inspect
            pass
    return "ended"


def _result(path: Path) -> tuple[str, str] | None:
    """(outcome, payload) of a submitit result file: ("success", ...) or ("error", traceback); None if absent."""
    try:
        with open(path, "rb") as f:
            outcome, payload = pickle.load(f)
        return str(outcome), str(payload)
    except Exception:  # noqa: BLE001 - absent, being written, or not unpicklable here
        return None


def _rows(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue  # a line being written
    return rows


def run_status(run_dir: str | Path, tail: int = 15) -> dict[str, Any]:
    """The state of the run in `run_dir` as a JSON-able dict (see the module docstring)."""
    run = Path(run_dir)
    if not (run / "recipe.yaml").is_file():
        raise ConfigError(f"run={run_dir}: not a run folder (no recipe.yaml)")
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    t = recipe["train"]
    total = t["total_images"] // t["batch_size"]
    last_step = min(total, t["max_steps"]) if t["max_steps"] else total
    jobs: dict[str, dict[str, Any]] = {}
    for log in sorted((run / "logs").glob("*_log.out")) if (run / "logs").is_dir() else []:
        m = LOG_RE.match(log.name)
        if not m:
            continue
        job = jobs.setdefault(m["job"], {"job_id": m["job"], "tasks": {}})
        result = _result(log.with_name(f"{m['job']}_{m['task']}_result.pkl"))
        task: dict[str, Any] = {"log": str(log), "result": result[0] if result else None}
        if result and result[0] == "error":
            lines = [x for x in result[1].strip().splitlines() if x.strip()]
            task["error"] = lines[-1].strip() if lines else "failed"
            task["log_tail"] = log.read_text(errors="replace").splitlines()[-tail:]
        job["tasks"][m["task"]] = task
    for job in jobs.values():
        job["state"] = _job_state(job["job_id"])
    rows = _rows(run)
    train_rows = [r for r in rows if "images_per_s" in r]
    eval_rows = [r for r in rows if any(k.startswith("eval_") for k in r)]
    step = max((int(r["step"]) for r in rows), default=0)
    eta_s = None
    if train_rows and step < last_step:
        eta_s = train_rows[-1].get("s_per_step", 0.0) * (last_step - step)
    ckpts = checkpoint.complete_checkpoints(checkpoint.ckpt_root(run))
    requeues = run / "requeues.json"
    return {
        "run": str(run), "recipe": recipe.get("recipe", ""), "step": step, "last_step": last_step,
        "eta_s": eta_s, "jobs": list(jobs.values()),
        "requeues": json.loads(requeues.read_text())["count"] if requeues.is_file() else 0,
        "last_metrics": train_rows[-1] if train_rows else None,
        "last_eval": eval_rows[-1] if eval_rows else None,
        "checkpoint": str(ckpts[-1]) if ckpts else None,
        "mlflow": tracking.ui_hint(run),
    }


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def format_status(st: dict[str, Any]) -> str:
    """The status as a few lines for a person."""
    eta = f", ETA {_clock(st['eta_s'])}" if st["eta_s"] is not None else ""
    out = [f"run {st['run']} ({st['recipe']}): step {st['step']}/{st['last_step']}{eta}"]
    for job in st["jobs"]:
        results = [t["result"] or "-" for t in job["tasks"].values()]
        out.append(f"  job {job['job_id']}: {job['state']}, {len(job['tasks'])} task(s), results "
                   f"{', '.join(results)}")
    out.append(f"  requeues     {st['requeues']}")
    for key, label in (("last_metrics", "metrics"), ("last_eval", "evaluation")):
        row = st[key]
        if row:
            shown = {k: v for k, v in row.items() if k == "step" or k.startswith(("eval_", "d_loss", "g_loss",
                                                                                  "loss", "images_per_s"))}
            out.append(f"  {label:<12} " + "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                     for k, v in shown.items()))
    out.append(f"  checkpoint   {st['checkpoint'] or 'none yet'}")
    if st["mlflow"]:
        out.append(f"  MLflow       {st['mlflow']}")
    for job in st["jobs"]:
        for i, task in job["tasks"].items():
            if task.get("error"):
                out.append(f"  task {i} of job {job['job_id']} failed: {task['error']}")
                out.append(f"  last lines of {task['log']}:")
                out += [f"    {line}" for line in task["log_tail"]]
    return "\n".join(out)
