"""The sampler sweep: FID (and seconds per batch) of one trained EDM-family model over samplers x step counts.

    rows = run_sweep(cfg, run="runs/edm_tiny/NAME", samplers=parse_samplers("heun,euler,fastdpm:kappa=1"),
                     steps=[4, 8, 16], out="runs/edm_tiny/NAME/sweep")

Every point samples the same seeds (sample i from seed i) and is scored against the same cached reference
statistics (waveforge.evaluate), so the table compares samplers and nothing else. Writes sweep.csv,
sweep.md and fid_vs_nfe.png to `out`, and logs them (and fid/kid per point, at step = NFE) to MLflow as a
run of its own in the training run's experiment and store, tagged with the training run's id.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import re
from pathlib import Path
from typing import Any

import torch

from waveforge import config, dist, edm, inference, tracking
from waveforge.config import ConfigError, Recipe
from waveforge.evaluator import Evaluator, sampling_speed

SAMPLER_NAMES = ("heun", "euler", "edm_stochastic", "generalized", "fastdpm", "pc")
COLUMNS = ("label", "sampler", "steps", "nfe", "fid", "kid", "s_per_batch", "images_per_s", "options")


def parse_samplers(spec: str) -> list[tuple[str, dict[str, str]]]:
    """"heun,fastdpm:kappa=1:schedule=var,pc:noise_filter=pds" -> [(name, {sampler key: value}), ...]."""
    out = []
    for item in [s.strip() for s in str(spec).split(",") if s.strip()]:
        name, *opts = item.split(":")
        if name not in SAMPLER_NAMES:
            raise ConfigError(f"samplers: unknown sampler {name!r} in {item!r} (one of {', '.join(SAMPLER_NAMES)})")
        options = {}
        for o in opts:
            if "=" not in o:
                raise ConfigError(f"samplers: {o!r} in {item!r} is not key=value (e.g. fastdpm:kappa=1)")
            k, v = o.split("=", 1)
            options[k.strip()] = v.strip()
        out.append((name, options))
    if not out:
        raise ConfigError("samplers: give at least one sampler, e.g. samplers=heun,euler,fastdpm")
    return out


def parse_steps(spec: Any) -> list[int]:
    items = spec if isinstance(spec, (list, tuple)) else str(spec).split(",")
    try:
        steps = [int(str(s).strip()) for s in items if str(s).strip()]
    except ValueError:
        raise ConfigError(f"steps={spec!r}: expected a comma-separated list of integers, e.g. steps=4,8,16") from None
    if not steps or min(steps) < 1:
        raise ConfigError(f"steps={spec!r}: expected step counts >= 1")
    return steps


def point_config(run_cfg: Recipe, base: Recipe, name: str, options: dict[str, str], steps: int) -> Recipe:
    """The recipe of one sweep point: the run's model, the user's data/eval/sampler settings, then the point's."""
    c = copy.deepcopy(run_cfg)
    c.data, c.eval, c.storage = base.data, base.eval, base.storage
    c.sampler = copy.deepcopy(base.sampler)
    overrides = [f"sampler.name={name}", f"sampler.steps={steps}"]
    overrides += [f"{k if k.startswith('sampler.') else 'sampler.' + k}={v}" for k, v in options.items()]
    for item in overrides:
        key, value = config.split_override(item)
        if not key.startswith("sampler."):
            raise ConfigError(f"samplers: {item!r} is not a sampler setting")
        config.set_key(c, key, value)
    config.validate(c)
    return c


def label(name: str, options: dict[str, str]) -> str:
    return name + "".join(f":{k}={v}" for k, v in options.items())


def run_sweep(cfg: Recipe, run: str, samplers: list[tuple[str, dict[str, str]]], steps: list[int], out: str = "",
              device: torch.device | str | None = None, speed_repeats: int = 2) -> list[dict[str, Any]]:
    """Evaluate every (sampler, steps) point (collective over ranks); rank 0 writes the table and the plot."""
    device = torch.device(device) if device is not None else dist.device()
    D, run_cfg, info = inference.load_generator(run, cfg.storage, device)
    if run_cfg.model.family != "edm":
        raise ConfigError(f"{run} is a {run_cfg.model.family} model: the sampler sweep needs an EDM-family denoiser "
                          "(recipes edm_*); a diffusion GAN samples with its own T steps")
    run_dir = inference.local_folder(run)
    out_dir = Path(out) if out else (run_dir / "sweep" if run_dir is not None else Path("sweep"))
    points = [(name, opts, n) for name, opts in samplers for n in steps]
    configs = [point_config(run_cfg, cfg, name, opts, n) for name, opts, n in points]  # all errors before work
    rows: list[dict[str, Any]] = []
    evaluator = Evaluator(configs[0], device)  # one extractor and one reference for every point
    for (name, opts, n), c in zip(points, configs):
        filt = edm.noise_filter(c, D, device, run_dir)
        generate = inference.generator_fn(D, c, device, noise_filter=filt)
        speed = {"s_per_batch": float("nan"), "images_per_s": float("nan")}
        if dist.rank() == 0:
            bs = c.eval.batch_size
            speed = sampling_speed(lambda g=generate, b=bs: g(list(range(b))), bs, repeats=speed_repeats)
        result = evaluator.fid(generate, progress=False)
        suffix = evaluator.extractor.suffix  # the table's fid/kid columns hold these features' scores
        row = {"label": label(name, opts), "sampler": name, "steps": n, "nfe": edm.network_calls(c),
               "fid": result[f"fid{suffix}"], "kid": result.get(f"kid{suffix}", float("nan")), **speed,
               "options": json.dumps(edm.describe(c))}
        rows.append(row)
        dist.print0(f"{row['label']:<32} steps {n:>4d}  NFE {row['nfe']:>4d}  FID {row['fid']:.3f}  "
                    f"{row['s_per_batch']:.3f} s/batch")
    if dist.rank() == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        files = write_table(rows, out_dir, title=f"{info.get('source') or run} (step {info.get('step')}), "
                                                 f"{cfg.eval.num_samples} samples, {evaluator.extractor.name} "
                                                 "features")
        _track(cfg, run_dir, out_dir, rows, files, info, evaluator.extractor.suffix)
    dist.barrier()
    return rows


def write_table(rows: list[dict[str, Any]], out_dir: Path, title: str = "") -> list[Path]:
    """sweep.csv, sweep.md and fid_vs_nfe.png in out_dir."""
    csv_path, md_path, png_path = out_dir / "sweep.csv", out_dir / "sweep.md", out_dir / "fid_vs_nfe.png"
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS)
    w.writeheader()
    for r in rows:
        w.writerow({k: r[k] for k in COLUMNS})
    csv_path.write_text(buf.getvalue())
    md = [f"# Sampler sweep: {title}" if title else "# Sampler sweep", "",
          "| sampler | steps | NFE | FID | KID | s/batch | images/s |", "|---|---:|---:|---:|---:|---:|---:|"]
    md += [f"| {r['label']} | {r['steps']} | {r['nfe']} | {r['fid']:.3f} | {r['kid']:.4f} | {r['s_per_batch']:.3f} "
           f"| {r['images_per_s']:.1f} |" for r in rows]
    md_path.write_text("\n".join(md) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for lab in dict.fromkeys(r["label"] for r in rows):
        pts = sorted((r["nfe"], r["fid"]) for r in rows if r["label"] == lab)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=lab)
    ax.set_xscale("log")
    ax.set_xlabel("network evaluations (NFE)")
    ax.set_ylabel("FID")
    ax.set_title(title[:80], fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return [csv_path, md_path, png_path]


def _metric_key(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", text)


def _track(cfg: Recipe, run_dir: Path | None, out_dir: Path, rows: list[dict[str, Any]], files: list[Path],
           info: dict[str, Any], suffix: str) -> None:
    """A new MLflow run in the training run's store and experiment, tagged with its id (tracking.enabled)."""
    if not cfg.tracking.enabled:
        return
    c = copy.deepcopy(cfg)
    tags = {"kind": "sampler_sweep", "source": str(info.get("source") or "")}
    if run_dir is not None and (run_dir / "tracking.json").is_file():
        meta = json.loads((run_dir / "tracking.json").read_text())
        c.tracking.uri = c.tracking.uri or meta.get("tracking_uri", "")
        tags["sweep_of_run_id"] = meta.get("run_id", "")
    c.run.name = f"sweep-{run_dir.name if run_dir is not None else 'model'}"
    tracker = tracking.Tracker.open(c, out_dir, None, tags)
    for r in rows:
        tracker.log_metrics({_metric_key(f"fid{suffix}/{r['label']}"): r["fid"],
                             _metric_key(f"kid{suffix}/{r['label']}"): r["kid"],
                             _metric_key(f"s_per_batch/{r['label']}"): r["s_per_batch"]}, step=int(r["nfe"]))
    for f in files:
        tracker.log_artifact(f)
    tracker.close("FINISHED")
