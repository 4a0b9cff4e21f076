"""The time-conditioned discriminator of the diffusion GAN: D(x_t, t, x_{t+1}) -> logits (B,).

Input: concat(x_t, x_{t+1}) (2 x 4*channels subband channels at R/2). Structure (the reference's
DDGAN discriminators): t -> sinusoidal(t_emb_dim) -> Linear -> LeakyReLU(0.2) -> Linear -> LeakyReLU;
1x1 conv to 2*d_nf; d_layers residual DownBlocks; minibatch stddev (group 4); conv3x3 -> LeakyReLU;
sum over positions; Linear -> 1.

- small variant (d_layers <= 4, the reference's for 32-64 px): the first block keeps the resolution,
  the others halve it; channels 2, 4, 8, 8, ... x d_nf;
- large variant (d_layers >= 5): every block halves the resolution; channels 4, 8, 8, ... x d_nf.

Every layer is initialised as the reference's (DDGAN's dense_layer.py): uniform variance scaling over
fan_out (see waveforge.models.layers), biases zero; the last conv of each block starts near zero (scale 0),
and so does the small variant's final conv.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from waveforge.config import DiffusionConfig, ModelConfig
from waveforge.models.layers import blur_downsample, conv2d, linear, timestep_embedding

FAN_OUT = "fan_out"  # the reference discriminator's init mode for every layer


class DownBlock(nn.Module):
    """LeakyReLU -> conv3x3 -> + Linear(t_emb) -> LeakyReLU -> [blur downsample] -> conv3x3; skip: [blur] -> 1x1."""

    def __init__(self, in_ch: int, out_ch: int, t_emb_dim: int, downsample: bool):
        super().__init__()
        self.downsample = downsample
        self.conv0 = conv2d(in_ch, out_ch, 3, init_mode=FAN_OUT)
        self.temb = linear(t_emb_dim, out_ch, init_mode=FAN_OUT)
        self.conv1 = conv2d(out_ch, out_ch, 3, init_scale=0.0, init_mode=FAN_OUT)
        self.skip = conv2d(in_ch, out_ch, 1, bias=False, init_mode=FAN_OUT)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv0(F.leaky_relu(x, 0.2))
        h = F.leaky_relu(h + self.temb(temb)[:, :, None, None], 0.2)
        if self.downsample:
            h, x = blur_downsample(h), blur_downsample(x)
        return (self.conv1(h) + self.skip(x)) * (1 / math.sqrt(2))


def minibatch_stddev(h: torch.Tensor, group: int = 4) -> torch.Tensor:
    """Append one channel: the std over groups of samples, averaged over channels and positions.

    The group is the largest divisor of the batch that is <= `group` (the reference needs batch % 4 == 0).
    """
    B, C, H, W = h.shape
    g = min(group, B)
    while B % g:
        g -= 1
    s = h.reshape(g, B // g, C, H, W)
    s = torch.sqrt(s.float().var(dim=0, unbiased=False) + 1e-8).mean(dim=(1, 2, 3))  # (B // g,)
    s = s.to(h.dtype).reshape(1, B // g, 1, 1, 1).expand(g, B // g, 1, H, W).reshape(B, 1, H, W)
    return torch.cat([h, s], dim=1)


class Discriminator(nn.Module):
    def __init__(self, mcfg: ModelConfig, dcfg: DiffusionConfig):
        super().__init__()
        nf, td, n = mcfg.d_nf, mcfg.t_emb_dim, mcfg.d_layers
        self.in_ch = 4 * mcfg.channels
        self.res = mcfg.resolution // 2
        self.t_emb_dim = td
        self.small = n <= 4
        self.temb = nn.Sequential(linear(td, td, init_mode=FAN_OUT), nn.LeakyReLU(0.2),
                                  linear(td, td, init_mode=FAN_OUT))
        self.conv_in = conv2d(2 * self.in_ch, 2 * nf, 1, init_mode=FAN_OUT)
        if self.small:
            widths = [2, 2, 4] + [8] * (n - 2)  # block i maps widths[i] -> widths[i + 1]
            downs = [False] + [True] * (n - 1)
        else:
            widths = [2, 4, 8] + [8] * (n - 2)
            downs = [True] * n
        self.blocks = nn.ModuleList(
            DownBlock(widths[i] * nf, widths[i + 1] * nf, td, downs[i]) for i in range(n))
        ch = widths[n] * nf
        self.conv_out = conv2d(ch + 1, ch, 3, init_scale=0.0 if self.small else 1.0, init_mode=FAN_OUT)
        self.linear_out = linear(ch, 1, init_mode=FAN_OUT)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, x_tp1: torch.Tensor) -> torch.Tensor:
        for name, x in (("x_t", x_t), ("x_tp1", x_tp1)):
            if x.dim() != 4 or x.shape[1] != self.in_ch:
                raise ValueError(f"discriminator: expected {name} of shape (B, {self.in_ch}, H, W), "
                                 f"got {tuple(x.shape)}")
        # the sinusoidal embedding is computed in fp32: cast it to the input's dtype (bf16/fp16 engines)
        temb = F.leaky_relu(self.temb(timestep_embedding(t, self.t_emb_dim).to(x_t.dtype)), 0.2)
        h = self.conv_in(torch.cat([x_t, x_tp1], dim=1))
        for block in self.blocks:
            h = block(h, temb)
        h = F.leaky_relu(self.conv_out(minibatch_stddev(h)), 0.2)
        return self.linear_out(h.sum(dim=(2, 3))).squeeze(1)
