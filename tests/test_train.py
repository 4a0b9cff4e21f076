"""The DeepSpeed trainer: every ZeRO stage and precision trains on 2 CPU ranks; one ZeRO-2 step equals a
plain single-process PyTorch step on the same global batch; the tiny recipe's losses behave."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from waveforge import config, data, diffusion, models, runtime, steps, wavelet

REPO = Path(__file__).resolve().parents[1]
QUIET = ["tracking.enabled=false", "eval.every_images=0", "checkpoint.every_images=0", "data.num_workers=0"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("shards") / "tiny32"
    data.make_shards("synthetic", str(out), 32, num_samples=512, samples_per_shard=8, progress=False)
    return str(out)


def torchrun(spec: dict, tmp: Path, nproc: int = 2, timeout: int = 900) -> subprocess.CompletedProcess:
    spec_file = tmp / "spec.json"
    spec_file.write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR",
                                                  str(Path.home() / ".cache/waveforge/torch_extensions"))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(runtime.free_port()), str(REPO / "tests/train_worker.py"), str(spec_file)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise AssertionError(f"torchrun failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-6000:]}")
    return r


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def final_weights(run_dir: Path, engine: str) -> dict[str, torch.Tensor]:
    """fp32 weights of an engine from the run's latest checkpoint (consolidated from ZeRO shards)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ckpt = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=engine)


def test_adam_is_fused_on_a_gpu_and_torchs_default_on_the_cpu() -> None:
    common = dict(zero_stage=2, precision="bf16", lr=1e-4, betas=(0.5, 0.9), micro_batch=2, grad_accum=1, world=1,
                  grad_clip=0.0, params=1000)
    gpu = steps.ds_config(**common, device=torch.device("cuda", 0))["optimizer"]["params"]
    cpu = steps.ds_config(**common, device=torch.device("cpu"))["optimizer"]["params"]
    assert gpu["torch_adam"] and gpu["fused"] is True  # torch's fused Adam: no DeepSpeed op to compile
    assert cpu["torch_adam"] and "fused" not in cpu and "foreach" not in cpu


@pytest.mark.slow
def test_zero_reduction_bucket_is_sized_to_the_model() -> None:
    # DeepSpeed's default bucket (5e8 elements) would hold ~1 GiB of GPU memory per engine for models of
    # 20-50 M parameters; the bucket is the model's size, NCCL-aligned, and never above the default.
    common = dict(zero_stage=2, precision="bf16", lr=1e-4, betas=(0.5, 0.9), micro_batch=2, grad_accum=1, world=1,
                  grad_clip=0.0)
    z = steps.ds_config(**common, params=22_626_177)["zero_optimization"]
    assert z["reduce_bucket_size"] == z["allgather_bucket_size"]
    assert 22_626_177 <= z["reduce_bucket_size"] < 22_626_177 + 64 and z["reduce_bucket_size"] % 64 == 0
    assert steps.ds_config(**common, params=10**10)["zero_optimization"]["reduce_bucket_size"] == 500_000_000


def test_zero_stages_and_precisions_train(shards: str, tmp_path: Path) -> None:
    combos = [(1, 1, "fp32"), (2, 2, "fp32"), (3, 2, "fp32"), (1, 1, "bf16"), (2, 2, "bf16"), (3, 2, "bf16")]
    runs = [{"recipe": "tiny", "overrides": [f"run.dir={tmp_path / f'z{g}{d}-{p}'}", f"data.url={shards}",
                                             f"dist.zero_stage_g={g}", f"dist.zero_stage_d={d}", f"dist.precision={p}",
                                             "train.max_steps=3", "train.log_every_images=16", *QUIET]}
            for g, d, p in combos]
    torchrun({"runs": runs}, tmp_path)
    for g, d, p in combos:
        rows = metrics(tmp_path / f"z{g}{d}-{p}")
        assert [r["step"] for r in rows] == [1, 2, 3], (g, d, p)
        for r in rows:
            for k in ("d_loss", "g_loss", "grad_norm_d", "grad_norm_g"):
                assert math.isfinite(r[k]), (g, d, p, k, r[k])


def _plain_step(cfg: config.Recipe, shards: str, world: int) -> tuple[dict, dict]:
    """One training iteration in one process with torch.optim.Adam: each rank's share of the global batch
    with that rank's random draws, gradients averaged over ranks as data parallelism does."""
    torch.manual_seed(cfg.run.seed)
    G = models.build_generator(cfg.model, cfg.diffusion)
    D = models.build_discriminator(cfg.model, cfg.diffusion)
    sched = diffusion.make_schedule(cfg.diffusion)
    opt_g = torch.optim.Adam(G.parameters(), lr=cfg.train.lr_g, betas=(cfg.train.beta1, cfg.train.beta2), eps=1e-8)
    opt_d = torch.optim.Adam(D.parameters(), lr=cfg.train.lr_d, betas=(cfg.train.beta1, cfg.train.beta2), eps=1e-8)
    x0 = []
    for r in range(world):
        loader = data.ShardLoader(shards, global_batch=cfg.train.batch_size, rank=r, world=world,
                                  seed=cfg.run.seed, hflip=cfg.data.hflip, shuffle_window=cfg.data.shuffle_buffer)
        x0.append(wavelet.to_wavelet(data.normalize(loader.next_step()[0]["image"])))
        loader.close()

    def frozen(*a: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return G(*a)

    n = cfg.train.batch_size // world
    for r in range(world):  # D step (R1 at step 0)
        steps.seed_phase(cfg.run.seed, 0, r, steps.PHASE_D)
        t = torch.randint(0, cfg.diffusion.num_timesteps, (n,))
        z = torch.randn(n, cfg.model.nz)
        loss, _ = diffusion.d_loss(frozen, D, sched, x0[r], t, z, r1_gamma=cfg.train.r1_gamma, do_r1=True)
        (loss / world).backward()
    opt_d.step()
    D.requires_grad_(False)
    for r in range(world):
        steps.seed_phase(cfg.run.seed, 0, r, steps.PHASE_G)
        t = torch.randint(0, cfg.diffusion.num_timesteps, (n,))
        z = torch.randn(n, cfg.model.nz)
        loss, _ = diffusion.g_loss(G, D, sched, x0[r], t, z, rec_weight=cfg.train.rec_weight)
        (loss / world).backward()
    opt_g.step()
    return ({k: v.detach() for k, v in G.state_dict().items()}, {k: v.detach() for k, v in D.state_dict().items()})


@pytest.mark.slow
def test_zero2_step_equals_plain_pytorch_step(shards: str, tmp_path: Path) -> None:
    overrides = [f"run.dir={tmp_path / 'ds'}", f"data.url={shards}", "dist.zero_stage_g=2", "dist.zero_stage_d=2",
                 "dist.precision=fp32", "train.max_steps=1", "train.lr_schedule=constant", *QUIET]
    torchrun({"runs": [{"recipe": "tiny", "overrides": overrides}]}, tmp_path)
    cfg = config.load("tiny", overrides)
    g_ref, d_ref = _plain_step(cfg, shards, world=2)
    g_ds, d_ds = final_weights(tmp_path / "ds", "G"), final_weights(tmp_path / "ds", "D")
    g_init = models.build_generator(cfg.model, cfg.diffusion)  # sanity: the step moved the weights
    for ref, got, name in ((g_ref, g_ds, "G"), (d_ref, d_ds, "D")):
        assert set(got) <= set(ref), name
        for k, v in got.items():
            torch.testing.assert_close(v, ref[k], rtol=1e-5, atol=1e-6, msg=f"{name}.{k}")
    moved = max((g_ds[k] - v).abs().max().item() for k, v in g_init.state_dict().items() if k in g_ds)
    assert moved > 1e-6


@pytest.mark.slow
def test_tiny_losses_behave(shards: str, tmp_path: Path) -> None:
    """60 steps of tiny on 1 rank: finite losses, the discriminator does not collapse to zero loss."""
    run = tmp_path / "behave"
    torchrun({"runs": [{"recipe": "tiny", "overrides": [f"run.dir={run}", f"data.url={shards}", "train.max_steps=60",
                                                        "train.log_every_images=160", *QUIET]}]}, tmp_path, nproc=1)
    rows = metrics(run)
    assert len(rows) == 6
    for r in rows:
        assert math.isfinite(r["d_loss"]) and math.isfinite(r["g_loss"])
        assert r["d_loss"] > 0.05, f"discriminator collapsed: {r}"
    assert (run / "status.txt").read_text() == "finished"


def _tensors_equal(a: object, b: object, path: str = "") -> list[str]:
    """Paths where two nested structures of tensors/containers/values differ (exactly)."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return [] if a.shape == b.shape and torch.equal(a, b) else [path]
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{path}: keys differ"]
        return [d for k in a for d in _tensors_equal(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{path}: lengths differ"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _tensors_equal(x, y, f"{path}[{i}]")]
    return [] if a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b)) else [path]


def _checkpoint_tensors(run_dir: Path) -> dict:
    """Everything a checkpoint holds that training depends on: weights, EMA, optimizer states per rank."""
    from safetensors.torch import load_file

    ckpt = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    out: dict = {"G": final_weights(run_dir, "G"), "D": final_weights(run_dir, "D"),
                 "ema": load_file(str(ckpt / "ema.safetensors"))}
    for f in sorted(ckpt.glob("*/*optim_states.pt")):
        sd = torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        out[f"{f.parent.name}/{f.name}"] = {k: v for k, v in sd.items() if k in ("state", "base_optimizer_state",
                                                                               "single_partition_of_fp32_groups",
                                                                               "fp32_flat_groups")}
    return out


LOSSES = ("d_loss", "g_loss", "r1", "grad_norm_d", "grad_norm_g")


@pytest.mark.slow
@pytest.mark.parametrize("zero_g", [2, 3])
def test_resume_is_bit_exact(shards: str, tmp_path: Path, zero_g: int) -> None:
    """N steps straight == k steps, stop, resume in new processes, run to N: weights, EMA, optimizer states
    and logged losses identical."""
    common = [f"data.url={shards}", f"dist.zero_stage_g={zero_g}", "dist.zero_stage_d=2", "dist.precision=fp32",
              "train.log_every_images=16", "train.lazy_reg=2", *QUIET]
    torchrun({"runs": [{"recipe": "tiny", "overrides": [f"run.dir={tmp_path / 'straight'}", "train.max_steps=5",
                                                        *common]},
                       {"recipe": "tiny", "overrides": [f"run.dir={tmp_path / 'resumed'}", "train.max_steps=2",
                                                        *common]}]}, tmp_path)
    torchrun({"runs": [{"recipe": "tiny", "overrides": [f"run.dir={tmp_path / 'resumed'}", "train.max_steps=5",
                                                        *common]}]}, tmp_path)
    a, b = _checkpoint_tensors(tmp_path / "straight"), _checkpoint_tensors(tmp_path / "resumed")
    assert not _tensors_equal(a, b)
    la = [{k: r.get(k) for k in LOSSES} for r in metrics(tmp_path / "straight")]
    lb = [{k: r.get(k) for k in LOSSES} for r in metrics(tmp_path / "resumed")]
    assert [r["step"] for r in metrics(tmp_path / "resumed")] == [1, 2, 3, 4, 5]
    assert la == lb


@pytest.mark.slow
def test_reshard_2_to_1_and_back(shards: str, tmp_path: Path) -> None:
    """A checkpoint saved on 2 ranks resumes on 1 (DeepSpeed universal checkpoint; the trainer verifies the
    loaded weights' checksum) and back on 2, with the same global batch; the recorded global batches are
    the planned ones (jobs/data_order.py), and a changed record is found."""
    run = tmp_path / "reshard"
    common = [f"run.dir={run}", f"data.url={shards}", "dist.zero_stage_g=2", "dist.zero_stage_d=2",
              "train.log_every_images=16", "data.audit_order=true", *QUIET]
    torchrun({"runs": [{"recipe": "tiny", "overrides": ["train.max_steps=2", *common]}]}, tmp_path, nproc=2)
    torchrun({"runs": [{"recipe": "tiny", "overrides": ["train.max_steps=3", *common]}]}, tmp_path, nproc=1)
    torchrun({"runs": [{"recipe": "tiny", "overrides": ["train.max_steps=4", *common]}]}, tmp_path, nproc=2)
    rows = metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["images_seen"] for r in rows] == [16, 32, 48, 64]
    assert all(math.isfinite(r["d_loss"]) for r in rows)

    def data_order() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "jobs/data_order.py", f"run={run}"], cwd=REPO, capture_output=True,
                              text=True, timeout=300)

    r = data_order()
    assert r.returncode == 0 and "steps 0..3: every global batch is the one the data order plans" in r.stdout, r
    attempts = sorted((run / "data-order").iterdir())
    assert [sorted(p.name for p in a.iterdir()) for a in attempts] == [
        ["rank-00000-of-00002.jsonl", "rank-00001-of-00002.jsonl"], ["rank-00000-of-00001.jsonl"],
        ["rank-00000-of-00002.jsonl", "rank-00001-of-00002.jsonl"]]
    f = attempts[1] / "rank-00000-of-00001.jsonl"  # the 1-rank attempt trained step 2
    row = json.loads(f.read_text().splitlines()[0])
    assert row["step"] == 2 and len(row["keys"]) == 16
    f.write_text(json.dumps({"step": 2, "keys": row["keys"][::-1]}) + "\n")
    r = data_order()
    assert r.returncode == 1 and "step 2: global batch differs from the plan (same samples, another order)" in r.stdout
    r = subprocess.run([sys.executable, "jobs/data_order.py", f"run={tmp_path}"], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.strip() == f"error: {tmp_path}: no recipe.yaml (not a run folder)"


@pytest.mark.slow
def test_a_stop_mid_interval_leaves_the_curves_of_an_uninterrupted_run(shards: str, tmp_path: Path) -> None:
    """Stopped after 6 steps (2 steps into a 4-step log interval) and resumed: no row for the partial
    interval, the next row covers all 4 steps, and every logged value equals the uninterrupted run's."""
    common = [f"data.url={shards}", "train.log_every_images=64", "train.max_steps=8", "dist.precision=fp32",
              *QUIET]
    torchrun({"runs": [{"recipe": "tiny", "overrides": [f"run.dir={tmp_path / 'straight'}", *common]},
                       {"recipe": "tiny", "overrides": [f"run.dir={tmp_path / 'stopped'}", *common],
                        "stop_after": 6}]}, tmp_path, nproc=1)
    assert (tmp_path / "stopped" / "status.txt").read_text() == "stopped"
    assert [r["step"] for r in metrics(tmp_path / "stopped")] == [4]  # nothing logged for steps 5-6 yet
    torchrun({"runs": [{"recipe": "tiny", "overrides": [f"run.dir={tmp_path / 'stopped'}", *common]}]}, tmp_path,
             nproc=1)
    a, b = metrics(tmp_path / "straight"), metrics(tmp_path / "stopped")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [4, 8]
    assert b[-1]["interval_images"] == a[-1]["interval_images"] == 64  # the rates cover all of the interval
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for k in (*LOSSES, "d_loss_real", "g_loss_rec", "images_seen"):
            assert rb.get(k) == pytest.approx(ra.get(k), rel=1e-12, abs=0), (ra["step"], k)


@pytest.mark.slow
def test_a_training_step_never_waits_for_the_device(shards: str, run_python) -> None:  # noqa: ANN001
    """The platform's own code in a training step (GanStep on DeepSpeed engines, the meter, the EMA) turns no
    tensor into a Python number: nothing in it would wait for a GPU. (On a GPU, benchmarks/gpu_check.sh
    runs steps under torch.cuda.set_sync_debug_mode("error").) Counted on the CPU by intercepting every
    tensor -> Python conversion whose caller is a waveforge module."""
    out = run_python(f"""
        import inspect, torch
        from waveforge import config, data, diffusion, runtime, steps
        from waveforge.meters import IntervalMeter, PhaseTimer
        device = runtime.init_distributed("gloo")
        cfg = config.load("tiny", ["data.url={shards}", "train.lazy_reg=2", "dist.precision=fp32"])
        model = steps.make_step(cfg, device)
        engines = steps.build_engines(model.networks(), cfg=cfg, world=1, grad_accum=1, patch={{}})
        model.attach(engines)
        loader = data.ShardLoader("{shards}", global_batch=16, rank=0, world=1, seed=0)
        batches = [data.normalize(loader.next_step()[0]["image"]) for _ in range(3)]
        timer = PhaseTimer(device)
        meter = IntervalMeter(device, timer)
        ema_net = __import__("copy").deepcopy(model.generator).requires_grad_(False)
        syncs = []
        def spy(name):
            original = getattr(torch.Tensor, name)
            def wrapped(self, *a, **k):
                caller = inspect.stack()[1].filename
                if "/waveforge/" in caller:
                    syncs.append(f"{{name}} in {{caller}}:{{inspect.stack()[1].lineno}}")
                return original(self, *a, **k)
            setattr(torch.Tensor, name, wrapped)
        for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
            spy(name)
        for step, x in enumerate(batches):  # step 0 and 2 compute R1 (lazy_reg 2)
            meter.add(model.step([x], step, timer), images=16)
            diffusion.ema_update(ema_net, model.generator, 0.99)
        print("SYNCS", len(syncs), syncs[:5])
        loader.close()
        runtime.shutdown()
    """, env={**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}, timeout=300)
    line = next(x for x in out.stdout.splitlines() if x.startswith("SYNCS"))
    assert line.startswith("SYNCS 0 "), line


def test_compiled_blocks_compute_what_the_eager_ones_do() -> None:
    """models.compile_blocks compiles every block in place (same state-dict keys), and the compiled network's
    output and gradients equal the eager network's (tiny G and D, torch.compile's aot_eager backend: the
    same graph capture and autograd as inductor, without C++ code generation)."""
    cfg = config.load("tiny")
    torch.manual_seed(0)
    G, D = models.build_generator(cfg.model, cfg.diffusion), models.build_discriminator(cfg.model, cfg.diffusion)
    Gc, Dc = copy.deepcopy(G), copy.deepcopy(D)
    blocks = sum(isinstance(m, models.BLOCKS) for m in [*G.modules(), *D.modules()])
    assert blocks > 4 and models.compile_blocks(Gc, "aot_eager") + models.compile_blocks(Dc, "aot_eager") == blocks
    assert Gc.state_dict().keys() == G.state_dict().keys()
    x = torch.randn(4, 12, 16, 16)
    t, z = torch.tensor([0, 1, 2, 3]), torch.randn(4, cfg.model.nz)
    for net, args in ((G, (x, t, z)), (Gc, (x, t, z)), (D, (x, t, x)), (Dc, (x, t, x))):
        net.zero_grad()
        out = net(*args)
        out.square().mean().backward()
        net.result = (out.detach(), [p.grad.clone() for p in net.parameters()])  # type: ignore[assignment]
    for eager, compiled in ((G, Gc), (D, Dc)):
        torch.testing.assert_close(compiled.result[0], eager.result[0], rtol=1e-5, atol=1e-6)
        for ge, gc in zip(eager.result[1], compiled.result[1]):
            torch.testing.assert_close(gc, ge, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_the_compiled_trainer_trains_what_the_eager_one_does(shards: str, tmp_path: Path) -> None:
    """dist.compile=aot_eager (regional torch.compile of G's and D's blocks; D eager on R1 steps, whose double
    backward compiled graphs lack) logs the eager run's losses, R1 included, and reaches its weights."""
    common = [f"data.url={shards}", "dist.precision=fp32", "train.log_every_images=16", "train.max_steps=3",
              "train.lazy_reg=2", *QUIET]
    r = torchrun({"runs": [{"recipe": "tiny", "overrides": [f"run.dir={tmp_path / 'eager'}", *common]},
                           {"recipe": "tiny", "overrides": [f"run.dir={tmp_path / 'compiled'}",
                                                            "dist.compile=aot_eager", *common]}]}, tmp_path, nproc=1)
    assert r.stdout.count("torch.compile (aot_eager): 14 blocks of G and D") == 1, r.stdout[-2000:]
    a, b = metrics(tmp_path / "eager"), metrics(tmp_path / "compiled")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
    assert a[0]["r1"] > 0 and a[2]["r1"] > 0  # steps 0 and 2 ran R1
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for k in (k for k in LOSSES if k in ra):
            assert rb[k] == pytest.approx(ra[k], rel=1e-4, abs=1e-6), (ra["step"], k)
    for engine in ("G", "D"):
        wa, wb = final_weights(tmp_path / "eager", engine), final_weights(tmp_path / "compiled", engine)
        for k in wa:
            torch.testing.assert_close(wb[k], wa[k], rtol=1e-3, atol=1e-5)
