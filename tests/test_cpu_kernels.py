"""The fused CPU sampling kernels (cpu_kernels.py + cpu_kernels.c): built with the machine's C compiler,
equal to the eager PyTorch chain it replaces, used only where no gradient is recorded, and a build failure
falls back to the eager ops."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from waveforge import config, cpu_kernels
from waveforge.models import build_generator, to_inference_layout

HAVE_CC = any(shutil.which(c) for c in ("cc", "gcc", "clang")) or bool(os.environ.get("CC"))


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    """The kernel enabled (whatever the environment says), its load cache cleared before and after."""
    if not HAVE_CC:
        pytest.skip("no C compiler on this machine: the samplers run the eager ops")
    monkeypatch.setenv("WAVEFORGE_CPU_KERNELS", "1")
    cpu_kernels._library.cache_clear()
    assert cpu_kernels.available(), "a C compiler is here, so the kernel must build and load"
    yield
    cpu_kernels._library.cache_clear()


def eager(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, bias: torch.Tensor | None,
          groups: int) -> torch.Tensor:
    h = x + bias[:, :, None, None] if bias is not None else x
    return F.silu(F.group_norm(h, groups, eps=1e-6) * gamma[:, :, None, None] + beta[:, :, None, None])


@pytest.mark.parametrize("shape,groups", [((2, 64, 32, 32), 16), ((3, 96, 7, 5), 24), ((1, 12, 1, 1), 3),
                                          ((2, 256, 8, 8), 32), ((5, 8, 3, 3), 1)])
def test_kernel_equals_the_eager_chain(kernel, shape: tuple[int, ...], groups: int) -> None:  # noqa: ANN001
    g = torch.Generator().manual_seed(sum(shape))
    n, c = shape[:2]
    x = (torch.randn(shape, generator=g) * 4 + 3).contiguous(memory_format=torch.channels_last)  # mean >> 0
    gamma, beta = torch.randn(n, c, generator=g) + 1, torch.randn(n, c, generator=g)
    bias = torch.randn(n, c, generator=g) * 2
    x_before = x.clone()
    with torch.no_grad():
        for b in (None, bias):
            out = cpu_kernels.adagn_silu(x, gamma, beta, b, groups, 1e-6)
            assert out is not None and out.is_contiguous(memory_format=torch.channels_last)
            torch.testing.assert_close(out, eager(x, gamma, beta, b, groups), atol=2e-5, rtol=1e-5)
        # a per-channel affine broadcast over the batch (a plain GroupNorm's weight and bias)
        out = cpu_kernels.adagn_silu(x, gamma[:1], beta[:1], None, groups, 1e-6)
        torch.testing.assert_close(out, eager(x, gamma[:1].expand(n, c), beta[:1].expand(n, c), None, groups),
                                   atol=2e-5, rtol=1e-5)
        # SiLU's tails: large negative and positive pre-activations
        big = x * 30
        torch.testing.assert_close(cpu_kernels.adagn_silu(big, gamma * 40, beta, None, groups, 1e-6),
                                   eager(big, gamma * 40, beta, None, groups), atol=1e-4, rtol=1e-5)
    assert torch.equal(x, x_before)


def test_kernel_applies_only_to_cpu_sampling(kernel) -> None:  # noqa: ANN001
    x = torch.randn(2, 8, 4, 4).contiguous(memory_format=torch.channels_last)
    gamma, beta = torch.ones(2, 8), torch.zeros(2, 8)
    assert cpu_kernels.adagn_silu(x, gamma, beta, None, 2, 1e-6) is None  # autograd on: a graph is recorded
    with torch.no_grad():
        assert cpu_kernels.adagn_silu(x, gamma, beta, None, 2, 1e-6) is not None
        assert cpu_kernels.adagn_silu(x.contiguous(), gamma, beta, None, 2, 1e-6) is None  # NCHW
        assert cpu_kernels.adagn_silu(x.bfloat16(), gamma, beta, None, 2, 1e-6) is None
        assert cpu_kernels.adagn_silu(x, gamma, beta, None, 3, 1e-6) is None  # 8 channels in 3 groups
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert cpu_kernels.adagn_silu(x, gamma, beta, None, 2, 1e-6) is None


@pytest.mark.parametrize("shape", [(2, 12, 16, 16), (1, 3, 2, 6), (3, 64, 10, 4)])
def test_haar_kernels_equal_the_transform(kernel, shape: tuple[int, ...]) -> None:  # noqa: ANN001
    """dwt / idwt / idwt_bands on channels_last float32 without autograd go through the one-pass kernels and
    give the graph-recording transform's bands (itself checked against pytorch_wavelets in test_wavelet)."""
    from waveforge.wavelet import dwt, idwt, idwt_bands

    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=g)
    ref = dwt(x.clone().requires_grad_()).detach()  # the matmul form that autograd records
    x_cl = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert cpu_kernels.haar_dwt(x_cl) is not None and cpu_kernels.haar_dwt(x) is None  # NCHW: eager
        y = dwt(x_cl)
        assert y.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(y, ref, atol=1e-6, rtol=0)
        C = shape[1]
        back = idwt(y)  # bands read as channel slices of y, in place
        assert cpu_kernels.haar_idwt(y[:, :C], y[:, C:]) is not None
        assert back.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(back, x, atol=1e-6, rtol=0)
        ll = torch.randn(shape[0], C, *y.shape[2:], generator=g).contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(idwt_bands(ll, y[:, C:]), idwt(torch.cat([ll, y[:, C:]], 1).contiguous()),
                                   atol=1e-6, rtol=0)
    assert cpu_kernels.haar_dwt(x_cl) is None  # autograd on: the differentiable form


def test_generator_samples_through_the_kernel(kernel, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    """A CPU sampling forward (no autograd, channels_last) calls the kernel in every residual block and gives
    the eager forward's x0_hat."""
    cfg = config.load("tiny")
    torch.manual_seed(0)
    G = build_generator(cfg.model, cfg.diffusion)
    with torch.no_grad():
        for p in G.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    G = to_inference_layout(G.eval())
    g = torch.Generator().manual_seed(1)
    r = cfg.model.resolution // 2
    x = torch.randn(2, 4 * cfg.model.channels, r, r, generator=g).contiguous(memory_format=torch.channels_last)
    t, z = torch.tensor([1, 1]), torch.randn(2, G.nz, generator=g)
    real, results = cpu_kernels.adagn_silu, []

    def counted(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        results.append(real(*args, **kwargs) is not None)
        return None if not results[-1] else real(*args, **kwargs)

    monkeypatch.setattr(cpu_kernels, "adagn_silu", counted)
    with torch.no_grad():
        fused = G(x, t, z)
    blocks = sum(1 for m in G.modules() if type(m).__name__ == "ResBlock")
    assert len(results) >= 2 * blocks + 1 and all(results)  # both norms of every block and the output norm
    monkeypatch.setenv("WAVEFORGE_CPU_KERNELS", "0")
    cpu_kernels._library.cache_clear()
    results.clear()
    with torch.no_grad():
        plain = G(x, t, z)
    assert results and not any(results)  # the eager ops everywhere
    assert plain.abs().max() > 1e-3
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)


def test_build_is_cached_and_a_failed_build_falls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture) -> None:
    if HAVE_CC:
        lib = cpu_kernels.build(tmp_path / "a")
        stamp = lib.stat().st_mtime_ns
        assert cpu_kernels.build(tmp_path / "a") == lib and lib.stat().st_mtime_ns == stamp  # not rebuilt
        assert [p.name for p in (tmp_path / "a").iterdir()] == [lib.name]  # no temporary file left
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    monkeypatch.setenv("WAVEFORGE_CPU_KERNELS", "1")
    cpu_kernels._library.cache_clear()
    try:
        x = torch.randn(1, 4, 2, 2).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            assert cpu_kernels.adagn_silu(x, torch.ones(1, 4), torch.zeros(1, 4), None, 2, 1e-6) is None
            assert cpu_kernels.adagn_silu(x, torch.ones(1, 4), torch.zeros(1, 4), None, 2, 1e-6) is None
        err = capsys.readouterr().err
        assert err.count("fused CPU sampling kernels are unavailable") == 1 and "no-such-compiler" in err
        monkeypatch.setenv("WAVEFORGE_CPU_KERNELS", "0")  # turned off: no build is tried
        cpu_kernels._library.cache_clear()
        assert not cpu_kernels.available() and capsys.readouterr().err == ""
    finally:
        cpu_kernels._library.cache_clear()
