"""GPU memory of a recipe's training steps, measured, next to jobs/plan.py's estimate (needs a CUDA GPU).

    python benchmarks/gpu_memory.py recipe=celebahq1024 [batch=4] [precision=bf16]

Builds the recipe's full-size G and D on the GPU in the training dtype (as a DeepSpeed bf16 engine holds
them; activation checkpointing as the recipe says) and measures the peak of allocated memory above the
models during one D step with R1 (`diffusion.d_loss` + backward) and one G step (`diffusion.g_loss` +
backward), each the second of two runs; prints them next to `plan.activation_bytes` for the same per-GPU
batch, and the ratio. Then one DeepSpeed engine (the discriminator, ZeRO-1 and ZeRO-2, one rank) with
`steps.ds_config`'s reduction bucket and with DeepSpeed's default one: its peak over two steps against
`plan.state_bytes` (inputs at most 128x128, so that activations add little). Checked on an H100
(README, "Checked on a GPU").
"""

from __future__ import annotations

import os
import sys

import torch

from waveforge import cli, config, plan
from waveforge.config import Recipe
from waveforge.diffusion import d_loss, g_loss, make_schedule
from waveforge.models import build_discriminator, build_generator, count_params

GIB = 2**30
JOB_KEYS = {"batch": "per-GPU batch (default: the recipe's micro-batch, as jobs/plan.py prints it)",
            "precision": "bf16 (default) or fp32"}


def step_peaks(cfg: Recipe, batch: int, dtype: torch.dtype, dev: torch.device) -> dict[str, float]:
    """Peak allocated bytes above the resident models of the D (R1) step and of the G step."""
    G = build_generator(cfg.model, cfg.diffusion).to(dev, dtype)
    D = build_discriminator(cfg.model, cfg.diffusion).to(dev, dtype)
    if cfg.dist.activation_checkpointing:
        G.set_activation_checkpointing(True)
    sched = make_schedule(cfg.diffusion, dev)
    r = cfg.model.resolution // 2
    gen = torch.Generator(device=dev).manual_seed(0)
    x0 = (torch.rand(batch, 4 * cfg.model.channels, r, r, device=dev, generator=gen) - 0.5).to(dtype)
    t = torch.randint(0, sched.num_timesteps, (batch,), device=dev, generator=gen)
    z = torch.randn(batch, cfg.model.nz, device=dev, generator=gen).to(dtype)
    peaks: dict[str, float] = {}
    for phase in ("d_step", "g_step") * 2:  # the second run of each is kept (allocator warmed up)
        for p in list(G.parameters()) + list(D.parameters()):
            p.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        if phase == "d_step":
            D.requires_grad_(True)
            G.requires_grad_(False)
            loss, _ = d_loss(G, D, sched, x0, t, z, cfg.train.r1_gamma, do_r1=True)
        else:
            D.requires_grad_(False)
            G.requires_grad_(True)
            loss, _ = g_loss(G, D, sched, x0, t, z, cfg.train.rec_weight)
        loss.backward()
        del loss
        torch.cuda.synchronize()
        peaks[phase] = float(torch.cuda.max_memory_allocated() - base)
    return peaks


def engine_peaks(cfg: Recipe, precision: str, dev: torch.device) -> None:
    """The discriminator's DeepSpeed engine: peak over two steps, bucket sized to the model vs the default."""
    import deepspeed

    from waveforge.train import ds_config

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl", verbose=False)
    r = min(cfg.model.resolution // 2, 128)  # small inputs: the peak is the engine's states and buffers
    for stage in (1, 2):
        for sized in (True, False):
            torch.manual_seed(0)
            D = build_discriminator(cfg.model, cfg.diffusion)
            n = count_params(D)
            c = ds_config(zero_stage=stage, precision=precision, lr=1e-4, betas=(0.5, 0.9), micro_batch=2,
                          grad_accum=1, world=1, grad_clip=0.0, params=n)
            if not sized:
                c["zero_optimization"] = {"stage": stage}  # DeepSpeed's default buckets (5e8 elements)
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            engine, *_ = deepspeed.initialize(model=D, model_parameters=list(D.parameters()), config=c)
            dtype = next(engine.module.parameters()).dtype
            x = torch.randn(2, 4 * cfg.model.channels, r, r, device=dev, dtype=dtype)
            for _ in range(2):
                loss = engine(x, torch.zeros(2, dtype=torch.long, device=dev), x).float().mean()
                engine.backward(loss)
                engine.step()
            torch.cuda.synchronize()
            planned = sum(plan.state_bytes(n, stage, precision, 1).values())
            print(f"  D engine ZeRO-{stage}, bucket {'sized to the model' if sized else 'DeepSpeed default'}: peak "
                  f"{(torch.cuda.max_memory_allocated() - base) / GIB:.2f} GiB with a batch-2 step at {r}x{r} "
                  f"(states + bucket by plan {planned / GIB:.2f} GiB)", flush=True)
            del engine, D, x, loss
            torch.cuda.empty_cache()


def main() -> None:
    a = cli.parse(sys.argv[1:], "gpu_memory", __doc__.split("\n\n")[0], job_keys=JOB_KEYS,
                  default_recipe="celebahq256")
    cfg = a.cfg
    if not torch.cuda.is_available():
        cli.fail("gpu_memory measures CUDA memory: no CUDA GPU on this machine (jobs/plan.py gives the estimate)")
    precision = str(a.job.get("precision", "bf16"))
    if precision not in ("bf16", "fp32"):
        cli.fail(f"precision={precision}: expected bf16 or fp32")
    if cfg.model.family != "wavediff":
        cli.fail(f"recipe {cfg.recipe}: gpu_memory measures the GAN's D and G steps (model.family=wavediff)")
    world = config.world_size(cfg)  # the per-GPU batch as jobs/plan.py and the trainer derive it
    config.check_resources(cfg, world)
    micro = config.micro_batch(cfg, world)
    batch = int(a.job.get("batch", micro))
    dev = torch.device("cuda")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    cost = plan.measure(cfg)
    est = plan.activation_bytes(cost, batch, precision, cfg.dist.activation_checkpointing)
    got = step_peaks(cfg, batch, dtype, dev)
    print(f"recipe {cfg.recipe}: per-GPU batch {batch}, {precision}, activation checkpointing "
          f"{'on' if cfg.dist.activation_checkpointing else 'off'}, {torch.cuda.get_device_name()}")
    for phase in ("d_step", "g_step"):
        print(f"  {phase}: measured {got[phase] / GIB:.2f} GiB, plan {est[phase] / GIB:.2f} GiB "
              f"(measured / plan {got[phase] / est[phase]:.2f})", flush=True)
    engine_peaks(cfg, precision, dev)


if __name__ == "__main__":
    cli.run_main(main)
