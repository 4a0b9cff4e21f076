"""DeepSpeed overhead of the real trainer vs a plain PyTorch training step, measured in the same run.

    python benchmarks/trainer_overhead.py [recipe=celebahq256] [batch=2] [steps=4] [zero=1] [threads=2] [rounds=3]

Both sides run one full iteration (D step with R1 on every step, G step, EMA) of the same models at the
same global batch on this machine's CPU: "plain" with torch.optim.Adam in one process, "trainer" through
`waveforge.train.training_loop` (two DeepSpeed engines, one rank, gloo) on synthetic shards. The first
iteration of each is warm-up and not counted; the trainer's time excludes its data wait (reported apart).
The two sides alternate for `rounds` rounds (this VM's speed drifts by +-15% between minutes, so one
plain run followed by one trainer run can differ by that much for no reason of theirs); the overhead is
the median of the per-round ratios. Prints seconds per iteration, images/s and the overhead ratio
(target: trainer / plain < 1.10).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from waveforge import cli, config, data, diffusion, models, runtime, train, wavelet

JOB_KEYS = {"batch": "global batch (default 2)", "steps": "timed iterations (default 4)",
            "zero": "ZeRO stage of both engines (default 1)", "threads": "torch threads (default 2)",
            "rounds": "alternating plain / trainer rounds (default 3)"}


def plain_steps(cfg: config.Recipe, images: torch.Tensor, steps: int) -> list[float]:
    torch.manual_seed(cfg.run.seed)
    G = models.build_generator(cfg.model, cfg.diffusion)
    D = models.build_discriminator(cfg.model, cfg.diffusion)
    ema = models.build_generator(cfg.model, cfg.diffusion).requires_grad_(False)
    sched = diffusion.make_schedule(cfg.diffusion)
    betas = (cfg.train.beta1, cfg.train.beta2)
    opt_g = torch.optim.Adam(G.parameters(), lr=cfg.train.lr_g, betas=betas)
    opt_d = torch.optim.Adam(D.parameters(), lr=cfg.train.lr_d, betas=betas)
    x0 = wavelet.to_wavelet(images)
    n = x0.shape[0]

    def frozen(*a: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return G(*a)

    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        D.requires_grad_(True)
        t, z = torch.randint(0, cfg.diffusion.num_timesteps, (n,)), torch.randn(n, cfg.model.nz)
        loss, _ = diffusion.d_loss(frozen, D, sched, x0, t, z, r1_gamma=cfg.train.r1_gamma, do_r1=True)
        opt_d.zero_grad(set_to_none=True)
        loss.backward()
        opt_d.step()
        D.requires_grad_(False)
        t, z = torch.randint(0, cfg.diffusion.num_timesteps, (n,)), torch.randn(n, cfg.model.nz)
        loss, _ = diffusion.g_loss(G, D, sched, x0, t, z, rec_weight=cfg.train.rec_weight)
        opt_g.zero_grad(set_to_none=True)
        loss.backward()
        opt_g.step()
        diffusion.ema_update(ema, G, cfg.train.ema_decay)
        times.append(time.perf_counter() - t0)
    return times[1:]


def main() -> None:
    args = cli.parse(sys.argv[1:], "trainer_overhead", __doc__, job_keys=JOB_KEYS, default_recipe="celebahq256")
    j = args.job
    batch, steps, zero = int(j.get("batch", 2)), int(j.get("steps", 4)), int(j.get("zero", 1))
    rounds = int(j.get("rounds", 3))
    torch.set_num_threads(int(j.get("threads", 2)))
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    work = Path(tempfile.mkdtemp(prefix="wf-overhead-"))
    res = args.cfg.model.resolution
    shards = work / "shards"
    data.make_shards("synthetic", str(shards), res, num_samples=64, samples_per_shard=1, progress=False)

    def recipe(run: str) -> config.Recipe:
        return config.load(args.cfg.recipe, [*args.overrides, f"run.dir={work / run}", f"data.url={shards}",
                                             f"train.batch_size={batch}", f"train.max_steps={steps + 1}",
                                             f"dist.zero_stage_g={zero}", f"dist.zero_stage_d={zero}",
                                             "dist.precision=fp32", "train.lazy_reg=1", "train.log_every_images=1",
                                             "tracking.enabled=false", "eval.every_images=0",
                                             "checkpoint.every_images=0", "data.num_workers=1",
                                             "dist.activation_checkpointing=false"])

    cfg = recipe("run-0")
    loader = data.ShardLoader(str(shards), global_batch=batch, rank=0, world=1, seed=0)
    images = data.normalize(loader.next_step()[0]["image"])
    loader.close()
    device = runtime.init_distributed("gloo")
    # the iteration itself: D and G forward/backward and optimizer steps, and the EMA (not the data wait, nor
    # the upload/normalisation of the batch, which the plain side does once before timing)
    phases = ("s_per_step_d_fwd_bwd", "s_per_step_d_optim", "s_per_step_g_fwd_bwd", "s_per_step_g_optim",
              "s_per_step_ema")
    plain_all, trainer_all, waits, ratios = [], [], [], []
    for r in range(rounds):
        plain = plain_steps(cfg, images, steps)
        run_cfg = recipe(f"run-{r}")
        train.training_loop(run_cfg, device=device, stop=runtime.StopFlag())
        rows = [json.loads(x) for x in (Path(run_cfg.run.dir) / "metrics.jsonl").read_text().splitlines()][1:]
        ds = [sum(row[k] for k in phases) for row in rows]
        waits += [row["s_per_step_data_wait"] for row in rows]
        plain_all += plain
        trainer_all += ds
        ratios.append(statistics.median(ds) / statistics.median(plain))
        print(f"round {r + 1}/{rounds}: plain {statistics.median(plain):.3f} s, trainer {statistics.median(ds):.3f} s, "
              f"ratio {ratios[-1]:.3f}", flush=True)
    p, d = statistics.median(plain_all), statistics.median(trainer_all)
    print(f"{cfg.recipe} {res}px, global batch {batch}, ZeRO-{zero} fp32, {torch.get_num_threads()} threads, "
          f"{rounds} rounds x {steps} iterations (D+R1, G, EMA):")
    print(f"  plain PyTorch   {p:8.3f} s/iteration  {batch / p:7.3f} images/s")
    print(f"  trainer (DS)    {d:8.3f} s/iteration  {batch / d:7.3f} images/s"
          f"  (+ data wait {statistics.median(waits):.3f} s)")
    print(f"  overhead ratio  {statistics.median(ratios):8.3f}  (median of the rounds' ratios "
          f"{', '.join(f'{x:.3f}' for x in ratios)}; target < 1.10)")
    runtime.shutdown()


if __name__ == "__main__":
    cli.run_main(main)
