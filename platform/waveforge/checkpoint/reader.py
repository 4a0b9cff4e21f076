"""Resuming (COLLECTIVE): which checkpoint (local or remote), DeepSpeed's universal format for another
world size, and loading engines, EMA and RNG states."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from waveforge import dist
from waveforge import storage as wstorage
from waveforge.checkpoint.files import (
    EMA,
    MANIFEST,
    STATE,
    UNIVERSAL_SUFFIX,
    CheckpointError,
    Verification,
    _is_url,
    _remove_leftovers,
    _set_rng_state,
    _step_of,
    ckpt_root,
    complete_checkpoints,
    is_complete,
    read_manifest,
    verify,
)
from waveforge.checkpoint.remote import _remote_checkpoints, download
from waveforge.config import StorageConfig


def _newest_local(root: Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def _resolve_local(path: Path) -> Path:
    """A checkpoint folder, a run's checkpoints/ folder or a run folder -> its (newest) complete checkpoint."""
    if (path / MANIFEST).is_file() or _step_of(path.name) is not None:
        if not is_complete(path):
            raise CheckpointError(f"{path} is not a complete checkpoint (missing manifest or files)")
        return path
    for root in (path, ckpt_root(path)):
        newest = _newest_local(root)
        if newest is not None:
            return newest
    raise CheckpointError(f"no complete checkpoint in {path} (nor in {ckpt_root(path)})")


def _resolve_remote(url: str, storage: StorageConfig | None) -> str:
    """A remote checkpoint URL, or a remote checkpoints root -> URL of its (newest) complete checkpoint."""
    url = url.rstrip("/")
    if _step_of(url.rsplit("/", 1)[-1]) is not None:
        if not wstorage.exists(wstorage.join(url, MANIFEST), storage):
            raise CheckpointError(f"{url} is not a complete checkpoint: no {MANIFEST} (upload unfinished?)")
        return url.rstrip("/")
    names = _remote_checkpoints(url, storage)
    if not names:
        raise CheckpointError(f"no complete checkpoint under {url}")
    return f"{url.rstrip('/')}/{names[-1]}"


def _candidates_rank0(run_dir: Path, resume: str, url: str, storage: StorageConfig | None) -> list[Path]:
    """The checkpoints a resume may take, newest first (the first that verifies is taken): see find_resume."""
    root = ckpt_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(root)
    if resume == "never":
        return []
    if resume == "auto":
        local = complete_checkpoints(root)[::-1]
        if url:
            names = _remote_checkpoints(url, storage)
            if names and (not local or _step_of(names[-1]) > _step_of(local[0].name)):
                return [download(wstorage.join(url, names[-1]), root, storage), *local]
        return local
    if _is_url(resume):
        return [download(_resolve_remote(resume, storage), root, storage)]
    path = Path(wstorage.local_path(resume))
    if (path / MANIFEST).is_file() or _step_of(path.name) is not None:
        return [_resolve_local(path)]  # this checkpoint, and no other
    _resolve_local(path)  # the error when it holds none
    for folder in (path, ckpt_root(path)):
        found = complete_checkpoints(folder)
        if found:
            return found[::-1]
    return []


def resume_candidates(run_dir: Path, resume: str, url: str = "", storage: StorageConfig | None = None
                      ) -> list[Path]:
    """COLLECTIVE: the checkpoints to resume from, newest first, the same list on every rank (a resume takes
    the first that verifies, see `first_verified`); [] for a fresh start.

    resume="never": []. "auto": the complete checkpoints of run_dir, newest first, after the newest of `url`
    when that one is newer (downloaded into run_dir/checkpoints/ and checked against its manifest). A
    checkpoint folder: that one only. A run folder or a checkpoints folder: its complete checkpoints, newest
    first. A URL: that remote checkpoint (or the newest under it), downloaded. CheckpointError when missing
    or incomplete. Rank 0 decides and downloads; the others wait for the answer. Also removes `.tmp-*`
    leftovers.
    """
    def decide() -> list[str]:
        try:
            return [str(p) for p in _candidates_rank0(Path(run_dir), resume, url, storage)]
        except CheckpointError as e:
            raise CheckpointError(f"cannot resume from {resume!r}: {e}") from e
        except OSError as e:  # storage unreachable, denied, ...
            raise CheckpointError(f"cannot resume from {resume!r}: {type(e).__name__}: {e}") from e

    return [Path(p) for p in dist.on_rank0(decide)]


def first_verified(candidates: list[Path], started: Verification | None = None
                   ) -> tuple[Path | None, float, list[str]]:
    """COLLECTIVE: the first of `candidates` whose every file matches its manifest (checked before any of
    it is loaded: `verify`), the seconds the check of it added to the caller's time, and why each candidate
    before it was passed over (rank 0 says so on the console). `started`: the check of `candidates[0]`,
    already running in the background (`start_verification`); its result is waited for here."""
    passed: list[str] = []
    for ckpt in candidates:
        try:
            if started is not None and started.ckpt == Path(ckpt):
                return ckpt, started.result()[1], passed
            return ckpt, verify(ckpt), passed
        except CheckpointError as e:
            passed.append(str(e))
            dist.print0(f"checkpoint: {e}; {'trying the one before' if ckpt != candidates[-1] else 'no other'}")
    return None, 0.0, passed


def start_verification(candidates: list[Path]) -> Verification | None:
    """The check of the newest candidate started in the background (None when there is none, or when its
    manifest is unreadable: `first_verified` then checks it in the foreground and says why it fails)."""
    if not candidates:
        return None
    try:
        return Verification(candidates[0])
    except CheckpointError:
        return None


def find_resume(run_dir: Path, resume: str, url: str = "", storage: StorageConfig | None = None) -> Path | None:
    """COLLECTIVE: the newest checkpoint of `resume_candidates` that verifies, or None for a fresh start;
    CheckpointError listing every candidate and why when there were some and none verifies."""
    candidates = resume_candidates(run_dir, resume, url, storage)
    chosen, _, passed = first_verified(candidates)
    if candidates and chosen is None:
        raise CheckpointError(f"no checkpoint to resume from verifies; tried: {' | '.join(passed)}")
    return chosen


def needs_universal(ckpt: Path, world: int) -> bool:
    """True when `ckpt` was saved with another world size (DeepSpeed must load the universal format)."""
    return int(read_manifest(ckpt)["world"]) != world


def prepare_universal(ckpt: Path) -> None:
    """COLLECTIVE: rank 0 converts each engine's folder to DeepSpeed's universal format (`<tag>_universal`,
    next to it, cached: done once per checkpoint); the other ranks wait. Raises on every rank on failure."""
    def convert() -> None:
        for tag in read_manifest(ckpt)["engines"]:
            _convert_universal(Path(ckpt), tag)

    dist.on_rank0(convert)


def _convert_universal(ckpt: Path, tag: str) -> None:
    """DeepSpeed's own converter (`python -m deepspeed.checkpoint.ds_to_universal`, its public command line) in
    a child process: a process pool forked from a trainer that holds NCCL/gloo state is not safe, and the
    conversion's memory is returned when it ends."""
    out = ckpt / f"{tag}{UNIVERSAL_SUFFIX}"
    if (out / ".complete").is_file():
        return
    tmp = ckpt / f".tmp-{tag}{UNIVERSAL_SUFFIX}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ckpt / tag),
           "--output_folder", str(tmp), "--num_extract_workers", "1", "--num_merge_workers", "1",
           "--inject_missing_state"]  # ZeRO-1/2 checkpoints lack the universal info
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}  # no GPU needed to convert
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise CheckpointError(f"ds_to_universal {ckpt / tag} failed (exit {r.returncode}):\n"
                              f"{(r.stdout + r.stderr)[-3000:]}")
    (ckpt / "latest_universal").unlink(missing_ok=True)  # DeepSpeed's pointer (ZeRO-3); tags are explicit
    (tmp / ".complete").write_text("ok\n")
    os.rename(tmp, out)


def ds_config_patch(ckpt: Path, world: int) -> dict[str, Any]:
    """COLLECTIVE when a conversion is needed: what to merge into each engine's DeepSpeed config before
    deepspeed.initialize to load `ckpt` at `world` ranks ({} when the world size matches). Prepares the
    universal format when needed."""
    if not needs_universal(ckpt, world):
        return {}
    prepare_universal(ckpt)
    return {"checkpoint": {"load_universal": True}}


def read_state(ckpt: Path) -> dict[str, Any]:
    """The trainer's state dict of a checkpoint (plain data, loaded with weights_only=True): counters, loader
    position, recipe, run id. Cheap: read it to check a checkpoint before loading any weight."""
    try:
        return torch.load(Path(ckpt) / STATE, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{ckpt} is not a checkpoint: no {STATE}") from None
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file
        raise CheckpointError(f"{Path(ckpt) / STATE}: unreadable ({type(e).__name__}: {e})") from e


def load(ckpt: Path, engines: dict[str, Any], ema: torch.nn.Module) -> dict[str, Any]:
    """COLLECTIVE: restore every engine (module, optimizer, LR scheduler), the EMA and, when the world
    size matches, this rank's RNG states (else they are left as they are: a trainer that re-seeds per
    step from (seed, step, rank) does not need them). Returns the trainer's state dict."""
    ckpt = Path(ckpt)
    m = read_manifest(ckpt)
    if sorted(m["engines"]) != sorted(engines):
        raise CheckpointError(f"{ckpt} holds engines {sorted(m['engines'])}, the trainer has {sorted(engines)}")
    universal = m["world"] != dist.world()
    for tag, engine in engines.items():
        if universal:
            if not engine.load_universal_checkpoint():
                raise CheckpointError(f"{ckpt} was saved at {m['world']} ranks, this run has {dist.world()}: build "
                                      "the engines with ds_config_patch(ckpt, world) merged into their configs")
            if not (ckpt / f"{tag}{UNIVERSAL_SUFFIX}" / ".complete").is_file():
                raise CheckpointError(f"{ckpt}: no universal copy of {tag}; call ds_config_patch first")
        path, _ = engine.load_checkpoint(str(ckpt), tag=tag + (UNIVERSAL_SUFFIX if universal else ""),
                                         load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load engine {tag} from {ckpt}")
    missing, unexpected = safetensors.torch.load_model(ema, str(ckpt / EMA), strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{ckpt / EMA} does not fit the EMA module: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    if not universal:
        _set_rng_state(torch.load(ckpt / "rng" / f"rank-{dist.rank():05d}.pt", weights_only=True))
    state = read_state(ckpt)
    dist.barrier()
    return state

