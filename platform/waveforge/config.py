"""Recipes: the typed schema of everything a run needs, YAML loading, overrides, validation.

A recipe is `recipes/<name>.yaml`: only what differs from the defaults below (or from the recipe
named by its `base:` key). Every entry point takes `recipe=NAME` plus dotted overrides
(`train.lr_g=1e-4`) and the short cluster aliases (`nodes=8`, `time=24:00:00`, ...).

Errors are `ConfigError` (entry points exit with status 2): an unknown key names the closest valid
keys, a wrong type or an out-of-range value names the key, the value and what is allowed.
Secrets (fields listed in SECRET_FIELDS) are masked in every printed or saved form.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"
MASK = "***"


class ConfigError(ValueError):
    """A recipe, an override or a value is invalid. Entry points print it and exit with status 2."""


# --------------------------------------------------------------------------------------------------
# The schema. Defaults are the reference WaveDiff CelebA-HQ 256 settings unless a comment says else.
# --------------------------------------------------------------------------------------------------


@dataclass
class RunConfig:
    name: str = ""  # run name; "" = <UTC time YYYYmmdd-HHMMSS> chosen once at start/submission
    dir: str = ""  # run folder; "" = runs/<recipe>/<name>. Everything the run writes locally goes here.
    seed: int = 0  # the run is a function of (recipe, seed)
    resume: str = "auto"  # auto: continue from the run folder's latest checkpoint; never; or a checkpoint path/URL


@dataclass
class ModelConfig:
    family: Literal["wavediff", "edm"] = "wavediff"  # diffusion GAN (G + D) or EDM-preconditioned denoiser (one net)
    resolution: int = 256  # image size in pixels (the generator works at resolution/2 in wavelet space)
    channels: int = 3  # image channels (x4 subbands in wavelet space)
    generator: Literal["wavelet", "ncsnpp"] = "wavelet"  # wavelet NCSN++ (WaveDiff) or plain NCSN++ on subbands
    nf: int = 64  # base channel count of the generator (reference: num_channels_dae)
    ch_mult: list[int] = field(default_factory=lambda: [1, 2, 2, 2, 4])
    num_res_blocks: int = 2
    attn_resolutions: list[int] = field(default_factory=lambda: [16])  # feature-map sizes with attention
    dropout: float = 0.0
    nz: int = 100  # latent z dimension
    z_emb_dim: int = 256  # mapping network width
    t_emb_dim: int = 256  # discriminator time-embedding width
    n_mlp: int = 3  # mapping network depth
    patch_size: int = 1  # pixel-unshuffle patch size at the generator's input (2 for 1024 px)
    wavelet_updown: bool = True  # frequency-aware down/up-sampling residual blocks (ablation: False)
    input_pyramid: bool = True  # wavelet residual input pyramid (ablation: False)
    freq_bottleneck: bool = True  # frequency bottleneck block (ablation: False)
    d_nf: int = 64  # discriminator base channels (reference: ngf)
    d_layers: int = 5  # discriminator down blocks: 3-4 = small variant, 5-6 = large variant


@dataclass
class DiffusionConfig:
    num_timesteps: int = 2  # T: denoising steps of the diffusion GAN
    beta_min: float = 0.1  # VP schedule (also the EDM family's VP preconditioning: beta_d = beta_max - beta_min)
    beta_max: float = 20.0
    use_geometric: bool = False  # geometric (VE-like) schedule instead of VP
    # The EDM family (model.family=edm; Karras et al. 2022), in the orthonormal Haar space.
    precond: Literal["edm", "vp"] = "edm"  # EDM or VP (DDPM++) preconditioning and training loss
    sigma_data: float = 0.5  # EDM: expected data standard deviation
    sigma_min: float = 0.002  # the noise levels the denoiser supports (sampling is clipped to them)
    sigma_max: float = 80.0
    p_mean: float = -1.2  # EDM loss: ln(sigma) ~ N(p_mean, p_std^2)
    p_std: float = 1.2
    epsilon_t: float = 1e-5  # VP loss: t ~ U(epsilon_t, 1)


@dataclass
class SamplerConfig:
    """How the EDM family samples (evaluation, grids, jobs/sample.py, jobs/sweep_samplers.py)."""

    name: Literal["heun", "euler", "edm_stochastic", "generalized", "fastdpm", "pc"] = "heun"
    steps: int = 18  # time steps N (heun: 2N-1 network calls; fastdpm: S; pc: predictor steps)
    rho: float = 7.0  # EDM time-step exponent
    sigma_min: float = 0.0  # 0 = diffusion.sigma_min
    sigma_max: float = 0.0  # 0 = diffusion.sigma_max
    s_churn: float = 0.0  # edm_stochastic / generalized: EDM's S_churn, S_min, S_max, S_noise
    s_min: float = 0.0
    s_max: float = math.inf
    s_noise: float = 1.0
    solver: Literal["heun", "euler"] = "heun"  # generalized sampler
    discretization: Literal["edm", "vp", "ve", "iddpm"] = "edm"  # generalized sampler
    sigma_schedule: Literal["linear", "vp", "ve"] = "linear"  # generalized sampler: sigma(t)
    scaling: Literal["none", "vp"] = "none"  # generalized sampler: s(t)
    schedule: Literal["var", "step"] = "step"  # fastdpm: noise-level (VAR) or step (STEP) schedule
    spacing: Literal["linear", "quadratic"] = "quadratic"  # fastdpm schedule spacing
    kappa: float = 0.0  # fastdpm: 1 = DDPM-rev, 0 = DDIM-rev
    allow_infeasible: bool = False  # fastdpm VAR: too few steps to reach the last noise level -> start lower (official)
    corrector_steps: int = 1  # pc: Langevin corrector steps per noise level
    snr: float = 0.16  # pc: Langevin signal-to-noise ratio
    noise_filter: Literal["none", "tdas", "pds"] = "none"  # space-frequency filtered noise (pds: also the drift)
    filter_alpha: float = 5.0  # filter strength: values in [1, alpha/(alpha-1)]
    filter_source: Literal["data", "gap"] = "data"  # data spectrum, or the generated-vs-real spectrum gap (TDAS)
    filter_samples: int = 512  # images used to estimate the filters
    filter_path: str = ""  # filters file ("" = noise_filters-<source>.pt in the run folder, estimated once)


@dataclass
class DataConfig:
    url: str = ""  # shard folder / manifest: plain path, file://, s3://bucket/prefix, gs://...
    synthetic_if_missing: bool = False  # embedded default: draw synthetic shards there if none exist
    synthetic_samples: int = 2048  # size of that synthetic set
    num_workers: int = 2  # DataLoader workers per rank
    shuffle_buffer: int = 1000  # mixing window: samples permuted together across consecutive shards (0 = in-shard only)
    hflip: bool = True  # random horizontal flip augmentation
    cache_dir: str = ""  # local cache of downloaded shards ("" = none)
    on_error: Literal["skip", "fail"] = "skip"  # corrupt sample / missing shard: skip and count, or stop
    retries: int = 5  # read retries with exponential backoff on transient storage errors


@dataclass
class StorageConfig:
    endpoint_url: str = ""  # S3-compatible endpoint ("" = AWS or the AWS_ENDPOINT_URL env var)
    region: str = ""
    access_key: str = ""  # "" = AWS_ACCESS_KEY_ID from the environment
    secret_key: str = ""  # secret: never printed or saved; "" = AWS_SECRET_ACCESS_KEY


@dataclass
class TrainConfig:
    total_images: int = 500 * 30_000  # training length in images (reference: epochs x dataset size)
    max_steps: int = 0  # stop after this many iterations (0 = run to total_images); smoke runs, tests
    batch_size: int = 64  # GLOBAL batch per optimizer step (per-GPU batch x GPUs x grad_accum)
    lr_g: float = 2e-4
    lr_d: float = 1e-4
    lr_min: float = 1e-5  # cosine schedule floor (reference)
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    lr_warmup_images: int = 0  # linear learning-rate ramp over the first images (EDM: 10M)
    beta1: float = 0.5  # Adam
    beta2: float = 0.9
    r1_gamma: float = 2.0  # R1 penalty weight (gamma/2 * E|grad D(real)|^2)
    lazy_reg: int = 10  # R1 every this many D steps
    rec_weight: float = 1.0  # L1 reconstruction of x0 in wavelet space
    ema_decay: float = 0.9999
    ema_warmup_images: int = 0  # EMA half-life ramp over the first images (0 = the reference's fixed decay)
    grad_clip: float = 0.0  # global gradient-norm clip (0 = off)
    log_every_images: int = 10_000  # metrics interval


@dataclass
class DistConfig:
    zero_stage_g: int = 2  # DeepSpeed ZeRO stage of the generator engine (0-3)
    zero_stage_d: int = 2  # of the discriminator engine (0-2: R1 double backward fails at ZeRO-3)
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    grad_accum: int = 0  # gradient accumulation steps (0 = 1, or what the global batch needs)
    activation_checkpointing: bool = False  # recompute generator activations in backward (512/1024 px)
    backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto = nccl on CUDA, gloo on CPU


@dataclass
class CheckpointConfig:
    every_images: int = 500_000  # save interval
    keep_last: int = 3  # complete checkpoints kept locally
    milestone_every_images: int = 0  # also keep every checkpoint at multiples of this (0 = none)
    url: str = ""  # object-storage copy (s3://bucket/prefix/...; "" = local only); uploaded in the background
    remote_keep_last: int = 0  # complete checkpoints kept at `url` (milestones always; 0 = keep all)


@dataclass
class EvalConfig:
    every_images: int = 2_000_000  # periodic FID/KID + sample grid (0 = never during training)
    num_samples: int = 10_000  # generated images for FID (and real images for the reference statistics)
    batch_size: int = 50  # per-rank generation / feature batch
    mode: Literal["clean", "legacy_pytorch", "legacy_tensorflow"] = "clean"  # clean-fid feature mode
    kid: bool = True
    feature_extractor: str = ""  # "module:callable" replacing Inception (clean-fid custom_feat_extractor)
    inception_path: str = ""  # local Inception weights for offline clusters ("" = clean-fid's download)
    grid_size: int = 64  # images in the fixed-seed sample grid
    kid_subsets: int = 100  # KID: random subsets averaged (clean-fid's kernel_distance)
    kid_subset_size: int = 1000  # KID: images per subset (at most num_samples)
    reference_url: str = ""  # folder of cached reference statistics ("" = fid-stats/ next to the data manifest)


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str = ""  # MLflow tracking URI ("" = MLFLOW_TRACKING_URI, else sqlite in the runs folder)
    experiment: str = ""  # "" = the recipe name


@dataclass
class ClusterConfig:
    backend: Literal["auto", "slurm", "local"] = "auto"  # auto: slurm when sbatch is on PATH, else local
    nodes: int = 1
    gpus_per_node: int = 1  # one task per GPU
    tasks_per_node: int = 0  # CPU-only cluster: tasks per node (0 = gpus_per_node)
    cpus_per_task: int = 8
    mem: str = ""  # per node, e.g. 400G ("" = the partition's default)
    partition: str = ""
    account: str = ""
    qos: str = ""
    time: str = "24:00:00"  # HH:MM:SS, D-HH:MM:SS or minutes
    constraint: str = ""
    exclude: str = ""
    signal_delay_s: int = 120  # USR2 this long before the time limit: checkpoint, then requeue
    max_requeue: int = 20  # preemptions / time-outs before giving up


@dataclass
class Recipe:
    recipe: str = ""  # the recipe's name (set by load)
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


# Short names a cluster user types; each maps to one dotted key.
ALIASES: dict[str, str] = {
    "nodes": "cluster.nodes",
    "gpus_per_node": "cluster.gpus_per_node",
    "tasks_per_node": "cluster.tasks_per_node",
    "cpus_per_task": "cluster.cpus_per_task",
    "mem": "cluster.mem",
    "partition": "cluster.partition",
    "account": "cluster.account",
    "qos": "cluster.qos",
    "time": "cluster.time",
    "constraint": "cluster.constraint",
    "exclude": "cluster.exclude",
    "cluster": "cluster.backend",
    "seed": "run.seed",
    "resume": "run.resume",
    "max_steps": "train.max_steps",
    "batch": "train.batch_size",
    "sampler": "sampler.name",
    "steps": "sampler.steps",
    "schedule": "sampler.schedule",
    "kappa": "sampler.kappa",
    "noise_filter": "sampler.noise_filter",
}

SECRET_FIELDS = {"storage.secret_key"}
# Fields that do not change what is trained: a resumed run may differ from its checkpoint only in these.
NON_TRAINING_PREFIXES = ("run.", "cluster.", "tracking.", "eval.", "sampler.", "checkpoint.", "storage.", "recipe")
NON_TRAINING_FIELDS = {"data.url", "data.num_workers", "data.cache_dir", "data.retries", "train.max_steps",
                       "train.log_every_images", "data.synthetic_if_missing", "data.on_error"}


# --------------------------------------------------------------------------------------------------
# Generic typed access to nested dataclasses
# --------------------------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """YAML 1.2-style scalars: 1e-4 is a float (PyYAML says string) and 24:00:00 a string (PyYAML: 86400)."""


_INT, _FLOAT = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in rs if tag not in (_INT, _FLOAT)]
    for ch, rs in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_INT, re.compile(r"^[-+]?(0|[1-9][0-9_]*)$"), list("-+0123456789"))
_Loader.add_implicit_resolver(
    _FLOAT,
    re.compile(r"^[-+]?(\.[0-9]+|[0-9][0-9_]*(\.[0-9_]*)?)([eE][-+]?[0-9]+)?$"
               r"|^[-+]?\.(inf|Inf|INF)$|^\.(nan|NaN|NAN)$"),
    list("-+0123456789."))


def _fields(obj: Any) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(obj)}


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def all_keys(cls: type = Recipe, prefix: str = "") -> list[str]:
    """Every dotted leaf key of the schema."""
    keys = []
    for name, tp in _hints(cls).items():
        if dataclasses.is_dataclass(tp):
            keys += all_keys(tp, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {typing.get_args(tp)[0].__name__}"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check/convert `value` to type `tp`; raise ConfigError naming key, value and what is allowed."""
    bad = ConfigError(f"{key}={value!r} is not valid: expected {_describe(tp)}")
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise bad
        return value
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise bad
        (item,) = typing.get_args(tp)
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if tp is str:
        if value is None:
            return ""
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. time=60, mem=400 typed bare
        if not isinstance(value, str):
            raise bad
        return value
    raise bad


def _unknown_key(key: str, valid: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
    if not close:  # try the leaf name alone (e.g. "lr_g" -> "train.lr_g")
        leaf = key.rsplit(".", 1)[-1]
        close = [k for k in valid if k.rsplit(".", 1)[-1] == leaf][:3]
        close = close or difflib.get_close_matches(leaf, valid, n=3, cutoff=0.4)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ConfigError(f"unknown key {key!r}{hint} (all keys: jobs/<job>.py --print-keys)")


def set_key(cfg: Recipe, key: str, value: Any) -> None:
    """Set dotted `key` of `cfg` to `value`, type-checked."""
    key = ALIASES.get(key, key)
    parts = key.split(".")
    obj: Any = cfg
    for depth, part in enumerate(parts):
        if not dataclasses.is_dataclass(obj) or part not in _fields(obj):
            raise _unknown_key(key, all_keys() + list(ALIASES))
        tp = _hints(type(obj))[part]
        if depth == len(parts) - 1:
            if dataclasses.is_dataclass(tp):
                if not isinstance(value, dict):
                    raise ConfigError(f"{key} is a section; set its keys, e.g. {key}.{next(iter(_hints(tp)))}=...")
                for k, v in value.items():
                    set_key(cfg, f"{key}.{k}", v)
            else:
                setattr(obj, part, _coerce(key, value, tp))
        else:
            obj = getattr(obj, part)


def get_key(cfg: Recipe, key: str) -> Any:
    obj: Any = cfg
    for part in ALIASES.get(key, key).split("."):
        obj = getattr(obj, part)
    return obj


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + str(k)] = v
    return out


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def available_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def _read_recipe(name: str, chain: tuple[str, ...] = ()) -> dict[str, Any]:
    """The recipe's flat dotted overrides, with its `base:` chain applied first."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else RECIPES_DIR / f"{name}.yaml"
    if not path.is_file():
        avail = available_recipes()
        close = difflib.get_close_matches(name, avail, n=3, cutoff=0.4)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown recipe {name!r}.{hint} Available recipes: {', '.join(avail)}")
    if name in chain:
        raise ConfigError(f"recipe {name!r}: circular base chain {' -> '.join(chain + (name,))}")
    try:
        data = yaml.load(path.read_text(), Loader=_Loader) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path}: expected a mapping of keys, got {type(data).__name__}")
    base = data.pop("base", None)
    flat = _read_recipe(base, chain + (name,)) if base else {}
    for k, v in _flatten(data).items():
        flat[k] = v
    return flat


def parse_value(text: str) -> Any:
    """Parse an override's value as YAML (so 1e-4, true, [1,2,2], null work); fall back to the string."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError:
        return text


def load(name: str, overrides: dict[str, Any] | list[str] | None = None) -> Recipe:
    """Resolve recipe `name` with `overrides` ({"train.lr_g": 1e-4} or ["train.lr_g=1e-4"]); validate."""
    cfg = Recipe(recipe=Path(name).stem)
    for k, v in _read_recipe(name).items():
        try:
            set_key(cfg, k, v)
        except ConfigError as e:
            raise ConfigError(f"recipe {name!r}: {e}") from e
    if isinstance(overrides, list):
        overrides = dict(split_override(o) for o in overrides)
    for k, v in (overrides or {}).items():
        set_key(cfg, k, v)
    validate(cfg)
    return cfg


def split_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"{text!r}: expected key=value (e.g. train.lr_g=1e-4, nodes=2)")
    k, v = text.split("=", 1)
    if not k:
        raise ConfigError(f"{text!r}: empty key")
    return k.strip(), parse_value(v)


def from_dict(d: dict[str, Any]) -> Recipe:
    """Rebuild a Recipe from `to_dict` output (a saved run's recipe.yaml); validates."""
    cfg = Recipe()
    for k, v in _flatten(d).items():
        set_key(cfg, k, v)
    validate(cfg)
    return cfg


# --------------------------------------------------------------------------------------------------
# Validation: ranges and cross-field rules. Anything that would fail later fails here, before a start.
# --------------------------------------------------------------------------------------------------


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is out of range: {allowed}")


def validate(cfg: Recipe) -> None:
    m, d, t, ds, c = cfg.model, cfg.diffusion, cfg.train, cfg.dist, cfg.cluster
    _check(m.resolution >= 8 and m.resolution & (m.resolution - 1) == 0, "model.resolution", m.resolution,
           "a power of two >= 8")
    _check(m.channels >= 1, "model.channels", m.channels, ">= 1")
    _check(m.nf >= 1, "model.nf", m.nf, ">= 1")
    _check(len(m.ch_mult) >= 1 and all(x >= 1 for x in m.ch_mult), "model.ch_mult", m.ch_mult,
           "a non-empty list of integers >= 1")
    _check(m.num_res_blocks >= 1, "model.num_res_blocks", m.num_res_blocks, ">= 1")
    _check(0.0 <= m.dropout < 1.0, "model.dropout", m.dropout, "0 <= dropout < 1")
    _check(m.nz >= 1 and m.z_emb_dim >= 1 and m.t_emb_dim >= 1, "model.nz", m.nz, "nz, z_emb_dim, t_emb_dim >= 1")
    _check(m.n_mlp >= 1, "model.n_mlp", m.n_mlp, ">= 1")
    _check(m.patch_size in (1, 2, 4), "model.patch_size", m.patch_size, "1, 2 or 4")
    g_res = m.resolution // 2 // m.patch_size
    _check(g_res % (2 ** (len(m.ch_mult) - 1)) == 0 and g_res // 2 ** (len(m.ch_mult) - 1) >= 2, "model.ch_mult",
           m.ch_mult, f"at most {max(1, (g_res // 2).bit_length())} levels for a {g_res} px generator input")
    if m.family == "wavediff":  # the EDM family has no discriminator
        _check(m.d_layers >= 2 and m.resolution // 2 // 2 ** m.d_layers >= 1, "model.d_layers", m.d_layers,
               f"2 <= d_layers <= {max(2, (m.resolution // 2).bit_length() - 1)} at {m.resolution} px")
    _check(m.d_nf >= 1, "model.d_nf", m.d_nf, ">= 1")
    _check(1 <= d.num_timesteps <= 1000, "diffusion.num_timesteps", d.num_timesteps, "1..1000")
    _check(0 < d.beta_min < d.beta_max, "diffusion.beta_min", d.beta_min, "0 < beta_min < beta_max")
    _check(0 < d.sigma_min < d.sigma_max, "diffusion.sigma_min", d.sigma_min, "0 < sigma_min < sigma_max")
    _check(d.sigma_data > 0 and d.p_std > 0, "diffusion.sigma_data", d.sigma_data, "sigma_data, p_std > 0")
    _check(0 < d.epsilon_t < 1, "diffusion.epsilon_t", d.epsilon_t, "0 < epsilon_t < 1")
    sp = cfg.sampler
    _check(sp.steps >= 1, "sampler.steps", sp.steps, ">= 1")
    _check(sp.sigma_min >= 0 and sp.sigma_max >= 0, "sampler.sigma_min", sp.sigma_min, ">= 0 (0 = diffusion's)")
    _check(sp.rho > 0 and sp.s_noise > 0 and sp.s_churn >= 0, "sampler.rho", sp.rho, "rho, s_noise > 0, s_churn >= 0")
    _check(0 <= sp.kappa <= 1, "sampler.kappa", sp.kappa, "0 <= kappa <= 1 (0 = DDIM-rev, 1 = DDPM-rev)")
    _check(sp.corrector_steps >= 0 and sp.snr > 0, "sampler.corrector_steps", sp.corrector_steps, ">= 0, snr > 0")
    _check(sp.filter_alpha > 1, "sampler.filter_alpha", sp.filter_alpha, "> 1")
    _check(sp.filter_samples >= 2, "sampler.filter_samples", sp.filter_samples, ">= 2")
    _check(sp.noise_filter != "pds" or sp.name == "pc", "sampler.noise_filter", sp.noise_filter,
           "tdas or none with sampler=" + sp.name + " (pds preconditions the drift of sampler=pc)")
    _check(t.batch_size >= 1, "train.batch_size", t.batch_size, ">= 1")
    _check(t.total_images >= 1, "train.total_images", t.total_images, ">= 1")
    _check(t.max_steps >= 0, "train.max_steps", t.max_steps, ">= 0 (0 = no limit)")
    for k in ("lr_g", "lr_d"):
        _check(0 < getattr(t, k) < 1, f"train.{k}", getattr(t, k), "0 < lr < 1")
    _check(0 <= t.lr_min <= min(t.lr_g, t.lr_d), "train.lr_min", t.lr_min, "0 <= lr_min <= lr_g, lr_d")
    _check(0 <= t.beta1 < 1 and 0 <= t.beta2 < 1, "train.beta1", t.beta1, "0 <= beta1, beta2 < 1")
    _check(t.r1_gamma >= 0, "train.r1_gamma", t.r1_gamma, ">= 0")
    _check(t.lazy_reg >= 1, "train.lazy_reg", t.lazy_reg, ">= 1")
    _check(t.rec_weight >= 0, "train.rec_weight", t.rec_weight, ">= 0")
    _check(0 <= t.ema_decay < 1, "train.ema_decay", t.ema_decay, "0 <= ema_decay < 1")
    _check(t.ema_warmup_images >= 0 and t.grad_clip >= 0, "train.ema_warmup_images", t.ema_warmup_images, ">= 0")
    _check(t.lr_warmup_images >= 0, "train.lr_warmup_images", t.lr_warmup_images, ">= 0")
    _check(t.log_every_images >= 1, "train.log_every_images", t.log_every_images, ">= 1")
    _check(ds.zero_stage_g in (0, 1, 2, 3), "dist.zero_stage_g", ds.zero_stage_g, "0, 1, 2 or 3")
    _check(ds.zero_stage_d in (0, 1, 2), "dist.zero_stage_d", ds.zero_stage_d,
           "0, 1 or 2 (the discriminator's R1 double backward fails on ZeRO-3-sharded parameters)")
    _check(ds.grad_accum >= 0, "dist.grad_accum", ds.grad_accum, ">= 0 (0 = automatic)")
    _check(cfg.data.num_workers >= 0 and cfg.data.shuffle_buffer >= 0, "data.num_workers", cfg.data.num_workers,
           ">= 0")
    _check(cfg.data.retries >= 0, "data.retries", cfg.data.retries, ">= 0")
    _check(cfg.data.synthetic_samples >= 1, "data.synthetic_samples", cfg.data.synthetic_samples, ">= 1")
    _check(cfg.checkpoint.every_images >= 0, "checkpoint.every_images", cfg.checkpoint.every_images, ">= 0")
    _check(cfg.checkpoint.keep_last >= 1, "checkpoint.keep_last", cfg.checkpoint.keep_last, ">= 1")
    _check(cfg.checkpoint.remote_keep_last >= 0, "checkpoint.remote_keep_last", cfg.checkpoint.remote_keep_last,
           ">= 0 (0 = keep all)")
    _check(cfg.eval.every_images >= 0, "eval.every_images", cfg.eval.every_images, ">= 0 (0 = never)")
    _check(cfg.eval.num_samples >= 2, "eval.num_samples", cfg.eval.num_samples, ">= 2")
    _check(cfg.eval.batch_size >= 1 and cfg.eval.grid_size >= 1, "eval.batch_size", cfg.eval.batch_size, ">= 1")
    _check(cfg.eval.kid_subsets >= 1, "eval.kid_subsets", cfg.eval.kid_subsets, ">= 1")
    _check(cfg.eval.kid_subset_size >= 2, "eval.kid_subset_size", cfg.eval.kid_subset_size, ">= 2")
    if cfg.eval.feature_extractor:
        _check(":" in cfg.eval.feature_extractor, "eval.feature_extractor", cfg.eval.feature_extractor,
               "module:callable")
    _check(c.nodes >= 1, "cluster.nodes", c.nodes, ">= 1")
    _check(c.gpus_per_node >= 0, "cluster.gpus_per_node", c.gpus_per_node, ">= 0")
    _check(c.tasks_per_node >= 0, "cluster.tasks_per_node", c.tasks_per_node, ">= 0 (0 = gpus_per_node)")
    _check(c.gpus_per_node >= 1 or c.tasks_per_node >= 1, "cluster.gpus_per_node", c.gpus_per_node,
           ">= 1, or set cluster.tasks_per_node for a CPU-only cluster")
    _check(c.cpus_per_task >= 1, "cluster.cpus_per_task", c.cpus_per_task, ">= 1")
    _check(c.signal_delay_s >= 0 and c.max_requeue >= 0, "cluster.signal_delay_s", c.signal_delay_s, ">= 0")
    time_limit_minutes(c.time)  # raises on a bad format
    if cfg.run.resume not in ("auto", "never"):
        _check(bool(cfg.run.resume.strip()), "run.resume", cfg.run.resume, "auto, never, or a checkpoint path/URL")


def time_limit_minutes(text: str) -> int:
    """Slurm's time formats (M, HH:MM:SS, D-HH[:MM[:SS]]) to whole minutes; ConfigError if malformed."""
    err = ConfigError(f"cluster.time={text!r} is not valid: expected minutes, HH:MM:SS or D-HH:MM:SS")
    days = 0
    rest = str(text).strip()
    if "-" in rest:
        d, rest = rest.split("-", 1)
        if not d.isdigit():
            raise err
        days = int(d)
    parts = rest.split(":")
    if not all(p.isdigit() for p in parts) or not 1 <= len(parts) <= 3:
        raise err
    nums = [int(p) for p in parts]
    if days and len(nums) == 1:
        h, mi, s = nums[0], 0, 0
    elif len(nums) == 1:
        h, mi, s = 0, nums[0], 0
    elif len(nums) == 2:
        h, mi, s = (0, nums[0], nums[1]) if not days else (nums[0], nums[1], 0)
    else:
        h, mi, s = nums
    total = days * 24 * 60 + h * 60 + mi + (1 if s else 0)
    if total < 1:
        raise err
    return total


def world_size(cfg: Recipe) -> int:
    """Number of ranks (one task per GPU; tasks_per_node on a CPU cluster)."""
    c = cfg.cluster
    return c.nodes * (c.tasks_per_node or c.gpus_per_node)


MAX_DATA_STREAMS = 64


def data_streams(global_batch: int) -> int:
    """The data loader's virtual streams for a global batch: gcd(batch, 64); the rank count must divide it
    (each rank serves whole streams, which makes the batch sequence independent of the rank count)."""
    return math.gcd(int(global_batch), MAX_DATA_STREAMS)


def check_resources(cfg: Recipe, world: int | None = None) -> int:
    """Validate the recipe against `world` ranks; return gradient-accumulation steps. ConfigError if not."""
    world = world or world_size(cfg)
    b = cfg.train.batch_size
    acc = cfg.dist.grad_accum or 1
    fits = [w for w in range(1, data_streams(b) + 1) if data_streams(b) % w == 0 and b % (w * acc) == 0]
    if b % (world * acc):
        raise ConfigError(
            f"train.batch_size={b} is not divisible by ranks x grad_accum = {world} x {acc}: the global batch "
            f"must split evenly (rank counts that fit: {fits}; or change train.batch_size / dist.grad_accum)")
    if data_streams(b) % world:
        raise ConfigError(
            f"{world} ranks cannot share train.batch_size={b}: the data loader splits it into {data_streams(b)} "
            f"streams (gcd(batch, {MAX_DATA_STREAMS})) and each rank serves whole streams; rank counts that fit: "
            f"{fits}, or use a global batch with more factors of two")
    return acc


# --------------------------------------------------------------------------------------------------
# Output: dict / YAML with secrets masked, hashes
# --------------------------------------------------------------------------------------------------


def to_dict(cfg: Recipe, mask_secrets: bool = True) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    if mask_secrets:
        for key in SECRET_FIELDS:
            sec, name = key.split(".")
            if d[sec][name]:
                d[sec][name] = MASK
    return d


def to_yaml(cfg: Recipe) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)


def flat(cfg: Recipe) -> dict[str, Any]:
    return _flatten(to_dict(cfg))


def training_fields(cfg: Recipe) -> dict[str, Any]:
    """The fields that change what is trained (used for the recipe hash and the resume check)."""
    return {k: v for k, v in flat(cfg).items()
            if not k.startswith(NON_TRAINING_PREFIXES) and k not in NON_TRAINING_FIELDS}


def training_hash(cfg: Recipe) -> str:
    return hashlib.sha256(json.dumps(training_fields(cfg), sort_keys=True).encode()).hexdigest()[:16]


def diff_training_fields(a: Recipe, b: Recipe) -> list[str]:
    fa, fb = training_fields(a), training_fields(b)
    return [f"{k}: {fa.get(k)!r} -> {fb.get(k)!r}" for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]


def save(cfg: Recipe, path: str | os.PathLike) -> None:
    """Write the resolved recipe (secrets masked) as YAML."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(to_yaml(cfg))


def load_saved(path: str | os.PathLike) -> Recipe:
    """Read a recipe written by `save` (secret fields come back empty: they are taken from the environment)."""
    d = yaml.safe_load(Path(path).read_text())
    for key in SECRET_FIELDS:
        sec, name = key.split(".")
        if d.get(sec, {}).get(name) == MASK:
            d[sec][name] = ""
    return from_dict(d)
