"""Writing a checkpoint (COLLECTIVE): every rank its ZeRO partitions and RNG states, rank 0 the EMA and the
trainer's state; hashes spread over the ranks; atomic publication (manifest, rename, `latest`); pruning."""

from __future__ import annotations

import json
import os
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from waveforge import dist
from waveforge.checkpoint.files import (
    EMA,
    FORMAT,
    LATEST,
    MANIFEST,
    STATE,
    VERSION,
    CheckpointError,
    _check_plain,
    _delete_checkpoint,
    _fsync_dir,
    _hash_file,
    _list_files,
    _remove_leftovers,
    _rng_state,
    _step_of,
    _write_atomic,
    ckpt_root,
    complete_checkpoints,
    read_manifest,
    step_name,
)
from waveforge.checkpoint.remote import Uploader


def save(run_dir: Path, step: int, engines: dict[str, Any], ema: torch.nn.Module, state: dict[str, Any], *,
         keep_last: int, milestone_every_images: int = 0, uploader: Uploader | None = None) -> Path:
    """COLLECTIVE: write and publish checkpoint `step-<step>` of `run_dir`; return its path on every rank.

    engines: {"G": engine, "D": engine} (names become the engines' folders); ema: the EMA module (identical
    on every rank; rank 0 writes it); state: the trainer's dict (plain data: see _check_plain), which must
    hold "images" when milestone_every_images > 0. After publication, keeps the newest `keep_last`
    complete checkpoints plus milestones (the first checkpoint at or after every multiple of
    milestone_every_images images) and deletes the others (not those still queued for upload).
    uploader: rank 0's Uploader when checkpoints are copied to object storage (its url); the upload runs in
    the background (None on the other ranks, and without object storage).
    """
    if keep_last < 1:
        raise ValueError(f"keep_last={keep_last}: must be >= 1")
    if milestone_every_images > 0 and "images" not in state:
        raise ValueError("milestone_every_images needs state['images']")
    _check_plain(state)
    rank, world = dist.rank(), dist.world()
    root = ckpt_root(run_dir)
    name = step_name(step)
    tmp = root / f".tmp-{step:09d}"
    sums_dir = root / f".tmp-{step:09d}-sums"  # outside tmp: ranks may still list tmp while others write

    # 1. A fresh temporary folder (rank 0 clears leftovers of interrupted saves first).
    def prepare() -> None:
        root.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(root)
        (tmp / "rng").mkdir(parents=True)
        sums_dir.mkdir()

    dist.on_rank0(prepare)

    # 2. Every rank writes: the engines' ZeRO partitions (DeepSpeed barriers inside), its RNG states;
    #    rank 0 also the EMA and the state.
    for tag, engine in engines.items():
        engine.save_checkpoint(str(tmp), tag=tag, client_state={}, save_latest=False)
    torch.save(_rng_state(), tmp / "rng" / f"rank-{rank:05d}.pt")
    if rank == 0:
        safetensors.torch.save_model(ema, str(tmp / EMA))
        torch.save(state, tmp / STATE)
    dist.barrier()

    # 3. Hash (and fsync) the files, spread over the ranks; each rank leaves its share in a sums file.
    files = _list_files(tmp)
    sums = {rel: _hash_file(tmp / rel) for rel in files[rank::world]}
    _write_atomic(sums_dir / f"rank-{rank:05d}.json", json.dumps(sums).encode())
    dist.barrier()

    # 4. Rank 0 checks, writes the manifest, publishes, points `latest` at it, prunes, queues the upload.
    final = root / name

    def publish() -> None:
        all_sums: dict[str, Any] = {}
        for r in range(world):
            all_sums.update(json.loads((sums_dir / f"rank-{r:05d}.json").read_text()))
        shutil.rmtree(sums_dir)
        missing = [f"rng/rank-{r:05d}.pt" for r in range(world) if f"rng/rank-{r:05d}.pt" not in all_sums]
        if sorted(all_sums) != files or missing or not all(t in {f.split("/")[0] for f in files} for t in engines):
            raise CheckpointError(f"checkpoint {tmp} is incomplete after every rank wrote: "
                                  f"missing {missing or sorted(set(files) - set(all_sums))}")
        previous = complete_checkpoints(root)
        images = int(state.get("images", 0))
        milestone = False
        if milestone_every_images > 0:
            prev = [p for p in previous if _step_of(p.name) < step]
            prev_images = int(read_manifest(prev[-1]).get("images", 0)) if prev else 0
            milestone = images // milestone_every_images > prev_images // milestone_every_images
        manifest = {
            "format": FORMAT, "version": VERSION, "step": step, "images": images, "world": world,
            "engines": {t: {"zero_stage": int(e.zero_optimization_stage())} for t, e in engines.items()},
            "milestone": milestone, "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "files": all_sums,
        }
        for sub in [p for p in tmp.rglob("*") if p.is_dir()]:
            _fsync_dir(sub)  # the files' names are durable too (their data was fsynced when hashed)
        _write_atomic(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
        if final.exists():  # re-saving a step (a resume from an older checkpoint): replace it
            _delete_checkpoint(final)
        os.rename(tmp, final)
        _fsync_dir(root)
        _write_atomic(root / LATEST, (name + "\n").encode())
        if uploader is not None:
            uploader.submit(final)
        _prune(root, keep_last, busy=uploader.pending() if uploader is not None else set())

    def publish_or_explain() -> None:
        try:
            publish()
        except OSError as e:
            raise CheckpointError(f"saving checkpoint {name} failed: {type(e).__name__}: {e}") from e

    dist.on_rank0(publish_or_explain)  # every rank learns of a failure, none waits for rank 0
    return final


def _prune(root: Path, keep_last: int, busy: set[str]) -> list[str]:
    """Delete complete checkpoints beyond the newest keep_last, keeping milestones and `busy` names."""
    ckpts = complete_checkpoints(root)
    removed = []
    for p in ckpts[:-keep_last]:
        if p.name in busy or read_manifest(p).get("milestone"):
            continue
        _delete_checkpoint(p)
        removed.append(p.name)
    return removed

