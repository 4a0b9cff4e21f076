"""Training data: WebDataset tar shards in any fsspec storage, streamed with exact, deterministic resume.

    make_shards(source, output, resolution, ...)   write shards + index.json (jobs/make_shards.py)
    ensure_dataset(cfg)                              the recipe's manifest URL (draws the synthetic set if allowed)
    ShardLoader(url, global_batch=..., rank=..., world=...) / from_config(cfg, rank, world, grad_accum)
    iterate_dataset(url, rank=..., world=..., batch_size=...)   canonical order, for FID reference statistics

Modules, one concern each: tar (shard bytes -> samples), decode (sample -> image, normalize), order (which
sample when: pure arithmetic), reader (streams read from shards, substitution of bad data), loader (worker
processes, shared-memory batches, resume state), shards (writing data sets), synthetic, workers, audit
(the record of what a run trained on, checked against the order).

Names are imported lazily, so the shard-writing worker processes never import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ShardLoader": "loader", "from_config": "loader",
    "DataError": "reader", "iterate_dataset": "reader",
    "SampleOrder": "order", "num_streams": "order",
    "normalize": "decode", "decode_image": "decode", "decode_hwc": "decode",
    "parse_tar": "tar", "register_gopen": "tar",
    "ensure_dataset": "shards", "make_shards": "shards", "manifest_url": "shards", "read_manifest": "shards",
    "OrderAudit": "audit",
    "synthetic_image": "synthetic", "start_worker_server": "workers", "worker_context": "workers",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"waveforge.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'waveforge.data' has no attribute {name!r}")
