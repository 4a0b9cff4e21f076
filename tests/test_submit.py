"""jobs/submit.py: the sbatch script, validation before submission, and (against the real local Slurm
from infra/) preemption -> collective checkpoint -> requeue -> resume, and requeue without a signal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from waveforge import config, data, runtime, submit

REPO = Path(__file__).resolve().parents[1]


def submit_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "jobs/submit.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=env)


def test_dry_run_ffhq1024_on_8_nodes(tmp_path: Path) -> None:
    r = submit_cli("recipe=ffhq1024", "nodes=8", "partition=a100", "time=48:00:00", f"run.dir={tmp_path / 'run'}",
                   "--dry-run")
    assert r.returncode == 0, r.stderr
    script = r.stdout.split("# sbatch script", 1)[1]
    for line in ("#SBATCH --nodes=8", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-task=1",
                 "#SBATCH --signal=USR2@120", "#SBATCH --partition=a100", "#SBATCH --time=2880",
                 "#SBATCH --requeue", "#SBATCH --open-mode=append"):
        assert line in script, line
    assert "srun" in script and "submitit" in script
    assert "--kill-on-bad-exit=1" in script.split("srun", 1)[1], "a failed rank must end the step"
    assert not (tmp_path / "run").exists(), "a dry run must write nothing"


@pytest.mark.parametrize("bad, message", [
    ("nodes=0", "cluster.nodes=0"),
    ("tasks_per_node=3", "not divisible"),
    ("batch=48", "streams"),  # 48 splits over 3 ranks, but not its gcd(48, 64) = 16 data streams
    ("time=forever", "cluster.time"),
    ("job=train2", "job='train2'"),
])
def test_invalid_resources_exit_2_before_submitting(bad: str, message: str, tmp_path: Path) -> None:
    extra = ["tasks_per_node=3"] if bad == "batch=48" else []
    r = submit_cli("recipe=tiny", f"run.dir={tmp_path / 'run'}", *extra, bad)
    assert r.returncode == 2, (bad, r.stdout, r.stderr)
    assert message in r.stderr, r.stderr
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------------------
# A failed task ends the whole job at once (no rank waits for it until the 30-minute timeout)
# --------------------------------------------------------------------------------------------------


def rank1_fails_early() -> str:
    """A submitted job (imported by reference from this module) in which rank 1 fails before the rendezvous,
    while rank 0 enters it and would wait there for rank 1 until the 30-minute timeout."""
    import submitit

    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    if int(os.environ["RANK"]) == 1:
        raise RuntimeError("rank 1 failed before the rendezvous")
    runtime.init_distributed("gloo")
    runtime.shutdown()
    return "rendezvous passed"


def test_a_failed_local_task_cancels_the_others(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    import submitit

    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))  # the tasks import this module
    monkeypatch.setenv("MASTER_PORT", str(runtime.free_port()))  # as submit.submit sets for local jobs
    executor = submitit.LocalExecutor(folder=tmp_path / "logs")
    executor.update_parameters(nodes=1, tasks_per_node=2, timeout_min=4)
    job = executor.submit(rank1_fails_early)
    t0 = time.monotonic()
    try:
        with pytest.raises(submit.JobFailed, match=r"task 1 failed: RuntimeError: rank 1 failed before the "
                                                   r"rendezvous \(log: .*_1_log.out\)"):
            submit.follow(job, poll_s=0.5, out=io.StringIO())
        assert time.monotonic() - t0 < 120, "rank 0 was left waiting for the failed rank 1"
        assert job.done(), "rank 0 still runs"
    finally:
        job.cancel(check=False)


@pytest.mark.services
def test_a_failed_slurm_task_ends_the_step(slurm_cluster, tmp_path: Path,  # noqa: ANN001
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import submitit

    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))
    cfg = config.load("tiny", [f"run.dir={tmp_path / 'run'}", "cluster=slurm", "nodes=1", "tasks_per_node=2",
                               "cpus_per_task=1", "time=10"])
    executor = submitit.SlurmExecutor(folder=tmp_path / "logs")
    executor.update_parameters(**submit.slurm_parameters(cfg))  # what submit.submit uses
    job = executor.submit(rank1_fails_early)
    try:
        # (job.done() asks sacct, and this cluster keeps no accounting: the job has ended when squeue lost it)
        _wait(lambda: not _in_queue(job.job_id), 180, "the job to end after rank 1 failed", job.job_id)
        assert "rank 1 failed before the rendezvous" in str(job.task(1).exception())
        assert submit.failed_task(job)[1].startswith("task 1 failed: RuntimeError: rank 1 failed")
        assert not job.task(0).paths.result_pickle.exists(), "rank 0 passed a rendezvous without rank 1"
    finally:
        subprocess.run(["scancel", job.job_id], capture_output=True, timeout=60)


# --------------------------------------------------------------------------------------------------
# Against the real Slurm cluster (two fake nodes) with shards in the real SeaweedFS
# --------------------------------------------------------------------------------------------------


def _wait(predicate, timeout: float, what: str, job_id: str = "") -> None:  # noqa: ANN001
    t0 = time.time()
    while time.time() - t0 < timeout:
        if predicate():
            return
        time.sleep(1)
    state = subprocess.run(["squeue", "-j", job_id], capture_output=True, text=True).stdout if job_id else ""
    raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{state}")


def _in_queue(job_id: str) -> bool:
    r = subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True, timeout=60)
    return r.returncode == 0 and bool(r.stdout.strip())


def _rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ckpt = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    out = {}
    for engine in ("G", "D"):
        for k, v in get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=engine).items():
            out[f"{engine}.{k}"] = v
    from safetensors.torch import load_file

    out.update({f"ema.{k}": v for k, v in load_file(str(ckpt / "ema.safetensors")).items()})
    return out


@pytest.fixture(scope="module")
def s3_shards(s3_server) -> str:  # noqa: ANN001
    url = s3_server.make_bucket("submit-data") + "/tiny32"
    scfg = config.StorageConfig(endpoint_url=s3_server.endpoint_url, access_key=s3_server.access_key,
                                secret_key=s3_server.secret_key)
    data.make_shards("synthetic", url, 32, num_samples=512, samples_per_shard=8, storage_cfg=scfg, progress=False)
    return url


def _job_env(s3_server, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    """What the Slurm job inherits from the submitting environment (sbatch exports it)."""
    for k, v in {"AWS_ACCESS_KEY_ID": s3_server.access_key, "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
                 "AWS_ENDPOINT_URL": s3_server.endpoint_url, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
                 "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR",
                                                        str(Path.home() / ".cache/waveforge/torch_extensions"))
                 }.items():
        monkeypatch.setenv(k, v)


def _recipe(run_dir: Path, shards: str, endpoint: str, steps: int, *extra: str) -> config.Recipe:
    return config.load("tiny", [f"run.dir={run_dir}", f"data.url={shards}", f"storage.endpoint_url={endpoint}",
                                "cluster=slurm", "nodes=2", "tasks_per_node=1", "cpus_per_task=1", "time=60",
                                f"train.max_steps={steps}", "train.log_every_images=16", "eval.every_images=0",
                                "data.num_workers=0", "checkpoint.every_images=64", "tracking.enabled=true", *extra])


@pytest.mark.services
@pytest.mark.slow
def test_preemption_checkpoints_requeues_and_matches_uninterrupted(slurm_two_nodes, s3_server, s3_shards,  # noqa: ANN001
                                                                   tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    _job_env(s3_server, monkeypatch)
    steps = 24
    # The uninterrupted reference: the same recipe on 2 ranks in one submission that is never signalled.
    ref_cfg = _recipe(tmp_path / "straight", s3_shards, s3_server.endpoint_url, steps)
    ref = submit.submit(ref_cfg)
    cfg = _recipe(tmp_path / "preempted", s3_shards, s3_server.endpoint_url, steps)
    job = submit.submit(cfg)
    run_dir = Path(cfg.run.dir)
    _wait(lambda: len(_rows(run_dir)) >= 3, 600, "the job to log 3 intervals", job.job_id)
    job._interrupt()  # what Slurm does on preemption: SIGTERM, then USR2 to every task
    _wait(lambda: (run_dir / "requeues.json").exists(), 300, "the requeue", job.job_id)
    _wait(lambda: job.paths.result_pickle.exists(), 900, "the requeued job to finish", job.job_id)
    assert set(job.results()) == {"finished"}
    _wait(lambda: ref.paths.result_pickle.exists(), 900, "the uninterrupted job", ref.job_id)
    assert set(ref.results()) == {"finished"}

    text = job.paths.stdout.read_text()
    assert "stopping at the next step boundary" in text and "stopped at step" in text
    assert "requeueing Slurm job" in text and "resumed from" in text
    stopped_at = int(text.split("stopped at step ")[1].split()[0])
    assert f"at step {stopped_at} " in text.split("resumed from", 1)[1], "resumed from another step than the stop"
    # both ranks wrote their shards of the stop checkpoint (ZeRO partitions + RNG)
    manifest = json.loads((run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
                           / "manifest.json").read_text())
    files = json.dumps(manifest)
    assert "zero_pp_rank_0" in files and "zero_pp_rank_1" in files
    # the requeued run continued the same MLflow run and reached the same weights as the straight run
    assert json.loads((run_dir / "tracking.json").read_text())["run_id"]
    a, b = _weights(run_dir), _weights(tmp_path / "straight")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps_logged = [r["step"] for r in _rows(run_dir)]
    assert steps_logged[-1] == steps
    # the curves of the preempted run have the uninterrupted run's points: the partial interval at the stop
    # went into the checkpoint and was logged with the next point, not as a one-step spike
    assert steps_logged == [r["step"] for r in _rows(tmp_path / "straight")]


@pytest.mark.services
@pytest.mark.slow
def test_requeue_without_signal_resumes_from_latest_checkpoint(slurm_cluster, s3_server, s3_shards,  # noqa: ANN001
                                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _job_env(s3_server, monkeypatch)
    cfg = _recipe(tmp_path / "requeued", s3_shards, s3_server.endpoint_url, 20, "nodes=1", "tasks_per_node=2")
    job = submit.submit(cfg)
    run_dir = Path(cfg.run.dir)
    ckpts = run_dir / "checkpoints"
    _wait(lambda: (ckpts / "latest").exists() and len(_rows(run_dir)) >= 5, 600, "a checkpoint", job.job_id)
    last_logged = max(r["step"] for r in _rows(run_dir))
    subprocess.run(["scontrol", "requeue", job.job_id], check=True, timeout=60)  # like a node failure
    _wait(lambda: job.paths.result_pickle.exists(), 900, "the requeued job to finish", job.job_id)
    assert set(job.results()) == {"finished"}
    text = job.paths.stdout.read_text()
    resumed = int(text.split("resumed from")[1].split("at step ")[1].split()[0])
    every = cfg.checkpoint.every_images // cfg.train.batch_size
    assert resumed >= last_logged - every, f"resumed at {resumed}, killed after {last_logged}: lost > {every} steps"
    assert _rows(run_dir)[-1]["step"] == 20


@pytest.mark.services
@pytest.mark.slow
def test_sample_and_evaluate_jobs_through_slurm(slurm_cluster, export_dir: Path, tmp_path: Path,  # noqa: ANN001
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """submit.py job=sample / job=evaluate on the real Slurm (2 tasks, torch.distributed over gloo): every
    seed's image is written once, whichever rank owns it, and equals the one-process image of that seed; the
    evaluation's JSON lands where out= says."""
    for k, v in {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}.items():
        monkeypatch.setenv(k, v)  # sbatch exports the submitting environment to the tasks
    common = ["recipe=tiny", "cluster=slurm", "nodes=1", "tasks_per_node=2", "cpus_per_task=1", "time=20",
              "eval.batch_size=2", "--wait"]
    r = submit_cli(*common, f"run.dir={tmp_path / 'sample-run'}", "job=sample", f"run={export_dir}", "num=5",
                   f"out={tmp_path / 'slurm'}")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "submitted sample job" in r.stdout and "wrote 5 samples" in r.stdout
    assert sorted(p.name for p in (tmp_path / "slurm").iterdir()) == [f"{i:06d}.png" for i in range(5)]
    assert len(list((tmp_path / "sample-run" / "logs").glob("*_[01]_log.out"))) == 2  # one log per task
    one = subprocess.run([sys.executable, "jobs/sample.py", f"run={export_dir}", "num=5", "eval.batch_size=2",
                          f"out={tmp_path / 'one'}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    from PIL import Image

    for i in range(5):  # rank 0 drew seeds 0, 2, 4 and rank 1 seeds 1, 3 (other batch splits: at most one
        # 8-bit level on a few pixels from batched float rounding)
        x = np.asarray(Image.open(tmp_path / "slurm" / f"{i:06d}.png")).astype(int)
        y = np.asarray(Image.open(tmp_path / "one" / f"{i:06d}.png")).astype(int)
        assert np.abs(x - y).max() <= 1 and (x != y).mean() < 0.01, i

    shards = tmp_path / "data"
    data.make_shards("synthetic", str(shards), 32, num_samples=24, samples_per_shard=8, progress=False)
    r = submit_cli(*common, f"run.dir={tmp_path / 'eval-run'}", "job=evaluate", f"run={export_dir}",
                   f"out={tmp_path / 'eval.json'}", f"data.url={shards}", "eval.num_samples=12",
                   "eval.kid_subset_size=6", "eval.features=proxy")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["fid_proxy"] > 0 and result["num_samples"] == 12 and result["checkpoint"] == str(export_dir)


@pytest.mark.slow
def test_local_cluster_runs_the_embedded_default(tmp_path: Path) -> None:
    """The README's laptop command: cluster=local runs the job as local processes (2 ranks here), with the
    synthetic data drawn on first use into the recipe's own (relative) data.url, the embedded MLflow store,
    the offline proxy FID, a final evaluation and sample grid, and a summary that says where it all is."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    r = subprocess.run([sys.executable, str(REPO / "jobs/submit.py"), "recipe=tiny", "cluster=local",
                        "tasks_per_node=2", "run.name=local", "data.synthetic_samples=256", "train.max_steps=4",
                        "train.log_every_images=32", "eval.every_images=64", "eval.num_samples=32",
                        "eval.grid_size=4", "data.num_workers=0"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run = tmp_path / "runs" / "tiny" / "local"
    assert "submitted train job" in r.stdout and str(run) in r.stdout
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 4
    grids = sorted((run / "samples").glob("grid-*.png"))
    assert grids, "no sample grid"
    from PIL import Image

    assert min(Image.open(grids[-1]).size) >= 256  # upscaled so that 32 px samples can be seen
    assert (tmp_path / "data" / "synthetic-32" / "index.json").exists()
    assert (tmp_path / "runs" / "tiny" / "mlflow.db").exists()
    assert "eval at step 4" in r.stdout and "eval_fid_proxy" in r.stdout  # tiny's offline proxy, no download
    summary = r.stdout.split("run finished at step 4/4", 1)[1]
    for line in (f"run folder   {run}", f"checkpoint   {run}/checkpoints/step-000000004",
                 f"samples      {grids[-1]}", "MLflow       mlflow ui --backend-store-uri sqlite:///",
                 "workflowType=machine_learning"):
        assert line in summary, line
    assert "submitit INFO" not in r.stdout and "Warning" not in r.stdout  # the console reads like a product
