"""Tracking component: MLflow runs through the embedded SQLite default and a real server (infra/mlflow with
SeaweedFS artifacts), resume rules, asynchronous logging through a server outage, and the UI page."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import numpy as np
import pytest

from waveforge import config, tracking


def _cfg(name: str = "trk", **overrides) -> config.Recipe:
    return config.load("tiny", {"run.name": name, "storage.secret_key": "s3cr3t", **overrides})


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One runs/<recipe> folder (one embedded mlflow.db: creating its tables takes seconds) per module."""
    return tmp_path_factory.mktemp("runs") / "tiny"


def _grid(step: int) -> np.ndarray:
    rng = np.random.default_rng(step)
    return rng.integers(0, 256, size=(32, 48, 3), dtype=np.uint8)


def test_embedded_sqlite_run_then_continue(runs_root: Path) -> None:
    from mlflow.tracking import MlflowClient

    cfg = _cfg()
    run_dir = runs_root / "trk"
    t = tracking.open_tracker(cfg, run_dir, None, {"git_commit": "abc123", "slurm_job_id": "11"}, rank=0)
    assert isinstance(t, tracking.Tracker)
    for step in range(3):
        t.log_metrics({"loss_g": 1.0 / (step + 1), "loss_d": 0.5}, step=step)
    t.log_image(_grid(2), key="samples", step=2)
    assert t.close("FINISHED") == 0

    uri = f"sqlite:///{runs_root}/mlflow.db"
    assert tracking.read_run_id(run_dir) == t.run_id
    client = MlflowClient(uri)
    run = client.get_run(t.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "trk"
    assert run.data.params["train.lr_g"] == str(cfg.train.lr_g)
    assert run.data.params["storage.secret_key"] == config.MASK  # secrets never leave the process
    assert run.data.tags["recipe_hash"] == config.training_hash(cfg)
    assert run.data.tags["slurm_job_ids"] == "11" and run.data.tags["git_commit"] == "abc123"
    assert [m.value for m in client.get_metric_history(t.run_id, "loss_g")] == [1.0, 0.5, 1.0 / 3]
    # Artifacts of the embedded default sit beside the database; the image is step-indexed.
    assert run.info.artifact_uri.startswith((runs_root / "mlartifacts").as_uri())
    images = [a.path for a in client.list_artifacts(t.run_id, "images")]
    assert any(p.startswith("images/samples+step+2") and p.endswith(".png") for p in images), images

    # Continue the same run after a "requeue": same run id, no param re-log error, RUNNING while open.
    cfg2 = _cfg(**{"train.max_steps": 99})  # a non-training field may change
    t2 = tracking.Tracker.open(cfg2, run_dir, t.run_id, {"slurm_job_id": "12"})
    assert t2.run_id == t.run_id
    assert client.get_run(t.run_id).info.status == "RUNNING"
    for step in range(3, 5):
        t2.log_metrics({"loss_g": 0.1 * step}, step=step)
    t2.set_tags({"slurm_job_id": "13"})
    assert t2.close("FAILED", error="RuntimeError: boom") == 0
    run = client.get_run(t.run_id)
    assert run.info.status == "FAILED" and run.data.tags["error"] == "RuntimeError: boom"
    assert run.data.tags["slurm_job_ids"] == "11,12,13"
    assert [m.step for m in client.get_metric_history(t.run_id, "loss_g")] == [0, 1, 2, 3, 4]
    assert [r.info.run_id for r in client.search_runs([run.info.experiment_id], "attributes.run_name = 'trk'")] \
        == [t.run_id]


def test_resume_with_changed_training_field_names_it(runs_root: Path) -> None:
    run_dir = runs_root / "r"
    t = tracking.Tracker.open(_cfg("r"), run_dir, None, {})
    t.close()
    with pytest.raises(config.ConfigError, match=r"train\.lr_g: '0\.0008' -> '0\.0001'") as e:
        tracking.Tracker.open(_cfg("r", **{"train.lr_g": 1e-4}), run_dir, t.run_id, {})
    assert str(e.value).count("->") == 1  # only the changed field is named


def test_exit_without_close_flushes_and_ends_killed(runs_root: Path, run_python) -> None:
    from mlflow.tracking import MlflowClient

    r = run_python(f"""
        from pathlib import Path
        from waveforge import config, tracking
        cfg = config.load("tiny", {{"run.name": "noclose"}})
        t = tracking.Tracker.open(cfg, Path({str(runs_root / "noclose")!r}), None, {{}})
        for s in range(4):
            t.log_metrics({{"loss": float(s)}}, step=s)
        print(t.run_id)
        """)
    run_id = r.stdout.strip().splitlines()[-1]
    assert "exiting without Tracker.close()" in r.stderr
    client = MlflowClient(f"sqlite:///{runs_root}/mlflow.db")
    assert client.get_run(run_id).info.status == "KILLED"
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [0, 1, 2, 3]


@pytest.mark.slow
def test_two_processes_open_runs_in_one_fresh_embedded_store(tmp_path: Path) -> None:
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    code = """
import sys
from pathlib import Path
from waveforge import config, tracking
cfg = config.load("tiny", {"run.name": sys.argv[1]})
t = tracking.Tracker.open(cfg, Path(sys.argv[2]) / sys.argv[1], None, {})
t.log_metrics({"loss": 1.0}, step=0)
assert t.close() == 0
"""
    procs = [subprocess.Popen([sys.executable, "-c", code, name, str(tmp_path)], stderr=subprocess.PIPE, text=True)
             for name in ("job-a", "job-b")]
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read()
    runs = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").search_runs(
        [MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_experiment_by_name("tiny").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["job-a", "job-b"]
    assert all(r.info.status == "FINISHED" and r.data.metrics["loss"] == 1.0 for r in runs)


def test_system_metrics_carry_the_node_id(runs_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket
    import time

    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")
    monkeypatch.delenv("MLFLOW_SYSTEM_METRICS_NODE_ID", raising=False)
    t = tracking.open_tracker(_cfg("sysm"), runs_root / "sysm", None, {}, rank=0, system_metrics=True)
    time.sleep(2.0)
    assert t.close() == 0
    keys = MlflowClient(f"sqlite:///{runs_root}/mlflow.db").get_run(t.run_id).data.metrics
    prefix = f"system/{socket.gethostname()}/"
    assert any(k.startswith(prefix + "cpu_utilization_percentage") for k in keys), sorted(keys)


def test_null_tracker_and_disabled(tmp_path: Path) -> None:
    cfg = _cfg()
    for tr in (tracking.open_tracker(cfg, tmp_path / "a", None, {}, rank=1),
               tracking.open_tracker(_cfg(**{"tracking.enabled": False}), tmp_path / "b", None, {}, rank=0)):
        assert isinstance(tr, tracking.NullTracker) and tr.run_id is None
        tr.log_metrics({"x": 1.0}, step=0)
        tr.log_image(_grid(0), key="s", step=0)
        tr.set_tags({"a": "b"})
        assert tr.close("KILLED") == 0
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_bad_input_is_rejected_at_the_call(runs_root: Path, tmp_path: Path) -> None:
    t = tracking.Tracker.open(_cfg("bad"), runs_root / "bad", None, {})
    with pytest.raises(TypeError, match="loss"):
        t.log_metrics({"loss": "high"}, step=0)
    with pytest.raises(TypeError, match="uint8"):
        t.log_image(np.zeros((4, 4, 3), np.float32), key="s", step=0)
    with pytest.raises(FileNotFoundError):
        t.log_artifact(tmp_path / "nope.txt")
    with pytest.raises(ValueError, match="FINISHED"):
        t.close("DONE")
    assert t.close() == 0
    with pytest.raises(RuntimeError, match="closed"):
        t.log_metrics({"x": 1.0}, step=1)


@pytest.mark.services
def test_real_server_params_curve_image_artifact_in_s3(mlflow_server, s3_server, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    cfg = _cfg("server-run", **{"tracking.uri": mlflow_server.uri, "tracking.experiment": "trk-server"})
    run_dir = tmp_path / "run"
    t = tracking.Tracker.open(cfg, run_dir, None, {"nodes": "1"})
    losses = [2.0 * 0.8**s for s in range(20)]
    for s, v in enumerate(losses):
        t.log_metrics({"loss_g": v}, step=s)
    t.log_image(_grid(19), key="samples", step=19)
    (run_dir / "recipe.yaml").write_text(config.to_yaml(cfg))
    t.log_artifact(run_dir / "recipe.yaml")
    assert t.close("FINISHED") == 0

    client = MlflowClient(mlflow_server.uri)
    run = client.get_run(t.run_id)
    assert run.info.status == "FINISHED" and run.data.params["model.resolution"] == str(cfg.model.resolution)
    assert [m.value for m in client.get_metric_history(t.run_id, "loss_g")] == losses
    keys = [p for p in s3_server.filesystem().find("mlflow-artifacts") if t.run_id in p]
    assert any(k.endswith("/artifacts/recipe.yaml") for k in keys), keys
    assert any("/artifacts/images/samples+step+19" in k and k.endswith(".png") for k in keys), keys


@pytest.mark.services
@pytest.mark.slow
def test_server_outage_buffers_and_delivers(mlflow_server_factory, tmp_path: Path, caplog) -> None:
    from mlflow.tracking import MlflowClient

    server = mlflow_server_factory()  # a server of this test alone: it is stopped and restarted
    cfg = _cfg("outage", **{"tracking.uri": server.uri})
    comes_back = tracking.Tracker.open(cfg, tmp_path / "run1", None, {})
    stays_down = tracking.Tracker.open(cfg, tmp_path / "run2", None, {})
    comes_back.log_metrics({"loss": 1.0}, step=0)
    caplog.set_level(logging.WARNING, logger="waveforge.tracking")
    server.stop()
    for s in range(1, 11):  # the server is down: the calls return at once
        comes_back.log_metrics({"loss": 1.0 / (s + 1)}, step=s)
    for s in range(7):
        stays_down.log_metrics({"a": 1.0, "b": 2.0}, step=s)

    # Down for good: close gives up after its timeout, reports the exact count lost, keeps the values.
    assert stays_down.close("FINISHED", timeout=3) == 14
    assert "14 metric value(s)" in caplog.text and "NOT delivered" in caplog.text
    lines = (tmp_path / "run2" / "tracking-undelivered.jsonl").read_text().splitlines()
    assert len(lines) == 14 and '"key": "a"' in lines[0]

    # Back again: the buffered values arrive, in order, and the run ends FINISHED.
    server.start()
    assert comes_back.close("FINISHED", timeout=120) == 0
    assert caplog.text.count("cannot reach MLflow") == 2  # once per tracker and outage, not per retry
    client = MlflowClient(server.uri)
    assert [m.step for m in client.get_metric_history(comes_back.run_id, "loss")] == list(range(11))
    assert client.get_run(comes_back.run_id).info.status == "FINISHED"
    assert client.get_run(stays_down.run_id).info.status == "RUNNING"  # its end never arrived

    # What run2 could not deliver arrives later (jobs/track_sync.py, or the run's next start), exactly once:
    # twice is harmless (MLflow keeps one copy of an identical point).
    config.save(cfg, tmp_path / "run2" / "recipe.yaml")
    for _ in range(2):
        (tmp_path / "run2" / "tracking-undelivered.jsonl").write_text("\n".join(lines) + "\n")
        assert tracking.sync_undelivered(cfg, tmp_path / "run2") == 14
        assert not (tmp_path / "run2" / "tracking-undelivered.jsonl").exists()
    for key in ("a", "b"):
        assert [m.step for m in client.get_metric_history(stays_down.run_id, key)] == list(range(7))
    assert tracking.sync_undelivered(cfg, tmp_path / "run2") == 0


@pytest.mark.services
@pytest.mark.slow
def test_training_starts_while_the_server_is_down_and_delivers_when_it_is_back(mlflow_server_factory,  # noqa: ANN001
                                                                               tmp_path: Path) -> None:
    """The tracking server is down when a (requeued) job starts: training starts anyway, keeps its records,
    connects when the server is back, and every logged step arrives once."""
    import json
    import os
    import sys
    import time

    from mlflow.tracking import MlflowClient

    from waveforge import data

    server = mlflow_server_factory()
    server.stop()
    shards = tmp_path / "shards"
    data.make_shards("synthetic", str(shards), 32, num_samples=128, samples_per_shard=16, progress=False)
    run = tmp_path / "run"
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, str(repo / "jobs/train.py"), "recipe=tiny", f"run.dir={run}",
                             f"data.url={shards}", "train.max_steps=400", "train.log_every_images=160",
                             "eval.every_images=0", "data.num_workers=0", f"tracking.uri={server.uri}"],
                            env={**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        end = time.monotonic() + 300
        while not (run / "metrics.jsonl").exists() and time.monotonic() < end:  # training started anyway
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            time.sleep(0.5)
        server.start()
        out, _ = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    assert "does not answer" in out and "answers now" in out, out[-3000:]
    run_id = json.loads((run / "tracking.json").read_text())["run_id"]
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    history = MlflowClient(server.uri).get_metric_history(run_id, "d_loss")
    assert sorted(m.step for m in history) == steps and len(steps) == 40
    assert not (run / "tracking-undelivered.jsonl").exists()


@pytest.mark.services
@pytest.mark.slow
def test_mlflow_ui_run_page_in_headless_chromium(mlflow_server, chromium: str, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    cfg = _cfg("ui-visible-run", **{"tracking.uri": mlflow_server.uri, "tracking.experiment": "trk-ui"})
    t = tracking.Tracker.open(cfg, tmp_path / "run", None, {})
    for s in range(5):
        t.log_metrics({"loss_generator": 1.0 / (s + 1)}, step=s)
    assert t.close("FINISHED") == 0
    exp_id = MlflowClient(mlflow_server.uri).get_run(t.run_id).info.experiment_id
    page = f"{mlflow_server.uri}/#/experiments/{exp_id}/runs/{t.run_id}"
    mode = "?workflowType=machine_learning"  # the classic "Model training" UI (it opens in GenAI mode)
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--window-size=1400,900", "--virtual-time-budget=10000"]

    def chrome(profile: str, *args: str) -> str:
        return subprocess.run([chromium, *flags, f"--user-data-dir={tmp_path / profile}", *args],
                              capture_output=True, text=True, timeout=120, check=True).stdout

    shots = {"overview": (tmp_path / "mlflow-run-page.png", page + mode),
             "chart": (tmp_path / "mlflow-run-metrics.png", page + "/model-metrics" + mode)}
    for name, (shot, url) in shots.items():
        chrome(f"chrome-{name}", f"--screenshot={shot}", url)
        print(f"MLflow UI screenshot ({name}): {shot}")
        assert shot.stat().st_size > 10_000
    dom = chrome("chrome-dom", "--dump-dom", page + mode)
    assert "ui-visible-run" in dom and "loss_generator" in dom and "Finished" in dom
