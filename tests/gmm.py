"""An analytic Gaussian-mixture denoiser for sampler tests (no trained network needed).

For p0 = sum_k w_k N(mu_k, s_k^2 I) (s_k = 0: point masses) noised to level sigma:
    v_k = s_k^2 + sigma^2,  r_k(x) = softmax_k[ln w_k - (d/2) ln(2 pi v_k) - ||x - mu_k||^2 / (2 v_k)],
    D(x; sigma) = sum_k r_k [mu_k + (s_k^2 / v_k)(x - mu_k)]  (the exact E[x0 | x]),
    score(x; sigma) = (D - x) / sigma^2,
    eps(x_t, a) = (x_t - sqrt(a) D(x_t / sqrt(a); sqrt((1-a)/a))) / sqrt(1-a)  (VP parameterisation).
Samples x of any shape (B, ...) with prod(...) = d; computed in x's dtype (float64 in tests).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


class GaussianMixture:
    def __init__(self, weights: Sequence[float], means: Sequence[Sequence[float]], stds: Sequence[float]) -> None:
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        self.means = torch.as_tensor(means, dtype=torch.float64).reshape(len(self.weights), -1)  # (K, d)
        self.stds = torch.as_tensor(stds, dtype=torch.float64)
        if not (len(self.weights) == len(self.means) == len(self.stds)):
            raise ValueError("weights, means and stds need one entry per component")
        if abs(float(self.weights.sum()) - 1) > 1e-12 or bool((self.weights <= 0).any()):
            raise ValueError("weights must be positive and sum to 1")
        self.dim = self.means.shape[1]
        self.calls = 0  # denoiser evaluations (batched calls), for NFE checks

    def _sigma(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        return s.expand(x.shape[0]) if s.ndim == 0 else s.reshape(x.shape[0])

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        """D(x; sigma) = E[x0 | x0 + sigma n = x]."""
        self.calls += 1
        shape = x.shape
        xf = x.reshape(shape[0], self.dim)  # (B, d)
        s2 = self._sigma(x, sigma).square()[:, None]  # (B, 1)
        mu = self.means.to(x)  # (K, d)
        sk2 = self.stds.to(x).square()[None, :]  # (1, K)
        v = sk2 + s2  # (B, K)
        dist2 = (xf[:, None, :] - mu[None]).square().sum(-1)  # (B, K)
        logits = self.weights.to(x).log()[None] - 0.5 * self.dim * torch.log(2 * math.pi * v) - dist2 / (2 * v)
        r = torch.softmax(logits, dim=1)  # (B, K)
        post = mu[None] + (sk2 / v)[..., None] * (xf[:, None, :] - mu[None])  # (B, K, d)
        return (r[..., None] * post).sum(1).reshape(shape)

    __call__ = denoise

    def score(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        s = self._sigma(x, sigma).reshape((-1,) + (1,) * (x.ndim - 1))
        return (self.denoise(x, sigma) - x) / s.square()

    def eps(self, x_t: torch.Tensor, alpha_bar: torch.Tensor | float) -> torch.Tensor:
        a = self._sigma(x_t, alpha_bar).reshape((-1,) + (1,) * (x_t.ndim - 1))
        sigma = ((1 - a) / a).sqrt().flatten()
        return (x_t - a.sqrt() * self.denoise(x_t / a.sqrt(), sigma)) / (1 - a).sqrt()

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n exact draws (n, d), float64."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
        return self.means[k] + self.stds[k, None] * z
