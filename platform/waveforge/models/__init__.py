"""WaveDiff models: the wavelet NCSN++ generator and the time-conditioned discriminator (plain torch)."""

from __future__ import annotations

import torch
import torch._dynamo
import torch.nn as nn

from waveforge.config import DiffusionConfig, ModelConfig
from waveforge.models.denoiser import Denoiser
from waveforge.models.discriminator import Discriminator, DownBlock
from waveforge.models.generator import Generator
from waveforge.models.layers import AttnBlock, ResBlock

__all__ = ["Generator", "Discriminator", "Denoiser", "build_generator", "build_discriminator", "build_network",
           "count_params", "to_inference_layout", "BLOCKS", "compile_blocks"]

# The repeated blocks of every network: the units of regional compilation.
BLOCKS = (ResBlock, AttnBlock, DownBlock)


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


def compile_blocks(net: nn.Module, backend: str) -> int:
    """Regional compilation: every block of `net` (BLOCKS) compiled in place with torch.compile(backend),
    per block rather than the whole network, so that instances of a block class with the same shapes share
    one compiled graph and compile time stays short. State-dict keys do not change. Returns the number of
    blocks compiled. A deep copy of a compiled network would call the original's compiled blocks: copy
    (e.g. for an EMA) before compiling."""
    # torch documents these dynamo settings as the knobs for recompilation: one compiled graph per distinct
    # block shape (several per resolution), more than the default limit of 8 in the larger networks.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 1024)
    n = 0
    for m in net.modules():
        if isinstance(m, BLOCKS):
            m.compile(backend=backend, dynamic=False)
            n += 1
    return n
