"""Reading virtual streams from shards (in a loader worker process, or in the main process), and the
canonical order that reference statistics read.

READING. A shard is fetched whole into memory with one ranged GET (no HEAD: its size is in the manifest) by
a background thread; each stream has its next shard (or shuffle block) in flight while it decodes the
current one, and shards shared by neighbouring streams are fetched once (a small cache of recent shards).

ERRORS. Reads retry transient storage errors with exponential backoff (`retries`); refused credentials or a
missing bucket stop the run (`storage.AccessDenied`, `storage.BucketMissing`). A sample that does not
decode is replaced by the next decodable sample of the same shard's permuted order; a missing or unreadable
shard is replaced, sample for sample, by the next readable shard of the epoch's shard permutation. Both are
counted (stats) and reported on stderr naming the shard and the sample, or raise DataError with
on_error="fail". The batch shape never changes and nothing waits forever.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import hashlib
import itertools
import os
import sys
import threading
from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np
import torch

from waveforge import storage as store
from waveforge.config import ConfigError, StorageConfig, UserError
from waveforge.data.decode import decode_hwc, decode_image
from waveforge.data.order import SampleOrder, flip_bits
from waveforge.data.shards import dataset_root, manifest_url, read_manifest
from waveforge.data.tar import parse_tar, register_gopen


class SlotSink(Protocol):
    """Where a worker's reader writes its steps (the loader's shared-memory ring): `acquire()` returns this
    worker's rows of the next step's batch, `slot` names that batch."""

    slot: int

    def acquire(self) -> np.ndarray: ...


MAX_SAMPLE_REPORTS = 20  # corrupt samples named on stderr per reader; the rest are counted (data_corrupt_samples)


class DataError(UserError, RuntimeError):
    """Data could not be read and on_error='fail' (or no shard at all is readable)."""


class _Shard:
    def __init__(self, samples: list[dict[str, Any]] | None, error: str = ""):
        self.samples = samples  # encoded samples in tar order (None: shard missing or unreadable)
        self.error = error
        self.bad: set[int] = set()  # tar indices known not to decode


class StreamReader:
    """Reads a set of virtual streams of one rank and yields, per step, their G/S samples each."""

    def __init__(self, manifest: dict[str, Any], root: str, order: SampleOrder, streams: list[int], per_stream: int,
                 start_step: int, *, hflip: bool, on_error: str, retries: int, scfg: StorageConfig | None,
                 cache_dir: str, defer_flip: bool = False):
        self.manifest, self.root, self.order = manifest, root, order
        self.streams, self.per_stream, self.start_step = list(streams), per_stream, start_step
        self.hflip, self.on_error, self.retries, self.scfg, self.cache_dir = hflip, on_error, retries, scfg, cache_dir
        self.defer_flip = defer_flip  # hand out flip bits with unflipped images instead of mirroring them here
        self.resolution = int(manifest["resolution"])
        self.names = [s["name"] for s in manifest["shards"]]
        self.sizes = [int(s["bytes"]) for s in manifest["shards"]]
        self.stats = {"corrupt_samples": 0, "missing_shards": 0, "read_retries": 0, "shards_read": 0,
                      "bytes_read": 0}
        self._lock = threading.Lock()
        self._pool: cf.ThreadPoolExecutor | None = None
        self._cache: collections.OrderedDict[int, cf.Future] = collections.OrderedDict()
        self._reported: set[str] = set()
        self._missing: set[tuple[int, int]] = set()
        self._perms: collections.OrderedDict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = (
            collections.OrderedDict())

    # ---- shard loading (background threads) ----

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.stats[key] += n

    def _report(self, message: str) -> None:
        if message not in self._reported:
            self._reported.add(message)
            print(f"data: WARNING: {message}", file=sys.stderr, flush=True)

    def shard_url(self, shard: int) -> str:
        return store.join(self.root, self.names[shard])

    def _read(self, shard: int) -> bytes:
        """The whole shard in memory, or the copy in cache_dir. One read of the byte range [0, manifest size + 1)
        (from s3 one GET: a plain cat_file would first ask for the object's size, a HEAD request as costly in
        CPU as the GET for ~1 MiB shards); the extra byte shows an object that no longer matches the manifest."""
        url = self.shard_url(shard)
        size = self.sizes[shard]
        if self.cache_dir:
            tag = hashlib.sha1(self.root.encode()).hexdigest()[:12]
            local = os.path.join(self.cache_dir, tag, self.names[shard])
            if os.path.isfile(local) and os.path.getsize(local) == size:
                with open(local, "rb") as f:
                    return f.read()

        def on_retry(attempt: int, exc: BaseException) -> None:
            self._count("read_retries")

        data = store.read_bytes(url, self.scfg, self.retries, on_retry, start=0, end=size + 1)
        if len(data) != size:
            raise store.StorageError(f"{url} holds {'more than ' if len(data) > size else ''}{len(data)} bytes but the "
                                     f"manifest lists {size}: the data set changed after make_shards")
        if self.cache_dir:
            os.makedirs(os.path.dirname(local), exist_ok=True)
            tmp = f"{local}.tmp{os.getpid()}.{threading.get_ident()}"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, local)
        return data

    def _load(self, shard: int) -> _Shard:
        url = self.shard_url(shard)
        try:
            data = self._read(shard)
        except FileNotFoundError:
            return _Shard(None, f"shard {url} is missing")
        except (store.AccessDenied, store.BucketMissing):
            raise  # the run's credentials or URL are wrong: no other shard would read either
        except store.StorageError as e:
            return _Shard(None, f"shard {url} could not be read: {e}")
        self._count("shards_read")
        self._count("bytes_read", len(data))
        try:
            samples = parse_tar(data, url)
        except Exception as e:  # noqa: BLE001 - a truncated/garbled tar is an unreadable shard
            return _Shard(None, f"shard {url} is not a readable tar file ({type(e).__name__}: {e})")
        return _Shard(samples)

    def _submit(self, shard: int) -> cf.Future:
        fut = self._cache.get(shard)
        if fut is not None:
            self._cache.move_to_end(shard)
            return fut
        assert self._pool is not None
        fut = self._pool.submit(self._load, shard)
        self._cache[shard] = fut
        while len(self._cache) > len(self.streams) + 2:
            self._cache.popitem(last=False)
        return fut

    # ---- sample selection with substitution ----

    def _flip(self, e: int, shard: int, t: int) -> bool:
        """Whether tar index t of `shard` is mirrored in epoch e: decided per (seed, epoch, shard, sample),
        never by RNG state, so it replays exactly."""
        return self.hflip and bool(self._perm(e, shard)[1][t])

    def _decoded(self, sh: _Shard, t: int, e: int, shard: int) -> torch.Tensor | None:
        """(R,R,3) uint8 image of tar index t (mirrored unless deferred), or None when it does not decode
        (remembered)."""
        if t in sh.bad or sh.samples is None or t >= len(sh.samples):
            return None
        img = decode_hwc(sh.samples[t], self.resolution, self._flip(e, shard, t) and not self.defer_flip)
        if img is None:
            sh.bad.add(t)
        return img

    def _perm(self, e: int, shard: int) -> tuple[np.ndarray, np.ndarray]:
        """(in-shard permutation, flip bit per tar index) of `shard` in epoch e."""
        got = self._perms.get((e, shard))
        if got is None:
            perm = self.order.inner_perm(e, shard)
            got = self._perms[(e, shard)] = (perm, flip_bits(self.order.seed, e, shard, len(perm)))
            while len(self._perms) > 4 * len(self.streams) + 8:
                self._perms.popitem(last=False)
        return got

    def _pick(self, sh: _Shard, e: int, shard: int, j: int) -> tuple[int, torch.Tensor] | None:
        """(tar index, image) for slot j of the shard's epoch-e permuted order, substituting corrupt samples."""
        perm = self._perm(e, shard)[0]
        n = len(perm)
        for d in range(n):
            t = int(perm[(j + d) % n])
            img = self._decoded(sh, t, e, shard)
            if img is not None:
                return t, img
            if d == 0:
                key = sh.samples[t]["__key__"] if sh.samples is not None and t < len(sh.samples) else f"#{t}"
                self._count("corrupt_samples")
                where = f"sample {key} of shard {self.shard_url(shard)}"
                if self.on_error == "fail":
                    raise DataError(f"corrupt or missing {where} (data.on_error=fail)")
                if self.stats["corrupt_samples"] <= MAX_SAMPLE_REPORTS:
                    self._report(f"corrupt or missing {where}: replaced by the shard's next decodable sample"
                                 + (" (further corrupt samples are only counted)"
                                    if self.stats["corrupt_samples"] == MAX_SAMPLE_REPORTS else ""))
        return None

    def _sample(self, e: int, i: int, shard: int, j: int,
                shards: dict[int, _Shard]) -> tuple[str, torch.Tensor, bool]:
        """Key, image and flip bit for sample j (in-shard permuted order) of `shard`, slot i of epoch e's shard
        order."""
        sh = shards[shard]
        pick = self._pick(sh, e, shard, j) if sh.samples is not None else None
        src = shard
        if pick is None:  # whole shard unusable: take the next readable shard of the epoch's permutation
            lay = self.order.layout(e)
            n_sh = len(lay.perm)
            for d in range(1, n_sh + 1):
                if d == n_sh:
                    raise DataError(f"no readable shard in {self.root} (last error: {sh.error})")
                src = int(lay.perm[(i + d) % n_sh])
                if self.order.counts[src] == 0:
                    continue
                sub = shards.get(src)
                if sub is None:
                    sub = shards[src] = self._submit(src).result()
                if sub.samples is None:
                    continue
                pick = self._pick(sub, e, src, j % int(self.order.counts[src]))
                if pick is not None:
                    break
            assert pick is not None
            sh = shards[src]
        t, img = pick
        return sh.samples[t]["__key__"], img, self._flip(e, src, t)

    def _stream(self, s: int) -> Iterator[tuple[str, torch.Tensor, bool]]:
        p0 = self.start_step * self.per_stream
        blocks = self.order.blocks(s, p0)
        pending: collections.deque = collections.deque()

        def fill() -> None:  # keep the next block's shards loading while this one is consumed
            while len(pending) < 1:
                blk = next(blocks)
                pending.append((blk, [self._submit(piece[1]) for piece in blk[1]]))

        fill()
        while True:
            (e, pieces, order, skip), futures = pending.popleft()
            fill()
            shards: dict[int, _Shard] = {}
            refs: list[tuple[int, int, int, int, bool]] = []  # (slot i, shard, j, tar index, flip) of the
            for (i, shard, j0, j1), fut in zip(pieces, futures):  # block's samples in concatenated order
                sh = fut.result()
                shards[shard] = sh
                if sh.samples is None and (e, shard) not in self._missing:
                    self._missing.add((e, shard))
                    self._count("missing_shards")
                    if self.on_error == "fail":
                        raise DataError(f"{sh.error} (on_error=fail)")
                    self._report(f"{sh.error}; its samples are replaced by the next readable shard's")
                perm, flips = self._perm(e, shard)
                ts = perm[j0:j1]
                refs += zip(itertools.repeat(i), itertools.repeat(shard), range(j0, j1), ts.tolist(),
                            (flips[ts] & self.hflip).tolist())
            res, defer = self.resolution, self.defer_flip
            for k in order[skip:].tolist():
                i, shard, j, t, flip = refs[k]
                sh = shards[shard]
                if sh.samples is not None and t < len(sh.samples) and t not in sh.bad:  # the common case
                    sample = sh.samples[t]
                    img = decode_hwc(sample, res, flip and not defer)
                    if img is not None:
                        yield sample["__key__"], img, flip
                        continue
                    sh.bad.add(t)
                yield self._sample(e, i, shard, j, shards)  # corrupt or missing: counted and substituted

    def steps(self, ring: SlotSink | None = None) -> Iterator[dict[str, Any]]:
        """Per step: {"key": [...], "stats": {...}} (with defer_flip also "flip": [bool, ...]) and the step's
        uint8 images (len(streams)*G/S,R,R,3), channels last: without `ring` a new numpy array under "image";
        with a ring (a worker process) written into this worker's rows of the slot the main process named for
        the step, whose number goes under "slot"."""
        self._pool = cf.ThreadPoolExecutor(max_workers=2, thread_name_prefix="shard-read")
        try:
            iters = [self._stream(s) for s in self.streams]
            n, res = len(self.streams) * self.per_stream, self.resolution
            while True:
                # Decoded images are copied (one memcpy each: both are HWC) into a uint8 batch: from a
                # worker, into shared memory, so that only the keys and counters travel through the pipe.
                out = np.empty((n, res, res, 3), dtype=np.uint8) if ring is None else ring.acquire()
                keys: list[str] = []
                flips: list[bool] = []
                for it in iters:
                    for _ in range(self.per_stream):
                        key, img, flip = next(it)
                        np.copyto(out[len(keys)], img.numpy())
                        keys.append(key)
                        flips.append(flip)
                with self._lock:
                    stats = dict(self.stats)
                step = {"key": keys, "stats": stats}
                if self.defer_flip:
                    step["flip"] = flips
                yield {**step, "image": out} if ring is None else {**step, "slot": ring.slot}
        finally:
            self._pool.shutdown(wait=False, cancel_futures=True)


def _make_reader(manifest: dict[str, Any], root: str, order: SampleOrder, per_stream: int, start_step: int,
                 streams: list[int], **kw: Any) -> StreamReader:
    return StreamReader(manifest, root, order, streams, per_stream, start_step, **kw)



def iterate_dataset(url: str, *, rank: int, world: int, batch_size: int, num_samples: int | None = None,
                    storage: StorageConfig | None = None, retries: int = 5) -> Iterator[torch.Tensor]:
    """uint8 (b,3,R,R) batches of this rank's part of the canonical order (manifest shard order, tar order).

    The first `num_samples` samples (all if None) are split into `world` contiguous ranges; rank r reads only
    the shards of its range. Undecodable samples are skipped (reported on stderr).
    """
    if not 0 <= rank < world or batch_size < 1:
        raise ConfigError(f"bad arguments: rank={rank}, world={world}, batch_size={batch_size}")
    register_gopen(storage)
    murl = manifest_url(url)
    root = dataset_root(murl)
    try:
        m = read_manifest(murl, storage, retries)
    except FileNotFoundError:
        raise ConfigError(f"no dataset manifest at {murl}: write the shards with python jobs/make_shards.py") from None
    counts = np.array([s["samples"] for s in m["shards"]], dtype=np.int64)
    total = int(counts.sum()) if num_samples is None else min(int(num_samples), int(counts.sum()))
    lo, hi = total * rank // world, total * (rank + 1) // world
    cum = np.concatenate([[0], np.cumsum(counts)])
    res = int(m["resolution"])
    batch: list[torch.Tensor] = []
    bad = 0
    for k in range(len(counts)):
        a, b = max(lo, int(cum[k])), min(hi, int(cum[k + 1]))
        if a >= b:
            continue
        url_k = store.join(root, m["shards"][k]["name"])
        samples = parse_tar(store.read_bytes(url_k, storage, retries), url_k)
        for t in range(a - int(cum[k]), b - int(cum[k])):
            img = decode_image(samples[t], res) if t < len(samples) else None
            if img is None:
                bad += 1
                continue
            batch.append(img)
            if len(batch) == batch_size:
                yield torch.stack(batch)
                batch = []
    if batch:
        yield torch.stack(batch)
    if bad:
        print(f"data: WARNING: {bad} undecodable samples skipped in {root}", file=sys.stderr, flush=True)

