"""WaveDiff models: the wavelet NCSN++ generator and the time-conditioned discriminator (plain torch)."""

from __future__ import annotations

import torch.nn as nn

from waveforge.config import DiffusionConfig, ModelConfig
from waveforge.models.denoiser import Denoiser
from waveforge.models.discriminator import Discriminator
from waveforge.models.generator import Generator

__all__ = ["Generator", "Discriminator", "Denoiser", "build_generator", "build_discriminator", "build_network",
           "count_params"]


def build_generator(mcfg: ModelConfig, dcfg: DiffusionConfig) -> Generator:
    """forward(x_t (B, 4*channels, R/2, R/2), t (B,) long, z (B, nz)) -> x0_hat (same shape as x_t)."""
    return Generator(mcfg, dcfg)


def build_network(mcfg: ModelConfig, dcfg: DiffusionConfig) -> Generator | Denoiser:
    """The network a run trains and samples with: the GAN generator (model.family=wavediff), or the
    preconditioned denoiser D(x; sigma) of the EDM family (model.family=edm)."""
    return Denoiser(mcfg, dcfg) if mcfg.family == "edm" else Generator(mcfg, dcfg)


def build_discriminator(mcfg: ModelConfig, dcfg: DiffusionConfig) -> Discriminator:
    """forward(x_t, t, x_tp1) -> logits (B,)."""
    return Discriminator(mcfg, dcfg)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
