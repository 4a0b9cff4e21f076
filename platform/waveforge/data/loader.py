"""Streaming training data with exact, deterministic, world-size-independent resume.

    loader = ShardLoader("s3://bucket/ffhq256", global_batch=64, rank=r, world=w, grad_accum=2, seed=0)
    for step in ...:
        micro_batches = loader.next_step()   # grad_accum dicts {"image": uint8 (b,3,R,R), "key": [...]}
        x = normalize(micro_batches[0]["image"].to(device))   # float32 in [-1, 1], converted on the device
    state = loader.state_dict()             # small JSON-able dict, independent of the world size
    loader.load_state_dict(state)           # continue exactly there (also on another number of ranks)

THE ORDER. The sequence of global batches is a function of (seed, manifest, global batch) only:

* S = gcd(global_batch, 64) virtual streams; every global batch takes G/S consecutive samples from each
  stream, stream 0's first, then stream 1's, ...: the global batch is the concatenation over s.
* Epoch e has a seeded permutation of the shards; each shard's samples are permuted by a seeded
  in-shard permutation; concatenated, these give the epoch's sample sequence Q_e (all N samples once).
* Q_e is cut into S contiguous segments, segment s (length floor(N/S) or one more) is stream s's part of
  epoch e. The N mod S "extra" samples of each epoch go to streams round-robin over epochs (extra number j
  to stream j mod S), so every stream receives the same number of samples over any S epochs.
* Optionally (shuffle_window=W > 1) each segment is cut into blocks of W samples from its start and each
  block is permuted by a seeded permutation (mixes samples of consecutive shards).
* Stream s is the concatenation of its segments of epochs 0, 1, 2, ... (infinite). After k global batches
  every stream has delivered exactly k*G/S samples, so the whole state is the step count k.

EPOCH BOUNDARY. A stream moves to its epoch e+1 segment right after finishing its epoch e segment; a global
batch that straddles the boundary holds the end of epoch e and the start of epoch e+1 (nothing is dropped
or padded). Stream lengths differ by at most one sample, so all streams cross the boundary within one
global batch of each other. Within each epoch every sample of the manifest appears exactly once.

RANKS AND WORKERS. Rank r of w serves streams [r*S/w, (r+1)*S/w) (w must divide S): its share of the
global batch is a contiguous slice, so the same sample sits at the same position of the global batch for
any world size. Each shard is read by the one rank whose streams cover it (a shard at a segment boundary
by the two neighbours). Worker processes split the rank's streams into contiguous runs (likewise: a shard is
read by one worker, or two at a run boundary); the main process reassembles their output in stream order,
so num_workers never changes the result.

READING. A shard is fetched whole into memory with one ranged GET (no HEAD: its size is in the manifest) by
a background thread of its worker; each stream has its next shard (or shuffle block) in flight while it
decodes the current one, and shards shared by neighbouring streams are fetched once (a small per-worker
cache of recent shards). The workers copy each decoded image (one memcpy) into a few uint8 step batches
("slots") in shared memory, each worker into its rows; only the keys and counters of a step travel through
a pipe, and next_step hands the slot out in place (no copy in the main process). A slot is written again
only once no tensor of the caller's uses it; the main process names each step's slot to the workers, which
is the whole flow control (a worker runs up to 5 steps ahead). Images stay in the decoders' HWC layout all the way (a
batch is channels_last); `normalize` makes them contiguous on the device, and with defer_flip mirrors the
flipped samples there too. The workers are plain processes (no torch DataLoader): a worker's exception is
re-raised by next_step(), and a dead worker is a DataError within a second, never a hang.

RESUME. The state is {step, global_batch, streams, seed, total samples, ...}; restarting fast-forwards each
stream arithmetically from the manifest counts (no shard before the position is read), then skips inside
one shard (or shuffle block). Flips are decided by a hash of (seed, epoch, shard, sample), not by an RNG
state, so they replay exactly.

ERRORS. Reads retry transient storage errors with exponential backoff (`retries`). A sample that does not
decode is replaced by the next decodable sample of the same shard's permuted order; a missing or unreadable
shard is replaced, sample for sample, by the next readable shard of the epoch's shard permutation. Both are
counted (stats()) and reported on stderr, or raise DataError with on_error="fail". The batch shape never
changes and nothing waits forever.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import functools
import hashlib
import io
import itertools
import os
import re
import struct
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from waveforge import storage as store
from waveforge.config import MAX_DATA_STREAMS, ConfigError, StorageConfig, data_streams
from waveforge.data.shards import dataset_root, manifest_url, read_manifest
from waveforge.data.workers import worker_context

MAX_STREAMS = MAX_DATA_STREAMS
_RING_SLOTS = 6  # step batches in the workers' shared memory (handed out, or being written ahead)
_AHEAD_MIN = 2  # a slot is lent to the caller only while this many others stay named for the workers
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
STATE_FORMAT = "waveforge-loader/1"


class DataError(RuntimeError):
    """Data could not be read and on_error='fail' (or no shard at all is readable)."""


def num_streams(global_batch: int) -> int:
    """Virtual streams for a global batch: gcd(global_batch, 64); the world size must divide it (the recipe
    check `config.check_resources` uses the same function before anything starts)."""
    return data_streams(global_batch)


# --------------------------------------------------------------------------------------------------
# webdataset integration: gopen handlers for object stores, tar iteration
# --------------------------------------------------------------------------------------------------


def register_gopen(scfg: StorageConfig | None = None) -> None:
    """Let webdataset open s3:// and gs:// URLs through fsspec (so plain wds.WebDataset(url) works too)."""
    import webdataset  # noqa: F401 - loads webdataset.gopen (the package attribute `gopen` is the function)

    gmod = sys.modules["webdataset.gopen"]

    def open_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any) -> Any:
        fs, path = store.filesystem(url, scfg)
        return fs.open(path, mode, block_size=8 << 20)

    for name in ("s3", "s3a", "gs", "gcs"):
        gmod.gopen_schemes[name] = open_fsspec


class _NotPlainUstar(Exception):
    """The tar uses features (pax/GNU headers, links) the fast scan leaves to webdataset's iterator."""


# The ustar header fields the scan reads, in one unpack: name, size, typeflag, magic, prefix.
_USTAR = struct.Struct("100s24x12s20xc100x5s83x155s")
_KEY_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext: (key, extensions)
_META_RE = re.compile(r"__[^/]*__($|/)")  # webdataset's __meta__-style files, which carry no sample


def _ustar_samples(data: bytes | bytearray, url: str) -> list[dict[str, Any]]:
    """Samples of an in-memory plain ustar archive (as make_shards writes them), grouped by key as webdataset's
    group_by_keys groups them: consecutive files with the same key form one sample {"__key__", "__url__", ext:
    bytearray, ...} (extensions lower-cased; a repeated one is an error; `__meta__` files skipped).

    A header scan without tarfile's per-member Python objects (one struct unpack per member); anything beyond
    plain ustar raises _NotPlainUstar, a truncated archive tarfile.ReadError. Each file's contents is its own
    small writable copy: decoders read it without a read-only warning, the shard's buffer is not kept alive,
    and the samples (dicts of str and bytearray) are not tracked by Python's cyclic garbage collector, whose
    full collections would otherwise walk every sample of every shard in memory.
    """
    import tarfile

    view, unpack = memoryview(data), _USTAR.unpack_from
    out: list[dict[str, Any]] = []
    cur: dict[str, Any] | None = None
    pos, n = 0, len(data)
    while pos + 512 <= n:
        name, size_field, kind, magic, prefix = unpack(data, pos)
        if name[:1] == b"\0":  # end-of-archive blocks
            return out
        if magic != b"ustar":
            raise _NotPlainUstar
        try:
            size = int(size_field.partition(b"\0")[0].strip() or b"0", 8)
        except ValueError:
            raise _NotPlainUstar from None
        start = pos + 512
        if start + size > n:
            raise tarfile.ReadError("unexpected end of data (truncated tar)")
        if kind in (b"0", b"\0", b"7"):
            path = name.partition(b"\0")[0].decode()
            if prefix[:1] != b"\0":
                path = prefix.partition(b"\0")[0].decode() + "/" + path
            m = None if _META_RE.match(path) else _KEY_RE.match(path)
            if m is not None:
                key, ext = m.group(1), m.group(2).lower()
                if cur is None or key != cur["__key__"]:
                    cur = {"__key__": key, "__url__": url}
                    out.append(cur)
                if ext in cur:
                    raise ValueError(f"{path}: duplicate file name in tar file {url}")
                cur[ext] = bytearray(view[start:start + size])
        elif kind not in (b"5", b"1", b"2"):  # directories/links carry no sample data; pax/GNU: not plain
            raise _NotPlainUstar
        pos = start + (size + 511) // 512 * 512
    if pos < n:
        raise tarfile.ReadError("unexpected end of data (truncated tar)")
    return out


def parse_tar(data: bytes | bytearray, url: str) -> list[dict[str, Any]]:
    """Samples of a tar shard in file order, grouped by key as webdataset groups them.

    Plain ustar archives (what make_shards writes) are scanned directly in memory (`_ustar_samples`); any
    other tar goes through webdataset's tar_file_iterator and group_by_keys. Both skip webdataset's `__meta__`
    files the same way.
    """
    import webdataset.tariterators as wti

    try:
        return _ustar_samples(data, url)
    except _NotPlainUstar:
        files = [{**f, "__url__": url} for f in wti.tar_file_iterator(io.BytesIO(data))]
        return list(wti.group_by_keys(files))


_PIL_FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}


@functools.cache
def _torchvision_decoder() -> tuple[Any, int] | None:
    """(torch.ops.image.decode_image, the RGB mode's number), or None without torchvision's image ops.

    The op is called directly: torchvision.io.decode_image only adds a deprecation warning (its image codecs
    are deprecated from 0.29 in favour of TorchCodec) and API-usage logging, ~15 us per call on 64 px images.
    A torchvision without the op leaves decoding to PIL.
    """
    try:
        from torchvision.io import ImageReadMode

        return torch.ops.image.decode_image, int(ImageReadMode.RGB.value)
    except Exception:  # noqa: BLE001 - no torchvision, or one without image ops
        return None


def _decode_torchvision(data: bytes | memoryview) -> torch.Tensor | None:
    """uint8 (H,W,3) contiguous from libpng/libjpeg/libwebp through torchvision's image op, or None if it
    cannot (no op, corrupt data, a format or depth it does not return as 8-bit RGB).

    The op decodes into an HWC buffer and returns a (3,H,W) permuted view of it: the view's permute back is
    that buffer itself, so the caller copies it with one memcpy (a CHW copy of the view gathers byte by
    byte: 68 vs 5 us at 256 px)."""
    dec = _torchvision_decoder()
    if dec is None:
        return None
    op, rgb = dec
    if not isinstance(data, bytearray) and (not isinstance(data, memoryview) or data.readonly):
        data = bytearray(data)  # torch.frombuffer warns on read-only memory (parse_tar's samples are writable)
    try:
        img = op(torch.frombuffer(data, dtype=torch.uint8), rgb, False)
    except Exception:  # noqa: BLE001 - PIL gets a second try
        return None
    if img.dtype != torch.uint8 or img.dim() != 3 or img.shape[0] != 3:
        return None
    return img.permute(1, 2, 0).contiguous()  # no copy: the op's own HWC buffer


def _decode_pil(data: bytes | memoryview, ext: str) -> torch.Tensor | None:
    """uint8 (H,W,3) through PIL (any mode converted to RGB), or None when PIL cannot decode it either."""
    hint = _PIL_FORMATS[ext]  # tried first; the other formats still decode a mislabelled file
    formats = [hint, *(f for f in ("PNG", "JPEG", "WEBP") if f != hint)]
    try:
        with Image.open(io.BytesIO(data), formats=formats) as im:
            arr = np.array(im if im.mode == "RGB" else im.convert("RGB"))  # a writable HWC copy
    except Exception:  # noqa: BLE001 - any decoding failure is a corrupt sample
        return None
    return torch.from_numpy(arr)


def decode_hwc(sample: dict[str, Any], resolution: int, flip: bool = False) -> torch.Tensor | None:
    """uint8 (R,R,3) contiguous tensor of the sample's image (mirrored left-right if `flip`), or None when
    missing, undecodable or the wrong size.

    torchvision's image op decodes first (1.6x faster than PIL at 64 and 256 px on the 2-core CI machine);
    what it rejects (16-bit PNG, CMYK JPEG, a truncated file) gets a second try with PIL, so both decoders
    must fail before a sample counts as corrupt. Both decode into HWC, the layout the loader's batches
    keep until the trainer converts them (`normalize`).
    """
    for ext in IMAGE_EXTS:
        if ext in sample:
            data = sample[ext]
            img = _decode_torchvision(data)
            if img is None:
                img = _decode_pil(data, ext)
            if img is None or img.shape != (resolution, resolution, 3):
                return None
            return img.flip(1) if flip else img
    return None


def decode_image(sample: dict[str, Any], resolution: int, flip: bool = False) -> torch.Tensor | None:
    """`decode_hwc` as a uint8 (3,R,R) image: a channels_last view of the HWC tensor (no copy)."""
    img = decode_hwc(sample, resolution, flip)
    return None if img is None else img.permute(2, 0, 1)


def flip_bits(seed: int, epoch: int, shard: int, n: int) -> np.ndarray:
    """Flip decisions (bool) of samples 0..n-1 (tar order) of `shard` in `epoch`: bit 17 of a splitmix64
    chain over (seed, epoch, shard, sample): a function of these four numbers only, so it replays exactly."""
    h = np.full(n, 0x9E3779B97F4A7C15, dtype=np.uint64)
    for v in (np.uint64(seed & (2**64 - 1)), np.uint64(epoch), np.uint64(shard), np.arange(n, dtype=np.uint64)):
        h ^= v
        h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)  # uint64 arithmetic wraps mod 2**64
        h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        h ^= h >> np.uint64(31)
    return ((h >> np.uint64(17)) & np.uint64(1)).astype(bool)


# --------------------------------------------------------------------------------------------------
# The plan: pure arithmetic over the manifest counts
# --------------------------------------------------------------------------------------------------


@dataclass
class _Layout:
    perm: np.ndarray  # shard permutation of the epoch
    cum: np.ndarray  # cumulative sample counts along perm, with a leading 0 (len = shards + 1)
    seg_off: np.ndarray  # start of each stream's segment in Q_e
    seg_len: np.ndarray


class Plan:
    """Which sample each virtual stream serves at each of its positions (see the module docstring)."""

    def __init__(self, counts: list[int], streams: int, seed: int, window: int = 0):
        self.counts = np.asarray(counts, dtype=np.int64)
        self.N = int(self.counts.sum())
        if self.N < 1:
            raise ConfigError("the dataset manifest lists no samples")
        self.S, self.seed, self.window = int(streams), int(seed), int(window)
        self.L, self.r = divmod(self.N, self.S)
        self._layouts: collections.OrderedDict[int, _Layout] = collections.OrderedDict()

    def start(self, s: int, e: int) -> int:
        """Position in stream s where its epoch-e segment begins."""
        j = e * self.r
        return e * self.L + ((j - s + self.S - 1) // self.S if j > s else 0)

    def locate(self, s: int, p: int) -> tuple[int, int]:
        """(epoch, offset in the stream's epoch segment) of stream position p."""
        lo, hi = 0, (p + 2) * self.S // self.N + 2
        while self.start(s, hi) <= p:
            hi *= 2
        while hi - lo > 1:  # invariant: start(lo) <= p < start(hi)
            mid = (lo + hi) // 2
            if self.start(s, mid) <= p:
                lo = mid
            else:
                hi = mid
        return lo, p - self.start(s, lo)

    def layout(self, e: int) -> _Layout:
        lay = self._layouts.get(e)
        if lay is None:
            perm = np.random.default_rng([self.seed, 0, e]).permutation(len(self.counts))
            cum = np.concatenate([[0], np.cumsum(self.counts[perm])])
            seg_len = np.array([self.start(s, e + 1) - self.start(s, e) for s in range(self.S)], dtype=np.int64)
            seg_off = np.concatenate([[0], np.cumsum(seg_len)[:-1]])
            lay = _Layout(perm, cum, seg_off, seg_len)
            self._layouts[e] = lay
            while len(self._layouts) > 4:
                self._layouts.popitem(last=False)
        return lay

    def inner_perm(self, e: int, shard: int) -> np.ndarray:
        return np.random.default_rng([self.seed, 1, e, shard]).permutation(int(self.counts[shard]))

    def blocks(self, s: int, p: int) -> Iterator[tuple[int, list[tuple[int, int, int, int]], np.ndarray, int]]:
        """From stream position p on, per block: (epoch, pieces, order, skip).

        A block is a list of pieces (permutation slot i, shard, j0, j1) = samples j0..j1 of the shard's
        in-shard permuted order; `order` permutes the block's concatenated samples; the first `skip`
        entries of that order are before p (already consumed).
        """
        e, off = self.locate(s, p)
        while True:
            lay = self.layout(e)
            a, n = int(lay.seg_off[s]), int(lay.seg_len[s])
            size = self.window if self.window > 1 else 0
            pos = (off // size) * size if size else off  # block start (without a window: the position itself)
            while pos < n:
                end = min(n, pos + size) if size else None
                pieces = []
                q = a + pos
                while True:
                    i = int(np.searchsorted(lay.cum, q, side="right") - 1)
                    stop = min(int(lay.cum[i + 1]), a + (end if end is not None else n))
                    pieces.append((i, int(lay.perm[i]), q - int(lay.cum[i]), stop - int(lay.cum[i])))
                    q = stop
                    if end is None or q >= a + end:
                        break
                length = q - (a + pos)
                if size:
                    order = np.random.default_rng([self.seed, 2, e, s, pos // size]).permutation(length)
                else:
                    order = np.arange(length)
                yield e, pieces, order, off - pos if off > pos else 0
                pos, off = q - a, q - a
            e, off = e + 1, 0


# --------------------------------------------------------------------------------------------------
# Reading streams (runs in worker processes, or in the main process with num_workers=0)
# --------------------------------------------------------------------------------------------------


class _Shard:
    def __init__(self, samples: list[dict[str, Any]] | None, error: str = ""):
        self.samples = samples  # encoded samples in tar order (None: shard missing or unreadable)
        self.error = error
        self.bad: set[int] = set()  # tar indices known not to decode


class StreamReader:
    """Reads a set of virtual streams of one rank and yields, per step, their G/S samples each."""

    def __init__(self, manifest: dict[str, Any], root: str, plan: Plan, streams: list[int], per_stream: int,
                 start_step: int, *, hflip: bool, on_error: str, retries: int, scfg: StorageConfig | None,
                 cache_dir: str, defer_flip: bool = False):
        self.manifest, self.root, self.plan = manifest, root, plan
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
        except store.StorageError as e:
            if "access denied" in str(e) or "does not exist" in str(e):
                raise
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
            perm = self.plan.inner_perm(e, shard)
            got = self._perms[(e, shard)] = (perm, flip_bits(self.plan.seed, e, shard, len(perm)))
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
                if self.on_error == "fail":
                    raise DataError(f"corrupt or missing sample {key} in a shard (on_error=fail)")
        return None

    def _sample(self, e: int, i: int, shard: int, j: int,
                shards: dict[int, _Shard]) -> tuple[str, torch.Tensor, bool]:
        """Key, image and flip bit for sample j (in-shard permuted order) of `shard`, slot i of epoch e's shard
        order."""
        sh = shards[shard]
        pick = self._pick(sh, e, shard, j) if sh.samples is not None else None
        src = shard
        if pick is None:  # whole shard unusable: take the next readable shard of the epoch's permutation
            lay = self.plan.layout(e)
            n_sh = len(lay.perm)
            for d in range(1, n_sh + 1):
                if d == n_sh:
                    raise DataError(f"no readable shard in {self.root} (last error: {sh.error})")
                src = int(lay.perm[(i + d) % n_sh])
                if self.plan.counts[src] == 0:
                    continue
                sub = shards.get(src)
                if sub is None:
                    sub = shards[src] = self._submit(src).result()
                if sub.samples is None:
                    continue
                pick = self._pick(sub, e, src, j % int(self.plan.counts[src]))
                if pick is not None:
                    break
            assert pick is not None
            sh = shards[src]
        t, img = pick
        return sh.samples[t]["__key__"], img, self._flip(e, src, t)

    def _stream(self, s: int) -> Iterator[tuple[str, torch.Tensor, bool]]:
        p0 = self.start_step * self.per_stream
        blocks = self.plan.blocks(s, p0)
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

    def steps(self, ring: _Ring | None = None) -> Iterator[dict[str, Any]]:
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


class _Stopped(Exception):
    """The loader closed (or its process died) while a worker waited for a free ring slot."""


class _Ring:
    """Step batches in shared memory that the workers write in place and next_step hands out without a copy.

    `slots` whole (rows,R,R,3) batches; worker w owns rows [lo,hi) of each. Before it writes a step, a worker
    waits (acquire) for the main process to name, through the worker's `todo` pipe, the slot that step goes
    to; the main process names a slot only while no tensor of the caller's uses it (see ShardLoader._reclaim).
    So the named slots are the whole flow control (a worker runs as many steps ahead as slots are named) and a
    batch the caller keeps is never written under it.
    """

    def __init__(self, buf: torch.Tensor, lo: int, hi: int, todo: Any, stop: Any):
        self.buf, self.lo, self.hi, self.todo, self.stop = buf, lo, hi, todo, stop
        self.slot = -1  # the slot of the step being written
        self._ppid: int | None = None

    def acquire(self) -> np.ndarray:
        """This worker's rows of the slot named for its next step (waits for the name)."""
        if self._ppid is None:
            self._ppid = os.getppid()
        while not self.todo.poll(0.5):
            if self.stop.is_set() or os.getppid() != self._ppid:  # closed, or the main process died
                raise _Stopped
        try:
            self.slot = int(self.todo.recv())
        except EOFError:  # the main process closed the pipe: the loader is closing
            raise _Stopped from None
        return self.buf[self.slot, self.lo:self.hi].numpy()


def _worker_main(make_reader: Any, streams: list[int], ring: _Ring, conn: Any) -> None:
    """A loader worker process: its streams' steps into `ring`, one small message per step through `conn`
    ({"slot", "key", "stats"}), or {"error", "traceback"} when reading fails."""
    import gc
    import traceback

    torch.set_num_threads(1)
    # What the process holds at start (torch, numpy, fsspec: ~200k objects) is never garbage: keep the cyclic
    # collector's full collections, triggered by the samples of every shard read, from walking it again and
    # again (~0.1 s each).
    gc.freeze()
    try:
        for step in make_reader(streams).steps(ring):
            conn.send(step)
            if ring.stop.is_set():
                return
    except _Stopped:
        return
    except BaseException as e:  # noqa: BLE001 - handed to the main process, which re-raises it
        try:
            conn.send({"error": e, "traceback": traceback.format_exc()})
        except Exception:  # noqa: BLE001 - an exception that does not pickle: send its text
            conn.send({"error": RuntimeError(f"{type(e).__name__}: {e}"), "traceback": traceback.format_exc()})
    finally:
        conn.close()


class _Worker:
    """One worker process of a ShardLoader: the pipe its step messages arrive through (conn) and the one its
    slots are named through (todo)."""

    def __init__(self, ctx: Any, make_reader: Any, streams: list[int], buf: torch.Tensor, rows: tuple[int, int],
                 stop: Any, name: str):
        self.stop_event = stop
        self.conn, send = ctx.Pipe(duplex=False)
        todo, self.todo = ctx.Pipe(duplex=False)
        ring = _Ring(buf, *rows, todo, stop)
        self.proc = ctx.Process(target=_worker_main, args=(make_reader, streams, ring, send), name=name, daemon=True)
        self.proc.start()
        send.close()  # the child holds the write end: end-of-file here when it exits
        todo.close()  # and the read end of todo

    def name(self, slot: int) -> None:
        """Tell the worker that its next unnamed step goes to `slot`. A dead worker's broken pipe is left
        to recv(), which reports the death."""
        try:
            self.todo.send(slot)
        except OSError:
            pass

    def recv(self) -> dict[str, Any]:
        """The worker's next step message; a worker's exception is re-raised here, a dead worker is an error
        (checked every second while waiting: nothing waits forever)."""
        while not self.conn.poll(1.0):
            if not self.proc.is_alive() and not self.conn.poll(0):
                break
        try:
            msg = self.conn.recv()
        except EOFError:
            self.proc.join(5)
            raise DataError(f"data loader worker {self.proc.name} (pid {self.proc.pid}) exited unexpectedly "
                            f"(exit code {self.proc.exitcode})") from None
        if "error" in msg:
            err = msg["error"]
            err.add_note(f"in data loader worker {self.proc.name} (pid {self.proc.pid}):\n{msg['traceback']}")
            raise err
        return msg

    def stop(self) -> None:
        """Ask the worker to exit (it stops at its next step or slot wait), then make sure it did."""
        self.stop_event.set()
        self.todo.close()  # a worker waiting for a slot name sees end-of-file
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.conn.close()


def worker_streams(streams: list[int], num_workers: int, w: int) -> list[int]:
    """Worker w's contiguous run of the rank's streams."""
    k = len(streams)
    return streams[w * k // num_workers:(w + 1) * k // num_workers]


# --------------------------------------------------------------------------------------------------
# The loader
# --------------------------------------------------------------------------------------------------


class ShardLoader:
    """This rank's share of every global batch, split into grad_accum micro-batches (see module docstring).

    With num_workers > 0 the worker processes start at construction and again at load_state_dict (and run
    up to 5 steps ahead), so their start-up (importing torch in the forkserver, the first shard reads)
    runs while the trainer builds its models instead of stalling the first step.

    defer_flip (with hflip): the images come unflipped and each micro-batch carries "flip", a bool (b,)
    tensor of the samples to mirror: `normalize(mb["image"].to(device), mb["flip"])` mirrors them there. The
    trainer asks for it on a GPU, where the mirror is free; on the loader's CPUs it costs ~5% of the decode.
    The normalized batches are exactly those of the default (mirrored in the loader).
    """

    def __init__(self, url: str, *, global_batch: int, rank: int, world: int, grad_accum: int = 1, seed: int = 0,
                 hflip: bool = True, num_workers: int = 0, cache_dir: str = "", on_error: str = "skip",
                 retries: int = 5, storage: StorageConfig | None = None, resolution: int | None = None,
                 shuffle_window: int = 0, defer_flip: bool = False):
        if global_batch < 1 or world < 1 or not 0 <= rank < world or grad_accum < 1:
            raise ConfigError(f"bad loader geometry: global_batch={global_batch}, rank={rank}, world={world}, "
                              f"grad_accum={grad_accum}")
        S = num_streams(global_batch)
        if S % world:
            fits = [w for w in range(1, S + 1) if S % w == 0]
            raise ConfigError(f"the data loader splits global batch {global_batch} into {S} streams "
                              f"(gcd(batch, {MAX_STREAMS})); the number of ranks ({world}) must divide {S}: "
                              f"use {fits} ranks, or a global batch with more factors of two")
        if global_batch % (world * grad_accum):
            raise ConfigError(f"global batch {global_batch} is not divisible by ranks x grad_accum = "
                              f"{world} x {grad_accum}")
        if on_error not in ("skip", "fail"):
            raise ConfigError(f"on_error={on_error!r}: expected 'skip' or 'fail'")
        self.url, self.root = manifest_url(url), dataset_root(manifest_url(url))
        self.global_batch, self.rank, self.world, self.grad_accum = global_batch, rank, world, grad_accum
        self.seed, self.hflip, self.on_error, self.retries = seed, hflip, on_error, retries
        self.defer_flip = hflip and defer_flip
        self.cache_dir, self.scfg, self.shuffle_window = cache_dir, storage, max(0, shuffle_window)
        register_gopen(storage)
        try:
            self.manifest = read_manifest(self.url, storage, retries)
        except FileNotFoundError:
            raise ConfigError(f"no dataset manifest at {self.url}: write the shards with python jobs/make_shards.py "
                              f"and set data.url to their folder") from None
        if resolution is not None and int(self.manifest["resolution"]) != resolution:
            raise ConfigError(f"dataset {self.root} holds {self.manifest['resolution']} px images but the model "
                              f"needs {resolution} px: re-shard with resolution={resolution} or change data.url")
        self.resolution = int(self.manifest["resolution"])
        self.streams = S
        self.per_stream = global_batch // S
        per_rank = S // world
        self.my_streams = list(range(rank * per_rank, (rank + 1) * per_rank))
        self.num_workers = min(num_workers, per_rank)
        self.plan = Plan([s["samples"] for s in self.manifest["shards"]], S, seed, self.shuffle_window)
        self.total_samples = self.plan.N
        self.micro = global_batch // (world * grad_accum)
        self._step = 0
        self._it: Iterator[dict[str, Any]] | None = None  # num_workers=0: the steps of an in-process reader
        self._workers: list[_Worker] = []
        self._worker_stats: dict[int, dict[str, int]] = {}
        self._slots: list[np.ndarray] = []  # the workers' shared batch slots (one numpy array each)
        self._named: collections.deque[int] = collections.deque()  # slots named for the next steps, in order
        self._lent: list[int] = []  # slots handed out: named again once no tensor of the caller's uses them
        self._starting: tuple[threading.Thread, dict[str, Any]] | None = None
        if self.num_workers:
            self._start()  # worker start-up and the first shards overlap whatever the caller does next

    # ---- pipeline ----

    def _reader_factory(self) -> Any:
        """StreamReader(streams) with everything else bound (picklable: sent to the worker processes)."""
        return functools.partial(_make_reader, self.manifest, self.root, self.plan, self.per_stream, self._step,
                                 hflip=self.hflip, on_error=self.on_error, retries=self.retries, scfg=self.scfg,
                                 cache_dir=self.cache_dir, defer_flip=self.defer_flip)

    def _start(self) -> None:
        """(Re)start the pipeline at self._step. Worker processes are started by a background thread (their
        start-up blocks for seconds while the forkserver imports torch); the next next_step() joins it."""
        self.close()
        if self.num_workers == 0:
            self._it = self._reader_factory()(self.my_streams).steps()
            return
        ctx = worker_context()
        res, nw, make_reader = self.resolution, self.num_workers, self._reader_factory()
        runs = [worker_streams(self.my_streams, nw, w) for w in range(nw)]
        rows = len(self.my_streams) * self.per_stream
        buf = torch.empty((_RING_SLOTS, rows, res, res, 3), dtype=torch.uint8).share_memory_()
        self._slots = [buf[b].numpy() for b in range(_RING_SLOTS)]
        self._named, self._lent = collections.deque(range(_RING_SLOTS)), []
        stop = ctx.Event()
        box: dict[str, Any] = {"workers": []}

        def start() -> None:
            try:
                lo = 0
                for w, run in enumerate(runs):
                    hi = lo + len(run) * self.per_stream
                    worker = _Worker(ctx, make_reader, run, buf, (lo, hi), stop, f"loader-r{self.rank}-w{w}")
                    box["workers"].append(worker)
                    for b in range(_RING_SLOTS):
                        worker.name(b)
                    lo = hi
            except BaseException as e:  # noqa: BLE001 - re-raised by the next next_step()
                box["error"] = e

        self._starting = (threading.Thread(target=start, name="loader-start", daemon=True), box)
        self._starting[0].start()

    def _join_start(self) -> None:
        if self._starting is not None:
            thread, box = self._starting
            thread.join()
            self._starting = None
            self._workers = box["workers"]
            if "error" in box:
                self.close()
                raise box["error"]

    def next_step(self) -> list[dict[str, Any]]:
        """The rank's share of the next global batch as grad_accum micro-batches: image uint8 (b,3,R,R) (4x
        fewer bytes to move to the GPU than floats; `normalize` it there) and key. The images are in
        channels_last memory (a (b,R,R,3) array seen as (b,3,R,R): the decoders' own layout, so no sample is
        transposed on the CPU); `normalize` returns them contiguous. With defer_flip also "flip" (see the class).

        The batch is handed out in place, in the workers' shared memory: it stays valid as long as the caller
        holds a reference to it (or to a view of it); its memory is written again only once it holds none."""
        if self._it is None and self._starting is None and not self._workers:
            self._start()
        self._join_start()
        if self._it is not None:  # num_workers=0: read in this process, into a new array per step
            part = next(self._it)
            self._worker_stats[0] = part["stats"]
            images, keys, flips = torch.from_numpy(part["image"]), part["key"], part.get("flip")
        else:
            images, keys, flips = self._collect()
        self._step += 1
        b, images = self.micro, images.permute(0, 3, 1, 2)  # (rows, 3, R, R) view, channels_last strides
        out = [{"image": images[m * b:(m + 1) * b], "key": keys[m * b:(m + 1) * b]} for m in range(self.grad_accum)]
        if flips is not None:
            flip = torch.tensor(flips, dtype=torch.bool)
            for m, mb in enumerate(out):
                mb["flip"] = flip[m * b:(m + 1) * b]
        return out

    def _collect(self) -> tuple[torch.Tensor, list[str], list[bool] | None]:
        """The next step's images (rows,R,R,3) and keys from the workers: each wrote its rows of the step's
        slot in shared memory, so the images are handed out in place, without a copy (a lent slot).

        A tensor of torch.from_numpy holds a reference to its array until the last tensor or view sharing
        its memory is gone: a slot whose array has no other references than the loader's own is free and is
        named for a later step (_reclaim). A batch the caller keeps is therefore never written under it. If
        the caller keeps so many that fewer than _AHEAD_MIN slots would remain for the workers, the step is
        handed out as a copy instead and its slot goes straight back to them: keeping batches costs memory
        copies, never a stall.
        """
        self._reclaim()
        slot = self._named.popleft()
        keys: list[str] = []
        flips: list[bool] | None = [] if self.defer_flip else None
        for w, worker in enumerate(self._workers):  # in order: worker w's streams follow worker w-1's
            part = worker.recv()
            if part["slot"] != slot:
                raise RuntimeError(f"data loader worker {w} wrote slot {part['slot']}, expected {slot}")
            self._worker_stats[w] = part["stats"]
            keys += part["key"]
            if flips is not None:
                flips += part["flip"]
        if len(self._named) >= _AHEAD_MIN:
            self._lent.append(slot)
            return torch.from_numpy(self._slots[slot]), keys, flips
        # numpy's copy is one memcpy in this thread; torch's copy_ would run on the intra-op thread pool,
        # whose threads then spin-wait on the cores the workers decode on.
        images = torch.from_numpy(self._slots[slot].copy())
        self._name(slot)
        return images, keys, flips

    def _reclaim(self) -> None:
        """Name again, for the next steps, the lent slots no tensor of the caller's uses any more."""
        for slot in list(self._lent):
            if sys.getrefcount(self._slots[slot]) <= 2:  # the list's reference and getrefcount's argument
                self._lent.remove(slot)
                self._name(slot)

    def _name(self, slot: int) -> None:
        self._named.append(slot)
        for worker in self._workers:
            worker.name(slot)

    # ---- state ----

    def state_dict(self) -> dict[str, Any]:
        """Position (JSON-able, independent of rank/world/workers): global batches delivered so far."""
        return {"format": STATE_FORMAT, "step": self._step, "samples": self._step * self.global_batch,
                "epoch": self._step * self.global_batch // self.total_samples, "global_batch": self.global_batch,
                "streams": self.streams, "seed": self.seed, "shuffle_window": self.shuffle_window,
                "total_samples": self.total_samples, "num_shards": len(self.manifest["shards"])}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Continue from a state_dict() (of any world size). ConfigError if it belongs to another order."""
        if d.get("format") != STATE_FORMAT:
            raise ConfigError(f"not a data loader state (format {d.get('format')!r}, expected {STATE_FORMAT})")
        mine = self.state_dict()
        for k in ("global_batch", "seed", "shuffle_window", "total_samples", "num_shards"):
            if d.get(k) != mine[k]:
                raise ConfigError(f"the saved data position has {k}={d.get(k)!r} but this loader has {mine[k]!r}: "
                                  f"exact resume needs the same dataset, global batch, seed and shuffle window")
        self.close()
        self._step = int(d["step"])
        if self.num_workers:
            self._start()

    def stats(self) -> dict[str, int]:
        """Counters summed over this rank's readers: corrupt_samples, missing_shards, read_retries, ..."""
        out = {"corrupt_samples": 0, "missing_shards": 0, "read_retries": 0, "shards_read": 0, "bytes_read": 0}
        for st in self._worker_stats.values():
            for k, v in st.items():
                out[k] = out.get(k, 0) + int(v)
        return out

    def worker_pids(self) -> list[int]:
        """Process ids of the worker processes (waits for their start; none with num_workers=0)."""
        self._join_start()
        return [w.proc.pid for w in self._workers]

    @property
    def step(self) -> int:
        return self._step

    def close(self) -> None:
        """Stop readers and worker processes (the next next_step() starts them again at the same position)."""
        if self._starting is not None:
            self._starting[0].join()
            self._workers, self._starting = self._starting[1]["workers"], None
        workers, self._workers, it, self._it = self._workers, [], self._it, None
        self._slots, self._named, self._lent = [], collections.deque(), []  # lent batches stay valid: no
        for w in workers:  # worker writes to these slots again
            w.stop_event.set()  # all at once, then wait for each
        for w in workers:
            w.stop()
        if it is not None and hasattr(it, "close"):
            it.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def normalize(images: torch.Tensor, flip: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 images (b,3,R,R) (as the loader yields them, any memory layout) -> contiguous float32 in [-1, 1]:
    x / 127.5 - 1, mirrored left-right where the bool tensor `flip` (b,) is set (a deferred_flip loader's
    "flip": on a GPU the mirror costs nothing, on the loader's CPUs ~5% of the decode)."""
    if flip is not None:
        images = torch.where(flip.to(images.device, non_blocking=True).view(-1, 1, 1, 1), images.flip(3), images)
    return images.to(torch.float32, memory_format=torch.contiguous_format).div_(127.5).sub_(1.0)


def _make_reader(manifest: dict[str, Any], root: str, plan: Plan, per_stream: int, start_step: int,
                 streams: list[int], **kw: Any) -> StreamReader:
    return StreamReader(manifest, root, plan, streams, per_stream, start_step, **kw)


def from_config(cfg: Any, rank: int, world: int, grad_accum: int, defer_flip: bool = False) -> ShardLoader:
    """The training loader of recipe `cfg` (data.url must hold a dataset: see ensure_dataset); defer_flip:
    the caller mirrors the images (`normalize(image, flip)`), e.g. on its GPU."""
    d = cfg.data
    return ShardLoader(d.url, global_batch=cfg.train.batch_size, rank=rank, world=world, grad_accum=grad_accum,
                       seed=cfg.run.seed, hflip=d.hflip, num_workers=d.num_workers, cache_dir=d.cache_dir,
                       on_error=d.on_error, retries=d.retries, storage=cfg.storage,
                       resolution=cfg.model.resolution, shuffle_window=d.shuffle_buffer, defer_flip=defer_flip)


# --------------------------------------------------------------------------------------------------
# Canonical order, for reference statistics
# --------------------------------------------------------------------------------------------------


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

