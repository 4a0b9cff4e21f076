"""The evaluate and sample entry points as a user runs them (no Inception: the built-in offline proxy)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
EXTRACTOR = "eval.features=proxy"


def job(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)


def _folder(path: Path, n: int, seed: int) -> Path:
    path.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path / f"{i:03d}.png")
    return path


def test_evaluate_json_between_folders(tmp_path: Path) -> None:
    real, fake = _folder(tmp_path / "real", 12, 0), _folder(tmp_path / "fake", 12, 1)
    r = job("jobs/evaluate.py", f"real={real}", f"fake={fake}", EXTRACTOR, "eval.kid_subset_size=6", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout)  # stdout is exactly one JSON object
    assert result["fid_proxy"] > 0 and "kid_proxy" in result and "fid" not in result
    same = job("jobs/evaluate.py", f"real={real}", f"fake={real}", EXTRACTOR, "eval.kid=false", "--json")
    assert abs(json.loads(same.stdout)["fid_proxy"]) < 1e-3


def test_evaluate_bad_input_exits_2(tmp_path: Path) -> None:
    r = job("jobs/evaluate.py", "--json")
    assert r.returncode == 2 and "nothing to evaluate" in r.stderr
    r = job("jobs/evaluate.py", f"real={tmp_path}", "chekpoint=x")
    assert r.returncode == 2 and "chekpoint" in r.stderr


def test_sample_is_seed_indexed(export_dir: Path, tmp_path: Path) -> None:
    a = job("jobs/sample.py", f"run={export_dir}", "num=5", f"out={tmp_path / 'a'}", "eval.batch_size=5")
    assert a.returncode == 0, a.stderr[-3000:]
    b = job("jobs/sample.py", f"run={export_dir}", "num=3", "seed=2", f"out={tmp_path / 'b'}", "eval.batch_size=2")
    assert b.returncode == 0, b.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [f"{i:06d}.png" for i in range(5)]
    for i in (2, 3, 4):  # the same seed gives the same image whatever the batch split (up to float rounding
        # of batched convolutions: at most one 8-bit level on a few pixels)
        x = np.asarray(Image.open(tmp_path / "a" / f"{i:06d}.png")).astype(int)
        y = np.asarray(Image.open(tmp_path / "b" / f"{i:06d}.png")).astype(int)
        assert np.abs(x - y).max() <= 1 and (x != y).mean() < 0.01
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "a" / "000000.png")),
                              np.asarray(Image.open(tmp_path / "a" / "000001.png")))
    g = job("jobs/sample.py", f"run={export_dir}", "num=4", f"out={tmp_path / 'g'}", "--grid")
    assert g.returncode == 0 and Image.open(next((tmp_path / "g").glob("grid-*.png"))).size == (64, 64)


def test_sample_needs_run() -> None:
    r = job("jobs/sample.py", "num=3")
    assert r.returncode == 2 and "run=" in r.stderr
