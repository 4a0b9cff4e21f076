"""Orthonormal Haar wavelet transform: the one subband convention of the whole platform.

Convention. For every 2x2 pixel block [[a, b], [c, d]] (a = top-left, b = top-right, c = bottom-left,
d = bottom-right) one DWT level gives, per channel,

    LL = (a + b + c + d) / 2    low-pass both ways (the half-resolution image, x2 in value)
    LH = (a + b - c - d) / 2    high-pass along height, low-pass along width: top minus bottom,
                                i.e. the HORIZONTAL detail (it responds to horizontal edges)
    HL = (a - b + c - d) / 2    low-pass along height, high-pass along width: left minus right,
                                i.e. the VERTICAL detail (it responds to vertical edges)
    HH = (a - b - c + d) / 2    diagonal detail

and `dwt` concatenates the bands as [LL, LH, HL, HH] along channels, each band C channels.
This is exactly pytorch_wavelets' DWTForward(J=1, wave="haar", mode="zero"): LL = yl and
[LH, HL, HH] = yh[0][:, :, 0], yh[0][:, :, 1], yh[0][:, :, 2] (same order, same signs). The reference
WaveDiff's own DWT_2D (used inside its generator, and at I/O for its CelebA-HQ 256/1024 runs) agrees on
LL and HH but SWAPS the two detail bands: its "LH" is our HL and its "HL" is our LH. Inside the models
the order does not matter (every band goes through learned convolutions); at I/O it fixes which 3
channels of the 12 are which. `tests/test_wavelet.py` pins both facts.

The transform is orthonormal (the inverse is the transpose), exact in fp32, written as one 4x4 matrix
product per 2x2 block (a reshape, a permute and a matmul) when autograd records it, so it is
differentiable to any order (R1 runs through it) and has no filter parameters; without a graph
(sampling) the same sums come from a two-stage add/sub butterfly on strided views written straight into
the output, in the input's memory layout (channels_last stays channels_last); float32 channels_last on
the CPU (the sampler's layout) takes the one-pass C kernels of `waveforge.cpu_kernels` instead. Inputs in
bf16/fp16 are computed in fp32 and cast back (fp64 stays fp64, for gradcheck), with autocast disabled
inside.
"""

from __future__ import annotations

import contextlib

import torch

from waveforge import cpu_kernels

__all__ = ["dwt", "idwt", "idwt_bands", "to_wavelet", "from_wavelet", "dwt_levels", "idwt_levels"]


# Analysis matrix: rows = bands [LL, LH, HL, HH], columns = pixels [a, b, c, d] of each 2x2 block.
_HAAR = torch.tensor([[1.0, 1.0, 1.0, 1.0],
                      [1.0, 1.0, -1.0, -1.0],
                      [1.0, -1.0, 1.0, -1.0],
                      [1.0, -1.0, -1.0, 1.0]]) * 0.5
_HAAR_CACHE: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _haar(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    m = _HAAR_CACHE.get((device, dtype))
    if m is None:
        m = _HAAR_CACHE[(device, dtype)] = _HAAR.to(device=device, dtype=dtype)
    return m


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 inputs (exact +-1/2 filters, no low-precision rounding); fp64 stays fp64."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _exact(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off: under bf16 autocast a matmul would otherwise run in bf16 and round the band sums."""
    if device.type in ("cuda", "cpu", "xpu"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _check_image(x: torch.Tensor, name: str) -> None:
    if x.dim() != 4:
        raise ValueError(f"{name}: expected a (B, C, H, W) tensor, got shape {tuple(x.shape)}")
    if x.shape[-1] % 2 or x.shape[-2] % 2:
        raise ValueError(f"{name}: height and width must be even, got {tuple(x.shape[-2:])}")


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last for a channels_last tensor (that is not also plain contiguous), else contiguous."""
    cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if cl else torch.contiguous_format


def _butterfly(x: torch.Tensor) -> bool:
    """Use the add/sub form (written through `out=` views, which autograd cannot record): no graph to record."""
    return not (x.requires_grad and torch.is_grad_enabled())


def dwt(x: torch.Tensor) -> torch.Tensor:
    """One Haar level: (B, C, H, W) -> (B, 4C, H/2, W/2) = [LL, LH, HL, HH], each C channels."""
    _check_image(x, "dwt")
    B, C, H, W = x.shape
    h, w = H // 2, W // 2
    if _butterfly(x):
        out = cpu_kernels.haar_dwt(x)  # float32 channels_last on the CPU (the sampler's): one fused pass
        if out is not None:
            return out
        # Without autograd: sums and differences of strided views written straight into the bands, in the
        # input's memory layout (channels_last stays channels_last). Rows first: s = a+c | b+d, d = a-c | b-d.
        xc = x.to(_compute_dtype(x))
        top, bottom = xc[:, :, 0::2], xc[:, :, 1::2]
        s, d = top + bottom, top - bottom
        out = torch.empty((B, 4 * C, h, w), dtype=xc.dtype, device=x.device, memory_format=_memory_format(x))
        torch.add(s[..., 0::2], s[..., 1::2], out=out[:, :C])  # LL: a + b + c + d
        torch.add(d[..., 0::2], d[..., 1::2], out=out[:, C:2 * C])  # LH: a + b - c - d
        torch.sub(s[..., 0::2], s[..., 1::2], out=out[:, 2 * C:3 * C])  # HL: a - b + c - d
        torch.sub(d[..., 0::2], d[..., 1::2], out=out[:, 3 * C:])  # HH: a - b - c + d
        return out.mul_(0.5).to(x.dtype)
    # (B, C, h, 2, w, 2) -> (B, [row in block, col in block], C*h*w): the 4 pixels of each block in rows
    # a, b, c, d; one (4x4) @ (4, C*h*w) product then gives the bands already in band-major order.
    ct = _compute_dtype(x)
    with _exact(x.device):
        pixels = x.to(ct).reshape(B, C, h, 2, w, 2).permute(0, 3, 5, 1, 2, 4).reshape(B, 4, C * h * w)
        return torch.matmul(_haar(x.device, ct), pixels).reshape(B, 4 * C, h, w).to(x.dtype)


def _idwt_butterfly(ll: torch.Tensor, high: torch.Tensor, dtype: torch.dtype,
                    memory_format: torch.memory_format) -> torch.Tensor:
    """The inverse butterfly from the LL band (B, C, h, w) and the high bands (B, 3C, h, w) [LH, HL, HH], read
    through views (no concatenated copy); each pixel of the 2x2 blocks written through a strided view.
    Computed in fp32 (fp64 for an fp64 `dtype`, the result's), returned in `dtype`."""
    B, C, h, w = ll.shape
    if dtype == torch.float32 and memory_format is torch.channels_last:
        out = cpu_kernels.haar_idwt(ll, high)  # the CPU sampler's layout: one fused pass (None: not here)
        if out is not None:
            return out
    ct = torch.float64 if dtype == torch.float64 else torch.float32
    ll, high = ll.to(ct), high.to(ct)
    lh, hl, hh = high[:, :C], high[:, C:2 * C], high[:, 2 * C:]
    p, q, r, s = ll + lh, hl + hh, ll - lh, hl - hh
    out = torch.empty((B, C, 2 * h, 2 * w), dtype=ct, device=ll.device, memory_format=memory_format)
    torch.add(p, q, out=out[:, :, 0::2, 0::2])  # a = (LL + LH + HL + HH) / 2
    torch.sub(p, q, out=out[:, :, 0::2, 1::2])  # b = (LL + LH - HL - HH) / 2
    torch.add(r, s, out=out[:, :, 1::2, 0::2])  # c = (LL - LH + HL - HH) / 2
    torch.sub(r, s, out=out[:, :, 1::2, 1::2])  # d = (LL - LH - HL + HH) / 2
    return out.mul_(0.5).to(dtype)


def idwt(y: torch.Tensor) -> torch.Tensor:
    """Inverse of `dwt`: (B, 4C, h, w) bands [LL, LH, HL, HH] -> (B, C, 2h, 2w)."""
    if y.dim() != 4 or y.shape[1] % 4:
        raise ValueError(f"idwt: expected a (B, 4C, h, w) tensor, got shape {tuple(y.shape)}")
    B, C4, h, w = y.shape
    C = C4 // 4
    if _butterfly(y):
        return _idwt_butterfly(y[:, :C], y[:, C:], y.dtype, _memory_format(y))
    # The matrix is orthogonal and symmetric: its inverse is itself.
    ct = _compute_dtype(y)
    with _exact(y.device):
        pixels = torch.matmul(_haar(y.device, ct), y.to(ct).reshape(B, 4, C * h * w)).reshape(B, 2, 2, C, h, w)
        return pixels.permute(0, 3, 4, 1, 5, 2).reshape(B, C, 2 * h, 2 * w).to(y.dtype)


def idwt_bands(ll: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """`idwt(torch.cat([ll, high], dim=1))`: the LL band (B, C, h, w) and the high bands (B, 3C, h, w)
    [LH, HL, HH] -> (B, C, 2h, 2w). Without autograd the bands are read where they lie: no concatenated copy
    (the decoder's up blocks and the frequency bottleneck put a new LL under stored high bands)."""
    if ll.dim() != 4 or high.dim() != 4 or high.shape[1] != 3 * ll.shape[1] or high.shape[2:] != ll.shape[2:] \
            or high.shape[0] != ll.shape[0]:
        raise ValueError(f"idwt_bands: expected LL (B, C, h, w) and high bands (B, 3C, h, w), got shapes "
                         f"{tuple(ll.shape)} and {tuple(high.shape)}")
    if _butterfly(ll) and _butterfly(high):
        return _idwt_butterfly(ll, high, torch.promote_types(ll.dtype, high.dtype), _memory_format(ll))
    return idwt(torch.cat([ll, high], dim=1))


def to_wavelet(img: torch.Tensor) -> torch.Tensor:
    """Image in [-1, 1], (B, C, H, W) -> subbands in [-1, 1], (B, 4C, H/2, W/2): dwt(img) / 2."""
    return dwt(img) * 0.5


def from_wavelet(w: torch.Tensor) -> torch.Tensor:
    """Subbands (B, 4C, h, w) as made by `to_wavelet` -> image (B, C, 2h, 2w): idwt(2 w). Not clamped."""
    return idwt(w * 2.0)


def dwt_levels(x: torch.Tensor, levels: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """`levels` Haar levels: returns (LL of the last level, [high bands (B, 3C, .) of level 1, 2, ...])."""
    if levels < 1:
        raise ValueError(f"dwt_levels: levels must be >= 1, got {levels}")
    highs = []
    C = x.shape[1]
    for _ in range(levels):
        y = dwt(x)
        x, high = y[:, :C], y[:, C:]
        highs.append(high)
    return x, highs


def idwt_levels(ll: torch.Tensor, highs: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of `dwt_levels`."""
    for high in reversed(highs):
        ll = idwt_bands(ll, high)
    return ll
