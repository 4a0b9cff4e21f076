"""The EDM family's denoiser: D(x; sigma) with EDM or VP preconditioning around the wavelet U-Net.

    x (B, C, R, R) noisy image, sigma (B,) noise level  ->  D(x; sigma), the denoised image (B, C, R, R)

The raw network F is the WaveDiff generator without its GAN parts (model.family=edm: no latent, plain
GroupNorm, linear output; see generator.py). It works in Haar wavelet space: the preconditioned input is
taken to subbands with the orthonormal DWT (4C x R/2 x R/2, 4x fewer positions per step) and F's output
comes back with the inverse DWT. Because the orthonormal Haar transform preserves norms, adding noise of
level sigma to an image is adding noise of level sigma to its subbands: the diffusion, its sigma range and
sigma_data are those of pixel space, and the samplers of waveforge.samplers run on images unchanged.

Preconditioning (Karras et al. 2022, Table 1), computed in float32 whatever the network's precision:
    D(x; sigma) = c_skip x + c_out IDWT(F(c_in DWT(x); c_noise))
    edm: c_skip = sd^2/(sigma^2+sd^2), c_out = sigma sd/sqrt(sigma^2+sd^2), c_in = 1/sqrt(sigma^2+sd^2),
         c_noise = ln(sigma)/4
    vp:  c_skip = 1, c_out = -sigma, c_in = 1/sqrt(sigma^2+1), c_noise = (M-1) t(sigma), M = 1000, with
         t(sigma) the inverse of sigma(t) = sqrt(exp(beta_d t^2/2 + beta_min t) - 1)
"""

from __future__ import annotations

import torch
import torch.nn as nn

from waveforge.config import DiffusionConfig, ModelConfig
from waveforge.models.generator import Generator
from waveforge.wavelet import dwt, idwt


def vp_sigma(t: torch.Tensor, beta_d: float, beta_min: float) -> torch.Tensor:
    """sigma(t) of the VP SDE: sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)."""
    return torch.sqrt(torch.expm1(0.5 * beta_d * t ** 2 + beta_min * t))


def vp_sigma_inv(sigma: torch.Tensor, beta_d: float, beta_min: float) -> torch.Tensor:
    """t(sigma), the inverse of vp_sigma."""
    return (torch.sqrt(beta_min ** 2 + 2 * beta_d * torch.log1p(sigma ** 2)) - beta_min) / beta_d


class Denoiser(nn.Module):
    """D(x; sigma) = c_skip x + c_out F(c_in x; c_noise), F the wavelet U-Net (see the module docstring)."""

    M = 1000  # VP preconditioning: the number of discrete steps c_noise is scaled to (DDPM++)

    def __init__(self, mcfg: ModelConfig, dcfg: DiffusionConfig):
        super().__init__()
        if mcfg.family != "edm":
            raise ValueError(f"Denoiser needs model.family=edm, got {mcfg.family!r}")
        self.net = Generator(mcfg, dcfg)
        self.precond = dcfg.precond
        self.sigma_data = float(dcfg.sigma_data)
        self.sigma_min, self.sigma_max = float(dcfg.sigma_min), float(dcfg.sigma_max)
        self.beta_d, self.beta_min = float(dcfg.beta_max - dcfg.beta_min), float(dcfg.beta_min)
        self.channels, self.resolution = mcfg.channels, mcfg.resolution

    def coefficients(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(c_skip, c_out, c_in, c_noise) for sigma (B,) float32."""
        if self.precond == "edm":
            sd = self.sigma_data
            c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
            c_out = sigma * sd / torch.sqrt(sigma ** 2 + sd ** 2)
            c_in = 1 / torch.sqrt(sd ** 2 + sigma ** 2)
            c_noise = torch.log(sigma) / 4
        else:
            c_skip = torch.ones_like(sigma)
            c_out = -sigma
            c_in = 1 / torch.sqrt(sigma ** 2 + 1)
            c_noise = (self.M - 1) * vp_sigma_inv(sigma, self.beta_d, self.beta_min)
        return c_skip, c_out, c_in, c_noise

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        B = x.shape[0]
        if x.dim() != 4 or x.shape[1] != self.channels or x.shape[-1] != self.resolution:
            raise ValueError(f"denoiser: expected images (B, {self.channels}, {self.resolution}, "
                             f"{self.resolution}), got {tuple(x.shape)}")
        sigma = torch.as_tensor(sigma, device=x.device).float().reshape(-1).expand(B)
        c_skip, c_out, c_in, c_noise = (c.reshape(B, 1, 1, 1) for c in self.coefficients(sigma))
        first = next(self.net.parameters(), None)
        dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
        y = dwt(x.float() * c_in)  # orthonormal Haar subbands (B, 4C, R/2, R/2)
        f = self.net(y.to(dtype), c_noise.reshape(B)).float()
        return c_skip * x.float() + c_out * idwt(f)


def edm_loss_weight(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """EDM's loss weight lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 (unit effective weight per sigma)."""
    return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2


__all__ = ["Denoiser", "vp_sigma", "vp_sigma_inv", "edm_loss_weight"]
