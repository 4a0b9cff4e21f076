"""jobs/plan.py: JSON output, ZeRO arithmetic, bad input exits 2 (run in-process: no extra interpreter)."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest
import torch

from waveforge import config
from waveforge import plan as plan_lib
from waveforge.plan import ModelCost, activation_bytes, measure, state_bytes

PLAN = Path(__file__).resolve().parents[1] / "jobs" / "plan.py"


@pytest.fixture(scope="module")
def tiny_cost() -> ModelCost:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return measure(config.load("tiny"))
    finally:
        torch.set_num_threads(threads)


def _run_plan(monkeypatch, capsys, *argv: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", [str(PLAN), *argv])
    code = 0
    try:
        runpy.run_path(str(PLAN), run_name="__main__")
    except SystemExit as e:
        code = int(e.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_plan_json_for_tiny(monkeypatch, capsys, tiny_cost):
    monkeypatch.setattr(plan_lib, "measure", lambda cfg: tiny_cost)  # measured once for the module
    code, out, err = _run_plan(monkeypatch, capsys, "recipe=tiny", "--json")
    assert code == 0, err
    p = json.loads(out)
    assert p["generator_params"] == 952876 and p["discriminator_params"] == 1857281
    assert p["per_gpu_batch"] == 16 and p["fits"]["40GB"]["with_recipe_settings"]
    assert p["flops"]["per_sample_train_iteration"] > p["flops"]["generator_forward_per_sample"] > 0
    assert p["activation_gib_per_gpu"]["peak"] > 0
    code, out, _ = _run_plan(monkeypatch, capsys, "recipe=tiny")
    assert code == 0 and "parameters       G 0.953 M" in out and "40GB GPU" in out


def test_plan_bad_input_exits_2(monkeypatch, capsys):
    code, _, err = _run_plan(monkeypatch, capsys, "recipe=tiny", "model.bogus=1", "--json")
    assert code == 2 and "error:" in err and "model.bogus" in err
    code, _, err = _run_plan(monkeypatch, capsys, "recipe=tiny", "nodes=3", "batch=16")  # 16 over 3 ranks
    assert code == 2 and "divisible" in err
    code, _, err = _run_plan(monkeypatch, capsys, "recipe=tiny", "--jsn")
    assert code == 2 and "unknown flag" in err


def test_zero_stages_shard_the_right_state():
    p = 1_000_000
    s0 = state_bytes(p, 0, "bf16", 8)
    assert s0 == {"weights": 2e6, "grads": 2e6, "optimizer": 12e6, "bucket": 0.0}
    s1, s2, s3 = (state_bytes(p, k, "bf16", 8) for k in (1, 2, 3))
    assert s1["optimizer"] == 1.5e6 and s1["grads"] == 2e6
    assert s2["grads"] == 0.25e6 and s2["weights"] == 2e6
    assert s3["weights"] == 0.25e6
    # ZeRO's reduction bucket: one per rank, the model's size (fp32 where ZeRO-1 accumulates in fp32)
    assert (s1["bucket"], s2["bucket"], s3["bucket"]) == (4e6, 2e6, 2e6)
    assert state_bytes(p, 0, "fp32", 1) == {"weights": 4e6, "grads": 4e6, "optimizer": 8e6, "bucket": 0.0}


def test_activation_measurement(tiny_cost):
    cost = tiny_cost
    assert 0 < cost.g_act_ckpt + cost.g_block_max < cost.g_act
    assert cost.d_act_r1 > cost.d_act > 0
    assert cost.flops_d_fwd_bwd_r1 > cost.flops_d_fwd_bwd > cost.flops_d_input_grad
    on = activation_bytes(cost, 4, "bf16", True)
    off = activation_bytes(cost, 4, "bf16", False)
    assert on["g_step"] < off["g_step"] and on["d_step"] == off["d_step"]
    assert activation_bytes(cost, 8, "fp32", False)["peak"] == pytest.approx(4 * off["peak"])
    # The meta-device count equals what a real CPU forward saves (unique storages, weights excluded).
    from waveforge.models import build_generator

    cfg = config.load("tiny")
    G = build_generator(cfg.model, cfg.diffusion)
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    weights = {p.untyped_storage().data_ptr() for p in G.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        G(torch.randn(2, 12, 16, 16), torch.tensor([0, 1]), torch.randn(2, cfg.model.nz))
    real = sum(n for ptr, n in storages.items() if ptr not in weights) / 2 / 4  # fp32 elements per sample
    assert real == pytest.approx(cost.g_act, rel=0.1)


def test_plan_of_the_edm_family_has_no_discriminator(monkeypatch, capsys) -> None:
    code, out, _ = _run_plan(monkeypatch, capsys, "recipe=edm_cifar10", "--json")
    assert code == 0
    p = json.loads(out)
    cfg = config.load("edm_cifar10")
    from waveforge import models

    with torch.device("meta"):
        expect = models.count_params(models.build_network(cfg.model, cfg.diffusion))
    assert p["generator_params"] == expect and p["discriminator_params"] == 0
    assert p["flops"]["sampling_network_calls"] == 35  # 18 Heun steps
    assert p["flops"]["sampling_per_image"] == 35 * p["flops"]["generator_forward_per_sample"]
    assert p["activation_gib_per_gpu"]["d_step"] == 0
    code, out, _ = _run_plan(monkeypatch, capsys, "recipe=edm_tiny")
    assert code == 0 and "denoiser" in out and "D step" not in out and "network calls" in out
