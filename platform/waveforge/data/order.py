"""The order of training samples: pure arithmetic over the manifest's sample counts.

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

RANKS. Rank r of w serves streams [r*S/w, (r+1)*S/w) (w must divide S): its share of the global batch is
a contiguous slice, so the same sample sits at the same position of the global batch for any world size.

FLIPS are decided by a hash of (seed, epoch, shard, sample), not by an RNG state, so they replay exactly.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from waveforge.config import ConfigError, data_streams


def num_streams(global_batch: int) -> int:
    """Virtual streams for a global batch: gcd(global_batch, 64); the world size must divide it (the recipe
    check `config.check_resources` uses the same function before anything starts)."""
    return data_streams(global_batch)


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



@dataclass
class _Layout:
    perm: np.ndarray  # shard permutation of the epoch
    cum: np.ndarray  # cumulative sample counts along perm, with a leading 0 (len = shards + 1)
    seg_off: np.ndarray  # start of each stream's segment in Q_e
    seg_len: np.ndarray


class SampleOrder:
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
