"""The evaluate, sample and import jobs: what `jobs/evaluate.py`, `jobs/sample.py`, `jobs/import_reference.py`
and submitted tasks run, on every rank (each initialises torch.distributed itself when launched with more
than one rank). The train job is `waveforge.train.main`.

Both draw seed-indexed samples (sample i from seed i; rank r takes seeds r, r + world, ...), so results do
not depend on the number of ranks or the batch size.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from waveforge import dist, inference, metrics, reference, runtime, steps
from waveforge import storage as wf_storage
from waveforge.checkpointer import Checkpointer, set_training_state
from waveforge.config import ConfigError, Recipe
from waveforge.evaluator import Evaluator
from waveforge.images import grid_rows, make_grid


def _device(cfg: Recipe, device: str = "") -> torch.device:
    if runtime.launched_world() > 1 and not dist.is_initialized():
        runtime.init_distributed(cfg.dist.backend)
    return torch.device(device) if device else dist.device()


def evaluate(cfg: Recipe, checkpoint: str = "", real: str = "", fake: str = "", out: str = "") -> dict[str, Any]:
    """The evaluate job. Returns the result on every rank.

    real= and fake= (image folders): FID/KID between them (clean-fid's compute_fid(real, fake)).
    checkpoint= (export folder, checkpoint / run folder or URL): its EMA generator's eval.num_samples images
        against the reference statistics of data.url (the recipe's eval and data sections; the model and
        diffusion sections come from the checkpoint).
    out=: also write the result as JSON there (a path or URL; rank 0).
    """
    device = _device(cfg)
    t0 = time.time()
    if real or fake:
        if not (real and fake) or checkpoint:
            raise ConfigError("give real= and fake= (two image folders), or checkpoint= alone")
        result: dict[str, Any] = dict(metrics.fid_folders(real, fake, cfg.eval, device))
        result.update(real=real, fake=fake)
    elif checkpoint:
        generate, run_cfg, info = inference.load_sampler(cfg, checkpoint, device)
        result = dict(Evaluator(run_cfg, device).fid(generate))
        result.update(checkpoint=checkpoint, **{k: v for k, v in info.items() if v is not None})
        result.update(num_samples=cfg.eval.num_samples, data=cfg.data.url)
    else:
        raise ConfigError("nothing to evaluate: give checkpoint=PATH|URL, or real=DIR fake=DIR")
    e = cfg.eval
    features = e.feature_extractor or ("proxy (waveforge.proxy_features, not Inception)" if e.features == "proxy"
                                       else f"inception_v3 ({e.mode})")
    result.update(mode=e.mode, features=features, seconds=round(time.time() - t0, 1))
    if out:
        dist.on_rank0(lambda: wf_storage.write_bytes(out, (json.dumps(result, indent=1) + "\n").encode(), cfg.storage))
    dist.print0("evaluation: " + json.dumps(result), file=sys.stderr)  # stdout stays for --json
    return result


def sample(cfg: Recipe, run: str = "", num: int = 64, seed: int = 0, out: str = "", grid: bool = False,
           device: str = "") -> dict[str, Any]:
    """The sample job: `num` images of seeds seed..seed+num-1 of `run`'s EMA generator, written as
    `<out>/<seed:06d>.png` by whichever rank owns the seed, or one grid PNG (rank 0)."""
    if not run:
        raise ConfigError("nothing to sample: give run=RUN_DIR|CHECKPOINT|EXPORT_DIR|URL")
    if int(num) < 1:
        raise ConfigError(f"num={num} is out of range: >= 1")
    dev = _device(cfg, device)
    generate, _, info = inference.load_sampler(cfg, run, dev)
    out_dir = Path(wf_storage.local_path(out)) if out else Path(wf_storage.local_path(run)) / "samples"
    out_dir.mkdir(parents=True, exist_ok=True)
    seeds = list(range(int(seed), int(seed) + int(num)))
    bs = cfg.eval.batch_size
    described = {k: v for k, v in info.items() if v is not None}
    if grid:
        path = out_dir / f"grid-seed{seed}-n{num}.png"

        def write_grid() -> None:
            images = torch.cat([generate(seeds[i:i + bs]) for i in range(0, len(seeds), bs)])
            make_grid(images, nrow=grid_rows(len(seeds))).save(path)

        dist.on_rank0(write_grid)
        dist.print0(f"wrote grid of {num} samples to {path}")
        return {"grid": str(path), **described}
    mine = seeds[dist.rank()::dist.world()]
    for i in _progress(range(0, len(mine), bs), len(mine), bs):
        batch = mine[i:i + bs]
        for s, img in zip(batch, generate(batch)):
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(out_dir / f"{s:06d}.png")
    dist.barrier()
    dist.print0(f"wrote {num} samples (seeds {seeds[0]}..{seeds[-1]}) to {out_dir}")
    return {"out": str(out_dir), "num": int(num), **described}


def _progress(it: range, total: int, bs: int) -> Any:
    if dist.rank() != 0:
        return it
    from tqdm import tqdm

    return tqdm(it, total=math.ceil(total / bs), desc="sampling", unit="batch", disable=not sys.stderr.isatty())


def import_reference(cfg: Recipe, checkpoint: str, out: str, bands: str | None = None) -> dict[str, Any]:
    """The import job (one process): an official WaveDiff / DDGAN checkpoint as a waveforge export in `out`
    (generator_ema.safetensors + model_config.json, for jobs/sample.py and jobs/evaluate.py), and, from a
    training state (content.pth), also a waveforge checkpoint `out`/checkpoints/step-N that
    `jobs/train.py resume=OUT` continues from: G, D, the EMA, both Adam optimizers' moments and step counts,
    the LR schedule at step N and the image counter (no data position: the reference's data order cannot be
    continued, so the run's data order starts from its beginning). Nothing is written when anything does
    not fit the recipe."""
    if runtime.launched_world() > 1:
        raise ConfigError("jobs/import_reference.py runs in one process (launched with more than one rank)")
    kind, obj = reference.load_reference(checkpoint)  # first: a missing or foreign file is the first thing to say
    bands = bands or reference.default_bands(cfg.recipe)
    state = reference.convert_training_state(obj, cfg, bands) if kind == "content" else None  # checks all first
    summary = reference.import_checkpoint(checkpoint, cfg, Path(out), bands=bands)
    if state is None:
        return summary
    if cfg.model.family != "wavediff":
        raise ConfigError(f"recipe {cfg.recipe} is not a diffusion GAN (model.family={cfg.model.family})")
    device = runtime.init_distributed(cfg.dist.backend)
    run_cfg = copy.deepcopy(cfg)
    run_cfg.run.dir, run_cfg.run.name = str(Path(out).absolute()), cfg.run.name or "imported"
    model = steps.make_step(run_cfg, device)
    model.G.load_state_dict(state.generator)
    model.D.load_state_dict(state.discriminator)
    ema = copy.deepcopy(model.G).eval().requires_grad_(False)
    ema.load_state_dict(state.generator_ema if state.generator_ema is not None else state.generator)
    engines = steps.build_engines(model.networks(), cfg=run_cfg, world=1, grad_accum=run_cfg.dist.grad_accum,
                                  patch={})
    set_training_state(engines["G"], state.generator, state.optimizer_g, state.global_step)
    set_training_state(engines["D"], state.discriminator, state.optimizer_d, state.global_step)
    checkpointer = Checkpointer(run_cfg, Path(out))
    path = checkpointer.save(step=state.global_step, images=state.images, engines=engines, ema=ema.to(device),
                             loader=None, extra={"run_id": None, "interval": None, "imported_from": str(checkpoint),
                                                 "epoch": state.epoch}, reason="imported")
    checkpointer.close()
    runtime.shutdown()
    return {**summary, "checkpoint": str(path)}

