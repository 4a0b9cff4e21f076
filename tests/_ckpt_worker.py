"""Toy two-engine GAN loop (G and D DeepSpeed engines) for the checkpoint tests. One rank per process.

    python tests/_ckpt_worker.py run_dir=DIR steps=N [save_every=K] [zero_g=2] [zero_d=2] [precision=bf16]
        [resume=auto|never|PATH|URL] [snap=3,6] [url=s3://...] [keep_last=2] [step_sleep=0.0]
        [pause_before_manifest=0.0] [background=1]

Launched by tests/test_checkpoint.py with RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT set. Writes
(rank 0) DIR/losses.jsonl (one line per finished step), DIR/events.jsonl (start/resume/done) and, at each
step listed in `snap` and right after a resume, DIR/snap-<label>.pt: every parameter's fp32 master value,
Adam moments, the 16-bit module weights, LR scheduler state and the EMA (full tensors, world-size free).
Like the real trainer, the RNG is re-seeded every step from (seed, step, rank, phase).
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from pathlib import Path

import torch

from waveforge import checkpoint, dist
from waveforge.config import StorageConfig


def parse(argv: list[str]) -> dict[str, str]:
    return dict(a.split("=", 1) for a in argv)


def make_g() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(8, 33), torch.nn.LeakyReLU(0.2), torch.nn.Linear(33, 33),
                               torch.nn.LeakyReLU(0.2), torch.nn.Linear(33, 16))


def make_d() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(16, 29), torch.nn.LeakyReLU(0.2), torch.nn.Linear(29, 1))


def ds_config(stage: int, precision: str, lr: float, world: int, patch: dict) -> dict:
    cfg = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "train_batch_size": 4 * world,
        "optimizer": {"type": "Adam", "params": {"lr": lr, "betas": [0.5, 0.9], "torch_adam": True}},
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": precision == "bf16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    cfg.update(patch)
    return cfg


def seed(step: int, rank: int, phase: int) -> None:
    torch.manual_seed(1_000_003 * step + 7919 * rank + phase)


def snapshot(engines: dict, ema: torch.nn.Module, path: Path | None) -> None:
    """Collective: full (unsharded) training state; rank 0 writes it to `path`."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    snap: dict = {}
    for tag, eng in engines.items():
        opt = eng.optimizer
        if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-1/2 link Adam state views lazily
            opt._hp_optimizer_states_linked = False
            opt._lazy_init_hp_params_optimizer_state()
        for name, p in eng.module.named_parameters():
            snap[f"{tag}.fp32.{name}"] = safe_get_full_fp32_param(p).clone()
            snap[f"{tag}.exp_avg.{name}"] = safe_get_full_optimizer_state(p, "exp_avg").clone()
            snap[f"{tag}.exp_avg_sq.{name}"] = safe_get_full_optimizer_state(p, "exp_avg_sq").clone()
            with deepspeed.zero.GatheredParameters([p], enabled=hasattr(p, "ds_id")):
                snap[f"{tag}.module.{name}"] = p.detach().clone()
        snap[f"{tag}.lr"] = torch.tensor(eng.get_lr())
        snap[f"{tag}.sched_epoch"] = torch.tensor(eng.lr_scheduler.last_epoch)
    for name, t in ema.state_dict().items():
        snap[f"ema.{name}"] = t.clone()
    if dist.rank() == 0 and path is not None:
        torch.save(snap, path)


def main() -> None:
    import deepspeed

    a = parse(sys.argv[1:])
    run_dir = Path(a["run_dir"])
    steps = int(a["steps"])
    save_every = int(a.get("save_every", 0))
    precision = a.get("precision", "bf16")
    snap_steps = {int(s) for s in a.get("snap", "").split(",") if s}
    url = a.get("url", "")
    keep_last = int(a.get("keep_last", 2))
    step_sleep = float(a.get("step_sleep", 0))
    storage = StorageConfig(endpoint_url=os.environ.get("TEST_S3_ENDPOINT", ""))
    pause = float(a.get("pause_before_manifest", 0))
    saver = checkpoint.Saver(background=a.get("background", "1") == "1")  # like the trainer's default
    if pause:  # a save sleeps after every rank wrote its shards, RNG and state, before hashing and the manifest
        from waveforge.checkpoint import writer

        list_files = writer._list_files

        def slow_list_files(folder: Path) -> list[str]:
            time.sleep(pause)
            return list_files(folder)

        writer._list_files = slow_list_files

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.rank(), dist.world()
    run_dir.mkdir(parents=True, exist_ok=True)

    def event(**kw: object) -> None:
        if rank == 0:
            with open(run_dir / "events.jsonl", "a") as f:
                f.write(json.dumps({"pid": os.getpid(), "world": world, **kw}) + "\n")

    torch.manual_seed(0)
    G, D = make_g(), make_d()
    ema = copy.deepcopy(G).requires_grad_(False)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32

    ckpt = checkpoint.find_resume(run_dir, a.get("resume", "auto"), url=url, storage=storage)
    patch = checkpoint.ds_config_patch(ckpt, world) if ckpt is not None else {}
    engines = {}
    for tag, net, lr, stage in (("G", G, 2e-3, int(a.get("zero_g", 2))), ("D", D, 1e-3, int(a.get("zero_d", 2)))):
        engines[tag], *_ = deepspeed.initialize(
            model=net, model_parameters=list(net.parameters()), config=ds_config(stage, precision, lr, world, patch),
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + 0.1 * s)))
    g_eng, d_eng = engines["G"], engines["D"]
    uploader = checkpoint.Uploader(url, storage, keep_last=keep_last) if url and rank == 0 else None

    step = 0
    if ckpt is not None:
        state = checkpoint.load(ckpt, engines, ema)
        step = int(state["step"])
        assert state["images"] == step * 4 * state["world"], state
        event(kind="resume", step=step, ckpt=str(ckpt))
        snapshot(engines, ema, run_dir / f"snap-resumed-{step}.pt")
    else:
        event(kind="start", step=0)

    while step < steps:
        seed(step, rank, 0)
        real = torch.randn(4, 16) * 0.5 + 1.0
        z = torch.randn(4, 8)
        with torch.no_grad():
            fake = g_eng.module(z.to(dtype))
        loss_d = (torch.nn.functional.softplus(-d_eng(real.to(dtype)).float()).mean()
                  + torch.nn.functional.softplus(d_eng(fake).float()).mean())
        d_eng.backward(loss_d)
        d_eng.step()

        seed(step, rank, 1)
        z = torch.randn(4, 8)
        d_eng.module.requires_grad_(False)
        loss_g = torch.nn.functional.softplus(-d_eng.module(g_eng(z.to(dtype))).float()).mean()
        g_eng.backward(loss_g)
        g_eng.step()
        d_eng.module.requires_grad_(True)

        with deepspeed.zero.GatheredParameters(list(g_eng.module.parameters()),
                                               enabled=g_eng.zero_optimization_stage() == 3):
            with torch.no_grad():
                for pe, pg in zip(ema.parameters(), g_eng.module.parameters()):
                    pe.lerp_(pg.detach().float(), 0.1)
        step += 1
        losses = torch.stack([loss_d.detach().float(), loss_g.detach().float()]).double()
        losses = dist.all_reduce_sum(losses) / world
        if rank == 0:
            with open(run_dir / "losses.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "pid": os.getpid(), "loss_d": losses[0].item(),
                                    "loss_g": losses[1].item()}) + "\n")
        if save_every and (step % save_every == 0 or step == steps):
            state = {"step": step, "images": step * 4 * world, "world": world, "loader": {"pos": step},
                     "recipe": {"model": {"nf": 8}, "diffusion": {"num_timesteps": 2}}, "run_id": "toy"}
            saver.save(run_dir, step, engines, ema, state, keep_last=keep_last, uploader=uploader,
                       wait=step == steps)  # the last save is published before the job ends
            event(kind="saved", step=step)
        if step in snap_steps:
            snapshot(engines, ema, run_dir / f"snap-{step}.pt")
        if step_sleep:
            time.sleep(step_sleep)
    saver.close()
    errors = uploader.wait() if uploader is not None else 0
    event(kind="done", step=step, upload_errors=errors)
    dist.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
