"""The built-in synthetic image source: coloured shapes on colour gradients, at any resolution.

Image i of a set is a pure function of (seed, i, resolution): `synthetic_image(seed, i, 64)` is the same
array on every machine. Shapes (discs, rectangles, triangles, rings) are drawn with 2x2 supersampling,
so edges are smooth and the images are a meaningful (if easy) target for a generative model.
"""

from __future__ import annotations

import numpy as np


def _rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(index) & 0xFFFFFFFFFFFF, 0x5EED])


def synthetic_image(seed: int, index: int, resolution: int) -> np.ndarray:
    """uint8 array (resolution, resolution, 3) for image `index` of synthetic set `seed`."""
    if resolution < 1:
        raise ValueError(f"resolution must be >= 1, got {resolution}")
    rng = _rng(seed, index)
    ss = 2  # supersampling factor
    n = resolution * ss
    yy, xx = np.meshgrid((np.arange(n) + 0.5) / n, (np.arange(n) + 0.5) / n, indexing="ij")

    # Background: linear gradient between two colours along a random direction.
    angle = rng.uniform(0, 2 * np.pi)
    t = (np.cos(angle) * (xx - 0.5) + np.sin(angle) * (yy - 0.5)) / np.sqrt(0.5) + 0.5
    c0, c1 = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
    img = c0[None, None, :] * (1 - t[..., None]) + c1[None, None, :] * t[..., None]

    for _ in range(int(rng.integers(1, 5))):
        kind = int(rng.integers(0, 4))
        cx, cy = rng.uniform(0.15, 0.85, 2)
        size = rng.uniform(0.08, 0.3)
        color = rng.uniform(0, 1, 3)
        if kind == 0:  # disc
            mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= size**2
        elif kind == 1:  # axis-aligned rectangle with random aspect
            w, h = size * rng.uniform(0.5, 1.5), size * rng.uniform(0.5, 1.5)
            mask = (np.abs(xx - cx) <= w) & (np.abs(yy - cy) <= h)
        elif kind == 2:  # triangle: three random vertices around the centre
            a = rng.uniform(0, 2 * np.pi) + np.array([0.0, 2.1, 4.2]) + rng.uniform(-0.3, 0.3, 3)
            px, py = cx + size * 1.3 * np.cos(a), cy + size * 1.3 * np.sin(a)
            signs = []
            for k in range(3):
                x0, y0, x1, y1 = px[k], py[k], px[(k + 1) % 3], py[(k + 1) % 3]
                signs.append((x1 - x0) * (yy - y0) - (y1 - y0) * (xx - x0) >= 0)
            mask = (signs[0] & signs[1] & signs[2]) | (~signs[0] & ~signs[1] & ~signs[2])
        else:  # ring
            r = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)
            mask = (r <= size) & (r >= size * rng.uniform(0.4, 0.8))
        alpha = rng.uniform(0.6, 1.0)
        img = np.where(mask[..., None], (1 - alpha) * img + alpha * color[None, None, :], img)

    img = img.reshape(resolution, ss, resolution, ss, 3).mean(axis=(1, 3))  # box-filter the supersamples
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
