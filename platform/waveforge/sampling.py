"""The sample job: images from an EMA generator, seed-indexed (image i always comes from seed i).

Images are written as `<out>/<seed:06d>.png` by whichever rank owns the seed (rank r: seeds r, r+world,
...), so the result does not depend on the number of ranks or the batch size; or one grid PNG.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from waveforge import dist, evaluate
from waveforge.config import ConfigError, Recipe


def run_job(cfg: Recipe, run: str = "", num: int = 64, seed: int = 0, out: str = "", grid: bool = False,
            device: str = "") -> dict[str, Any]:
    """Write `num` images of seeds seed..seed+num-1 of `run`'s EMA generator to `out` (or a grid PNG)."""
    if not run:
        raise ConfigError("nothing to sample: give run=RUN_DIR|CHECKPOINT|EXPORT_DIR|URL")
    if int(num) < 1:
        raise ConfigError(f"num={num} is out of range: >= 1")
    if int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1"))) > 1 and not dist.is_initialized():
        from waveforge import launch

        launch.init_distributed(cfg.dist.backend)
    dev = torch.device(device) if device else dist.device()
    generate, _, info = evaluate.load_sampler(cfg, run, dev)
    out_dir = Path(out or Path(run.removeprefix("file://")) / "samples")
    out_dir.mkdir(parents=True, exist_ok=True)
    seeds = list(range(int(seed), int(seed) + int(num)))
    bs = cfg.eval.batch_size
    if grid:
        path = out_dir / f"grid-seed{seed}-n{num}.png"
        if dist.rank() == 0:
            images = torch.cat([generate(seeds[i:i + bs]) for i in range(0, len(seeds), bs)])
            evaluate.make_grid(images, nrow=math.ceil(math.sqrt(len(seeds)))).save(path)
        dist.barrier()
        dist.print0(f"wrote grid of {num} samples to {path}")
        return {"grid": str(path), **{k: v for k, v in info.items() if v is not None}}
    mine = seeds[dist.rank()::dist.world()]
    for i in _progress(range(0, len(mine), bs), len(mine), bs):
        batch = mine[i:i + bs]
        for s, img in zip(batch, generate(batch)):
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(out_dir / f"{s:06d}.png")
    dist.barrier()
    dist.print0(f"wrote {num} samples (seeds {seeds[0]}..{seeds[-1]}) to {out_dir}")
    return {"out": str(out_dir), "num": int(num), **{k: v for k, v in info.items() if v is not None}}


def _progress(it: range, total: int, bs: int) -> Any:
    if dist.rank() != 0:
        return it
    from tqdm import tqdm

    return tqdm(it, total=math.ceil(total / bs), desc="sampling", unit="batch", disable=not os.isatty(2))
