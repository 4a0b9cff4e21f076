"""Tar shards in memory: a fast scan of plain ustar archives, grouped into samples as webdataset groups them,
and webdataset's own URL openers for object stores.

    samples = parse_tar(data, url)      # [{"__key__": ..., "__url__": ..., "png": bytearray, ...}, ...]
    register_gopen(scfg)                # plain wds.WebDataset("s3://...") then reads through fsspec
"""

from __future__ import annotations

import io
import re
import struct
import sys
from typing import Any

from waveforge import storage as store
from waveforge.config import StorageConfig


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

