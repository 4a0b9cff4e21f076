"""Small deterministic feature extractors standing in for Inception in tests (no download, CPU, fast).

Both have clean-fid's `custom_feat_extractor` interface: float (B,3,299,299) in [0,255] -> (B,D) float32,
so they plug into `cleanfid.fid.compute_fid(custom_feat_extractor=...)` and `eval.feature_extractor=
tests.feature_extractors:random_conv32` alike. Weights are fixed by a seed: the same on every process.
"""

from __future__ import annotations

import torch
from torch import nn


def _random_conv_net(dim: int, seed: int) -> nn.Module:
    """A fixed random-projection conv net: 299 px -> 37 -> 9 -> global average -> `dim` features."""
    gen = torch.Generator().manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 16, kernel_size=8, stride=8),  # 299 -> 37
        nn.Tanh(),
        nn.Conv2d(16, dim, kernel_size=4, stride=4),  # 37 -> 9
        nn.Tanh(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (1.0 / max(1, p[0].numel()) ** 0.5))
    return net.eval().requires_grad_(False)


_NETS: dict[tuple[int, int], nn.Module] = {}


def _features(x: torch.Tensor, dim: int, seed: int) -> torch.Tensor:
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected (B,3,H,W), got {tuple(x.shape)}")
    net = _NETS.setdefault((dim, seed), _random_conv_net(dim, seed))
    with torch.no_grad():
        return net.to(x.device)(x.float() / 127.5 - 1.0) * 4.0


def random_conv32(x: torch.Tensor) -> torch.Tensor:
    """32 features of a fixed random conv net (seed 0)."""
    return _features(x, dim=32, seed=0)


def random_conv16(x: torch.Tensor) -> torch.Tensor:
    """16 features of another fixed random conv net (seed 1)."""
    return _features(x, dim=16, seed=1)
