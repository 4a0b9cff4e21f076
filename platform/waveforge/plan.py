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

Communication and scaling (a model on paper, not a measurement): the collectives the trainer issues per
iteration for the recipe's ZeRO stages and precision (`collectives`), their bytes per rank by ring costs over
NVLink within a node and the network between nodes (`comm_per_rank`, `comm_seconds`), and from them the
predicted step time, images/s and scaling efficiency at 1, 2 and 8 nodes next to a one-GPU basis: a measured
step the user gives, or the FLOPs above at an assumed MFU (`scaling`; its assumptions are in
MODEL_ASSUMPTIONS and printed with the table).
"""

from __future__ import annotations

import itertools
import math
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


# --------------------------------------------------------------------------------------------------
# Communication model: bytes per rank per iteration and predicted multi-GPU step time (a model on paper)
# --------------------------------------------------------------------------------------------------

# Assumed link speeds (not measured here). NVLink: H100 SXM NVLink 4 is 900 GB/s per GPU in both directions
# together (NVIDIA's H100 datasheet), i.e. 450 GB/s per direction, taken as NCCL's bus bandwidth within a node
# (the peak: measured NCCL bus bandwidth is lower). Network: line rate per GPU, one NIC per GPU (rail-optimised
# H100 nodes with 8 NICs); 200 Gb/s = 25 GB/s, 400 Gb/s = 50 GB/s.
NVLINK_GBS = 450.0  # GB/s per direction per GPU
NETWORK_GBPS = (200.0, 400.0)  # Gb/s per GPU
SCALING_NODES = (1, 2, 8)
CLUSTER_GPUS_PER_NODE = 8  # the table's node size for recipes written for one GPU (gpus_per_node <= 1)
# Dense (no sparsity) peak of an H100 SXM in TFLOP/s (NVIDIA's datasheet: bf16/fp16 989, TF32 495).
PEAK_TFLOPS = {"bf16": 989.0, "fp16": 989.0, "fp32": 495.0}
DEFAULT_MFU = 0.20  # the FLOP-based compute estimate's model FLOPs utilisation when no step_s is given
COLLECTIVE_NAMES = {"all_reduce": "all-reduce", "reduce_scatter": "reduce-scatter", "all_gather": "all-gather"}


@dataclass(frozen=True)
class Collective:
    """One collective over all data-parallel ranks in a training iteration.

    `size` is the full (unsharded) tensor in bytes; `count` how many times it runs per iteration; `overlap`
    whether it can run under computation (gradient reductions during the backward, ZeRO-3's prefetched
    gathers) or not (the all-gather after the optimizer step, the EMA's gather)."""

    what: str
    kind: str  # "all_reduce", "reduce_scatter" or "all_gather"
    size: float  # bytes
    count: int
    overlap: bool


def ring_fraction(kind: str, ranks: int) -> float:
    """Bytes each rank sends (and, the same, receives) per byte of the full tensor in a ring collective over
    `ranks` ranks: all-reduce 2(n-1)/n, reduce-scatter and all-gather (n-1)/n; 0 for one rank."""
    if kind not in COLLECTIVE_NAMES:
        raise ValueError(f"unknown collective {kind!r}: one of {', '.join(COLLECTIVE_NAMES)}")
    if ranks <= 1:
        return 0.0
    f = (ranks - 1) / ranks
    return 2 * f if kind == "all_reduce" else f


def hierarchical_bytes(kind: str, size: float, *, nodes: int, gpus_per_node: int) -> tuple[float, float]:
    """(NVLink bytes, network bytes) one rank sends for one collective of a `size`-byte tensor over
    `nodes` x `gpus_per_node` ranks, two-level: a ring over the node's GPUs on NVLink, and a ring over the
    nodes on the network for each GPU's 1/gpus_per_node shard (each GPU through its own NIC). The two add up
    to the flat ring's volume, ring_fraction(kind, nodes * gpus_per_node) * size."""
    nvlink = ring_fraction(kind, gpus_per_node) * size
    network = ring_fraction(kind, nodes) * size / gpus_per_node
    return nvlink, network


def collectives(*, g_params: int, d_params: int, zero_g: int, zero_d: int, precision: str, grad_accum: int,
                gan: bool) -> list[Collective]:
    """The collectives of one training iteration (D step then G step; the EDM family: one network) as the
    trainer runs them under DeepSpeed (0.19): gradients and weights move in the training precision
    (DeepSpeed's default communication_data_type), 2 bytes a value in bf16/fp16, 4 in fp32.

    - gradients: ZeRO-0 all-reduces them at the accumulation boundary; ZeRO-1 reduces each rank's partition
      to its owner (reduce-scatter volume) at the boundary; ZeRO-2/3 do so after every micro-batch's backward;
    - ZeRO-1/2 all-gather the updated weights after the optimizer step (once per iteration);
    - ZeRO-3 (G only) all-gathers G's weights for every forward (the D step's frozen G and the G step, per
      micro-batch) and again for the backward, and once more for the EMA update (GatheredParameters);
    - R1 adds nothing: D runs at ZeRO <= 2, so its weights are on every rank, and R1 is summed into D's one
      backward per micro-batch, whose gradient is reduced with the rest.
    """
    if zero_d > 2:
        raise ValueError(f"zero_d={zero_d}: the discriminator runs at ZeRO 0-2 (R1's double backward)")
    value = 4 if precision == "fp32" else 2

    def net(name: str, params: int, stage: int, forwards: int) -> list[Collective]:
        size = float(params * value)
        if stage == 0:
            out = [Collective(f"{name} gradients, all-reduce at the accumulation boundary (ZeRO-0)", "all_reduce",
                              size, 1, True)]
        elif stage == 1:
            out = [Collective(f"{name} gradients, reduced to their owners at the accumulation boundary (ZeRO-1)",
                              "reduce_scatter", size, 1, True)]
        else:
            out = [Collective(f"{name} gradients, reduce-scatter after every micro-batch (ZeRO-{stage})",
                              "reduce_scatter", size, grad_accum, True)]
        if stage in (1, 2):
            out.append(Collective(f"{name} weights, all-gather after the optimizer step (ZeRO-{stage})",
                                  "all_gather", size, 1, False))
        if stage == 3:
            out += [Collective(f"{name} weights, all-gather for each forward ({forwards} per micro-batch, ZeRO-3)",
                               "all_gather", size, forwards * grad_accum, True),
                    Collective(f"{name} weights, all-gather for the backward (per micro-batch, ZeRO-3)",
                               "all_gather", size, grad_accum, True),
                    Collective(f"{name} weights, all-gather for the EMA update (ZeRO-3)", "all_gather", size, 1,
                               False)]
        return out

    out = net("G", g_params, zero_g, 2 if gan else 1)
    if gan:
        out += net("D", d_params, zero_d, 0)
    return out


def comm_per_rank(colls: list[Collective], *, nodes: int, gpus_per_node: int) -> dict[str, float]:
    """Bytes one rank sends (= receives) per iteration: total, over NVLink and over the network, and the part
    that cannot overlap computation."""
    nvl = net = exposed = 0.0
    for c in colls:
        a, b = hierarchical_bytes(c.kind, c.size, nodes=nodes, gpus_per_node=gpus_per_node)
        nvl += a * c.count
        net += b * c.count
        exposed += 0.0 if c.overlap else (a + b) * c.count
    return {"bytes": nvl + net, "nvlink_bytes": nvl, "network_bytes": net, "exposed_bytes": exposed}


def comm_seconds(colls: list[Collective], *, nodes: int, gpus_per_node: int, nvlink_gbs: float,
                 network_gbps: float | None, nics_per_node: int | None = None) -> tuple[float, float]:
    """(all, non-overlappable) seconds of communication per iteration: each collective's NVLink phase at
    `nvlink_gbs` GB/s plus its network phase, one after the other; bandwidth only (no latency). The network:
    `nics_per_node` NICs of `network_gbps` Gb/s each (default one per GPU), shared evenly by the node's GPUs
    (a GPU uses at most one NIC); None: one node, no network."""
    if network_gbps is None and nodes > 1:
        raise ValueError(f"{nodes} nodes need a network bandwidth (network_gbps)")
    nics = min(nics_per_node or gpus_per_node, gpus_per_node)
    per_gpu = (network_gbps or 0.0) * 1e9 / 8 * nics / gpus_per_node  # bytes/s
    total = exposed = 0.0
    for c in colls:
        a, b = hierarchical_bytes(c.kind, c.size, nodes=nodes, gpus_per_node=gpus_per_node)
        t = (a / (nvlink_gbs * 1e9) + (b / per_gpu if b else 0.0)) * c.count
        total += t
        exposed += 0.0 if c.overlap else t
    return total, exposed


def communication(cfg: config.Recipe, cost: ModelCost, *, grad_accum: int) -> dict[str, Any]:
    """The recipe's collectives at its own world size (cluster.nodes x GPUs or tasks a node) with each one's
    bytes per rank per iteration (`bytes_each`: one call; `bytes`: all its calls), and the totals."""
    ds = cfg.dist
    per_node = cfg.cluster.tasks_per_node or cfg.cluster.gpus_per_node
    nodes = cfg.cluster.nodes
    colls = collectives(g_params=cost.g_params, d_params=cost.d_params, zero_g=ds.zero_stage_g,
                        zero_d=ds.zero_stage_d, precision=ds.precision, grad_accum=grad_accum,
                        gan=cfg.model.family == "wavediff")
    items = []
    for c in colls:
        a, b = hierarchical_bytes(c.kind, c.size, nodes=nodes, gpus_per_node=per_node)
        items.append({"what": c.what, "kind": c.kind, "tensor_bytes": c.size, "count": c.count,
                      "overlappable": c.overlap, "bytes_each": a + b, "bytes": (a + b) * c.count,
                      "nvlink_bytes": a * c.count, "network_bytes": b * c.count})
    return {"world_size": nodes * per_node, "nodes": nodes, "gpus_per_node": per_node, "grad_accum": grad_accum,
            "collectives": items} | {f"{k}_per_rank": v for k, v in
                                     comm_per_rank(colls, nodes=nodes, gpus_per_node=per_node).items()}


def scaling_gpus_per_node(cfg: config.Recipe) -> int:
    """GPUs a node for the scaling table: the recipe's cluster.gpus_per_node, or 8 (an H100 node) where the
    recipe is written for one GPU or a CPU cluster (gpus_per_node <= 1)."""
    g = cfg.cluster.gpus_per_node
    return g if g >= 2 else CLUSTER_GPUS_PER_NODE


MODEL_ASSUMPTIONS = (
    "a model, not a measurement: bandwidth-only ring costs per collective (all-reduce 2(n-1)/n, reduce-scatter "
    "and all-gather (n-1)/n of the tensor's bytes sent and received by each rank), two-level: NVLink among a "
    "node's GPUs, then the network among nodes on each GPU's 1/g shard (NCCL's flat ring can move up to 2x more "
    "over the network at 2 nodes); no latency, launch cost or scalar all-reduces (loss and gradient-norm metrics)",
    f"NVLink {NVLINK_GBS:.0f} GB/s per direction per GPU (H100 SXM NVLink 4, 900 GB/s both directions, NVIDIA "
    "datasheet) as NCCL's bus bandwidth: a peak, measured bus bandwidth is lower",
    "network 200 or 400 Gb/s (25 or 50 GB/s) per NIC at line rate, one NIC per GPU (rail-optimised H100 nodes) "
    "unless nics= says fewer, which the node's GPUs then share",
    "serial = no overlap of communication and computation (the recipe's DeepSpeed config at ZeRO-1/2: "
    "overlap_comm off and a reduction bucket the size of the model, so gradients are reduced after the "
    "backward); overlapped = gradient reductions and ZeRO-3's forward/backward gathers hidden under computation "
    "(step = max(compute, them) + the rest); the all-gather after the optimizer step and the EMA gather never "
    "overlap",
    "ZeRO-3: one all-gather per forward and one per backward, per micro-batch (the standard count; DeepSpeed can "
    "keep weights gathered within stage3_max_reuse_distance, default 1e9 elements, which saves the backward's, "
    "and may gather again for activation-checkpointing recomputation)",
    "R1 adds no communication (D at ZeRO <= 2 holds its weights on every rank; R1 is summed into D's one backward "
    "per micro-batch); its computation, amortised over train.lazy_reg, is in the compute time",
    "compute time per image is constant: the one-GPU basis scaled linearly to each rank's images per iteration "
    "(optimistic for small per-GPU batches, where a GPU is less busy and the optimizer/EMA's fixed cost weighs more)",
)


def scaling(cfg: config.Recipe, cost: ModelCost, *, per_gpu_images: int, step_s: float | None = None,
            step_batch: int | None = None, mfu: float = DEFAULT_MFU, peak_tflops: float | None = None,
            nvlink_gbs: float = NVLINK_GBS, network_gbps: tuple[float, ...] = NETWORK_GBPS,
            nics_per_node: int | None = None, nodes: tuple[int, ...] = SCALING_NODES) -> dict[str, Any]:
    """Predicted step time (s), images/s and scaling efficiency at `nodes` nodes for the recipe's global
    batch (fixed: more GPUs mean fewer images per GPU), ZeRO stages and precision.

    Compute basis: `step_s` seconds per iteration of one GPU at `step_batch` images (default
    `per_gpu_images`, this plan's images per GPU per iteration), or else the plan's FLOPs per image at `mfu`
    of `peak_tflops` (default: the H100's dense peak for the precision). Links: NVLink at `nvlink_gbs` GB/s
    within a node; between nodes each of `network_gbps` (Gb/s per NIC, one row each) with `nics_per_node`
    NICs (default one per GPU). Efficiency = the basis's compute time / the predicted step time (1 = perfect
    scaling)."""
    ds, batch = cfg.dist, cfg.train.batch_size
    gan = cfg.model.family == "wavediff"
    if step_s is not None:
        images = step_batch or per_gpu_images
        per_image = step_s / images
        basis = {"source": "measured one-GPU step (given)", "step_s": step_s, "step_batch": images,
                 "seconds_per_image": per_image}
    else:
        peak = peak_tflops or PEAK_TFLOPS[ds.precision]
        flops = train_flops_per_sample(cost, gan=gan, lazy_reg=cfg.train.lazy_reg)
        per_image = flops / (peak * 1e12 * mfu)
        basis = {"source": "FLOP estimate", "flops_per_image": flops, "peak_tflops": peak, "mfu": mfu,
                 "seconds_per_image": per_image}
    basis["one_gpu_step_s"] = per_image * batch  # the whole global batch on one GPU
    g = scaling_gpus_per_node(cfg)
    rows: list[dict[str, Any]] = []
    for n in nodes:
        world = n * g
        try:
            config.check_resources(cfg, world)
            accum = cfg.dist.grad_accum
        except config.ConfigError as e:
            rows.append({"nodes": n, "gpus_per_node": g, "world_size": world, "possible": False, "reason": str(e)})
            continue
        colls = collectives(g_params=cost.g_params, d_params=cost.d_params, zero_g=ds.zero_stage_g,
                            zero_d=ds.zero_stage_d, precision=ds.precision, grad_accum=accum, gan=gan)
        volume = comm_per_rank(colls, nodes=n, gpus_per_node=g)
        compute = per_image * batch / world
        for link in (network_gbps if n > 1 else (None,)):
            comm, exposed = comm_seconds(colls, nodes=n, gpus_per_node=g, nvlink_gbs=nvlink_gbs,
                                         network_gbps=link, nics_per_node=nics_per_node)
            serial = compute + comm
            overlapped = max(compute, comm - exposed) + exposed
            rows.append({"nodes": n, "gpus_per_node": g, "world_size": world, "possible": True,
                         "per_gpu_images": batch // world, "grad_accum": accum, "network_gbps": link,
                         "bytes_per_rank": volume["bytes"], "nvlink_bytes_per_rank": volume["nvlink_bytes"],
                         "network_bytes_per_rank": volume["network_bytes"], "compute_s": compute, "comm_s": comm,
                         "comm_exposed_s": exposed,
                         "step_s": {"serial": serial, "overlapped": overlapped},
                         "images_per_s": {"serial": batch / serial, "overlapped": batch / overlapped},
                         "efficiency": {"serial": compute / serial, "overlapped": compute / overlapped}})
    return {"compute_basis": basis, "gpus_per_node": g, "nvlink_gbs": nvlink_gbs, "network_gbps": list(network_gbps),
            "nics_per_node": min(nics_per_node or g, g), "global_batch": batch, "zero_stage_g": ds.zero_stage_g,
            "zero_stage_d": ds.zero_stage_d if gan else None, "precision": ds.precision,
            "assumptions": list(MODEL_ASSUMPTIONS), "rows": rows}


def train_flops_per_sample(cost: ModelCost, *, gan: bool, lazy_reg: int) -> float:
    """FLOPs per image of one training iteration: D step (real pass, R1's double backward amortised over its
    `lazy_reg` interval, frozen G forward, fake pass) then G step (G forward + backward, D's input gradient);
    the EDM family: the denoiser's forward + backward."""
    d_step = (cost.flops_d_fwd_bwd + (cost.flops_d_fwd_bwd_r1 - cost.flops_d_fwd_bwd) / lazy_reg
              + cost.flops_g_fwd + cost.flops_d_fwd_bwd) if gan else 0
    return d_step + cost.flops_g_fwd_bwd + cost.flops_d_input_grad


def plan(cfg: config.Recipe, *, step_s: float | None = None, step_batch: int | None = None,
         mfu: float = DEFAULT_MFU, peak_tflops: float | None = None, nvlink_gbs: float = NVLINK_GBS,
         nics_per_node: int | None = None) -> dict[str, Any]:
    """The full plan as a JSON-able dict. The keyword arguments set the scaling model (see `scaling`): its
    compute basis, a measured one-GPU step of `step_s` seconds at `step_batch` images or the FLOP estimate at
    `mfu` of `peak_tflops` TFLOP/s; the NVLink bandwidth in GB/s; the NICs a node (default one per GPU)."""
    world = config.world_size(cfg)
    config.check_resources(cfg, world)
    accum = cfg.dist.grad_accum
    micro = cfg.train.batch_size // (world * accum)
    cost = measure(cfg)
    ds = cfg.dist
    gan = cfg.model.family == "wavediff"
    per_sample = train_flops_per_sample(cost, gan=gan, lazy_reg=cfg.train.lazy_reg)
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
        "communication": communication(cfg, cost, grad_accum=accum),
        "scaling": scaling(cfg, cost, per_gpu_images=micro * accum, step_s=step_s, step_batch=step_batch, mfu=mfu,
                           peak_tflops=peak_tflops, nvlink_gbs=nvlink_gbs, nics_per_node=nics_per_node),
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
        return "\n".join(lines + format_communication(p) + format_scaling(p))
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
    return "\n".join(lines + format_communication(p) + format_scaling(p))


def _mb(b: float) -> str:
    return f"{b / 1e6:.1f}"


def _sig(x: float, digits: int = 4) -> str:
    """`x` to `digits` significant digits, fixed-point from 0.001 to 99999, else in e-notation."""
    if x == 0 or not 1e-3 <= abs(x) < 1e5:
        return f"{x:.{digits - 1}e}" if x else "0"
    return f"{x:.{max(0, digits - 1 - math.floor(math.log10(abs(x))))}f}"


def format_communication(p: dict[str, Any]) -> list[str]:
    """Text lines of `plan(...)["communication"]`: the recipe's collectives at its own world size."""
    c = p["communication"]
    head = (f"  communication    per rank per iteration at {c['world_size']} rank(s) ({c['nodes']} node(s) x "
            f"{c['gpus_per_node']}), {p['precision']}, ring costs, sent = received, MB = 1e6 bytes")
    if c["world_size"] == 1:
        return [head, "                     none: one rank sends nothing"]
    lines = [head]
    for item in c["collectives"]:
        lines.append(f"                     {item['what']:<76} {item['count']:>3} x {_mb(item['bytes_each']):>8} MB")
    lines.append(f"                     total {_mb(c['bytes_per_rank'])} MB (within nodes "
                 f"{_mb(c['nvlink_bytes_per_rank'])}, between nodes {_mb(c['network_bytes_per_rank'])}; not "
                 f"overlappable {_mb(c['exposed_bytes_per_rank'])})"
                 + ("; R1 adds none (D at ZeRO <= 2)" if p.get("family") != "edm" else ""))
    return lines


SCALING_COLUMNS = ("nodes x GPUs", "img/GPU", "MB/rank in node", "between", "network", "comm ms", "step s serial",
                   "overlapped", "img/s serial", "efficiency serial", "overlapped")


def _table_row(values: tuple[Any, ...]) -> str:
    """One line of the scaling table: the first two columns left-aligned, the rest right-aligned to the
    width of their SCALING_COLUMNS header, two spaces apart."""
    cells = []
    for k, (head, v) in enumerate(zip(SCALING_COLUMNS, values)):
        width = max(len(head), 13 if k == 0 else 9)
        cells.append(f"{v!s:<{width}}" if k in (0, 4) else f"{v!s:>{width}}")
    return "    " + "  ".join(cells)


def format_scaling(p: dict[str, Any]) -> list[str]:
    """Text table of `plan(...)["scaling"]`: predicted step time, images/s and efficiency at 1/2/8 nodes."""
    s = p["scaling"]
    b = s["compute_basis"]
    stages = (f"ZeRO-{s['zero_stage_g']}" if s["zero_stage_d"] is None
              else f"ZeRO-{s['zero_stage_g']} (G) / ZeRO-{s['zero_stage_d']} (D)")
    nics = ("one NIC per GPU" if s["nics_per_node"] == s["gpus_per_node"]
            else f"{s['nics_per_node']} NIC(s) a node shared by its {s['gpus_per_node']} GPUs")
    if b["source"].startswith("measured"):
        basis = (f"step_s={b['step_s']:g} s per iteration at {b['step_batch']} images on one GPU (measured, given) "
                 f"= {b['seconds_per_image'] * 1e3:.4g} ms per image")
    else:
        basis = (f"FLOP estimate {b['flops_per_image'] / 1e9:.4g} GFLOP per image at {b['mfu']:.0%} MFU of "
                 f"{b['peak_tflops']:g} TFLOP/s = {b['seconds_per_image'] * 1e3:.4g} ms per image (an assumed MFU: "
                 "pass step_s= for a measured one-GPU step)")
    lines = [f"  scaling model    PREDICTED by a model, not measured: global batch {s['global_batch']} fixed, "
             f"{stages}, {s['precision']}, NVLink {s['nvlink_gbs']:g} GB/s, network {nics}",
             f"                   compute basis: {basis}",
             _table_row(SCALING_COLUMNS)]
    one = b["one_gpu_step_s"]
    lines.append(_table_row(("1 GPU (basis)", s["global_batch"], "-", "-", "-", "-", _sig(one), "-",
                             _sig(s["global_batch"] / one), "100.00%", "-")))
    for r in s["rows"]:
        name = f"{r['nodes']} x {r['gpus_per_node']}"
        if not r["possible"]:
            lines.append(f"    {name:<13}  not possible: {r['reason']}")
            continue
        link = "-" if r["network_gbps"] is None else f"{r['network_gbps']:g} Gb/s"
        lines.append(_table_row((
            name, r["per_gpu_images"], _mb(r["nvlink_bytes_per_rank"]), _mb(r["network_bytes_per_rank"]), link,
            _sig(r["comm_s"] * 1e3, 3), _sig(r["step_s"]["serial"]), _sig(r["step_s"]["overlapped"]),
            _sig(r["images_per_s"]["serial"]), f"{r['efficiency']['serial']:.2%}",
            f"{r['efficiency']['overlapped']:.2%}")))
    lines.append("                   assumptions:")
    lines += [f"                   - {a}" for a in s["assumptions"]]
    return lines
