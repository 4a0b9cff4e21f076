"""A new user's mistakes, each answered with one line and exit status 2, no traceback, nothing left behind;
and the pieces of the first hour that are not mistakes (cluster=auto without a cluster, jobs/status.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from waveforge import config, data, runtime

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str, env: dict[str, str] | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def one_line_exit_2(r: subprocess.CompletedProcess, *words: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-3000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr[-3000:]
    for w in words:
        assert w in lines[0], (w, lines[0])


def test_evaluate_without_inception_weights(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    r = cli("jobs/evaluate.py", "recipe=celebahq256", f"real={tmp_path / 'a'}", f"fake={tmp_path / 'a'}",
            f"eval.inception_path={tmp_path / 'missing.pt'}")
    one_line_exit_2(r, "eval.inception_path", "missing.pt")
    one_line_exit_2(cli("jobs/evaluate.py", f"real={tmp_path / 'a'}", f"fake={tmp_path / 'a'}"), "holds 0 image(s)")


def test_slurm_that_does_not_answer_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    env = {"SLURM_CONF": str(tmp_path / "no-slurm.conf")}
    r = cli("jobs/submit.py", "recipe=tiny", "cluster=slurm", f"run.dir={tmp_path / 'run'}", env=env)
    one_line_exit_2(r, "cluster=slurm", "does not answer")
    assert not (tmp_path / "run").exists()


def test_auto_runs_locally_when_no_slurm_answers_and_says_why(tmp_path: Path) -> None:
    from waveforge import submit

    os.environ["SLURM_CONF"], old = str(tmp_path / "no-slurm.conf"), os.environ.get("SLURM_CONF")
    try:
        assert submit.choose_backend("auto") == "local"
    finally:
        os.environ.pop("SLURM_CONF") if old is None else os.environ.__setitem__("SLURM_CONF", old)


def test_a_typo_in_the_data_url_is_not_training_data(tmp_path: Path) -> None:
    """Neither jobs/train.py nor jobs/submit.py draw synthetic images at a URL the user typed."""
    typo = tmp_path / "datsets" / "celeba"
    r = cli("jobs/train.py", "recipe=tiny", f"data.url={typo}", f"run.dir={tmp_path / 'run'}",
            "tracking.enabled=false")
    one_line_exit_2(r, f"data.url={typo}", "no data set there")
    r = cli("jobs/submit.py", "recipe=tiny", "cluster=local", f"data.url={typo}", f"run.dir={tmp_path / 'run2'}")
    one_line_exit_2(r, f"data.url={typo}")
    assert not typo.exists() and not (tmp_path / "run2").exists()


def test_tracking_server_that_does_not_answer(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    data.make_shards("synthetic", str(shards), 32, num_samples=16, samples_per_shard=8, progress=False)
    uri = f"http://127.0.0.1:{runtime.free_port()}"
    r = cli("jobs/submit.py", "recipe=tiny", "cluster=local", f"data.url={shards}", f"tracking.uri={uri}",
            f"run.dir={tmp_path / 'run'}")
    one_line_exit_2(r, f"tracking.uri={uri}", "--no-preflight")
    assert not (tmp_path / "run").exists()


@pytest.mark.services
def test_wrong_s3_secret_in_make_shards_and_submit(s3_server, tmp_path: Path) -> None:  # noqa: ANN001
    bucket = s3_server.make_bucket("first-hour")
    env = {"AWS_ACCESS_KEY_ID": s3_server.access_key, "AWS_SECRET_ACCESS_KEY": "wrong-secret",
           "AWS_ENDPOINT_URL": s3_server.endpoint_url}
    r = cli("jobs/make_shards.py", "source=synthetic", "num_samples=8", f"output={bucket}/tiny",
            "resolution=32", env=env)
    one_line_exit_2(r, "access denied", "first-hour")
    good = {**env, "AWS_SECRET_ACCESS_KEY": s3_server.secret_key}
    assert cli("jobs/make_shards.py", "source=synthetic", "num_samples=8", f"output={bucket}/tiny",
               "resolution=32", env=good).returncode == 0
    r = cli("jobs/submit.py", "recipe=tiny", "cluster=local", f"data.url={bucket}/tiny", "--wait",
            f"run.dir={tmp_path / 'run'}", env=env)
    one_line_exit_2(r, "access denied")
    assert not (tmp_path / "run").exists()  # refused before submitting: no rank-0 traceback to stream


@pytest.mark.services
def test_a_job_the_partition_can_never_run(slurm_two_nodes, tmp_path: Path) -> None:  # noqa: ANN001
    r = cli("jobs/submit.py", "recipe=tiny", "cluster=slurm", "nodes=4", f"run.dir={tmp_path / 'run'}",
            env=slurm_two_nodes.env)
    one_line_exit_2(r, "cluster.nodes=4", "2 node(s)", "pending")
    r = cli("jobs/submit.py", "recipe=tiny", "cluster=slurm", "tasks_per_node=8", "cpus_per_task=2",
            f"run.dir={tmp_path / 'run'}", env=slurm_two_nodes.env)
    one_line_exit_2(r, "16 CPUs a node", "have 4")
    r = cli("jobs/submit.py", "recipe=tiny", "cluster=slurm", "tasks_per_node=0", "gpus_per_node=2",
            "cpus_per_task=1", f"run.dir={tmp_path / 'run'}", env=slurm_two_nodes.env)
    one_line_exit_2(r, "cluster.gpus_per_node=2", "0 GPU(s)", "tasks_per_node")
    assert not (tmp_path / "run").exists()


def test_status_of_a_finished_and_a_failed_run(tmp_path: Path) -> None:
    """jobs/status.py reads a run folder: step of total, last metrics and evaluation, the newest checkpoint,
    the MLflow run, and the last log lines of a task that failed."""
    import pickle

    run = tmp_path / "run"
    cfg = config.load("tiny", [f"run.dir={run}"])
    config.save(cfg, run / "recipe.yaml")
    logs = run / "logs"
    logs.mkdir()
    (logs / "77_0_log.out").write_text("step 1/512\nTraceback (most recent call last):\nValueError: boom\n")
    with open(logs / "77_0_result.pkl", "wb") as f:
        pickle.dump(("error", "Traceback ...\nValueError: boom"), f)
    with open(run / "metrics.jsonl", "w") as f:
        f.write(json.dumps({"step": 32, "d_loss": 1.2, "images_per_s": 80.0, "s_per_step": 0.2}) + "\n")
        f.write(json.dumps({"step": 32, "eval_fid_proxy": 7.5}) + "\n")
    r = cli("jobs/status.py", f"run={run}")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "step 32/512" in out and "ETA 0:01:36" in out and "eval_fid_proxy 7.5" in out and "d_loss 1.2" in out
    assert "task 0 of job 77 failed: ValueError: boom" in out and "checkpoint   none yet" in out
    st = json.loads(cli("jobs/status.py", f"run={run}", "--json").stdout)
    assert st["step"] == 32 and st["last_step"] == 512 and st["jobs"][0]["state"] == "ended"
    one_line_exit_2(cli("jobs/status.py", f"run={tmp_path / 'nothing'}"), "not a run folder")
