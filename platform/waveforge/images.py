"""Images as the platform writes them: [-1, 1] floats -> uint8, and sample grids.

    to_uint8(x)                        [-1, 1] float (B,C,H,W) -> uint8 (the grid / FID input)
    make_grid(images, nrow, min_size)  uint8 (N,3,H,W) -> one RGB PIL image (upscaled to >= min_size px)
"""

from __future__ import annotations

import math

import torch
from PIL import Image


def to_uint8(img: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float images -> uint8 (the grid / FID input)."""
    return ((img.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def make_grid(images: torch.Tensor, nrow: int = 8, min_size: int = 0) -> Image.Image:
    """uint8 (N,3,H,W) -> one RGB image, `nrow` images per row (empty cells black).

    min_size: upscale the grid by a whole factor (nearest neighbour: every sample pixel stays a sharp
    square) until its shorter side is at least this many pixels, so that small samples are visible."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3) or images.shape[0] < 1:
        raise ValueError(f"make_grid expects uint8 (N,3,H,W) with N >= 1, got {images.dtype} {tuple(images.shape)}")
    if nrow < 1:
        raise ValueError(f"nrow={nrow} must be >= 1")
    n, c, h, w = images.shape
    cols = min(nrow, n)
    rows = math.ceil(n / cols)
    grid = torch.zeros(rows * cols, c, h, w, dtype=torch.uint8)
    grid[:n] = images.detach().cpu()
    grid = grid.reshape(rows, cols, c, h, w).permute(0, 3, 1, 4, 2).reshape(rows * h, cols * w, c)
    if c == 1:
        grid = grid.expand(-1, -1, 3)
    out = Image.fromarray(grid.contiguous().numpy())  # uint8 (H, W, 3): RGB
    factor = math.ceil(min_size / min(out.size)) if min_size > 0 else 1
    if factor > 1:
        out = out.resize((out.width * factor, out.height * factor), Image.Resampling.NEAREST)
    return out


def grid_rows(n: int) -> int:
    """Images per row of a square-ish grid of n images."""
    return int(math.ceil(math.sqrt(n)))
