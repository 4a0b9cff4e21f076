"""Export (one process): a checkpoint's EMA generator as generator_ema.safetensors + model_config.json.

The export format is written and read here only: `write_export` (atomic, non-finite weights refused, the
generator file's size and BLAKE3 digest recorded in model_config.json) and `read_export` (the digest
checked, then the tensors checked to be finite, before anything uses them). `waveforge.reference` writes
imported official checkpoints through `write_export`, `waveforge.inference` loads exports through
`read_export`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import blake3
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

GENERATOR_FILE = "generator_ema.safetensors"
CONFIG_FILE = "model_config.json"
DIGEST_KEY = "generator_file"  # model_config.json: {"size": bytes, "blake3": hex} of GENERATOR_FILE


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
    info = {"model": recipe["model"], "diffusion": recipe["diffusion"], "step": m["step"],
            "images": m.get("images", 0), "recipe": recipe.get("recipe", ""), "source": source,
            "code_version": state.get("code_version", "")}
    return write_export(out, tensors, info)  # refuses non-finite weights


def nonfinite(tensors: dict[str, torch.Tensor]) -> str:
    """'' when every floating-point tensor is finite, else what is not: 'N values in K tensor(s), e.g. a, b'."""
    counts = {k: int((~torch.isfinite(v)).sum()) for k, v in tensors.items() if v.is_floating_point()}
    bad = {k: n for k, n in counts.items() if n}
    if not bad:
        return ""
    return f"{sum(bad.values())} values in {len(bad)} tensor(s), e.g. {', '.join(list(bad)[:3])}"


def write_export(out: Path, tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> Path:
    """Write an export into the folder `out`: GENERATOR_FILE (the tensors; safetensors metadata source, step,
    images from `info`) and CONFIG_FILE (`info`, which holds at least model and diffusion, plus the generator
    file's size and BLAKE3 digest under DIGEST_KEY). Non-finite weights raise CheckpointError and nothing is
    written. Both files are written in a temporary folder next to `out`, then moved in: an error or a kill
    leaves `out` as it was. Returns `out`."""
    bad = nonfinite(tensors)
    if bad:
        raise CheckpointError(f"the generator of {info.get('source') or out} holds non-finite weights ({bad}): "
                              f"not exported to {out}")
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"out={out} exists and is not a folder")
    meta = {k: str(info.get(k, "")) for k in ("source", "step", "images")}
    data = safetensors.torch.save({k: v.contiguous() for k, v in tensors.items()}, metadata=meta)
    info = {**info, DIGEST_KEY: {"size": len(data), "blake3": blake3.blake3(data).hexdigest()}}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.export-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _write_atomic(tmp / GENERATOR_FILE, data)
        _write_atomic(tmp / CONFIG_FILE, (json.dumps(info, indent=1) + "\n").encode())
        if not out.exists():
            os.rename(tmp, out)
        else:
            for name in (GENERATOR_FILE, CONFIG_FILE):
                os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def read_export(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(the generator's tensors, model_config.json) of an export folder, checked before use: the generator
    file's size and BLAKE3 digest against model_config.json (exports written before the digest was recorded,
    or by hand, carry none and are not checked), then every weight finite. Anything else raises
    CheckpointError naming the file (expected vs found)."""
    cfg_path, gen_path = folder / CONFIG_FILE, folder / GENERATOR_FILE
    try:
        info = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{cfg_path}: not readable as JSON ({e})") from None
    if not isinstance(info, dict) or "model" not in info or "diffusion" not in info:
        raise CheckpointError(f"{cfg_path}: no model and diffusion sections")
    try:
        data = gen_path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{gen_path}: {e.strerror or e}") from None
    want = info.get(DIGEST_KEY)
    if isinstance(want, dict):
        found = blake3.blake3(data).hexdigest()
        if len(data) != want.get("size") or found != want.get("blake3"):
            raise CheckpointError(f"{gen_path}: {len(data)} bytes, blake3 {found[:16]}...; {CONFIG_FILE} says "
                                  f"{want.get('size')} bytes, blake3 {str(want.get('blake3'))[:16]}...: "
                                  f"the file is corrupt or was replaced")
    try:
        tensors = safetensors.torch.load(data)
    except Exception as e:  # noqa: BLE001 - any parse failure: the file is not a safetensors file
        raise CheckpointError(f"{gen_path}: not a readable safetensors file ({type(e).__name__}: "
                              f"{str(e)[:200]})") from None
    bad = nonfinite(tensors)
    if bad:
        raise CheckpointError(f"{gen_path} holds non-finite weights ({bad})")
    return tensors, info
