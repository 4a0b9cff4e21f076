"""Import of the official WaveDiff / DDGAN checkpoints into waveforge's models (pure functions).

The reference training code (VinAIResearch/WaveDiff's train_wddgan.py; its plain NCSN++ generator and its
discriminators are DDGAN's, NVlabs/denoising-diffusion-gan) writes two kinds of files:

    netG_<epoch>.pth   the generator's state dict: its EMA weights when trained with --use_ema (as the
                       released checkpoints were), keys prefixed `module.` when saved from DDP;
    content.pth        the training state {epoch, global_step, args, netG_dict, netD_dict, optimizerG,
                       optimizerD, schedulerG, schedulerD}; optimizerG is Adam inside the reference's EMA
                       optimizer wrapper, whose per-parameter state also holds the EMA weights ('ema').

`convert_generator`, `convert_discriminator` and `convert_training_state` turn their tensors into state
dicts (and Adam moments) of `waveforge.models` for a recipe whose model section is the checkpoint's
architecture: every key and shape is checked (`ReferenceCheckpointError`, a ConfigError, names the first
few keys that are missing, unexpected or of another shape). `import_checkpoint` writes the generator as a
waveforge export (generator_ema.safetensors + model_config.json, the format of `checkpoint.export`).

Layouts that differ: the reference's attention layers are four NIN layers with (in, out) matrices (here one
1x1 qkv conv and a 1x1 projection); its generator patchifies as (p1 p2 c) channels, pixel_unshuffle as
(c p1 p2).

Band order. waveforge's subbands are [LL, LH, HL, HH] in pytorch_wavelets' order (waveforge.wavelet). The
reference's own Haar transform (DWT_IDWT, used inside every wavelet generator) swaps LH and HL. So the
generator's internal wavelet layers (the input-pyramid convs, the grouped conv of the high bands in the up
blocks) get their LH/HL channel blocks swapped at import. At input/output the reference used its own
transform or pytorch_wavelets depending on the run (`--use_pytorch_wavelet`; run.sh: CIFAR-10, STL-10,
CelebA-HQ 512 and LSUN Church with pytorch_wavelets, CelebA-HQ 256 and 1024 with its own): `bands` names
it ("pytorch_wavelets" or "wavediff", default per recipe in RECIPE_BANDS) and, for "wavediff", the
generator's first and last convs, the first pyramid conv and the discriminator's input conv get their
LH/HL channels swapped too. An imported generator then makes the same images as the reference's sampler
from the same x_{t+1} and z. (Its random numbers land in other bands for "wavediff" checkpoints: a seed
gives another image than the reference's test script with that torch seed, from the same distribution.)
"""

from __future__ import annotations

import argparse
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn

from waveforge import config, models
from waveforge.checkpoint.export import nonfinite
from waveforge.checkpoint.export import write_export as write_export_folder
from waveforge.config import ConfigError, Recipe
from waveforge.models.layers import AttnBlock, BlurDownConv, ResBlock, WaveletDownConv

__all__ = ["BANDS", "RECIPE_BANDS", "ReferenceCheckpointError", "TrainingState", "default_bands",
           "band_permutation", "subbands_from_reference", "subbands_to_reference", "generator_key_map",
           "discriminator_key_map", "strip_module_prefix", "load_reference", "convert_generator",
           "convert_discriminator", "convert_training_state", "write_export", "import_checkpoint"]

Bands = Literal["pytorch_wavelets", "wavediff"]
BANDS: tuple[str, ...] = ("pytorch_wavelets", "wavediff")

# The input/output transform of the reference's runs (run.sh: --use_pytorch_wavelet or not), per recipe.
RECIPE_BANDS: dict[str, str] = {
    "cifar10": "pytorch_wavelets",
    "stl10": "pytorch_wavelets",
    "celebahq256": "wavediff",
    "celebahq512": "pytorch_wavelets",
    "celebahq1024": "wavediff",
    "lsun_church256": "pytorch_wavelets",
}

_SWAP = (0, 2, 1, 3)  # band b of ours is band _SWAP[b] of the reference's own DWT ([LL, LH, HL, HH])
_HIGH_SWAP = (1, 0, 2)  # the same for the three high bands [LH, HL, HH]
_FIRST_KEYS = 5  # how many keys an error message names


class ReferenceCheckpointError(ConfigError):
    """A file is not a reference checkpoint, or does not fit the recipe (entry points exit with status 2)."""


# --------------------------------------------------------------------------------------------------
# Band order
# --------------------------------------------------------------------------------------------------


def default_bands(recipe: str) -> str:
    """The input/output band order of the reference's run of `recipe` (RECIPE_BANDS)."""
    if recipe not in RECIPE_BANDS:
        raise ReferenceCheckpointError(
            f"recipe {recipe!r} has no official reference run, so the band order of the checkpoint's input/output "
            "is not known: give bands=wavediff (trained with the reference's own DWT, train_wddgan.py without "
            "--use_pytorch_wavelet) or bands=pytorch_wavelets (with it)")
    return RECIPE_BANDS[recipe]


def _check_bands(bands: str) -> str:
    if bands not in BANDS:
        raise ReferenceCheckpointError(f"bands={bands!r} is not known: one of {', '.join(BANDS)}")
    return bands


def band_permutation(channels: int, bands: str) -> list[int]:
    """perm over the 4 x channels subband channels with ours[:, i] = reference's[:, perm[i]] (its own
    inverse: it converts either way). Identity for "pytorch_wavelets", LH <-> HL for "wavediff"."""
    order = _SWAP if _check_bands(bands) == "wavediff" else (0, 1, 2, 3)
    return [order[b] * channels + k for b in range(4) for k in range(channels)]


def subbands_from_reference(x: torch.Tensor, bands: str) -> torch.Tensor:
    """Subbands (B, 4C, h, w) in the reference's input/output order -> waveforge's [LL, LH, HL, HH]."""
    if x.dim() != 4 or x.shape[1] % 4:
        raise ValueError(f"subbands_from_reference: expected (B, 4C, h, w), got {tuple(x.shape)}")
    perm = band_permutation(x.shape[1] // 4, bands)
    return x[:, perm]


def subbands_to_reference(x: torch.Tensor, bands: str) -> torch.Tensor:
    """waveforge's subbands -> the reference's input/output order (the permutation is its own inverse)."""
    return subbands_from_reference(x, bands)


# --------------------------------------------------------------------------------------------------
# Key maps: every waveforge parameter and the reference tensor(s) it comes from
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyEntry:
    """One waveforge parameter `ours` (shape `shape`) made from the reference tensors `refs` (shapes
    `ref_shapes`): layout "same" (one tensor as is), "nin" (an NIN matrix (in, out) -> 1x1 conv weight),
    "qkv" (three NIN matrices -> one 1x1 conv weight), "cat" (biases concatenated); then dim 0 / dim 1
    reordered by perm0 / perm1 (ours[i] = theirs[perm[i]]; None = unchanged)."""

    ours: str
    shape: tuple[int, ...]
    refs: tuple[str, ...]
    ref_shapes: tuple[tuple[int, ...], ...]
    layout: str = "same"
    perm0: tuple[int, ...] | None = None
    perm1: tuple[int, ...] | None = None

    def convert(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """The reference tensors (or their Adam moments, EMA copies: anything of the parameters' shapes)
        -> waveforge's tensor."""
        if self.layout == "nin":
            t = tensors[0].t()[:, :, None, None]
        elif self.layout == "qkv":
            t = torch.cat([w.t() for w in tensors])[:, :, None, None]
        elif self.layout == "cat":
            t = torch.cat(list(tensors))
        else:
            t = tensors[0]
        if self.perm0 is not None:
            t = t.index_select(0, torch.tensor(self.perm0, device=t.device))
        if self.perm1 is not None:
            t = t.index_select(1, torch.tensor(self.perm1, device=t.device))
        return t.contiguous()


def _perm_or_none(perm: Sequence[int]) -> tuple[int, ...] | None:
    return None if list(perm) == list(range(len(perm))) else tuple(perm)


def _blocks(order: Sequence[int], n: int) -> list[int]:
    """Reorder len(order) blocks of n channels: ours block b is the reference's block order[b]."""
    return [order[b] * n + j for b in range(len(order)) for j in range(n)]


def _entries(ours_prefix: str, ref_prefix: str, module: nn.Module, suffixes: Mapping[str, tuple[str, ...]],
             layouts: Mapping[str, str] | None = None, perm0: Mapping[str, Sequence[int]] | None = None,
             perm1: Mapping[str, Sequence[int]] | None = None) -> list[KeyEntry]:
    """KeyEntries for every parameter of `module` (named `ours_prefix`.x), translating each local name x by
    `suffixes` (x -> reference local names under `ref_prefix`)."""
    out = []
    for name, p in module.named_parameters():
        if name not in suffixes:
            raise RuntimeError(f"reference key map: no reference name for {ours_prefix}.{name}")
        layout = (layouts or {}).get(name, "same")
        shape = tuple(p.shape)
        refs = tuple(f"{ref_prefix}.{r}" for r in suffixes[name])
        if layout == "nin":
            ref_shapes: tuple[tuple[int, ...], ...] = ((shape[1], shape[0]),)
        elif layout == "qkv":
            c = shape[1]
            ref_shapes = ((c, c),) * 3
        elif layout == "cat":
            ref_shapes = ((shape[0] // 3,),) * 3
        else:
            ref_shapes = (shape,)
        p0 = (perm0 or {}).get(name)
        p1 = (perm1 or {}).get(name)
        out.append(KeyEntry(f"{ours_prefix}.{name}", shape, refs, ref_shapes, layout,
                            _perm_or_none(p0) if p0 is not None else None,
                            _perm_or_none(p1) if p1 is not None else None))
    return out


_PLAIN = {"weight": ("weight",), "bias": ("bias",)}
_RESBLOCK = {
    "norm0.style.weight": ("GroupNorm_0.style.weight",), "norm0.style.bias": ("GroupNorm_0.style.bias",),
    "conv0.weight": ("Conv_0.weight",), "conv0.bias": ("Conv_0.bias",),
    "temb.weight": ("Dense_0.weight",), "temb.bias": ("Dense_0.bias",),
    "norm1.style.weight": ("GroupNorm_1.style.weight",), "norm1.style.bias": ("GroupNorm_1.style.bias",),
    "conv1.weight": ("Conv_1.weight",), "conv1.bias": ("Conv_1.bias",),
    "skip.weight": ("Conv_2.weight",), "skip.bias": ("Conv_2.bias",),
    "conv_high.weight": ("convH_0.weight",), "conv_high.bias": ("convH_0.bias",),
}
_ATTN = {"norm.weight": ("GroupNorm_0.weight",), "norm.bias": ("GroupNorm_0.bias",),
         "qkv.weight": ("NIN_0.W", "NIN_1.W", "NIN_2.W"), "qkv.bias": ("NIN_0.b", "NIN_1.b", "NIN_2.b"),
         "proj.weight": ("NIN_3.W",), "proj.bias": ("NIN_3.b",)}
_ATTN_LAYOUT = {"qkv.weight": "qkv", "qkv.bias": "cat", "proj.weight": "nin"}


def _meta(cfg: Recipe) -> tuple[nn.Module, nn.Module]:
    """The recipe's G and D on the meta device (structure and shapes only, no memory)."""
    if cfg.model.family != "wavediff":
        raise ReferenceCheckpointError(f"recipe {cfg.recipe!r} is model.family={cfg.model.family}: reference "
                                       "checkpoints are diffusion GANs (model.family=wavediff)")
    with torch.device("meta"):
        return models.build_generator(cfg.model, cfg.diffusion), models.build_discriminator(cfg.model, cfg.diffusion)


def generator_key_map(cfg: Recipe, bands: str) -> list[KeyEntry]:
    """Every parameter of the recipe's generator and its reference source, in waveforge's parameter order.

    The reference keeps its layers in one list `all_modules` in forward order (time embedding 0-1, input
    conv, encoder blocks with their attention, down block + pyramid conv per level, bottleneck, decoder blocks,
    attention, up block per level, output GroupNorm and conv) and the latent mapping in `z_transform`."""
    G, _ = _meta(cfg)
    m = cfg.model
    in_ch, p = 4 * m.channels, m.patch_size
    io = band_permutation(m.channels, bands)
    # Input channels: ours (c, p1, p2) from pixel_unshuffle, the reference's (p1, p2, c) from its rearrange.
    x_in = [q * in_ch + io[c] for c in range(in_ch) for q in range(p * p)]
    x_out = [io[c] * p * p + q for c in range(in_ch) for q in range(p * p)]  # both (c, p1, p2)
    entries: list[KeyEntry] = []
    index = 0

    def add(ours: str, module: nn.Module, suffixes: Mapping[str, tuple[str, ...]], **kw: Any) -> None:
        nonlocal index
        entries.extend(_entries(ours, f"all_modules.{index}", module, suffixes, **kw))
        index += 1

    def resblock(ours: str, block: ResBlock) -> None:
        perm0 = {}
        if block.conv_high is not None:  # groups [LH, HL, HH] of the high bands, in the reference's DWT order
            out = block.conv_high.out_channels // 3
            perm0 = {"conv_high.weight": _blocks(_HIGH_SWAP, out), "conv_high.bias": _blocks(_HIGH_SWAP, out)}
        add(ours, block, _RESBLOCK, perm0=perm0)

    def attn(ours: str, block: AttnBlock) -> None:
        add(ours, block, _ATTN, layouts=_ATTN_LAYOUT)

    add("temb.0", G.temb[0], _PLAIN)
    add("temb.2", G.temb[2], _PLAIN)
    add("conv_in", G.conv_in, _PLAIN, perm1={"weight": x_in})
    for level, blocks in enumerate(G.enc_blocks):
        for i, (res, at) in enumerate(blocks):
            resblock(f"enc_blocks.{level}.{i}.0", res)
            if isinstance(at, AttnBlock):
                attn(f"enc_blocks.{level}.{i}.1", at)
        if level < len(G.enc_down):
            resblock(f"enc_down.{level}", G.enc_down[level])
            pyr = G.enc_pyramid[level]
            if isinstance(pyr, WaveletDownConv):
                n = pyr.conv.in_channels // 4  # the 4 bands of the reference's internal DWT, each n channels
                inner = x_in if level == 0 else list(range(n))
                perm = [_SWAP[b] * n + inner[j] for b in range(4) for j in range(n)]
                add(f"enc_pyramid.{level}", pyr, {"conv.weight": ("weight",), "conv.bias": ("bias",)},
                    perm1={"conv.weight": perm})
            else:
                assert isinstance(pyr, BlurDownConv)
                add(f"enc_pyramid.{level}", pyr, {"weight": ("Conv2d_0.weight",), "bias": ("Conv2d_0.bias",)},
                    perm1={"weight": x_in} if level == 0 else None)
    resblock("mid0", G.mid0)
    attn("mid_attn", G.mid_attn)
    resblock("mid1", G.mid1)
    for j, blocks in enumerate(G.dec_blocks):
        for i, res in enumerate(blocks):
            resblock(f"dec_blocks.{j}.{i}", res)
        if isinstance(G.dec_attn[j], AttnBlock):
            attn(f"dec_attn.{j}", G.dec_attn[j])
        if j < len(G.dec_up):
            resblock(f"dec_up.{j}", G.dec_up[j])
    add("norm_out", G.norm_out, _PLAIN)
    add("conv_out", G.conv_out, _PLAIN, perm0={"weight": x_out, "bias": x_out})
    for i, layer in enumerate(G.mapping):
        if isinstance(layer, nn.Linear):
            entries.extend(_entries(f"mapping.{i}", f"z_transform.{i}", layer, _PLAIN))
    _check_complete(G, entries)
    return entries


def discriminator_key_map(cfg: Recipe, bands: str) -> list[KeyEntry]:
    """Every parameter of the recipe's discriminator and its reference source (Discriminator_small for
    d_layers <= 4, Discriminator_large otherwise: t_embed.main, start_conv, conv1..convN, final_conv,
    end_linear)."""
    _, D = _meta(cfg)
    io = band_permutation(cfg.model.channels, bands)
    in_ch = 4 * cfg.model.channels
    entries = _entries("temb.0", "t_embed.main.0", D.temb[0], _PLAIN)
    entries += _entries("temb.2", "t_embed.main.2", D.temb[2], _PLAIN)
    entries += _entries("conv_in", "start_conv", D.conv_in, _PLAIN,
                        perm1={"weight": io + [in_ch + c for c in io]})  # cat(x_t, x_{t+1})
    block = {"conv0.weight": ("conv1.0.weight",), "conv0.bias": ("conv1.0.bias",),
             "temb.weight": ("dense_t1.weight",), "temb.bias": ("dense_t1.bias",),
             "conv1.weight": ("conv2.0.weight",), "conv1.bias": ("conv2.0.bias",), "skip.weight": ("skip.0.weight",)}
    for i, b in enumerate(D.blocks):
        entries += _entries(f"blocks.{i}", f"conv{i + 1}", b, block)
    entries += _entries("conv_out", "final_conv", D.conv_out, _PLAIN)
    entries += _entries("linear_out", "end_linear", D.linear_out, _PLAIN)
    _check_complete(D, entries)
    return entries


def _check_complete(module: nn.Module, entries: list[KeyEntry]) -> None:
    names = [e.ours for e in entries]
    if sorted(names) != sorted(n for n, _ in module.named_parameters()) or len(set(names)) != len(names):
        raise RuntimeError("reference key map does not cover every parameter exactly once")


# --------------------------------------------------------------------------------------------------
# Reading reference files
# --------------------------------------------------------------------------------------------------


def _first(keys: Sequence[str]) -> str:
    shown = ", ".join(keys[:_FIRST_KEYS])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > _FIRST_KEYS else "")


def strip_module_prefix(state: Mapping[str, Any]) -> dict[str, Any]:
    """A state dict without DDP's `module.` key prefix (keys without it are kept as they are)."""
    out: dict[str, Any] = {}
    for k, v in state.items():
        key = k[len("module."):] if isinstance(k, str) and k.startswith("module.") else k
        if key in out:
            raise ReferenceCheckpointError(f"state dict has both {key!r} and 'module.{key}'")
        out[key] = v
    return out


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def load_reference(path: str | os.PathLike) -> tuple[str, dict[str, Any]]:
    """Read a reference file (weights_only loading; content.pth's argparse.Namespace is allowed).

    Returns ("generator", state dict without the `module.` prefix) for a netG_*.pth, or ("content", the
    dict) for a content.pth. Anything else raises ReferenceCheckpointError saying what was found."""
    p = Path(path)
    if not p.is_file():
        raise ReferenceCheckpointError(f"checkpoint={path}: no such file")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and torch errors alike: the file is not a readable checkpoint
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ReferenceCheckpointError(f"checkpoint={path}: not a PyTorch checkpoint that loads with "
                                       f"weights_only=True ({type(e).__name__}: {reason[:200]})") from None
    expected = ("expected a reference netG_*.pth (a generator state dict with all_modules.* and z_transform.* "
                "keys) or content.pth (netG_dict, netD_dict, optimizerG, optimizerD, epoch, global_step)")
    if isinstance(obj, Mapping) and "netG_dict" in obj:
        return "content", dict(obj)
    if _is_state_dict(obj):
        state = strip_module_prefix(obj)
        if any(k.startswith("all_modules.") for k in state):
            return "generator", state
        if any(k.startswith(("start_conv.", "t_embed.")) for k in state):
            raise ReferenceCheckpointError(f"checkpoint={path} is a discriminator state dict; {expected}")
        raise ReferenceCheckpointError(f"checkpoint={path}: not a reference generator: {expected}; found keys "
                                       f"{_first(list(state))}")
    found = f"keys {_first([str(k) for k in obj])}" if isinstance(obj, Mapping) else f"a {type(obj).__name__}"
    raise ReferenceCheckpointError(f"checkpoint={path}: {expected}; found {found}")


# --------------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------------


def _check_state(state: Mapping[str, Any], entries: list[KeyEntry], what: str, cfg: Recipe) -> None:
    if not _is_state_dict(state):
        raise ReferenceCheckpointError(f"{what}: not a state dict of tensors")
    expected = {r: s for e in entries for r, s in zip(e.refs, e.ref_shapes, strict=True)}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k}: expected {expected[k]}, found {tuple(state[k].shape)}" for k in expected
             if k in state and tuple(state[k].shape) != expected[k]]
    problems = []
    if missing:
        problems.append(f"missing keys {_first(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_first(unexpected)}")
    if wrong:
        problems.append("shapes that do not fit: " + "; ".join(wrong[:_FIRST_KEYS])
                        + (f" ({len(wrong)} in all)" if len(wrong) > _FIRST_KEYS else ""))
    if problems:
        m = cfg.model
        hint = ""
        conv_in = state.get("all_modules.2.weight")
        image_channels = m.channels * m.patch_size ** 2
        if isinstance(conv_in, torch.Tensor) and conv_in.dim() == 4 and conv_in.shape[1] == image_channels:
            hint = (" (its input conv takes image channels: a pixel-space DDGAN generator; waveforge imports "
                    "generators that work on the 4 x channels wavelet subbands)")
        raise ReferenceCheckpointError(
            f"{what} does not fit recipe {cfg.recipe!r} (model: generator={m.generator}, nf={m.nf}, "
            f"ch_mult={m.ch_mult}, attn_resolutions={m.attn_resolutions}, resolution={m.resolution}, "
            f"patch_size={m.patch_size}, d_nf={m.d_nf}, d_layers={m.d_layers}){hint}: " + "; ".join(problems))


def _convert(state: Mapping[str, torch.Tensor], entries: list[KeyEntry], what: str, cfg: Recipe
             ) -> dict[str, torch.Tensor]:
    state = strip_module_prefix(state)
    _check_state(state, entries, what, cfg)
    return _finite({e.ours: e.convert([state[r].detach().float() for r in e.refs]) for e in entries}, what)


def _finite(tensors: dict[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    """`tensors`, or ReferenceCheckpointError when any value is NaN or infinite (nothing is imported)."""
    bad = nonfinite(tensors)
    if bad:
        raise ReferenceCheckpointError(f"{what} holds non-finite values ({bad}): nothing imported")
    return tensors


def convert_generator(state: Mapping[str, torch.Tensor], cfg: Recipe, bands: str | None = None
                      ) -> dict[str, torch.Tensor]:
    """A reference generator state dict (netG_*.pth or content.pth's netG_dict, with or without `module.`)
    -> the state dict of `waveforge.models.build_generator(cfg.model, cfg.diffusion)` (float32).
    bands: the checkpoint's input/output band order (default: RECIPE_BANDS[cfg.recipe])."""
    bands = _check_bands(bands or default_bands(cfg.recipe))
    return _convert(state, generator_key_map(cfg, bands), "generator state dict", cfg)


def convert_discriminator(state: Mapping[str, torch.Tensor], cfg: Recipe, bands: str | None = None
                          ) -> dict[str, torch.Tensor]:
    """A reference discriminator state dict (content.pth's netD_dict) -> the state dict of
    `waveforge.models.build_discriminator(cfg.model, cfg.diffusion)` (float32)."""
    bands = _check_bands(bands or default_bands(cfg.recipe))
    return _convert(state, discriminator_key_map(cfg, bands), "discriminator state dict", cfg)


@dataclass
class TrainingState:
    """A reference training state (content.pth) in waveforge's names and layouts (all tensors float32, CPU).

    generator, discriminator: state dicts of build_generator / build_discriminator (the raw weights,
        netG_dict / netD_dict).
    generator_ema: the EMA generator (the 'ema' entries of optimizerG's per-parameter state, written by the
        reference's EMA optimizer wrapper with --use_ema), or None when the run had no EMA.
    optimizer_g, optimizer_d: Adam's state per waveforge parameter name: {"exp_avg", "exp_avg_sq" (the
        parameter's shape), "step" (a scalar float32 tensor, torch.optim.Adam's format)}; a parameter the
        reference optimizer holds no state for (never stepped) is absent.
    hyper_g, hyper_d: the first param group's "lr" (the current, scheduled value), "betas", "eps",
        "weight_decay" (those present).
    epoch: content.pth's epoch (the reference saves the next epoch to run: the finished epochs).
    global_step: optimizer steps taken (one D and one G step per iteration).
    images: images seen = global_step x cfg.train.batch_size (the recipe's global batch; the official
        recipes' batch is the reference run's per-GPU batch x GPUs).
    """

    generator: dict[str, torch.Tensor]
    generator_ema: dict[str, torch.Tensor] | None
    discriminator: dict[str, torch.Tensor]
    optimizer_g: dict[str, dict[str, torch.Tensor]]
    optimizer_d: dict[str, dict[str, torch.Tensor]]
    hyper_g: dict[str, Any] = field(default_factory=dict)
    hyper_d: dict[str, Any] = field(default_factory=dict)
    epoch: int = 0
    global_step: int = 0
    images: int = 0


def _convert_optimizer(opt: Any, ref_names: list[str], entries: list[KeyEntry], what: str
                       ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor] | None, dict[str, Any]]:
    """(moments per our name, EMA weights per our name or None, hyperparameters) of a reference optimizer
    state dict whose parameters are `ref_names` in order (the model's state dict order)."""
    if not isinstance(opt, Mapping) or not isinstance(opt.get("state"), Mapping) \
            or not isinstance(opt.get("param_groups"), list) or not opt["param_groups"]:
        raise ReferenceCheckpointError(f"content.pth {what}: not an optimizer state dict (state, param_groups)")
    indices = [i for g in opt["param_groups"] for i in g.get("params", [])]
    if len(indices) != len(ref_names):
        raise ReferenceCheckpointError(f"content.pth {what} holds {len(indices)} parameters, its model's state "
                                       f"dict {len(ref_names)}")
    by_name = {name: opt["state"].get(i) for name, i in zip(ref_names, indices, strict=True)}
    moments: dict[str, dict[str, torch.Tensor]] = {}
    ema: dict[str, torch.Tensor] = {}
    for e in entries:
        states = [by_name.get(r) for r in e.refs]
        if all(s is None for s in states):
            continue
        if any(s is None for s in states) or not all(
                isinstance(s, Mapping) and {"exp_avg", "exp_avg_sq", "step"} <= set(s) for s in states):
            raise ReferenceCheckpointError(f"content.pth {what}: no Adam state (exp_avg, exp_avg_sq, step) for "
                                           f"{', '.join(r for r, s in zip(e.refs, states, strict=True) if not s)}")
        for r, s, shape in zip(e.refs, states, e.ref_shapes, strict=True):
            for k in ("exp_avg", "exp_avg_sq") + (("ema",) if "ema" in s else ()):
                if tuple(s[k].shape) != shape:
                    raise ReferenceCheckpointError(f"content.pth {what}: {k} of {r} has shape {tuple(s[k].shape)}, "
                                                   f"expected {shape}")
        moments[e.ours] = {k: e.convert([s[k].detach().float() for s in states]) for k in ("exp_avg", "exp_avg_sq")}
        moments[e.ours]["step"] = torch.tensor(float(states[0]["step"]), dtype=torch.float32)
        if all("ema" in s for s in states):
            ema[e.ours] = e.convert([s["ema"].detach().float() for s in states])
    group = opt["param_groups"][0]
    hyper = {k: group[k] for k in ("lr", "betas", "eps", "weight_decay") if k in group}
    return moments, (ema if len(ema) == len(entries) else None), hyper


def convert_training_state(content: Mapping[str, Any], cfg: Recipe, bands: str | None = None) -> TrainingState:
    """A reference content.pth (as loaded by `load_reference`) -> TrainingState (see its docstring for every
    field) in waveforge's names and layouts, for the recipe's G and D. The Adam moments and the EMA copy go
    through the same map as the weights (renames, NIN transposes, band reorders), so each stays aligned
    with its parameter. Raises ReferenceCheckpointError naming what is missing or does not fit."""
    bands = _check_bands(bands or default_bands(cfg.recipe))
    missing = [k for k in ("netG_dict", "netD_dict", "optimizerG", "optimizerD") if k not in content]
    if missing:
        raise ReferenceCheckpointError(f"content.pth lacks {', '.join(missing)} (has {_first(list(content))})")
    g_entries, d_entries = generator_key_map(cfg, bands), discriminator_key_map(cfg, bands)
    g_ref, d_ref = strip_module_prefix(content["netG_dict"]), strip_module_prefix(content["netD_dict"])
    G = _convert(g_ref, g_entries, "content.pth netG_dict", cfg)
    D = _convert(d_ref, d_entries, "content.pth netD_dict", cfg)
    opt_g, ema, hyper_g = _convert_optimizer(content["optimizerG"], list(g_ref), g_entries, "optimizerG")
    opt_d, _, hyper_d = _convert_optimizer(content["optimizerD"], list(d_ref), d_entries, "optimizerD")
    if ema is not None:
        _finite(ema, "content.pth optimizerG's EMA")
    for what, opt in (("optimizerG", opt_g), ("optimizerD", opt_d)):
        _finite({f"{name}.{k}": v for name, st in opt.items() for k, v in st.items()}, f"content.pth {what}")
    step = int(content.get("global_step", 0))
    return TrainingState(generator=G, generator_ema=ema, discriminator=D, optimizer_g=opt_g, optimizer_d=opt_d,
                         hyper_g=hyper_g, hyper_d=hyper_d, epoch=int(content.get("epoch", 0)), global_step=step,
                         images=step * cfg.train.batch_size)


# --------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------


def write_export(out: str | os.PathLike, generator: Mapping[str, torch.Tensor], cfg: Recipe,
                 meta: Mapping[str, Any]) -> Path:
    """Write `generator` (a state dict of the recipe's generator) as a waveforge export in `out`
    (`waveforge.checkpoint.write_export`: generator_ema.safetensors + model_config.json with the model
    and diffusion sections of `cfg`, step, images, recipe, source, plus `meta`), so jobs/sample.py and
    jobs/evaluate.py read it. An error leaves `out` as it was. Returns `out`."""
    d = config.to_dict(cfg)
    info = {"model": d["model"], "diffusion": d["diffusion"], "step": int(meta.get("step", 0)),
            "images": int(meta.get("images", 0)), "recipe": cfg.recipe, "source": str(meta.get("source", "")),
            "code_version": "", **{k: v for k, v in meta.items() if k not in ("step", "images", "source")}}
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in generator.items()}
    return write_export_folder(Path(out), tensors, info)


def import_checkpoint(path: str | os.PathLike, cfg: Recipe, out: str | os.PathLike, bands: str | None = None
                      ) -> dict[str, Any]:
    """Convert a reference netG_*.pth or content.pth for the recipe and write a waveforge export to `out`
    (see write_export; nothing is written unless every key and shape fits). From content.pth the EMA
    generator is exported (the raw one when the run had no EMA). Returns a summary: out, kind, weights,
    bands, parameters, step."""
    if not Path(path).is_file():
        raise ReferenceCheckpointError(f"checkpoint={path}: no such file")
    if Path(out).exists() and not Path(out).is_dir():
        raise ReferenceCheckpointError(f"out={out} exists and is not a folder")
    bands = _check_bands(bands or default_bands(cfg.recipe))
    kind, obj = load_reference(path)
    meta: dict[str, Any] = {"source": str(path)}
    if kind == "generator":
        G = convert_generator(obj, cfg, bands)
        weights = "as saved (EMA when trained with --use_ema)"
        epoch = re.search(r"netG_(\d+)\.pth$", str(path))
        if epoch:
            meta["epoch"] = int(epoch.group(1))
    else:
        state = convert_training_state(obj, cfg, bands)
        G = state.generator_ema if state.generator_ema is not None else state.generator
        weights = "ema" if state.generator_ema is not None else "raw (no EMA in the training state)"
        meta.update(step=state.global_step, images=state.images, epoch=state.epoch)
    meta["reference"] = {"kind": kind, "weights": weights, "bands": bands}
    write_export(out, G, cfg, meta)
    n = sum(math.prod(v.shape) for v in G.values())
    return {"out": str(out), "kind": kind, "weights": weights, "bands": bands, "parameters": n,
            "step": int(meta.get("step", 0))}
