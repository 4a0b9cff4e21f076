"""Training data: WebDataset tar shards in any fsspec storage, streamed with exact, deterministic resume.

    make_shards(source, output, resolution, ...)   write shards + index.json (jobs/make_shards.py)
    ensure_dataset(cfg)                              the recipe's manifest URL (draws the synthetic set if allowed)
    ShardLoader(url, global_batch=..., rank=..., world=...) / from_config(cfg, rank, world, grad_accum)
    iterate_dataset(url, rank=..., world=..., batch_size=...)   canonical order, for FID reference statistics
"""

from waveforge.data.loader import (
                                   DataError,
                                   Plan,
                                   ShardLoader,
                                   from_config,
                                   iterate_dataset,
                                   num_streams,
                                   register_gopen,
)
from waveforge.data.shards import ensure_dataset, make_shards, manifest_url, read_manifest
from waveforge.data.synthetic import synthetic_image

__all__ = ["DataError", "Plan", "ShardLoader", "ensure_dataset", "from_config", "iterate_dataset", "make_shards",
           "manifest_url", "num_streams", "read_manifest", "register_gopen", "synthetic_image"]
