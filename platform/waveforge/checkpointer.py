"""The trainer's checkpoint protocol, as one component (the mechanics are in `waveforge.checkpoint`):

    ckpt = Checkpointer(cfg, run_dir)
    ckpt.start()                                # COLLECTIVE, first: the newest checkpoint's check starts
    ...                                         # (the trainer builds its evaluator, data and models meanwhile)
    patch = ckpt.plan(world)                    # COLLECTIVE, before the engines: what to resume, DS config patch
    state = ckpt.resume(engines, ema, loader)   # COLLECTIVE: loaded and verified, or None for a fresh start
    ckpt.save(step=..., images=..., engines=..., ema=..., loader=..., extra={...}, reason="interval")
    failed_uploads = ckpt.close()

It decides which checkpoint a run continues from, refuses one whose recipe changes training (before any
weight is loaded), verifies that the loaded weights are the saved ones (a checksum also across a reshard),
assembles what a checkpoint holds, and owns the background saving (checkpoint.background: an interval save
returns after the snapshot; every other save, e.g. a stop's, the final one, an import's, and `close` return
once it is published) and the upload to object storage (a separate low-priority process,
checkpoint.upload_mb_s).
"""

from __future__ import annotations

import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from waveforge import checkpoint, config, dist, runtime
from waveforge.config import Recipe


def weights_checksum(engines: dict[str, Any]) -> float:
    """float64 sum of every parameter of every engine (gathered from ZeRO-3 shards): identical on every rank."""
    import deepspeed

    total = 0.0
    for _, engine in sorted(engines.items()):
        params = list(engine.module.parameters())
        gather = deepspeed.zero.GatheredParameters(params) if engine.zero_optimization_stage() == 3 else nullcontext()
        with gather:
            total += float(sum(p.detach().double().sum() for p in params))
    return total


class Checkpointer:
    """Resume, save and upload the checkpoints of one run (see the module docstring)."""

    def __init__(self, cfg: Recipe, run_dir: Path) -> None:
        self.cfg, self.run_dir = cfg, Path(run_dir)
        c = cfg.checkpoint
        self.uploader = (checkpoint.Uploader(c.url, cfg.storage, keep_last=c.remote_keep_last, mb_s=c.upload_mb_s,
                                               nice=c.upload_nice)
                         if c.url and dist.rank() == 0 else None)
        self.saver = checkpoint.Saver(background=c.background, direct_io=c.direct_io)
        self.source: Path | None = None
        self.notes: dict[str, str] = {}  # what the resume passed over and why (tags of the MLflow run)
        self._candidates: list[Path] | None = None  # set by start
        self._check: checkpoint.Verification | None = None  # the newest candidate's check, running

    def start(self) -> None:
        """COLLECTIVE: find what a resume may take (run.resume; a remote checkpoint is downloaded now) and start
        checking the newest candidate against its manifest in background threads, so that hashing a big
        checkpoint overlaps what the trainer does before `plan` (evaluator, data, models)."""
        self._candidates = checkpoint.resume_candidates(self.run_dir, self.cfg.run.resume,
                                                        url=self.cfg.checkpoint.url, storage=self.cfg.storage)
        self._check = checkpoint.start_verification(self._candidates)

    def plan(self, world: int) -> dict[str, Any]:
        """COLLECTIVE: choose the checkpoint to resume from (run.resume): the newest candidate whose files all
        match its manifest (a corrupted one is passed over, said on the console and in `notes`); check that
        its recipe trains the same thing; return what each engine's DeepSpeed config needs to load it ({}
        for a fresh start). CheckpointError listing every candidate when there were some and none verifies.
        Calls `start` first unless the trainer did."""
        if self._candidates is None:
            self.start()
        candidates = self._candidates or []
        self.source, waited, passed = checkpoint.first_verified(candidates, started=self._check)
        self._check = None
        if candidates and self.source is None:
            raise checkpoint.CheckpointError(f"no checkpoint to resume from verifies; tried: {' | '.join(passed)}")
        if passed:
            self.notes["resume_passed_over"] = " | ".join(passed)
            dist.print0(f"resuming from {self.source}, the newest checkpoint that verifies ({len(passed)} newer "
                        "one(s) passed over)")
        if self.source is None:
            return {}
        m = checkpoint.read_manifest(self.source)
        dist.print0(f"verified {len(m['files'])} files ({sum(f['size'] for f in m['files'].values()) / 2**20:.0f} "
                    f"MiB) of {self.source.name} against its manifest (it added {waited:.2f} s to the start)")
        saved = checkpoint.read_state(self.source).get("recipe")
        if not isinstance(saved, dict):
            raise checkpoint.CheckpointError(f"{self.source}: its state holds no recipe")
        changed = config.diff_training_fields(config.from_dict(saved), self.cfg)
        if changed:
            raise config.ConfigError(f"resuming {self.source} with a recipe that changes training: "
                                     f"{'; '.join(changed)}. Start a new run (another run.dir) or pass resume=never.")
        return checkpoint.ds_config_patch(self.source, world)

    def resume(self, engines: dict[str, Any], ema: torch.nn.Module, loader: Any) -> dict[str, Any] | None:
        """COLLECTIVE: load the planned checkpoint into the engines, the EMA and the loader's position; None
        when there is none. Refuses weights that differ from the saved ones."""
        if self.source is None:
            return None
        state = checkpoint.load(self.source, engines, ema)
        if state.get("loader") is not None:
            loader.load_state_dict(state["loader"])
        else:  # an imported training state: the reference's data order cannot be continued
            dist.print0(f"{self.source} holds no data position ({state.get('reason', '')}): the data order starts "
                        "from its beginning")
        loaded, saved = weights_checksum(engines), state.get("weights_checksum")
        if saved is not None and abs(loaded - saved) > 1e-12 * max(1.0, abs(saved)):
            raise checkpoint.CheckpointError(f"checkpoint {self.source} loaded different weights than it saved "
                                             f"(checksum {loaded!r} != {saved!r}); refusing to train on them")
        dist.print0(f"resumed from {self.source} at step {state['step']} ({state['images']} images; saved at world "
                    f"size {state.get('world', '?')}, now {dist.world()}; weights checksum verified)")
        return state

    def save(self, *, step: int, images: int, engines: dict[str, Any], ema: torch.nn.Module, loader: Any | None,
             extra: dict[str, Any], reason: str) -> Path:
        """COLLECTIVE: write and publish checkpoint `step` (upload queued in the background); `extra` is
        more of the trainer's state (plain data: the MLflow run id, the partial metrics interval, ...);
        `loader` None: no data position (an imported state, whose run continues from the data's start).
        With checkpoint.background, an "interval" save returns after the snapshot; any other `reason` ("stop",
        "final", "imported": the process ends soon after) once published; a failure of a background save is
        raised by the next save.
        Returns the checkpoint's path (where it is, or will be once published)."""
        state = {"step": step, "images": images, "loader": loader.state_dict() if loader is not None else None,
                 "world": dist.world(),
                 "weights_checksum": weights_checksum(engines), "recipe": config.to_dict(self.cfg),
                 "code_version": runtime.code_version(), "reason": reason, **extra}
        c = self.cfg.checkpoint
        return self.saver.save(self.run_dir, step, engines, ema, state, keep_last=c.keep_last,
                               milestone_every_images=c.milestone_every_images, uploader=self.uploader,
                               wait=reason != "interval")

    def newest(self) -> str:
        """The newest complete checkpoint of the run (what a resume would take), or "none"."""
        found = checkpoint.complete_checkpoints(checkpoint.ckpt_root(self.run_dir))
        return str(found[-1]) if found else "none"

    def where(self, path: Path) -> str:
        """Where checkpoint `path` ends up: its object-storage URL when uploading, else the local folder."""
        return f"{self.cfg.checkpoint.url.rstrip('/')}/{path.name}" if self.cfg.checkpoint.url else str(path)

    def close(self, *, abort: bool | None = None) -> int:
        """Wait until the last save is published (raising its failure), then for queued uploads; the number
        of uploads that failed (0 without object storage). Not collective. abort (default: True when called
        while an exception propagates, as in the trainer's error path): another rank may be dead, so rank 0
        waits at most a minute for the other ranks' files of a save in flight, and a save's failure is
        printed instead of raised; uploads still finish."""
        if abort is None:
            abort = sys.exc_info()[1] is not None
        self.saver.close(abort=abort)
        if self.uploader is None:
            return 0
        failed = self.uploader.close()
        if failed:
            print(f"WARNING: {failed} checkpoint upload(s) to {self.cfg.checkpoint.url} failed; the local "
                  f"checkpoints in {checkpoint.ckpt_root(self.run_dir)} are complete", flush=True)
        return failed


def set_training_state(engine: Any, weights: dict[str, torch.Tensor], moments: dict[str, dict[str, torch.Tensor]],
                       step: int) -> None:
    """Give a freshly built DeepSpeed engine a training state from elsewhere (an imported reference run):
    its fp32 master weights, Adam moments and step count from full per-parameter tensors (by the module's
    parameter names), and its LR schedule at `step`. Any ZeRO stage and precision (DeepSpeed's
    safe_set_full_* API); parameters without moments keep a fresh Adam state."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    # Adam's state exists only after a first step: take one on zero gradients (no forward; weights unchanged).
    engine.backward(sum(p.float().sum() for p in engine.module.parameters()) * 0.0)
    engine.step()
    params = dict(engine.module.named_parameters())
    missing = sorted(set(weights) ^ set(params))
    if missing:
        raise checkpoint.CheckpointError(f"training state does not fit the engine's module: {missing[:5]}")
    zero_managed = any(hasattr(p, "_hp_mapping") or hasattr(p, "ds_id") for p in params.values())
    for name, p in params.items():
        value = weights[name].to(torch.float32)
        if zero_managed:
            safe_set_full_fp32_param(p, value.to(p.device))
            for key, v in moments.get(name, {}).items():
                if key != "step":
                    safe_set_full_optimizer_state(p, v.to(torch.float32).to(p.device), key)
        else:  # ZeRO-0 fp32: the module's parameters are the optimizer's
            with torch.no_grad():
                p.copy_(value)
            state = engine.optimizer.state[p]
            for key, v in moments.get(name, {}).items():
                if key != "step":
                    state[key].copy_(v)
    if zero_managed:  # the module's low-precision copies follow the masters
        with torch.no_grad():
            for name, p in params.items():
                if not hasattr(p, "ds_id"):
                    p.copy_(weights[name].to(p.dtype))
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)  # the torch Adam under ZeRO's wrapper
    for state in base.state.values():
        if "step" in state:
            state["step"] = torch.tensor(float(step)) if torch.is_tensor(state["step"]) else step
    if engine.lr_scheduler is not None:
        engine.lr_scheduler.last_epoch = step - 1
        engine.lr_scheduler.step()
