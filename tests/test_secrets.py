"""Credentials never touch disk: a secret given on the command line of a local or Slurm submission is in no
file of the run folder, its logs, submitit's job folder or the MLflow store; the access key is masked like
the secret; a credentials file must be private."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from waveforge import config, data, storage

REPO = Path(__file__).resolve().parents[1]
SECRET = "s3cr3t-Zq81-never-on-disk"
ACCESS = "AKIA-access-never-on-disk"


def _files_holding(root: Path, needle: str) -> list[str]:
    hits = []
    for p in root.rglob("*"):
        if p.is_file() and needle.encode() in p.read_bytes():
            hits.append(str(p))
    return hits


def _submit(tmp_path: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    shards = tmp_path / "shards"
    if not shards.exists():
        data.make_shards("synthetic", str(shards), 32, num_samples=32, samples_per_shard=16, progress=False)
    return subprocess.run([sys.executable, str(REPO / "jobs/submit.py"), "recipe=tiny", f"data.url={shards}",
                           "train.max_steps=2", "train.log_every_images=16", "eval.every_images=0",
                           "data.num_workers=0", f"storage.secret_key={SECRET}", f"storage.access_key={ACCESS}",
                           *extra], cwd=tmp_path, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", **(env or {})})


def test_masked_in_every_printed_and_saved_form(tmp_path: Path) -> None:
    cfg = config.load("tiny", [f"storage.secret_key={SECRET}", f"storage.access_key={ACCESS}"])
    for text in (config.to_yaml(cfg), str(config.flat(cfg)), str(config.to_dict(cfg))):
        assert SECRET not in text and ACCESS not in text
    stripped = config.without_secrets(cfg)
    assert stripped.storage.secret_key == stripped.storage.access_key == "" and cfg.storage.secret_key == SECRET


def test_local_submission_writes_no_secret(tmp_path: Path) -> None:
    r = _submit(tmp_path, "cluster=local", f"run.dir={tmp_path / 'run'}")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert SECRET not in r.stdout + r.stderr and ACCESS not in r.stdout + r.stderr
    assert (tmp_path / "run" / "logs").is_dir() and list((tmp_path / "run" / "logs").glob("*_submitted.pkl"))
    for needle in (SECRET, ACCESS):
        assert not _files_holding(tmp_path / "run", needle), needle
        assert not _files_holding(tmp_path / "run" / "..", needle), needle  # the embedded MLflow store too


@pytest.mark.services
def test_slurm_submission_writes_no_secret(slurm_cluster, tmp_path: Path) -> None:  # noqa: ANN001
    r = _submit(tmp_path, "cluster=slurm", "tasks_per_node=1", "cpus_per_task=1", "time=20", "--wait",
                f"run.dir={tmp_path / 'run'}", env=slurm_cluster.env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert list((tmp_path / "run" / "logs").glob("*_submission.sh"))  # sbatch's script is there, clean
    for needle in (SECRET, ACCESS):
        assert not _files_holding(tmp_path, needle), needle


def test_credentials_file_must_be_private(tmp_path: Path) -> None:
    f = tmp_path / "creds.env"
    f.write_text(f"export AWS_ACCESS_KEY_ID={ACCESS}\nAWS_SECRET_ACCESS_KEY='{SECRET}'\n")
    f.chmod(0o644)
    scfg = config.StorageConfig(credentials_file=str(f))
    with pytest.raises(storage.CredentialsFileError, match="can be read by others .mode 644.: chmod 600"):
        storage.storage_options(scfg, "s3://bucket/x")
    f.chmod(0o600)
    opts = storage.storage_options(scfg, "s3://bucket/x")
    assert opts["key"] == ACCESS and opts["secret"] == SECRET
