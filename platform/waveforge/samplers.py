"""Fast samplers for diffusion models: plain torch functions over any denoiser (no models, no recipes).

    edm_sampler            EDM Heun, deterministic (Algorithm 1) or stochastic (Algorithm 2)
    generalized_sampler    EDM's ablation sampler: solver x discretisation x sigma(t) x s(t)
    fastdpm_sampler        FastDPM (DDPM-rev kappa=1 ... DDIM-rev kappa=0) over continuous steps
    pc_sampler             score-SDE VE predictor-corrector, with TDAS (filtered noise) or PDS (preconditioned)

Sources: Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models" (EDM);
Kong & Ping 2021, "On Fast Sampling of Diffusion Probabilistic Models" (FastDPM); Song et al. 2021,
"Score-Based Generative Modeling through SDEs" (PC sampler); Ma et al. 2022, "Accelerating Score-based
Generative Models for High-Resolution Image Synthesis" (TDAS) and "... with Preconditioned Diffusion
Sampling" (PDS).

Conventions. A denoiser is D(x (B,...), sigma (B,) float64) -> x0 estimate with x's shape (cast to x's
dtype here); an eps-model is eps(x_t (B,...), tau (B,) float64) with tau a continuous DDPM step in
[0, T-1]. Every sampler takes `latents` ~ N(0, I) and draws further noise only through `randn_like`, so
with a StackedRandomGenerator's randn_like sample i depends on seeds[i] alone. Time grids are float64;
the EDM samplers run their chain in float64 as EDM's generate.py does (drawing float64 noise), the others
in latents' dtype; every sampler returns latents' dtype. A NoiseFilter M applies to the initial sample and
to every per-step noise.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = ["Denoiser", "EpsModel", "StackedRandomGenerator", "edm_sigma_steps", "edm_sampler",
           "generalized_sampler", "fastdpm_log_alpha_bar", "fastdpm_alpha_bar", "fastdpm_step_from_alpha_bar",
           "fastdpm_schedule", "fastdpm_sampler", "eps_model_from_denoiser", "NoiseFilter", "estimate_filters",
           "estimate_filters_from_gap", "langevin_corrector", "pc_sampler"]

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
EpsModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
RandnLike = Callable[[torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------------------------------
# Seed-indexed noise
# --------------------------------------------------------------------------------------------------


class StackedRandomGenerator:
    """One torch.Generator per seed (EDM generate.py): row i of every draw comes from seeds[i] alone, so a
    sample does not depend on the batch it is in or on the number of ranks."""

    def __init__(self, device: torch.device | str, seeds: Sequence[int]) -> None:
        if len(seeds) == 0:
            raise ValueError("StackedRandomGenerator: no seeds given")
        self.device = torch.device(device)
        self.generators = [torch.Generator(self.device).manual_seed(int(s) % (1 << 32)) for s in seeds]

    def randn(self, size: Sequence[int], dtype: torch.dtype = torch.float32,
              device: torch.device | str | None = None) -> torch.Tensor:
        size = list(size)
        if not size or size[0] != len(self.generators):
            raise ValueError(f"StackedRandomGenerator.randn: size[0] must be the number of seeds "
                             f"({len(self.generators)}), got size {size}")
        dev = self.device if device is None else device
        return torch.stack([torch.randn(size[1:], generator=g, dtype=dtype, device=dev) for g in self.generators])

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return self.randn(x.shape, dtype=x.dtype, device=x.device)


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def _check_steps(num_steps: int, minimum: int = 1) -> int:
    if int(num_steps) != num_steps or int(num_steps) < minimum:
        raise ValueError(f"num_steps={num_steps} is out of range: an integer >= {minimum}")
    return int(num_steps)


def _choice(name: str, value: str, options: Sequence[str]) -> str:
    if value not in options:
        raise ValueError(f"{name}={value!r} is not known: one of {', '.join(options)}")
    return value


def _sigma_vec(x: torch.Tensor, sigma: float) -> torch.Tensor:
    return torch.full((x.shape[0],), float(sigma), dtype=torch.float64, device=x.device)


def _call(D: Denoiser, x: torch.Tensor, sigma: float) -> torch.Tensor:
    return D(x, _sigma_vec(x, sigma)).to(x.dtype)


def _noise(x: torch.Tensor, randn_like: RandnLike, noise_filter: NoiseFilter | None) -> torch.Tensor:
    z = randn_like(x)
    return z if noise_filter is None else noise_filter.apply(z)


# --------------------------------------------------------------------------------------------------
# EDM
# --------------------------------------------------------------------------------------------------


def edm_sigma_steps(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0,
                    rho: float = 7.0) -> torch.Tensor:
    """EDM time steps (Karras et al. 2022, Eq. 5), float64 (N+1,):
    sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, i < N; sigma_N = 0.
    N = 1 gives [sigma_max, 0]."""
    n = _check_steps(num_steps)
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"sigma range ({sigma_min}, {sigma_max}) is empty: need 0 < sigma_min < sigma_max")
    if rho <= 0:
        raise ValueError(f"rho={rho} is out of range: > 0")
    i = torch.arange(n, dtype=torch.float64)
    frac = i / (n - 1) if n > 1 else i
    t = (sigma_max ** (1 / rho) + frac * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([t, torch.zeros(1, dtype=torch.float64)])


def edm_sampler(denoise: Denoiser, latents: torch.Tensor, *, num_steps: int = 18, sigma_min: float = 0.002,
                sigma_max: float = 80.0, rho: float = 7.0, S_churn: float = 0.0, S_min: float = 0.0,
                S_max: float = float("inf"), S_noise: float = 1.0, randn_like: RandnLike = torch.randn_like,
                noise_filter: NoiseFilter | None = None) -> torch.Tensor:
    """EDM's sampler (Karras et al. 2022, Algorithm 2; S_churn=0 is the deterministic Algorithm 1), step for
    step as EDM's generate.py runs it.

    x = latents sigma_0; per step: gamma = min(S_churn/N, sqrt 2 - 1) on S_min <= t_i <= S_max, t_hat =
    (1 + gamma) t_i, x_hat = x + sqrt(t_hat^2 - t_i^2) S_noise eps; Euler d = (x_hat - D(x_hat; t_hat))/t_hat,
    then Heun's correction except on the last step (Euler to 0). NFE = 2N - 1. As in generate.py the chain
    runs in float64 (the result comes back in latents' dtype) and, with S_churn > 0, eps = randn_like(x) is
    drawn at EVERY step, also where gamma = 0 (there it is multiplied by 0): the same latents and the same
    per-seed noise stream (StackedRandomGenerator) give the official sampler's images. With S_churn = 0 no
    noise is drawn (the official draws and multiplies it by 0; nothing depends on it)."""
    t_steps = edm_sigma_steps(num_steps, sigma_min, sigma_max, rho).tolist()
    n = len(t_steps) - 1
    x0 = latents.to(torch.float64)
    x = (x0 if noise_filter is None else noise_filter.apply(x0)) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        gamma = min(S_churn / n, math.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0.0
        t_hat = t_cur + gamma * t_cur
        x_hat = x
        if S_churn > 0:  # drawn at every step of a stochastic run, where generate.py draws it
            x_hat = x + math.sqrt(t_hat ** 2 - t_cur ** 2) * S_noise * _noise(x, randn_like, noise_filter)
        d_cur = (x_hat - _call(denoise, x_hat, t_hat)) / t_hat  # Euler step
        x = x_hat + (t_next - t_hat) * d_cur
        if i < n - 1:  # second-order correction
            d_prime = (x - _call(denoise, x, t_next)) / t_next
            x = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x.to(latents.dtype)


# VP defaults of the ablation sampler (EDM paper, Table 1: beta_d = 19.9, beta_min = 0.1).
VP_BETA_D = 19.9
VP_BETA_MIN = 0.1


def _vp_sigma(beta_d: float, beta_min: float, t: float) -> float:
    return math.sqrt(math.expm1(0.5 * beta_d * t ** 2 + beta_min * t))


def generalized_sampler(denoise: Denoiser, latents: torch.Tensor, *, num_steps: int = 18, solver: str = "heun",
                        discretization: str = "edm", schedule: str = "linear", scaling: str = "none",
                        sigma_min: float | None = None, sigma_max: float | None = None, rho: float = 7.0,
                        epsilon_s: float = 1e-3, C_1: float = 0.001, C_2: float = 0.008, M: int = 1000,
                        alpha: float = 1.0, S_churn: float = 0.0, S_min: float = 0.0, S_max: float = float("inf"),
                        S_noise: float = 1.0, randn_like: RandnLike = torch.randn_like,
                        noise_filter: NoiseFilter | None = None) -> torch.Tensor:
    """EDM's generalised ("ablation") sampler (Karras et al. 2022, Algorithm 1/2 with Table 1's choices).

    discretization: the noise levels {sigma_i}: edm (rho), vp (t_i = 1 + i/(N-1)(epsilon_s - 1)), ve
    (geometric in sigma^2), iddpm (the u_j table of Improved DDPM, M, C_1, C_2); schedule sigma(t): linear t,
    ve sqrt(t), vp sqrt(exp(beta_d t^2/2 + beta_min t) - 1) with beta_d, beta_min fitted to (sigma_min,
    sigma_max, epsilon_s); scaling s(t): none 1, vp 1/sqrt(1 + sigma^2). ODE (Eq. 4):
    dx/dt = (sigma'/sigma + s'/s) x - (sigma' s / sigma) D(x/s; sigma); solver euler or the generic
    2nd-order one (alpha = 1: Heun). Default sigma range per discretisation: vp (sigma(eps_s), sigma(1)) at
    beta_d = 19.9, beta_min = 0.1 (Table 1; EDM's generate.py computes these two defaults with 19.1);
    ve (0.02, 100); iddpm (0.002, 81); edm (0.002, 80). No round_sigma (the network's sigma grid) is applied.
    NFE: heun 2N-1, euler N. (edm, linear, none, heun) is edm_sampler (to float round-off). As in EDM's
    generate.py the chain runs in float64 (returned in latents' dtype) and, with S_churn > 0, the noise
    randn_like(x) is drawn at every step and added scaled by sqrt(max(sigma(t_hat)^2 - sigma(t_cur)^2, 0)),
    also where gamma = 0: the same latents and noise stream give the official sampler's result. With
    S_churn = 0 no noise is drawn."""
    n = _check_steps(num_steps)
    _choice("solver", solver, ("euler", "heun"))
    _choice("discretization", discretization, ("vp", "ve", "iddpm", "edm"))
    _choice("schedule", schedule, ("vp", "ve", "linear"))
    _choice("scaling", scaling, ("vp", "none"))
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha={alpha} is out of range: 0 < alpha <= 1")
    if not 0 < epsilon_s < 1:
        raise ValueError(f"epsilon_s={epsilon_s} is out of range: 0 < epsilon_s < 1")
    if sigma_min is None:
        sigma_min = {"vp": _vp_sigma(VP_BETA_D, VP_BETA_MIN, epsilon_s), "ve": 0.02, "iddpm": 0.002,
                     "edm": 0.002}[discretization]
    if sigma_max is None:
        sigma_max = {"vp": _vp_sigma(VP_BETA_D, VP_BETA_MIN, 1.0), "ve": 100.0, "iddpm": 81.0,
                     "edm": 80.0}[discretization]
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"sigma range ({sigma_min}, {sigma_max}) is empty: need 0 < sigma_min < sigma_max")

    # VP betas that put sigma(epsilon_s) = sigma_min and sigma(1) = sigma_max.
    beta_d = 2 * (math.log(sigma_min ** 2 + 1) / epsilon_s - math.log(sigma_max ** 2 + 1)) / (epsilon_s - 1)
    beta_min = math.log(sigma_max ** 2 + 1) - 0.5 * beta_d

    # Noise levels of the discretisation (float64).
    i = torch.arange(n, dtype=torch.float64)
    frac = i / (n - 1) if n > 1 else i
    if discretization == "vp":
        t_orig = 1 + frac * (epsilon_s - 1)
        sigma_steps = torch.sqrt(torch.expm1(0.5 * beta_d * t_orig ** 2 + beta_min * t_orig))
    elif discretization == "ve":
        sigma_steps = torch.sqrt(sigma_max ** 2 * (sigma_min ** 2 / sigma_max ** 2) ** frac)
    elif discretization == "iddpm":
        u = [0.0] * (M + 1)

        def abar(j: int) -> float:
            return math.sin(0.5 * math.pi * j / M / (C_2 + 1)) ** 2

        for j in range(M, 0, -1):  # M, ..., 1
            u[j - 1] = math.sqrt((u[j] ** 2 + 1) / max(abar(j - 1) / abar(j), C_1) - 1)
        u_t = torch.tensor(u, dtype=torch.float64)
        u_t = u_t[(u_t >= sigma_min) & (u_t <= sigma_max)]
        if len(u_t) == 0:
            raise ValueError(f"iddpm discretisation: no level of the u_j table lies in [{sigma_min}, {sigma_max}]")
        sigma_steps = u_t[((len(u_t) - 1) / (n - 1) * i).round().to(torch.int64)] if n > 1 else u_t[:1]
    else:
        sigma_steps = (sigma_max ** (1 / rho) + frac * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho

    # sigma(t), sigma'(t), sigma^-1 and s(t), s'(t) on python floats (double precision).
    if schedule == "vp":
        def sigma(t: float) -> float:
            return _vp_sigma(beta_d, beta_min, t)

        def sigma_deriv(t: float) -> float:
            return 0.5 * (beta_min + beta_d * t) * (sigma(t) + 1 / sigma(t))

        def sigma_inv(s: float) -> float:
            return (math.sqrt(beta_min ** 2 + 2 * beta_d * math.log1p(s ** 2)) - beta_min) / beta_d
    elif schedule == "ve":
        def sigma(t: float) -> float:
            return math.sqrt(t)

        def sigma_deriv(t: float) -> float:
            return 0.5 / math.sqrt(t)

        def sigma_inv(s: float) -> float:
            return s ** 2
    else:
        def sigma(t: float) -> float:
            return t

        def sigma_deriv(t: float) -> float:
            return 1.0

        def sigma_inv(s: float) -> float:
            return s

    if scaling == "vp":
        def s_of(t: float) -> float:
            return 1 / math.sqrt(1 + sigma(t) ** 2)

        def s_deriv(t: float) -> float:
            return -sigma(t) * sigma_deriv(t) * s_of(t) ** 3
    else:
        def s_of(t: float) -> float:
            return 1.0

        def s_deriv(t: float) -> float:
            return 0.0

    def deriv(x: torch.Tensor, t: float) -> torch.Tensor:
        denoised = _call(denoise, x / s_of(t), sigma(t))
        return ((sigma_deriv(t) / sigma(t) + s_deriv(t) / s_of(t)) * x
                - sigma_deriv(t) * s_of(t) / sigma(t) * denoised)

    t_steps = [sigma_inv(float(s)) for s in sigma_steps] + [0.0]
    x0 = latents.to(torch.float64)
    x = (x0 if noise_filter is None else noise_filter.apply(x0)) * (sigma(t_steps[0]) * s_of(t_steps[0]))
    for i_step, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        gamma = min(S_churn / n, math.sqrt(2) - 1) if S_min <= sigma(t_cur) <= S_max else 0.0
        t_hat = sigma_inv(sigma(t_cur) + gamma * sigma(t_cur))
        x_hat = s_of(t_hat) / s_of(t_cur) * x
        if S_churn > 0:  # drawn at every step of a stochastic run, where generate.py draws it
            scale = math.sqrt(max(sigma(t_hat) ** 2 - sigma(t_cur) ** 2, 0.0)) * s_of(t_hat) * S_noise
            x_hat = x_hat + scale * _noise(x, randn_like, noise_filter)
        h = t_next - t_hat
        d_cur = deriv(x_hat, t_hat)
        if solver == "euler" or i_step == n - 1:
            x = x_hat + h * d_cur
        else:
            t_prime = t_hat + alpha * h
            x_prime = x_hat + alpha * h * d_cur
            d_prime = deriv(x_prime, t_prime)
            x = x_hat + h * ((1 - 1 / (2 * alpha)) * d_cur + 1 / (2 * alpha) * d_prime)
    return x.to(latents.dtype)


# --------------------------------------------------------------------------------------------------
# FastDPM
# --------------------------------------------------------------------------------------------------


def _as_array(t: Any) -> tuple[np.ndarray, Callable[[np.ndarray], Any]]:
    """float64 array of `t` and a function that returns a result in t's kind (float, ndarray, tensor)."""
    if isinstance(t, torch.Tensor):
        dev = t.device
        return t.detach().cpu().to(torch.float64).numpy(), lambda a: torch.from_numpy(np.asarray(a)).to(dev)
    if isinstance(t, np.ndarray):
        return t.astype(np.float64), lambda a: np.asarray(a, dtype=np.float64)
    return np.asarray(float(t), dtype=np.float64), lambda a: float(a)


def _check_betas(beta_0: float, beta_T: float, T: int) -> None:
    if not (0 < beta_0 < beta_T < 1) or int(T) != T or T < 2:
        raise ValueError(f"DDPM schedule beta_0={beta_0}, beta_T={beta_T}, T={T} is invalid: need "
                         f"0 < beta_0 < beta_T < 1 and an integer T >= 2")


def fastdpm_log_alpha_bar(t: Any, beta_0: float = 1e-4, beta_T: float = 0.02, T: int = 1000) -> Any:
    """log alpha_bar(t) for continuous t > -1 of the linear DDPM schedule (Kong & Ping 2021, Sec. 4.1):

    alpha_bar(t) = dbeta^(t+1) Gamma(c+1) / Gamma(c-t), dbeta = (beta_T - beta_0)/(T-1), c = (1-beta_0)/dbeta,
    with Stirling's lnGamma(x) ~ 0.5 ln(2 pi y) + y (ln y - 1) + ln(1 + 1/(12 y)), y = x - 1. Evaluated in
    the algebraically equal form u ln(1-beta_0) - (c-u) ln(1-u/c) - u - 0.5 ln(1-u/c) + ln(1+1/(12c))
    - ln(1+1/(12(c-u))), u = t+1, which avoids cancelling two lnGamma values of ~5e5 (at integer t it
    matches the cumulative product to ~1e-13). float64; accepts a float, ndarray or tensor."""
    _check_betas(beta_0, beta_T, T)
    a, back = _as_array(t)
    dbeta = (beta_T - beta_0) / (T - 1)
    c = (1 - beta_0) / dbeta
    u = a + 1
    if np.any(u < 0) or np.any(c - u <= 1):
        raise ValueError(f"fastdpm_log_alpha_bar: t must lie in [-1, {c - 2:.0f}), got {a.min()}..{a.max()}")
    r = np.log1p(-u / c)
    y2 = c - u
    out = u * np.log1p(-beta_0) - y2 * r - u - 0.5 * r + np.log1p(1 / (12 * c)) - np.log1p(1 / (12 * y2))
    return back(out)


def fastdpm_alpha_bar(t: Any, beta_0: float = 1e-4, beta_T: float = 0.02, T: int = 1000) -> Any:
    """alpha_bar(t) = exp(fastdpm_log_alpha_bar(t))."""
    a, back = _as_array(t)
    return back(np.exp(fastdpm_log_alpha_bar(a, beta_0, beta_T, T)))


def fastdpm_step_from_alpha_bar(alpha_bar: Any, beta_0: float = 1e-4, beta_T: float = 0.02,
                                T: int = 1000) -> Any:
    """The continuous step t with alpha_bar(t) = alpha_bar (FastDPM's T(.) of the noise level), by bisection
    on [-1, T-1] (alpha_bar(-1) = 1). Values within 1e-6 (relative) below alpha_bar(T-1) map to T-1; others
    outside [alpha_bar(T-1), 1] raise ValueError."""
    a, back = _as_array(alpha_bar)
    lo_level = math.exp(fastdpm_log_alpha_bar(float(T - 1), beta_0, beta_T, T))
    if np.any(a > 1) or np.any(a < lo_level * (1 - 1e-6)):
        raise ValueError(f"fastdpm_step_from_alpha_bar: alpha_bar must lie in [alpha_bar(T-1)={lo_level:.6g}, 1], "
                         f"got {a.min():.6g}..{a.max():.6g}")
    target = np.log(np.clip(a, lo_level, 1.0))
    lo = np.full(a.shape, -1.0)
    hi = np.full(a.shape, float(T - 1))
    for _ in range(64):  # log alpha_bar is decreasing in t; 1000 / 2^64 is far below float64 spacing
        mid = 0.5 * (lo + hi)
        above = fastdpm_log_alpha_bar(mid, beta_0, beta_T, T) > target
        lo = np.where(above, mid, lo)
        hi = np.where(above, hi, mid)
    return back(0.5 * (lo + hi))


def _bisect_monotone(f: Callable[[float], float], lo: float, hi: float, target: float) -> float:
    """x in [lo, hi] with f(x) = target for a monotone f bracketing target, to double precision."""
    f_lo = f(lo)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if (f(mid) - target) * (f_lo - target) > 0:
            lo, f_lo = mid, f(mid)
        else:
            hi = mid
    return 0.5 * (lo + hi)


def fastdpm_schedule(kind: str = "var", spacing: str = "linear", num_steps: int = 10, beta_0: float = 1e-4,
                     beta_T: float = 0.02, T: int = 1000, allow_infeasible: bool = False) -> torch.Tensor:
    """FastDPM's continuous steps tau (Kong & Ping 2021, Sec. 4.2), float64 (S,), in sampling order
    (largest first, last ~ 0).

    STEP (the official get_STEP_step, its float rounding included): linear tau_i = floor(i c) with
    c = (T - 1.0)/(S - 1.0) computed first; quadratic tau_i = int(l_i^2) with l = numpy.linspace(0,
    sqrt(T 0.8), S) (it repeats 0 for large S; a repeated step leaves x unchanged). The rounding matters:
    the algebraically equal floor(i (T-1)/(S-1)) and floor((i sqrt(0.8 T)/(S-1))^2) give other steps for
    hundreds of step counts.
    VAR: variances eta (linear: linspace(beta_0, x, S); quadratic: beta_0 (1 + i x)^2) with x found by
    bisection so that prod(1 - eta) = alpha_bar_T = prod(1 - betas); gamma_bar_s = prod_{s'<=s}(1 - eta_s');
    tau_s = T^-1(gamma_bar_s). Where no x in the official range (linear x <= 0.99, quadratic
    x <= 0.95/(sqrt(beta_0) S)) reaches alpha_bar_T (linear needs S >= 9, quadratic S >= 23 at the
    defaults), raises ValueError; allow_infeasible=True instead keeps the bound as the official code does
    (with a warning): the chain then starts at a lower noise level, tau_0 < T-1."""
    _choice("kind", kind, ("var", "step"))
    _choice("spacing", spacing, ("linear", "quadratic"))
    _check_betas(beta_0, beta_T, T)
    S = _check_steps(num_steps, minimum=2)
    if S > T:
        raise ValueError(f"num_steps={S} is out of range: at most T={T}")
    if kind == "step":
        if spacing == "linear":
            c = (T - 1.0) / (S - 1.0)
            taus = np.floor(np.arange(S) * c)
        else:
            taus = np.floor(np.linspace(0.0, math.sqrt(T * 0.8), S) ** 2)
        return torch.from_numpy(taus[::-1].astype(np.float64).copy())

    betas = np.linspace(beta_0, beta_T, T)
    target = float(np.prod(1 - betas))
    if spacing == "linear":
        def eta(x: float) -> np.ndarray:
            return np.linspace(beta_0, x, S)
        lo, hi = beta_0, 0.99
    else:
        def eta(x: float) -> np.ndarray:
            return beta_0 * (1 + np.arange(S) * x) ** 2
        lo, hi = 0.0, 0.95 / math.sqrt(beta_0) / S

    def log_prod(x: float) -> float:
        return float(np.sum(np.log1p(-eta(x))))

    if log_prod(hi) > math.log(target):
        msg = (f"FastDPM VAR {spacing} schedule with {S} steps cannot reach alpha_bar_T = {target:.4g}: its "
               f"largest variances give prod(1 - eta) = {math.exp(log_prod(hi)):.4g}")
        if not allow_infeasible:
            raise ValueError(f"{msg}; use more steps, kind='step', or allow_infeasible=True (the official "
                             f"code's behaviour: start at that lower noise level)")
        warnings.warn(f"{msg}; starting the chain at that noise level (allow_infeasible=True)", stacklevel=2)
        x = hi
    else:
        x = _bisect_monotone(log_prod, lo, hi, math.log(target))
    gamma_bar = np.exp(np.cumsum(np.log1p(-eta(x))))
    taus = fastdpm_step_from_alpha_bar(gamma_bar, beta_0, beta_T, T)
    return torch.from_numpy(np.asarray(taus)[::-1].copy())


def fastdpm_sampler(eps_model: EpsModel, latents: torch.Tensor, taus: torch.Tensor | Sequence[float], *,
                    kappa: float = 1.0, beta_0: float = 1e-4, beta_T: float = 0.02, T: int = 1000,
                    randn_like: RandnLike = torch.randn_like, noise_filter: NoiseFilter | None = None) -> torch.Tensor:
    """FastDPM reverse process (Kong & Ping 2021, Eq. 7/8) over continuous steps `taus` (non-increasing).

    x = latents; with a = alpha_bar(tau_s), a' = alpha_bar(tau_{s+1}) (a' = 1 after the last):
    sigma = kappa sqrt((1-a')/(1-a) (1 - a/a')), x <- sqrt(a'/a) x + (sqrt(1-a'-sigma^2) - sqrt(1-a)
    sqrt(a'/a)) eps(x, tau_s) + sigma z. kappa = 1: DDPM-rev, 0: DDIM-rev (deterministic; no noise drawn).
    NFE = len(taus)."""
    taus_t = torch.as_tensor(taus, dtype=torch.float64).flatten().cpu()
    if len(taus_t) < 1:
        raise ValueError("fastdpm_sampler: no steps given")
    if not 0 <= kappa <= 1:
        raise ValueError(f"kappa={kappa} is out of range: 0 <= kappa <= 1")
    if bool((taus_t[1:] > taus_t[:-1]).any()):
        raise ValueError("fastdpm_sampler: taus must be non-increasing (sampling order, largest first)")
    if float(taus_t.min()) < -1e-6 or float(taus_t.max()) > T - 1 + 1e-6:
        raise ValueError(f"fastdpm_sampler: taus must lie in [0, T-1={T - 1}], got {float(taus_t.min())}.."
                         f"{float(taus_t.max())}")
    abar = fastdpm_alpha_bar(taus_t, beta_0, beta_T, T).tolist() + [1.0]
    tau_list = taus_t.tolist()
    x = latents if noise_filter is None else noise_filter.apply(latents)
    for i, tau in enumerate(tau_list):
        a, a_next = abar[i], abar[i + 1]
        eps = eps_model(x, _sigma_vec(x, tau)).to(x.dtype)
        sigma = kappa * math.sqrt(max((1 - a_next) / (1 - a) * (1 - a / a_next), 0.0))
        c = math.sqrt(max(1 - a_next - sigma ** 2, 0.0)) - math.sqrt(1 - a) * math.sqrt(a_next / a)
        x = math.sqrt(a_next / a) * x + c * eps
        if sigma > 0:
            x = x + sigma * _noise(x, randn_like, noise_filter)
    return x


def eps_model_from_denoiser(denoise: Denoiser, beta_0: float = 1e-4, beta_T: float = 0.02,
                            T: int = 1000) -> EpsModel:
    """An eps-model from a sigma-denoiser (VP <-> VE change of variables, EDM Sec. 2 / Table 1):
    a = alpha_bar(tau), eps(x_t, tau) = (x_t - sqrt(a) D(x_t / sqrt(a); sqrt((1-a)/a))) / sqrt(1-a)."""
    _check_betas(beta_0, beta_T, T)

    def eps(x_t: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        a = fastdpm_alpha_bar(torch.as_tensor(tau, dtype=torch.float64), beta_0, beta_T, T).to(x_t.device)
        a = a.expand(x_t.shape[0]) if a.ndim == 0 else a
        shape = (-1,) + (1,) * (x_t.ndim - 1)
        sa = a.sqrt().reshape(shape).to(x_t.dtype)
        s1a = (1 - a).sqrt().reshape(shape).to(x_t.dtype)
        denoised = denoise(x_t / sa, ((1 - a) / a).sqrt()).to(x_t.dtype)
        return (x_t - sa * denoised) / s1a

    return eps


# --------------------------------------------------------------------------------------------------
# TDAS / PDS space-frequency filters
# --------------------------------------------------------------------------------------------------


@dataclass
class NoiseFilter:
    """The space-frequency filter of TDAS/PDS (Ma et al. 2022): M z = Re F^-1(R (.) F(A (.) z)), F the 2-D DFT
    over the last two dims. `space` A and `freq` R are real, image-shaped (C, H, W) or broadcastable to
    the images (frequencies in torch.fft.fft2 order, DC at [..., 0, 0]). Call .to(device) once."""

    space: torch.Tensor
    freq: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.space = torch.as_tensor(self.space)
        self.freq = torch.as_tensor(self.freq)
        for name, t in (("space", self.space), ("freq", self.freq)):
            if t.is_complex() or not t.is_floating_point():
                raise ValueError(f"NoiseFilter.{name} must be a real floating tensor, got {t.dtype}")
            if t.ndim < 2 and t.numel() != 1:
                raise ValueError(f"NoiseFilter.{name} must be image-shaped (..., H, W), got shape {tuple(t.shape)}")
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"NoiseFilter.{name} has non-finite values")

    @classmethod
    def ones(cls, shape: Sequence[int]) -> NoiseFilter:
        """The identity filter (A = R = 1) of image shape (C, H, W)."""
        one = torch.ones(tuple(shape), dtype=torch.float64)
        return cls(space=one, freq=one.clone())

    def to(self, device: torch.device | str) -> NoiseFilter:
        return NoiseFilter(space=self.space.to(device), freq=self.freq.to(device), meta=dict(self.meta))

    def _freq_op(self, x: torch.Tensor) -> torch.Tensor:
        """L x = Re F^-1(R F x): a real symmetric operator for any real R."""
        R = self.freq.to(device=x.device, dtype=x.dtype)
        return torch.fft.ifft2(R * torch.fft.fft2(x)).real.to(x.dtype)

    def apply(self, z: torch.Tensor) -> torch.Tensor:
        """M z = Re F^-1(R F(A z)) (TDAS Eq. 9; PDS's filtered noise)."""
        if z.ndim < 2:
            raise ValueError(f"NoiseFilter.apply needs images (..., H, W), got shape {tuple(z.shape)}")
        return self._freq_op(self.space.to(device=z.device, dtype=z.dtype) * z)

    def precondition(self, f: torch.Tensor) -> torch.Tensor:
        """M M^T f = L(A^2 L f) with L = Re F^-1 R F (L^T = L): PDS's preconditioned drift/score. (The PDS
        release takes the real part only at the end, which equals this for R(k) = R(-k).)"""
        if f.ndim < 2:
            raise ValueError(f"NoiseFilter.precondition needs images (..., H, W), got shape {tuple(f.shape)}")
        A = self.space.to(device=f.device, dtype=f.dtype)
        return self._freq_op(A * A * self._freq_op(f))

    def save(self, path: str) -> None:
        """A small torch.save file of plain tensors and metadata (load with weights_only=True)."""
        torch.save({"format": "waveforge.noise_filter", "version": 1, "space": self.space.detach().cpu(),
                    "freq": self.freq.detach().cpu(), "meta": dict(self.meta)}, path)

    @classmethod
    def load(cls, path: str) -> NoiseFilter:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(blob, dict) or blob.get("format") != "waveforge.noise_filter":
            raise ValueError(f"{path} is not a waveforge noise filter file")
        return cls(space=blob["space"], freq=blob["freq"], meta=dict(blob.get("meta", {})))


def _spectrum_stats(batches: Iterable[torch.Tensor], what: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Mean |FFT2(img)|^2 and mean img^2 per (C, H, W), float64, of images in [-1, 1] mapped to [0, 1]."""
    power, energy, n = None, None, 0
    for b in batches:
        if not isinstance(b, torch.Tensor) or b.ndim != 4:
            raise ValueError(f"{what}: batches must be image tensors (B, C, H, W), got "
                             f"{getattr(b, 'shape', type(b))}")
        img = (b.detach().to(torch.float64) + 1) / 2  # the PDS release's statistics are of [0, 1] images
        p = torch.fft.fft2(img).abs().square().sum(0)
        e = img.square().sum(0)
        power = p if power is None else power + p
        energy = e if energy is None else energy + e
        n += b.shape[0]
    if n == 0 or power is None or energy is None:
        raise ValueError(f"{what}: no images given")
    return power / n, energy / n, n


def _check_alpha(alpha: float) -> None:
    if not alpha > 1:
        raise ValueError(f"alpha={alpha} is out of range: > 1 (filter values lie in [1, alpha/(alpha-1)])")


def _falling(m: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha / (m/max(m) + alpha - 1): 1 where m is largest, up to alpha/(alpha-1) where m is 0."""
    top = m.max()
    if top <= 0:
        return torch.ones_like(m)
    return alpha / (m / top + alpha - 1)


def _rising(d: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha / (alpha - d+/max(d+)): 1 where d <= 0, alpha/(alpha-1) where d is largest."""
    d = d.clamp(min=0)
    top = d.max()
    if top <= 0:
        return torch.ones_like(d)
    return alpha / (alpha - d / top)


def estimate_filters(batches: Iterable[torch.Tensor], alpha: float = 5.0) -> NoiseFilter:
    """Data-driven TDAS/PDS filters as in the PDS release (mask_gen_demo.py + sampling.py), float64 (C, H, W).

    Images in [-1, 1] are mapped to [0, 1]; freq statistic m_R = ln(1 + mean |FFT2(img)|^2), space statistic
    m_A = mean img^2 per pixel; each is divided by its max and mapped to alpha / (m + alpha - 1), values in
    [1, alpha/(alpha-1)]: 1 at the strongest frequency / brightest pixel, up to alpha/(alpha-1) where the
    data has no energy. (The release inverts its raw space statistic without normalising it; normalising
    both keeps A and R on one scale.)"""
    _check_alpha(alpha)
    power, energy, n = _spectrum_stats(batches, "estimate_filters")
    return NoiseFilter(space=_falling(energy, alpha), freq=_falling(torch.log1p(power), alpha),
                       meta={"source": "data", "alpha": float(alpha), "images": n})


def estimate_filters_from_gap(real_batches: Iterable[torch.Tensor], fake_batches: Iterable[torch.Tensor],
                              alpha: float = 5.0) -> NoiseFilter:
    """Filters from the gap between real and generated images (TDAS appendix idea: shape the noise by where
    a fast sampler's outputs differ from the data), float64 (C, H, W).

    Our construction: d_R = ln(1 + P_real) - ln(1 + P_fake) per frequency (P = mean |FFT2|^2 of [0, 1] images)
    and d_A = mean real^2 - mean fake^2 per pixel; the positive parts, divided by their max, map to
    alpha / (alpha - d): 1 where the samples are not short of energy, up to alpha/(alpha-1) where they lack
    it most. Same value range as estimate_filters."""
    _check_alpha(alpha)
    p_real, e_real, n_real = _spectrum_stats(real_batches, "estimate_filters_from_gap (real)")
    p_fake, e_fake, n_fake = _spectrum_stats(fake_batches, "estimate_filters_from_gap (fake)")
    if p_real.shape != p_fake.shape:
        raise ValueError(f"estimate_filters_from_gap: real images {tuple(p_real.shape)} and generated images "
                         f"{tuple(p_fake.shape)} differ in shape")
    freq = _rising(torch.log1p(p_real) - torch.log1p(p_fake), alpha)
    return NoiseFilter(space=_rising(e_real - e_fake, alpha), freq=freq,
                       meta={"source": "gap", "alpha": float(alpha), "real_images": n_real, "fake_images": n_fake})


# --------------------------------------------------------------------------------------------------
# Score-SDE predictor-corrector (VE), with TDAS / PDS
# --------------------------------------------------------------------------------------------------


def _rownorm(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).norm(dim=1).reshape((-1,) + (1,) * (x.ndim - 1))


def langevin_corrector(denoise: Denoiser, x: torch.Tensor, sigma: float, *, steps: int = 1, snr: float = 0.16,
                       noise_filter: NoiseFilter | None = None, precondition: bool = False,
                       randn_like: RandnLike = torch.randn_like) -> torch.Tensor:
    """Langevin corrector at noise level sigma (Song et al. 2021, Algorithm 5, VE; PDS's preconditioned form).

    g = score(x) = (D(x; sigma) - x)/sigma^2 (PDS: g <- M M^T g), z = noise (M z with a filter),
    eps = 2 (snr ||z|| / ||g||)^2, x <- x + eps g + sqrt(2 eps) z. Norms are per sample (the reference
    averages them over the batch; per sample keeps each sample a function of its own seed). The snr rule
    assumes norms that concentrate: a per-sample step that depends on x and z biases the stationary
    variance by O(1/d) (~7% at d = 64, ~0.2% for 3x32x32 images; far off for 2-D toy data)."""
    if precondition and noise_filter is None:
        raise ValueError("precondition=True (PDS) needs a noise_filter")
    for _ in range(steps):
        g = (_call(denoise, x, sigma) - x) / sigma ** 2
        if precondition:
            g = noise_filter.precondition(g)  # type: ignore[union-attr]
        z = _noise(x, randn_like, noise_filter)
        eps = 2 * (snr * _rownorm(z) / _rownorm(g).clamp(min=torch.finfo(x.dtype).tiny)) ** 2
        x = x + eps * g + (2 * eps).sqrt() * z
    return x


def pc_sampler(denoise: Denoiser, latents: torch.Tensor, *, num_steps: int, sigma_min: float = 0.01,
               sigma_max: float = 50.0, corrector_steps: int = 1, snr: float = 0.16,
               noise_filter: NoiseFilter | None = None, precondition: bool = False,
               randn_like: RandnLike = torch.randn_like) -> torch.Tensor:
    """Score-SDE VE predictor-corrector sampler in sigma terms (Song et al. 2021, Algorithm 2), with TDAS
    (noise_filter: filtered initial sample and noise) or PDS (precondition=True: drift and Langevin score
    preconditioned with M M^T, noise M z; Ma et al. 2022, Algorithm 1).

    Geometric grid sigma_i = sigma_max (sigma_min/sigma_max)^(i/(N-1)), sigma_N = 0; x = sigma_max (M) z;
    per step: corrector_steps Langevin steps at sigma_i, then the reverse-diffusion predictor
    x_mean = x + (sigma_i^2 - sigma_{i+1}^2) (M M^T) score(x; sigma_i), x = x_mean + sqrt(sigma_i^2 -
    sigma_{i+1}^2) (M) z. Returns the last x_mean (without PDS: D(x; sigma_{N-1})). NFE = N (corrector_steps + 1)."""
    n = _check_steps(num_steps)
    if int(corrector_steps) != corrector_steps or corrector_steps < 0:
        raise ValueError(f"corrector_steps={corrector_steps} is out of range: an integer >= 0")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"sigma range ({sigma_min}, {sigma_max}) is empty: need 0 < sigma_min < sigma_max")
    if snr <= 0:
        raise ValueError(f"snr={snr} is out of range: > 0")
    if precondition and noise_filter is None:
        raise ValueError("precondition=True (PDS) needs a noise_filter")
    i = torch.arange(n, dtype=torch.float64)
    frac = i / (n - 1) if n > 1 else i
    sigmas = (sigma_max * (sigma_min / sigma_max) ** frac).tolist() + [0.0]
    x = (latents if noise_filter is None else noise_filter.apply(latents)) * sigma_max
    for s_cur, s_next in zip(sigmas[:-1], sigmas[1:]):
        x = langevin_corrector(denoise, x, s_cur, steps=int(corrector_steps), snr=snr, noise_filter=noise_filter,
                               precondition=precondition, randn_like=randn_like)
        var = s_cur ** 2 - s_next ** 2
        f = var * (_call(denoise, x, s_cur) - x) / s_cur ** 2  # G^2 * score
        if precondition:
            f = noise_filter.precondition(f)  # type: ignore[union-attr]
        x_mean = x + f
        if s_next == 0:
            return x_mean
        x = x_mean + math.sqrt(var) * _noise(x, randn_like, noise_filter)
    return x  # not reached: the last step has s_next = 0
