"""The fast-sampler library (waveforge.samplers) against the analytic Gaussian-mixture denoiser (tests/gmm.py).

Everything runs in float64 on tiny dimensions; random draws come from fixed seeds, so every statistical
check is deterministic.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gmm import GaussianMixture  # noqa: E402

from waveforge import samplers  # noqa: E402
from waveforge.samplers import NoiseFilter, StackedRandomGenerator  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64


def mixture() -> GaussianMixture:
    """A 2-D, two-component mixture with unequal weights and shapes."""
    return GaussianMixture(weights=[0.35, 0.65], means=[[-1.5, 0.5], [1.0, -0.8]], stds=[0.3, 0.5])


def latents(n: int, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.randn((n, *shape), dtype=F64, generator=torch.Generator().manual_seed(seed))


def seeded(n: int, offset: int = 0) -> StackedRandomGenerator:
    return StackedRandomGenerator("cpu", list(range(offset, offset + n)))


def stream(seed: int):
    """A randn_like over one generator: the same seed gives the same noise stream (cheaper than one generator
    per row, for tests with thousands of samples)."""
    gen = torch.Generator().manual_seed(seed)
    return lambda x: torch.randn(x.shape, dtype=x.dtype, generator=gen)


def ks_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov statistic sup |F_a - F_b|."""
    a, b = np.sort(a.numpy()), np.sort(b.numpy())
    grid = np.concatenate([a, b])
    fa = np.searchsorted(a, grid, side="right") / len(a)
    fb = np.searchsorted(b, grid, side="right") / len(b)
    return float(np.abs(fa - fb).max())


def ks_passes(x: torch.Tensor, y: torch.Tensor, c_alpha: float = 1.949) -> list[tuple[str, float, float]]:
    """KS at level 0.001 (c_alpha = 1.949) on both coordinates and two diagonal projections; returns the
    failing projections (name, distance, threshold)."""
    n, m = len(x), len(y)
    threshold = c_alpha * math.sqrt((n + m) / (n * m))
    projections = {"x": (1.0, 0.0), "y": (0.0, 1.0), "x+y": (1.0, 1.0), "x-y": (1.0, -1.0)}
    fails = []
    for name, (u, v) in projections.items():
        d = ks_distance(x[:, 0] * u + x[:, 1] * v, y[:, 0] * u + y[:, 1] * v)
        if d > threshold:
            fails.append((name, d, threshold))
    return fails


class Counting:
    """Wraps a denoiser; counts calls and records the sigmas it was called at."""

    def __init__(self, D):
        self.D, self.calls, self.sigmas = D, 0, []

    def __call__(self, x, sigma):
        assert sigma.dtype == F64 and sigma.shape == (x.shape[0],)
        self.calls += 1
        self.sigmas.append(float(sigma[0]))
        return self.D(x, sigma)


def forbid_noise(x):
    raise AssertionError("randn_like must not be called")


# --------------------------------------------------------------------------------------------------
# EDM
# --------------------------------------------------------------------------------------------------


def test_edm_sigma_steps_closed_form():
    for n, smin, smax, rho in [(18, 0.002, 80.0, 7.0), (5, 0.01, 10.0, 3.0), (2, 0.1, 1.0, 1.0)]:
        t = samplers.edm_sigma_steps(n, smin, smax, rho)
        assert t.dtype == F64 and t.shape == (n + 1,)
        want = [(smax ** (1 / rho) + i / (n - 1) * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho for i in range(n)]
        assert torch.allclose(t[:-1], torch.tensor(want, dtype=F64), rtol=1e-14, atol=0)
        assert t[0] == pytest.approx(smax, rel=1e-14) and t[-2] == pytest.approx(smin, rel=1e-12) and t[-1] == 0
        assert bool((t[1:] < t[:-1]).all())
    assert samplers.edm_sigma_steps(1).tolist() == [80.0, 0.0]
    with pytest.raises(ValueError, match="num_steps"):
        samplers.edm_sigma_steps(0)
    with pytest.raises(ValueError, match="sigma range"):
        samplers.edm_sigma_steps(10, sigma_min=1.0, sigma_max=0.5)


def test_edm_deterministic_is_algorithm_1_with_2n_minus_1_calls():
    g = mixture()
    x_T = latents(64, (2,))
    n = 12
    D = Counting(g)
    out = samplers.edm_sampler(D, x_T, num_steps=n, randn_like=forbid_noise)  # S_churn = 0 draws no noise
    assert D.calls == 2 * n - 1
    t = samplers.edm_sigma_steps(n).tolist()
    # Algorithm 1 written out: Heun on dx/dsigma = (x - D(x; sigma)) / sigma, Euler on the last step.
    x = x_T * t[0]
    for i in range(n):
        d = (x - g(x, torch.full((64,), t[i], dtype=F64))) / t[i]
        x_euler = x + (t[i + 1] - t[i]) * d
        if t[i + 1] > 0:
            d2 = (x_euler - g(x_euler, torch.full((64,), t[i + 1], dtype=F64))) / t[i + 1]
            x = x + (t[i + 1] - t[i]) * (d + d2) / 2
        else:
            x = x_euler
    assert torch.equal(out, x)
    assert D.sigmas[0] == pytest.approx(80.0) and D.sigmas[-1] == pytest.approx(0.002)
    # The stochastic path with churn confined to an empty range is the deterministic one as well: it still
    # draws its noise at every step (as EDM's generate.py), multiplied by 0.
    draws = []
    out2 = samplers.edm_sampler(g, x_T, num_steps=n, S_churn=40.0, S_min=100.0, S_max=200.0,
                                randn_like=lambda x: draws.append(x.dtype) or torch.randn_like(x))
    assert torch.equal(out2, out) and draws == [F64] * n
    # With churn: still 2N-1 calls, noise per seed, reproducible, and different from the ODE.
    D = Counting(g)
    churned = samplers.edm_sampler(D, x_T, num_steps=n, S_churn=10.0, randn_like=seeded(64).randn_like)
    assert D.calls == 2 * n - 1
    again = samplers.edm_sampler(g, x_T, num_steps=n, S_churn=10.0, randn_like=seeded(64).randn_like)
    assert torch.equal(churned, again) and not torch.allclose(churned, out)


def test_edm_float32_latents_stay_float32():
    g = mixture()
    out = samplers.edm_sampler(lambda x, s: g(x.double(), s).float(), latents(8, (2,)).float(), num_steps=4)
    assert out.dtype == torch.float32


def _official_edm_algorithm_2(D, latents, randn_like, n, S_churn, S_min, S_max, S_noise):
    """EDM's stochastic sampler as its generate.py runs it, written out from the paper's Algorithm 2 and that
    script's order of operations: a float64 chain, and at EVERY step (gamma = 0 or not) eps = randn_like(x)
    drawn before the step's first network call, x_hat = x + sqrt(t_hat^2 - t^2) S_noise eps."""
    t = [(80.0 ** (1 / 7) + i / (n - 1) * (0.002 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7 for i in range(n)] + [0.0]
    x = latents.to(F64) * t[0]
    for i in range(n):
        gamma = min(S_churn / n, math.sqrt(2) - 1) if S_min <= t[i] <= S_max else 0.0
        t_hat = t[i] + gamma * t[i]
        eps = randn_like(x)
        x_hat = x + math.sqrt(t_hat ** 2 - t[i] ** 2) * S_noise * eps
        d = (x_hat - D(x_hat, torch.full((x.shape[0],), t_hat, dtype=F64))) / t_hat
        x_next = x_hat + (t[i + 1] - t_hat) * d
        if i < n - 1:
            d2 = (x_next - D(x_next, torch.full((x.shape[0],), t[i + 1], dtype=F64))) / t[i + 1]
            x_next = x_hat + (t[i + 1] - t_hat) * (0.5 * d + 0.5 * d2)
        x = x_next
    return x


@pytest.mark.parametrize("churn", [dict(S_churn=40.0, S_min=0.05, S_max=50.0, S_noise=1.003),
                                   dict(S_churn=10.0, S_min=0.0, S_max=float("inf"), S_noise=1.0),
                                   dict(S_churn=30.0, S_min=5.0, S_max=20.0, S_noise=1.0)])
def test_edm_stochastic_draws_its_noise_where_edm_generate_py_does(churn):
    """Same latents, same per-seed noise stream -> the same samples as EDM's sampler, also when S_min/S_max
    leave steps without churn (the noise of those steps is still drawn, times 0): float32 latents, a float64
    chain and float64 noise, as generate.py."""
    g = mixture()
    seeds = list(range(24))
    lat = seeded(24).randn([24, 2])  # float32, as generate.py's latents
    n = 12
    draws = []
    rnd = seeded(24)

    def counting(x):
        draws.append(x.dtype)
        return rnd.randn_like(x)

    ours = samplers.edm_sampler(g, lat, num_steps=n, randn_like=counting, **churn)
    want = _official_edm_algorithm_2(g, lat, StackedRandomGenerator("cpu", seeds).randn_like, n, **churn)
    assert draws == [F64] * n and ours.dtype == torch.float32
    assert torch.equal(ours, want.float())
    assert torch.equal(samplers.edm_sampler(g, lat.double(), num_steps=n, randn_like=seeded(24).randn_like, **churn),
                       want)


def test_generalized_sampler_with_churn_draws_at_every_step():
    g, lat, n = mixture(), latents(8, (2,)), 9
    for solver in ("heun", "euler"):
        draws: list[torch.dtype] = []

        def counting(x, draws=draws):
            draws.append(x.dtype)
            return torch.randn_like(x)

        samplers.generalized_sampler(g, lat, num_steps=n, solver=solver, discretization="vp", schedule="vp",
                                     scaling="vp", S_churn=30.0, S_min=0.1, S_max=20.0, randn_like=counting)
        assert draws == [F64] * n
    samplers.generalized_sampler(g, lat, num_steps=n, randn_like=forbid_noise)  # S_churn = 0: no draws


def _edm_fixture():
    path = Path(__file__).resolve().parent / "fixtures" / "reference" / "edm_samplers.safetensors"
    with safetensors.safe_open(str(path), "pt") as f:
        meta = f.metadata()
    return safetensors.torch.load_file(str(path)), meta


def test_edm_samplers_equal_the_official_code():
    """Outputs of NVlabs/edm generate.py's edm_sampler and ablation_sampler (recorded by
    tests/fixtures/make_reference_fixtures.py on the same analytic mixture, seeds 0..15, its
    StackedRandomGenerator): stochastic runs with churn on part of the steps, the VP/VE/EDM schedules,
    Heun and Euler, and the deterministic sampler."""
    tensors, meta = _edm_fixture()
    g = GaussianMixture(**json.loads(meta["mixture"]))
    seeds = json.loads(meta["seeds"])
    for name, (kind, kwargs) in json.loads(meta["cases"]).items():
        rnd = StackedRandomGenerator("cpu", seeds)
        lat = rnd.randn([len(seeds), 2])
        assert torch.equal(lat, tensors[f"{name}.latents"])  # the same per-seed latents as the official
        fn = samplers.edm_sampler if kind == "edm" else samplers.generalized_sampler
        ours = fn(g, lat.double(), randn_like=rnd.randn_like, **kwargs)  # float64 out, to compare all digits
        want = tensors[f"{name}.out"]
        assert float((ours - want).abs().max()) <= 1e-12 * max(1.0, float(want.abs().max())), name
        rnd = StackedRandomGenerator("cpu", seeds)
        lat = rnd.randn([len(seeds), 2])  # float32 latents in: the same chain, the result in float32
        assert torch.equal(fn(g, lat, randn_like=rnd.randn_like, **kwargs), ours.float())


@pytest.mark.parametrize(("solver", "band"), [("heun", (3.0, 5.0)), ("euler", (1.6, 2.4))])
def test_convergence_order_on_a_gaussian(solver, band):
    """1-D N(0, s^2): the ODE maps x_T to x_T s / sqrt(s^2 + sigma_max^2). The sampler solves it exactly down
    to sigma_min, then takes D there; its exact answer is x_T s^2 / (sqrt(s^2+sigma_min^2) sqrt(s^2+sigma_max^2)),
    1e-5 from the continuous map. Heun's error falls ~4x per doubling of N, Euler's ~2x."""
    s, smin, smax = 0.5, 0.002, 80.0
    g = GaussianMixture([1.0], [[0.0]], [s])
    z = torch.linspace(-2.5, 2.5, 11, dtype=F64)[:, None]
    exact = z * smax * s ** 2 / (math.sqrt(s ** 2 + smin ** 2) * math.sqrt(s ** 2 + smax ** 2))
    errors = []
    for n in (16, 32, 64, 128):
        out = samplers.generalized_sampler(g, z, num_steps=n, solver=solver, sigma_min=smin, sigma_max=smax)
        errors.append(float((out - exact).abs().max()))
    ratios = [errors[i] / errors[i + 1] for i in range(len(errors) - 1)]
    assert all(band[0] <= r <= band[1] for r in ratios), (errors, ratios)
    continuous = z * smax * s / math.sqrt(s ** 2 + smax ** 2)
    assert float((exact - continuous).abs().max()) < 2e-5


def test_generalized_sampler_equals_edm_sampler():
    g = mixture()
    x_T = latents(32, (2,))
    for kw in ({}, {"S_churn": 20.0, "S_min": 0.05, "S_max": 50.0, "S_noise": 1.003}):
        a = samplers.edm_sampler(g, x_T, num_steps=10, randn_like=seeded(32).randn_like, **kw)
        b = samplers.generalized_sampler(g, x_T, num_steps=10, solver="heun", discretization="edm",
                                         schedule="linear", scaling="none", randn_like=seeded(32).randn_like, **kw)
        assert torch.allclose(a, b, rtol=0, atol=1e-13)
    D = Counting(g)
    samplers.generalized_sampler(D, x_T, num_steps=10, solver="euler")
    assert D.calls == 10


@pytest.mark.parametrize(("disc", "schedule", "scaling"), [("vp", "vp", "vp"), ("ve", "ve", "none"),
                                                          ("iddpm", "linear", "none"), ("edm", "vp", "vp"),
                                                          ("vp", "linear", "none")])
def test_generalized_sampler_solves_the_same_ode(disc, schedule, scaling):
    """Every schedule/scaling is the same probability-flow ODE in x/s vs sigma: on N(0, s^2) the result must
    be the exact map from the discretisation's sigma_max (to that combination's accuracy: the VE schedule is
    the slowest, ~1e-3 at 256 steps, as in EDM's Fig. 2)."""
    s, n = 0.5, 256
    g = GaussianMixture([1.0], [[0.0]], [s])
    z = torch.linspace(-1.0, 1.0, 9, dtype=F64)[:, None]
    D = Counting(g)
    out = samplers.generalized_sampler(D, z, num_steps=n, solver="heun", discretization=disc, schedule=schedule,
                                       scaling=scaling)
    assert D.calls == 2 * n - 1
    smax, smin = D.sigmas[0], min(D.sigmas)
    defaults = {"vp": (math.sqrt(math.expm1(0.5 * 19.9 * 1e-6 + 0.1e-3)), math.sqrt(math.expm1(0.5 * 19.9 + 0.1))),
                "ve": (0.02, 100.0), "iddpm": (0.002, 81.0), "edm": (0.002, 80.0)}[disc]
    assert smin >= defaults[0] * (1 - 1e-9) and smax <= defaults[1] * (1 + 1e-9)
    if disc in ("vp", "ve", "edm"):
        assert smax == pytest.approx(defaults[1], rel=1e-9) and smin == pytest.approx(defaults[0], rel=1e-6)
    exact = z * smax * s / math.sqrt(s ** 2 + smax ** 2)
    assert float((out - exact).abs().max()) < 2e-3


def test_sampler_options_are_checked():
    g, x = mixture(), latents(4, (2,))
    with pytest.raises(ValueError, match="solver='rk4' is not known"):
        samplers.generalized_sampler(g, x, solver="rk4")
    with pytest.raises(ValueError, match="discretization"):
        samplers.generalized_sampler(g, x, discretization="cosine")
    with pytest.raises(ValueError, match="schedule"):
        samplers.generalized_sampler(g, x, schedule="cosine")
    with pytest.raises(ValueError, match="scaling"):
        samplers.generalized_sampler(g, x, scaling="ve")
    with pytest.raises(ValueError, match="num_steps"):
        samplers.edm_sampler(g, x, num_steps=0)
    with pytest.raises(ValueError, match="num_steps"):
        samplers.pc_sampler(g, x, num_steps=0)
    with pytest.raises(ValueError, match="precondition"):
        samplers.pc_sampler(g, x, num_steps=3, precondition=True)
    with pytest.raises(ValueError, match="kind"):
        samplers.fastdpm_schedule(kind="cosine")
    with pytest.raises(ValueError, match="spacing"):
        samplers.fastdpm_schedule(spacing="cubic")
    with pytest.raises(ValueError, match="non-increasing"):
        samplers.fastdpm_sampler(samplers.eps_model_from_denoiser(g), x, [0.0, 10.0])
    with pytest.raises(ValueError, match="kappa"):
        samplers.fastdpm_sampler(samplers.eps_model_from_denoiser(g), x, [10.0, 0.0], kappa=2.0)
    with pytest.raises(ValueError, match="size\\[0\\]"):
        seeded(3).randn([4, 2])


# --------------------------------------------------------------------------------------------------
# FastDPM
# --------------------------------------------------------------------------------------------------


def test_fastdpm_continuous_alpha_bar_and_its_inverse():
    betas = np.linspace(1e-4, 0.02, 1000)
    discrete = np.cumsum(np.log1p(-betas))
    cont = samplers.fastdpm_log_alpha_bar(np.arange(1000.0))
    assert np.abs(cont - discrete).max() < 1e-9
    assert samplers.fastdpm_log_alpha_bar(-1.0) == pytest.approx(0.0, abs=1e-12)
    # Accepts floats, arrays and tensors; float64 out.
    assert isinstance(samplers.fastdpm_log_alpha_bar(3.0), float)
    t = torch.tensor([0.0, 12.5, 998.75], dtype=torch.float32)
    out = samplers.fastdpm_log_alpha_bar(t)
    assert isinstance(out, torch.Tensor) and out.dtype == F64
    # Bisection inverse round-trips at continuous steps.
    taus = np.random.default_rng(0).uniform(0, 999, size=200)
    back = samplers.fastdpm_step_from_alpha_bar(np.exp(samplers.fastdpm_log_alpha_bar(taus)))
    assert np.abs(back - taus).max() < 1e-8
    assert samplers.fastdpm_step_from_alpha_bar(float(np.exp(discrete[0]))) == pytest.approx(0.0, abs=1e-8)
    with pytest.raises(ValueError, match="alpha_bar must lie in"):
        samplers.fastdpm_step_from_alpha_bar(1e-6)


def _official_step(S: int, spacing: str, T: int = 1000) -> list[int]:
    """FastDPM's STEP steps as its get_STEP_step computes them (ascending), with its float rounding:
    linear floor(i * c) with c = (T - 1.0) / (S - 1.0) computed first; quadratic int() of the squares of
    numpy.linspace(0, sqrt(T * 0.8), S)."""
    if spacing == "linear":
        c = (T - 1.0) / (S - 1.0)
        return [math.floor(i * c) for i in range(S)]
    return [int(v) for v in np.linspace(0, np.sqrt(T * 0.8), S) ** 2]


def test_fastdpm_step_schedules():
    lin = samplers.fastdpm_schedule("step", "linear", 10)
    assert lin.dtype == F64 and lin.tolist() == [float(v) for v in reversed(_official_step(10, "linear"))]
    assert samplers.fastdpm_schedule("step", "linear", 1000).tolist() == list(range(999, -1, -1))
    quad = samplers.fastdpm_schedule("step", "quadratic", 50)
    assert quad.tolist() == [float(v) for v in reversed(_official_step(50, "quadratic"))]
    assert quad[-1] == 0 and quad[-2] == 0  # the official schedule repeats 0


def test_fastdpm_step_schedules_are_the_official_for_every_step_count():
    """Every S in 2..1000, both spacings: the official code's steps (its formulas above, and short hashes of
    what FengNiMa/FastDPM_pytorch's get_STEP_step returned, recorded by the fixture script). The algebraically
    equal formulas without its float rounding differ from it for hundreds of step counts."""
    path = Path(__file__).resolve().parent / "fixtures" / "reference" / "fastdpm_step.json"
    recorded = json.loads(path.read_text())
    for spacing in ("linear", "quadratic"):
        for S, steps in recorded["lists"][spacing].items():
            assert _official_step(int(S), spacing) == steps
        differ_naive = 0
        for S in range(2, 1001):
            ours = [int(v) for v in reversed(samplers.fastdpm_schedule("step", spacing, S).tolist())]
            official = _official_step(S, spacing)
            assert ours == official, (spacing, S)
            digest = hashlib.sha256(",".join(str(v) for v in ours).encode()).hexdigest()[:16]
            assert digest == recorded["hashes"][spacing][str(S)], (spacing, S)
            if spacing == "linear":
                naive = [i * (1000 - 1) // (S - 1) for i in range(S)]
            else:
                naive = [math.floor((i * math.sqrt(800) / (S - 1)) ** 2) for i in range(S)]
            differ_naive += naive != official
        assert differ_naive >= 100, (spacing, differ_naive)


@pytest.mark.parametrize(("spacing", "steps"), [("linear", 10), ("linear", 20), ("quadratic", 30)])
def test_fastdpm_var_schedule_hits_the_target(spacing, steps):
    taus = samplers.fastdpm_schedule("var", spacing, steps)
    assert taus.shape == (steps,) and bool((taus[1:] < taus[:-1]).all())
    abar = np.exp(samplers.fastdpm_log_alpha_bar(taus.numpy()))
    target = float(np.prod(1 - np.linspace(1e-4, 0.02, 1000)))
    assert abar[0] == pytest.approx(target, rel=1e-6)  # starts at the schedule's last noise level
    assert taus[0] == pytest.approx(999.0, abs=1e-3) and abs(float(taus[-1])) < 1e-6  # ... ends at step 0
    # Consecutive levels are gamma_bar_s = prod_{s' <= s} (1 - eta_s'), eta linear / quadratic in s.
    gamma_bar = abar[::-1]  # increasing noise
    eta = 1 - gamma_bar / np.concatenate([[1.0], gamma_bar[:-1]])
    assert eta[0] == pytest.approx(1e-4, rel=1e-6)
    if spacing == "linear":
        assert np.allclose(np.diff(eta), np.diff(eta)[0], rtol=1e-6)
    else:
        assert np.allclose(np.diff(np.sqrt(eta)), np.diff(np.sqrt(eta))[0], rtol=1e-6)


def test_fastdpm_var_infeasible_is_reported():
    with pytest.raises(ValueError, match="cannot reach alpha_bar_T"):
        samplers.fastdpm_schedule("var", "quadratic", 10)
    with pytest.warns(UserWarning, match="cannot reach alpha_bar_T"):
        taus = samplers.fastdpm_schedule("var", "quadratic", 10, allow_infeasible=True)
    assert taus[0] < 999 and abs(float(taus[-1])) < 1e-6


def test_fastdpm_full_step_chain_is_ddpm_ancestral_sampling():
    """STEP linear with S = T and kappa = 1 is the plain DDPM chain (Ho et al. 2020, Algorithm 2 with
    sigma_t^2 = beta_tilde_t) on the same noise stream."""
    g = mixture()
    eps_model = samplers.eps_model_from_denoiser(g)
    x_T = latents(16, (2,))
    taus = samplers.fastdpm_schedule("step", "linear", 1000)
    out = samplers.fastdpm_sampler(eps_model, x_T, taus, kappa=1.0, randn_like=stream(1))
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=F64)
    alphas = 1 - betas
    abar = torch.cumprod(alphas, 0)
    noise = stream(1)
    x = x_T
    for t in range(999, -1, -1):
        eps = g.eps(x, abar[t].expand(16))
        x = (x - betas[t] / (1 - abar[t]).sqrt() * eps) / alphas[t].sqrt()
        if t > 0:
            var = (1 - abar[t - 1]) / (1 - abar[t]) * betas[t]
            x = x + var.sqrt() * noise(x)
    assert torch.allclose(out, x, rtol=0, atol=1e-8), float((out - x).abs().max())


def test_fastdpm_kappa_zero_is_deterministic():
    g = mixture()
    eps_model = samplers.eps_model_from_denoiser(g)
    x_T = latents(32, (2,))
    taus = samplers.fastdpm_schedule("var", "linear", 20)
    calls = Counting(g)
    a = samplers.fastdpm_sampler(samplers.eps_model_from_denoiser(calls), x_T, taus, kappa=0.0,
                                 randn_like=seeded(32).randn_like)
    b = samplers.fastdpm_sampler(eps_model, x_T, taus, kappa=0.0, randn_like=seeded(32, offset=1000).randn_like)
    assert torch.equal(a, b) and calls.calls == 20
    c = samplers.fastdpm_sampler(eps_model, x_T, taus, kappa=1.0, randn_like=seeded(32).randn_like)
    d = samplers.fastdpm_sampler(eps_model, x_T, taus, kappa=1.0, randn_like=seeded(32, offset=1000).randn_like)
    assert not torch.allclose(c, d)


def test_eps_model_from_denoiser_matches_the_mixture():
    g = mixture()
    eps_model = samplers.eps_model_from_denoiser(g)
    x = latents(8, (2,))
    tau = torch.tensor([0.0, 10.0, 100.5, 500.0, 700.0, 900.0, 998.0, 999.0], dtype=F64)
    a = samplers.fastdpm_alpha_bar(tau)
    assert torch.allclose(eps_model(x, tau), g.eps(x, a), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# Two-sample tests against the mixture
# --------------------------------------------------------------------------------------------------

N_SAMPLES = 2000


@pytest.fixture(scope="module")
def reference_samples() -> torch.Tensor:
    return mixture().sample(4000, generator=torch.Generator().manual_seed(123))


@pytest.mark.parametrize("name", ["edm_heun", "edm_stochastic", "generalized_vp", "fastdpm_ddim",
                                  "fastdpm_ddpm", "pc_predictor_only"])
def test_samples_match_the_mixture(name, reference_samples):
    g = mixture()
    x_T = latents(N_SAMPLES, (2,), seed=7)
    noise = stream(10_000)
    eps_model = samplers.eps_model_from_denoiser(g)
    if name == "edm_heun":
        out = samplers.edm_sampler(g, x_T, num_steps=18)
    elif name == "edm_stochastic":
        out = samplers.edm_sampler(g, x_T, num_steps=32, S_churn=30.0, S_min=0.01, S_max=10.0, S_noise=1.0,
                                   randn_like=noise)
    elif name == "generalized_vp":
        out = samplers.generalized_sampler(g, x_T, num_steps=32, discretization="vp", schedule="vp", scaling="vp")
    elif name == "fastdpm_ddim":
        out = samplers.fastdpm_sampler(eps_model, x_T, samplers.fastdpm_schedule("step", "quadratic", 50), kappa=0.0)
    elif name == "fastdpm_ddpm":
        out = samplers.fastdpm_sampler(eps_model, x_T, samplers.fastdpm_schedule("var", "linear", 100), kappa=1.0,
                                       randn_like=noise)
    else:  # the Langevin corrector needs high-dimensional samples (next test)
        out = samplers.pc_sampler(g, x_T, num_steps=200, corrector_steps=0, randn_like=noise)
    assert out.shape == x_T.shape and bool(torch.isfinite(out).all())
    assert ks_passes(out, reference_samples) == []


def image_projections(x: torch.Tensor) -> torch.Tensor:
    """(n, 1, 8, 8) -> (n, 2) views to test: (pixel 0, pixel 63), then (image mean, pixel 5 - pixel 60)."""
    f = x.flatten(1)
    return torch.stack([f[:, 0], f[:, 63], f.mean(1), f[:, 5] - f[:, 60]], 1)


@pytest.mark.parametrize("mode", ["vanilla", "pds"])
def test_pc_sampler_matches_an_image_mixture(mode):
    """The PC sampler with its Langevin corrector (snr rule, per-sample norms) on a 1x8x8 image mixture: the
    snr rule assumes norms that concentrate, as they do for images; in 2-D the per-sample step size biases
    the corrector (see samplers.langevin_corrector). PDS with a non-trivial filter keeps the target."""
    g = image_mixture(8)
    exact = image_projections(g.sample(4000, generator=torch.Generator().manual_seed(9)).reshape(-1, 1, 8, 8))
    x_T = latents(N_SAMPLES, (1, 8, 8), seed=11)
    kw = {} if mode == "vanilla" else {
        "noise_filter": NoiseFilter(space=torch.ones(1, 8, 8, dtype=F64), freq=symmetric_freq(8, 8, 1.0, 1.25)[None]),
        "precondition": True}
    D = Counting(g)
    out = image_projections(samplers.pc_sampler(D, x_T, num_steps=60, randn_like=stream(2), **kw))
    assert D.calls == 60 * 2
    assert ks_passes(out[:, :2], exact[:, :2]) == [] and ks_passes(out[:, 2:], exact[:, 2:]) == []


def test_two_sample_check_has_power(reference_samples):
    """The check above rejects a visibly wrong sampler: two Euler steps, or DDPM-rev with too little noise."""
    g = mixture()
    x_T = latents(N_SAMPLES, (2,), seed=7)
    coarse = samplers.generalized_sampler(g, x_T, num_steps=2, solver="euler")
    assert ks_passes(coarse, reference_samples) != []
    few = samplers.fastdpm_sampler(samplers.eps_model_from_denoiser(g), x_T,
                                   samplers.fastdpm_schedule("step", "linear", 3), kappa=1.0,
                                   randn_like=seeded(N_SAMPLES).randn_like)
    assert ks_passes(few, reference_samples) != []


# --------------------------------------------------------------------------------------------------
# TDAS / PDS
# --------------------------------------------------------------------------------------------------


def symmetric_freq(h: int, w: int, lo: float, hi: float) -> torch.Tensor:
    """A real R(k) with R(k) = R(-k): rising with the wrapped radial frequency from lo (DC) to hi."""
    ku = torch.fft.fftfreq(h, dtype=F64)[:, None]
    kv = torch.fft.fftfreq(w, dtype=F64)[None, :]
    r = (ku.square() + kv.square()).sqrt()
    return lo + (hi - lo) * r / r.max()


def image_mixture(h: int = 4) -> GaussianMixture:
    """A mixture over 1 x h x h images: two blobs (top half bright or dark), unequal weights and widths."""
    m1 = torch.zeros(h * h, dtype=F64)
    m1[: h * h // 2] = 0.8
    return GaussianMixture([0.35, 0.65], [m1.tolist(), (-m1).tolist()], [0.3, 0.4])


def test_all_ones_filters_are_vanilla_sampling():
    g = image_mixture()
    x_T = latents(16, (1, 4, 4))
    ones = NoiseFilter.ones((1, 4, 4))
    tol = dict(rtol=0, atol=1e-12)  # the FFT round trip is exact up to float64 round-off
    kw = dict(num_steps=8, S_churn=20.0)
    a = samplers.edm_sampler(g, x_T, randn_like=seeded(16).randn_like, **kw)
    b = samplers.edm_sampler(g, x_T, randn_like=seeded(16).randn_like, noise_filter=ones, **kw)
    assert torch.allclose(a, b, **tol)
    a = samplers.generalized_sampler(g, x_T, discretization="vp", schedule="vp", scaling="vp",
                                     randn_like=seeded(16).randn_like, **kw)
    b = samplers.generalized_sampler(g, x_T, discretization="vp", schedule="vp", scaling="vp",
                                     randn_like=seeded(16).randn_like, noise_filter=ones, **kw)
    assert torch.allclose(a, b, **tol)
    eps_model = samplers.eps_model_from_denoiser(g)
    taus = samplers.fastdpm_schedule("var", "linear", 10)
    a = samplers.fastdpm_sampler(eps_model, x_T, taus, randn_like=seeded(16).randn_like)
    b = samplers.fastdpm_sampler(eps_model, x_T, taus, randn_like=seeded(16).randn_like, noise_filter=ones)
    assert torch.allclose(a, b, **tol)
    a = samplers.pc_sampler(g, x_T, num_steps=10, randn_like=seeded(16).randn_like)
    for precondition in (False, True):
        b = samplers.pc_sampler(g, x_T, num_steps=10, randn_like=seeded(16).randn_like, noise_filter=ones,
                                precondition=precondition)
        assert torch.allclose(a, b, rtol=0, atol=1e-10)


def test_filtered_noise_has_the_filter_spectrum():
    """With A = 1: E|DFT(M z)|^2 = H W R(k)^2 for R(k) = R(-k)."""
    h = w = 8
    R = symmetric_freq(h, w, 0.5, 2.0)[None]  # (1, H, W)
    filt = NoiseFilter(space=torch.ones(1, h, w, dtype=F64), freq=R)
    z = latents(6000, (1, h, w), seed=3)
    power = torch.fft.fft2(filt.apply(z)).abs().square().mean(0)
    ratio = power / (h * w * R.square())
    assert float((ratio - 1).abs().max()) < 0.1, ratio
    # A scales each pixel's noise before the frequency filter: with R = 1, Var(M z) = A^2 pixelwise.
    A = 1 + torch.rand(1, h, w, dtype=F64, generator=torch.Generator().manual_seed(0))
    var = NoiseFilter(space=A, freq=torch.ones(1, h, w, dtype=F64)).apply(z).var(0)
    assert float((var / A.square() - 1).abs().max()) < 0.1


def test_precondition_is_M_M_transpose():
    h, w = 6, 5
    gen = torch.Generator().manual_seed(1)
    filt = NoiseFilter(space=1 + torch.rand(2, h, w, dtype=F64, generator=gen),
                       freq=1 + torch.rand(2, h, w, dtype=F64, generator=gen))  # R(k) != R(-k) on purpose
    d = 2 * h * w
    basis = torch.eye(d, dtype=F64).reshape(d, 2, h, w)
    M = filt.apply(basis).reshape(d, d).T  # column j = M e_j
    P = filt.precondition(basis).reshape(d, d).T
    assert torch.allclose(P, M @ M.T, atol=1e-12)


def test_pds_langevin_keeps_a_stationary_gaussian():
    """Target N(0, I) on 1x8x8 images (sigma = 1 over a point mass at 0: score -x). Preconditioned Langevin
    (score M M^T g, noise M z) keeps the covariance; filtering only the noise does not (it drifts to ~M M^T)."""
    h = w = 8
    g = GaussianMixture([1.0], [[0.0] * (h * w)], [0.0])
    filt = NoiseFilter(space=torch.ones(1, h, w, dtype=F64), freq=symmetric_freq(h, w, 1.0, 1.6)[None])
    x0 = latents(2000, (1, h, w), seed=5)
    dev = {}
    for precondition in (True, False):
        x = samplers.langevin_corrector(g, x0, 1.0, steps=100, snr=0.16, noise_filter=filt,
                                        precondition=precondition, randn_like=stream(5))
        spectrum = torch.fft.fft2(x).abs().square().mean(0) / (h * w)  # 1 at every frequency for N(0, I)
        dev[precondition] = (float((spectrum - 1).abs().mean()), float((spectrum - 1).abs().max()))
    # PDS: off only by the unadjusted-Langevin bias (~ step size, ~2% here), the O(1/d) bias of the per-sample
    # snr step size (~7% at d = 64; see samplers.langevin_corrector) and Monte-Carlo noise. Measured: mean 0.10.
    assert dev[True][0] < 0.15 and dev[True][1] < 0.3, dev
    # Noise-only filtering drifts to ~ M M^T: R^2 - 1 = 0 (DC) ... 1.56 (highest frequency). Measured: 0.96.
    assert dev[False][0] > 0.5 and dev[False][1] > 1.0, dev


def test_estimate_filters_from_a_known_spectrum(tmp_path):
    """Smooth random images (power falling with frequency, brighter left half): R = 1 at DC (the strongest
    frequency) and rises toward alpha/(alpha-1) with frequency; A is 1 on the bright side, larger on the
    dark side; all values in [1, alpha/(alpha-1)]."""
    h = w = 16
    gen = torch.Generator().manual_seed(0)
    lowpass = 1 / (1 + 4 * symmetric_freq(h, w, 0.0, 1.0) * h)  # amplitude falling with frequency

    def batches():
        for _ in range(8):
            white = torch.randn(64, 1, h, w, dtype=F64, generator=gen)
            smooth = torch.fft.ifft2(torch.fft.fft2(white) * lowpass).real
            smooth = smooth / smooth.std() * 0.2
            smooth[..., : w // 2] += 0.5  # a brighter left half
            yield smooth.clamp(-1, 1)

    alpha = 5.0
    filt = samplers.estimate_filters(batches(), alpha=alpha)
    R, A = filt.freq, filt.space
    assert R.shape == A.shape == (1, h, w) and R.dtype == A.dtype == F64
    top = alpha / (alpha - 1)
    for f in (R, A):
        assert float(f.min()) >= 1 - 1e-12 and float(f.max()) <= top + 1e-12
    assert float(R[0, 0, 0]) == pytest.approx(1.0)  # DC carries the most energy
    radius = symmetric_freq(h, w, 0.0, 1.0)[None]
    rings = [float(R[(radius > lo) & (radius <= lo + 0.25)].mean()) for lo in (0.0, 0.25, 0.5, 0.75)]
    assert rings == sorted(rings) and rings[0] > 1.1  # rises with frequency, all above DC
    assert float(A[..., : w // 2].mean()) < float(A[..., w // 2:].mean())  # bright side: smaller A

    path = tmp_path / "filters.pt"
    filt.save(str(path))
    blob = torch.load(path, weights_only=True)
    assert blob["format"] == "waveforge.noise_filter"
    back = NoiseFilter.load(str(path))
    assert torch.equal(back.space, filt.space) and torch.equal(back.freq, filt.freq)
    assert back.meta == {"source": "data", "alpha": 5.0, "images": 512}
    with pytest.raises(ValueError, match="alpha"):
        samplers.estimate_filters(batches(), alpha=1.0)
    with pytest.raises(ValueError, match="no images"):
        samplers.estimate_filters(iter([]))


def test_estimate_filters_from_gap_boosts_what_samples_lack():
    """Generated images that lack high frequencies (blurred real ones) get R > 1 there, R = 1 where they
    match; identical sets give all-ones filters."""
    h = w = 16
    gen = torch.Generator().manual_seed(1)
    real = [torch.rand(64, 1, h, w, dtype=F64, generator=gen) * 2 - 1 for _ in range(4)]
    blur = 1 / (1 + 8 * symmetric_freq(h, w, 0.0, 1.0))
    fake = [torch.fft.ifft2(torch.fft.fft2(b) * blur).real for b in real]
    filt = samplers.estimate_filters_from_gap(iter(real), iter(fake), alpha=5.0)
    R = filt.freq[0]
    assert float(R[0, 0]) == pytest.approx(1.0)  # DC is kept by the blur
    assert float(R.max()) == pytest.approx(5.0 / 4.0)
    assert float(R[h // 2, w // 2]) > 1.2  # the highest frequency is what the samples lack most
    same = samplers.estimate_filters_from_gap(iter(real), iter(real))
    assert torch.equal(same.freq, torch.ones_like(same.freq)) and torch.equal(same.space, torch.ones_like(same.space))


# --------------------------------------------------------------------------------------------------
# Seed-indexed noise
# --------------------------------------------------------------------------------------------------


def test_stacked_generator_rows_depend_on_their_seed_only():
    a = StackedRandomGenerator("cpu", [5, 6, 7]).randn([3, 2, 4], dtype=F64)
    b = StackedRandomGenerator("cpu", [7, 1, 5, 9]).randn([4, 2, 4], dtype=F64)
    c = StackedRandomGenerator("cpu", [7]).randn([1, 2, 4], dtype=F64)
    assert torch.equal(a[0], b[2]) and torch.equal(a[2], b[0]) and torch.equal(a[2], c[0])
    assert not torch.equal(a[0], a[1])
    # Whole sampling runs: a sample is the same whatever batch it is drawn in.
    g = mixture()

    def run(seeds):
        rnd = StackedRandomGenerator("cpu", seeds)
        x_T = rnd.randn([len(seeds), 2], dtype=F64)
        return samplers.edm_sampler(g, x_T, num_steps=6, S_churn=10.0, randn_like=rnd.randn_like)

    big, small = run([3, 4, 5, 6]), run([6, 3])
    assert torch.allclose(big[3], small[0], rtol=0, atol=1e-14) and torch.allclose(big[0], small[1], rtol=0, atol=1e-14)
    x = torch.zeros(3, 2, dtype=torch.float32)
    assert StackedRandomGenerator("cpu", [1, 2, 3]).randn_like(x).dtype == torch.float32
