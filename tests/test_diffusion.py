"""Diffusion-GAN process: schedule values, posterior, samplers, losses, EMA, and a short CPU training."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.nn as nn

from waveforge import config
from waveforge.config import DiffusionConfig
from waveforge.diffusion import (
    d_loss,
    ema_decay_at,
    ema_update,
    g_loss,
    make_schedule,
    posterior_sample,
    q_sample,
    q_sample_pairs,
    sample,
    sample_from_seeds,
    seed_noise,
)
from waveforge.models import build_discriminator, build_generator
from waveforge.wavelet import to_wavelet

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest


def test_schedule_check_values_T2():
    s = make_schedule(DiffusionConfig(num_timesteps=2))
    assert torch.allclose(s.sqrt_alpha_bar, torch.tensor([1.0, 0.2805, 0.00657]), atol=1e-4)
    assert torch.allclose(s.posterior_c1, torch.tensor([1.0, 0.2804]), atol=1e-4)
    assert torch.allclose(s.posterior_c2, torch.tensor([0.0, 0.0216]), atol=1e-4)
    assert torch.allclose(s.posterior_std, torch.tensor([0.0, 0.960]), atol=1e-3)
    assert all(v.dtype == torch.float32 for v in (s.betas, s.posterior_c1, s.sqrt_alpha_bar))


@pytest.mark.parametrize("T", [2, 4])
def test_posterior_matches_closed_form(T):
    bmin, bmax = 0.1, 20.0
    s = make_schedule(DiffusionConfig(num_timesteps=T, beta_min=bmin, beta_max=bmax))
    t = torch.tensor([1e-3 + (1 - 1e-3) * i / T for i in range(T + 1)], dtype=torch.float64)
    alpha_bar = torch.exp(-bmin * t - 0.5 * (bmax - bmin) * t ** 2)
    assert torch.allclose(s.sqrt_alpha_bar.double(), alpha_bar.sqrt() / alpha_bar[0].sqrt(), rtol=1e-5)
    for k in range(T):
        # Gaussian posterior of x_k given x_{k+1} and x0 (x_k ~ N(m x0, v) with m, v of the chain from x_0).
        m = math.sqrt(alpha_bar[k] / alpha_bar[0]) if k > 0 else 1.0
        v = 1 - alpha_bar[k] / alpha_bar[0] if k > 0 else 0.0
        a = float(alpha_bar[k + 1] / alpha_bar[k])  # 1 - beta_{k+1}
        beta = 1 - a
        prec = (1 / v if v > 0 else math.inf) + a / beta
        var = 0.0 if math.isinf(prec) else 1 / prec
        c1 = var * m / v if v > 0 else 1.0
        c2 = var * math.sqrt(a) / beta
        assert s.posterior_c1[k].item() == pytest.approx(c1, rel=1e-4, abs=1e-6)
        assert s.posterior_c2[k].item() == pytest.approx(c2, rel=1e-4, abs=1e-6)
        assert s.posterior_var[k].item() == pytest.approx(var, rel=1e-4, abs=1e-7)


def test_forward_marginals_and_posterior_noise():
    torch.manual_seed(0)
    s = make_schedule(DiffusionConfig(num_timesteps=4))
    x0 = torch.full((20000, 1, 1, 1), 0.5)
    t = torch.full((20000,), 2, dtype=torch.long)
    x_t, x_tp1 = q_sample_pairs(s, x0, t)
    assert x_t.mean().item() == pytest.approx(0.5 * s.sqrt_alpha_bar[2].item(), abs=0.02)
    assert x_tp1.mean().item() == pytest.approx(0.5 * s.sqrt_alpha_bar[3].item(), abs=0.02)
    assert x_tp1.var().item() == pytest.approx(1 - s.sqrt_alpha_bar[3].item() ** 2, abs=0.03)
    assert torch.equal(q_sample(s, x0[:4], t[:4], noise=torch.zeros(4, 1, 1, 1)),
                       s.sqrt_alpha_bar[2] * x0[:4])
    # t = 0: the posterior sample is its mean (no noise).
    z = torch.zeros(3, 1, 2, 2)
    out = posterior_sample(s, z + 1, z, torch.zeros(3, dtype=torch.long))
    assert torch.allclose(out, s.posterior_c1[0] * (z + 1))


REFERENCE = Path(__file__).resolve().parent / "fixtures" / "reference" / "diffusion.safetensors"


@pytest.mark.parametrize("T", [1, 2, 4])
def test_schedule_tables_are_the_reference_float32_tables(T):
    """The coefficient tables equal those of the reference's diffusion.py (recorded from it by
    tests/fixtures/make_reference_fixtures.py), bit for bit: float64 schedule, float32 tables."""
    ref = safetensors.torch.load_file(str(REFERENCE))
    s = make_schedule(DiffusionConfig(num_timesteps=T))
    pairs = {"a_s": s.sqrt_alphas, "sigmas": s.sigmas, "a_s_cum": s.sqrt_alpha_bar,
             "sigmas_cum": s.sqrt_one_minus_alpha_bar, "posterior_mean_coef1": s.posterior_c1,
             "posterior_mean_coef2": s.posterior_c2, "posterior_variance": s.posterior_var,
             "posterior_log_variance_clipped": torch.log(s.posterior_var.clamp(min=1e-20))}
    for name, ours in pairs.items():
        assert torch.equal(ours, ref[f"T{T}.{name}"]), name
    assert torch.equal(s.posterior_std, torch.exp(0.5 * ref[f"T{T}.posterior_log_variance_clipped"]))


@pytest.mark.parametrize("T", [1, 2, 4])
def test_q_sample_pairs_draws_its_noises_in_the_reference_order(T):
    """From the same RNG state: first the step noise eps' of x_{t+1}, then q_sample's eps of x_t (written out
    here), and the reference's own q_sample_pairs output for that state."""
    s = make_schedule(DiffusionConfig(num_timesteps=T))
    ref = safetensors.torch.load_file(str(REFERENCE))
    x0, t = ref[f"T{T}.x0"], ref[f"T{T}.t"]
    torch.manual_seed(20 + T)
    step_noise, noise = torch.randn_like(x0), torch.randn_like(x0)
    x_t = s.sqrt_alpha_bar[t][:, None, None, None] * x0 + s.sqrt_one_minus_alpha_bar[t][:, None, None, None] * noise
    x_tp1 = s.sqrt_alphas[t + 1][:, None, None, None] * x_t + s.sigmas[t + 1][:, None, None, None] * step_noise
    torch.manual_seed(20 + T)
    ours = q_sample_pairs(s, x0, t)
    assert torch.equal(ours[0], x_t) and torch.equal(ours[1], x_tp1)
    assert torch.equal(ours[0], ref[f"T{T}.x_t"]) and torch.equal(ours[1], ref[f"T{T}.x_tp1"])


def test_q_sample_at_t0_is_x0_as_in_the_reference():
    """beta_0 = 1e-8 vanishes in float32 (1 - beta_0 = 1): sqrt(1 - alpha_bar_0) = 0, so x_0 = x0 exactly, as
    the reference's q_sample gives (its recorded output for noise = 1)."""
    ref = safetensors.torch.load_file(str(REFERENCE))
    for T in (1, 2, 4):
        s = make_schedule(DiffusionConfig(num_timesteps=T))
        x0 = ref[f"T{T}.x0"]
        t0 = torch.zeros(x0.shape[0], dtype=torch.long)
        out = q_sample(s, x0, t0, noise=torch.ones_like(x0))
        assert torch.equal(out, x0) and torch.equal(out, ref[f"T{T}.q_sample_t0"])
        assert s.sqrt_one_minus_alpha_bar[0] == 0 and s.sqrt_alpha_bar[0] == 1


class CountingG(nn.Module):
    """Deterministic toy generator that records its calls."""

    def __init__(self):
        super().__init__()
        self.calls: list[int] = []
        self.w = nn.Parameter(torch.tensor(0.5))

    def forward(self, x, t, z):
        self.calls.append(int(t[0]))
        return torch.tanh(self.w * x + z[:, :1, None, None] * 0.1 + t[:, None, None, None] * 0.01)


@pytest.mark.parametrize("T", [1, 2, 4])
def test_sampling_calls_G_T_times(T):
    s = make_schedule(DiffusionConfig(num_timesteps=T))
    G = CountingG()
    out = sample(G, s, torch.randn(2, 12, 4, 4), latents=lambda step: torch.randn(2, 8))
    assert G.calls == list(reversed(range(T))) and out.shape == (2, 12, 4, 4)


def test_seed_sampling_independent_of_batching():
    cfg = config.load("tiny")
    torch.manual_seed(0)
    G = build_generator(cfg.model, cfg.diffusion).eval()
    s = make_schedule(cfg.diffusion)
    shape, nz = (12, 16, 16), cfg.model.nz
    seeds = list(range(100, 108))
    whole = sample_from_seeds(G, s, seeds, shape, nz, "cpu")
    halves = torch.cat([sample_from_seeds(G, s, seeds[:4], shape, nz, "cpu"),
                        sample_from_seeds(G, s, seeds[4:], shape, nz, "cpu")])
    assert whole.shape == (8, *shape)
    assert torch.allclose(whole, halves, atol=1e-5)
    assert not torch.allclose(whole[0], whole[1])
    again = sample_from_seeds(G, s, [103], shape, nz, "cpu")
    assert torch.allclose(again[0], whole[3], atol=1e-5)


def test_seed_sampling_uses_each_seeds_stream_in_seed_noise_order():
    """x_T, then per step (T-1 .. 0) z then the posterior noise, from one CPU generator per seed: the images of
    a seed stay the same when the sampler draws the numbers step by step."""
    cfg = config.load("tiny")
    torch.manual_seed(0)
    G = build_generator(cfg.model, cfg.diffusion).eval()
    s = make_schedule(cfg.diffusion)
    shape, nz, seeds = (12, 16, 16), cfg.model.nz, [7, 3, 11]
    per_seed = [seed_noise(seed, shape, nz, s.num_timesteps) for seed in seeds]
    x_T = torch.stack([p[0] for p in per_seed])
    zs = [torch.stack([p[1][k] for p in per_seed]) for k in range(s.num_timesteps)]
    noises = [torch.stack([p[2][k] for p in per_seed]) for k in range(s.num_timesteps)]
    out = sample_from_seeds(G, s, seeds, shape, nz, "cpu")
    assert out.is_contiguous()  # the CPU chain runs in channels_last; the result comes back contiguous
    assert torch.equal(out, sample(G, s, x_T, zs, noises))
    # The channels_last chain gives the images of the plain layout (up to float rounding).
    plain = sample(lambda x, t, z: G(x.contiguous(), t, z), s, x_T, zs, noises)
    assert torch.allclose(out, plain, atol=1e-5)


def test_sampling_a_bf16_generator_keeps_the_chain_in_fp32():
    cfg = config.load("tiny")
    G = build_generator(cfg.model, cfg.diffusion).to(torch.bfloat16).eval()
    out = sample_from_seeds(G, make_schedule(cfg.diffusion), [1, 2], (12, 16, 16), cfg.model.nz, "cpu")
    assert out.dtype == torch.float32 and out.shape == (2, 12, 16, 16) and torch.isfinite(out).all()


def _tiny_models(seed: int = 0):
    cfg = config.load("tiny")
    torch.manual_seed(seed)
    return cfg, build_generator(cfg.model, cfg.diffusion), build_discriminator(cfg.model, cfg.diffusion)


def test_losses_are_one_scalar_and_never_call_backward():
    cfg, G, D = _tiny_models()
    s = make_schedule(cfg.diffusion)
    x0 = to_wavelet(torch.rand(4, 3, 32, 32) * 2 - 1)
    t = torch.randint(0, 2, (4,))
    z = torch.randn(4, cfg.model.nz)
    loss, stats = d_loss(G, D, s, x0, t, z, r1_gamma=1.0, do_r1=True)
    assert loss.dim() == 0 and "r1" in stats and stats["r1"] > 0
    assert all(p.grad is None for p in list(D.parameters()) + list(G.parameters()))
    loss.backward()
    assert all(p.grad is None for p in G.parameters())  # G ran without gradients in the D step
    assert sum(p.grad.abs().sum() for p in D.parameters() if p.grad is not None) > 0
    no_r1, stats = d_loss(G, D, s, x0, t, z, r1_gamma=1.0, do_r1=False)
    assert "r1" not in stats
    # R1 is exactly gamma/2 E|grad_{x_t} D|^2 (same noise draws -> compare via the stats difference).
    D.zero_grad()
    D.requires_grad_(False)
    gl, gstats = g_loss(G, D, s, x0, t, z, rec_weight=1.0)
    assert gl.dim() == 0 and gstats["g_loss_rec"] > 0
    gl.backward()
    assert all(p.grad is None for p in D.parameters())
    assert sum(p.grad.abs().sum() for p in G.parameters() if p.grad is not None) > 0


def test_r1_value():
    """R1 = gamma/2 * mean over the batch of |grad_{x_t} D(x_t, t, x_tp1)|^2, checked on a linear D."""
    s = make_schedule(DiffusionConfig(num_timesteps=2))
    w = torch.randn(12, 4, 4)

    def D(x_t, t, x_tp1):
        return (x_t * w).flatten(1).sum(1) + 0 * x_tp1.sum()

    def G(x, t, z):
        return x

    x0 = torch.rand(3, 12, 4, 4)
    t = torch.zeros(3, dtype=torch.long)
    _, stats = d_loss(G, D, s, x0, t, torch.randn(3, 4), r1_gamma=2.0, do_r1=True)
    assert stats["r1"].item() == pytest.approx(w.square().sum().item(), rel=1e-5)


def test_ema():
    a, b = nn.Linear(3, 2), nn.Linear(3, 2)
    with torch.no_grad():
        for p in a.parameters():
            p.zero_()
        for p in b.parameters():
            p.fill_(1.0)
    ema_update(a, b, 0.9)
    assert all(torch.allclose(p, torch.full_like(p, 0.1)) for p in a.parameters())
    assert ema_decay_at(10_000, 64, 0.9999, 0) == 0.9999
    assert ema_decay_at(0, 64, 0.9999, 1000) == 0.0
    assert 0 < ema_decay_at(500, 64, 0.9999, 1000) < 0.9999
    assert ema_decay_at(1000, 64, 0.9999, 1000) == 0.9999


def _draw_images(n: int, gen: torch.Generator) -> torch.Tensor:
    """Procedural 32 px images in [-1, 1]: a colour gradient background with a filled disc and a bar."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 32), torch.linspace(0, 1, 32), indexing="ij")
    imgs = []
    for _ in range(n):
        p = torch.rand(12, generator=gen)
        bg = (p[0:3, None, None] * xx + p[3:6, None, None] * (1 - yy)) * 0.8
        disc = ((xx - (0.25 + 0.5 * p[6])) ** 2 + (yy - (0.25 + 0.5 * p[7])) ** 2) < (0.08 + 0.1 * p[8]) ** 2
        bar = (yy > 0.1 + 0.7 * p[9]) & (yy < 0.2 + 0.7 * p[9])
        img = bg.clone()
        img = torch.where(disc, torch.stack([p[10], 1 - p[10], p[11]])[:, None, None], img)
        img = torch.where(bar, torch.tensor([1.0, 1.0, 1.0])[:, None, None] * p[11], img)
        imgs.append(img * 2 - 1)
    return torch.stack(imgs).clamp(-1, 1)


@pytest.mark.slow
def test_tiny_learns():
    """A short CPU training of the `tiny` recipe lowers a held-out x0-prediction error clearly below init.

    Metric: L1 between G(x_1, t=0, z) and x0 on the LL band (the coarse image, where the signal is) of
    64 held-out images, with fixed noise and latents. At init G outputs ~0 (zero-initialised head).
    """
    start = time.time()
    cfg, G, D = _tiny_models(seed=1)
    s = make_schedule(cfg.diffusion)
    gen = torch.Generator().manual_seed(0)
    train = to_wavelet(_draw_images(256, gen))
    held = to_wavelet(_draw_images(64, gen))
    # Held-out metric: L1(G(x_1, t=0, z), x0) with fixed noise and latents.
    hg = torch.Generator().manual_seed(1)
    t_eval = torch.zeros(64, dtype=torch.long)
    x1 = s.sqrt_alpha_bar[1] * held + s.sqrt_one_minus_alpha_bar[1] * torch.randn(held.shape, generator=hg)
    z_eval = torch.randn(64, cfg.model.nz, generator=hg)

    def metric() -> float:
        with torch.no_grad():
            return (G(x1, t_eval, z_eval)[:, :3] - held[:, :3]).abs().mean().item()

    before = metric()
    t_cfg = cfg.train
    opt_g = torch.optim.Adam(G.parameters(), lr=5e-4, betas=(t_cfg.beta1, t_cfg.beta2))
    opt_d = torch.optim.Adam(D.parameters(), lr=t_cfg.lr_d, betas=(t_cfg.beta1, t_cfg.beta2))
    B = 16
    for step in range(60):
        idx = torch.randint(0, train.shape[0], (B,))
        x0 = train[idx]
        D.requires_grad_(True)
        t = torch.randint(0, s.num_timesteps, (B,))
        loss, _ = d_loss(G, D, s, x0, t, torch.randn(B, cfg.model.nz), t_cfg.r1_gamma, step % t_cfg.lazy_reg == 0)
        opt_d.zero_grad(set_to_none=True)
        loss.backward()
        opt_d.step()
        D.requires_grad_(False)
        t = torch.randint(0, s.num_timesteps, (B,))
        loss, _ = g_loss(G, D, s, x0, t, torch.randn(B, cfg.model.nz), t_cfg.rec_weight)
        opt_g.zero_grad(set_to_none=True)
        loss.backward()
        opt_g.step()
        if time.time() - start > 40:
            break
    after = metric()
    assert after < 0.8 * before, (before, after, step)
    print(f"tiny learns: {before:.4f} -> {after:.4f} in {step + 1} steps, {time.time() - start:.1f} s")
