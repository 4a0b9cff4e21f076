"""Sampling speed: seconds per batch of the T-step sampler, waveforge vs the reference WaveDiff.

    python benchmarks/sampling.py recipe=celebahq256 [batch=N] [repeats=N] [reference=/path/to/WaveDiff]
                                  [precision=fp32|bf16] [threads=N] [key=value ...]

Times what produces images from noise: the T generator calls with the posterior steps, then the inverse
wavelet transform (the reference's own timing in test_wddgan.py --measure_time covers the same), random
weights (speed does not depend on them), one warm-up batch excluded, CUDA synchronized. waveforge's
sampler draws every sample's noise from its own seed (sample i is a function of seed i alone) and that cost
is included. With reference=, the reference's WaveletNCSNpp is built from the same recipe and timed the
same way; where its CUDA extension ops cannot be built (no GPU / nvcc) a pure-PyTorch upfirdn2d stands in
for them. Prints both timings and the ratio (reference s/batch / waveforge s/batch; target >= 1.25).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

from waveforge import cli, diffusion, models, wavelet
from waveforge.config import Recipe
from waveforge.evaluate import sampling_speed

JOB_KEYS = {
    "batch": "images per batch (default: 100 on a GPU, the paper's 256 px table; 25 on CPU, its 1024 px batch)",
    "repeats": "timed batches after one warm-up batch (default: 10 on a GPU, 2 on CPU)",
    "reference": "path of a VinAIResearch/WaveDiff checkout to time side by side (optional)",
    "precision": "fp32 (default; the reference samples in fp32) or bf16 (autocast, waveforge only)",
    "threads": "CPU threads for both samplers (default: torch's default, one per core)",
}


def _upfirdn2d(x: torch.Tensor, kernel: torch.Tensor, up: int | tuple = 1, down: int | tuple = 1,
               pad: tuple = (0, 0)) -> torch.Tensor:
    """Upsample by zero insertion, pad, FIR-filter, downsample (the reference op's semantics, plain torch)."""
    up_x, up_y = (up, up) if isinstance(up, int) else up
    down_x, down_y = (down, down) if isinstance(down, int) else down
    p = tuple(pad) * 2 if len(pad) == 2 else tuple(pad)  # (x0, x1, y0, y1)
    b, c, h, w = x.shape
    y = x.reshape(b * c, 1, h, w)
    if up_x > 1 or up_y > 1:
        z = y.new_zeros(b * c, 1, h * up_y, w * up_x)
        z[:, :, ::up_y, ::up_x] = y
        y = z
    y = F.pad(y, [max(p[0], 0), max(p[1], 0), max(p[2], 0), max(p[3], 0)])
    y = y[:, :, max(-p[2], 0): y.shape[2] - max(-p[3], 0), max(-p[0], 0): y.shape[3] - max(-p[1], 0)]
    k = torch.flip(kernel, [0, 1]).to(y)[None, None]
    y = F.conv2d(y, k)[:, :, ::down_y, ::down_x]
    return y.reshape(b, c, y.shape[2], y.shape[3])


def _reference_ops_stub() -> types.ModuleType:
    mod = types.ModuleType("score_sde.op")
    mod.upfirdn2d = _upfirdn2d

    def fused_leaky_relu(x: torch.Tensor, bias: torch.Tensor, negative_slope: float = 0.2,
                         scale: float = 2 ** 0.5) -> torch.Tensor:
        shape = [1, bias.shape[0]] + [1] * (x.ndim - 2)
        return F.leaky_relu(x + bias.view(shape), negative_slope) * scale

    class FusedLeakyReLU(torch.nn.Module):
        def __init__(self, channel: int, negative_slope: float = 0.2, scale: float = 2 ** 0.5) -> None:
            super().__init__()
            self.bias = torch.nn.Parameter(torch.zeros(channel))
            self.negative_slope, self.scale = negative_slope, scale

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return fused_leaky_relu(x, self.bias, self.negative_slope, self.scale)

    mod.fused_leaky_relu = fused_leaky_relu
    mod.FusedLeakyReLU = FusedLeakyReLU
    return mod


def reference_args(cfg: Recipe) -> argparse.Namespace:
    """The reference's test_wddgan.py arguments for this recipe (run.sh's values for CelebA-HQ 256)."""
    m, d = cfg.model, cfg.diffusion
    return argparse.Namespace(
        image_size=m.resolution // 2, current_resolution=m.resolution // 2, num_channels=4 * m.channels,
        num_channels_dae=m.nf, ch_mult=list(m.ch_mult), num_res_blocks=m.num_res_blocks,
        attn_resolutions=list(m.attn_resolutions) or [0], dropout=m.dropout, nz=m.nz, z_emb_dim=m.z_emb_dim,
        t_emb_dim=m.t_emb_dim, n_mlp=m.n_mlp, patch_size=m.patch_size, centered=True, resamp_with_conv=True,
        conditional=True, fir=True, fir_kernel=[1, 3, 3, 1], skip_rescale=True, resblock_type="biggan",
        progressive="none", progressive_input="residual", progressive_combine="sum", embedding_type="positional",
        fourier_scale=16.0, not_use_tanh=False, num_timesteps=d.num_timesteps, beta_min=d.beta_min,
        beta_max=d.beta_max, use_geometric=d.use_geometric, no_use_fbn=not m.freq_bottleneck,
        no_use_freq=not m.wavelet_updown, no_use_residual=not m.input_pyramid, use_pytorch_wavelet=False,
        net_type="wavelet" if m.generator == "wavelet" else "normal")


def reference_sampler(path: str, cfg: Recipe, batch: int, device: torch.device):
    """(generate_batch, parameter count) of the reference checkout at `path`."""
    root = Path(path).expanduser().resolve()
    if not (root / "score_sde" / "models" / "ncsnpp_generator_adagn.py").is_file():
        cli.fail(f"reference={path}: not a WaveDiff checkout (no score_sde/models/ncsnpp_generator_adagn.py)")
    sys.path.insert(0, str(root))
    try:
        if device.type != "cuda":
            raise ImportError("no CUDA")
        import score_sde.op  # noqa: F401  (JIT-builds the reference's CUDA ops; needs nvcc)
    except Exception as e:  # noqa: BLE001  (any build failure: fall back to plain torch ops)
        print(f"reference: CUDA extension ops unavailable ({type(e).__name__}); using a plain-torch upfirdn2d")
        import score_sde

        sys.modules["score_sde.op"] = score_sde.op = _reference_ops_stub()
    from diffusion import Posterior_Coefficients, get_time_schedule, sample_from_model
    from DWT_IDWT.DWT_IDWT_layer import IDWT_2D
    from score_sde.models.ncsnpp_generator_adagn import NCSNpp, WaveletNCSNpp

    args = reference_args(cfg)
    net = (WaveletNCSNpp if args.net_type == "wavelet" else NCSNpp)(args).to(device).eval()
    iwt = IDWT_2D("haar")
    coeff = Posterior_Coefficients(args, device)
    T = get_time_schedule(args, device)

    @torch.no_grad()
    def generate() -> torch.Tensor:
        x = torch.randn(batch, args.num_channels, args.image_size, args.image_size, device=device)
        x = sample_from_model(coeff, net, args.num_timesteps, x, T, args) * 2
        return iwt(x[:, :3], x[:, 3:6], x[:, 6:9], x[:, 9:12])

    return generate, sum(p.numel() for p in net.parameters())


def main() -> None:
    args = cli.parse(sys.argv[1:], "sampling", __doc__.split("\n\n")[0], job_keys=JOB_KEYS,
                     default_recipe="celebahq256")
    cfg = args.cfg
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    batch = int(args.job.get("batch", 100 if device.type == "cuda" else 25))
    repeats = int(args.job.get("repeats", 10 if device.type == "cuda" else 2))
    precision = str(args.job.get("precision", "fp32"))
    if "threads" in args.job:
        threads = int(args.job["threads"])
        if threads < 1:
            cli.fail(f"threads={threads} must be >= 1")
        torch.set_num_threads(threads)
    if batch < 1 or repeats < 1:
        cli.fail(f"batch={batch} and repeats={repeats} must be >= 1")
    if precision not in ("fp32", "bf16"):
        cli.fail(f"precision={precision!r}: expected fp32 or bf16")

    torch.manual_seed(0)
    # Eval mode, and on the CPU conv weights in the sampler's channels_last layout: as inference.generator_fn.
    G = models.to_inference_layout(models.build_generator(cfg.model, cfg.diffusion).to(device).eval())
    sched = diffusion.make_schedule(cfg.diffusion, device)
    shape = (4 * cfg.model.channels, cfg.model.resolution // 2, cfg.model.resolution // 2)
    seeds = list(range(batch))

    @torch.no_grad()
    def ours() -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            w = diffusion.sample_from_seeds(G, sched, seeds, shape, cfg.model.nz, device)
        return wavelet.from_wavelet(w.float())

    n_ours = sum(p.numel() for p in G.parameters())
    print(f"recipe {cfg.recipe}: {cfg.model.resolution} px, T={cfg.diffusion.num_timesteps}, batch {batch}, "
          f"{repeats} timed batches each, device {device} ({torch.get_num_threads()} CPU threads), {precision}")
    samplers = {"waveforge": (ours, n_ours)}
    if "reference" in args.job:
        samplers["reference"] = reference_sampler(str(args.job["reference"]), cfg, batch, device)
    for fn, _ in samplers.values():  # warm-up (allocator, cuDNN autotuning, lazy init)
        fn()
    # Interleaved rounds: a shared or throttled machine slows both samplers alike.
    # The process CPU time per batch is also shown on CPU: unlike wall time it hardly depends on how many
    # other processes share the cores.
    times: dict[str, list[float]] = {name: [] for name in samplers}
    cpu: dict[str, list[float]] = {name: [] for name in samplers}
    for r in range(repeats):
        for name, (fn, _) in samplers.items():
            c0 = time.process_time()
            times[name].append(sampling_speed(fn, batch, repeats=1, warmup=0)["s_per_batch"])
            cpu[name].append(time.process_time() - c0)
        line = "  ".join(f"{name} {t[-1]:.3f} s (CPU {cpu[name][-1]:.2f} s)" for name, t in times.items())
        if "reference" in times:
            line += f"  ratio {times['reference'][-1] / times['waveforge'][-1]:.2f}x"
        print(f"round {r + 1}/{repeats}: {line}", flush=True)
    median = {name: statistics.median(t) for name, t in times.items()}
    median_cpu = {name: statistics.median(t) for name, t in cpu.items()}
    for name, (_, n_params) in samplers.items():
        print(f"{name:<10}: {median[name]:8.3f} s/batch (median; min {min(times[name]):.3f})  "
              f"{batch / median[name]:8.2f} images/s  CPU {median_cpu[name]:.2f} s/batch  "
              f"G {n_params / 1e6:.3f}M params")
    if "reference" in median:
        ratio = median["reference"] / median["waveforge"]
        print(f"speed-up (reference s/batch / waveforge s/batch): {ratio:.2f}x (target >= 1.25x)")
        if device.type == "cpu":
            print(f"CPU-time ratio (reference / waveforge): {median_cpu['reference'] / median_cpu['waveforge']:.2f}x")


if __name__ == "__main__":
    cli.run_main(main)
