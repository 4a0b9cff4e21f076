"""Using a trained model: load an exported or checkpointed generator (or EDM denoiser) and build its
sampling function, seed-indexed (sample i always comes from seed i).

    G, run_cfg, info = load_generator(source, storage, device)     # export folder, checkpoint/run folder or URL
    generate = generator_fn(G, run_cfg, device)                     # seeds -> uint8 (B,3,R,R)
    generate, run_cfg, info = load_sampler(cfg, source, device)     # both, with the user's sampler settings
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from waveforge import checkpoint, config, diffusion, dist, edm, models, wavelet
from waveforge import storage as wf_storage
from waveforge.config import ConfigError, Recipe, StorageConfig
from waveforge.images import to_uint8

GENERATOR_FILE = checkpoint.GENERATOR_FILE  # checkpoint.export's output, with model_config.json


def load_generator(source: str, storage: StorageConfig | None = None, device: torch.device | str = "cpu"
                   ) -> tuple[torch.nn.Module, Recipe, dict[str, Any]]:
    """The EMA generator of `source` (collective): an export folder (generator_ema.safetensors +
    model_config.json), or a checkpoint / run / checkpoints folder or URL (exported first by rank 0).

    Returns (G in eval mode on `device`, a Recipe with the checkpoint's model and diffusion sections, the
    export's metadata: step, images, source).
    """
    def locate() -> tuple[str, str]:
        local = Path(wf_storage.local_path(source))
        if (local / GENERATOR_FILE).is_file():
            return str(local), ""
        tmp = tempfile.mkdtemp(prefix="waveforge-eval-")
        try:
            return str(checkpoint.export(source, Path(tmp), storage=storage)), tmp
        except (OSError, RuntimeError, ValueError) as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise ConfigError(f"cannot load a generator from {source!r}: {e}") from e

    folder, tmp = dist.on_rank0(locate)  # rank 0 first: a source that does not load fails every rank alike
    if dist.rank() != 0 and tmp:  # exported from a checkpoint into rank 0's temp folder: each host its own copy
        folder, tmp = locate()
    try:
        tensors, meta = checkpoint.read_export(Path(folder))  # digest and finiteness checked before any use
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    run_cfg = config.from_dict({"model": meta["model"], "diffusion": meta["diffusion"]})
    G = models.build_network(run_cfg.model, run_cfg.diffusion)
    missing, unexpected = G.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise ConfigError(f"{folder}/{GENERATOR_FILE} does not fit the generator of its model_config.json: "
                          f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    info = {k: meta.get(k) for k in ("step", "images", "source", "recipe")}
    return G.to(device).eval().requires_grad_(False), run_cfg, info


def generator_fn(G: torch.nn.Module, run_cfg: Recipe, device: torch.device | str,
                 noise_filter: Any = None) -> Callable[[list[int]], torch.Tensor]:
    """seeds -> uint8 (B,3,R,R) images of G (sample i from seed i), as the trainer's evaluation makes them.

    The EDM family (run_cfg.model.family=edm) samples with run_cfg.sampler (and `noise_filter`, see
    waveforge.edm.noise_filter); the diffusion GAN with its T-step posterior sampler (a CPU G gets its conv
    weights in channels_last, in place: `waveforge.models.to_inference_layout`).
    """
    if run_cfg.model.family == "edm":
        return edm.generator_fn(G, run_cfg, device, noise_filter)

    m = run_cfg.model
    sched = diffusion.make_schedule(run_cfg.diffusion, device)
    shape = (4 * m.channels, m.resolution // 2, m.resolution // 2)
    models.to_inference_layout(G)  # on the CPU: conv weights in the sampler's channels_last layout

    @torch.no_grad()
    def generate(seeds: list[int]) -> torch.Tensor:
        w = diffusion.sample_from_seeds(G, sched, seeds, shape, m.nz, device)
        return to_uint8(wavelet.from_wavelet(w.float())).cpu()

    return generate


def local_folder(source: str) -> Path | None:
    """`source` as a local folder (a run, checkpoint or export folder), or None for a URL or a file."""
    local = Path(wf_storage.local_path(source))
    return local if local.is_dir() else None


def load_sampler(cfg: Recipe, source: str, device: torch.device | str
                 ) -> tuple[Callable[[list[int]], torch.Tensor], Recipe, dict[str, Any]]:
    """(generate, run_cfg, info) for the model at `source` (see load_generator), collective.

    run_cfg has the checkpoint's model and diffusion sections and `cfg`'s data, eval, storage and sampler
    sections: the EDM family samples with the sampler the user chose (and its TDAS/PDS filters, stored in
    the run folder when `source` is one), the diffusion GAN with its T steps.
    """
    G, run_cfg, info = load_generator(source, cfg.storage, device)
    run_cfg.data, run_cfg.eval, run_cfg.storage, run_cfg.sampler = cfg.data, cfg.eval, cfg.storage, cfg.sampler
    filt = None
    if run_cfg.model.family == "edm":
        filt = edm.noise_filter(run_cfg, G, device, local_folder(source))
        info = {**info, **edm.describe(run_cfg)}
    return generator_fn(G, run_cfg, device, noise_filter=filt), run_cfg, info
