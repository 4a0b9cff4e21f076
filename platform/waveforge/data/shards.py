"""Writing WebDataset shards: images (folder, zip or synthetic) -> resized, encoded, tar shards + index.json.

    make_shards("photos/", "s3://bucket/ffhq256", 256, encoding="png", workers=8)  -> summary dict

Layout written at `output` (any fsspec URL):

    {prefix}-000000.tar, {prefix}-000001.tar, ...   plain tar files, one sample = `{key}.{png|jpg|webp}` plus
                                                    `{key}.json` ({"source": original name}); keys are the
                                                    9-digit index of the image in the sorted source list
                                                    (unique, sortable; gaps where a corrupt image was skipped)
    _parts/{prefix}-000000.json, ...               per-shard completion records (count, bytes, sha256, md5)
    index.json                                      the manifest, written LAST (its presence = dataset complete)

Shard k holds source items [k*n, (k+1)*n) for n = samples_per_shard (or what fits `shard_mb`, estimated by
encoding a few images), so shards are a function of the source and the settings. Re-running with the same
settings skips every shard whose record exists and whose bytes still match (size + checksum). Unreadable
images are skipped and listed in the manifest; they never stop the run.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import io
import json
import math
import os
import tarfile
import time
import zipfile
from typing import Any

import numpy as np
from PIL import Image

from waveforge import storage
from waveforge.config import ConfigError, StorageConfig
from waveforge.data.synthetic import synthetic_image

MANIFEST = "index.json"
PARTS = "_parts"
FORMAT = "waveforge-shards/1"
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")
ENCODINGS = {"png": "png", "jpg": "jpg", "jpeg": "jpg", "webp": "webp"}
KEY_DIGITS = 9


def manifest_url(url: str) -> str:
    """The manifest of dataset `url` (a shard folder, or the manifest itself)."""
    url = str(url)
    return url if url.endswith(".json") else storage.join(url, MANIFEST)


def dataset_root(url: str) -> str:
    """The shard folder of dataset `url` (a shard folder, or its manifest)."""
    url = str(url)
    return url.rsplit("/", 1)[0] if url.endswith(".json") and "/" in url else ("." if url.endswith(".json") else url)


# --------------------------------------------------------------------------------------------------
# Sources: a sorted list of (index, name); items are loaded inside the worker processes
# --------------------------------------------------------------------------------------------------


def list_source(source: str, num_samples: int | None) -> tuple[str, list[str]]:
    """(kind, names): kind is 'synthetic', 'zip' or 'folder'; names sorted (their order = sample index)."""
    if source == "synthetic":
        if not num_samples or num_samples < 1:
            raise ConfigError("source=synthetic needs num_samples=N (N >= 1)")
        return "synthetic", [f"synthetic/{i:0{KEY_DIGITS}d}" for i in range(num_samples)]
    if os.path.isfile(source) and zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as z:
            names = sorted(i.filename for i in z.infolist()
                           if not i.is_dir() and i.filename.lower().endswith(IMAGE_EXTS)
                           and not i.filename.startswith("__MACOSX/"))
        kind = "zip"
    elif os.path.isdir(source):
        names = []
        for root, dirs, files in os.walk(source):
            dirs.sort()
            names += [os.path.relpath(os.path.join(root, f), source).replace(os.sep, "/")
                      for f in files if f.lower().endswith(IMAGE_EXTS) and not f.startswith(".")]
        names.sort()
        kind = "folder"
    elif os.path.exists(source):
        raise ConfigError(f"source={source!r} is neither a folder nor a zip file")
    else:
        raise ConfigError(f"source={source!r} does not exist (a folder of images, a .zip, or 'synthetic')")
    if not names:
        raise ConfigError(f"source={source!r} holds no images ({', '.join(IMAGE_EXTS)}, searched recursively)")
    if num_samples:
        names = names[:num_samples]
    return kind, names


_ZIPS: dict[str, zipfile.ZipFile] = {}


def _load(kind: str, source: str, seed: int, index: int, name: str, resolution: int) -> Image.Image:
    """The source image as RGB at resolution x resolution. Raises on unreadable input."""
    if kind == "synthetic":
        return Image.fromarray(synthetic_image(seed, index, resolution))
    if kind == "zip":
        z = _ZIPS.get(source)
        if z is None:
            z = _ZIPS[source] = zipfile.ZipFile(source)
        data = z.read(name)
    else:
        with open(os.path.join(source, name), "rb") as f:
            data = f.read()
    im = Image.open(io.BytesIO(data))
    im.load()
    return resize_center_crop(im, resolution)


def resize_center_crop(im: Image.Image, resolution: int) -> Image.Image:
    """Scale the short side to `resolution` (area averaging down, Lanczos up), then centre-crop a square."""
    if im.mode != "RGB":
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            rgba = im.convert("RGBA")
            bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            im = Image.alpha_composite(bg, rgba)
        im = im.convert("RGB")
    w, h = im.size
    if w < 1 or h < 1:
        raise ValueError("empty image")
    scale = resolution / min(w, h)
    if scale != 1.0:
        nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
        im = im.resize((nw, nh), Image.Resampling.BOX if scale < 1 else Image.Resampling.LANCZOS)
    w, h = im.size
    left, top = (w - resolution) // 2, (h - resolution) // 2
    return im.crop((left, top, left + resolution, top + resolution))


def encode(im: Image.Image, encoding: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if encoding == "png":
        im.save(buf, format="PNG", compress_level=6)
    elif encoding == "jpg":
        im.save(buf, format="JPEG", quality=quality, subsampling=0 if quality >= 90 else 2)
    else:
        im.save(buf, format="WEBP", quality=quality, method=4)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------
# One shard (runs in a worker process)
# --------------------------------------------------------------------------------------------------


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # fixed metadata: the same inputs give byte-identical shards
    info.mode = 0o644
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _items_sha(names: list[str]) -> str:
    return hashlib.sha256("\n".join(names).encode()).hexdigest()


def _write_shard(job: dict[str, Any]) -> dict[str, Any]:
    ext = job["encoding"]
    buf = io.BytesIO()
    skipped: list[str] = []
    samples = 0
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for index, name in job["items"]:
            try:
                im = _load(job["kind"], job["source"], job["seed"], index, name, job["resolution"])
                data = encode(im, ext, job["quality"])
            except Exception:  # noqa: BLE001 - any unreadable image is skipped and reported
                skipped.append(name)
                continue
            key = f"{index:0{KEY_DIGITS}d}"
            _tar_add(tar, f"{key}.{ext}", data)
            _tar_add(tar, f"{key}.json", json.dumps({"source": name}).encode())
            samples += 1
    data = buf.getvalue()
    record = {"name": job["name"], "samples": samples, "bytes": len(data),
              "sha256": hashlib.sha256(data).hexdigest(), "md5": hashlib.md5(data).hexdigest(),
              "skipped": skipped, "items_sha256": job["items_sha256"], "settings": job["settings"]}
    storage.write_bytes(storage.join(job["output"], job["name"]), data, job["storage"])
    storage.write_text(storage.join(job["output"], PARTS, job["name"].replace(".tar", ".json")),
                       json.dumps(record), job["storage"])
    return record


def _shard_complete(output: str, record: dict[str, Any], scfg: StorageConfig | None) -> bool:
    """Does the shard named by `record` exist with exactly the recorded bytes (size + checksum)?"""
    url = storage.join(output, record["name"])
    fs, path = storage.filesystem(url, scfg)
    try:
        info = storage.with_retries(lambda: fs.info(path), url, "checking", scfg=scfg)
    except FileNotFoundError:
        return False
    if int(info.get("size", -1)) != record["bytes"]:
        return False
    etag = str(info.get("ETag", info.get("etag", ""))).strip('"')
    if etag and "-" not in etag and len(etag) == 32:
        return etag == record["md5"]
    return hashlib.sha256(storage.read_bytes(url, scfg)).hexdigest() == record["sha256"]


def _read_json(url: str, scfg: StorageConfig | None) -> dict[str, Any] | None:
    try:
        return json.loads(storage.read_bytes(url, scfg))
    except FileNotFoundError:
        return None
    except json.JSONDecodeError:
        return None


def _estimate_per_shard(kind: str, source: str, seed: int, names: list[str], resolution: int, encoding: str,
                        quality: int, shard_mb: float) -> int:
    """Samples per shard so that a shard is about `shard_mb` MiB (encodes up to 8 images to measure)."""
    sizes = []
    for i, name in enumerate(names[:32]):
        try:
            sizes.append(len(encode(_load(kind, source, seed, i, name, resolution), encoding, quality)) + 1536)
        except Exception:  # noqa: BLE001 - corrupt probe images are skipped here as in the shards
            continue
        if len(sizes) >= 8:
            break
    per = int(np.mean(sizes)) if sizes else resolution * resolution * 3
    return max(1, int(shard_mb * 2**20 // per))


def make_shards(source: str, output: str, resolution: int, *, num_samples: int | None = None,
                encoding: str = "png", quality: int = 95, shard_mb: float = 32.0, samples_per_shard: int = 0,
                workers: int = 1, seed: int = 0, prefix: str = "shard", storage_cfg: StorageConfig | None = None,
                progress: bool = True) -> dict[str, Any]:
    """Write `source` (folder, .zip or 'synthetic') as WebDataset tar shards + index.json at `output`.

    Returns a summary: output, manifest URL, shards, samples, bytes, skipped (count) and skipped_names,
    written / reused shard counts, seconds.
    """
    t0 = time.time()
    if str(encoding).lower() not in ENCODINGS:
        raise ConfigError(f"encoding={encoding!r} is not valid: expected png, jpg or webp")
    encoding = ENCODINGS[str(encoding).lower()]
    if not isinstance(resolution, int) or resolution < 1:
        raise ConfigError(f"resolution={resolution!r} must be an integer >= 1")
    if not 1 <= quality <= 100:
        raise ConfigError(f"quality={quality!r} must be in 1..100")
    if shard_mb <= 0 or samples_per_shard < 0 or workers < 1:
        raise ConfigError("shard_mb must be > 0, samples_per_shard >= 0, workers >= 1")
    if not prefix or "/" in prefix or "." in prefix:
        raise ConfigError(f"prefix={prefix!r} must be a non-empty name without '/' or '.'")
    source = str(source)
    if source != "synthetic":
        source = os.path.abspath(source)
    output = str(output).rstrip("/")
    kind, names = list_source(source, num_samples)
    settings = {"source": source, "kind": kind, "seed": seed if kind == "synthetic" else None,
                "resolution": resolution, "encoding": encoding,
                "quality": quality if encoding != "png" else None, "prefix": prefix}

    storage.makedirs(output, storage_cfg)  # local folder, or the bucket
    existing = _read_json(manifest_url(output), storage_cfg)
    if existing is not None and existing.get("settings", {}) != settings:
        raise ConfigError(f"{output} already holds a dataset made with other settings "
                          f"({existing.get('settings')}); choose another output or delete it")
    if not samples_per_shard:
        if existing is not None:
            samples_per_shard = int(existing["samples_per_shard"])
        else:
            samples_per_shard = _estimate_per_shard(kind, source, seed, names, resolution, encoding, quality,
                                                    shard_mb)
    n_shards = math.ceil(len(names) / samples_per_shard)

    jobs, records = [], {}
    for k in range(n_shards):
        lo, hi = k * samples_per_shard, min(len(names), (k + 1) * samples_per_shard)
        name = f"{prefix}-{k:06d}.tar"
        items = [(i, names[i]) for i in range(lo, hi)]
        job = {"name": name, "items": items, "items_sha256": _items_sha(names[lo:hi]), "kind": kind,
               "source": source, "seed": seed, "resolution": resolution, "encoding": encoding, "quality": quality,
               "output": output, "storage": storage_cfg, "settings": settings}
        rec = _read_json(storage.join(output, PARTS, name.replace(".tar", ".json")), storage_cfg)
        if rec is not None and (rec.get("settings") != settings or rec.get("items_sha256") != job["items_sha256"]):
            if rec.get("settings") != settings:
                raise ConfigError(f"{output} holds shards made with other settings ({rec.get('settings')}); "
                                  f"choose another output or delete it")
            rec = None
        if rec is not None and _shard_complete(output, rec, storage_cfg):
            records[k] = rec
        else:
            jobs.append((k, job))

    from tqdm import tqdm

    bar = tqdm(total=len(names), desc=f"shards -> {output}", unit="img", disable=not progress, dynamic_ncols=True)
    bar.update(sum(r["samples"] + len(r["skipped"]) for r in records.values()))
    if workers == 1 or len(jobs) <= 1:
        for k, job in jobs:
            records[k] = _write_shard(job)
            bar.update(len(job["items"]))
    else:
        from waveforge.data.workers import worker_context  # no fork: see worker_context

        ctx = worker_context()
        with cf.ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=ctx) as pool:
            futures = {pool.submit(_write_shard, job): (k, len(job["items"])) for k, job in jobs}
            for fut in cf.as_completed(futures):
                k, n = futures[fut]
                records[k] = fut.result()
                bar.update(n)
    bar.close()

    shards = [{"name": records[k]["name"], "samples": records[k]["samples"], "bytes": records[k]["bytes"],
               "sha256": records[k]["sha256"]} for k in range(n_shards)]
    skipped_names = [n for k in range(n_shards) for n in records[k]["skipped"]]
    total = sum(s["samples"] for s in shards)
    if total == 0:
        raise ConfigError(f"source={source!r}: none of the {len(names)} images could be read")
    manifest = {
        "format": FORMAT,
        "total_samples": total,
        "num_shards": n_shards,
        "resolution": resolution,
        "encoding": encoding,
        "quality": settings["quality"],
        "source": source,
        "samples_per_shard": samples_per_shard,
        "settings": settings,
        "skipped": {"count": len(skipped_names), "names": skipped_names},
        "shards": shards,
    }
    storage.write_text(manifest_url(output), json.dumps(manifest, indent=1), storage_cfg)
    return {"output": output, "manifest": manifest_url(output), "shards": n_shards, "samples": total,
            "bytes": sum(s["bytes"] for s in shards), "skipped": len(skipped_names),
            "skipped_names": skipped_names, "written_shards": len(jobs), "reused_shards": n_shards - len(jobs),
            "seconds": round(time.time() - t0, 2)}


def read_manifest(url: str, scfg: StorageConfig | None = None, retries: int = storage.DEFAULT_RETRIES
                  ) -> dict[str, Any]:
    """The manifest of dataset `url` (folder or index.json), checked; FileNotFoundError if there is none."""
    murl = manifest_url(url)
    try:
        m = json.loads(storage.read_bytes(murl, scfg, retries))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{murl} is not valid JSON ({e}); re-run make_shards") from None
    if m.get("format") != FORMAT or not m.get("shards"):
        raise ConfigError(f"{murl} is not a waveforge shard manifest (format {FORMAT}); make it with "
                          f"python jobs/make_shards.py")
    return m


def synthetic_allowed(cfg: Any) -> bool:
    """Whether the synthetic set may be drawn at data.url: only with data.synthetic_if_missing and only into
    the recipe's own default data.url when that is a local folder (the embedded default), so that a typo in
    a data URL is an error, never a freshly drawn synthetic data set that is then trained on."""
    from waveforge import config

    if not cfg.data.synthetic_if_missing or not storage.is_local(cfg.data.url) or not cfg.recipe:
        return False
    try:
        default = config.load(cfg.recipe).data.url
    except config.ConfigError:
        return False
    if not default or not storage.is_local(default):
        return False

    def where(url: str) -> str:
        return os.path.abspath(storage.local_path(url))

    return where(default) == where(cfg.data.url)


def ensure_dataset(cfg: Any) -> str:
    """COLLECTIVE: the manifest URL of cfg.data.url; draws the synthetic set there first when allowed
    (`synthetic_allowed`) and absent. A missing data set is otherwise a ConfigError naming data.url and
    telling how to make one."""
    from waveforge import dist

    url = cfg.data.url
    if not url:
        raise ConfigError("data.url is empty: set it to a shard folder written by python jobs/make_shards.py")
    murl = manifest_url(url)

    def check_or_draw() -> None:
        if storage.exists(murl, cfg.storage, cfg.data.retries):
            return
        if not synthetic_allowed(cfg):
            raise ConfigError(f"data.url={url}: no data set there ({murl} not found): write one with python "
                              f"jobs/make_shards.py source=<folder|zip|synthetic> output={url} "
                              f"resolution={cfg.model.resolution}, or point data.url at an existing one")
        n = cfg.data.synthetic_samples
        print(f"data: no data set at {url} yet; drawing the embedded default's {n} synthetic "
              f"{cfg.model.resolution} px images there", flush=True)
        make_shards("synthetic", dataset_root(murl), cfg.model.resolution, num_samples=n, encoding="png",
                    samples_per_shard=max(1, math.ceil(n / 64)), workers=1, seed=0, storage_cfg=cfg.storage,
                    progress=False)

    dist.on_rank0(check_or_draw)
    return murl
