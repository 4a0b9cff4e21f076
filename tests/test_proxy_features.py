"""The built-in offline feature extractor (eval.features=proxy): deterministic, needs nothing from the
network, and its Frechet distance orders image sets as FID should (closer to the data = lower)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from waveforge import metrics, proxy_features
from waveforge.config import EvalConfig
from waveforge.data import synthetic_image

pytestmark = pytest.mark.usefixtures("one_thread")
TOTAL = 1757.5050107275176  # sum of |weights| of proxy-v1 (float64)


def _images(start: int, n: int, size: int = 32) -> torch.Tensor:
    return torch.stack([torch.from_numpy(synthetic_image(0, i, size)).permute(2, 0, 1)
                        for i in range(start, start + n)])


def _stats(ext: metrics.FeatureExtractor, images: torch.Tensor) -> metrics.Stats:
    acc = metrics.FeatureStats()
    for batch in images.split(64):
        acc.add(ext(batch))
    return acc.reduce()


def test_weights_come_from_the_seed_alone() -> None:
    """Two instances are identical, and the network is the documented one: a change to it must come with a
    new NAME (cached reference statistics are keyed by it)."""
    a, b = proxy_features.ProxyFeatures(), proxy_features.ProxyFeatures()
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert na == nb and torch.equal(pa, pb)
    total = sum(float(p.double().abs().sum()) for p in a.parameters())
    assert total == pytest.approx(TOTAL, rel=1e-9), (proxy_features.NAME, total)
    x = _images(0, 4)
    assert a(x.float()).shape == (4, proxy_features.DIM)


def test_offline_and_named_apart_from_inception(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*a: object, **k: object) -> None:
        raise AssertionError("the proxy must not touch the network")

    monkeypatch.setattr("urllib.request.urlopen", no_network)
    ext = metrics.load_feature_extractor(EvalConfig(features="proxy"), "cpu")
    assert ext.name == proxy_features.NAME and ext.named({"fid": 1.0, "kid": 2.0}) == {"fid_proxy": 1.0,
                                                                                        "kid_proxy": 2.0}
    feats = ext(_images(0, 3))
    assert feats.shape == (3, proxy_features.DIM) and torch.isfinite(feats).all()
    # images of another size are resized to the network's input first: the same content, nearly the same features
    big = torch.nn.functional.interpolate(_images(0, 3).float(), size=(64, 64), mode="nearest").round().byte()
    assert torch.allclose(ext(big), feats, atol=0.15 * feats.abs().max().item())


def test_distance_grows_with_noise_and_blur() -> None:
    """Two disjoint sets of the same data are close; adding noise or blur to one moves it away, the more the
    further; unrelated noise images are far away."""
    ext = metrics.load_feature_extractor(EvalConfig(features="proxy"), "cpu")
    real, other = _images(0, 256), _images(256, 256)
    ref = _stats(ext, real)
    same = metrics.fid_from_stats(ref, _stats(ext, other))
    gen = torch.Generator().manual_seed(0)

    def noisy(sigma: float) -> torch.Tensor:
        return (other.float() + torch.randn(other.shape, generator=gen) * sigma).clamp(0, 255).round().byte()

    def blurred(k: int) -> torch.Tensor:
        return torch.nn.functional.avg_pool2d(other.float(), k, stride=1, padding=k // 2,
                                              count_include_pad=False)[..., :32, :32].round().byte()

    noise_fids = [metrics.fid_from_stats(ref, _stats(ext, noisy(s))) for s in (24.0, 48.0, 96.0)]
    blur_fids = [metrics.fid_from_stats(ref, _stats(ext, blurred(k))) for k in (3, 5, 9)]
    junk = torch.randint(0, 256, other.shape, generator=gen, dtype=torch.uint8)
    junk_fid = metrics.fid_from_stats(ref, _stats(ext, junk))
    assert same < noise_fids[0] < noise_fids[1] < noise_fids[2] < junk_fid, (same, noise_fids, junk_fid)
    assert same < blur_fids[0] < blur_fids[1] < blur_fids[2], (same, blur_fids)
    assert junk_fid > 10 * same
    assert np.isfinite([same, *noise_fids, *blur_fids]).all()
