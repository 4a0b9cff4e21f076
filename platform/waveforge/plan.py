"""Resource plan of a recipe: parameters, memory per GPU under ZeRO, activations, FLOPs per step.

Everything is measured on PyTorch's meta device at full size (no memory, no arithmetic): the models are
built with the recipe's shapes, run forward and backward at batch 1 and 2, and
- activation memory = the elements autograd saves for backward (counted with saved-tensor hooks, each
  tensor object once, batch 2 minus batch 1 so saved weights cancel), including the double-backward
  graph of R1, per sample, times the per-GPU batch and the activation dtype's size (checked against a
  real CPU run of the STL-10 generator: 66.6 vs 67.2 MB per sample in fp32). GroupNorm statistics /
  softmax internals kept in fp32 under autocast, the allocator's fragmentation and cuDNN workspaces are
  not counted: a fixed margin is added instead;
- FLOPs = torch.utils.flop_counter's formulas (matmul/conv/attention; elementwise ops not counted) over
  the same meta run, per sample, times the batch.
Model/optimizer state: mixed precision (bf16/fp16) keeps 16-bit weights + 16-bit gradients + fp32 master
weights + Adam m and v (2 + 2 + 12 bytes/param); fp32 keeps 4 + 4 + 8. ZeRO-1 shards the optimizer state
(master + m + v), ZeRO-2 also the gradients, ZeRO-3 also the weights, over all ranks. The generator's EMA
(fp32) is a full copy on every rank. The EDM family (model.family=edm) has no discriminator: its step is
one forward + backward of the denoiser's U-Net, and sampling costs one forward per network call (NFE).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from waveforge import config, edm
from waveforge.models import build_discriminator, build_generator, count_params
from waveforge.models.layers import AttnBlock, ResBlock

GIB = 1024 ** 3
GPU_SIZES_GB = (40, 80)
OVERHEAD_BYTES = 1.5 * GIB  # CUDA context, NCCL buffers, cuDNN workspace
FRAGMENTATION = 1.10  # allocator slack on top of the counted bytes
# The D (R1) step's peak exceeds its saved tensors by the gradients alive during the double backward.
# Measured peak / counted saved bytes on an H100 in bf16 (2026-11-22): celebahq256 at
# batch 32 1.19, celebahq512 at 4 1.24, celebahq1024 at 4 1.21; the G step's peak matched its count
# (1.02, 0.85, 0.99), so only the D step carries the factor.
D_STEP_TRANSIENT = 1.25


class _FlopCounter(TorchDispatchMode):
    """Counts FLOPs of the ops torch.utils.flop_counter knows (works under autograd.grad, unlike FlopCounterMode)."""

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        if packet in flop_registry:
            self.flops += int(flop_registry[packet](*args, **kwargs, out_val=out))
        return out


class _SavedCounter:
    """Elements saved for backward while active (each tensor object once); per-block totals when hooked."""

    def __init__(self) -> None:
        self.seen: set[int] = set()
        self.keep: list[torch.Tensor] = []  # keep ids unique while counting
        self.total = 0
        self.block_stack: list[list[int]] = []
        self.block_totals: list[int] = []

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        # Keyed by storage (a view saved next to its base, e.g. a reshape for a folded GroupNorm, costs
        # nothing extra), counting the storage's elements once.
        key = t.untyped_storage()._cdata
        if key not in self.seen:
            self.seen.add(key)
            self.keep.append(t)
            n = t.untyped_storage().nbytes() // max(t.element_size(), 1)
            self.total += n
            if self.block_stack:
                self.block_stack[-1][0] += n
        return t

    def __enter__(self) -> _SavedCounter:
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._ctx.__exit__(*exc)


@dataclass
class ModelCost:
    """Per-sample measurements of one recipe's models (elements and FLOPs at batch 1)."""

    g_params: int
    d_params: int
    g_act: int  # G forward saved elements (training, no checkpointing)
    g_act_ckpt: int  # with activation checkpointing: saved block inputs ...
    g_block_max: int  # ... plus the largest block, recomputed during backward
    d_act: int  # D forward saved elements (trainable D or input gradients)
    d_act_r1: int  # D forward + R1 first backward with create_graph
    flops_g_fwd: int
    flops_g_fwd_bwd: int
    flops_d_fwd_bwd: int  # D params and inputs trainable
    flops_d_fwd_bwd_r1: int  # D real pass with the R1 double backward
    flops_d_input_grad: int  # D frozen, gradient to its input only (the G step)


def measure(cfg: config.Recipe) -> ModelCost:
    """Build the recipe's G and D on the meta device and measure one sample's activations and FLOPs.

    Saved elements are measured at batch 1 and 2 and differenced: weights that autograd saves (conv and
    linear weights) and batch-independent tensors cancel out, leaving the activations of one sample.
    """
    m, d = cfg.model, cfg.diffusion
    with torch.device("meta"):
        G = build_generator(m, d)  # the EDM denoiser's U-Net for model.family=edm (its preconditioning is elementwise)
        D = build_discriminator(m, d) if m.family == "wavediff" else None
    r = m.resolution // 2
    blocks = [mod for mod in G.modules() if isinstance(mod, (ResBlock, AttnBlock))]

    def inputs(b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (torch.empty(b, 4 * m.channels, r, r, device="meta"), torch.zeros(b, dtype=torch.long, device="meta"),
                torch.empty(b, m.nz, device="meta"))

    def g_pass(b: int, checkpointing: bool) -> tuple[int, int, int]:
        """(saved elements, largest block's saved elements, FLOPs) of G forward + backward at batch b."""
        G.set_activation_checkpointing(checkpointing)
        x, t, z = inputs(b)
        with _SavedCounter() as saved, _FlopCounter() as fc:
            hooks = []
            for mod in blocks:
                hooks.append(mod.register_forward_pre_hook(lambda *_: saved.block_stack.append([0])))
                hooks.append(mod.register_forward_hook(
                    lambda *_: saved.block_totals.append(saved.block_stack.pop()[0])))
            out = G(x, t, z)
            for h in hooks:
                h.remove()
        out.sum().backward()  # outside the counter: a checkpointed backward re-saves recomputed blocks
        G.zero_grad(set_to_none=True)
        return saved.total, max(saved.block_totals, default=0), fc.flops

    def d_pass(b: int, r1: bool, params: bool) -> tuple[int, int]:
        """(saved elements, FLOPs) of D forward + backward at batch b, optionally through R1."""
        for p in D.parameters():
            p.requires_grad_(params)
            p.grad = None
        x, t, _ = inputs(b)
        xr = torch.empty_like(x).requires_grad_(True)
        with _SavedCounter() as saved, _FlopCounter() as fc:
            out = D(xr, t, x)
            if r1:
                (g,) = torch.autograd.grad(out.sum(), xr, create_graph=True)
                (out.sum() + g.square().sum()).backward()
            else:
                out.sum().backward()
        return saved.total, fc.flops

    x1, t1, z1 = inputs(1)
    with torch.no_grad(), _FlopCounter() as fc:
        G(x1, t1, z1)
    flops_g_fwd = fc.flops
    (g1, blk1, flops_g_fwd_bwd), (g2, blk2, _) = g_pass(1, False), g_pass(2, False)
    (c1, _, _), (c2, _, _) = g_pass(1, True), g_pass(2, True)
    G.set_activation_checkpointing(False)
    if D is None:
        return ModelCost(g_params=count_params(G), d_params=0, g_act=g2 - g1, g_act_ckpt=c2 - c1,
                         g_block_max=blk2 - blk1, d_act=0, d_act_r1=0, flops_g_fwd=flops_g_fwd,
                         flops_g_fwd_bwd=flops_g_fwd_bwd, flops_d_fwd_bwd=0, flops_d_fwd_bwd_r1=0,
                         flops_d_input_grad=0)
    (d1, flops_d), (d2, _) = d_pass(1, False, True), d_pass(2, False, True)
    (r1_1, flops_d_r1), (r1_2, _) = d_pass(1, True, True), d_pass(2, True, True)
    _, flops_d_in = d_pass(1, False, False)
    return ModelCost(g_params=count_params(G), d_params=count_params(D), g_act=g2 - g1, g_act_ckpt=c2 - c1,
                     g_block_max=blk2 - blk1, d_act=d2 - d1, d_act_r1=r1_2 - r1_1, flops_g_fwd=flops_g_fwd,
                     flops_g_fwd_bwd=flops_g_fwd_bwd, flops_d_fwd_bwd=flops_d, flops_d_fwd_bwd_r1=flops_d_r1,
                     flops_d_input_grad=flops_d_in)


def state_bytes(params: int, stage: int, precision: str, world: int) -> dict[str, float]:
    """Per-GPU bytes of weights, gradients and optimizer state under ZeRO `stage` over `world` ranks, and
    ZeRO's gradient-reduction bucket (sized to the model by train.ds_config; not sharded: every rank
    holds one; fp32 at ZeRO-1, which accumulates in fp32, else the training dtype)."""
    mixed = precision in ("bf16", "fp16")
    weights = params * (2 if mixed else 4)
    grads = params * (2 if mixed else 4)
    optim = params * (12 if mixed else 8)  # fp32 master (mixed only) + Adam m + v
    bucket = 0 if stage == 0 else params * (2 if mixed and stage >= 2 else 4)
    return {"weights": weights / (world if stage >= 3 else 1),
            "grads": grads / (world if stage >= 2 else 1),
            "optimizer": optim / (world if stage >= 1 else 1),
            "bucket": float(bucket)}


def activation_bytes(cost: ModelCost, micro_batch: int, precision: str, checkpointing: bool) -> dict[str, float]:
    """Peak activation bytes per GPU of the D step (R1 step) and of the G step."""
    size = 2 if precision in ("bf16", "fp16") else 4
    d_step = (cost.d_act_r1 + cost.d_act) * micro_batch * size * D_STEP_TRANSIENT  # real + R1 graph, fake
    g_saved = (cost.g_act_ckpt + cost.g_block_max) if checkpointing else cost.g_act
    g_step = (g_saved + cost.d_act) * micro_batch * size  # G graph + D graph (input gradients)
    return {"d_step": float(d_step), "g_step": float(g_step), "peak": float(max(d_step, g_step))}


def total_bytes(cost: ModelCost, cfg: config.Recipe, world: int, micro_batch: int, zero_g: int, zero_d: int,
                checkpointing: bool) -> float:
    prec = cfg.dist.precision
    states = sum(state_bytes(cost.g_params, zero_g, prec, world).values())
    states += sum(state_bytes(cost.d_params, zero_d, prec, world).values())
    states += cost.g_params * 4  # EMA
    act = activation_bytes(cost, micro_batch, prec, checkpointing)["peak"]
    return (states + act) * FRAGMENTATION + OVERHEAD_BYTES


def _cheapest_fit(cost: ModelCost, cfg: config.Recipe, world: int, micro_batch: int, gb: int) -> dict[str, Any]:
    """Lowest ZeRO stage, without checkpointing if possible, that fits a `gb` GB GPU."""
    for ckpt, stage in itertools.product((False, True), (0, 1, 2, 3)):
        need = total_bytes(cost, cfg, world, micro_batch, stage, min(stage, 2), ckpt)
        if need <= gb * 1e9:
            return {"fits": True, "zero_stage_g": stage, "zero_stage_d": min(stage, 2),
                    "activation_checkpointing": ckpt, "gib": need / GIB}
    return {"fits": False, "gib": total_bytes(cost, cfg, world, micro_batch, 3, 2, True) / GIB}


def plan(cfg: config.Recipe) -> dict[str, Any]:
    """The full plan as a JSON-able dict."""
    world = config.world_size(cfg)
    config.check_resources(cfg, world)
    accum = cfg.dist.grad_accum
    micro = cfg.train.batch_size // (world * accum)
    cost = measure(cfg)
    ds = cfg.dist
    lazy = cfg.train.lazy_reg
    # Per-sample FLOPs of one iteration (D step then G step), R1 amortised over its interval; EDM: one step.
    gan = cfg.model.family == "wavediff"
    d_step = (cost.flops_d_fwd_bwd + (cost.flops_d_fwd_bwd_r1 - cost.flops_d_fwd_bwd) / lazy
              + cost.flops_g_fwd + cost.flops_d_fwd_bwd) if gan else 0
    g_step = cost.flops_g_fwd_bwd + cost.flops_d_input_grad
    per_sample = d_step + g_step
    network_calls = cfg.diffusion.num_timesteps if gan else edm.network_calls(cfg)
    states = {"generator": state_bytes(cost.g_params, ds.zero_stage_g, ds.precision, world),
              "discriminator": state_bytes(cost.d_params, ds.zero_stage_d, ds.precision, world)}
    act = activation_bytes(cost, micro, ds.precision, ds.activation_checkpointing)
    configured = total_bytes(cost, cfg, world, micro, ds.zero_stage_g, ds.zero_stage_d, ds.activation_checkpointing)
    return {
        "recipe": cfg.recipe,
        "family": cfg.model.family,
        "world_size": world,
        "per_gpu_batch": micro,
        "grad_accum": accum,
        "precision": ds.precision,
        "generator_params": cost.g_params,
        "discriminator_params": cost.d_params,
        "zero_stage_g": ds.zero_stage_g,
        "zero_stage_d": ds.zero_stage_d,
        "activation_checkpointing": ds.activation_checkpointing,
        "state_gib_per_gpu": {k: {n: b / GIB for n, b in v.items()} for k, v in states.items()}
        | {"ema": cost.g_params * 4 / GIB},
        "activation_gib_per_gpu": {k: v / GIB for k, v in act.items()},
        "activation_gib_per_sample": {
            "generator": cost.g_act * (2 if ds.precision != "fp32" else 4) / GIB,
            "generator_checkpointed": (cost.g_act_ckpt + cost.g_block_max) * (2 if ds.precision != "fp32" else 4) / GIB,
            "discriminator_with_r1": cost.d_act_r1 * (2 if ds.precision != "fp32" else 4) / GIB},
        "total_gib_per_gpu": configured / GIB,
        "fits": {f"{gb}GB": {"with_recipe_settings": configured <= gb * 1e9,
                             "cheapest": _cheapest_fit(cost, cfg, world, micro, gb)} for gb in GPU_SIZES_GB},
        "flops": {"per_sample_train_iteration": per_sample, "per_gpu_train_iteration": per_sample * micro * accum,
                  "global_train_iteration": per_sample * cfg.train.batch_size,
                  "generator_forward_per_sample": cost.flops_g_fwd,
                  "sampling_per_image": cost.flops_g_fwd * network_calls,
                  "sampling_network_calls": network_calls},
        "method": ("meta-device runs at full size, batch 1 and 2; activations = elements saved for backward per "
                   "sample (saved-tensor hooks, batch 2 minus batch 1, R1 double-backward graph included) x "
                   "per-GPU batch x dtype size; "
                   f"the discriminator step's peak x {D_STEP_TRANSIENT} for the double backward's live gradients "
                   "(measured on an H100); FLOPs = torch.utils.flop_counter formulas (matmul/conv/attention only); "
                   "memory total adds "
                   f"{FRAGMENTATION - 1:.0%} allocator slack and {OVERHEAD_BYTES / GIB:.1f} GiB CUDA/NCCL overhead"),
    }


def format_plan(p: dict[str, Any]) -> str:
    """Human-readable report of `plan(...)`."""
    s, a = p["state_gib_per_gpu"], p["activation_gib_per_gpu"]
    if p.get("family") == "edm":  # one network, the denoiser: no discriminator lines
        fl = p["flops"]
        lines = [f"recipe {p['recipe']} (EDM family): {p['world_size']} GPU(s), per-GPU batch {p['per_gpu_batch']} "
                 f"(grad_accum {p['grad_accum']}), {p['precision']}",
                 f"  parameters       denoiser {p['generator_params'] / 1e6:.3f} M",
                 f"  states per GPU   ZeRO-{p['zero_stage_g']}: weights {s['generator']['weights']:.2f} + grads "
                 f"{s['generator']['grads']:.2f} + Adam {s['generator']['optimizer']:.2f} + ZeRO bucket "
                 f"{s['generator']['bucket']:.2f} GiB; EMA {s['ema']:.2f} GiB",
                 f"  activations/GPU  {a['g_step']:.2f} GiB (checkpointing "
                 f"{'on' if p['activation_checkpointing'] else 'off'}); per sample "
                 f"{p['activation_gib_per_sample']['generator']:.3f} GiB "
                 f"({p['activation_gib_per_sample']['generator_checkpointed']:.3f} checkpointed)",
                 f"  total per GPU    {p['total_gib_per_gpu']:.1f} GiB with the recipe's settings"]
        for gb, f in p["fits"].items():
            c = f["cheapest"]
            need = (f"ZeRO-{c['zero_stage_g']}, checkpointing {'on' if c['activation_checkpointing'] else 'off'}: "
                    f"{c['gib']:.1f} GiB" if c["fits"] else f"none ({c['gib']:.1f} GiB at ZeRO-3 + checkpointing)")
            lines.append(f"  {gb} GPU        recipe settings {'fit' if f['with_recipe_settings'] else 'do NOT fit'}; "
                         f"cheapest that fits: {need}")
        lines += [f"  FLOPs            {fl['per_sample_train_iteration'] / 1e12:.3f} TFLOP per image per iteration; "
                  f"sampling {fl['sampling_per_image'] / 1e9:.1f} GFLOP per image ({fl['sampling_network_calls']} "
                  "network calls)", f"  method           {p['method']}"]
        return "\n".join(lines)
    lines = [
        f"recipe {p['recipe']}: {p['world_size']} GPU(s), per-GPU batch {p['per_gpu_batch']} "
        f"(grad_accum {p['grad_accum']}), {p['precision']}",
        f"  parameters       G {p['generator_params'] / 1e6:.3f} M   D {p['discriminator_params'] / 1e6:.3f} M",
        f"  states per GPU   G (ZeRO-{p['zero_stage_g']}): weights {s['generator']['weights']:.2f} + grads "
        f"{s['generator']['grads']:.2f} + Adam {s['generator']['optimizer']:.2f} + ZeRO bucket "
        f"{s['generator']['bucket']:.2f} GiB; D (ZeRO-{p['zero_stage_d']}): "
        f"{sum(s['discriminator'].values()):.2f} GiB; EMA {s['ema']:.2f} GiB",
        f"  activations/GPU  D step {a['d_step']:.2f} GiB, G step {a['g_step']:.2f} GiB "
        f"(checkpointing {'on' if p['activation_checkpointing'] else 'off'}); per sample: G "
        f"{p['activation_gib_per_sample']['generator']:.3f} GiB "
        f"({p['activation_gib_per_sample']['generator_checkpointed']:.3f} checkpointed), D+R1 "
        f"{p['activation_gib_per_sample']['discriminator_with_r1']:.3f} GiB",
        f"  total per GPU    {p['total_gib_per_gpu']:.1f} GiB with the recipe's settings",
    ]
    for gb, f in p["fits"].items():
        c = f["cheapest"]
        if c["fits"]:
            need = (f"ZeRO-{c['zero_stage_g']} (G) / ZeRO-{c['zero_stage_d']} (D), checkpointing "
                    f"{'on' if c['activation_checkpointing'] else 'off'}: {c['gib']:.1f} GiB")
        else:
            need = (f"does not fit even with ZeRO-3 + checkpointing ({c['gib']:.1f} GiB): lower the per-GPU batch "
                    "(more GPUs or dist.grad_accum)")
        lines.append(f"  {gb} GPU        recipe settings {'fit' if f['with_recipe_settings'] else 'do NOT fit'}; "
                     f"cheapest that fits: {need}")
    fl = p["flops"]
    lines += [f"  FLOPs            {fl['per_sample_train_iteration'] / 1e12:.3f} TFLOP per image per iteration "
              f"(D step + G step, R1 amortised); {fl['global_train_iteration'] / 1e12:.1f} TFLOP per global "
              f"iteration; sampling {fl['sampling_per_image'] / 1e9:.1f} GFLOP per image",
              f"  method           {p['method']}"]
    return "\n".join(lines)
