"""The EDM diffusion family: its training loss, and sampling chosen by the recipe's `sampler` section.

    loss(D, x0, dcfg)                         the trainer's one loss (one DeepSpeed engine, see train.py)
    sample(D, latents, cfg, randn_like, M)     sampler.name -> the matching function of waveforge.samplers
    generator_fn(D, cfg, device, M)            seeds -> uint8 images (sample i from seed i), for FID and grids
    noise_filter(cfg, D, device, run_dir)      TDAS/PDS filters: loaded, or estimated once and stored

D is waveforge.models.Denoiser (D(x; sigma) on images; the U-Net inside works on Haar subbands).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from waveforge import data, dist, samplers
from waveforge.config import ConfigError, DiffusionConfig, Recipe
from waveforge.images import to_uint8
from waveforge.models.denoiser import edm_loss_weight, vp_sigma

# --------------------------------------------------------------------------------------------------
# Training loss
# --------------------------------------------------------------------------------------------------


def loss(D: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x0: torch.Tensor,
         dcfg: DiffusionConfig) -> tuple[torch.Tensor, dict[str, Any]]:
    """Denoising score matching with EDM's weighting (Karras et al. 2022, Eq. 8 / Table 1).

    edm: ln sigma ~ N(p_mean, p_std^2), weight (sigma^2 + sd^2) / (sigma sd)^2;
    vp:  t ~ U(epsilon_t, 1), sigma = sigma_vp(t), weight 1 / sigma^2.
    loss = mean over batch and elements of weight * (D(x0 + sigma n; sigma) - x0)^2 (a mean, not EDM's sum
    over pixels: Adam is invariant to that constant). Random draws come from torch's global RNG, which the
    trainer seeds per (seed, step, rank, phase). Returns (loss, stats for the log: device tensors, and
    (sum, count) tensor pairs for the per-sample errors at sigma below / above sigma_data).
    """
    B = x0.shape[0]
    if dcfg.precond == "edm":
        sigma = torch.exp(torch.randn(B, device=x0.device) * dcfg.p_std + dcfg.p_mean)
        weight = edm_loss_weight(sigma, dcfg.sigma_data)
    else:
        t = dcfg.epsilon_t + torch.rand(B, device=x0.device) * (1 - dcfg.epsilon_t)
        sigma = vp_sigma(t, dcfg.beta_max - dcfg.beta_min, dcfg.beta_min)
        weight = 1 / sigma ** 2
    x0 = x0.float()
    noisy = x0 + torch.randn_like(x0) * sigma.reshape(B, 1, 1, 1)
    err = (D(noisy, sigma).float() - x0).square().flatten(1).mean(1)  # per-sample mean squared error
    total = (weight * err).mean()
    # The unweighted error at low and high noise: what the weighting hides, and what sampling quality tracks.
    # As (sum, count) on the device: the trainer pools them over its log interval without a host sync.
    low = (sigma < dcfg.sigma_data).float()
    err = err.detach()
    stats = {"loss": total.detach(),
             "mse_low_sigma": ((err * low).sum(), low.sum()),
             "mse_high_sigma": ((err * (1 - low)).sum(), (1 - low).sum())}
    return total, stats


# --------------------------------------------------------------------------------------------------
# Sampling by recipe
# --------------------------------------------------------------------------------------------------


def sigma_range(cfg: Recipe) -> tuple[float, float]:
    """The sampler's (sigma_min, sigma_max): its own when set, else the denoiser's."""
    s, d = cfg.sampler, cfg.diffusion
    lo, hi = (s.sigma_min or d.sigma_min), (s.sigma_max or d.sigma_max)
    if not 0 < lo < hi:
        raise ConfigError(f"sampler sigma range ({lo}, {hi}) is empty: need 0 < sigma_min < sigma_max")
    return lo, hi


def network_calls(cfg: Recipe) -> int:
    """Denoiser evaluations (NFE) of one sampling run with the recipe's sampler."""
    s = cfg.sampler
    if s.name in ("heun", "edm_stochastic") or (s.name == "generalized" and s.solver == "heun"):
        return 2 * s.steps - 1
    if s.name == "pc":
        return s.steps * (1 + s.corrector_steps)
    return s.steps  # euler, generalized euler, fastdpm


@torch.no_grad()
def sample(D: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], latents: torch.Tensor, cfg: Recipe,
           randn_like: Callable[[torch.Tensor], torch.Tensor] = torch.randn_like,
           noise_filter: samplers.NoiseFilter | None = None) -> torch.Tensor:
    """Images (not clamped) from unit-normal `latents` (B, C, R, R) with the recipe's sampler."""
    s = cfg.sampler
    lo, hi = sigma_range(cfg)
    churn = dict(S_churn=s.s_churn, S_min=s.s_min, S_max=s.s_max, S_noise=s.s_noise)
    common = dict(randn_like=randn_like, noise_filter=noise_filter)
    if s.name == "heun":
        return samplers.edm_sampler(D, latents, num_steps=s.steps, sigma_min=lo, sigma_max=hi, rho=s.rho, **common)
    if s.name == "edm_stochastic":
        return samplers.edm_sampler(D, latents, num_steps=s.steps, sigma_min=lo, sigma_max=hi, rho=s.rho,
                                    **churn, **common)
    if s.name == "euler":
        return samplers.generalized_sampler(D, latents, num_steps=s.steps, solver="euler", discretization="edm",
                                            schedule="linear", scaling="none", sigma_min=lo, sigma_max=hi,
                                            rho=s.rho, **common)
    if s.name == "generalized":
        return samplers.generalized_sampler(
            D, latents, num_steps=s.steps, solver=s.solver, discretization=s.discretization,
            schedule=s.sigma_schedule, scaling=s.scaling, sigma_min=s.sigma_min or None,
            sigma_max=s.sigma_max or None, rho=s.rho, **churn, **common)
    if s.name == "fastdpm":
        try:
            taus = samplers.fastdpm_schedule(kind=s.schedule, spacing=s.spacing, num_steps=s.steps,
                                             allow_infeasible=s.allow_infeasible)
        except ValueError as e:  # e.g. a VAR schedule that cannot reach the last noise level in so few steps
            raise ConfigError(f"sampler=fastdpm schedule={s.schedule} spacing={s.spacing} steps={s.steps}: {e} "
                              "(sampler.allow_infeasible=true)") from None
        return samplers.fastdpm_sampler(samplers.eps_model_from_denoiser(D), latents, taus, kappa=s.kappa,
                                        **common)
    if s.name == "pc":
        return samplers.pc_sampler(D, latents, num_steps=s.steps, sigma_min=lo, sigma_max=hi,
                                   corrector_steps=s.corrector_steps, snr=s.snr, noise_filter=noise_filter,
                                   precondition=s.noise_filter == "pds", randn_like=randn_like)
    raise ConfigError(f"sampler={s.name!r} is not known")


def generator_fn(D: torch.nn.Module, cfg: Recipe, device: torch.device | str,
                 noise_filter: samplers.NoiseFilter | None = None) -> Callable[[list[int]], torch.Tensor]:
    """seeds -> uint8 (B, C, R, R) on the CPU; sample i is a function of seeds[i] alone (its latents and all
    of its per-step noise come from a generator seeded with it), whatever the batch or the number of ranks."""
    m = cfg.model
    shape = (m.channels, m.resolution, m.resolution)

    @torch.no_grad()
    def generate(seeds: list[int]) -> torch.Tensor:
        if not seeds:
            raise ValueError("generate: no seeds given")
        rnd = samplers.StackedRandomGenerator(device, seeds)
        latents = rnd.randn([len(seeds), *shape])
        return to_uint8(sample(D, latents, cfg, randn_like=rnd.randn_like, noise_filter=noise_filter)).cpu()

    return generate


# --------------------------------------------------------------------------------------------------
# TDAS / PDS noise filters, stored with the run
# --------------------------------------------------------------------------------------------------


def _real_batches(cfg: Recipe, num: int, device: torch.device | str) -> Iterator[torch.Tensor]:
    for batch in data.iterate_dataset(cfg.data.url, rank=0, world=1, batch_size=min(cfg.eval.batch_size, num),
                                      num_samples=num, storage=cfg.storage):
        yield data.normalize(batch.to(device))


def noise_filter(cfg: Recipe, D: torch.nn.Module | None, device: torch.device | str,
                 run_dir: str | Path | None = None) -> samplers.NoiseFilter | None:
    """The recipe's TDAS/PDS filter (None for sampler.noise_filter=none), on every rank (collective).

    sampler.filter_path, else <run_dir>/noise_filters-<source>.pt: loaded when it exists, else estimated on
    rank 0 (from filter_samples images of data.url; source=gap also from as many samples of D drawn with the
    same sampler without a filter, the generated-vs-real spectrum gap of the TDAS appendix) and saved there,
    so every later evaluation of the run uses the same filters.
    """
    s = cfg.sampler
    if s.noise_filter == "none":
        return None
    path = Path(s.filter_path) if s.filter_path else (
        Path(run_dir) / f"noise_filters-{s.filter_source}.pt" if run_dir is not None else None)
    def load_or_estimate() -> samplers.NoiseFilter:
        if path is not None and path.is_file():
            return samplers.NoiseFilter.load(str(path))
        n = s.filter_samples
        if s.filter_source == "data":
            filt = samplers.estimate_filters(_real_batches(cfg, n, device), alpha=s.filter_alpha)
        else:
            if D is None:
                raise ConfigError("sampler.filter_source=gap needs a model to sample from")
            gen = generator_fn(D, _without_filter(cfg), device)
            bs = cfg.eval.batch_size
            fake = (data.normalize(gen(list(range(i, min(i + bs, n)))).to(device)) for i in range(0, n, bs))
            filt = samplers.estimate_filters_from_gap(_real_batches(cfg, n, device), fake, alpha=s.filter_alpha)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            filt.save(str(path))
            print(f"noise filters ({s.filter_source}, alpha {s.filter_alpha}) estimated from {n} images, saved "
                  f"to {path}", flush=True)
        return filt

    def on_rank0() -> samplers.NoiseFilter:
        try:
            return load_or_estimate()
        except (OSError, RuntimeError, ValueError) as e:
            raise ConfigError(f"sampler.noise_filter={s.noise_filter}: cannot load or estimate the filters "
                              f"({path}): {e}") from e

    filt = dist.on_rank0(on_rank0)
    return filt.to(device) if filt is not None else None


def _without_filter(cfg: Recipe) -> Recipe:
    plain = copy.deepcopy(cfg)
    plain.sampler.noise_filter = "none"
    return plain


def describe(cfg: Recipe) -> dict[str, Any]:
    """The sampler settings that matter for a result (logged next to FID)."""
    s = cfg.sampler
    out: dict[str, Any] = {"sampler": s.name, "steps": s.steps, "nfe": network_calls(cfg),
                           "noise_filter": s.noise_filter}
    if s.name == "edm_stochastic":
        out.update(s_churn=s.s_churn, s_min=s.s_min, s_max=s.s_max, s_noise=s.s_noise)
    if s.name == "fastdpm":
        out.update(schedule=s.schedule, spacing=s.spacing, kappa=s.kappa)
    if s.name == "generalized":
        out.update(solver=s.solver, discretization=s.discretization, sigma_schedule=s.sigma_schedule,
                   scaling=s.scaling)
    if s.name == "pc":
        out.update(corrector_steps=s.corrector_steps, snr=s.snr)
    return {k: (v if not (isinstance(v, float) and math.isinf(v)) else "inf") for k, v in out.items()}
