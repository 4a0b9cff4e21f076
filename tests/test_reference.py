"""Parity with the reference WaveDiff / DDGAN code: initialisation, imported checkpoints, forward, sampling.

The fixtures in tests/fixtures/reference/ were written once by tests/fixtures/make_reference_fixtures.py
from the reference's own code (imported from a checkout outside this repository); see its docstring. Here
nothing of the reference runs: its recorded outputs are compared with ours.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from waveforge import config, diffusion, inference, reference
from waveforge.images import to_uint8
from waveforge.models import build_discriminator, build_generator
from waveforge.wavelet import from_wavelet, to_wavelet

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "reference"
TOL = 1e-5  # max abs difference, fp32


def _fixture(name: str) -> tuple[dict[str, torch.Tensor], dict[str, str], config.Recipe]:
    path = FIXTURES / f"{name}.safetensors"
    with safetensors.safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = safetensors.torch.load_file(str(path))
    return tensors, meta, config.load(meta["recipe"], json.loads(meta["overrides"]))


def _state(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The reference state dict as saved (some fixtures keep DDP's `module.` prefix)."""
    return {k[len("state."):]: v for k, v in tensors.items() if k.startswith("state.")}


def _imported_generator(name: str, bands: str | None = None):
    tensors, meta, cfg = _fixture(name)
    G = build_generator(cfg.model, cfg.diffusion)
    G.load_state_dict(reference.convert_generator(_state(tensors), cfg, bands or meta["bands"]))  # strict
    return G.eval(), tensors, meta, cfg


# --------------------------------------------------------------------------------------------------
# Initialisation
# --------------------------------------------------------------------------------------------------

OUR_SEEDS = 4


@pytest.mark.parametrize("name", ["celebahq256", "cifar10"])
def test_every_parameter_starts_from_the_reference_distribution(name: str) -> None:
    """Per parameter, pooled over seeds: mean and std within 10% of the reference's std, max|w| within 10%
    (absolute 1e-6 for the near-zero-initialised layers); the parameters are named by the importer's map,
    and every parameter of ours has its reference statistics."""
    want = json.loads((FIXTURES / "init_stats.json").read_text())["models"]
    cfg = config.load(name)
    acc: dict[str, list[float]] = {}
    for seed in range(OUR_SEEDS):
        torch.manual_seed(seed)
        states = {"G": build_generator(cfg.model, cfg.diffusion).state_dict(),
                  "D": build_discriminator(cfg.model, cfg.diffusion).state_dict()}
        for what, state in states.items():
            for k, v in state.items():
                v = v.double()
                a = acc.setdefault(f"{what}/{k}", [0.0, 0.0, 0.0, 0.0])
                a[0] += v.numel()
                a[1] += float(v.sum())
                a[2] += float(v.square().sum())
                a[3] += float(v.abs().max()) / OUR_SEEDS
    bad = []
    for what in ("G", "D"):
        ref_stats = want[f"{name}/{what}"]
        ours = {k.split("/", 1)[1]: v for k, v in acc.items() if k.startswith(f"{what}/")}
        assert set(ours) == set(ref_stats), (set(ours) ^ set(ref_stats))
        for k, (n, s, s2, amax) in ours.items():
            mean = s / n
            std = math.sqrt(max(s2 / n - mean * mean, 0.0))
            r_mean, r_std, r_amax = ref_stats[k]
            if not (abs(std - r_std) <= 0.1 * r_std + 1e-6 and abs(mean - r_mean) <= 0.1 * r_std + 1e-6
                    and abs(amax - r_amax) <= 0.1 * r_amax + 1e-6):
                bad.append(f"{what} {k}: mean/std/max {mean:.3g}/{std:.3g}/{amax:.3g}, reference "
                           f"{r_mean:.3g}/{r_std:.3g}/{r_amax:.3g}")
    assert not bad, f"{len(bad)} parameters differ:\n" + "\n".join(bad[:20])


# --------------------------------------------------------------------------------------------------
# Forward equality
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["g_wavelet", "g_wavelet_patch", "g_plain"])
def test_imported_generator_makes_the_reference_images(name: str) -> None:
    """x0_hat from a fixed x_{t+1}, t, z, compared as images (the reference's inverse transform vs ours); then
    one posterior step from x_{t+1} with the same noise. Band orders: wavediff (g_wavelet, with attention;
    g_wavelet_patch, patch size 2) and pytorch_wavelets (g_plain, the plain NCSN++ with FIR resampling)."""
    G, f, meta, cfg = _imported_generator(name)
    bands = meta["bands"]
    x_tp1 = reference.subbands_from_reference(f["x_tp1_q16"].float() / 16, bands)
    noise = reference.subbands_from_reference(f["noise_q16"].float() / 16, bands)
    with torch.no_grad():
        x0 = G(x_tp1, f["t"], f["z"])
        image = from_wavelet(x0)
        assert image.std() > 0.1  # a real signal through every layer, not the zero-init head's
        assert (image - f["x0_image"]).abs().max() <= TOL
        sched = diffusion.make_schedule(cfg.diffusion)
        x_t = diffusion.posterior_sample(sched, x0, x_tp1, f["t"], noise=noise)
        assert (from_wavelet(x_t) - f["x_t_image"]).abs().max() <= TOL


@pytest.mark.parametrize("name", ["d_small", "d_large"])
def test_imported_discriminator_gives_the_reference_logits(name: str) -> None:
    """The same uint8 images through our transform and D give the reference's logits (d_small: 4 layers,
    2 minibatch-stddev groups, pytorch_wavelets; d_large: 5 layers, wavediff band order)."""
    f, meta, cfg = _fixture(name)
    D = build_discriminator(cfg.model, cfg.diffusion)
    D.load_state_dict(reference.convert_discriminator(_state(f), cfg, meta["bands"]))
    with torch.no_grad():
        logits = D(to_wavelet(f["x_t_u8"].float() / 127.5 - 1), f["t"], to_wavelet(f["x_tp1_u8"].float() / 127.5 - 1))
    assert logits.std() > 0 and (logits - f["logits"]).abs().max() <= TOL


def test_band_order_conversion() -> None:
    """One image's subbands made by the reference's own DWT (LH/HL swapped) and by pytorch_wavelets, taken
    to waveforge's order, are to_wavelet's."""
    f = safetensors.torch.load_file(str(FIXTURES / "diffusion.safetensors"))
    ours = to_wavelet(f["bands.image"])
    for bands in reference.BANDS:
        theirs = f[f"bands.{bands}"]
        assert (reference.subbands_from_reference(theirs, bands) - ours).abs().max() < 1e-6
        assert (reference.subbands_to_reference(ours, bands) - theirs).abs().max() < 1e-6
    assert not torch.allclose(f["bands.wavediff"], f["bands.pytorch_wavelets"])


# --------------------------------------------------------------------------------------------------
# Import: export, sampling through the evaluation path, training state
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["g_plain", "g_wavelet_patch"])
def test_sampling_an_imported_export_gives_the_reference_samples(name: str, tmp_path: Path) -> None:
    """netG_*.pth (DDP prefix) -> import -> export folder -> inference.load_generator + generator_fn (what
    jobs/sample.py and jobs/evaluate.py run): the images of seeds 0..2 are those of the reference's
    sample_from_model with torch.manual_seed(seed) (same weights, same random numbers; pytorch_wavelets
    output transform: the band order in which the reference's noise lands in the same bands as ours)."""
    f, meta, cfg = _fixture(name)
    ckpt = tmp_path / "netG_12.pth"
    torch.save({k if k.startswith("module.") else f"module.{k}": v for k, v in _state(f).items()}, ckpt)
    summary = reference.import_checkpoint(ckpt, cfg, tmp_path / "export", bands=meta["sample_bands"])
    assert summary["kind"] == "generator" and summary["bands"] == "pytorch_wavelets"
    info = json.loads((tmp_path / "export" / "model_config.json").read_text())
    assert info["epoch"] == 12 and info["reference"]["kind"] == "generator"
    G, run_cfg, _ = inference.load_generator(str(tmp_path / "export"))
    seeds = f["sample_seeds"].tolist()
    want = f["sample_images"]
    m = run_cfg.model
    floats = from_wavelet(diffusion.sample_from_seeds(G, diffusion.make_schedule(run_cfg.diffusion), seeds,
                                                      (4 * m.channels, m.resolution // 2, m.resolution // 2), m.nz,
                                                      "cpu")).clamp(-1, 1)
    assert (floats - want).abs().max() <= TOL
    images = inference.generator_fn(G, run_cfg, "cpu")(seeds)  # uint8, channels_last CPU sampling path
    diff = (images.int() - to_uint8(want).int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01  # a float round-off may flip a rounding


def test_content_pth_converts_weights_ema_and_adam_moments() -> None:
    """content.pth written by the reference's EMA optimizer wrapper (see the fixture script: Adam with lr 0,
    one step with grad = w, then G += 1): every converted moment sits on its parameter (exp_avg = 0.5 w,
    exp_avg_sq = 0.1 w^2, ema = w, raw G = w + 1) through renames, NIN transposes, the q/k/v merge and the
    band reorders; counters and hyperparameters come along."""
    spec = json.loads((FIXTURES / "content_small.json").read_text())
    cfg = config.load(spec["recipe"], spec["overrides"])
    kind, content = reference.load_reference(FIXTURES / "content_small.pt")
    assert kind == "content"
    state = reference.convert_training_state(content, cfg, spec["bands"])
    G, D = build_generator(cfg.model, cfg.diffusion), build_discriminator(cfg.model, cfg.diffusion)
    G.load_state_dict(state.generator)
    D.load_state_dict(state.discriminator)
    assert state.generator_ema is not None
    G.load_state_dict(state.generator_ema)
    assert set(state.optimizer_g) == set(state.generator) and set(state.optimizer_d) == set(state.discriminator)
    for moments, weights, raw in ((state.optimizer_g, state.generator_ema, state.generator),
                                  (state.optimizer_d, state.discriminator, state.discriminator)):
        for k, w in weights.items():
            mom = moments[k]
            assert torch.allclose(mom["exp_avg"], 0.5 * w, rtol=1e-6, atol=0), k
            assert torch.allclose(mom["exp_avg_sq"], 0.1 * w * w, rtol=1e-5, atol=1e-30), k
            assert float(mom["step"]) == 1.0
            if raw is not weights:
                assert torch.allclose(raw[k], w + 1, rtol=0, atol=1e-6), k
    qkv = next(k for k in state.generator if k.endswith("qkv.weight"))  # the merged, transposed NIN layers
    assert state.optimizer_g[qkv]["exp_avg"].shape == state.generator[qkv].shape
    assert (state.epoch, state.global_step, state.images) == (4, 123, 123 * cfg.train.batch_size)
    assert state.hyper_g["lr"] == 0.0 and tuple(state.hyper_g["betas"]) == (0.5, 0.9) and "lr" in state.hyper_d


def test_import_of_content_pth_exports_the_ema_generator(tmp_path: Path) -> None:
    spec = json.loads((FIXTURES / "content_small.json").read_text())
    cfg = config.load(spec["recipe"], spec["overrides"])
    summary = reference.import_checkpoint(FIXTURES / "content_small.pt", cfg, tmp_path / "out", bands=spec["bands"])
    assert summary["kind"] == "content" and summary["weights"] == "ema" and summary["step"] == 123
    exported = safetensors.torch.load_file(str(tmp_path / "out" / "generator_ema.safetensors"))
    state = reference.convert_training_state(reference.load_reference(FIXTURES / "content_small.pt")[1], cfg,
                                             spec["bands"])
    assert state.generator_ema is not None
    assert all(torch.equal(exported[k], v) for k, v in state.generator_ema.items())
    info = json.loads((tmp_path / "out" / "model_config.json").read_text())
    assert info["step"] == 123 and info["model"]["nf"] == cfg.model.nf and info["recipe"] == "tiny"


@pytest.mark.slow
def test_training_state_becomes_a_checkpoint_that_train_resumes(tmp_path: Path) -> None:
    """content.pth -> jobs/import_reference.py -> OUT/checkpoints/step-123: the engines' fp32 masters, both
    Adam optimizers' moments and step counts are the converted ones; jobs/train.py resume=OUT continues
    from step 123 (images 123 x batch) and trains on."""
    from waveforge import data

    spec = json.loads((FIXTURES / "content_small.json").read_text())
    cfg = config.load(spec["recipe"], spec["overrides"])
    out = tmp_path / "imported"
    r = _job(f"checkpoint={FIXTURES / 'content_small.pt'}", f"recipe={spec['recipe']}", *spec["overrides"],
             f"bands={spec['bands']}", f"out={out}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "training state at step 123" in r.stdout
    state = reference.convert_training_state(reference.load_reference(FIXTURES / "content_small.pt")[1], cfg,
                                             spec["bands"])
    ckpt = out / "checkpoints" / "step-000000123"
    for tag, module, weights, moments in (
            ("G", build_generator(cfg.model, cfg.diffusion), state.generator, state.optimizer_g),
            ("D", build_discriminator(cfg.model, cfg.diffusion), state.discriminator, state.optimizer_d)):
        # ZeRO-1/2 on one rank: one flat fp32 partition per engine, parameters in module order (then padding)
        optim = torch.load(ckpt / tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                           weights_only=False)["optimizer_state_dict"]
        names = [n for n, _ in module.named_parameters()]
        adam = optim["base_optimizer_state"]["state"][0]
        for key in ("exp_avg", "exp_avg_sq"):
            want = torch.cat([moments[n][key].flatten() for n in names])
            assert torch.equal(adam[key][:want.numel()], want), (tag, key)
        assert float(adam["step"]) == 123.0
        master = torch.cat([weights[n].flatten() for n in names])
        assert torch.equal(optim["single_partition_of_fp32_groups"][0][:master.numel()], master), tag
    ema = safetensors.torch.load_file(str(ckpt / "ema.safetensors"))
    assert all(torch.equal(ema[k], v) for k, v in state.generator_ema.items())

    shards = tmp_path / "shards"
    data.make_shards("synthetic", str(shards), cfg.model.resolution, num_samples=64, samples_per_shard=16,
                     progress=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    run = tmp_path / "finetune"
    t = subprocess.run([sys.executable, "jobs/train.py", f"recipe={spec['recipe']}", *spec["overrides"],
                        f"resume={out}", f"run.dir={run}", f"data.url={shards}", "train.max_steps=125",
                        "train.log_every_images=16", "eval.every_images=0", "tracking.enabled=false",
                        "data.num_workers=0", "checkpoint.every_images=0"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert t.returncode == 0, t.stdout[-3000:] + t.stderr[-3000:]
    assert f"resumed from {ckpt} at step 123 ({123 * cfg.train.batch_size} images" in t.stdout
    assert "holds no data position" in t.stdout
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [124, 125] and all(math.isfinite(r["g_loss"]) for r in rows)


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------


def test_mismatches_name_keys_and_shapes(tmp_path: Path) -> None:
    f, meta, cfg = _fixture("g_wavelet")
    state = reference.strip_module_prefix(_state(f))
    out = tmp_path / "out"

    def fails(obj: object, match: str, recipe: config.Recipe = cfg, bands: str | None = meta["bands"]) -> str:
        path = tmp_path / "ckpt.pth"
        if isinstance(obj, bytes):
            path.write_bytes(obj)
        else:
            torch.save(obj, path)
        with pytest.raises(reference.ReferenceCheckpointError, match=match) as e:
            reference.import_checkpoint(path, recipe, out, bands=bands)
        assert not out.exists()  # nothing written
        return str(e.value)

    fails(b"not a checkpoint at all", "not a PyTorch checkpoint")
    fails({"epoch": 3}, "expected a reference netG_")
    fails({"weight": torch.zeros(2)}, "not a reference generator")
    fails({"start_conv.weight": torch.zeros(2)}, "discriminator state dict")
    fails({k: v for k, v in state.items() if k != "all_modules.5.Conv_1.weight"},
          r"missing keys all_modules\.5\.Conv_1")
    fails({**state, "extra.weight": torch.zeros(1)}, r"unexpected keys extra\.weight")
    bad = dict(state)
    bad["all_modules.2.weight"] = torch.zeros(4, 3, 3, 3)
    msg = fails(bad, r"all_modules\.2\.weight: expected \(4, 12, 3, 3\), found \(4, 3, 3, 3\)")
    assert "pixel-space DDGAN" in msg
    bad = dict(state)
    bad["all_modules.5.Conv_1.weight"] = state["all_modules.5.Conv_1.weight"].clone()
    bad["all_modules.5.Conv_1.weight"].view(-1)[0] = float("nan")
    fails(bad, r"non-finite values \(1 values in 1 tensor\(s\), e\.g\. .*\): nothing imported")
    # Another recipe's architecture: keys and shapes that do not fit, the first few named.
    msg = fails(state, "does not fit recipe 'cifar10'", recipe=config.load("cifar10"))
    assert "expected" in msg and "found" in msg
    fails(state, "bands=", recipe=config.load("tiny", ["model.nf=4"]), bands=None)  # no official run
    fails(state, "bands='haar' is not known", bands="haar")
    content = {"netG_dict": state, "epoch": 1}
    fails(content, "content.pth lacks netD_dict, optimizerG, optimizerD")
    out.write_text("a file")
    with pytest.raises(reference.ReferenceCheckpointError, match="not a folder"):
        torch.save(state, tmp_path / "good.pth")
        reference.import_checkpoint(tmp_path / "good.pth", cfg, out)


def _job(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'platform'}{os.pathsep}{REPO}", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "jobs/import_reference.py", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_import_job(tmp_path: Path) -> None:
    """The entry point: writes the export (sample.py / evaluate.py read it, see above); bad input exits 2 with
    one line and writes nothing."""
    f, meta, cfg = _fixture("g_plain")
    ckpt = tmp_path / "netG_5.pth"
    torch.save(_state(f), ckpt)
    overrides = json.loads(meta["overrides"])
    out = tmp_path / "export"
    r = _job(f"checkpoint={ckpt}", "recipe=cifar10", *overrides, f"out={out}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "imported generator" in r.stdout and "bands pytorch_wavelets" in r.stdout
    assert sorted(p.name for p in out.iterdir()) == ["generator_ema.safetensors", "model_config.json"]
    G, run_cfg, info = inference.load_generator(str(out))
    assert run_cfg.model.nf == cfg.model.nf and info["source"] == str(ckpt)
    bad = _job(f"checkpoint={ckpt}", "recipe=cifar10", f"out={tmp_path / 'bad'}")  # full-size recipe
    assert bad.returncode == 2 and not (tmp_path / "bad").exists()
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: generator state dict does not fit recipe 'cifar10'")
    missing = _job(f"checkpoint={tmp_path / 'nope.pth'}", f"out={tmp_path / 'bad'}")
    assert missing.returncode == 2 and "no such file" in missing.stderr and not (tmp_path / "bad").exists()
    assert _job("recipe=cifar10", f"out={out}").returncode == 2  # checkpoint= is required
