"""The EDM family: the preconditioned wavelet-space denoiser, sampling by recipe (seed-indexed, NFE as
documented), TDAS/PDS filters stored with the run, and edm_tiny training through the real trainer: its FID
falls, it resumes bit-exactly, and jobs/sweep_samplers.py turns it into a table and a plot."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from waveforge import config, data, edm, models, runtime, samplers, wavelet
from waveforge.models.denoiser import vp_sigma, vp_sigma_inv

REPO = Path(__file__).resolve().parents[1]
FEATURES = "eval.features=proxy"


def _denoiser(*overrides: str) -> tuple[config.Recipe, models.Denoiser]:
    cfg = config.load("edm_tiny", list(overrides))
    torch.manual_seed(0)
    D = models.build_network(cfg.model, cfg.diffusion).eval()
    return cfg, D


def test_edm_recipes_build_a_denoiser_without_gan_parts() -> None:
    for name in ("edm_tiny", "edm_cifar10", "edm_celebahq256"):
        cfg = config.load(name)
        with torch.device("meta"):
            D = models.build_network(cfg.model, cfg.diffusion)
        assert isinstance(D, models.Denoiser), name
        assert D.net.mapping is None and D.net.nz == 0, name  # no latent, no mapping network
        assert not any("style" in k for k, _ in D.named_parameters()), name  # no adaptive GroupNorm
    # EDM's CIFAR-10 DDPM++ (56M in pixel space): the same widths on 12 x 16 x 16 subbands
    cfg = config.load("edm_cifar10")
    assert 50e6 < models.count_params(models.build_network(cfg.model, cfg.diffusion)) < 60e6


@pytest.mark.parametrize("precond", ["edm", "vp"])
def test_preconditioning_matches_the_closed_forms(precond: str, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, D = _denoiser(f"diffusion.precond={precond}")
    x = torch.randn(4, 3, 32, 32)
    sigma = torch.tensor([0.002, 0.3, 2.0, 80.0])
    seen = {}

    def fake_net(y: torch.Tensor, c_noise: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        seen["y"], seen["c_noise"] = y, c_noise
        return torch.ones_like(y)  # F = 1 in wavelet space

    monkeypatch.setattr(D.net, "forward", fake_net)
    out = D(x, sigma)
    s = sigma.reshape(-1, 1, 1, 1).double()
    if precond == "edm":
        sd = cfg.diffusion.sigma_data
        c_skip, c_out, c_in = sd**2 / (s**2 + sd**2), s * sd / (s**2 + sd**2).sqrt(), 1 / (sd**2 + s**2).sqrt()
        c_noise = sigma.double().log() / 4
    else:
        c_skip, c_out, c_in = torch.ones_like(s), -s, 1 / (s**2 + 1).sqrt()
        c_noise = 999 * vp_sigma_inv(sigma.double(), 19.9, 0.1)
    expect = c_skip * x.double() + c_out * wavelet.idwt(torch.ones(4, 12, 16, 16)).double()
    torch.testing.assert_close(out.double(), expect, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(seen["c_noise"].double(), c_noise, rtol=1e-5, atol=1e-5)
    # the network sees the orthonormal Haar subbands of c_in x: same noise level in both spaces
    y = seen["y"].double()
    assert y.shape == (4, 12, 16, 16)
    torch.testing.assert_close(y.flatten(1).norm(dim=1), (c_in * x.double()).flatten(1).norm(dim=1), rtol=1e-5,
                               atol=1e-6)


def test_vp_sigma_inverse() -> None:
    t = torch.linspace(1e-5, 1, 50, dtype=torch.float64)
    torch.testing.assert_close(vp_sigma_inv(vp_sigma(t, 19.9, 0.1), 19.9, 0.1), t, rtol=1e-9, atol=1e-12)


def test_loss_is_the_weighted_denoising_error() -> None:
    """edm: lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 with ln sigma ~ N(p_mean, p_std^2); vp: 1 / sigma^2
    with t ~ U(epsilon_t, 1). Recomputed here from the same random draws."""
    x0 = torch.rand(64, 3, 4, 4) * 2 - 1
    den = lambda x, s: 0.5 * x  # noqa: E731 - any denoiser; a simple one keeps the arithmetic checkable
    for precond in ("edm", "vp"):
        cfg = config.load("edm_tiny", [f"diffusion.precond={precond}"])
        d = cfg.diffusion
        torch.manual_seed(0)
        loss, stats = edm.loss(den, x0, d)
        torch.manual_seed(0)
        if precond == "edm":
            sigma = torch.exp(torch.randn(64) * d.p_std + d.p_mean)
            weight = (sigma**2 + d.sigma_data**2) / (sigma * d.sigma_data) ** 2
        else:
            t = d.epsilon_t + torch.rand(64) * (1 - d.epsilon_t)
            sigma = vp_sigma(t, d.beta_max - d.beta_min, d.beta_min)
            weight = 1 / sigma**2
        noisy = x0 + torch.randn_like(x0) * sigma.reshape(-1, 1, 1, 1)
        err = (0.5 * noisy - x0).square().flatten(1).mean(1)
        expect = (weight * err).mean()
        torch.testing.assert_close(loss, expect, rtol=1e-5, atol=0)
        assert stats["loss"].item() == pytest.approx(expect.item(), rel=1e-5)
        # the unweighted errors below / above sigma_data, as (sum, count) device tensors for pooling
        low = sigma < d.sigma_data
        for key, mask in (("mse_low_sigma", low), ("mse_high_sigma", ~low)):
            total, count = stats[key]
            assert count.item() == mask.sum().item() and 0 < count.item() < 64, (precond, key)
            assert total.item() == pytest.approx(err[mask].sum().item(), rel=1e-5)


SAMPLER_CASES = [
    ["sampler=heun", "steps=4"],
    ["sampler=euler", "steps=5"],
    ["sampler=edm_stochastic", "steps=4", "sampler.s_churn=10"],
    ["sampler=generalized", "steps=4", "sampler.discretization=vp", "sampler.sigma_schedule=vp",
     "sampler.scaling=vp"],
    ["sampler=fastdpm", "steps=5", "schedule=step", "kappa=1"],
    ["sampler=fastdpm", "steps=10", "schedule=var", "sampler.spacing=linear", "kappa=0"],
    ["sampler=pc", "steps=3", "sampler.corrector_steps=1"],
]


@pytest.mark.parametrize("overrides", SAMPLER_CASES, ids=lambda o: "-".join(x.split("=")[-1] for x in o[:2]))
def test_every_sampler_is_seed_indexed_with_the_documented_nfe(overrides: list[str]) -> None:
    cfg, D = _denoiser(*overrides)
    calls = []

    def counted(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        return D(x, sigma)

    generate = edm.generator_fn(counted, cfg, "cpu")
    batch = generate([5, 6, 7])
    assert batch.dtype == torch.uint8 and batch.shape == (3, 3, 32, 32)
    assert len(calls) == edm.network_calls(cfg)
    alone = generate([6])
    # sample i is a function of seed i alone, whatever batch it is drawn in (up to float rounding)
    assert (batch[1].int() - alone[0].int()).abs().max() <= 1
    assert not torch.equal(batch[0], batch[2])


def test_noise_filters_are_estimated_once_and_stored_with_the_run(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    shards = tmp_path / "shards"
    data.make_shards("synthetic", str(shards), 32, num_samples=64, samples_per_shard=16, progress=False)
    cfg, D = _denoiser(f"data.url={shards}", "sampler=pc", "steps=2", "noise_filter=pds",
                       "sampler.filter_samples=32", "eval.batch_size=16")
    run = tmp_path / "run"
    filt = edm.noise_filter(cfg, D, "cpu", run)
    path = run / "noise_filters-data.pt"
    assert path.is_file()
    assert filt.freq.min() >= 1 - 1e-6 and filt.freq.max() <= 5 / 4 + 1e-6
    monkeypatch.setattr(samplers, "estimate_filters", lambda *a, **k: pytest.fail("estimated twice"))
    again = edm.noise_filter(cfg, D, "cpu", run)
    assert torch.equal(again.freq, filt.freq) and torch.equal(again.space, filt.space)
    images = edm.generator_fn(D, cfg, "cpu", noise_filter=again)([0, 1])
    assert images.shape == (2, 3, 32, 32)
    # without a filter setting nothing is estimated
    plain = config.load("edm_tiny")
    assert edm.noise_filter(plain, D, "cpu", run) is None
    # from the generated-vs-real spectrum gap (TDAS): the model's samples are drawn, the file is its own
    gap_cfg = config.load("edm_tiny", [f"data.url={shards}", "sampler=pc", "steps=2", "noise_filter=pds",
                                       "sampler.filter_source=gap", "sampler.filter_samples=32", "eval.batch_size=16"])
    gap = edm.noise_filter(gap_cfg, D, "cpu", run)
    assert (run / "noise_filters-gap.pt").is_file()
    assert gap.freq.min() >= 1 - 1e-6 and gap.freq.max() <= 5 / 4 + 1e-6


def test_pds_with_a_deterministic_sampler_is_a_clear_error() -> None:
    with pytest.raises(config.ConfigError, match="noise_filter"):
        config.load("edm_tiny", ["sampler=heun", "noise_filter=pds"])


# --------------------------------------------------------------------------------------------------
# Training through the real trainer
# --------------------------------------------------------------------------------------------------


def _train(overrides: list[str], tmp: Path, nproc: int = 1, timeout: int = 1500) -> None:
    spec = tmp / f"spec-{len(list(tmp.glob('spec-*')))}.json"
    spec.write_text(json.dumps({"runs": [{"recipe": "edm_tiny", "overrides": overrides}]}))
    env = {**os.environ, "OMP_NUM_THREADS": "1" if nproc > 1 else os.environ.get("OMP_NUM_THREADS", "2"),
           "DS_ACCELERATOR": "cpu",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR",
                                                  str(Path.home() / ".cache/waveforge/torch_extensions"))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(runtime.free_port()),
           str(REPO / "tests/train_worker.py"), str(spec)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise AssertionError(f"training failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-6000:]}")


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("edm-shards") / "synthetic32"
    data.make_shards("synthetic", str(out), 32, num_samples=512, samples_per_shard=64, progress=False)
    return str(out)


@pytest.fixture(scope="module")
def trained(shards: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """edm_tiny trained for a few CPU minutes with FID (injected extractor) at half-way and at the end."""
    tmp = tmp_path_factory.mktemp("edm-train")
    run = tmp / "run"
    _train([f"run.dir={run}", f"data.url={shards}", "data.num_workers=0", "tracking.enabled=false",
            "train.max_steps=300", "train.log_every_images=1600", "eval.every_images=2400", "eval.num_samples=256",
            "eval.batch_size=128", "eval.grid_size=16", "eval.kid=false", FEATURES, "steps=6",
            "checkpoint.every_images=2400"], tmp)
    return run


@pytest.mark.slow
def test_edm_tiny_trains_and_its_fid_falls(trained: Path, shards: str) -> None:
    from waveforge import inference
    from waveforge.evaluator import Evaluator

    rows = _rows(trained)
    fids = [r["eval_fid_proxy"] for r in rows if "eval_fid_proxy" in r]
    assert len(fids) == 2, rows  # at 2400 and 4800 images
    assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r)
    # the same evaluation (same seeds, sampler, reference statistics) of the initial network
    cfg = config.load("edm_tiny", [f"data.url={shards}", "eval.num_samples=256", "eval.batch_size=128",
                                   "eval.kid=false", FEATURES, "steps=6"])
    torch.manual_seed(cfg.run.seed)
    init = models.build_network(cfg.model, cfg.diffusion).eval()
    fid0 = Evaluator(cfg, "cpu").fid(inference.generator_fn(init, cfg, "cpu"), progress=False)["fid_proxy"]
    assert fids[0] < 0.7 * fid0 and fids[1] < 0.7 * fid0, (fid0, fids)  # learned the data: FID clearly lower
    assert list((trained / "samples").glob("grid-*.png"))


@pytest.mark.slow
def test_sweep_samplers_writes_table_and_plot(trained: Path, shards: str, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    cmd = [sys.executable, str(REPO / "jobs/sweep_samplers.py"), "recipe=edm_tiny", f"run={trained}",
           f"data.url={shards}", "samplers=heun,euler,fastdpm:kappa=0,pc:noise_filter=pds", "steps=2,4",
           "eval.num_samples=64", "eval.batch_size=64", "eval.kid=false", FEATURES, f"out={out}",
           f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "sampler.filter_samples=64", "--json"]
    env = dict(os.environ)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    rows = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(rows) == 8
    with open(out / "sweep.csv") as f:
        table = list(csv.DictReader(f))
    assert [(t["label"], int(t["steps"])) for t in table] == [(x["label"], x["steps"]) for x in rows]
    nfe = {(t["label"], int(t["steps"])): int(t["nfe"]) for t in table}
    assert nfe[("heun", 4)] == 7 and nfe[("euler", 4)] == 4 and nfe[("fastdpm:kappa=0", 2)] == 2
    assert all(math.isfinite(float(t["fid"])) for t in table)
    md_rows = [line for line in (out / "sweep.md").read_text().splitlines() if line.startswith("| ")]
    assert len(md_rows) == 1 + 8 and md_rows[0].startswith("| sampler")  # header + one row per point
    assert (out / "fid_vs_nfe.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (trained / "noise_filters-data.pt").is_file()  # stored with the run
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = json.loads((out / "tracking.json").read_text())["run_id"]
    arts = {a.path for a in client.list_artifacts(run_id)}
    assert {"sweep.csv", "sweep.md", "fid_vs_nfe.png"} <= arts
    assert len(client.get_metric_history(run_id, "fid_proxy/heun")) == 2


@pytest.mark.slow
def test_edm_resume_is_bit_exact(shards: str, tmp_path: Path) -> None:
    """The one-engine EDM loop resumes exactly: 6 steps straight == 3 steps + resume to 6 (weights, EMA)."""
    from safetensors.torch import load_file

    common = [f"data.url={shards}", "data.num_workers=0", "tracking.enabled=false", "eval.every_images=0",
              "checkpoint.every_images=0", "train.log_every_images=16", "dist.zero_stage_g=2"]
    _train([f"run.dir={tmp_path / 'a'}", "train.max_steps=6", *common], tmp_path)
    _train([f"run.dir={tmp_path / 'b'}", "train.max_steps=3", *common], tmp_path)
    _train([f"run.dir={tmp_path / 'b'}", "train.max_steps=6", *common], tmp_path)

    def ema(run: Path) -> dict:
        latest = (run / "checkpoints" / "latest").read_text().strip()
        return load_file(str(run / "checkpoints" / latest / "ema.safetensors"))

    a, b = ema(tmp_path / "a"), ema(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    la = [r["loss"] for r in _rows(tmp_path / "a")]
    lb = [r["loss"] for r in _rows(tmp_path / "b")]
    assert la == lb and len(la) == 6


def test_sweep_samplers_bad_input_exits_2(tmp_path: Path) -> None:
    env = dict(os.environ)
    for args, msg in ((["samplers=hune"], "unknown sampler 'hune'"), (["steps=4,x"], "comma-separated list"),
                      ([], "cannot load a generator")):
        r = subprocess.run([sys.executable, str(REPO / "jobs/sweep_samplers.py"), "recipe=edm_tiny",
                            f"run={tmp_path / 'nothing'}", *args], capture_output=True, text=True, timeout=300, env=env)
        assert r.returncode == 2 and msg in r.stderr, (args, r.returncode, r.stderr[-2000:])
