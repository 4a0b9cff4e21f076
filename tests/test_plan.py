"""jobs/plan.py: JSON output, ZeRO arithmetic, the communication / scaling model, bad input exits 2 (run in-process:
no extra interpreter)."""

from __future__ import annotations

import itertools
import json
import runpy
import sys
from pathlib import Path

import pytest
import torch

from waveforge import config
from waveforge import plan as plan_lib
from waveforge.plan import (
    ModelCost,
    activation_bytes,
    collectives,
    comm_per_rank,
    comm_seconds,
    measure,
    ring_fraction,
    scaling,
    state_bytes,
)

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
    assert p["generator_params"] == 290428 and p["discriminator_params"] == 479169
    assert p["per_gpu_batch"] == 16 and p["fits"]["40GB"]["with_recipe_settings"]
    assert p["flops"]["per_sample_train_iteration"] > p["flops"]["generator_forward_per_sample"] > 0
    assert p["activation_gib_per_gpu"]["peak"] > 0
    # one rank: no communication; the scaling table takes 8-GPU nodes (tiny is a one-process recipe) and
    # reports the 64 ranks its batch of 16 cannot split over
    assert p["communication"]["world_size"] == 1 and p["communication"]["bytes_per_rank"] == 0
    assert p["scaling"]["gpus_per_node"] == 8 and p["scaling"]["compute_basis"]["peak_tflops"] == 495.0  # fp32
    assert [(r["world_size"], r["possible"]) for r in p["scaling"]["rows"]] == [
        (8, True), (16, True), (16, True), (64, False)]
    code, out, _ = _run_plan(monkeypatch, capsys, "recipe=tiny")
    assert code == 0 and "parameters       G 0.290 M" in out and "40GB GPU" in out
    assert "none: one rank sends nothing" in out
    assert "not possible: train.batch_size=16 is not divisible by ranks x grad_accum = 64" in out


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
    assert "scaling model" in out and "ZeRO-1, fp32" in out and "R1" not in out.split("communication")[1].split(
        "scaling model")[0]


# ------------------------------------------------------------------------------ communication model


def _bytes(**kw) -> dict[str, float]:
    """Per-rank bytes per iteration of the collectives of `kw` (nodes, gpus_per_node taken out)."""
    nodes, gpus = kw.pop("nodes", 1), kw.pop("gpus_per_node")
    kw = {"d_params": 0, "zero_d": 2, "precision": "bf16", "grad_accum": 1, "gan": True} | kw
    return comm_per_rank(collectives(**kw), nodes=nodes, gpus_per_node=gpus)


def test_zero2_bf16_bytes_match_the_ring_formula():
    P, Q = 1_000_000, 400_000  # G and D parameters; bf16: 2 bytes each
    for n in (2, 8):  # one node of n GPUs
        got = _bytes(g_params=P, d_params=Q, zero_g=2, zero_d=2, gpus_per_node=n)
        # G: reduce-scatter of the gradients + all-gather of the weights after the step; the same for D
        expect = (n - 1) / n * 2 * P + (n - 1) / n * 2 * P + (n - 1) / n * 2 * Q + (n - 1) / n * 2 * Q
        assert got["bytes"] == pytest.approx(expect) and got["network_bytes"] == 0
        assert got["exposed_bytes"] == pytest.approx((n - 1) / n * 2 * (P + Q))  # the all-gathers
    assert _bytes(g_params=P, zero_g=2, gpus_per_node=2)["bytes"] == pytest.approx(2e6)
    # ZeRO-2 reduces after every micro-batch: 4 accumulation steps, 4 reduce-scatters, still 1 all-gather
    got = _bytes(g_params=P, zero_g=2, gpus_per_node=8, grad_accum=4)
    assert got["bytes"] == pytest.approx(7 / 8 * 2 * P * 4 + 7 / 8 * 2 * P)
    # fp32 moves 4 bytes a value
    assert _bytes(g_params=P, zero_g=2, gpus_per_node=8, precision="fp32")["bytes"] == pytest.approx(7 / 8 * 4 * P * 2)
    # 2 nodes x 8: NVLink ring over 8 GPUs, then the network ring over 2 nodes on a 1/8 shard; together the
    # flat ring's 15/16 of the tensor per collective
    got = _bytes(g_params=P, zero_g=2, nodes=2, gpus_per_node=8)
    assert got["nvlink_bytes"] == pytest.approx(2 * 7 / 8 * 2 * P)
    assert got["network_bytes"] == pytest.approx(2 * 1 / 2 * 2 * P / 8)
    assert got["bytes"] == pytest.approx(2 * 15 / 16 * 2 * P)


def test_zero0_all_reduces_and_zero1_reduces_once_per_iteration():
    P, n = 1_000_000, 8
    z0 = _bytes(g_params=P, zero_g=0, gpus_per_node=n, grad_accum=4)
    assert z0["bytes"] == pytest.approx(2 * (n - 1) / n * 2 * P)  # one all-reduce at the boundary, no gather
    z1 = _bytes(g_params=P, zero_g=1, gpus_per_node=n, grad_accum=4)
    assert z1["bytes"] == pytest.approx((n - 1) / n * 2 * P * 2)  # one reduce-scatter + one all-gather


def test_zero3_adds_the_forward_backward_and_ema_gathers():
    P, n, a = 1_000_000, 8, 2
    kw = {"g_params": P, "d_params": 300_000, "gpus_per_node": n, "grad_accum": a}
    z2, z3 = _bytes(zero_g=2, **kw), _bytes(zero_g=3, **kw)
    f = (n - 1) / n * 2 * P  # one all-gather (or reduce-scatter) of G
    # ZeRO-3 loses the all-gather after the step, gains per micro-batch 2 forward gathers (the D step's frozen G
    # and the G step) + 1 backward gather, and the EMA's gather
    assert z3["bytes"] - z2["bytes"] == pytest.approx(f * (2 * a + a + 1 - 1))
    colls = collectives(g_params=P, d_params=0, zero_g=3, zero_d=2, precision="bf16", grad_accum=a, gan=True)
    counts = {c.what.split(",")[1].strip(): c.count for c in colls if c.what.startswith("G")}
    assert counts == {"reduce-scatter after every micro-batch (ZeRO-3)": a,
                      "all-gather for each forward (2 per micro-batch": 2 * a,
                      "all-gather for the backward (per micro-batch": a, "all-gather for the EMA update (ZeRO-3)": 1}
    # the EDM family's one network: one forward per micro-batch
    edm = collectives(g_params=P, d_params=0, zero_g=3, zero_d=0, precision="bf16", grad_accum=a, gan=False)
    assert sum(c.count for c in edm if "forward" in c.what) == a and not any(c.what.startswith("D") for c in edm)
    with pytest.raises(ValueError, match="ZeRO 0-2"):
        collectives(g_params=P, d_params=1, zero_g=3, zero_d=3, precision="bf16", grad_accum=1, gan=True)


def test_one_rank_sends_nothing():
    for zero_g, zero_d, prec in itertools.product((0, 1, 2, 3), (0, 1, 2), ("bf16", "fp32")):
        colls = collectives(g_params=10**6, d_params=10**6, zero_g=zero_g, zero_d=zero_d, precision=prec,
                            grad_accum=3, gan=True)
        assert comm_per_rank(colls, nodes=1, gpus_per_node=1) == {
            "bytes": 0.0, "nvlink_bytes": 0.0, "network_bytes": 0.0, "exposed_bytes": 0.0}
        assert comm_seconds(colls, nodes=1, gpus_per_node=1, nvlink_gbs=450, network_gbps=None) == (0.0, 0.0)
    assert ring_fraction("all_reduce", 1) == 0 and ring_fraction("all_reduce", 4) == 1.5


def _fake_cost(g_params: int = 44_186_416, d_params: int = 27_739_521) -> ModelCost:
    """A ModelCost with the ffhq1024 models' parameter counts, without measuring (the scaling model only needs
    parameters and FLOPs)."""
    return ModelCost(g_params=g_params, d_params=d_params, g_act=10**7, g_act_ckpt=10**6, g_block_max=10**6,
                     d_act=10**7, d_act_r1=2 * 10**7, flops_g_fwd=155 * 10**9, flops_g_fwd_bwd=465 * 10**9,
                     flops_d_fwd_bwd=10**12, flops_d_fwd_bwd_r1=3 * 10**12, flops_d_input_grad=6 * 10**11)


def test_more_nodes_and_slower_links_lower_the_predicted_efficiency():
    cfg = config.load("ffhq1024")  # global batch 64, 8 GPUs a node
    s = scaling(cfg, _fake_cost(), per_gpu_images=8, step_s=2.3, step_batch=4)
    assert s["compute_basis"]["seconds_per_image"] == pytest.approx(2.3 / 4)
    assert s["compute_basis"]["one_gpu_step_s"] == pytest.approx(2.3 / 4 * 64)
    rows = {(r["nodes"], r["network_gbps"]): r for r in s["rows"]}
    assert set(rows) == {(1, None), (2, 200.0), (2, 400.0), (8, 200.0), (8, 400.0)}
    assert rows[8, 200.0]["compute_s"] == pytest.approx(2.3 / 4 * 1) and rows[8, 200.0]["per_gpu_images"] == 1
    for mode in ("serial", "overlapped"):
        eff = {k: r["efficiency"][mode] for k, r in rows.items()}
        assert 1 > eff[1, None] > eff[2, 400.0] > eff[2, 200.0] > eff[8, 200.0]
        assert eff[8, 400.0] > eff[8, 200.0]
        for r in rows.values():  # efficiency = compute time / predicted step time
            assert r["efficiency"][mode] == pytest.approx(r["compute_s"] / r["step_s"][mode])
    r = rows[8, 200.0]
    assert r["step_s"]["serial"] == pytest.approx(r["compute_s"] + r["comm_s"])
    assert r["step_s"]["overlapped"] < r["step_s"]["serial"]
    # one NIC a node shared by its 8 GPUs: 8x less network bandwidth per GPU, lower efficiency still
    shared = scaling(cfg, _fake_cost(), per_gpu_images=8, step_s=2.3, step_batch=4, nics_per_node=1)
    r1 = next(r for r in shared["rows"] if (r["nodes"], r["network_gbps"]) == (8, 200.0))
    assert r1["efficiency"]["serial"] < r["efficiency"]["serial"]
    # a faster GPU (the FLOP estimate at a higher MFU) makes communication weigh more
    fast = scaling(cfg, _fake_cost(), per_gpu_images=8, mfu=0.5)
    slow = scaling(cfg, _fake_cost(), per_gpu_images=8, mfu=0.05)
    assert fast["rows"][-1]["efficiency"]["serial"] < slow["rows"][-1]["efficiency"]["serial"]
    assert fast["compute_basis"]["peak_tflops"] == 989.0
    # a global batch that does not split over the ranks is reported, not predicted
    small = scaling(config.load("celebahq1024"), _fake_cost(), per_gpu_images=4, step_s=2.3)
    assert [r["possible"] for r in small["rows"] if r["nodes"] == 8] == [False]


def test_plan_cli_prints_the_scaling_model(monkeypatch, capsys):
    monkeypatch.setattr(plan_lib, "measure", lambda cfg: _fake_cost())
    code, out, err = _run_plan(monkeypatch, capsys, "recipe=ffhq1024", "nodes=8", "--json")
    assert code == 0, err
    p = json.loads(out)
    c = p["communication"]
    assert (c["world_size"], c["nodes"], c["gpus_per_node"]) == (64, 8, 8)
    assert c["bytes_per_rank"] == pytest.approx(4 * 63 / 64 * 2 * (44_186_416 + 27_739_521) / 2)
    assert c["bytes_per_rank"] == pytest.approx(c["nvlink_bytes_per_rank"] + c["network_bytes_per_rank"])
    assert {i["kind"] for i in c["collectives"]} == {"reduce_scatter", "all_gather"}
    s = p["scaling"]
    assert s["compute_basis"]["source"] == "FLOP estimate" and s["compute_basis"]["mfu"] == 0.2
    assert s["assumptions"] and s["nvlink_gbs"] == 450 and s["network_gbps"] == [200, 400]
    for r in s["rows"]:
        assert {"nodes", "world_size", "per_gpu_images", "bytes_per_rank", "network_bytes_per_rank", "comm_s",
                "step_s", "images_per_s", "efficiency"} <= set(r)
    args = ("recipe=ffhq1024", "nodes=8", "step_s=2.3", "step_batch=4")
    code, out, _ = _run_plan(monkeypatch, capsys, *args, "--json")
    rows = [r for r in json.loads(out)["scaling"]["rows"] if r["nodes"] == 8]
    code, out, _ = _run_plan(monkeypatch, capsys, *args)
    assert code == 0
    assert "scaling model    PREDICTED by a model, not measured" in out and "nodes x GPUs" in out
    assert "step_s=2.3 s per iteration at 4 images on one GPU (measured, given)" in out and "assumptions:" in out
    table = [line.split() for line in out.splitlines() if line.startswith("    8 x 8")]
    # nodes x GPUs, img/GPU, MB in node, MB between, link, comm ms, step serial / overlapped, img/s, efficiencies
    assert [(t[6], t[-2], t[-1]) for t in table] == [
        (f"{r['network_gbps']:g}", f"{r['efficiency']['serial']:.2%}", f"{r['efficiency']['overlapped']:.2%}")
        for r in rows] and len(table) == 2
    basis = next(line.split() for line in out.splitlines() if "1 GPU (basis)" in line)
    assert basis[3:5] == ["64", "-"] and basis[8] == "36.80"  # 2.3 s / 4 images x 64 images
    for bad in (["step_s=0"], ["mfu=1.5"], ["nics=0.5"], ["step_s=1", "step_batch=two"], ["step_batch=4"],
                ["step_s=2.3", "mfu=0.3"]):
        code, _, err = _run_plan(monkeypatch, capsys, "recipe=ffhq1024", *bad)
        assert code == 2 and bad[-1].split("=")[0] in err, bad
