"""A preemption rehearsal beyond two ranks, on the real local Slurm (2 fake nodes), SeaweedFS and MLflow from
infra/: the tiny model on N ranks (gloo), stopped by Slurm's time-limit signal and requeued (resumes on N),
stopped again by the user and continued by a new submission of the same run on N/2 ranks (a universal-
checkpoint reshard) to the end. What a user of `ffhq1024 nodes=8` relies on, checked at the end: the run
trained on exactly the global batches of its data order (no sample repeated or skipped), one MLflow run
with one value per step, every attempt resumed where the previous one stopped, nothing left in /dev/shm.

N = 8 in CI (2 nodes x 4 tasks, then 2 x 2). `benchmarks/rehearsal.py ranks=16` runs the same test at
16 -> 8 (WAVEFORGE_REHEARSAL_RANKS, WAVEFORGE_SLURM_CPUS) and prints the report it writes
(WAVEFORGE_REHEARSAL_REPORT)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from test_submit import _in_queue, _job_env, _rows, _wait  # the Slurm tests' helpers

from waveforge import config, data, submit
from waveforge.data import audit

RANKS = int(os.environ.get("WAVEFORGE_REHEARSAL_RANKS", "8"))
STEPS = int(os.environ.get("WAVEFORGE_REHEARSAL_STEPS", "64"))


def _scontrol(*args: str) -> None:
    subprocess.run(["scontrol", *args], check=True, capture_output=True, text=True, timeout=60)


def _shm() -> set[str]:
    return set(os.listdir("/dev/shm"))


@pytest.mark.services
@pytest.mark.slow
def test_preemption_rehearsal_beyond_two_ranks(slurm_two_nodes, s3_server, mlflow_server,  # noqa: ANN001
                                           tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    t_start = time.time()
    shm_before = _shm()
    _job_env(s3_server, monkeypatch)  # what the Slurm job inherits from the submitting environment
    scfg = config.StorageConfig(endpoint_url=s3_server.endpoint_url, access_key=s3_server.access_key,
                                secret_key=s3_server.secret_key)
    shards = s3_server.make_bucket(f"rehearsal-{uuid.uuid4().hex[:8]}") + "/tiny32"
    data.make_shards("synthetic", shards, 32, num_samples=512, samples_per_shard=8, storage_cfg=scfg, progress=False)
    run_dir = tmp_path / "run"
    experiment = f"rehearsal-{uuid.uuid4().hex[:8]}"

    def recipe(tasks_per_node: int) -> config.Recipe:
        return config.load("tiny", [
            f"run.dir={run_dir}", f"data.url={shards}", f"storage.endpoint_url={s3_server.endpoint_url}",
            "cluster=slurm", "nodes=2", f"tasks_per_node={tasks_per_node}", "cpus_per_task=1", "time=30",
            "cluster.signal_delay_s=150", f"train.max_steps={STEPS}", "train.log_every_images=16",
            "checkpoint.every_images=128", "eval.every_images=0", "data.num_workers=1", "data.audit_order=true",
            "tracking.enabled=true", f"tracking.uri={mlflow_server.uri}", f"tracking.experiment={experiment}"])

    # 1. N ranks on 2 nodes; once it trains, its time limit is brought near: Slurm sends USR2 (the time-limit
    #    warning) within its 30 s check, the ranks stop with a checkpoint, rank 0 requeues the job.
    job = submit.submit(recipe(RANKS // 2))
    _wait(lambda: len(_rows(run_dir)) >= 2, 600, "the job to train", job.job_id)
    t_train = time.time()
    elapsed_min = math.ceil((time.time() - _start_time(job.job_id)) / 60)
    _scontrol("update", f"JobId={job.job_id}", f"TimeLimit={elapsed_min + 1}")
    _wait(lambda: (run_dir / "requeues.json").exists(), 300, "the time-limit stop and requeue", job.job_id)
    _scontrol("update", f"JobId={job.job_id}", "TimeLimit=30")  # the requeued attempt gets its full time again
    stop1 = max(r["step"] for r in _rows(run_dir))
    t_requeued = time.time()

    # 2. The requeued attempt resumes on N ranks; after a few steps the user stops it (SIGTERM: a stop with a
    #    checkpoint and no requeue).
    _wait(lambda: any(r["attempt"] == 2 and r["step"] >= stop1 + 4 for r in _rows(run_dir)), 600,
          "the requeued attempt to train", job.job_id)
    subprocess.run(["scancel", "--signal=TERM", job.job_id], check=True, timeout=60)
    _wait(lambda: not _in_queue(job.job_id), 300, "the stopped job to end", job.job_id)
    first_log = job.paths.stdout.read_text()
    stops = [int(s) for s in re.findall(r"stopped at step (\d+) on request", first_log)]
    assert len(stops) == 2, stops
    stop2 = stops[1]
    assert stop2 < STEPS, "the second stop came after the end of the run: raise WAVEFORGE_REHEARSAL_STEPS"
    t_stopped = time.time()

    # 3. A new submission of the same run on N/2 ranks continues it (universal checkpoint) to the end.
    job2 = submit.submit(recipe(RANKS // 4))
    _wait(lambda: job2.paths.result_pickle.exists(), 900, "the resubmitted run to finish", job2.job_id)
    assert set(job2.results()) == {"finished"}
    t_end = time.time()

    # Every attempt resumed where the previous one stopped, on the ranks it had.
    assert "received SIGUSR2" in first_log and "requeueing Slurm job" in first_log
    attempts = first_log.split("resumed from ")
    assert len(attempts) == 2 and f"at step {stops[0]} " in attempts[1]
    assert f"saved at world size {RANKS}, now {RANKS}" in attempts[1]
    assert "received SIGTERM" in attempts[1]
    second_log = job2.paths.stdout.read_text()
    assert f"at step {stop2} " in second_log and f"saved at world size {RANKS}, now {RANKS // 2}" in second_log
    worlds = [sorted({p.name.split("-of-")[1] for p in a.iterdir()})
              for a in sorted(audit.audit_root(run_dir).iterdir())]
    assert worlds == [[f"{RANKS:05d}.jsonl"], [f"{RANKS:05d}.jsonl"], [f"{RANKS // 2:05d}.jsonl"]]

    # The run trained on exactly the global batches of its data order: same samples, same order, none
    # repeated or skipped (the plan crosses the epoch boundary of the 512-image set at step 32).
    steps, problems = audit.check_run(run_dir)
    assert (steps, problems) == (STEPS, [])

    # One value per step in metrics.jsonl and in the one MLflow run of the run, which every attempt continued.
    rows = _rows(run_dir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert sorted({r["attempt"] for r in rows}) == [1.0, 2.0, 3.0]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1 and runs[0].info.run_id == json.loads((run_dir / "tracking.json").read_text())["run_id"]
    history = client.get_metric_history(runs[0].info.run_id, "d_loss")
    assert sorted(m.step for m in history) == list(range(1, STEPS + 1))
    by_step = {r["step"]: r["d_loss"] for r in rows}
    assert all(m.value == pytest.approx(by_step[m.step], rel=1e-6) for m in history)

    # Nothing left behind in /dev/shm by N + N + N/2 ranks and their loader workers.
    assert _shm() - shm_before == set()

    report = {"ranks": [RANKS, RANKS, RANKS // 2], "steps": STEPS, "time_limit_stop_at_step": stops[0],
              "user_stop_at_step": stop2, "data_order": "exact", "mlflow_runs": 1,
              "seconds": {"submit_to_training": round(t_train - t_start), "time_limit_stop_and_requeue":
                          round(t_requeued - t_train), "attempt_2": round(t_stopped - t_requeued),
                          "resubmitted_to_end": round(t_end - t_stopped), "total": round(t_end - t_start)}}
    if os.environ.get("WAVEFORGE_REHEARSAL_REPORT"):
        Path(os.environ["WAVEFORGE_REHEARSAL_REPORT"]).write_text(json.dumps(report) + "\n")
    print(json.dumps(report))


def _start_time(job_id: str) -> float:
    """When the Slurm job started running (epoch seconds)."""
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%S"], capture_output=True, text=True,
                         timeout=60).stdout.strip()
    return time.mktime(time.strptime(out, "%Y-%m-%dT%H:%M:%S"))
