"""The WaveDiff generator: NCSN++ on Haar subbands, conditioned on the step t and a latent z.

    x_t (B, 4*channels, R/2, R/2), t (B,) int, z (B, nz)  ->  x0_hat, same shape as x_t, in [-1, 1]

The same network without the GAN parts (model.family = edm: no latent z, no mapping network, plain
GroupNorm with learned affine instead of the adaptive one, a linear output instead of tanh, a continuous
noise label as t) is the raw network F of the EDM denoiser in waveforge.models.denoiser.

Structure (the reference's wavelet NCSN++; each frequency-aware piece can be switched off, and with all
three off it is the reference's plain NCSN++ used for CIFAR-10):
- t -> sinusoidal(nf) -> Linear(nf, 4nf) -> SiLU -> Linear(4nf, 4nf): a per-block channel bias;
- z -> PixelNorm -> Linear(nz, z_emb) -> SiLU -> n_mlp x [Linear, SiLU]: drives every adaptive GroupNorm;
- optional pixel-unshuffle by patch_size at the input (and pixel-shuffle at the output) for 1024 px;
- encoder: conv3x3, per level num_res_blocks ResBlocks (+ attention at attn_resolutions), then a
  downsampling ResBlock (wavelet_updown: DWT-based, returns its high bands for the decoder) and the
  residual input pyramid (input_pyramid: DWT -> 4 bands / 2 -> conv3x3; off: [1,3,3,1] blur + strided conv);
- bottleneck (freq_bottleneck): ResBlock on LL/2 of the DWT of h then inverse DWT, attention, then the
  second ResBlock applied on h and again (same weights, as in the reference) on LL/2 of its DWT;
  off: ResBlock, attention, ResBlock;
- decoder: per level num_res_blocks + 1 ResBlocks on [h, skip] (+ attention), then an upsampling ResBlock
  (wavelet_updown: inverse DWT fed with the matching down block's high bands through a grouped conv);
- head: GroupNorm -> SiLU -> conv3x3 -> tanh.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from waveforge.config import DiffusionConfig, ModelConfig
from waveforge.models.layers import (
    AttnBlock,
    BlurDownConv,
    PixelNorm,
    ResBlock,
    WaveletDownConv,
    conv2d,
    group_norm,
    group_norm_silu,
    linear,
    timestep_embedding,
)
from waveforge.wavelet import dwt, idwt_bands


class Generator(nn.Module):
    def __init__(self, mcfg: ModelConfig, dcfg: DiffusionConfig):
        super().__init__()
        wavelet = mcfg.generator == "wavelet"
        self.use_wavelet_updown = wavelet and mcfg.wavelet_updown
        self.use_wavelet_pyramid = wavelet and mcfg.input_pyramid
        self.use_freq_bottleneck = wavelet and mcfg.freq_bottleneck
        self.patch_size = mcfg.patch_size
        self.num_timesteps = dcfg.num_timesteps
        self.latent = mcfg.family == "wavediff"  # the GAN generator takes z; the EDM denoiser's net does not
        self.nz = mcfg.nz if self.latent else 0
        self.in_ch = 4 * mcfg.channels  # subband channels of x_t
        self.res = mcfg.resolution // 2  # spatial size of x_t
        self.activation_checkpointing = False
        nf, num_res = mcfg.nf, mcfg.num_res_blocks
        num_levels = len(mcfg.ch_mult)
        grid = self.res // self.patch_size
        resolutions = [grid // 2 ** i for i in range(num_levels)]
        attn_at = set(mcfg.attn_resolutions)
        temb_dim, zdim = 4 * nf, (mcfg.z_emb_dim if self.latent else 0)

        def block(cin: int, cout: int, resample: str = "none", skip_ch: int = 0) -> ResBlock:
            return ResBlock(cin, cout, temb_dim=temb_dim, z_dim=zdim, resample=resample,
                            wavelet=self.use_wavelet_updown, skip_ch=skip_ch, dropout=mcfg.dropout)

        # Conditioning.
        self.nf = nf
        self.temb = nn.Sequential(linear(nf, temb_dim), nn.SiLU(), linear(temb_dim, temb_dim))
        self.mapping = None
        if self.latent:
            # fan_out init: the reference builds the mapping network with DDGAN's dense_layer.dense
            mapping: list[nn.Module] = [PixelNorm(), linear(mcfg.nz, zdim, init_mode="fan_out"), nn.SiLU()]
            for _ in range(mcfg.n_mlp):
                mapping += [linear(zdim, zdim, init_mode="fan_out"), nn.SiLU()]
            self.mapping = nn.Sequential(*mapping)

        # Encoder. `skips` tracks the channels of every tensor pushed for the decoder.
        in_ch = self.in_ch * self.patch_size ** 2
        self.conv_in = conv2d(in_ch, nf, 3)
        skips = [nf]
        self.enc_blocks = nn.ModuleList()  # per level: ModuleList of (ResBlock, attn or Identity) pairs
        self.enc_down = nn.ModuleList()  # per level but the last: downsampling ResBlock
        self.enc_pyramid = nn.ModuleList()  # per level but the last: input-pyramid downsampler
        down_ch = []  # channels of each down block (its high bands feed the matching up block)
        ch, pyramid_ch = nf, in_ch
        for level in range(num_levels):
            blocks = nn.ModuleList()
            for _ in range(num_res):
                out = nf * mcfg.ch_mult[level]
                attn = AttnBlock(out) if resolutions[level] in attn_at else nn.Identity()
                blocks.append(nn.ModuleList([block(ch, out), attn]))
                ch = out
                skips.append(ch)
            self.enc_blocks.append(blocks)
            if level != num_levels - 1:
                self.enc_down.append(block(ch, ch, "down"))
                down_ch.append(ch)
                self.enc_pyramid.append(WaveletDownConv(pyramid_ch, ch) if self.use_wavelet_pyramid
                                        else BlurDownConv(pyramid_ch, ch))
                pyramid_ch = ch
                skips.append(ch)

        # Bottleneck.
        self.mid0 = block(ch, ch)
        self.mid_attn = AttnBlock(ch)
        self.mid1 = block(ch, ch)

        # Decoder.
        self.dec_blocks = nn.ModuleList()  # per level (from the coarsest): ModuleList of ResBlocks
        self.dec_attn = nn.ModuleList()
        self.dec_up = nn.ModuleList()  # per level but the finest: upsampling ResBlock
        for level in reversed(range(num_levels)):
            blocks = nn.ModuleList()
            for _ in range(num_res + 1):
                out = nf * mcfg.ch_mult[level]
                blocks.append(block(ch + skips.pop(), out))
                ch = out
            self.dec_blocks.append(blocks)
            self.dec_attn.append(AttnBlock(ch) if resolutions[level] in attn_at else nn.Identity())
            if level != 0:
                self.dec_up.append(block(ch, ch, "up", skip_ch=down_ch.pop()))
        assert not skips and not down_ch

        self.norm_out = group_norm(ch)
        self.conv_out = conv2d(ch, in_ch, 3, init_scale=0.0)

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute each block's activations in backward (saves memory at 512/1024 px; ~1/3 more compute)."""
        self.activation_checkpointing = bool(enabled)

    def _run(self, fn: nn.Module, *args: torch.Tensor | None):
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def _freq_block(self, block: ResBlock, h: torch.Tensor, temb: torch.Tensor,
                    zemb: torch.Tensor | None) -> torch.Tensor:
        """Apply `block` to LL/2 of the DWT of h and put the result back as the LL band (x2)."""
        C = h.shape[1]
        bands = dwt(h)
        low = self._run(block, bands[:, :C] * 0.5, temb, zemb)
        return idwt_bands(low.mul_(2.0), bands[:, C:])  # low: the block's fresh output

    def forward(self, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        """t: integer steps (GAN) or continuous noise labels (EDM); z: (B, nz) latents, None without a latent."""
        if x.dim() != 4 or x.shape[1] != self.in_ch or x.shape[-1] != self.res or x.shape[-2] != self.res:
            raise ValueError(f"generator: expected x_t of shape (B, {self.in_ch}, {self.res}, {self.res}), "
                             f"got {tuple(x.shape)}")
        if self.patch_size > 1:
            x = F.pixel_unshuffle(x, self.patch_size)
        if self.mapping is not None and z is None:
            raise ValueError("generator: this network takes a latent z (B, nz)")
        zemb = self.mapping(z.to(x.dtype)) if self.mapping is not None else None
        temb = self.temb(timestep_embedding(t, self.nf).to(x.dtype))  # fp32 embedding -> bf16/fp16 engines

        # Encoder.
        pyramid = x
        hs = [self.conv_in(x)]
        highs = []
        for level, blocks in enumerate(self.enc_blocks):
            for res_block, attn in blocks:
                h = self._run(res_block, hs[-1], temb, zemb)
                if not isinstance(attn, nn.Identity):
                    h = self._run(attn, h)
                hs.append(h)
            if level < len(self.enc_down):
                if self.use_wavelet_updown:
                    h, high = self._run(self.enc_down[level], h, temb, zemb)
                    highs.append(high)
                else:
                    h = self._run(self.enc_down[level], h, temb, zemb)
                pyramid = self.enc_pyramid[level](pyramid).add_(h).mul_(1 / math.sqrt(2))  # (conv + h) / sqrt 2
                h = pyramid
                hs.append(h)

        # Bottleneck.
        h = hs[-1]
        if self.use_freq_bottleneck:
            h = self._freq_block(self.mid0, h, temb, zemb)
            h = self._run(self.mid_attn, h)
            h = self._run(self.mid1, h, temb, zemb)
            h = self._freq_block(self.mid1, h, temb, zemb)
        else:
            h = self._run(self.mid0, h, temb, zemb)
            h = self._run(self.mid_attn, h)
            h = self._run(self.mid1, h, temb, zemb)

        # Decoder.
        for i, blocks in enumerate(self.dec_blocks):
            for res_block in blocks:
                h = self._run(res_block, torch.cat([h, hs.pop()], dim=1), temb, zemb)
            if not isinstance(self.dec_attn[i], nn.Identity):
                h = self._run(self.dec_attn[i], h)
            if i < len(self.dec_up):
                if self.use_wavelet_updown:
                    h = self._run(self.dec_up[i], h, temb, zemb, highs.pop())
                else:
                    h = self._run(self.dec_up[i], h, temb, zemb)

        h = self.conv_out(group_norm_silu(self.norm_out, h))
        if self.patch_size > 1:
            h = F.pixel_shuffle(h, self.patch_size)
        return torch.tanh(h) if self.latent else h
