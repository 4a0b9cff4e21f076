"""jobs/plan.py: JSON output, ZeRO arithmetic, bad input exits 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from waveforge import config
from waveforge.plan import activation_bytes, measure, state_bytes

ROOT = Path(__file__).resolve().parents[1]


def _run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "jobs" / "plan.py"), *argv], capture_output=True, text=True,
                          cwd=ROOT, timeout=300, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})


def test_plan_json_for_tiny():
    out = _run("recipe=tiny", "--json")
    assert out.returncode == 0, out.stderr
    p = json.loads(out.stdout)
    assert p["generator_params"] == 952876 and p["discriminator_params"] == 1857281
    assert p["per_gpu_batch"] == 16 and p["fits"]["40GB"]["with_recipe_settings"]
    assert p["flops"]["per_sample_train_iteration"] > p["flops"]["generator_forward_per_sample"] > 0
    assert p["activation_gib_per_gpu"]["peak"] > 0


def test_plan_bad_input_exits_2():
    out = _run("recipe=tiny", "model.bogus=1", "--json")
    assert out.returncode == 2 and "error:" in out.stderr
    out = _run("recipe=tiny", "nodes=3", "batch=16")  # 16 images do not split over 3 ranks
    assert out.returncode == 2 and "divisible" in out.stderr


def test_zero_stages_shard_the_right_state():
    p = 1_000_000
    s0 = state_bytes(p, 0, "bf16", 8)
    assert s0 == {"weights": 2e6, "grads": 2e6, "optimizer": 12e6}
    s1, s2, s3 = (state_bytes(p, k, "bf16", 8) for k in (1, 2, 3))
    assert s1["optimizer"] == 1.5e6 and s1["grads"] == 2e6
    assert s2["grads"] == 0.25e6 and s2["weights"] == 2e6
    assert s3["weights"] == 0.25e6
    assert state_bytes(p, 0, "fp32", 1) == {"weights": 4e6, "grads": 4e6, "optimizer": 8e6}


def test_checkpointing_lowers_generator_activations():
    cost = measure(config.load("tiny"))
    assert 0 < cost.g_act_ckpt + cost.g_block_max < cost.g_act
    assert cost.d_act_r1 > cost.d_act > 0
    assert cost.flops_d_fwd_bwd_r1 > cost.flops_d_fwd_bwd > cost.flops_d_input_grad
    on = activation_bytes(cost, 4, "bf16", True)
    off = activation_bytes(cost, 4, "bf16", False)
    assert on["g_step"] < off["g_step"] and on["d_step"] == off["d_step"]
    assert activation_bytes(cost, 8, "fp32", False)["peak"] == pytest.approx(4 * off["peak"])
