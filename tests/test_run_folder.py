"""One trainer per run folder; trainers end with their launcher; one logged value per step across attempts."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from waveforge import checkpoint, data

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("shards") / "tiny32"
    data.make_shards("synthetic", str(out), 32, num_samples=256, samples_per_shard=16, progress=False)
    return str(out)


def _args(run: Path, shards: str, steps: int, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "jobs/train.py"), "recipe=tiny", f"run.dir={run}", f"data.url={shards}",
            f"train.max_steps={steps}", "train.log_every_images=16", "eval.every_images=0",
            "tracking.enabled=false", "data.num_workers=0", *extra]


def _rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _wait_for_rows(run: Path, n: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if (run / "metrics.jsonl").exists() and len(_rows(run)) >= n:
            return
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.5)
    raise AssertionError(f"no {n} metric rows in {timeout} s")


@pytest.mark.slow
def test_a_second_trainer_of_a_run_folder_is_refused_until_the_first_is_gone(shards: str, tmp_path: Path) -> None:
    run = tmp_path / "run"
    first = subprocess.Popen(_args(run, shards, 100_000), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, start_new_session=True)
    try:
        _wait_for_rows(run, 1, first)
        second = subprocess.run(_args(run, shards, 4), env=ENV, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr[-3000:]
        line = second.stderr.strip().splitlines()
        assert len(line) == 1 and f"is in use by another trainer: pid {first.pid}" in line[0], second.stderr
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the trainer dies without releasing its lock
        first.wait()
    assert (run / ".trainer.lock").exists()
    third = subprocess.run(_args(run, shards, 2, "checkpoint.every_images=16"), env=ENV, capture_output=True,
                           text=True, timeout=300)  # the stale lock of a dead trainer is taken over
    assert third.returncode == 0, third.stderr[-3000:]
    assert not (run / ".trainer.lock").exists()  # released at the end


@pytest.mark.slow
def test_a_trainer_stops_with_a_checkpoint_when_its_launcher_dies(shards: str, tmp_path: Path) -> None:
    run = tmp_path / "run"
    launcher = (f"import subprocess, sys, time\n"
                f"p = subprocess.Popen({_args(run, shards, 100_000)!r})\n"
                f"print(p.pid, flush=True)\ntime.sleep(3600)\n")
    proc = subprocess.Popen([sys.executable, "-c", launcher], env=ENV, stdout=subprocess.PIPE, text=True)
    trainer = int(proc.stdout.readline())
    _wait_for_rows(run, 2, proc)
    proc.kill()  # SIGKILL: the launcher cannot pass anything on
    proc.wait()
    end = time.monotonic() + 120
    while time.monotonic() < end and os.path.exists(f"/proc/{trainer}"):
        try:
            if open(f"/proc/{trainer}/stat").read().split(") ", 1)[1].startswith("Z"):
                break  # exited (a zombie of the killed launcher's until reaped)
        except OSError:
            break
        time.sleep(0.5)
    else:
        if os.path.exists(f"/proc/{trainer}"):
            os.kill(trainer, signal.SIGKILL)
            raise AssertionError("the trainer ran on after its launcher died")
    newest = checkpoint.complete_checkpoints(checkpoint.ckpt_root(run))
    assert newest and checkpoint.read_state(newest[-1])["reason"] == "stop"  # stopped like a preemption


@pytest.mark.slow
def test_steps_recomputed_after_a_crash_are_not_logged_twice(shards: str, tmp_path: Path) -> None:
    """A run logs every step to 6 but its last checkpoint is at 4 (the step-6 one lost with the crash): the
    next attempt recomputes 5 and 6 without logging them again, then logs 7 and 8 as attempt 2."""
    run = tmp_path / "run"
    r = subprocess.run(_args(run, shards, 6, "checkpoint.every_images=64"), env=ENV, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    shutil.rmtree(checkpoint.ckpt_root(run) / "step-000000006")
    (checkpoint.ckpt_root(run) / "latest").write_text("step-000000004\n")
    r = subprocess.run(_args(run, shards, 8, "checkpoint.every_images=64"), env=ENV, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "at step 4 " in r.stdout
    rows = _rows(run)
    assert [x["step"] for x in rows] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert [x["attempt"] for x in rows] == [1, 1, 1, 1, 1, 1, 2, 2]


@pytest.mark.slow
def test_resume_mistakes_are_one_line(shards: str, tmp_path: Path) -> None:
    """A resume= that is not there, a file, a checkpoint of another width or another family: exit 2, one
    line, the recipe compared before any weight is loaded."""
    ckpt_run = tmp_path / "done"
    r = subprocess.run(_args(ckpt_run, shards, 1), env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    (tmp_path / "a-file").write_text("not a checkpoint")
    cases = ((f"resume={tmp_path / 'nothing'}", "no complete checkpoint"),
             (f"resume={tmp_path / 'a-file'}", "no complete checkpoint"),
             (f"resume={ckpt_run}", "model.nf: 16 -> 8", "model.nf=8"),
             (f"resume={ckpt_run}", "model.family: 'wavediff' -> 'edm'", "model.family=edm"))
    for resume, message, *extra in cases:
        r = subprocess.run(_args(tmp_path / "new", shards, 2, resume, *extra), env=ENV, capture_output=True,
                           text=True, timeout=300)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and message in lines[0], (resume, extra, r.stderr[-2000:])
        assert "Traceback" not in r.stderr
