"""Generator/discriminator: reference parameter counts, shapes for every recipe, ablations, checkpointing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from waveforge import config
from waveforge.models import build_discriminator, build_generator, count_params, to_inference_layout
from waveforge.models.discriminator import minibatch_stddev
from waveforge.models.layers import AttnBlock, BlurDownConv, WaveletDownConv, blur_downsample, group_norm_per_sample

# The reference implementation's counts (VinAIResearch/WaveDiff, measured by building its models).
REFERENCE_PARAMS = {
    "celebahq256": (31.485e6, 22.626e6),
    "lsun_church256": (31.485e6, 22.626e6),
    "celebahq512": (44.853e6, 27.740e6),
    "celebahq1024": (44.186e6, 27.740e6),
    "stl10": (55.585e6, 12.744e6),
    "cifar10": (33.370e6, 7.631e6),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest


def _build(name: str, overrides: list[str] | None = None, meta: bool = False):
    cfg = config.load(name, overrides or [])
    if meta:
        with torch.device("meta"):
            return cfg, build_generator(cfg.model, cfg.diffusion), build_discriminator(cfg.model, cfg.diffusion)
    torch.manual_seed(0)
    return cfg, build_generator(cfg.model, cfg.diffusion), build_discriminator(cfg.model, cfg.diffusion)


@pytest.mark.parametrize("name", sorted(REFERENCE_PARAMS))
def test_full_size_parameter_counts_match_reference(name):
    _, G, D = _build(name, meta=True)  # built on the meta device: no memory, no forward
    g_ref, d_ref = REFERENCE_PARAMS[name]
    assert abs(count_params(G) / g_ref - 1) < 0.005, count_params(G)
    assert abs(count_params(D) / d_ref - 1) < 0.005, count_params(D)


# Reduced widths where the full-size forward is too slow for CI; the structure (levels, attention,
# patch size, D depth) is the recipe's.
SMALL = ["model.nf=8", "model.d_nf=4", "model.z_emb_dim=16", "model.nz=8"]


@pytest.mark.parametrize("name", config.available_recipes())
def test_shapes_for_every_recipe(name):
    overrides = [] if name == "tiny" else SMALL
    cfg, G, D = _build(name, overrides)
    r = cfg.model.resolution // 2
    x = torch.randn(1, 4 * cfg.model.channels, r, r)
    t = torch.tensor([cfg.diffusion.num_timesteps - 1])
    z = torch.randn(1, cfg.model.nz)
    if not G.latent:  # the EDM family: the raw denoiser network (linear output, no latent, no discriminator)
        with torch.no_grad():
            y = G(x, torch.tensor([0.5]))
        assert y.shape == x.shape and torch.isfinite(y).all()
        return
    with torch.no_grad():
        y = G(x, t, z)
        logits = D(y, t, x)
    assert y.shape == x.shape and y.abs().max() <= 1
    assert logits.shape == (1,) and torch.isfinite(logits).all()


def test_generator_rejects_wrong_input_shape():
    _, G, _ = _build("tiny")
    with pytest.raises(ValueError, match="expected x_t of shape"):
        G(torch.zeros(1, 12, 8, 8), torch.zeros(1, dtype=torch.long), torch.zeros(1, 32))


def _forward(G, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 12, 16, 16, generator=g)
    z = torch.randn(2, G.nz, generator=g)
    return G(x, torch.tensor([0, 1]), z)


def test_ablation_flags_change_the_architecture():
    _, base, _ = _build("tiny")
    _, no_updown, _ = _build("tiny", ["model.wavelet_updown=false"])
    _, no_pyramid, _ = _build("tiny", ["model.input_pyramid=false"])
    _, no_fbn, _ = _build("tiny", ["model.freq_bottleneck=false"])
    _, plain, _ = _build("tiny", ["model.generator=ncsnpp"])
    # Wavelet up/down blocks: the up blocks gain a grouped conv for the high bands.
    assert base.enc_down[0].wavelet and not no_updown.enc_down[0].wavelet
    assert base.dec_up[0].conv_high is not None and no_updown.dec_up[0].conv_high is None
    assert count_params(base) != count_params(no_updown)
    # Input pyramid: DWT + conv on 4 bands vs blur + strided conv.
    assert isinstance(base.enc_pyramid[0], WaveletDownConv) and isinstance(no_pyramid.enc_pyramid[0], BlurDownConv)
    assert count_params(base) != count_params(no_pyramid)
    # Frequency bottleneck: same parameters, different computation.
    no_fbn.load_state_dict(base.state_dict())
    with torch.no_grad():
        for p in base.parameters():  # make the zero-initialised last convs non-trivial
            p.add_(torch.randn_like(p) * 0.02)
        no_fbn.load_state_dict(base.state_dict())
        assert not torch.allclose(_forward(base), _forward(no_fbn))
    # Plain NCSN++ = all three off.
    assert not plain.use_wavelet_updown and not plain.use_wavelet_pyramid and not plain.use_freq_bottleneck
    for G in (no_updown, no_pyramid, no_fbn, plain):
        out = _forward(G)
        out.square().mean().backward()
        assert out.shape == (2, 12, 16, 16)
        assert all(p.grad is not None for p in G.parameters())


def test_activation_checkpointing_gives_the_same_gradients():
    _, G, _ = _build("tiny")
    with torch.no_grad():
        for p in G.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    out = _forward(G)
    out.square().mean().backward()
    grads = [p.grad.clone() for p in G.parameters()]
    G.zero_grad()
    G.set_activation_checkpointing(True)
    out2 = _forward(G)
    out2.square().mean().backward()
    assert torch.allclose(out, out2, atol=1e-6)
    for a, p in zip(grads, G.parameters(), strict=True):
        assert torch.allclose(a, p.grad, atol=1e-5, rtol=1e-4)


def test_discriminator_variants_and_stddev():
    cfg, _, D_small = _build("tiny")  # d_layers 3: small variant
    assert D_small.small and len(D_small.blocks) == 3 and not D_small.blocks[0].downsample
    _, _, D_large = _build("tiny", ["model.d_layers=4", "model.resolution=64"])
    assert D_large.small  # 4 layers is still the small variant
    _, _, D5 = _build("tiny", ["model.d_layers=5", "model.resolution=128"])
    assert not D5.small and all(b.downsample for b in D5.blocks)
    # Minibatch stddev works for batches that are not a multiple of 4 and is per-group.
    h = torch.randn(6, 5, 2, 2)
    out = minibatch_stddev(h)
    assert out.shape == (6, 6, 2, 2)
    x = torch.randn(6, 12, 16, 16)
    assert D_small(x, torch.zeros(6, dtype=torch.long), x).shape == (6,)


def test_models_run_with_bf16_weights_and_inputs():
    """DeepSpeed bf16 engines cast the modules to bf16 and feed bf16 tensors (no autocast)."""
    _, G, D = _build("tiny")
    G, D = G.to(torch.bfloat16), D.to(torch.bfloat16)
    x = torch.randn(2, 12, 16, 16, dtype=torch.bfloat16)
    t = torch.tensor([0, 1])
    y = G(x, t, torch.randn(2, 32))  # fp32 latents are accepted
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    assert D(y, t, x).dtype == torch.bfloat16


def test_discriminator_r1_double_backward():
    _, _, D = _build("tiny")
    x = torch.randn(2, 12, 16, 16, requires_grad=True)
    out = D(x, torch.tensor([0, 1]), torch.randn(2, 12, 16, 16))
    (g,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    g.square().sum().backward()
    # Every weight reaches the penalty (biases that only shift the logit do not).
    assert all(p.grad is not None for n, p in D.named_parameters() if n.endswith("weight"))


@pytest.mark.parametrize("hw", [(8, 8), (7, 9)])
def test_blur_downsample_gradients_of_every_order(hw):
    # The discriminator's blur carries its own first and second derivatives (R1 differentiates it
    # twice): they must be those of the plain depthwise [1,3,3,1] conv, also for odd sizes.
    x = torch.randn(2, 3, *hw, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(blur_downsample, (x,))
    torch.autograd.gradgradcheck(blur_downsample, (x,))
    k = torch.tensor([1.0, 3.0, 3.0, 1.0], dtype=torch.float64)
    w = (torch.outer(k, k) / 64).expand(3, 1, 4, 4)
    plain = F.conv2d(x, w, stride=2, padding=1, groups=3)
    ours = blur_downsample(x)
    torch.testing.assert_close(ours, plain)
    v = torch.randn_like(plain, requires_grad=True)
    (g_plain,) = torch.autograd.grad((plain * v).sum(), x, create_graph=True)
    (g_ours,) = torch.autograd.grad((ours * v).sum(), x, create_graph=True)
    torch.testing.assert_close(g_ours, g_plain)
    (gv_plain,) = torch.autograd.grad(g_plain.square().sum(), v)  # R1's path: through the gradient
    (gv_ours,) = torch.autograd.grad(g_ours.square().sum(), v)
    torch.testing.assert_close(gv_ours, gv_plain)


def test_attention_block_matches_explicit_softmax():
    attn = AttnBlock(8)
    with torch.no_grad():
        attn.proj.weight.normal_()
    x = torch.randn(2, 8, 4, 4)
    h = attn.norm(x)
    q, k, v = attn.qkv(h).reshape(2, 3, 8, 16).unbind(1)
    w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / 8 ** 0.5, dim=-1)
    ref = attn.proj(torch.einsum("bij,bcj->bci", w, v).reshape(2, 8, 4, 4))
    assert torch.allclose(attn(x), (x + ref) / 2 ** 0.5, atol=1e-5)


def test_per_sample_group_norm_equals_group_norm_then_modulation():
    """The fused adaptive GroupNorm (batch folded into channels) = GroupNorm, then gamma * . + beta per sample."""
    torch.manual_seed(0)
    h = (torch.randn(3, 16, 5, 5) * 3 + 1).requires_grad_()
    gamma, beta = torch.randn(3, 16, requires_grad=True), torch.randn(3, 16, requires_grad=True)
    ref = torch.addcmul(beta[..., None, None], gamma[..., None, None], F.group_norm(h, 4, eps=1e-6))
    ref_grads = torch.autograd.grad(ref.sin().sum(), [h, gamma, beta])
    for x in (h, h.contiguous(memory_format=torch.channels_last)):
        out = group_norm_per_sample(x, 4, gamma, beta, 1e-6)
        assert torch.allclose(out, ref, atol=1e-5)
        for a, b in zip(torch.autograd.grad(out.sin().sum(), [h, gamma, beta]), ref_grads, strict=True):
            assert torch.allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("name,overrides", [
    ("tiny", []),
    ("tiny", ["model.family=edm"]),
    ("tiny", ["model.generator=ncsnpp"]),
    ("celebahq256", SMALL),
])
def test_inference_forward_equals_the_autograd_forward(name, overrides):
    """Without autograd the generator works in place (SiLU, residual adds, wavelet butterflies), also on
    channels_last inputs (the CPU sampler's layout); it must give the same x0_hat as the forward that
    records a graph, and leave its inputs untouched."""
    cfg, G, _ = _build(name, overrides)
    with torch.no_grad():  # random, non-zero weights everywhere (the zero-init convs included)
        for p in G.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    r = cfg.model.resolution // 2
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4 * cfg.model.channels, r, r, generator=g)
    x_copy = x.clone()
    if G.latent:
        t, z = torch.tensor([0, cfg.diffusion.num_timesteps - 1]), torch.randn(2, G.nz, generator=g)
    else:
        t, z = torch.tensor([0.3, 2.0]), None
    with torch.no_grad():
        fast = G(x, t, z)
        fast_cl = G(x.contiguous(memory_format=torch.channels_last), t, z)  # the CPU sampler's layout
    plain = G(x, t, z)
    assert plain.requires_grad and torch.equal(x, x_copy)
    assert fast.abs().max() > 1e-3  # a real signal, not the near-zero output of the zero-init head
    # float32 rounding of the in-place ops differs from the graph-recording ones by a few ulps per layer
    # (up to ~2e-6 on outputs of ~1 on an AMD EPYC 2-core VM); a wrong op would differ by orders more
    assert torch.allclose(fast, plain.detach(), atol=1e-5, rtol=1e-5)
    assert torch.allclose(fast_cl, plain.detach(), atol=1e-5, rtol=1e-5)
    # A sampler's batch (every sample at one step) with the conv weights in the CPU inference layout
    # (channels_last weights, as inference.generator_fn leaves them): still the graph-recording forward's x0_hat.
    t1 = t[1:].expand(2).clone()
    plain1 = G(x, t1, z)
    assert to_inference_layout(G) is G
    assert G.conv_in.weight.is_contiguous(memory_format=torch.channels_last) and not G.conv_in.weight.is_contiguous()
    with torch.no_grad():
        fast1 = G(x.contiguous(memory_format=torch.channels_last), t1, z)
    assert torch.allclose(fast1, plain1.detach(), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(fast1, fast_cl, atol=1e-3)  # the step does reach the output
