"""One training iteration per model family, on DeepSpeed engines: `GanStep` (WaveDiff: D step, then G step)
and `EdmStep` (the EDM family: one denoising loss). The trainer sees only this interface:

    model = make_step(cfg, device)            # builds the networks (seeded: identical on every rank)
    engines = build_engines(model.networks(), cfg=cfg, world=..., grad_accum=..., patch=...)
    model.attach(engines)
    stats = model.step(images, step, timer)   # this rank's micro-batches -> {name: device tensor}
    model.generator                            # the module whose EMA is kept (G, or the denoiser)

Rules that keep two ZeRO engines correct (verified in ../shared/notes/stack-facts.md):
- D is frozen (`requires_grad_(False)`) during G's step, else ZeRO-2 reports "already been reduced";
- wherever a graph runs through D outside `d_engine.backward` (R1's double backward, G's adversarial
  loss) D is called as `d_engine.module`, not `d_engine`;
- D's real loss, fake loss and lazy R1 are ONE scalar and ONE `d_engine.backward` per micro-batch.
Determinism: the random draws of step s on rank r come from seeds derived from (seed, s, r, phase), so a
run is a function of its recipe and seed, and a resumed run continues exactly.
Statistics stay on the device: `step` returns tensors, never Python floats, so nothing waits for the GPU.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from waveforge import diffusion, dist, edm, models, wavelet
from waveforge.config import Recipe
from waveforge.meters import PhaseTimer

PHASE_D, PHASE_G = 0, 1
Stats = dict[str, Any]  # name -> device tensor (a mean), or (sum, count) tensors for a mean over varying counts


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


def engine_dtype(precision: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


# --------------------------------------------------------------------------------------------------
# Engines
# --------------------------------------------------------------------------------------------------


@dataclass
class Net:
    """A network to train: its module, base learning rate and ZeRO stage."""

    module: torch.nn.Module
    lr: float
    zero_stage: int


def adam_params(device: torch.device) -> dict[str, Any]:
    """How Adam runs on `device`: torch's own implementation (DeepSpeed's `torch_adam`: no op to compile),
    on a GPU fused into one kernel per parameter group and step (`fused=True`), on the CPU torch's default."""
    return {"torch_adam": True, **({"fused": True} if device.type == "cuda" else {})}


def ds_config(*, zero_stage: int, precision: str, lr: float, betas: tuple[float, float], micro_batch: int,
              grad_accum: int, world: int, grad_clip: float, params: int,
              device: torch.device | None = None) -> dict[str, Any]:
    """One engine's DeepSpeed config for a model of `params` parameters on `device` (default: this
    process's), Adam as `adam_params` picks it. ZeRO's gradient-reduction bucket is sized to the model:
    DeepSpeed's default (5e8 elements) is 10x these models and costs ~0.9 GiB of GPU memory per engine for
    nothing (measured on an H100: the celebahq256 discriminator's engine peaks at 1.31 GiB with it, 0.46
    without)."""
    bucket = min(500_000_000, -(-params // 64) * 64)  # a multiple of NCCL's start alignment
    return {
        "train_batch_size": micro_batch * grad_accum * world,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "optimizer": {"type": "Adam", "params": {"lr": lr, "betas": list(betas), "eps": 1e-8, "weight_decay": 0.0,
                                                 **adam_params(device or dist.device())}},
        "zero_optimization": {"stage": zero_stage, "reduce_bucket_size": bucket, "allgather_bucket_size": bucket},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "gradient_clipping": grad_clip,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def build_engines(nets: dict[str, Net], *, cfg: Recipe, world: int, grad_accum: int,
                  patch: dict[str, Any]) -> dict[str, Any]:
    """COLLECTIVE: one DeepSpeed engine per network (Adam, the recipe's LR schedule, ZeRO stage and
    precision), `patch` merged into each config (e.g. to load a checkpoint of another world size)."""
    import deepspeed

    t = cfg.train
    total_steps = t.total_images // t.batch_size
    warmup_steps = t.lr_warmup_images // t.batch_size
    engines = {}
    for name, net in nets.items():
        ds_cfg = {**ds_config(zero_stage=net.zero_stage, precision=cfg.dist.precision, lr=net.lr,
                              betas=(t.beta1, t.beta2), micro_batch=t.batch_size // (world * grad_accum),
                              grad_accum=grad_accum, world=world, grad_clip=t.grad_clip,
                              params=models.count_params(net.module)), **patch}

        def schedule(opt: torch.optim.Optimizer, lr: float = net.lr) -> torch.optim.lr_scheduler.LambdaLR:
            return torch.optim.lr_scheduler.LambdaLR(
                opt, lambda s: lr_factor(s, total_steps, lr, t.lr_min, t.lr_schedule, warmup_steps))

        engines[name], *_ = deepspeed.initialize(model=net.module, model_parameters=list(net.module.parameters()),
                                                 config=ds_cfg, lr_scheduler=schedule)
    return engines


def gathered(module: torch.nn.Module, zero_stage: int) -> Any:
    """A context in which a ZeRO-3 module's parameters are whole (a no-op at stages 0-2)."""
    if zero_stage != 3:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(module.parameters()))


def grad_norm(engine: Any) -> torch.Tensor | float:
    """The engine's global gradient norm of its last step, as DeepSpeed keeps it (NaN when it has none)."""
    norm = engine.get_global_grad_norm()
    return norm if norm is not None else float("nan")


def mean_stats(per_micro: list[Stats]) -> Stats:
    """Stats of a step: the mean over its micro-batches, on the device."""
    return {k: torch.stack([s[k] for s in per_micro]).mean() for k in per_micro[0]}


class TrainStep(Protocol):
    def networks(self) -> dict[str, Net]: ...

    def attach(self, engines: dict[str, Any]) -> None: ...

    def step(self, images: list[torch.Tensor], step: int, timer: PhaseTimer) -> Stats: ...

    @property
    def generator(self) -> torch.nn.Module: ...

    def lrs(self) -> dict[str, float]: ...


# --------------------------------------------------------------------------------------------------
# The diffusion GAN
# --------------------------------------------------------------------------------------------------


class GanStep:
    """One WaveDiff iteration: the D step (real vs fake from a frozen G, lazy R1 every train.lazy_reg steps),
    then the G step (adversarial + L1 reconstruction), each one backward per micro-batch."""

    def __init__(self, cfg: Recipe, device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        torch.manual_seed(cfg.run.seed)  # identical initialisation on every rank
        self.G = models.build_generator(cfg.model, cfg.diffusion)
        self.D = models.build_discriminator(cfg.model, cfg.diffusion)
        if cfg.dist.activation_checkpointing:
            self.G.set_activation_checkpointing(True)
        self.sched = diffusion.make_schedule(cfg.diffusion, device)
        self.dtype = engine_dtype(cfg.dist.precision)
        self.g: Any = None
        self.d: Any = None

    def networks(self) -> dict[str, Net]:
        t, d = self.cfg.train, self.cfg.dist
        return {"G": Net(self.G, t.lr_g, d.zero_stage_g), "D": Net(self.D, t.lr_d, d.zero_stage_d)}

    def attach(self, engines: dict[str, Any]) -> None:
        self.g, self.d = engines["G"], engines["D"]
        if self.cfg.dist.compile != "none":  # after the trainer copied G for its EMA (see compile_blocks)
            n = sum(models.compile_blocks(e.module, self.cfg.dist.compile) for e in (self.g, self.d))
            dist.print0(f"torch.compile ({self.cfg.dist.compile}): {n} blocks of G and D, compiled at their first "
                        "call; D runs eager on R1 steps (no double backward through compiled graphs)")

    @property
    def generator(self) -> torch.nn.Module:
        return self.g.module if self.g is not None else self.G

    def lrs(self) -> dict[str, float]:
        return {"lr_g": self.g.get_lr()[0], "lr_d": self.d.get_lr()[0]}

    def _gen(self, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.g(x.to(self.dtype), t, z.to(self.dtype)).float()

    def _gen_frozen(self, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self._gen(x, t, z)

    def _disc(self, x_t: torch.Tensor, t: torch.Tensor, x_tp1: torch.Tensor) -> torch.Tensor:
        return self.d.module(x_t.to(self.dtype), t, x_tp1.to(self.dtype)).float()

    def _draws(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.randint(0, self.cfg.diffusion.num_timesteps, (n,), device=self.device)
        z = torch.randn(n, self.cfg.model.nz, device=self.device)
        return t, z

    def step(self, images: list[torch.Tensor], step: int, timer: PhaseTimer) -> Stats:
        c, rank = self.cfg, dist.rank()
        x0s = [wavelet.to_wavelet(img) for img in images]
        do_r1 = c.train.r1_gamma > 0 and step % c.train.lazy_reg == 0

        seed_phase(c.run.seed, step, rank, PHASE_D)  # D step: real vs fake (from a frozen G), lazy R1
        # R1 differentiates D's input gradient (create_graph): compiled graphs have no double backward.
        eager = torch.compiler.set_stance("force_eager") if do_r1 and c.dist.compile != "none" else nullcontext()
        with eager:
            d_stats = self._d_step(x0s, do_r1, timer)

        seed_phase(c.run.seed, step, rank, PHASE_G)  # G step: D frozen and called through .module
        self.d.module.requires_grad_(False)
        g_stats = self._g_step(x0s, timer)
        self.d.module.requires_grad_(True)
        return {**mean_stats(d_stats), **mean_stats(g_stats), "grad_norm_d": grad_norm(self.d),
                "grad_norm_g": grad_norm(self.g)}

    def _d_step(self, x0s: list[torch.Tensor], do_r1: bool, timer: PhaseTimer) -> list[Stats]:
        """D's step over the micro-batches: real vs fake (from a frozen G), R1 when do_r1."""
        stats = []
        for x0 in x0s:
            with timer.phase("d_fwd_bwd"):
                t, z = self._draws(x0.shape[0])
                loss, st = diffusion.d_loss(self._gen_frozen, self._disc, self.sched, x0, t, z,
                                            r1_gamma=self.cfg.train.r1_gamma, do_r1=do_r1)
                self.d.backward(loss)
            with timer.phase("d_optim"):
                self.d.step()
            stats.append(st)
        return stats

    def _g_step(self, x0s: list[torch.Tensor], timer: PhaseTimer) -> list[Stats]:
        """G's step over the micro-batches: adversarial + reconstruction loss, D frozen."""
        stats = []
        for x0 in x0s:
            with timer.phase("g_fwd_bwd"):
                t, z = self._draws(x0.shape[0])
                loss, st = diffusion.g_loss(self._gen, self._disc, self.sched, x0, t, z,
                                            rec_weight=self.cfg.train.rec_weight)
                self.g.backward(loss)
            with timer.phase("g_optim"):
                self.g.step()
            stats.append(st)
        return stats


# --------------------------------------------------------------------------------------------------
# The EDM family
# --------------------------------------------------------------------------------------------------


class EdmStep:
    """One EDM-family iteration: the denoising loss (waveforge.edm.loss) of one preconditioned denoiser."""

    def __init__(self, cfg: Recipe, device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        torch.manual_seed(cfg.run.seed)
        self.D = models.build_network(cfg.model, cfg.diffusion)
        if cfg.dist.activation_checkpointing:
            self.D.net.set_activation_checkpointing(True)
        self.engine: Any = None

    def networks(self) -> dict[str, Net]:
        return {"G": Net(self.D, self.cfg.train.lr_g, self.cfg.dist.zero_stage_g)}  # "G": the net sampled from

    def attach(self, engines: dict[str, Any]) -> None:
        self.engine = engines["G"]
        if self.cfg.dist.compile != "none":  # after the trainer copied the denoiser for its EMA
            n = models.compile_blocks(self.engine.module, self.cfg.dist.compile)
            dist.print0(f"torch.compile ({self.cfg.dist.compile}): {n} blocks of the denoiser")

    @property
    def generator(self) -> torch.nn.Module:
        return self.engine.module if self.engine is not None else self.D

    def lrs(self) -> dict[str, float]:
        return {"lr_g": self.engine.get_lr()[0]}

    def step(self, images: list[torch.Tensor], step: int, timer: PhaseTimer) -> Stats:
        seed_phase(self.cfg.run.seed, step, dist.rank(), PHASE_G)
        per_micro = []
        for x0 in images:
            with timer.phase("fwd_bwd"):
                loss, st = edm.loss(self.engine, x0, self.cfg.diffusion)
                self.engine.backward(loss)
            with timer.phase("optim"):
                self.engine.step()
            per_micro.append(st)
        out: Stats = {"loss": torch.stack([s["loss"] for s in per_micro]).mean()}
        for k in ("mse_low_sigma", "mse_high_sigma"):  # (sum, count) pairs: pooled over the interval
            out[k] = (torch.stack([s[k][0] for s in per_micro]).sum(), torch.stack([s[k][1] for s in per_micro]).sum())
        out["grad_norm"] = grad_norm(self.engine)
        return out


def make_step(cfg: Recipe, device: torch.device) -> TrainStep:
    """The training step of the recipe's model family."""
    return EdmStep(cfg, device) if cfg.model.family == "edm" else GanStep(cfg, device)
