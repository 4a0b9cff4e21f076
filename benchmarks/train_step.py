"""Training-step speed on CPU: one full D+G iteration with R1, and one T-step sampling pass.

    python benchmarks/train_step.py recipe=celebahq256 [batch=2] [threads=2] [repeats=3]
                                    [reference=/path/to/WaveDiff] [device=cpu|cuda] [precision=fp32|bf16]

waveforge: the recipe's full-size G and D, `diffusion.d_loss` (R1 on) + backward + Adam step, then
`diffusion.g_loss` + backward + Adam step, fp32, on a random batch of wavelet subbands; sampling =
`diffusion.sample` over T steps with an eval copy of G (conv weights in channels_last on the CPU, as the
platform samples its EMA copy). With reference=, the same iteration is run with the reference
WaveDiff's own model code (its WaveletNCSNpp / NCSNpp and Discriminator_small/large, and its diffusion.py
coefficient helpers), imported from that checkout at run time - never copied here - on the same batch
in the same process, following its train_wddgan.py step (D real + R1 + D fake, then G adversarial + L1).
Its custom CUDA ops are JIT-built at import: on the CPU their build is skipped (torch.utils.cpp_extension.load
is stubbed during the import) so they take the checkout's own pure-PyTorch path (upfirdn2d_native); with
device=cuda they are built with nvcc as the reference does (needs nvcc and ninja). precision=bf16 runs the
forward passes under torch.autocast(bfloat16) (fp32 weights and optimizer); waveforge only: the reference's
DWT backward and its CUDA upfirdn2d op reject bf16 tensors.
Reports the median of `repeats` timed runs after one warm-up round (the two implementations
alternate run by run), and the ratio reference / waveforge, of wall time and of the process's CPU time
(user + system of all its threads; with OpenMP threads that sleep instead of spinning, see below, it
hardly depends on what else runs on the machine, unlike wall time).
OMP_WAIT_POLICY defaults to PASSIVE here: on a shared CPU, spinning OpenMP threads make multi-threaded
timings 10x slower and meaningless.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP

import argparse  # noqa: E402
import contextlib  # noqa: E402
import copy  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from reference_code import no_extension_build  # noqa: E402

from waveforge import cli  # noqa: E402
from waveforge.config import Recipe  # noqa: E402
from waveforge.diffusion import d_loss, g_loss, make_schedule, sample  # noqa: E402
from waveforge.models import build_discriminator, build_generator, count_params, to_inference_layout  # noqa: E402

JOB_KEYS = {
    "batch": "images per step (default 2)",
    "threads": "torch CPU threads (default 2)",
    "repeats": "timed runs after one warm-up (default 3; the median is reported)",
    "reference": "path of a VinAIResearch/WaveDiff checkout to time side by side (optional)",
    "device": "cpu (default) or cuda",
    "precision": "fp32 (default) or bf16 (autocast of the forward passes; waveforge only)",
}


PRECISION = {"fp32": None, "bf16": torch.bfloat16}
Amp = Callable[[], contextlib.AbstractContextManager]  # the forward passes' autocast context (or a no-op)


def ours(cfg: Recipe, x0: torch.Tensor, seed: int, autocast: Amp
         ) -> tuple[Callable[[], None], Callable[[], None], int, int]:
    torch.manual_seed(seed)
    G = build_generator(cfg.model, cfg.diffusion)
    D = build_discriminator(cfg.model, cfg.diffusion)
    sched = make_schedule(cfg.diffusion)
    G, D = G.to(x0.device), D.to(x0.device)
    t_cfg, B, nz, dev = cfg.train, x0.shape[0], cfg.model.nz, x0.device
    opt_g = torch.optim.Adam(G.parameters(), lr=t_cfg.lr_g, betas=(t_cfg.beta1, t_cfg.beta2))
    opt_d = torch.optim.Adam(D.parameters(), lr=t_cfg.lr_d, betas=(t_cfg.beta1, t_cfg.beta2))

    def step() -> None:
        D.requires_grad_(True)
        G.requires_grad_(False)
        t = torch.randint(0, sched.num_timesteps, (B,), device=dev)
        with autocast():
            loss, _ = d_loss(G, D, sched, x0, t, torch.randn(B, nz, device=dev), t_cfg.r1_gamma, do_r1=True)
        opt_d.zero_grad(set_to_none=True)
        loss.backward()
        opt_d.step()
        D.requires_grad_(False)
        G.requires_grad_(True)
        t = torch.randint(0, sched.num_timesteps, (B,), device=dev)
        with autocast():
            loss, _ = g_loss(G, D, sched, x0, t, torch.randn(B, nz, device=dev), t_cfg.rec_weight)
        opt_g.zero_grad(set_to_none=True)
        loss.backward()
        opt_g.step()

    # Sampling uses an eval copy of G, as the platform samples its EMA copy of G (and a CPU copy gets its conv
    # weights in the sampler's channels_last layout, as inference.generator_fn does).
    G_eval = to_inference_layout(copy.deepcopy(G).eval())

    def sampling() -> None:
        with autocast():  # sample() runs without gradients
            sample(G_eval, sched, torch.randn_like(x0), latents=lambda step: torch.randn(B, nz, device=dev))

    return step, sampling, count_params(G), count_params(D)


def reference_args(cfg: Recipe) -> argparse.Namespace:
    """The reference's train_wddgan.py arguments for this recipe (its defaults + run.sh values)."""
    m, d = cfg.model, cfg.diffusion
    return argparse.Namespace(
        image_size=m.resolution // 2, num_channels=4 * m.channels, num_channels_dae=m.nf, ch_mult=list(m.ch_mult),
        num_res_blocks=m.num_res_blocks, attn_resolutions=list(m.attn_resolutions) or [0], dropout=m.dropout,
        nz=m.nz, z_emb_dim=m.z_emb_dim, t_emb_dim=m.t_emb_dim, n_mlp=m.n_mlp, patch_size=m.patch_size,
        centered=True, resamp_with_conv=True, conditional=True, fir=True, fir_kernel=[1, 3, 3, 1],
        skip_rescale=True, resblock_type="biggan", progressive="none", progressive_input="residual",
        progressive_combine="sum", embedding_type="positional", fourier_scale=16.0, not_use_tanh=False,
        num_timesteps=d.num_timesteps, beta_min=d.beta_min, beta_max=d.beta_max, use_geometric=d.use_geometric,
        no_use_fbn=not m.freq_bottleneck, no_use_freq=not m.wavelet_updown, no_use_residual=not m.input_pyramid)


def reference(path: str, cfg: Recipe, x0: torch.Tensor, seed: int, autocast: Amp
              ) -> tuple[Callable[[], None], Callable[[], None], int, int]:
    root = Path(path).expanduser().resolve()
    if not (root / "score_sde" / "models" / "ncsnpp_generator_adagn.py").is_file():
        cli.fail(f"reference={path}: not a WaveDiff checkout (no score_sde/models/ncsnpp_generator_adagn.py)")
    sys.path.insert(0, str(root))
    with no_extension_build() if x0.device.type == "cpu" else contextlib.nullcontext():
        import score_sde.op  # noqa: F401
    from diffusion import (
        Diffusion_Coefficients,
        Posterior_Coefficients,
        q_sample_pairs,
        sample_from_model,
        sample_posterior,
    )
    from score_sde.models.discriminator import Discriminator_large, Discriminator_small
    from score_sde.models.ncsnpp_generator_adagn import NCSNpp, WaveletNCSNpp

    args = reference_args(cfg)
    m, t_cfg = cfg.model, cfg.train
    torch.manual_seed(seed)
    dev = x0.device
    G = (WaveletNCSNpp if m.generator == "wavelet" else NCSNpp)(args).to(dev)
    D = (Discriminator_small if m.d_layers <= 4 else Discriminator_large)(
        nc=2 * args.num_channels, ngf=m.d_nf, t_emb_dim=m.t_emb_dim, act=nn.LeakyReLU(0.2), num_layers=m.d_layers
    ).to(dev)
    coeff = Diffusion_Coefficients(args, x0.device)
    pos_coeff = Posterior_Coefficients(args, x0.device)
    opt_g = torch.optim.Adam(G.parameters(), lr=t_cfg.lr_g, betas=(t_cfg.beta1, t_cfg.beta2))
    opt_d = torch.optim.Adam(D.parameters(), lr=t_cfg.lr_d, betas=(t_cfg.beta1, t_cfg.beta2))
    B, nz, T = x0.shape[0], m.nz, args.num_timesteps

    def step() -> None:  # train_wddgan.py's iteration, R1 on
        for p in D.parameters():
            p.requires_grad = True
        D.zero_grad()
        for p in G.parameters():
            p.requires_grad = False
        t = torch.randint(0, T, (B,), device=dev)
        x_t, x_tp1 = q_sample_pairs(coeff, x0, t)
        x_t.requires_grad = True
        with autocast():
            d_real = D(x_t, t, x_tp1.detach()).view(-1)
        err_real = F.softplus(-d_real).mean()
        err_real.backward(retain_graph=True)
        (grad,) = torch.autograd.grad(outputs=d_real.sum(), inputs=x_t, create_graph=True)
        penalty = t_cfg.r1_gamma / 2 * (grad.view(B, -1).norm(2, dim=1) ** 2).mean()
        penalty.backward()
        with autocast():
            x0_pred = G(x_tp1.detach(), t, torch.randn(B, nz, device=dev))
            x_fake = sample_posterior(pos_coeff, x0_pred, x_tp1, t)
            err_fake = F.softplus(D(x_fake, t, x_tp1.detach()).view(-1)).mean()
        err_fake.backward()
        opt_d.step()
        for p in D.parameters():
            p.requires_grad = False
        for p in G.parameters():
            p.requires_grad = True
        G.zero_grad()
        t = torch.randint(0, T, (B,), device=dev)
        x_t, x_tp1 = q_sample_pairs(coeff, x0, t)
        with autocast():
            x0_pred = G(x_tp1.detach(), t, torch.randn(B, nz, device=dev))
            x_fake = sample_posterior(pos_coeff, x0_pred, x_tp1, t)
            err_g = F.softplus(-D(x_fake, t, x_tp1.detach()).view(-1)).mean() + F.l1_loss(x0_pred.float(), x0)
        err_g.backward()
        opt_g.step()

    def sampling() -> None:
        with autocast():
            sample_from_model(pos_coeff, G, T, torch.randn_like(x0), None, args)

    return step, sampling, sum(p.numel() for p in G.parameters()), sum(p.numel() for p in D.parameters())


def main() -> None:
    a = cli.parse(sys.argv[1:], "train_step", __doc__.split("\n\n")[0], job_keys=JOB_KEYS, default_recipe="celebahq256")
    cfg = a.cfg
    batch, threads, repeats = int(a.job.get("batch", 2)), int(a.job.get("threads", 2)), int(a.job.get("repeats", 3))
    if batch < 1 or threads < 1 or repeats < 1:
        cli.fail("batch, threads and repeats must be >= 1")
    device, precision = str(a.job.get("device", "cpu")), str(a.job.get("precision", "fp32"))
    if device not in ("cpu", "cuda") or (device == "cuda" and not torch.cuda.is_available()):
        cli.fail(f"device={device}: expected cpu, or cuda on a machine with a CUDA GPU")
    if precision not in PRECISION:
        cli.fail(f"precision={precision}: expected one of {', '.join(PRECISION)}")
    if precision != "fp32" and "reference" in a.job:
        cli.fail(f"precision={precision} with reference=: the reference's DWT backward and CUDA upfirdn2d op reject "
                 "bf16 tensors; compare in fp32")
    dtype = PRECISION[precision]

    def autocast() -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if dtype is None else torch.autocast(device, dtype=dtype)

    torch.set_num_threads(threads)
    r = cfg.model.resolution // 2
    x0 = (torch.rand(batch, 4 * cfg.model.channels, r, r, generator=torch.Generator().manual_seed(0)) * 2 - 1) * 0.5
    x0 = x0.to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    impls = {"waveforge": ours(cfg, x0, seed=0, autocast=autocast)}
    if "reference" in a.job:
        impls["reference"] = reference(str(a.job["reference"]), cfg, x0, seed=0, autocast=autocast)
    where = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {threads} thread(s)"
    print(f"recipe {cfg.recipe}: batch {batch}, {where}, {repeats} timed runs (median), {precision}; "
          "implementations interleaved run by run so a changing machine load hits both alike")
    for name, (_, _, g_params, d_params) in impls.items():
        print(f"{name:>10}: G {g_params / 1e6:.3f} M, D {d_params / 1e6:.3f} M parameters")
    whats = ("train step (D+R1, G)", f"sampling ({cfg.diffusion.num_timesteps} steps)")
    results: dict[str, dict[str, float]] = {name: {} for name in impls}
    cpu_results: dict[str, dict[str, float]] = {name: {} for name in impls}
    for i, what in enumerate(whats):
        times: dict[str, list[float]] = {name: [] for name in impls}
        cpu: dict[str, list[float]] = {name: [] for name in impls}
        for rep in range(repeats + 1):  # the first round is the warm-up
            for name, impl in impls.items():
                sync()
                start, cpu_start = time.perf_counter(), time.process_time()
                impl[i]()
                sync()
                if rep > 0:
                    times[name].append(time.perf_counter() - start)
                    cpu[name].append(time.process_time() - cpu_start)
        for name in impls:
            results[name][what] = statistics.median(times[name])
            cpu_results[name][what] = statistics.median(cpu[name])
            print(f"{name:>10}: {what}: {results[name][what]:.2f} s, CPU {cpu_results[name][what]:.2f} s  "
                  f"(runs: {', '.join(f'{t:.2f}' for t in times[name])})", flush=True)
    if "reference" in results:
        for what in whats:
            ratio = results["reference"][what] / results["waveforge"][what]
            cpu_ratio = cpu_results["reference"][what] / cpu_results["waveforge"][what]
            print(f"speed-up {what}: {ratio:.2f}x (reference / waveforge; target >= 1.25x); CPU time "
                  f"{cpu_ratio:.2f}x")


if __name__ == "__main__":
    cli.run_main(main)
