"""WaveDiff models: the wavelet NCSN++ generator and the time-conditioned discriminator (plain torch)."""

from __future__ import annotations

import torch.nn as nn

from waveforge.config import DiffusionConfig, ModelConfig
from waveforge.models.discriminator import Discriminator
from waveforge.models.generator import Generator

__all__ = ["Generator", "Discriminator", "build_generator", "build_discriminator", "count_params"]


def build_generator(mcfg: ModelConfig, dcfg: DiffusionConfig) -> Generator:
    """forward(x_t (B, 4*channels, R/2, R/2), t (B,) long, z (B, nz)) -> x0_hat (same shape as x_t)."""
    return Generator(mcfg, dcfg)


def build_discriminator(mcfg: ModelConfig, dcfg: DiffusionConfig) -> Discriminator:
    """forward(x_t, t, x_tp1) -> logits (B,)."""
    return Discriminator(mcfg, dcfg)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
