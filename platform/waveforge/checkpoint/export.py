"""Export (one process): a checkpoint's EMA generator as generator_ema.safetensors + model_config.json."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import safetensors.torch
import torch

from waveforge import storage as wstorage
from waveforge.checkpoint.files import (
    EMA,
    STATE,
    CheckpointError,
    _is_url,
    _step_of,
    _write_atomic,
    ckpt_root,
    read_manifest,
    step_name,
    verify_files,
)
from waveforge.checkpoint.reader import _resolve_local, _resolve_remote, read_state
from waveforge.checkpoint.remote import download
from waveforge.config import StorageConfig


def export(ckpt_or_run: str, out: Path | None = None, *, checkpoint: str = "",
           storage: StorageConfig | None = None) -> Path:
    """Write the EMA generator of a checkpoint as `generator_ema.safetensors` + `model_config.json`
    (the recipe's model and diffusion sections) into `out` (default: RUN_DIR/export/). Returns `out`.

    ckpt_or_run: a run folder, a checkpoints folder, a checkpoint folder, or an s3:// URL of a checkpoint
    or of a checkpoints root (then `out` is required). checkpoint: pick a step (e.g. "step-000001000" or
    "1000") instead of the newest complete one.
    """

    source: Path
    if _is_url(ckpt_or_run):
        if out is None:
            raise CheckpointError("export from a URL needs out=PATH")
        url = ckpt_or_run.rstrip("/")
        if checkpoint:
            url = f"{url}/{_pick_name(checkpoint)}"
        url = _resolve_remote(url, storage)
        tmpdir = Path(tempfile.mkdtemp(prefix="waveforge-export-"))
        try:
            part = download(url, tmpdir, storage, files=[EMA, STATE])
            return _write_export(part, Path(out), source=url)
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)
    path = Path(wstorage.local_path(ckpt_or_run))
    if checkpoint:
        base = path if path.name == "checkpoints" else ckpt_root(path)
        path = base / _pick_name(checkpoint)
    source = _resolve_local(path)
    run_dir = source.parent.parent
    return _write_export(source, Path(out) if out is not None else run_dir / "export", source=str(source))


def _pick_name(checkpoint: str) -> str:
    if checkpoint.isdigit():
        return step_name(int(checkpoint))
    if _step_of(checkpoint) is None:
        raise CheckpointError(f"checkpoint={checkpoint!r}: expected a step number or a step-NNNNNNNNN name")
    return checkpoint


def _write_export(ckpt: Path, out: Path, source: str) -> Path:
    m = read_manifest(ckpt)
    problems = verify_files(ckpt, [EMA, STATE])  # what is read here matches the manifest, or nothing is written
    if problems:
        raise CheckpointError(f"{ckpt} does not match its manifest: {'; '.join(problems)}")
    state = read_state(ckpt)
    recipe = state.get("recipe")
    if not isinstance(recipe, dict) or "model" not in recipe or "diffusion" not in recipe:
        raise CheckpointError(f"{ckpt / STATE}: no recipe with model and diffusion sections")
    tensors = safetensors.torch.load_file(str(ckpt / EMA))
    bad = {k: int((~torch.isfinite(v)).sum()) for k, v in tensors.items() if v.is_floating_point()
           and not bool(torch.isfinite(v).all())}
    if bad:
        raise CheckpointError(f"{ckpt / EMA} holds non-finite weights ({sum(bad.values())} values in {len(bad)} "
                              f"tensor(s), e.g. {', '.join(list(bad)[:3])}): not exported")
    meta = {"source": source, "step": str(m["step"]), "images": str(m.get("images", 0))}
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".generator_ema.safetensors.tmp"
    safetensors.torch.save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, out / "generator_ema.safetensors")
    cfg = {"model": recipe["model"], "diffusion": recipe["diffusion"], "step": m["step"],
           "images": m.get("images", 0), "recipe": recipe.get("recipe", ""), "source": source,
           "code_version": state.get("code_version", "")}
    _write_atomic(out / "model_config.json", (json.dumps(cfg, indent=1) + "\n").encode())
    return out
