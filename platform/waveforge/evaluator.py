"""Evaluation of a generator as one component: it owns its feature extractor and the reference statistics.

    evaluator = Evaluator(cfg, device)               # COLLECTIVE: loads the extractor (fails fast, on every rank)
    scores = evaluator.fid(generate)                 # COLLECTIVE: {"fid", "kid"} of seed-indexed samples
    metrics, grid = evaluator.evaluate(ema, step)    # COLLECTIVE: the trainer's periodic evaluation

The trainer evaluates its EMA generator every eval.every_images; the evaluate job (waveforge.jobs) scores
an exported or checkpointed one. Both sample seed-indexed (sample i from seed i), so the numbers do not
depend on the number of ranks or the batch size.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from waveforge import dist, edm, inference, metrics
from waveforge.config import ConfigError, Recipe
from waveforge.images import grid_rows, make_grid

GRID_MIN_PX = 256  # sample grids are upscaled (nearest neighbour) to at least this size, so they can be seen


def sampling_speed(generate_batch: Callable[[], Any], batch_size: int, repeats: int = 5,
                   warmup: int = 1) -> dict[str, float]:
    """Time `generate_batch()` (one batch of `batch_size` images): warm-up calls excluded, CUDA synchronized."""
    if repeats < 1 or batch_size < 1:
        raise ValueError(f"repeats={repeats} and batch_size={batch_size} must be >= 1")
    sync = torch.cuda.synchronize if torch.cuda.is_available() and torch.cuda.is_initialized() else (lambda: None)
    for _ in range(warmup):
        generate_batch()
    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        generate_batch()
        sync()
    s = (time.perf_counter() - t0) / repeats
    return {"images_per_s": batch_size / s, "s_per_batch": s}


class Evaluator:
    """FID/KID of generators against the recipe's data set, sample grids, sampling speed (module docstring)."""

    def __init__(self, cfg: Recipe, device: torch.device | str, run_dir: Path | None = None) -> None:
        self.cfg, self.device, self.run_dir = cfg, torch.device(device), run_dir
        try:  # rank 0 first: a download of the weights lands once; its failure stops every rank now, not hours in
            self.extractor = dist.rank0_first(lambda: metrics.load_feature_extractor(cfg.eval, self.device))
        except (metrics.InceptionUnavailable, ValueError, OSError) as e:
            raise ConfigError(f"evaluation needs FID features: {e}") from e
        self._reference: metrics.Stats | None = None

    def reference(self, progress: bool = True) -> metrics.Stats:
        """COLLECTIVE: the data set's reference statistics (cached next to the data; kept in memory)."""
        if self._reference is None:
            self._reference = metrics.dataset_reference(self.cfg, self.extractor, progress=progress)
        return self._reference

    def fid(self, generate: Callable[[list[int]], torch.Tensor], progress: bool = True) -> dict[str, float]:
        """COLLECTIVE: FID (and KID with eval.kid) of eval.num_samples images of `generate` (seeds -> uint8
        images), named for the features: {"fid", "kid"} with Inception, {"fid_proxy", ...} with the proxy."""
        e = self.cfg.eval
        fake = metrics.generate_features(generate, e.num_samples, self.extractor, e.batch_size, kid=e.kid,
                                         progress=progress).reduce()
        return self.extractor.named(metrics.scores(self.reference(progress), fake, kid=e.kid,
                                                   kid_subsets=e.kid_subsets, kid_subset_size=e.kid_subset_size,
                                                   device=self.extractor.device))

    @property
    def fid_key(self) -> str:
        """The name of this evaluator's FID: fid (Inception), fid_proxy, fid_custom."""
        return f"fid{self.extractor.suffix}"

    def evaluate(self, generator: torch.nn.Module, step: int) -> tuple[dict[str, float], Path | None]:
        """COLLECTIVE: the trainer's periodic evaluation of `generator` (the EMA): a fixed-seed grid (rank 0,
        saved to <run>/samples/grid-<step>.png), sampling speed (rank 0) and FID/KID (all ranks). Returns the
        metrics, named for the log (eval_fid, sampling_images_per_s, ...), and the grid's path on rank 0."""
        cfg, e = self.cfg, self.cfg.eval
        filt = edm.noise_filter(cfg, generator, self.device, self.run_dir) if cfg.model.family == "edm" else None
        generate = inference.generator_fn(generator, cfg, self.device, noise_filter=filt)
        out: dict[str, float] = {}
        grid_path = None
        if dist.rank() == 0:
            grid = make_grid(generate(list(range(e.grid_size))), nrow=grid_rows(e.grid_size), min_size=GRID_MIN_PX)
            if self.run_dir is not None:
                grid_path = self.run_dir / "samples" / f"grid-{step:09d}.png"
                grid_path.parent.mkdir(parents=True, exist_ok=True)
                grid.save(grid_path)
            speed = sampling_speed(lambda: generate(list(range(e.batch_size))), e.batch_size, repeats=2)
            out.update({f"sampling_{k}": v for k, v in speed.items()})
        out.update({f"eval_{k}": v for k, v in self.fid(generate).items()})
        return out, grid_path
