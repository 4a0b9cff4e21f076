"""The diffusion-GAN process of WaveDiff / DDGAN: schedule, forward noising, posterior, sampling, losses, EMA.

Plain torch functions; the trainer owns optimisers, engines and `backward()`. Shapes: x0 / x_t are the
wavelet subbands (B, 4*channels, R/2, R/2) in [-1, 1]; t is a LongTensor (B,) with values 0..T-1.

Process (T steps, t_i = 1e-3 + (1 - 1e-3) i / T, i = 0..T):
    VP: sigma^2(t) = 1 - exp(-beta_min t - (beta_max - beta_min) t^2 / 2), alpha_bar_i = 1 - sigma^2(t_i)
    (geometric: sigma^2(t) = beta_min (beta_max / beta_min)^t);  beta_i = 1 - alpha_bar_i / alpha_bar_{i-1},
    beta_0 = 1e-8 (tables in float32, computed as the reference computes them: `make_schedule`).
    q_sample: x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps (t = 0..T-1);
    pair: x_{t+1} = sqrt(1 - beta_{t+1}) x_t + sqrt(beta_{t+1}) eps'.  The generator predicts x0 from
    x_{t+1}; x_t is drawn from the Gaussian posterior q(x_t | x_{t+1}, x0_hat).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from waveforge.config import DiffusionConfig

__all__ = ["Schedule", "make_schedule", "q_sample", "q_sample_pairs", "posterior_sample", "sample",
           "sample_from_seeds", "seed_noise", "d_loss", "g_loss", "ema_update", "ema_decay_at"]

EPS_T = 1e-3  # first diffusion time (t_0)


@dataclass
class Schedule:
    """Coefficient tables (float32, computed as the reference computes them, see `make_schedule`). Index [t]
    of the (T+1,) tables is step t; of the (T,) posterior tables, index [t] describes x_t given x_{t+1}."""

    num_timesteps: int
    betas: torch.Tensor  # (T+1,) beta_i, beta_0 = 1e-8
    sqrt_alphas: torch.Tensor  # (T+1,) sqrt(1 - beta_i): x_{i} -> x_{i+1} signal factor
    sigmas: torch.Tensor  # (T+1,) sqrt(beta_i): x_{i} -> x_{i+1} noise factor
    sqrt_alpha_bar: torch.Tensor  # (T+1,) sqrt(alpha_bar_i) = prod_{j<=i} sqrt(1 - beta_j)
    sqrt_one_minus_alpha_bar: torch.Tensor  # (T+1,) sqrt(1 - sqrt_alpha_bar^2); 0 at t = 0 in float32
    posterior_c1: torch.Tensor  # (T,) coefficient of x0_hat in the posterior mean
    posterior_c2: torch.Tensor  # (T,) coefficient of x_{t+1}
    posterior_var: torch.Tensor  # (T,)
    posterior_std: torch.Tensor  # (T,) exp(log(max(var, 1e-20)) / 2) (1e-10 at t = 0, where no noise is added)

    def to(self, device: torch.device | str) -> Schedule:
        return Schedule(**{f.name: (v.to(device) if isinstance(v := getattr(self, f.name), torch.Tensor) else v)
                           for f in fields(self)})


def make_schedule(dcfg: DiffusionConfig, device: torch.device | str = "cpu") -> Schedule:
    """The coefficient tables of the recipe's process, computed step for step as the reference's diffusion.py
    computes them: the times and the noise variances in float64, the betas rounded to float32, and every
    table from there in float32 arithmetic (so a sampling or training step uses the reference's numbers).

    One consequence worth knowing: beta_0 = 1e-8 rounds away in 1 - beta_0 (float32), so sqrt_alpha_bar[0] = 1
    and sqrt_one_minus_alpha_bar[0] = 0: q_sample at t = 0 returns x0 itself, as the reference's does (the
    float64 value would be a noise std of 1e-4).
    """
    T = dcfg.num_timesteps
    if T < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {T}")
    t = torch.arange(T + 1, dtype=torch.float64) / T * (1.0 - EPS_T) + EPS_T
    if dcfg.use_geometric:
        var = dcfg.beta_min * (dcfg.beta_max / dcfg.beta_min) ** t
    else:
        log_mean_coeff = -0.25 * t ** 2 * (dcfg.beta_max - dcfg.beta_min) - 0.5 * t * dcfg.beta_min
        var = 1.0 - torch.exp(2.0 * log_mean_coeff)
    alpha_bars = 1.0 - var
    if not bool((alpha_bars > 0).all()):
        raise ValueError(f"diffusion schedule: beta_min={dcfg.beta_min}, beta_max={dcfg.beta_max} "
                         f"(geometric={dcfg.use_geometric}) gives a noise variance >= 1; lower beta_max")
    betas64 = torch.cat([torch.tensor([1e-8], dtype=torch.float64), 1.0 - alpha_bars[1:] / alpha_bars[:-1]])
    betas = betas64.to(torch.float32)
    sqrt_alphas = torch.sqrt(1.0 - betas)
    sqrt_alpha_bar = torch.cumprod(sqrt_alphas, 0)
    # The reference takes this root with NumPy (correctly rounded; torch's float32 CPU sqrt can be 1 ulp off):
    # the root of the float32 value, taken in float64 and rounded once, is that.
    sqrt_one_minus_alpha_bar = torch.sqrt((1.0 - sqrt_alpha_bar ** 2).double()).float()
    # Posterior tables over the T transitions (beta'_k = beta_{k+1}, alpha_bar'_{-1} = 1).
    pb = betas[1:]
    pa = 1.0 - pb
    pab = torch.cumprod(pa, 0)
    pab_prev = torch.cat([torch.ones(1, dtype=torch.float32), pab[:-1]])
    var_post = pb * (1.0 - pab_prev) / (1.0 - pab)
    c1 = pb * torch.sqrt(pab_prev) / (1.0 - pab)
    c2 = (1.0 - pab_prev) * torch.sqrt(pa) / (1.0 - pab)
    return Schedule(
        num_timesteps=T,
        betas=betas.to(device),
        sqrt_alphas=sqrt_alphas.to(device),
        sigmas=torch.sqrt(betas).to(device),
        sqrt_alpha_bar=sqrt_alpha_bar.to(device),
        sqrt_one_minus_alpha_bar=sqrt_one_minus_alpha_bar.to(device),
        posterior_c1=c1.to(device),
        posterior_c2=c2.to(device),
        posterior_var=var_post.to(device),
        posterior_std=torch.exp(0.5 * torch.log(var_post.clamp(min=1e-20))).to(device),
    )


def _at(table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """table[t] shaped (B, 1, 1, 1) for broadcasting against `like`, in its dtype."""
    return table.to(like.device)[t].to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def _check_t(sched: Schedule, t: torch.Tensor, x: torch.Tensor) -> None:
    if t.dim() != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(f"t must have shape ({x.shape[0]},), got {tuple(t.shape)}")


def q_sample(sched: Schedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
    """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise (with the float32 tables: x0 itself at t = 0)."""
    _check_t(sched, t, x0)
    noise = torch.randn_like(x0) if noise is None else noise
    return _at(sched.sqrt_alpha_bar, t, x0) * x0 + _at(sched.sqrt_one_minus_alpha_bar, t, x0) * noise


def q_sample_pairs(sched: Schedule, x0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, x_{t+1}) for t in 0..T-1: x_t from q_sample, then one forward step with fresh noise.

    The two noises are drawn in the reference's order: first the step's noise eps' (for x_{t+1}), then
    q_sample's eps (for x_t), both with torch.randn_like; so from the same RNG state the pair is the
    reference's pair."""
    step_noise = torch.randn_like(x0)
    x_t = q_sample(sched, x0, t)
    x_tp1 = _at(sched.sqrt_alphas, t + 1, x0) * x_t + _at(sched.sigmas, t + 1, x0) * step_noise
    return x_t, x_tp1


def posterior_sample(sched: Schedule, x0_hat: torch.Tensor, x_tp1: torch.Tensor, t: torch.Tensor,
                     noise: torch.Tensor | None = None) -> torch.Tensor:
    """x_t ~ q(x_t | x_{t+1}, x0_hat) = c1 x0_hat + c2 x_{t+1} + [t > 0] std noise."""
    _check_t(sched, t, x_tp1)
    noise = torch.randn_like(x_tp1) if noise is None else noise
    mean = _at(sched.posterior_c1, t, x_tp1) * x0_hat + _at(sched.posterior_c2, t, x_tp1) * x_tp1
    nonzero = (t > 0).to(x_tp1.dtype).reshape(-1, *([1] * (x_tp1.dim() - 1)))
    return mean + nonzero * _at(sched.posterior_std, t, x_tp1) * noise


Latents = Sequence[torch.Tensor] | Callable[[int], torch.Tensor]


@torch.no_grad()
def sample(G: Callable[..., torch.Tensor], sched: Schedule, x_T: torch.Tensor, latents: Latents,
           noises: Latents | None = None) -> torch.Tensor:
    """Run the T-step sampler from x_T; returns x_0 (wavelet space, not clamped). G is called exactly T times.

    latents: a list of T tensors (B, nz), used in call order (the first at step T-1), or a callable
    step -> (B, nz). noises: the same for the posterior noise (None = torch.randn_like). Per step the
    callables are called in the order latents(step), G, noises(step): the posterior noise is fetched after
    G is launched, so on a GPU drawing it on the host overlaps the network's kernels.
    """
    # A module with 16-bit weights (a bf16 engine's module) gets 16-bit inputs; the chain stays in x_T's dtype.
    first = next(G.parameters(), None) if isinstance(G, nn.Module) else None
    g_dtype = first.dtype if first is not None and first.is_floating_point() else x_T.dtype
    # On CPU the chain runs in channels_last: every layer keeps that layout, and oneDNN's convolutions on
    # it skip the reorders into and out of its blocked layout (the bulk of the CPU time is convolutions).
    x = x_T.contiguous(memory_format=torch.channels_last) if x_T.device.type == "cpu" and x_T.dim() == 4 else x_T
    B = x.shape[0]
    for k, step in enumerate(reversed(range(sched.num_timesteps))):
        t = torch.full((B,), step, dtype=torch.long, device=x.device)
        z = latents(step) if callable(latents) else latents[k]
        x0_hat = G(x.to(g_dtype), t, z.to(g_dtype)).to(x.dtype)
        noise = None if noises is None else (noises(step) if callable(noises) else noises[k])
        x = posterior_sample(sched, x0_hat, x, t, noise=noise)
    return x.contiguous()


def seed_noise(seed: int, shape: Sequence[int], nz: int, num_timesteps: int
               ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """All randomness of one sample from one CPU torch.Generator: (x_T, [z per step], [noise per step]).

    Draw order: x_T, then for each step in sampling order (T-1 .. 0) its latent z then its posterior noise.
    """
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    x_T = torch.randn(tuple(shape), generator=g)
    zs, noises = [], []
    for _ in range(num_timesteps):
        zs.append(torch.randn(nz, generator=g))
        noises.append(torch.randn(tuple(shape), generator=g))
    return x_T, zs, noises


@torch.no_grad()
def sample_from_seeds(G: Callable[..., torch.Tensor], sched: Schedule, seeds: Sequence[int],
                      shape: Sequence[int], nz: int, device: torch.device | str) -> torch.Tensor:
    """Samples (len(seeds), *shape) in wavelet space; sample i is a function of seeds[i] alone.

    shape: one sample's subband shape, e.g. (12, R/2, R/2). The same seed gives the same image whatever
    the batch it is drawn in, however the seeds are split over ranks and on whichever device (up to float
    rounding): every seed's numbers come from its own CPU generator in `seed_noise`'s order. They are drawn
    step by step as the sampler needs them, so on a GPU a step's posterior noise is drawn while its
    generator call runs, and sent through pinned memory without blocking.
    """
    if len(seeds) == 0:
        raise ValueError("sample_from_seeds: no seeds given")
    device = torch.device(device)
    shape = tuple(shape)
    gens = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
    pinned = device.type == "cuda"

    def draw(size: tuple[int, ...]) -> torch.Tensor:
        """The next `size` numbers of every seed's generator, stacked (len(seeds), *size), on `device`."""
        host = torch.empty((len(gens), *size), pin_memory=pinned)
        for row, g in zip(host, gens, strict=True):
            torch.randn(size, generator=g, out=row)
        return host.to(device, non_blocking=pinned)

    x_T = draw(shape)
    return sample(G, sched, x_T, latents=lambda step: draw((nz,)), noises=lambda step: draw(shape))


# --------------------------------------------------------------------------------------------------
# Losses. The trainer calls backward() once on the returned scalar.
# --------------------------------------------------------------------------------------------------


def d_loss(G: Callable[..., torch.Tensor], D: Callable[..., torch.Tensor], sched: Schedule, x0: torch.Tensor,
           t: torch.Tensor, z: torch.Tensor, r1_gamma: float, do_r1: bool
           ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Discriminator loss: softplus(-D(real)) + softplus(D(fake)) [+ r1_gamma/2 E|grad_{x_t} D(real)|^2].

    real = (x_t, t, x_{t+1}) from q_sample_pairs; fake = (x'_t, t, x_{t+1}) with x'_t the posterior sample
    from G(x_{t+1}, t, z), G run without gradients. R1 only when `do_r1` (the lazy steps; not multiplied
    by the interval, as in the reference). Returns (loss, stats of detached scalars).
    """
    x_t, x_tp1 = q_sample_pairs(sched, x0, t)
    x_tp1 = x_tp1.detach()
    use_r1 = do_r1 and r1_gamma > 0
    x_t = x_t.detach().requires_grad_(use_r1)
    d_real = D(x_t, t, x_tp1).reshape(-1)
    loss_real = F.softplus(-d_real).mean()
    if use_r1:
        (grad,) = torch.autograd.grad(d_real.sum(), x_t, create_graph=True)
        r1 = grad.float().square().flatten(1).sum(1).mean() * (r1_gamma / 2)
    else:
        r1 = torch.zeros((), device=x0.device)
    with torch.no_grad():
        x_fake = posterior_sample(sched, G(x_tp1, t, z), x_tp1, t)
    d_fake = D(x_fake, t, x_tp1).reshape(-1)
    loss_fake = F.softplus(d_fake).mean()
    loss = loss_real + loss_fake + r1
    stats = {"d_loss": loss.detach(), "d_loss_real": loss_real.detach(), "d_loss_fake": loss_fake.detach(),
             "d_real": d_real.detach().float().mean(), "d_fake": d_fake.detach().float().mean()}
    if use_r1:
        stats["r1"] = r1.detach()
    return loss, stats


def g_loss(G: Callable[..., torch.Tensor], D: Callable[..., torch.Tensor], sched: Schedule, x0: torch.Tensor,
           t: torch.Tensor, z: torch.Tensor, rec_weight: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Generator loss: softplus(-D(x'_t, t, x_{t+1})) + rec_weight * L1(x0_hat, x0).

    Gradients also flow into D's parameters if they require grad: freeze D first (`D.requires_grad_(False)`).
    """
    _, x_tp1 = q_sample_pairs(sched, x0, t)
    x_tp1 = x_tp1.detach()
    x0_hat = G(x_tp1, t, z)
    x_fake = posterior_sample(sched, x0_hat, x_tp1, t)
    d_fake = D(x_fake, t, x_tp1).reshape(-1)
    adv = F.softplus(-d_fake).mean()
    rec = F.l1_loss(x0_hat.float(), x0.float())
    loss = adv + rec_weight * rec
    stats = {"g_loss": loss.detach(), "g_loss_adv": adv.detach(), "g_loss_rec": rec.detach(),
             "g_d_fake": d_fake.detach().float().mean()}
    return loss, stats


# --------------------------------------------------------------------------------------------------
# EMA of the generator
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def ema_update(ema_model: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model for parameters; buffers are copied."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"ema decay must be in [0, 1], got {decay}")
    ema_params = list(ema_model.parameters())
    params = [p.detach().to(e.dtype) for p, e in zip(model.parameters(), ema_params, strict=True)]
    if ema_params:
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)
    for be, b in zip(ema_model.buffers(), model.buffers(), strict=True):
        be.copy_(b)


def ema_decay_at(images_seen: int, batch: int, base_decay: float, warmup_images: int) -> float:
    """EMA decay for the next update of `batch` images.

    warmup_images = 0: the fixed `base_decay` (the reference). Otherwise the EMA half-life (in images,
    batch * ln 0.5 / ln base_decay) grows linearly from 0 to its full value over the first
    `warmup_images` images, so early weights are not averaged with the random init (EDM's ramp).
    """
    if warmup_images <= 0 or images_seen >= warmup_images or base_decay <= 0.0:
        return base_decay
    halflife = batch * math.log(0.5) / math.log(base_decay) * (images_seen / warmup_images)
    return 0.5 ** (batch / max(halflife, 1e-8))
