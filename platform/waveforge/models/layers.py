"""Building blocks of the WaveDiff generator and discriminator (plain torch, no custom ops).

Initialisation is the reference's, layer by layer: uniform variance scaling with a per-layer scale
(scale 0 = a near-zero init, 1e-10, of the last conv of a residual branch) over fan_avg for the NCSN++
layers (DDPM's `default_init`), and over fan_out for the layers the reference builds with DDGAN's
`dense_layer.py` (every layer of the discriminator, the generator's latent mapping network and its
adaptive-GroupNorm style layers): that file's "fan_avg" mode computes fan_out, so those layers start with
var = scale / fan_out (the discriminator's final linear layer 512 -> 1 with std 1). Training starts from
the paper's weight distribution; `tests/test_reference.py` compares every parameter's statistics with
the reference's.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from waveforge import cpu_kernels
from waveforge.wavelet import dwt, idwt_bands

# --------------------------------------------------------------------------------------------------
# Initialisation and plain layers
# --------------------------------------------------------------------------------------------------


InitMode = Literal["fan_avg", "fan_out"]


def init_variance_scaling_(weight: torch.Tensor, scale: float = 1.0, mode: InitMode = "fan_avg") -> torch.Tensor:
    """Uniform variance scaling in place: var = scale / fan with fan = (fan_in + fan_out) / 2 ("fan_avg") or
    fan_out ("fan_out"); fan_in = weight.shape[1] x receptive field, fan_out = weight.shape[0] x receptive
    field (of the weight as stored, so a grouped conv counts its per-group inputs). scale 0 means 1e-10."""
    if mode not in ("fan_avg", "fan_out"):
        raise ValueError(f"init mode must be fan_avg or fan_out, got {mode!r}")
    scale = 1e-10 if scale == 0 else scale
    receptive = math.prod(weight.shape[2:])
    fan_in, fan_out = weight.shape[1] * receptive, weight.shape[0] * receptive
    fan = (fan_in + fan_out) / 2 if mode == "fan_avg" else max(1, fan_out)
    bound = math.sqrt(3.0 * scale / fan)
    with torch.no_grad():
        return weight.uniform_(-bound, bound)


def conv2d(in_ch: int, out_ch: int, kernel: int = 3, init_scale: float = 1.0, bias: bool = True,
           groups: int = 1, init_mode: InitMode = "fan_avg") -> nn.Conv2d:
    """Same-padded conv with variance-scaling init (`init_variance_scaling_`) and zero bias."""
    conv = nn.Conv2d(in_ch, out_ch, kernel, padding=kernel // 2, bias=bias, groups=groups)
    init_variance_scaling_(conv.weight, init_scale, init_mode)
    if bias:
        nn.init.zeros_(conv.bias)
    return conv


def linear(in_dim: int, out_dim: int, init_scale: float = 1.0, init_mode: InitMode = "fan_avg") -> nn.Linear:
    """Linear layer with variance-scaling init (`init_variance_scaling_`) and zero bias."""
    lin = nn.Linear(in_dim, out_dim)
    init_variance_scaling_(lin.weight, init_scale, init_mode)
    nn.init.zeros_(lin.bias)
    return lin


def group_norm(channels: int, affine: bool = True) -> nn.GroupNorm:
    """NCSN++'s GroupNorm: min(C/4, 32) groups, eps 1e-6."""
    return nn.GroupNorm(num_groups=max(1, min(channels // 4, 32)), num_channels=channels, eps=1e-6, affine=affine)


def pointwise(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A 1x1 `conv` applied to x. On a channels_last x it is one matrix product over the (B, H, W, C) view
    (PyTorch's own channels_last 1x1 conv on CPU takes a slow im2col path); otherwise the conv itself."""
    if x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last):
        return conv(x)
    out = F.linear(x.permute(0, 2, 3, 1), conv.weight.flatten(1), conv.bias)  # (B, H, W, out), contiguous
    return out.permute(0, 3, 1, 2)  # (B, out, H, W) in channels_last


def silu(h: torch.Tensor) -> torch.Tensor:
    """SiLU, in place when no autograd graph is being recorded (sampling: one pass, no new buffer)."""
    return F.silu(h, inplace=not torch.is_grad_enabled())


def group_norm_per_sample(h: torch.Tensor, num_groups: int, gamma: torch.Tensor, beta: torch.Tensor,
                          eps: float) -> torch.Tensor:
    """GroupNorm of h (B, C, H, W), then gamma * . + beta with a (gamma, beta) of shape (B, C) per sample.

    One native group_norm call: the batch is folded into the channels, (1, B*C, H, W) with B*num_groups
    groups (a group never spans two samples), and the per-sample (gamma, beta) become its affine weights,
    so normalisation and modulation take one pass instead of two and no intermediate tensor.
    """
    B, C = h.shape[:2]
    if h.is_contiguous():
        out = F.group_norm(h.reshape(1, B * C, *h.shape[2:]), B * num_groups, gamma.reshape(-1).to(h.dtype),
                           beta.reshape(-1).to(h.dtype), eps)
        return out.reshape(h.shape)
    # Other memory layouts (channels_last) cannot fold the batch into the channels without a copy: normalise,
    # then modulate (in place when no graph is recorded).
    out = F.group_norm(h, num_groups, eps=eps)
    gamma, beta = gamma[:, :, None, None].to(out.dtype), beta[:, :, None, None].to(out.dtype)
    if torch.is_grad_enabled():
        return torch.addcmul(beta, gamma, out)
    return torch.addcmul(beta, gamma, out, out=out)


def timestep_embedding(t: torch.Tensor, dim: int, max_positions: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding of integer steps t (B,) -> (B, dim): [sin, cos] with geometric frequencies."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=t.device)
                      * (-math.log(max_positions) / max(half - 1, 1)))
    args = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class PixelNorm(nn.Module):
    """Normalise each latent vector to unit root-mean-square."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z * torch.rsqrt(z.square().mean(dim=1, keepdim=True) + 1e-8)


# --------------------------------------------------------------------------------------------------
# FIR [1, 3, 3, 1] resampling as depthwise convolutions (StyleGAN2's filter, no upfirdn2d op)
# --------------------------------------------------------------------------------------------------

_FIR_CACHE: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _fir_kernel(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    k = _FIR_CACHE.get((device, dtype))
    if k is None:
        k1 = torch.tensor([1.0, 3.0, 3.0, 1.0], dtype=torch.float64)
        k = torch.outer(k1, k1)
        k = (k / k.sum()).to(device=device, dtype=dtype)
        _FIR_CACHE[(device, dtype)] = k
    return k


def _blur_down(x: torch.Tensor) -> torch.Tensor:
    C = x.shape[1]
    return F.conv2d(x, _fir_kernel(x.device, x.dtype).expand(C, 1, 4, 4), stride=2, padding=1, groups=C)


def _blur_down_t(g: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """The adjoint of `_blur_down` (its input gradient) for an input of spatial size `hw`."""
    C, h, w = g.shape[1], g.shape[2], g.shape[3]
    pad = (hw[0] - 2 * h, hw[1] - 2 * w)  # odd sizes: the row/column the strided conv never reached
    return F.conv_transpose2d(g, _fir_kernel(g.device, g.dtype).expand(C, 1, 4, 4), stride=2, padding=1,
                              output_padding=pad, groups=C)


class _BlurDown(torch.autograd.Function):
    """`_blur_down` whose gradient is `_BlurDownT` and vice versa, so gradients of any order stay one
    depthwise conv each. Through autograd's own convolution double backward, R1's second derivative of
    a depthwise conv runs one convolution per channel (a Python-level loop over groups: thousands of
    kernel launches per discriminator on a GPU, 17x the time of the step without R1 on an H100)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.hw = (x.shape[2], x.shape[3])
        return _blur_down(x)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        return _BlurDownT.apply(g, ctx.hw)


class _BlurDownT(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, g: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        return _blur_down_t(g, hw)

    @staticmethod
    def backward(ctx: Any, gg: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _BlurDown.apply(gg), None


def blur_downsample(x: torch.Tensor) -> torch.Tensor:
    """[1,3,3,1] low-pass then 2x decimation: one depthwise 4x4 conv, stride 2, padding 1 (any order of
    gradients: each is one depthwise conv or transposed conv)."""
    return _BlurDown.apply(x)


def blur_upsample(x: torch.Tensor) -> torch.Tensor:
    """2x zero-insertion upsampling then [1,3,3,1] low-pass (gain 4): one depthwise transposed conv."""
    C = x.shape[1]
    w = (_fir_kernel(x.device, x.dtype) * 4).expand(C, 1, 4, 4)
    return F.conv_transpose2d(x, w, stride=2, padding=1, groups=C)


class BlurDownConv(nn.Module):
    """Plain NCSN++ downsampling conv: [1,3,3,1] blur, then a 3x3 conv with stride 2 (StyleGAN2 order)."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.weight = nn.Parameter(init_variance_scaling_(torch.empty(out_ch, in_ch, 3, 3)))
        self.bias = nn.Parameter(torch.zeros(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        C = x.shape[1]
        w = _fir_kernel(x.device, x.dtype).expand(C, 1, 4, 4)
        x = F.conv2d(F.pad(x, (2, 2, 2, 2)), w, groups=C)  # blur at full resolution: H -> H + 1
        return F.conv2d(x, self.weight, self.bias, stride=2)  # H + 1 -> H / 2


class WaveletDownConv(nn.Module):
    """WaveDiff's input-pyramid downsampling: DWT, the 4 bands / 2 concatenated, then a 3x3 conv."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv = conv2d(4 * in_ch, out_ch, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(dwt(x).mul_(0.5))


# --------------------------------------------------------------------------------------------------
# Generator blocks
# --------------------------------------------------------------------------------------------------


class AdaptiveGroupNorm(nn.Module):
    """GroupNorm without affine, then gamma * h + beta with (gamma, beta) = Linear(z_emb) (fan_out init, as the
    reference's); gamma starts at 1.

    z_dim = 0 (a network without a latent, e.g. the EDM denoiser): a plain GroupNorm with learned affine.
    """

    def __init__(self, channels: int, z_dim: int):
        super().__init__()
        self.norm = group_norm(channels, affine=z_dim == 0)
        self.style = linear(z_dim, 2 * channels, init_mode="fan_out") if z_dim > 0 else None
        if self.style is not None:
            with torch.no_grad():
                self.style.bias[:channels] = 1.0

    def forward(self, h: torch.Tensor, zemb: torch.Tensor | None) -> torch.Tensor:
        if self.style is None:
            return self.norm(h)
        gamma, beta = self.style(zemb).chunk(2, dim=1)
        return group_norm_per_sample(h, self.norm.num_groups, gamma, beta, self.norm.eps)

    def forward_silu(self, h: torch.Tensor, zemb: torch.Tensor | None,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
        """silu(self(h + bias[:, :, None, None], zemb)) for a per-sample bias (B, C) or None. With a bias, h is
        consumed (the eager path adds it in place: pass a fresh tensor). Sampling on the CPU (float32,
        channels_last, no autograd) takes the fused kernel of `cpu_kernels`: two passes instead of five."""
        if self.style is not None:
            gamma, beta = self.style(zemb).chunk(2, dim=1)
        else:
            gamma, beta = self.norm.weight[None], self.norm.bias[None]
        out = cpu_kernels.adagn_silu(h, gamma, beta, bias, self.norm.num_groups, self.norm.eps)
        if out is not None:
            return out
        if bias is not None:
            h = h.add_(bias[:, :, None, None])
        if self.style is None:
            return silu(self.norm(h))
        return silu(group_norm_per_sample(h, self.norm.num_groups, gamma, beta, self.norm.eps))


def group_norm_silu(norm: nn.GroupNorm, h: torch.Tensor) -> torch.Tensor:
    """silu(norm(h)) for an affine GroupNorm; on the CPU sampling path the fused kernel of `cpu_kernels`."""
    out = cpu_kernels.adagn_silu(h, norm.weight[None], norm.bias[None], None, norm.num_groups, norm.eps)
    return out if out is not None else silu(norm(h))


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions (NCSN++ AttnBlockpp), skip rescaled by 1/sqrt(2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.qkv = conv2d(channels, 3 * channels, 1)
        with torch.no_grad():  # q, k, v each initialised as its own C x C layer
            for i in range(3):
                init_variance_scaling_(self.qkv.weight[i * channels:(i + 1) * channels], 0.1)
        self.proj = conv2d(channels, channels, 1, init_scale=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = pointwise(self.qkv, self.norm(x)).reshape(B, 3, 1, C, H * W).transpose(-1, -2).unbind(1)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C), scale 1/sqrt(C)
        h = h.transpose(-1, -2).reshape(B, C, H, W)  # a view in channels_last strides, or a copy
        # The input's layout, whichever it is (torch.compile's GroupNorm of the next block needs it).
        channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        h = h.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        h = pointwise(self.proj, h)
        return h.add_(x).mul_(1 / math.sqrt(2))  # (x + h) / sqrt(2), in the conv's fresh output


class ResBlock(nn.Module):
    """BigGAN-style residual block with adaptive GroupNorm (z), a time-embedding bias, optional resampling.

    resample: "none", "down" or "up". With `wavelet=True` (WaveDiff's frequency-aware block) downsampling
    is a DWT of both paths after the first conv (keeping LL / 2; the main path's three high bands are
    returned as a skip) and upsampling is an inverse DWT of both paths that takes the high bands of
    the matching down block through a grouped 3x3 conv (one group per band). With `wavelet=False` it
    is the plain NCSN++ block: [1,3,3,1] FIR blur resampling before the first conv.
    """

    def __init__(self, in_ch: int, out_ch: int, temb_dim: int, z_dim: int, resample: str = "none",
                 wavelet: bool = False, skip_ch: int = 0, dropout: float = 0.0):
        super().__init__()
        if resample not in ("none", "down", "up"):
            raise ValueError(f"resample must be none, down or up, got {resample!r}")
        self.resample, self.wavelet, self.out_ch = resample, wavelet, out_ch
        self.norm0 = AdaptiveGroupNorm(in_ch, z_dim)
        self.conv0 = conv2d(in_ch, out_ch, 3)
        self.temb = linear(temb_dim, out_ch)
        self.norm1 = AdaptiveGroupNorm(out_ch, z_dim)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = conv2d(out_ch, out_ch, 3, init_scale=0.0)
        self.skip = conv2d(in_ch, out_ch, 1) if (in_ch != out_ch or resample != "none") else None
        self.conv_high = None
        if wavelet and resample == "up":
            if skip_ch < 1:
                raise ValueError("a wavelet up block needs skip_ch (channels of the matching down block)")
            self.conv_high = conv2d(3 * skip_ch, 3 * out_ch, 3, groups=3)

    def forward(self, x: torch.Tensor, temb: torch.Tensor, zemb: torch.Tensor | None,
                high: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        h = self.norm0.forward_silu(x, zemb)
        high_out = None
        if self.wavelet:
            h = self.conv0(h)
            if self.skip is not None:
                x = pointwise(self.skip, x)
            if self.resample == "down":
                C = h.shape[1]
                hb = dwt(h)
                h, high_out = hb[:, :C] * 0.5, hb[:, C:]
                x = F.avg_pool2d(x, 2)  # = LL / 2 of the DWT: the shortcut keeps only the low band
            elif self.resample == "up":
                if high is None:
                    raise ValueError("a wavelet up block needs the high bands of its down block")
                high = self.conv_high(high * 0.5).mul_(2.0)
                # LL = 2 h (and 2 x) under the high bands, no concatenated copy; h and x are fresh outputs of
                # conv0 and of the skip conv (every resampling block has one), scaled in place.
                h = idwt_bands(h.mul_(2.0), high)
                x = idwt_bands(x.mul_(2.0), high)
        else:
            if self.resample == "down":
                h, x = blur_downsample(h), blur_downsample(x)
            elif self.resample == "up":
                h, x = blur_upsample(h), blur_upsample(x)
            h = self.conv0(h)
            if self.skip is not None:
                x = pointwise(self.skip, x)
        # In-place adds and scales below only touch fresh conv / wavelet outputs that no backward needs.
        h = self.norm1.forward_silu(h, zemb, bias=self.temb(F.silu(temb)))
        h = self.conv1(self.dropout(h))
        out = h.add_(x).mul_(1 / math.sqrt(2))  # (x + h) / sqrt(2)
        if self.wavelet and self.resample == "down":
            return out, high_out
        return out
