"""FID/KID math, feature extractors and reference statistics: knows nothing of checkpoints, models or jobs.

The numbers equal clean-fid's (https://github.com/GaParmar/clean-fid, 0.1.35): the same feature network
(loaded by clean-fid's own classes), the same resize/quantization per mode (clean-fid's `build_resizer`), the
same Frechet distance (`cleanfid.fid.frechet_distance`) and the same KID estimator (clean-fid's
`kernel_distance`: unbiased MMD with the cubic polynomial kernel over random subsets).

Distribution: every rank extracts features of its share (generated sample i comes from seed i and rank r
makes samples r, r+world, ...), accumulates float64 count / sum / sum of outer products, and ONE all-reduce
gives the mean and covariance on every rank. The result does not depend on the rank count or batch size.
KID needs the features themselves: with `kid=True` every rank also holds all N x D float32 features after a
second all-reduce (N=10k: 82 MB, N=50k: 410 MB per rank at D=2048); FID alone needs only D x D.

Offline clusters: clean-fid downloads the Inception weights at first use (see `inception_help`); set
`eval.inception_path` to a copy of the file instead.

    extractor = load_feature_extractor(cfg.eval, device)               # clean-fid Inception or module:callable
    fake = generate_features(generate, n, extractor, batch_size, kid=True).reduce()     # COLLECTIVE -> Stats
    real = dataset_reference(cfg, extractor)                             # COLLECTIVE, cached next to the data
    scores(real, fake, kid=True)                                         # {"fid", "kid"} on every rank
    fid_folders(real_dir, fake_dir, cfg.eval)  # two image folders, like cleanfid.fid.compute_fid
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import io
import json
import os
import shutil
import sys
import tempfile
import time
import urllib.error
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from glob import glob
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cleanfid import downloads_helper
from cleanfid.fid import frechet_distance
from cleanfid.resize import build_resizer
from cleanfid.utils import EXTENSIONS
from PIL import Image

from waveforge import data, dist, proxy_features
from waveforge import storage as wf_storage
from waveforge.config import ConfigError, EvalConfig, Recipe, StorageConfig, UserError

# Where clean-fid itself looks for / downloads the weights (cleanfid.features.feature_extractor: "/tmp" on
# Linux; torch hub's checkpoints folder for legacy_pytorch).
CLEANFID_INCEPTION_DIR = "/tmp"
INCEPTION_FILE = "inception-2015-12-05.pt"  # TorchScript Inception of modes clean and legacy_tensorflow
INCEPTION_URL = downloads_helper.inception_url
LEGACY_PYTORCH_FILE = "pt_inception-2015-12-05-6726825d.pth"  # state dict of mode legacy_pytorch
CACHE_FORMAT = 1  # bump when the statistics files change meaning


class InceptionUnavailable(UserError, RuntimeError):
    """The Inception weights are not on disk and cannot be downloaded."""


# --------------------------------------------------------------------------------------------------
# Feature extractors
# --------------------------------------------------------------------------------------------------


@dataclass
class FeatureExtractor:
    """Images -> features, exactly as clean-fid computes them for `mode`.

    `model` has clean-fid's custom_feat_extractor interface: float (B,3,299,299) in [0,255] on `device`
    -> (B,D) (for legacy_tensorflow the images keep their size: the network resizes inside). Mode "proxy"
    (the built-in offline extractor, `waveforge.proxy_features`): images are resized to its 64 x 64 input
    in torch (bilinear, antialiased) instead of clean-fid's per-image resize to 299.
    `suffix` names the scores: "" for Inception (fid, kid), "_proxy" or "_custom" for the others (fid_proxy,
    ...), so that no other features' FID is ever mistaken for Inception FID.
    """

    model: Callable[[torch.Tensor], torch.Tensor]
    mode: str  # clean, legacy_pytorch or legacy_tensorflow: selects clean-fid's resize; or proxy
    name: str  # identifies the features in cache keys, e.g. "inception_v3/clean"
    device: torch.device
    resize_threads: int = 0  # threads for the per-image resize (0 = min(8, cpu count))
    suffix: str = ""  # appended to the scores' names: fid{suffix}, kid{suffix}

    def __post_init__(self) -> None:
        self._resize = None if self.mode == "proxy" else build_resizer(self.mode)  # ValueError on an unknown mode
        self._pool = ThreadPoolExecutor(self.resize_threads or min(8, os.cpu_count() or 1))

    def prepare(self, image: np.ndarray) -> torch.Tensor:
        """One HxWx3 image (uint8, or float in [0,255]) -> float (3,h,w) network input (clean-fid's resize)."""
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an HxWx3 image, got shape {tuple(image.shape)}")
        if self._resize is None:
            x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float()[None]
            size = (proxy_features.SIZE, proxy_features.SIZE)
            if tuple(x.shape[-2:]) != size:
                x = torch.nn.functional.interpolate(x, size=size, mode="bilinear", antialias=True,
                                                    align_corners=False)
            return x[0]
        out = np.asarray(self._resize(image), dtype=np.float32)
        return torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1)))

    def named(self, scores: dict[str, float]) -> dict[str, float]:
        """{"fid": ..., "kid": ...} named for these features: fid, fid_proxy, fid_custom, ..."""
        return {f"{k}{self.suffix}": v for k, v in scores.items()}

    def prepare_batch(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B,3,H,W) (or float in [0,255]) -> float (B,3,299,299) network input."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B,3,H,W), got {tuple(images.shape)}")
        arrays = images.detach().cpu().permute(0, 2, 3, 1).numpy()
        return torch.stack(list(self._pool.map(self.prepare, arrays)))

    @torch.no_grad()
    def features(self, batch: torch.Tensor) -> torch.Tensor:
        """Network input (from `prepare`) -> float (B,D) features on `device`."""
        feats = self.model(batch.to(self.device))
        if feats.ndim != 2 or feats.shape[0] != batch.shape[0]:
            raise ValueError(f"feature extractor {self.name!r} returned shape {tuple(feats.shape)} for a batch "
                             f"of {batch.shape[0]}: expected (B, D)")
        return feats.float()

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B,3,H,W) images (or float in [0,255]) -> float (B,D) features."""
        return self.features(self.prepare_batch(images))


def inception_help(mode: str) -> str:
    """Where the Inception weights of `mode` go and where to get them (for offline clusters)."""
    if mode == "legacy_pytorch":
        from cleanfid.inception_pytorch import FID_WEIGHTS_URL

        return (f"mode legacy_pytorch needs {LEGACY_PYTORCH_FILE} from {FID_WEIGHTS_URL}: put it in "
                f"{os.path.join(torch.hub.get_dir(), 'checkpoints')} (torch hub's cache, $TORCH_HOME) or set "
                f"eval.inception_path=/path/to/{LEGACY_PYTORCH_FILE}")
    return (f"mode {mode} needs {INCEPTION_FILE} (TorchScript, ~92 MB) from {INCEPTION_URL}: put it at "
            f"{os.path.join(CLEANFID_INCEPTION_DIR, INCEPTION_FILE)} on every node (where clean-fid downloads "
            f"it) or set eval.inception_path=/shared/path/{INCEPTION_FILE} (or its folder)")


def _torchscript_inception_dir(inception_path: str, mode: str) -> str:
    """Folder holding inception-2015-12-05.pt (downloaded by clean-fid's own code if absent)."""
    if inception_path:
        p = Path(inception_path).expanduser()
        if p.is_dir():
            p = p / INCEPTION_FILE
        if not p.is_file():
            raise InceptionUnavailable(f"eval.inception_path={inception_path!r}: no such file. {inception_help(mode)}")
        if p.name == INCEPTION_FILE:
            return str(p.parent)
        link_dir = Path(tempfile.mkdtemp(prefix="waveforge-inception-"))  # clean-fid wants the fixed name
        (link_dir / INCEPTION_FILE).symlink_to(p.resolve())
        return str(link_dir)
    target = os.path.join(CLEANFID_INCEPTION_DIR, INCEPTION_FILE)
    if not os.path.exists(target):
        # Download with clean-fid's code into a private folder, then move it in place atomically: several
        # ranks of one node may get here at once.
        tmp = tempfile.mkdtemp(prefix="waveforge-inception-", dir=CLEANFID_INCEPTION_DIR)
        try:
            dist.print0(f"downloading {INCEPTION_URL} to {target}")
            downloads_helper.check_download_inception(fpath=tmp)
            os.replace(os.path.join(tmp, INCEPTION_FILE), target)
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise InceptionUnavailable(f"Inception weights are missing and the download failed ({e}). "
                                       f"{inception_help(mode)}") from e
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return CLEANFID_INCEPTION_DIR


def _inception(ecfg: EvalConfig, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """clean-fid's Inception for ecfg.mode (the network of cleanfid.features.build_feature_extractor)."""
    if ecfg.mode == "legacy_pytorch":
        from cleanfid.inception_pytorch import InceptionV3

        if ecfg.inception_path:
            src = Path(ecfg.inception_path).expanduser()
            if not src.is_file():
                raise InceptionUnavailable(f"eval.inception_path={ecfg.inception_path!r}: no such file. "
                                           f"{inception_help(ecfg.mode)}")
            dst = Path(torch.hub.get_dir()) / "checkpoints" / LEGACY_PYTORCH_FILE  # where clean-fid's loader looks
            if not dst.exists():
                dst.parent.mkdir(parents=True, exist_ok=True)
                tmp = dst.with_name(f"{dst.name}.{os.getpid()}.tmp")
                shutil.copyfile(src, tmp)
                os.replace(tmp, dst)
        try:
            net = InceptionV3(output_blocks=[3], resize_input=False).to(device).eval()
        except (urllib.error.URLError, OSError) as e:
            raise InceptionUnavailable(f"Inception weights are missing and the download failed ({e}). "
                                       f"{inception_help(ecfg.mode)}") from e

        def legacy_pytorch(x: torch.Tensor) -> torch.Tensor:
            return net(x / 255)[0].squeeze(-1).squeeze(-1)

        return legacy_pytorch

    from cleanfid.inception_torchscript import InceptionV3W

    folder = _torchscript_inception_dir(ecfg.inception_path, ecfg.mode)
    try:
        net = InceptionV3W(folder, download=False, resize_inside=ecfg.mode == "legacy_tensorflow").to(device).eval()
    except RuntimeError as e:  # torch.jit.load of a truncated/corrupt file
        raise InceptionUnavailable(f"cannot load {os.path.join(folder, INCEPTION_FILE)} ({e}): delete it and "
                                   f"retry. {inception_help(ecfg.mode)}") from e
    finally:
        if Path(folder).name.startswith("waveforge-inception-"):  # our symlink folder: loaded, not needed
            shutil.rmtree(folder, ignore_errors=True)
    return net


def _import_callable(spec: str) -> Callable[[torch.Tensor], torch.Tensor]:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"eval.feature_extractor={spec!r}: expected module:callable")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"eval.feature_extractor={spec!r}: cannot import {module_name!r} ({e})") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"eval.feature_extractor={spec!r}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"eval.feature_extractor={spec!r} is not callable")
    return obj


def load_feature_extractor(ecfg: EvalConfig, device: torch.device | str = "cpu") -> FeatureExtractor:
    """clean-fid's Inception for ecfg.mode (eval.features=inception), the built-in offline proxy
    (eval.features=proxy, `waveforge.proxy_features`), or the custom `module:callable` of
    ecfg.feature_extractor (which takes precedence).

    The custom callable has clean-fid's `custom_feat_extractor` interface (float Bx3x299x299 in [0,255] ->
    BxD); an nn.Module is moved to `device` and put in eval mode. Raises InceptionUnavailable with the file
    name, URL and folder to use when the weights are missing and cannot be downloaded.
    """
    device = torch.device(device)
    if ecfg.feature_extractor:
        model = _import_callable(ecfg.feature_extractor)
        if isinstance(model, torch.nn.Module):
            model = model.to(device).eval()
        return FeatureExtractor(model=model, mode=ecfg.mode, name=f"{ecfg.feature_extractor}/{ecfg.mode}",
                                device=device, suffix="_custom")
    if ecfg.features == "proxy":
        return FeatureExtractor(model=proxy_features.ProxyFeatures().to(device), mode="proxy",
                                name=proxy_features.NAME, device=device, suffix="_proxy")
    return FeatureExtractor(model=_inception(ecfg, device), mode=ecfg.mode, name=f"inception_v3/{ecfg.mode}",
                            device=device)


# --------------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------------


@dataclass
class Stats:
    """Reduced feature statistics of one image set (the same on every rank)."""

    count: int
    mu: np.ndarray  # (D,) float64
    sigma: np.ndarray  # (D,D) float64, unbiased (np.cov)
    features: np.ndarray | None = None  # (N,D) float32 in sample order, for KID (None without kid)
    cached: bool = False  # reference statistics: read from the cache (True) or computed now
    url: str = ""  # reference statistics: the cache file


class FeatureStats:
    """Per-rank float64 accumulators of features; `reduce()` combines the ranks with one all-reduce.

    keep_features: also keep the rank's features (for KID). With `indices` given to `add` (the global sample
    index of each row) the gathered features are in sample order, independent of the rank count.
    """

    def __init__(self, keep_features: bool = False) -> None:
        self.keep_features = keep_features
        self.count = 0
        self.sum: torch.Tensor | None = None  # (D,) float64
        self.outer: torch.Tensor | None = None  # (D,D) float64: sum of x x^T
        self._rows: list[torch.Tensor] = []
        self._indices: list[int] = []

    def add(self, feats: torch.Tensor, indices: Sequence[int] | None = None) -> None:
        if feats.ndim != 2:
            raise ValueError(f"features must be (B,D), got {tuple(feats.shape)}")
        if indices is not None and len(indices) != feats.shape[0]:
            raise ValueError(f"{len(indices)} indices for {feats.shape[0]} feature rows")
        x = feats.detach().to(torch.float64)
        if self.sum is None:
            self.sum = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
            self.outer = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
        elif x.shape[1] != self.sum.shape[0]:
            raise ValueError(f"feature dimension changed from {self.sum.shape[0]} to {x.shape[1]}")
        self.count += x.shape[0]
        self.sum += x.sum(0).to(self.sum.device)
        self.outer += (x.T @ x).to(self.outer.device)
        if self.keep_features:
            self._rows.append(feats.detach().float().cpu())
            if indices is not None:
                self._indices.extend(int(i) for i in indices)

    def reduce(self) -> Stats:
        """Sum over ranks (a collective: every rank must call it) -> mean, covariance, (features)."""
        world, rank = dist.world(), dist.rank()
        dim = _agree_dim(self.sum.shape[0] if self.sum is not None else 0)
        if dim == 0:
            raise ValueError("no features: the image set is empty on every rank")
        dev = self.sum.device if self.sum is not None else torch.device("cpu")
        s = self.sum if self.sum is not None else torch.zeros(dim, dtype=torch.float64, device=dev)
        o = self.outer if self.outer is not None else torch.zeros(dim, dim, dtype=torch.float64, device=dev)
        counts = torch.zeros(world, dtype=torch.float64, device=dev)
        counts[rank] = self.count
        # ONE all-reduce of [per-rank counts, sum, outer products].
        packed = dist.all_reduce_sum(torch.cat([counts, s, o.reshape(-1)]))
        counts = packed[:world]
        n = int(counts.sum().item())
        if n < 2:
            raise ValueError(f"{n} image(s): FID needs at least 2")
        total = packed[world:world + dim]
        outer = packed[world + dim:].reshape(dim, dim)
        mu = total / n
        sigma = (outer - n * torch.outer(mu, mu)) / (n - 1)
        sigma = (sigma + sigma.T) / 2  # exact symmetry (np.cov is symmetric)
        feats = self._gather(counts, dim) if self.keep_features else None
        return Stats(count=n, mu=mu.cpu().numpy(), sigma=sigma.cpu().numpy(), features=feats)

    def _gather(self, counts: torch.Tensor, dim: int) -> np.ndarray:
        """All ranks' features (N,D) float32 on every rank: rows placed by sample index (or rank order)."""
        n, rank = int(counts.sum().item()), dist.rank()
        local = torch.cat(self._rows) if self._rows else torch.zeros(0, dim)
        by_index = dist.all_ranks(len(self._indices) == local.shape[0])
        if by_index:
            idx = torch.tensor(self._indices, dtype=torch.long)
            if local.shape[0] and (idx.min() < 0 or idx.max() >= n):
                raise ValueError(f"sample indices must be 0..{n - 1}")
        else:
            start = int(counts[:rank].sum().item())
            idx = torch.arange(start, start + local.shape[0])
        out = torch.zeros(n, dim, dtype=torch.float32)
        out[idx] = local
        # Every row is non-zero on exactly one rank, so the float32 sum is exact.
        return dist.all_reduce_sum(out).numpy()


def _agree_dim(local_dim: int) -> int:
    """The feature dimension, known on every rank (a rank without samples has 0)."""
    if dist.world() == 1:
        return local_dim
    dims = torch.zeros(dist.world(), dtype=torch.float64)
    dims[dist.rank()] = local_dim
    dims = dist.all_reduce_sum(dims)
    return int(dims.max().item())


def fid_from_stats(a: Stats, b: Stats) -> float:
    """Frechet distance between two Gaussians (clean-fid's frechet_distance: scipy sqrtm, float64)."""
    if a.mu.shape != b.mu.shape:
        raise ValueError(f"feature dimensions differ: {a.mu.shape[0]} vs {b.mu.shape[0]} (different extractors?)")
    return float(frechet_distance(a.mu, a.sigma, b.mu, b.sigma))


def kernel_distance(feats1: np.ndarray, feats2: np.ndarray, num_subsets: int = 100, max_subset_size: int = 1000,
                    seed: int = 0, device: torch.device | str = "cpu") -> float:
    """KID: clean-fid's estimator (unbiased MMD^2, kernel (x.y/D + 1)^3, mean over random subsets).

    Subsets are drawn like clean-fid's `kernel_distance` with np.random.RandomState(seed) (so with
    np.random.seed(seed) clean-fid draws the same ones); sums in float64 on `device`.
    """
    if feats1.ndim != 2 or feats2.ndim != 2 or feats1.shape[1] != feats2.shape[1]:
        raise ValueError(f"feature shapes {feats1.shape} and {feats2.shape} do not match")
    d = feats1.shape[1]
    m = min(feats1.shape[0], feats2.shape[0], max_subset_size)
    if m < 2:
        raise ValueError("KID needs at least 2 samples per set")
    rng = np.random.RandomState(seed)
    f1 = torch.as_tensor(feats1, dtype=torch.float64, device=device)
    f2 = torch.as_tensor(feats2, dtype=torch.float64, device=device)
    t = 0.0
    for _ in range(num_subsets):
        x = f2[torch.as_tensor(rng.choice(feats2.shape[0], m, replace=False), device=f2.device)]
        y = f1[torch.as_tensor(rng.choice(feats1.shape[0], m, replace=False), device=f1.device)]
        a = (x @ x.T / d + 1) ** 3 + (y @ y.T / d + 1) ** 3
        b = (x @ y.T / d + 1) ** 3
        t += ((a.sum() - a.diagonal().sum()) / (m - 1) - b.sum() * 2 / m).item()
    return t / num_subsets / m


def scores(real: Stats, fake: Stats, kid: bool = True, kid_subsets: int = 100, kid_subset_size: int = 1000,
           device: torch.device | str = "cpu") -> dict[str, float]:
    """{"fid": ..., "kid": ...} (kid only when asked and both sets carry features). Computed on rank 0 and
    shared, so every rank returns the same numbers (sqrtm of a 2048^2 matrix takes seconds)."""

    def compute() -> dict[str, float]:
        out = {"fid": fid_from_stats(real, fake)}
        if kid:
            if real.features is None or fake.features is None:
                raise ValueError("KID needs the features of both sets: compute them with kid=True")
            out["kid"] = kernel_distance(real.features, fake.features, num_subsets=kid_subsets,
                                         max_subset_size=kid_subset_size, device=device)
        return out

    return dist.on_rank0(compute)


# --------------------------------------------------------------------------------------------------
# Feature sources: a generator, an image folder, a data iterator
# --------------------------------------------------------------------------------------------------


def _progress(total: int, desc: str, enabled: bool):
    """A tqdm bar on rank 0; in a log file (no terminal) at most one line a minute."""
    from tqdm import tqdm

    tty = sys.stderr.isatty()
    return tqdm(total=total or None, desc=desc, disable=not enabled or dist.rank() != 0, unit="img",
                dynamic_ncols=tty, mininterval=0.5 if tty else 60.0)


def generate_features(generate: Callable[[list[int]], torch.Tensor], num_samples: int, extractor: FeatureExtractor,
                      batch_size: int, rank: int | None = None, world: int | None = None, kid: bool = False,
                      progress: bool = True) -> FeatureStats:
    """Features of samples 0..num_samples-1; sample i is `generate([... i ...])` from seed i.

    generate(seeds) -> uint8 (len(seeds),3,H,W). Rank r makes samples r, r+world, ... in batches of
    `batch_size`, so the statistics do not depend on the rank count or the batch size. Call
    `.reduce()` on the result (on every rank) for the Stats.
    """
    rank = dist.rank() if rank is None else rank
    world = dist.world() if world is None else world
    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"num_samples={num_samples} and batch_size={batch_size} must be >= 1")
    seeds = list(range(rank, num_samples, world))
    stats = FeatureStats(keep_features=kid)
    with _progress(num_samples, "FID generate", progress) as bar:
        for i in range(0, len(seeds), batch_size):
            batch_seeds = seeds[i:i + batch_size]
            images = generate(batch_seeds)
            if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[0] != len(batch_seeds):
                raise ValueError(f"generate({len(batch_seeds)} seeds) must return uint8 (B,3,H,W), got "
                                 f"{images.dtype} {tuple(images.shape)}")
            stats.add(extractor(images), indices=batch_seeds)
            bar.update(len(batch_seeds) * world)
    return stats


def list_images(folder: str | os.PathLike) -> list[str]:
    """Image files under `folder` (recursive, sorted), as clean-fid lists them."""
    if not os.path.isdir(folder):
        raise ConfigError(f"image folder {str(folder)!r} does not exist")
    return sorted(f for ext in EXTENSIONS for f in glob(os.path.join(folder, f"**/*.{ext}"), recursive=True))


def _read_image(path: str) -> np.ndarray:
    if path.endswith(".npy"):
        return np.load(path)
    with Image.open(path) as img:
        return np.array(img.convert("RGB"))


def folder_features(folder: str | os.PathLike, extractor: FeatureExtractor, batch_size: int = 50,
                    kid: bool = False, progress: bool = True) -> FeatureStats:
    """Features of every image in a local folder; rank r takes files r, r+world, ... Call `.reduce()`."""
    files = list_images(folder)
    if len(files) < 2:
        raise ConfigError(f"image folder {str(folder)!r} holds {len(files)} image(s): FID needs at least 2")
    rank, world = dist.rank(), dist.world()
    mine = list(range(rank, len(files), world))
    stats = FeatureStats(keep_features=kid)
    with _progress(len(files), f"features {os.path.basename(str(folder))}", progress) as bar:
        for i in range(0, len(mine), batch_size):
            idx = mine[i:i + batch_size]
            batch = torch.stack(list(extractor._pool.map(lambda j: extractor.prepare(_read_image(files[j])), idx)))
            stats.add(extractor.features(batch), indices=idx)
            bar.update(len(idx) * world)
    return stats


def fid_folders(real_dir: str | os.PathLike, fake_dir: str | os.PathLike, ecfg: EvalConfig,
                device: torch.device | str | None = None, progress: bool = True) -> dict[str, float]:
    """FID and KID between two image folders (clean-fid's compute_fid/compute_kid(real_dir, fake_dir)), named
    for the features: {"fid", "kid"} with Inception, {"fid_proxy", "kid_proxy"} with the proxy, ..."""
    extractor = load_feature_extractor(ecfg, device if device is not None else dist.device())
    real = folder_features(real_dir, extractor, ecfg.batch_size, kid=ecfg.kid, progress=progress).reduce()
    fake = folder_features(fake_dir, extractor, ecfg.batch_size, kid=ecfg.kid, progress=progress).reduce()
    return extractor.named(scores(real, fake, kid=ecfg.kid, kid_subsets=ecfg.kid_subsets,
                                  kid_subset_size=ecfg.kid_subset_size, device=extractor.device))


def iterator_features(batches: Iterable[torch.Tensor], extractor: FeatureExtractor, kid: bool = False,
                      progress: bool = True, resolution: int = 0) -> FeatureStats:
    """Features of uint8 (b,3,H,W) batches (this rank's share of a data set). Call `.reduce()`.

    resolution: if set, every image must be resolution x resolution (the generator's size)."""
    stats = FeatureStats(keep_features=kid)
    with _progress(0, "features reference", progress) as bar:
        for images in batches:
            if images.dtype != torch.uint8 or images.ndim != 4:
                raise ValueError(f"data batches must be uint8 (b,3,H,W), got {images.dtype} {tuple(images.shape)}")
            if resolution and tuple(images.shape[-2:]) != (resolution, resolution):
                raise ValueError(f"the data set's images are {images.shape[-2]}x{images.shape[-1]} px but the "
                                 f"generator makes {resolution}x{resolution}: FID compares images at the same "
                                 "resolution (make the shards at model.resolution)")
            stats.add(extractor(images))
            bar.update(images.shape[0] * dist.world())
    return stats


# --------------------------------------------------------------------------------------------------
# Reference statistics cache (object storage, keyed by the data set's manifest)
# --------------------------------------------------------------------------------------------------


def reference_key(manifest_sha256: str, resolution: int, extractor_name: str, num_samples: int | None) -> dict:
    """What the reference statistics depend on; its hash names the cache file."""
    return {"format": CACHE_FORMAT, "manifest_sha256": manifest_sha256, "resolution": int(resolution),
            "features": extractor_name, "num_samples": num_samples if num_samples else "all"}


def reference_stats(manifest_url: str, iterate: Callable[[], Iterable[torch.Tensor]], extractor: FeatureExtractor,
                    resolution: int, num_samples: int | None = None, cache_url: str = "", kid: bool = False,
                    storage: StorageConfig | None = None, progress: bool = True) -> Stats:
    """Statistics of the real images: read from the cache, or computed over all ranks and saved (collective).

    manifest_url: the data set's manifest file; its content (sha256) keys the cache, with `resolution`,
        the extractor's name and `num_samples`.
    iterate(): this rank's share of the data as uint8 (b,3,R,R) batches (e.g. functools.partial of
        waveforge.data.iterate_dataset); called only when the statistics are not cached.
    cache_url: folder for `ref-<key>.npz` (mu, sigma, count, features if kid) + `ref-<key>.json` (the key);
        "" = a `fid-stats` folder next to the manifest. The JSON is written last and marks a complete file.
    Returns Stats with .cached (read from the cache) and .url. Prints "reference statistics: cached <url>"
    or "reference statistics: computed ...". With kid, .features is set on rank 0 (where `scores` computes
    KID); on the other ranks only when computed now.
    """
    def manifest_sha() -> str:
        try:
            return hashlib.sha256(wf_storage.read_bytes(manifest_url, storage)).hexdigest()
        except FileNotFoundError:
            raise FileNotFoundError(f"data manifest {manifest_url!r} not found: the reference statistics are keyed "
                                    "by it (make the shards first: python jobs/make_shards.py)") from None

    sha = dist.on_rank0(manifest_sha)  # one reader; the others get its answer or its error
    key = reference_key(sha, resolution, extractor.name, num_samples)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    folder = cache_url or wf_storage.join(manifest_url.rsplit("/", 1)[0] if "/" in manifest_url else ".",
                                          "fid-stats")
    npz_url, json_url = wf_storage.join(folder, f"ref-{digest}.npz"), wf_storage.join(folder, f"ref-{digest}.json")

    def cached() -> bool:
        if not (wf_storage.exists(json_url, storage) and wf_storage.exists(npz_url, storage)):
            return False
        meta = json.loads(wf_storage.read_bytes(json_url, storage))
        return meta.get("key") == key and (not kid or meta.get("has_features", False))

    if dist.on_rank0(cached):
        fs, path = wf_storage.filesystem(npz_url, storage)
        # KID is computed on rank 0 only: the other ranks read just count, mu and sigma (zip members are
        # read lazily from the open object).
        with_features = kid and dist.rank() == 0

        def read() -> Stats:
            with fs.open(path, "rb") as f, np.load(f) as z:
                return Stats(count=int(z["count"]), mu=z["mu"], sigma=z["sigma"],
                             features=z["features"] if with_features else None, cached=True, url=npz_url)

        stats = wf_storage.with_retries(read, npz_url, "reading reference statistics from", scfg=storage)
        dist.print0(f"reference statistics: cached {npz_url} ({stats.count} images)")
        return stats

    t0 = time.time()
    stats = iterator_features(iterate(), extractor, kid=kid, progress=progress, resolution=resolution).reduce()
    if num_samples and stats.count < num_samples:
        dist.print0(f"reference statistics: the data set has {stats.count} images (< num_samples={num_samples})")
    def save() -> None:
        buf = io.BytesIO()
        arrays = {"mu": stats.mu, "sigma": stats.sigma, "count": np.array(stats.count)}
        if stats.features is not None:
            arrays["features"] = stats.features
        np.savez(buf, **arrays)
        wf_storage.write_bytes(npz_url, buf.getvalue(), storage)
        meta = {"key": key, "count": stats.count, "has_features": stats.features is not None,
                "manifest_url": manifest_url, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        wf_storage.write_bytes(json_url, json.dumps(meta, indent=1, sort_keys=True).encode(), storage)  # last

    dist.on_rank0(save)
    stats.url = npz_url
    dist.print0(f"reference statistics: computed {stats.count} images in {time.time() - t0:.0f} s, saved {npz_url}")
    return stats


def dataset_reference(cfg: Recipe, extractor: FeatureExtractor, progress: bool = True) -> Stats:
    """COLLECTIVE: reference statistics of the recipe's data set (data.url) at model.resolution: the first
    eval.num_samples images of its canonical order, cached in eval.reference_url (default: fid-stats/ next
    to the manifest), every rank reading its share."""
    ecfg = cfg.eval
    iterate = functools.partial(data.iterate_dataset, cfg.data.url, rank=dist.rank(), world=dist.world(),
                                batch_size=ecfg.batch_size, num_samples=ecfg.num_samples, storage=cfg.storage)
    return reference_stats(data.manifest_url(cfg.data.url), iterate, extractor, resolution=cfg.model.resolution,
                           num_samples=ecfg.num_samples, cache_url=ecfg.reference_url, kid=ecfg.kid,
                           storage=cfg.storage, progress=progress)
