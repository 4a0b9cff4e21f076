"""WaveDiff models: the wavelet NCSN++ generator and the time-conditioned discriminator (plain torch)."""

from __future__ import annotations

import torch
import torch.nn as nn

from waveforge.config import DiffusionConfig, ModelConfig
from waveforge.models.denoiser import Denoiser
from waveforge.models.discriminator import Discriminator
from waveforge.models.generator import Generator

__all__ = ["Generator", "Discriminator", "Denoiser", "build_generator", "build_discriminator", "build_network",
           "count_params", "to_inference_layout"]


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


def to_inference_layout(module: nn.Module) -> nn.Module:
    """`module` (in place) with its 4-D weights in channels_last when they are on the CPU; values unchanged.

    The samplers run CPU activations in channels_last (see `diffusion.sample`). A conv whose weight is in the
    default NCHW layout then has it reordered on every call (a full copy of every conv weight per network
    call: ~6% of a celebahq256 sampling pass at batch 2 on 2 cores); in channels_last it is used as it is.
    For plain modules that are sampled (an EMA copy, a generator loaded for evaluation), not for a module
    whose parameters an optimizer or DeepSpeed holds as views of flat buffers: `.to(memory_format=)`
    replaces each parameter's storage. Elsewhere (a CUDA module) a no-op.
    """
    first = next(module.parameters(), None)
    if first is not None and first.device.type == "cpu":
        module.to(memory_format=torch.channels_last)
    return module
