"""The platform's Haar DWT: exactness, orientation, the pytorch_wavelets relation, gradients, dtypes."""

from __future__ import annotations

import pytest
import torch

from waveforge.wavelet import dwt, dwt_levels, from_wavelet, idwt, idwt_bands, idwt_levels, to_wavelet


def test_round_trip_and_orthonormality():
    x = torch.randn(3, 5, 16, 12)
    y = dwt(x)
    assert y.shape == (3, 20, 8, 6)
    assert (idwt(y) - x).abs().max() < 1e-5
    # Orthonormal: energy is preserved.
    assert torch.allclose(y.square().sum(), x.square().sum(), rtol=1e-5)
    img = torch.rand(2, 3, 32, 32) * 2 - 1
    w = to_wavelet(img)
    assert w.shape == (2, 12, 16, 16) and w.abs().max() <= 1.0 + 1e-6
    assert (from_wavelet(w) - img).abs().max() < 1e-5


def test_multi_level_round_trip():
    x = torch.randn(2, 3, 32, 32)
    ll, highs = dwt_levels(x, 3)
    assert ll.shape == (2, 3, 4, 4) and [h.shape[1:] for h in highs] == [(9, 16, 16), (9, 8, 8), (9, 4, 4)]
    assert (idwt_levels(ll, highs) - x).abs().max() < 1e-5


def _bands(y: torch.Tensor) -> dict[str, torch.Tensor]:
    return dict(zip(["LL", "LH", "HL", "HH"], y.chunk(4, dim=1), strict=True))


def test_band_orientation():
    # A horizontal edge (top half bright, bottom dark) placed inside 2x2 blocks' rows: rows alternate.
    horizontal = torch.zeros(1, 1, 8, 8)
    horizontal[:, :, 0::2, :] = 1.0  # every block: top row 1, bottom row 0 -> top minus bottom
    b = _bands(dwt(horizontal))
    assert torch.allclose(b["LH"], torch.full_like(b["LH"], 1.0))  # horizontal detail
    assert b["HL"].abs().max() == 0 and b["HH"].abs().max() == 0
    vertical = horizontal.transpose(-1, -2)  # every block: left column 1, right 0
    b = _bands(dwt(vertical))
    assert torch.allclose(b["HL"], torch.full_like(b["HL"], 1.0))  # vertical detail
    assert b["LH"].abs().max() == 0 and b["HH"].abs().max() == 0
    # An ordinary step edge: a vertical boundary at an odd column shows only in HL, at the boundary.
    step = torch.zeros(1, 1, 8, 8)
    step[..., 5:] = 1.0
    b = _bands(dwt(step))
    assert b["LH"].abs().max() == 0 and b["HH"].abs().max() == 0
    assert b["HL"][..., 2].abs().min() > 0 and b["HL"][..., [0, 1, 3]].abs().max() == 0


def test_matches_pytorch_wavelets():
    pw = pytest.importorskip("pytorch_wavelets")
    x = torch.randn(2, 3, 16, 16)
    yl, yh = pw.DWTForward(J=1, wave="haar", mode="zero")(x)
    b = _bands(dwt(x))
    # Same order and signs: yh[0][:, :, 0] = LH (horizontal detail), 1 = HL, 2 = HH.
    assert torch.allclose(b["LL"], yl, atol=1e-6)
    assert torch.allclose(b["LH"], yh[0][:, :, 0], atol=1e-6)
    assert torch.allclose(b["HL"], yh[0][:, :, 1], atol=1e-6)
    assert torch.allclose(b["HH"], yh[0][:, :, 2], atol=1e-6)
    back = pw.DWTInverse(wave="haar", mode="zero")((yl, yh))
    assert torch.allclose(idwt(dwt(x)), back, atol=1e-5)


def test_gradcheck_and_gradgradcheck():
    x = torch.randn(1, 2, 4, 6, dtype=torch.float64, requires_grad=True)
    y = torch.randn(1, 8, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(dwt, (x,))
    assert torch.autograd.gradgradcheck(dwt, (x,))
    assert torch.autograd.gradcheck(idwt, (y,))
    assert torch.autograd.gradgradcheck(idwt, (y,))


def test_low_precision_inputs_are_computed_in_fp32():
    x = torch.randn(2, 3, 8, 8).to(torch.bfloat16)
    y = dwt(x)
    assert y.dtype == torch.bfloat16
    # Exactly the fp32 result rounded once (no bf16 intermediate sums).
    assert torch.equal(y, dwt(x.float()).to(torch.bfloat16))
    assert torch.equal(idwt(y), idwt(y.float()).to(torch.bfloat16))
    # A block where bf16 partial sums would round (256 + 1 = 256 in bf16): exact values survive.
    blk = torch.tensor([[[[256.0, 1.0], [-256.0, 1.0]]]], dtype=torch.bfloat16)
    assert dwt(blk)[0, :, 0, 0].float().tolist() == [1.0, 256.0, -1.0, 256.0]


def test_autocast_does_not_lower_the_precision():
    x = torch.randn(2, 3, 8, 8) * 100 + 1000  # large values: bf16 sums would be off by several units
    exact = dwt(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = dwt(x)
        back = idwt(y)
    assert y.dtype == torch.float32 and torch.allclose(y, exact, rtol=0, atol=1e-3)
    assert torch.allclose(back, x, rtol=0, atol=1e-3)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="even"):
        dwt(torch.zeros(1, 1, 5, 4))
    with pytest.raises(ValueError, match="4C"):
        idwt(torch.zeros(1, 3, 4, 4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_sampling_path_equals_the_differentiable_path(dtype, memory_format):
    """Without autograd dwt/idwt take the add/sub butterfly: same values as the matrix form (to float
    rounding), the input's memory layout kept."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 8, 10, generator=g).to(dtype).contiguous(memory_format=memory_format)
    y = torch.randn(2, 24, 4, 5, generator=g).to(dtype).contiguous(memory_format=memory_format)
    with torch.no_grad():
        fast_dwt, fast_idwt = dwt(x), idwt(y)
    graph_dwt, graph_idwt = dwt(x.clone().requires_grad_()), idwt(y.clone().requires_grad_())
    assert graph_dwt.requires_grad and graph_idwt.requires_grad
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-6
    assert torch.allclose(fast_dwt, graph_dwt.detach(), atol=tol) and fast_dwt.dtype == dtype
    assert torch.allclose(fast_idwt, graph_idwt.detach(), atol=tol) and fast_idwt.dtype == dtype
    for out in (fast_dwt, fast_idwt):
        assert out.is_contiguous(memory_format=memory_format)
    with torch.no_grad():  # bf16: the bands are rounded to bf16 in between
        assert torch.allclose(idwt(dwt(x)).float(), x.float(), atol=5 * tol)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_idwt_bands_is_idwt_of_the_concatenation(memory_format):
    """idwt_bands(ll, high) = idwt(cat([ll, high])) with and without autograd, gradients included, the LL
    band's memory layout kept; mismatched band shapes are refused."""
    g = torch.Generator().manual_seed(1)
    ll = torch.randn(2, 5, 4, 6, generator=g).contiguous(memory_format=memory_format)
    high = torch.randn(2, 15, 4, 6, generator=g).contiguous(memory_format=memory_format)
    expected = idwt(torch.cat([ll, high], dim=1).contiguous(memory_format=memory_format))
    with torch.no_grad():
        fast = idwt_bands(ll, high)
    assert torch.allclose(fast, expected, atol=1e-6) and fast.is_contiguous(memory_format=memory_format)
    llg, highg = ll.clone().requires_grad_(), high.clone().requires_grad_()
    out = idwt_bands(llg, highg)
    assert torch.allclose(out, expected, atol=1e-6)
    out.square().sum().backward()
    assert torch.allclose(torch.cat([llg.grad, highg.grad], dim=1), dwt(2 * expected), atol=1e-5)
    with pytest.raises(ValueError, match="3C"):
        idwt_bands(ll, high[:, :12])
