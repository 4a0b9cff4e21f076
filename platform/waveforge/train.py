"""The training loop: one flat function that reads top to bottom (NVlabs EDM's `training_loop` is the model).

Reading order: `training_loop` (everything a run does) -> `waveforge.steps` (one iteration of the model
family: GanStep's D step and G step) -> `waveforge.diffusion.d_loss / g_loss` (the losses). The loop owns
three components with narrow interfaces, each testable alone: the step (`steps.make_step`), the
`Checkpointer` (resume, save, upload) and the `Evaluator` (FID/KID, grids); statistics stay on the device
(`meters.IntervalMeter`) and are reduced across ranks once per log interval.

A run is a function of its recipe and seed: the random draws of step s on rank r come from (seed, s, r),
the data order from (seed, data set, global batch), so a resumed run continues exactly.
"""

from __future__ import annotations

import copy
import os
import signal
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from waveforge import config, data, diffusion, dist, runtime, steps, tracking
from waveforge.checkpointer import Checkpointer
from waveforge.config import Recipe
from waveforge.evaluator import Evaluator
from waveforge.meters import IntervalMeter, PhaseTimer, RunLog, peak_memory_gb


def crossed(before: int, after: int, every: int) -> bool:
    """True when an image counter moving from `before` to `after` passes a multiple of `every`."""
    return every > 0 and after // every > before // every


def with_run_folder(cfg: Recipe) -> Recipe:
    """COLLECTIVE: `cfg` with its run name and folder set, the same on every rank (rank 0's clock names it)."""
    return config.with_run_folder(cfg, dist.broadcast_object(datetime.now(UTC).strftime("%Y%m%d-%H%M%S")))


def open_tracking(cfg: Recipe, run_dir: Path, run_id: str | None, device: torch.device) -> Any:
    """COLLECTIVE: rank 0's MLflow run (continued when `run_id` or the run folder names one), a NullTracker on
    the other ranks; the first rank of every other node logs its node's system metrics into the same run."""
    tags = {"git_commit": runtime.code_version(), "waveforge_version": runtime.platform_version(),
            "world_size": str(dist.world()), "nodes": os.environ.get("SLURM_JOB_NUM_NODES", "1"),
            "gpus": str(dist.world() if device.type == "cuda" else 0)}
    if os.environ.get("SLURM_JOB_ID"):
        tags["slurm_job_id"] = os.environ["SLURM_JOB_ID"]
    opened: list[Any] = []

    def start() -> str | None:
        tracker = tracking.open_tracker(cfg, run_dir, run_id or tracking.read_run_id(run_dir), tags, 0,
                                        system_metrics=cfg.tracking.enabled)
        opened.append(tracker)
        return tracker.run_id

    shared_id = dist.on_rank0(start)  # a server that does not answer is connected to later: never an error here
    if dist.rank() == 0:
        tracker = opened[0]
        if isinstance(tracker, tracking.Tracker) and tracker.run_id is not None:
            print(f"tracking: {'continuing' if tracker.continued else 'new'} MLflow run {tracker.run_id} "
                  f"({tracker.uri})", flush=True)
        if not tracker.continued:
            tracker.log_artifact(run_dir / "recipe.yaml")
        return tracker
    monitor = tracking.start_node_monitor(cfg, run_dir, shared_id) if dist.local_rank() == 0 else None
    return tracking.NullTracker(monitor)


def training_loop(cfg: Recipe, *, device: torch.device, stop: runtime.StopFlag) -> str:
    """Train `cfg` on this rank (every rank calls it) to train.total_images or train.max_steps. Returns
    "finished", or "stopped" after a stop request (a checkpoint was written; `stop.signals` says why)."""
    rank, world = dist.rank(), dist.world()
    config.check_resources(cfg, world)  # global batch = micro-batch x grad_accum x ranks, whole data streams
    cfg = with_run_folder(cfg)
    run_dir, t = Path(cfg.run.dir), cfg.train
    last_step = min(t.total_images // t.batch_size, t.max_steps or t.total_images)
    if rank == 0:
        config.save(cfg, run_dir / "recipe.yaml")
    dist.print0(f"run folder: {run_dir}\nranks: {world} x micro-batch {config.micro_batch(cfg, world)} x accumulation "
                f"{cfg.dist.grad_accum} = global batch {t.batch_size}; {last_step} steps")

    # Components: the checkpointer (the checkpoint to resume from is checked in the background meanwhile),
    # evaluation (its feature extractor loads now: a missing one fails here, not hours in), the seeded,
    # resumable data stream (this rank's share), the model step and its EMA.
    checkpointer = Checkpointer(cfg, run_dir)
    checkpointer.start()
    evaluator = Evaluator(cfg, device, run_dir) if cfg.eval.every_images else None
    data.ensure_dataset(cfg)
    loader = data.from_config(cfg, rank=rank, world=world, grad_accum=cfg.dist.grad_accum,
                              defer_flip=device.type == "cuda")  # on a GPU the random flip runs there
    model = steps.make_step(cfg, device)
    ema = copy.deepcopy(model.generator).eval().requires_grad_(False).to(device)
    engines = steps.build_engines(model.networks(), cfg=cfg, world=world, grad_accum=cfg.dist.grad_accum,
                                  patch=checkpointer.plan(world))  # resuming on another world size: universal
    model.attach(engines)
    state = checkpointer.resume(engines, ema, loader) or {"step": 0, "images": 0}
    step, images = int(state["step"]), int(state["images"])
    tracker = open_tracking(cfg, run_dir, state.get("run_id"), device)
    tracker.set_tags(checkpointer.notes)  # e.g. a corrupted checkpoint the resume passed over
    timer = PhaseTimer(device)
    meter = IntervalMeter(device, timer)
    if state.get("interval"):
        meter.load_state_dict(state["interval"])  # the partial interval before a stop: logged with the next point
    log = RunLog(tracker, run_dir, first_step=step, last_step=last_step)
    audit = data.OrderAudit.open(run_dir) if cfg.data.audit_order else None  # what each step trains on

    status, path = "finished", checkpointer.newest()
    try:
        while step < last_step:
            t0 = time.perf_counter()
            batch = loader.next_step()
            timer.add("data_wait", time.perf_counter() - t0)
            if audit is not None:
                audit.record(step, (k for mb in batch for k in mb["key"]))
            with timer.phase("to_device"):
                x = [data.normalize(mb["image"].to(device, non_blocking=True), mb.get("flip")) for mb in batch]
            meter.add(model.step(x, step, timer), images=t.batch_size)
            with timer.phase("ema"):
                decay = diffusion.ema_decay_at(images, t.batch_size, t.ema_decay, t.ema_warmup_images)
                with steps.gathered(model.generator, cfg.dist.zero_stage_g):
                    diffusion.ema_update(ema, model.generator, decay)
            before, step, images = images, step + 1, images + t.batch_size

            # Periodic work, by images. Every decision depends on counters all ranks share, or is ORed over them.
            stopping, final = dist.any_rank(stop.requested), step >= last_step
            if crossed(before, images, t.log_every_images) or final:
                counters = {f"data_{k}": float(v) for k, v in loader.stats().items()}
                log.train(step, images, {**meter.reduce(extra_sums=counters), **model.lrs(), "ema_decay": decay,
                                         "peak_memory_gb_max_rank": dist.max_over_ranks(peak_memory_gb(device))})
            if evaluator is not None and crossed(before, images, cfg.eval.every_images) and not final:
                with meter.paused():  # evaluation is not training time
                    log.eval(step, images, *evaluator.evaluate(ema, step))
            if final or stopping or crossed(before, images, cfg.checkpoint.every_images):
                extra = {"run_id": tracker.run_id, "interval": meter.state_dict() if stopping else None}
                with meter.paused():
                    path = checkpointer.save(step=step, images=images, engines=engines, ema=ema, loader=loader,
                                             extra=extra, reason="stop" if stopping else "final" if final else
                                             "interval")
                tracker.set_tags({"checkpoint": checkpointer.where(path)})
            if stopping:
                status = "stopped"
                dist.print0(f"stopped at step {step} on request; checkpoint written")
                break
        if status == "finished" and evaluator is not None:
            log.eval(step, images, *evaluator.evaluate(ema, step))
    except BaseException as e:
        tracker.close("FAILED", error=f"{type(e).__name__}: {e}")
        checkpointer.close()
        loader.close()
        raise
    finally:
        if audit is not None:
            audit.close()
    failed_uploads = checkpointer.close()
    loader.close()
    if failed_uploads:
        tracker.set_tags({"checkpoint_upload_failures": str(failed_uploads)})
    tracker.close("FINISHED" if status == "finished" else "KILLED")
    log.summary(status=status, step=step, checkpoint=path, ui=tracking.ui_hint(run_dir) if rank == 0 else "")
    dist.barrier()
    return status


def main(cfg: Recipe, stop: runtime.StopFlag | None = None) -> str:
    """Train `cfg` in this process (one rank): alone, under torchrun, srun or submitit. The stop flag replaces
    submitit's USR2 handler (no requeue from inside a signal handler); the launcher's death stops the run
    like a preemption; one trainer at a time per run folder (`runtime.RunLock`, held by rank 0)."""
    device = runtime.init_distributed(cfg.dist.backend)
    runtime.die_with_parent(signal.SIGTERM)
    cfg = with_run_folder(cfg)
    lock = runtime.RunLock(Path(cfg.run.dir))
    dist.on_rank0(lock.acquire)  # a second trainer of the folder: ConfigError naming the holder, every rank
    stop = (stop or runtime.StopFlag()).install()
    try:
        return training_loop(cfg, device=device, stop=stop)
    finally:
        stop.uninstall()
        lock.release()
