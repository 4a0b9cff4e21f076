"""The training loop: a generator and a discriminator DeepSpeed engine, one flat function.

Reading order: `main` (launcher-independent start) -> `training_loop` (everything a run does, top to
bottom) -> `waveforge.diffusion.d_loss / g_loss` (the losses). The EDM family (model.family=edm) runs the
same loop with one engine, "G" holding the denoiser, and `waveforge.edm.loss`. Rules that keep two ZeRO
engines correct (verified in ../shared/notes/stack-facts.md):
- D is frozen (`requires_grad_(False)`) during G's step, else ZeRO-2 reports "already been reduced";
- wherever a graph runs through D outside `d_engine.backward` (R1's double backward, G's adversarial
  loss) D is called as `d_engine.module`, not `d_engine`;
- D's real loss, fake loss and lazy R1 are ONE scalar and ONE `d_engine.backward` per micro-batch.
Determinism: the random draws of step s on rank r come from seeds derived from (seed, s, r, phase), so a
run is a function of its recipe and seed, and a resumed run continues exactly.
"""

from __future__ import annotations

import copy
import json
import math
import os
import resource
import time
from contextlib import nullcontext
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from waveforge import checkpoint, config, data, diffusion, dist, edm, launch, models, tracking, wavelet
from waveforge.config import Recipe

PHASE_D, PHASE_G = 0, 1


# --------------------------------------------------------------------------------------------------
# Small pieces the loop uses
# --------------------------------------------------------------------------------------------------


def resolve_run_dir(cfg: Recipe) -> Path:
    """cfg.run.dir, else runs/<recipe>/<run name>; the name (a UTC time) is chosen once, on rank 0."""
    if not cfg.run.name:  # the same name on every rank (each rank's clock may tick differently)
        cfg.run.name = dist.broadcast_object(datetime.now(UTC).strftime("%Y%m%d-%H%M%S"))
    return launch.run_folder(cfg)


def step_seed(seed: int, step: int, rank: int, phase: int) -> int:
    """A 63-bit seed that is a pure function of (seed, step, rank, phase)."""
    ss = np.random.SeedSequence([seed, step, rank, phase])
    return int(ss.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def seed_phase(seed: int, step: int, rank: int, phase: int) -> None:
    torch.manual_seed(step_seed(seed, step, rank, phase))


def lr_factor(step: int, total_steps: int, lr: float, lr_min: float, schedule: str, warmup_steps: int = 0) -> float:
    """Multiplier of the base lr at `step`: cosine from lr down to lr_min over the run (reference: per epoch),
    or constant; times a linear ramp over the first `warmup_steps` (EDM's lr rampup)."""
    ramp = min((step + 1) / warmup_steps, 1.0) if warmup_steps > 0 else 1.0
    if schedule == "constant" or total_steps <= 0:
        return ramp
    progress = min(step / total_steps, 1.0)
    return ramp * (lr_min + (lr - lr_min) * 0.5 * (1.0 + math.cos(math.pi * progress))) / lr


def ds_config(*, zero_stage: int, precision: str, lr: float, betas: tuple[float, float], micro_batch: int,
              grad_accum: int, world: int, grad_clip: float, params: int) -> dict[str, Any]:
    """One engine's DeepSpeed config for a model of `params` parameters. Adam with torch's implementation
    (no fused-op compile on CPU). ZeRO's gradient-reduction bucket is sized to the model: DeepSpeed's
    default (5e8 elements) is 10x these models and costs ~0.9 GiB of GPU memory per engine for nothing
    (measured on an H100: the celebahq256 discriminator's engine peaks at 1.31 GiB with it, 0.46 without)."""
    bucket = min(500_000_000, -(-params // 64) * 64)  # a multiple of NCCL's start alignment
    cfg: dict[str, Any] = {
        "train_batch_size": micro_batch * grad_accum * world,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "optimizer": {"type": "Adam", "params": {"lr": lr, "betas": list(betas), "eps": 1e-8,
                                                 "weight_decay": 0.0, "torch_adam": True}},
        "zero_optimization": {"stage": zero_stage, "reduce_bucket_size": bucket, "allgather_bucket_size": bucket},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "gradient_clipping": grad_clip,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    return cfg


def engine_dtype(precision: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (host RSS)


def crossed(before: int, after: int, every: int) -> bool:
    """True when an image counter moving from `before` to `after` passes a multiple of `every`."""
    return every > 0 and after // every > before // every


# --------------------------------------------------------------------------------------------------
# Entry
# --------------------------------------------------------------------------------------------------


def main(cfg: Recipe, stop: launch.StopFlag | None = None) -> str:
    """Train `cfg` in this process (one rank). Returns "finished", or "stopped" after a stop request
    (checkpoint written: the launcher requeues; `stop.signals` says which signals came). Works alone, under
    torchrun, srun and submitit."""
    device = launch.init_distributed(cfg.dist.backend)
    stop = (stop or launch.StopFlag()).install()  # replaces submitit's USR2 handler: no requeue from a handler
    try:
        return training_loop(cfg, device=device, stop=stop)
    finally:
        stop.uninstall()


def training_loop(cfg: Recipe, *, device: torch.device, stop: launch.StopFlag) -> str:
    import deepspeed

    rank, world = dist.rank(), dist.world()
    grad_accum = config.check_resources(cfg, world)  # global batch = micro x accum x world
    micro = cfg.train.batch_size // (world * grad_accum)
    total_steps = cfg.train.total_images // cfg.train.batch_size
    last_step = min(total_steps, cfg.train.max_steps) if cfg.train.max_steps else total_steps
    run_dir = resolve_run_dir(cfg)
    if rank == 0:
        config.save(cfg, run_dir / "recipe.yaml")
    dist.print0(f"run folder: {run_dir}\nranks: {world} x micro-batch {micro} x accumulation {grad_accum} "
                f"= global batch {cfg.train.batch_size}; {last_step} steps")

    if cfg.eval.every_images:  # fail now, not hours in: the feature extractor (Inception weights) must load
        from waveforge import evaluate

        error = None
        if rank == 0:  # first (a download lands once), then the others from the cache
            try:
                evaluate.cached_feature_extractor(cfg.eval, device)
            except Exception as e:  # noqa: BLE001 - raised on every rank below
                error = str(e)
        error = dist.broadcast_object(error)
        if error:
            raise config.ConfigError(f"eval.every_images={cfg.eval.every_images} needs FID features: {error}")
        if rank != 0:
            evaluate.cached_feature_extractor(cfg.eval, device)

    # Data: the seeded, resumable stream of global batches (this rank's share).
    data.ensure_dataset(cfg)
    # On a GPU the loader's workers leave the random flip to normalize() there (free on the GPU, ~5% of the
    # workers' decode time on their CPUs): the same batches either way.
    loader = data.from_config(cfg, rank=rank, world=world, grad_accum=grad_accum, defer_flip=device.type == "cuda")

    # Models: identical initialisation on every rank (seeded), an fp32 EMA copy of G. The EDM family
    # trains one network, the denoiser, in G's place (same EMA, checkpoint and export path).
    edm_family = cfg.model.family == "edm"
    torch.manual_seed(cfg.run.seed)
    G = models.build_network(cfg.model, cfg.diffusion)
    nets = {"G": (G, cfg.train.lr_g, cfg.dist.zero_stage_g)}
    if not edm_family:
        nets["D"] = (models.build_discriminator(cfg.model, cfg.diffusion), cfg.train.lr_d, cfg.dist.zero_stage_d)
    if cfg.dist.activation_checkpointing:
        (G.net if edm_family else G).set_activation_checkpointing(True)
    ema = copy.deepcopy(G).eval().requires_grad_(False).to(device)
    sched = diffusion.make_schedule(cfg.diffusion, device)

    # Resume plan first: a checkpoint from another world size needs DeepSpeed's universal format.
    ckpt = checkpoint.find_resume(run_dir, cfg.run.resume, url=cfg.checkpoint.url, storage=cfg.storage)
    patch = checkpoint.ds_config_patch(ckpt, world) if ckpt is not None else {}
    common = dict(precision=cfg.dist.precision, betas=(cfg.train.beta1, cfg.train.beta2), micro_batch=micro,
                  grad_accum=grad_accum, world=world, grad_clip=cfg.train.grad_clip)
    warmup_steps = cfg.train.lr_warmup_images // cfg.train.batch_size
    engines = {}
    for name, (net, lr, stage) in nets.items():
        ds_cfg = {**ds_config(zero_stage=stage, lr=lr, params=models.count_params(net), **common), **patch}

        def schedule(opt: torch.optim.Optimizer, lr: float = lr) -> torch.optim.lr_scheduler.LambdaLR:
            return torch.optim.lr_scheduler.LambdaLR(
                opt, lambda s: lr_factor(s, total_steps, lr, cfg.train.lr_min, cfg.train.lr_schedule, warmup_steps))

        engines[name], *_ = deepspeed.initialize(model=net, model_parameters=[p for p in net.parameters()],
                                                 config=ds_cfg, lr_scheduler=schedule)
    g_engine, d_engine = engines["G"], engines.get("D")
    stages = {name: stage for name, (_, _, stage) in nets.items()}
    dtype = engine_dtype(cfg.dist.precision)

    state: dict[str, Any] = {"step": 0, "images": 0, "loader": None, "run_id": None}
    if ckpt is not None:
        state = checkpoint.load(ckpt, engines, ema)
        saved = config.from_dict(state["recipe"])
        changed = config.diff_training_fields(saved, cfg)
        if changed:
            raise config.ConfigError(f"resuming {ckpt} with a recipe that changes training: {'; '.join(changed)}. "
                                     "Start a new run (another run.dir) or pass resume=never.")
        loader.load_state_dict(state["loader"])
        # Integrity: the loaded weights must be the saved ones (also after resharding to another world size).
        loaded = weights_checksum(engines, stages)
        saved_sum = state.get("weights_checksum")
        if saved_sum is not None and abs(loaded - saved_sum) > 1e-12 * max(1.0, abs(saved_sum)):
            raise RuntimeError(f"checkpoint {ckpt} loaded different weights than it saved "
                               f"(checksum {loaded!r} != {saved_sum!r}); refusing to train on them")
        dist.print0(f"resumed from {ckpt} at step {state['step']} ({state['images']} images; "
                    f"saved at world size {state.get('world', '?')}, now {world}; weights checksum verified)")
    step, images = int(state["step"]), int(state["images"])

    tags = {"git_commit": launch.code_version(), "waveforge_version": _version(), "world_size": str(world),
            "nodes": os.environ.get("SLURM_JOB_NUM_NODES", "1"),
            "gpus": str(world if device.type == "cuda" else 0)}
    if os.environ.get("SLURM_JOB_ID"):
        tags["slurm_job_id"] = os.environ["SLURM_JOB_ID"]
    # Tracking: rank 0 opens (or continues) the MLflow run; every rank learns its id, or the error.
    tracker: Any = tracking.NullTracker()
    error = None
    if rank == 0:
        try:
            tracker = tracking.open_tracker(cfg, run_dir, state.get("run_id") or tracking.read_run_id(run_dir),
                                            tags, rank, system_metrics=cfg.tracking.enabled)
        except Exception as e:  # noqa: BLE001 - re-raised on every rank below
            error = f"{type(e).__name__}: {e}"
    run_id, error = dist.broadcast_object((getattr(tracker, "run_id", None), error))
    if error:
        raise RuntimeError(f"tracking could not start ({tracking.tracking_uri(cfg, run_dir)}): {error}")
    # per-node system metrics: rank 0's tracker covers its node; the first rank of every other node adds its own
    node_monitor = tracking.start_node_monitor(cfg, run_dir, run_id) if rank != 0 and dist.local_rank() == 0 else None
    if rank == 0 and ckpt is None:
        tracker.log_artifact(run_dir / "recipe.yaml")

    uploader = (checkpoint.Uploader(cfg.checkpoint.url, cfg.storage, keep_last=cfg.checkpoint.remote_keep_last)
                if cfg.checkpoint.url and rank == 0 else None)
    zero3 = cfg.dist.zero_stage_g == 3

    def gen(x: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return g_engine(x.to(dtype), t, z.to(dtype)).float()

    def disc(x_t: torch.Tensor, t: torch.Tensor, x_tp1: torch.Tensor) -> torch.Tensor:
        return d_engine.module(x_t.to(dtype), t, x_tp1.to(dtype)).float()

    def gen_frozen(x: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return gen(x, t, z)

    def save(reason: str) -> Path:
        st = {"step": step, "images": images, "loader": loader.state_dict(), "run_id": run_id, "world": world,
              "weights_checksum": weights_checksum(engines, stages),
              "recipe": config.to_dict(cfg), "code_version": launch.code_version(), "reason": reason}
        path = checkpoint.save(run_dir, step, engines, ema, st, keep_last=cfg.checkpoint.keep_last,
                               milestone_every_images=cfg.checkpoint.milestone_every_images,
                               url=cfg.checkpoint.url, storage=cfg.storage, uploader=uploader)
        if rank == 0:
            tracker.set_tags({"checkpoint": str(cfg.checkpoint.url or path)})
        return path

    # Interval accumulators (summed on this rank, reduced over ranks once per interval).
    acc: dict[str, float] = {}
    timing = {"data": 0.0, "fwd_bwd": 0.0, "optim": 0.0}

    def gan_step(images_mb: list[torch.Tensor]) -> dict[str, float]:
        """One diffusion-GAN iteration on this rank's micro-batches (images in [-1, 1]): D step, then G step."""
        x0s = [wavelet.to_wavelet(img) for img in images_mb]
        do_r1 = cfg.train.r1_gamma > 0 and step % cfg.train.lazy_reg == 0

        # D step: real vs fake (from a frozen G), lazy R1; one backward per micro-batch.
        seed_phase(cfg.run.seed, step, rank, PHASE_D)
        for x0 in x0s:
            t = torch.randint(0, cfg.diffusion.num_timesteps, (x0.shape[0],), device=device)
            z = torch.randn(x0.shape[0], cfg.model.nz, device=device)
            loss_d, st_d = diffusion.d_loss(gen_frozen, disc, sched, x0, t, z, r1_gamma=cfg.train.r1_gamma,
                                            do_r1=do_r1)
            d_engine.backward(loss_d)
            t2 = time.perf_counter()
            d_engine.step()
            timing["optim"] += time.perf_counter() - t2
            _add(acc, st_d, len(x0s))
        grad_norm_d = _grad_norm(d_engine)

        # G step: D frozen and called through .module; adversarial + L1 reconstruction.
        seed_phase(cfg.run.seed, step, rank, PHASE_G)
        d_engine.module.requires_grad_(False)
        for x0 in x0s:
            t = torch.randint(0, cfg.diffusion.num_timesteps, (x0.shape[0],), device=device)
            z = torch.randn(x0.shape[0], cfg.model.nz, device=device)
            loss_g, st_g = diffusion.g_loss(gen, disc, sched, x0, t, z, rec_weight=cfg.train.rec_weight)
            g_engine.backward(loss_g)
            t2 = time.perf_counter()
            g_engine.step()
            timing["optim"] += time.perf_counter() - t2
            _add(acc, st_g, len(x0s))
        d_engine.module.requires_grad_(True)
        return {"grad_norm_d": grad_norm_d, "grad_norm_g": _grad_norm(g_engine)}

    interval_start, interval_images, interval_steps = time.perf_counter(), 0, 0
    status = "finished"
    try:
        while step < last_step:
            # ---------------------------------------------------------------- one training iteration
            t0 = time.perf_counter()
            micro_batches = loader.next_step()
            images_mb = [data.normalize(mb["image"].to(device, non_blocking=True), mb.get("flip"))
                         for mb in micro_batches]
            t1 = time.perf_counter()
            timing["data"] += t1 - t0

            if edm_family:  # --------------------------------------- the EDM family: one denoising loss
                seed_phase(cfg.run.seed, step, rank, PHASE_G)
                for x0 in images_mb:
                    loss, st = edm.loss(g_engine, x0, cfg.diffusion)
                    g_engine.backward(loss)
                    t2 = time.perf_counter()
                    g_engine.step()
                    timing["optim"] += time.perf_counter() - t2
                    _add(acc, st, len(images_mb))
                grad_norms = {"grad_norm": _grad_norm(g_engine)}
            else:  # ------------------------------------------------------- the diffusion GAN: D step, G step
                grad_norms = gan_step(images_mb)

            # EMA of G (gathered from ZeRO-3 shards when needed).
            decay = diffusion.ema_decay_at(images, cfg.train.batch_size, cfg.train.ema_decay,
                                           cfg.train.ema_warmup_images)
            gather = deepspeed.zero.GatheredParameters(list(g_engine.module.parameters())) if zero3 else nullcontext()
            with gather:
                diffusion.ema_update(ema, g_engine.module, decay)

            before = images
            step += 1
            images += cfg.train.batch_size
            timing["fwd_bwd"] += time.perf_counter() - t1
            _add(acc, grad_norms, 1)
            interval_images += cfg.train.batch_size
            interval_steps += 1

            # ---------------------------------------------------------------- periodic work, by images
            # Every decision below depends only on counters every rank has, or is ORed over ranks.
            stopping = dist.any_rank(stop.requested)
            final = step >= last_step
            if crossed(before, images, cfg.train.log_every_images) or final or stopping:
                elapsed = time.perf_counter() - interval_start
                timing["fwd_bwd"] -= timing["optim"]  # forward + backward only
                metrics = _reduce_metrics(acc, interval_steps, world)
                metrics.update({
                    "lr_g": g_engine.get_lr()[0], **({"lr_d": d_engine.get_lr()[0]} if d_engine else {}),
                    "images_per_s": interval_images / max(elapsed, 1e-9),
                    "s_per_step": elapsed / max(interval_steps, 1),
                    **{f"s_per_step_{k}": v / max(interval_steps, 1) for k, v in timing.items()},
                    "peak_memory_gb_max_rank": dist.max_over_ranks(peak_memory_gb(device)),
                    "images_seen": float(images), "ema_decay": decay,
                    **{f"data_{k}": float(v) for k, v in loader.stats().items()},
                })
                if rank == 0:
                    tracker.log_metrics(metrics, step=step)
                    with open(run_dir / "metrics.jsonl", "a") as f:  # a local copy, readable without MLflow
                        f.write(json.dumps({"step": step, **metrics}) + "\n")
                shown = ("loss", "d_loss", "g_loss", "r1", "images_per_s")  # the EDM loss, the GAN losses
                dist.print0(f"step {step:>7d}  img {images:>10d}  " + "  ".join(
                    f"{k} {metrics[k]:.4g}" for k in shown if k in metrics))
                acc.clear()
                timing = dict.fromkeys(timing, 0.0)
                interval_start, interval_images, interval_steps = time.perf_counter(), 0, 0
            if crossed(before, images, cfg.eval.every_images) and not final:
                _evaluate(cfg, ema, device, tracker, run_dir, step, images, rank, world)
            if final or stopping or crossed(before, images, cfg.checkpoint.every_images):
                save("stop" if stopping else "final" if final else "interval")
            if stopping:
                status = "stopped"
                dist.print0(f"stopped at step {step} on request; checkpoint written")
                break
        if status == "finished" and cfg.eval.every_images and step >= last_step:
            _evaluate(cfg, ema, device, tracker, run_dir, step, images, rank, world)
    except BaseException as e:
        if rank == 0:
            tracker.close("FAILED", error=f"{type(e).__name__}: {e}")
        if uploader is not None:
            uploader.wait()
        loader.close()
        raise
    if node_monitor is not None:
        node_monitor.finish()
    failed_uploads = uploader.wait() if uploader is not None else 0
    loader.close()
    if rank == 0:
        if failed_uploads:
            print(f"WARNING: {failed_uploads} checkpoint upload(s) to {cfg.checkpoint.url} failed; the local "
                  f"checkpoints in {run_dir / 'checkpoints'} are complete", flush=True)
            tracker.set_tags({"checkpoint_upload_failures": str(failed_uploads)})
        tracker.close("FINISHED" if status == "finished" else "KILLED")
    dist.barrier()
    return status


# --------------------------------------------------------------------------------------------------
# Helpers of the loop
# --------------------------------------------------------------------------------------------------


def weights_checksum(engines: dict[str, Any], stages: dict[str, int]) -> float:
    """float64 sum of every parameter of every engine (gathered from ZeRO-3 shards): identical on every rank."""
    import deepspeed

    total = 0.0
    for name, engine in sorted(engines.items()):
        stage = stages[name]
        params = list(engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params) if stage == 3 else nullcontext():
            total += float(sum(p.detach().double().sum() for p in params))
    return total


def _version() -> str:
    from waveforge import __version__

    return __version__


def _add(acc: dict[str, float], stats: dict[str, Any], n: int) -> None:
    """Accumulate per-micro-batch stats as the mean over the step's micro-batches."""
    for k, v in stats.items():
        acc[k] = acc.get(k, 0.0) + float(v) / n


def _grad_norm(engine: Any) -> float:
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else float("nan")


def _reduce_metrics(acc: dict[str, float], steps: int, world: int) -> dict[str, float]:
    """Mean over ranks and interval steps, in one float64 all-reduce (same key order on every rank)."""
    keys = sorted(acc)
    vec = torch.tensor([acc[k] for k in keys], dtype=torch.float64)
    vec = dist.all_reduce_sum(vec) / (world * max(steps, 1))
    return dict(zip(keys, vec.tolist()))


def _evaluate(cfg: Recipe, ema: torch.nn.Module, device: torch.device, tracker: Any, run_dir: Path,
              step: int, images: int, rank: int, world: int) -> None:
    """Periodic evaluation with the EMA generator (or denoiser): fixed-seed grid, sampling speed, FID/KID."""
    from waveforge import evaluate

    filt = edm.noise_filter(cfg, ema, device, run_dir) if cfg.model.family == "edm" else None
    generate = evaluate.generator_fn(ema, cfg, device, noise_filter=filt)  # seed-indexed, as jobs/evaluate.py
    metrics: dict[str, float] = {}
    if rank == 0:
        grid = evaluate.make_grid(generate(list(range(cfg.eval.grid_size))),
                                  nrow=int(math.ceil(math.sqrt(cfg.eval.grid_size))))
        (run_dir / "samples").mkdir(parents=True, exist_ok=True)
        grid.save(run_dir / "samples" / f"grid-{step:09d}.png")
        tracker.log_image(grid, key="samples", step=step)
        speed = evaluate.sampling_speed(lambda: generate(list(range(cfg.eval.batch_size))), cfg.eval.batch_size,
                                        repeats=2)
        metrics.update({f"sampling_{k}": v for k, v in speed.items()})
    result = evaluate.evaluate_generator(cfg, generate, rank=rank, world=world, device=device)
    metrics.update(result)
    if rank == 0:
        named = {f"eval_{k}" if not k.startswith(("sampling_", "eval_")) else k: v for k, v in metrics.items()}
        tracker.log_metrics(named, step=step)
        with open(run_dir / "metrics.jsonl", "a") as f:  # next to the training metrics, readable without MLflow
            f.write(json.dumps({"step": step, "images_seen": float(images), **named}) + "\n")
        dist.print0(f"eval at step {step} ({images} images): " + "  ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    dist.barrier()
