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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"
MASK = "***"


class UserError(Exception):
    """Something the user gave cannot work: a recipe value, a path, a file, credentials, an address. Entry
    points print its message as one line (`error: ...`) and exit with status 2, with no traceback. Every
    layer's errors of this kind derive from it (ConfigError, storage.AccessDenied, checkpoint.CheckpointError,
    metrics.InceptionUnavailable, data.DataError, ...)."""


class ConfigError(UserError, ValueError):
    """A recipe, an override or a value is invalid. Entry points print it and exit with status 2."""


# --------------------------------------------------------------------------------------------------
# Field rules: each field validates by itself, and its error names that field
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """What a field's value must satisfy, said to the user, and a value that breaks it (for the tests)."""

    ok: Callable[[Any], bool]
    allowed: str
    bad: Any


def at_least(lo: float, note: str = "") -> Rule:
    return Rule(lambda v: v >= lo, f">= {lo}{note}", lo - 1)


def above(lo: float, note: str = "") -> Rule:
    return Rule(lambda v: v > lo, f"> {lo}{note}", lo)


def between(lo: float, hi: float, *, hi_open: bool = False, lo_open: bool = False, note: str = "") -> Rule:
    def ok(v: Any) -> bool:
        return (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)

    text = f"{lo} {'<' if lo_open else '<='} value {'<' if hi_open else '<='} {hi}{note}"
    return Rule(ok, text, hi + 1)


def one_of(*values: Any, note: str = "") -> Rule:
    return Rule(lambda v: v in values, f"one of {', '.join(map(str, values))}{note}", max(values) + 1)


POWER_OF_TWO = Rule(lambda v: v >= 8 and v & (v - 1) == 0, "a power of two >= 8", 48)
POSITIVE_LIST = Rule(lambda v: len(v) >= 1 and all(x >= 1 for x in v), "a non-empty list of integers >= 1", [])


def _field(default: Any, rule: Rule | None = None) -> Any:
    meta = {"rule": rule} if rule is not None else {}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------------------------------
# The schema. Defaults are the reference WaveDiff CelebA-HQ 256 settings unless a comment says else.
# --------------------------------------------------------------------------------------------------


@dataclass
class RunConfig:
    name: str = ""  # run name; "" = <UTC time YYYYmmdd-HHMMSS> chosen once at start/submission
    dir: str = ""  # run folder; "" = runs/<recipe>/<name>. Everything the run writes locally goes here.
    seed: int = 0  # the run is a function of (recipe, seed)
    resume: str = _field("auto", Rule(lambda v: bool(v.strip()), "auto, never, or a checkpoint path/URL", " "))


@dataclass
class ModelConfig:
    family: Literal["wavediff", "edm"] = "wavediff"  # diffusion GAN (G + D) or EDM-preconditioned denoiser (one net)
    resolution: int = _field(256, POWER_OF_TWO)  # image size in pixels (the generator works at resolution/2)
    channels: int = _field(3, at_least(1))  # image channels (x4 subbands in wavelet space)
    generator: Literal["wavelet", "ncsnpp"] = "wavelet"  # wavelet NCSN++ (WaveDiff) or plain NCSN++ on subbands
    nf: int = _field(64, at_least(1))  # base channel count of the generator (reference: num_channels_dae)
    ch_mult: list[int] = _field([1, 2, 2, 2, 4], POSITIVE_LIST)
    num_res_blocks: int = _field(2, at_least(1))
    attn_resolutions: list[int] = _field([16])  # feature-map sizes with attention
    dropout: float = _field(0.0, between(0, 1, hi_open=True))
    nz: int = _field(100, at_least(1))  # latent z dimension
    z_emb_dim: int = _field(256, at_least(1))  # mapping network width
    t_emb_dim: int = _field(256, at_least(1))  # discriminator time-embedding width
    n_mlp: int = _field(3, at_least(1))  # mapping network depth
    patch_size: int = _field(1, one_of(1, 2, 4))  # pixel-unshuffle patch size at the generator's input (2 at 1024 px)
    wavelet_updown: bool = True  # frequency-aware down/up-sampling residual blocks (ablation: False)
    input_pyramid: bool = True  # wavelet residual input pyramid (ablation: False)
    freq_bottleneck: bool = True  # frequency bottleneck block (ablation: False)
    d_nf: int = _field(64, at_least(1))  # discriminator base channels (reference: ngf)
    d_layers: int = _field(5, at_least(2))  # discriminator down blocks: 3-4 = small variant, 5-6 = large variant


@dataclass
class DiffusionConfig:
    num_timesteps: int = _field(2, between(1, 1000))  # T: denoising steps of the diffusion GAN
    beta_min: float = _field(0.1, above(0))  # VP schedule (EDM family's VP precond: beta_d = beta_max - beta_min)
    beta_max: float = _field(20.0, above(0))
    use_geometric: bool = False  # geometric (VE-like) schedule instead of VP
    # The EDM family (model.family=edm; Karras et al. 2022), in the orthonormal Haar space.
    precond: Literal["edm", "vp"] = "edm"  # EDM or VP (DDPM++) preconditioning and training loss
    sigma_data: float = _field(0.5, above(0))  # EDM: expected data standard deviation
    sigma_min: float = _field(0.002, above(0))  # the noise levels the denoiser supports (sampling is clipped to them)
    sigma_max: float = _field(80.0, above(0))
    p_mean: float = -1.2  # EDM loss: ln(sigma) ~ N(p_mean, p_std^2)
    p_std: float = _field(1.2, above(0))
    epsilon_t: float = _field(1e-5, between(0, 1, lo_open=True, hi_open=True))  # VP loss: t ~ U(epsilon_t, 1)


@dataclass
class SamplerConfig:
    """How the EDM family samples (evaluation, grids, jobs/sample.py, jobs/sweep_samplers.py)."""

    name: Literal["heun", "euler", "edm_stochastic", "generalized", "fastdpm", "pc"] = "heun"
    steps: int = _field(18, at_least(1))  # time steps N (heun: 2N-1 network calls; fastdpm: S; pc: predictor steps)
    rho: float = _field(7.0, above(0))  # EDM time-step exponent
    sigma_min: float = _field(0.0, at_least(0, " (0 = diffusion.sigma_min)"))
    sigma_max: float = _field(0.0, at_least(0, " (0 = diffusion.sigma_max)"))
    s_churn: float = _field(0.0, at_least(0))  # edm_stochastic / generalized: EDM's S_churn, S_min, S_max, S_noise
    s_min: float = 0.0
    s_max: float = math.inf
    s_noise: float = _field(1.0, above(0))
    solver: Literal["heun", "euler"] = "heun"  # generalized sampler
    discretization: Literal["edm", "vp", "ve", "iddpm"] = "edm"  # generalized sampler
    sigma_schedule: Literal["linear", "vp", "ve"] = "linear"  # generalized sampler: sigma(t)
    scaling: Literal["none", "vp"] = "none"  # generalized sampler: s(t)
    schedule: Literal["var", "step"] = "step"  # fastdpm: noise-level (VAR) or step (STEP) schedule
    spacing: Literal["linear", "quadratic"] = "quadratic"  # fastdpm schedule spacing
    kappa: float = _field(0.0, between(0, 1, note=" (0 = DDIM-rev, 1 = DDPM-rev)"))  # fastdpm
    allow_infeasible: bool = False  # fastdpm VAR: too few steps to reach the last noise level -> start lower (official)
    corrector_steps: int = _field(1, at_least(0))  # pc: Langevin corrector steps per noise level
    snr: float = _field(0.16, above(0))  # pc: Langevin signal-to-noise ratio
    noise_filter: Literal["none", "tdas", "pds"] = "none"  # space-frequency filtered noise (pds: also the drift)
    filter_alpha: float = _field(5.0, above(1))  # filter strength: values in [1, alpha/(alpha-1)]
    filter_source: Literal["data", "gap"] = "data"  # data spectrum, or the generated-vs-real spectrum gap (TDAS)
    filter_samples: int = _field(512, at_least(2))  # images used to estimate the filters
    filter_path: str = ""  # filters file ("" = noise_filters-<source>.pt in the run folder, estimated once)


@dataclass
class DataConfig:
    url: str = ""  # shard folder / manifest: plain path, file://, s3://bucket/prefix, gs://...
    synthetic_if_missing: bool = False  # embedded default: draw synthetic shards there if none exist
    synthetic_samples: int = _field(2048, at_least(1))  # size of that synthetic set
    num_workers: int = _field(2, at_least(0))  # loader worker processes per rank
    shuffle_buffer: int = _field(1000, at_least(0))  # samples permuted together across shards (0 = in-shard only)
    hflip: bool = True  # random horizontal flip augmentation
    cache_dir: str = ""  # local cache of downloaded shards ("" = none)
    on_error: Literal["skip", "fail"] = "skip"  # corrupt sample / missing shard: skip and count, or stop
    retries: int = _field(5, at_least(0))  # read retries with exponential backoff on transient storage errors
    audit_order: bool = False  # record the keys of every global batch in <run>/data-order/ (jobs/data_order.py)


@dataclass
class StorageConfig:
    endpoint_url: str = ""  # S3-compatible endpoint ("" = AWS or the AWS_ENDPOINT_URL env var)
    region: str = ""
    access_key: str = ""  # credential: never printed or saved; "" = AWS_ACCESS_KEY_ID from the environment
    secret_key: str = ""  # credential: never printed or saved; "" = AWS_SECRET_ACCESS_KEY
    credentials_file: str = ""  # file with AWS_ACCESS_KEY_ID=... and AWS_SECRET_ACCESS_KEY=... lines (mode 0600)


@dataclass
class TrainConfig:
    total_images: int = _field(500 * 30_000, at_least(1))  # training length in images (reference: epochs x set size)
    max_steps: int = _field(0, at_least(0, " (0 = no limit)"))  # stop after this many iterations; smoke runs, tests
    batch_size: int = _field(64, at_least(1))  # GLOBAL batch per optimizer step (per-GPU batch x GPUs x grad_accum)
    lr_g: float = _field(2e-4, between(0, 1, lo_open=True, hi_open=True))
    lr_d: float = _field(1e-4, between(0, 1, lo_open=True, hi_open=True))
    lr_min: float = _field(1e-5, at_least(0))  # cosine schedule floor (reference); <= lr_g, lr_d
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    lr_warmup_images: int = _field(0, at_least(0))  # linear learning-rate ramp over the first images (EDM: 10M)
    beta1: float = _field(0.5, between(0, 1, hi_open=True))  # Adam
    beta2: float = _field(0.9, between(0, 1, hi_open=True))
    r1_gamma: float = _field(2.0, at_least(0))  # R1 penalty weight (gamma/2 * E|grad D(real)|^2)
    lazy_reg: int = _field(10, at_least(1))  # R1 every this many D steps
    rec_weight: float = _field(1.0, at_least(0))  # L1 reconstruction of x0 in wavelet space
    ema_decay: float = _field(0.9999, between(0, 1, hi_open=True))
    ema_warmup_images: int = _field(0, at_least(0))  # EMA half-life ramp over the first images (0 = fixed decay)
    grad_clip: float = _field(0.0, at_least(0, " (0 = off)"))  # global gradient-norm clip
    log_every_images: int = _field(10_000, at_least(1))  # metrics interval


@dataclass
class DistConfig:
    zero_stage_g: int = _field(2, one_of(0, 1, 2, 3))  # DeepSpeed ZeRO stage of the generator engine
    zero_stage_d: int = _field(2, one_of(0, 1, 2, note=" (the discriminator's R1 double backward fails on "
                                                       "ZeRO-3-sharded parameters)"))
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    grad_accum: int = _field(1, at_least(1))  # gradient accumulation steps: micro-batch = batch / (ranks x grad_accum)
    activation_checkpointing: bool = False  # recompute generator activations in backward (512/1024 px)
    backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto = nccl on CUDA, gloo on CPU
    # torch.compile of every block of G and D (regional; D eager on R1 steps): a torch.compile backend
    compile: Literal["none", "inductor", "aot_eager"] = "none"


@dataclass
class CheckpointConfig:
    every_images: int = _field(500_000, at_least(0, " (0 = only at the end and on a stop)"))  # save interval
    keep_last: int = _field(3, at_least(1))  # complete checkpoints kept locally
    milestone_every_images: int = _field(0, at_least(0))  # also keep every checkpoint at multiples of this (0 = none)
    url: str = ""  # object-storage copy (s3://bucket/prefix/...; "" = local only); uploaded in the background
    remote_keep_last: int = _field(0, at_least(0, " (0 = keep all)"))  # kept at `url` (milestones always)
    background: bool = True  # write and publish in background threads: training stalls only for the snapshot
    direct_io: bool = True  # write shards with O_DIRECT (page cache bypassed) where the filesystem takes it
    upload_mb_s: float = _field(200.0, at_least(0, " (0 = unbounded)"))  # the upload process's bandwidth bound
    upload_nice: int = _field(19, between(0, 19))  # the upload process's CPU priority (19 = lowest)


@dataclass
class EvalConfig:
    every_images: int = _field(2_000_000, at_least(0, " (0 = never)"))  # periodic FID/KID + sample grid
    num_samples: int = _field(10_000, at_least(2))  # generated images for FID (and real images for the reference)
    batch_size: int = _field(50, at_least(1))  # per-rank generation / feature batch
    features: Literal["inception", "proxy"] = "inception"  # Inception (clean-fid, downloaded) or the offline proxy
    mode: Literal["clean", "legacy_pytorch", "legacy_tensorflow"] = "clean"  # clean-fid feature mode (Inception)
    kid: bool = True
    feature_extractor: str = _field("", Rule(lambda v: not v or ":" in v, "module:callable", "x"))  # replaces Inception
    inception_path: str = ""  # local Inception weights for offline clusters ("" = clean-fid's download)
    grid_size: int = _field(64, at_least(1))  # images in the fixed-seed sample grid
    kid_subsets: int = _field(100, at_least(1))  # KID: random subsets averaged (clean-fid's kernel_distance)
    kid_subset_size: int = _field(1000, at_least(2))  # KID: images per subset (at most num_samples)
    reference_url: str = ""  # folder of cached reference statistics ("" = fid-stats/ next to the data manifest)


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str = ""  # MLflow tracking URI ("" = MLFLOW_TRACKING_URI, else sqlite in the runs folder)
    experiment: str = ""  # "" = the recipe name


@dataclass
class ClusterConfig:
    backend: Literal["auto", "slurm", "local"] = "auto"  # auto: slurm when sbatch is on PATH, else local
    nodes: int = _field(1, at_least(1))
    gpus_per_node: int = _field(1, at_least(0))  # one task per GPU
    tasks_per_node: int = _field(0, at_least(0, " (0 = gpus_per_node)"))  # CPU-only cluster: tasks per node
    cpus_per_task: int = _field(8, at_least(1))
    mem: str = ""  # per node, e.g. 400G ("" = the partition's default)
    partition: str = ""
    account: str = ""
    qos: str = ""
    time: str = "24:00:00"  # HH:MM:SS, D-HH:MM:SS or minutes
    constraint: str = ""
    exclude: str = ""
    signal_delay_s: int = _field(120, at_least(0))  # USR2 this long before the time limit: checkpoint, then requeue
    max_requeue: int = _field(20, at_least(0))  # preemptions / time-outs before giving up


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

SECRET_FIELDS = {"storage.secret_key", "storage.access_key"}
# Fields that do not change what is trained: a resumed run may differ from its checkpoint only in these.
NON_TRAINING_PREFIXES = ("run.", "cluster.", "tracking.", "eval.", "sampler.", "checkpoint.", "storage.", "recipe")
NON_TRAINING_FIELDS = {"data.url", "data.num_workers", "data.cache_dir", "data.retries", "train.max_steps",
                       "train.log_every_images", "data.synthetic_if_missing", "data.on_error",
                       "data.audit_order"}


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
    flat_d = _flatten(d)
    if flat_d.get("dist.grad_accum") == 0:  # saved before its default became 1 (0 then meant 1)
        flat_d["dist.grad_accum"] = 1
    for k, v in flat_d.items():
        set_key(cfg, k, v)
    validate(cfg)
    return cfg


# --------------------------------------------------------------------------------------------------
# Validation: ranges and cross-field rules. Anything that would fail later fails here, before a start.
# --------------------------------------------------------------------------------------------------


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is out of range: {allowed}")


def field_rules(cls: type = Recipe, prefix: str = "") -> dict[str, Rule]:
    """Every field's own rule, by dotted key."""
    out: dict[str, Rule] = {}
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(field_rules(hints[f.name], f"{prefix}{f.name}."))
        elif "rule" in f.metadata:
            out[prefix + f.name] = f.metadata["rule"]
    return out


def _get(cfg: Recipe, key: str) -> Any:
    obj: Any = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def validate(cfg: Recipe) -> None:
    """ConfigError naming the first field that is out of range: each field by its own rule (in schema
    order), then the rules that relate two fields (naming the field they constrain)."""
    for key, rule in field_rules().items():
        value = _get(cfg, key)
        _check(rule.ok(value), key, value, rule.allowed)
    m, d, t, c, sp = cfg.model, cfg.diffusion, cfg.train, cfg.cluster, cfg.sampler
    g_res = m.resolution // 2 // m.patch_size
    levels = len(m.ch_mult)
    _check(g_res % (2 ** (levels - 1)) == 0 and g_res // 2 ** (levels - 1) >= 2, "model.ch_mult", m.ch_mult,
           f"at most {max(1, (g_res // 2).bit_length())} levels for a {g_res} px generator input "
           f"(model.resolution={m.resolution}, model.patch_size={m.patch_size})")
    if m.family == "wavediff":  # the EDM family has no discriminator
        _check(m.resolution // 2 // 2 ** m.d_layers >= 1, "model.d_layers", m.d_layers,
               f"<= {max(2, (m.resolution // 2).bit_length() - 1)} at model.resolution={m.resolution}")
    _check(d.beta_min < d.beta_max, "diffusion.beta_min", d.beta_min, f"< diffusion.beta_max={d.beta_max}")
    _check(d.sigma_min < d.sigma_max, "diffusion.sigma_min", d.sigma_min, f"< diffusion.sigma_max={d.sigma_max}")
    _check(sp.noise_filter != "pds" or sp.name == "pc", "sampler.noise_filter", sp.noise_filter,
           f"tdas or none with sampler={sp.name} (pds preconditions the drift of sampler=pc)")
    _check(t.lr_min <= min(t.lr_g, t.lr_d), "train.lr_min", t.lr_min,
           f"<= train.lr_g={t.lr_g} and train.lr_d={t.lr_d}")
    _check(c.gpus_per_node >= 1 or c.tasks_per_node >= 1, "cluster.gpus_per_node", c.gpus_per_node,
           ">= 1, or set cluster.tasks_per_node for a CPU-only cluster")
    time_limit_minutes(c.time)  # raises on a bad format, naming cluster.time


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


def micro_batch(cfg: Recipe, world: int) -> int:
    """Per-rank micro-batch: the global batch / (ranks x dist.grad_accum) (check_resources says if it splits)."""
    return cfg.train.batch_size // (world * cfg.dist.grad_accum)


def check_resources(cfg: Recipe, world: int) -> None:
    """ConfigError unless the global batch splits over `world` ranks: evenly into micro-batches of
    dist.grad_accum steps, and into whole data streams per rank (see data_streams)."""
    b = cfg.train.batch_size
    acc = cfg.dist.grad_accum
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


def with_run_folder(cfg: Recipe, name: str) -> Recipe:
    """A copy of `cfg` whose run has a name (`name` unless run.name is set) and an absolute run.dir
    (runs/<recipe>/<name> unless run.dir is set). Entry points call this once; everything after reads
    cfg.run.dir."""
    out = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run))
    out.run.name = out.run.name or name
    out.run.dir = str(Path(out.run.dir or Path("runs") / out.recipe / out.run.name).absolute())
    return out


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


def without_secrets(cfg: Recipe) -> Recipe:
    """A copy of `cfg` without its credentials (what may be pickled into a submitted job: the job reads them
    from its environment or from storage.credentials_file on the node)."""
    out = dataclasses.replace(cfg, storage=dataclasses.replace(cfg.storage))
    for key in SECRET_FIELDS:
        sec, name = key.split(".")
        setattr(getattr(out, sec), name, "")
    return out


def load_saved(path: str | os.PathLike) -> Recipe:
    """Read a recipe written by `save` (secret fields come back empty: they are taken from the environment)."""
    d = yaml.safe_load(Path(path).read_text())
    for key in SECRET_FIELDS:
        sec, name = key.split(".")
        if d.get(sec, {}).get(name) == MASK:
            d[sec][name] = ""
    return from_dict(d)
