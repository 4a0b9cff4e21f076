"""The built-in offline feature extractor (`eval.features=proxy`): FID without downloading anything.

Inception's weights (clean-fid) must be downloaded, and laptops and compute nodes are often offline. The
proxy is a small fixed network whose weights are drawn in code from a fixed seed (numpy's PCG64, the same
numbers on every machine and version), so it needs no file at all:

    images (B,3,H,W) in [0, 255] -> [-1, 1] -> area/bilinear resize to 64x64
    -> 3 random conv layers (3x3; 16, 32, 64 channels; strides 1, 2, 2; ReLU), each layer's activations'
       mean and standard deviation over space                  (224 features: texture at three scales)
    -> the image's colour standard deviation per channel (3) and the mean colour of each cell of a 4x4
       grid (48)                                                (51 features: colour and layout)
    = 275 features per image, with no exact linear dependency between them (so that the covariance of a
    few hundred samples is not singular).

Random convolutional features are a known stand-in for learned ones when only relative comparisons
matter: the Frechet distance between proxy features falls as samples approach the data and grows with
noise or blur (tests/test_metrics_proxy.py checks both). It is NOT Inception FID: its values are logged
under their own names (`eval_fid_proxy`, `eval_kid_proxy`) and are comparable only with each other.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SEED = 20261206
SIZE = 64  # images are resized to SIZE x SIZE before the network
WIDTHS = (16, 32, 64)
GRID = 4
NAME = "proxy-v1"  # names the features in reference-statistics cache keys; bump when the network changes
DIM = 2 * sum(WIDTHS) + 3 + 3 * GRID * GRID


class ProxyFeatures(nn.Module):
    """float (B,3,H,W) in [0,255] -> float32 (B, 275) features (clean-fid's custom_feat_extractor interface)."""

    def __init__(self) -> None:
        super().__init__()
        rng = np.random.Generator(np.random.PCG64(SEED))
        self.convs = nn.ModuleList()
        c_in = 3
        for i, c_out in enumerate(WIDTHS):
            conv = nn.Conv2d(c_in, c_out, 3, stride=1 if i == 0 else 2, padding=1)
            fan_in = c_in * 9
            w = rng.standard_normal(conv.weight.shape) * np.sqrt(2.0 / fan_in)  # He scaling: ReLU keeps the scale
            b = rng.uniform(-0.1, 0.1, conv.bias.shape)
            with torch.no_grad():
                conv.weight.copy_(torch.from_numpy(w.astype(np.float32)))
                conv.bias.copy_(torch.from_numpy(b.astype(np.float32)))
            self.convs.append(conv)
            c_in = c_out
        self.requires_grad_(False).eval()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images (B,3,H,W), got {tuple(images.shape)}")
        x = images.float() / 127.5 - 1.0
        if x.shape[-1] != SIZE or x.shape[-2] != SIZE:
            if min(x.shape[-2:]) >= SIZE:
                x = F.adaptive_avg_pool2d(x, SIZE)  # area average: no aliasing from large images
            else:
                x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
        feats = []
        h = x
        for conv in self.convs:
            h = F.relu(conv(h))
            feats.append(h.mean(dim=(2, 3)))
            feats.append(h.std(dim=(2, 3)))  # texture energy: what noise raises and blur lowers
        feats.append(x.std(dim=(2, 3)))  # (the colour means are the grid's average: not repeated)
        feats.append(F.adaptive_avg_pool2d(x, GRID).flatten(1))
        return torch.cat(feats, dim=1)
