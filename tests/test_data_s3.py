"""Data component against a real S3 server (SeaweedFS, fixture `s3_server` from conftest.py): shards written
to s3://, streamed back identically to a local copy, plain webdataset access, clear credential errors, a shard
deleted mid-run."""

from __future__ import annotations

import time

import pytest
import torch

from waveforge import storage
from waveforge.config import StorageConfig
from waveforge.data import DataError, ShardLoader, make_shards, register_gopen

G, RES = 8, 16


pytestmark = [pytest.mark.services, pytest.mark.usefixtures("one_thread")]  # tiny tensors: see conftest


def _scfg(s3_server, secret: str | None = None) -> StorageConfig:
    return StorageConfig(endpoint_url=s3_server.endpoint_url, access_key=s3_server.access_key,
                         secret_key=secret if secret is not None else s3_server.secret_key)


def _batches(url: str, scfg: StorageConfig | None, world: int, steps: int, num_workers: int = 0):
    loaders = [ShardLoader(url, global_batch=G, rank=r, world=world, num_workers=num_workers, storage=scfg, seed=1)
               for r in range(world)]
    keys, images = [], []
    for _ in range(steps):
        for ld in loaders:
            for mb in ld.next_step():
                keys += mb["key"]
                images.append(mb["image"])
    stats = loaders[0].stats()
    for ld in loaders:
        ld.close()
    return keys, torch.cat(images), stats


def test_s3_shards_stream_like_local_ones(s3_server, tmp_path):
    scfg = _scfg(s3_server)
    url = s3_server.make_bucket("wf-data-stream") + "/synth"
    args = dict(num_samples=120, samples_per_shard=10, progress=False)
    s = make_shards("synthetic", url, RES, workers=2, storage_cfg=scfg, **args)
    assert s["shards"] == 12 and s["samples"] == 120 and storage.exists(url + "/index.json", scfg)
    again = make_shards("synthetic", url, RES, workers=2, storage_cfg=scfg, **args)
    assert again["written_shards"] == 0 and again["reused_shards"] == 12
    local = str(tmp_path / "synth")
    make_shards("synthetic", local, RES, **args)
    assert storage.read_bytes(url + "/shard-000003.tar", scfg) == (tmp_path / "synth" / "shard-000003.tar").read_bytes()

    k_s3, x_s3, stats = _batches(url, scfg, world=2, steps=20, num_workers=2)  # 160 samples: into epoch 2
    k_local, x_local, _ = _batches(local, None, world=1, steps=20)
    assert k_s3 == k_local and torch.equal(x_s3, x_local)
    assert stats["shards_read"] >= 6 and stats["missing_shards"] == 0

    import webdataset as wds  # plain webdataset reads the same shards through the registered fsspec handler

    register_gopen(scfg)
    n = sum(1 for _ in wds.WebDataset(url + "/shard-{000000..000011}.tar", shardshuffle=False))
    assert n == 120


def test_s3_wrong_secret_names_the_bucket(s3_server):
    url = s3_server.make_bucket("wf-data-auth") + "/synth"
    bad = _scfg(s3_server, secret="not-the-secret")
    t0 = time.time()
    with pytest.raises(storage.StorageError, match=r"access denied to bucket 'wf-data-auth'.*secret"):
        make_shards("synthetic", url, RES, num_samples=10, samples_per_shard=5, storage_cfg=bad, progress=False)
    make_shards("synthetic", url, RES, num_samples=10, samples_per_shard=5, storage_cfg=_scfg(s3_server),
                progress=False)
    with pytest.raises(storage.StorageError, match="access denied to bucket 'wf-data-auth'"):
        ShardLoader(url, global_batch=G, rank=0, world=1, storage=bad)
    with pytest.raises(storage.StorageError, match="bucket 'wf-data-nope' does not exist"):
        storage.read_bytes("s3://wf-data-nope/x", _scfg(s3_server))
    assert time.time() - t0 < 30


@pytest.mark.parametrize("on_error", ["skip", "fail"])
def test_s3_shard_deleted_mid_run(s3_server, on_error, capfd):
    scfg = _scfg(s3_server)
    url = s3_server.make_bucket(f"wf-data-del-{on_error}") + "/synth"
    make_shards("synthetic", url, RES, num_samples=120, samples_per_shard=3, storage_cfg=scfg, progress=False)
    ld = ShardLoader(url, global_batch=G, rank=0, world=1, storage=scfg, on_error=on_error)
    ld.next_step()
    # Stream 0's epoch-0 segment is shards perm[0..4] (15 samples = 5 shards of 3): its last one is not read yet.
    victim = int(ld.order.layout(0).perm[4])
    name = ld.manifest["shards"][victim]["name"]
    storage.remove(f"{url}/{name}", scfg)
    t0 = time.time()
    if on_error == "fail":
        with pytest.raises(DataError, match=name):
            for _ in range(14):
                ld.next_step()
    else:
        keys = [k for _ in range(14) for mb in ld.next_step() for k in mb["key"]]  # to the end of epoch 0
        assert len(keys) == 14 * G and ld.stats()["missing_shards"] == 1
        assert f"{name} is missing" in capfd.readouterr().err
    assert time.time() - t0 < 60
    ld.close()


def test_s3_reads_take_the_presigned_get(s3_server):
    """read_bytes of s3:// objects: one presigned GET on a kept-alive connection; byte ranges like s3fs's;
    what that GET cannot serve (a stale signature, a connection the server closed) falls back or reconnects
    and still returns the right bytes."""
    scfg = _scfg(s3_server)
    url = s3_server.make_bucket("wf-data-get") + "/obj.bin"
    data = bytes(range(256)) * 4096 + b"tail"  # 1 MiB + 4 bytes
    storage.write_bytes(url, data, scfg)
    fs, path = storage.filesystem(url, scfg)
    n = len(data)
    before = dict(storage.FAST_GET_STATS)
    for start, end in [(None, None), (0, n + 1), (0, n), (10, 100), (n - 5, None), (None, 7)]:
        assert storage.read_bytes(url, scfg, start=start, end=end) == data[start:end], (start, end)
        assert storage.read_bytes(url, scfg, start=start, end=end) == fs.cat_file(path, start=start, end=end)
    assert storage.FAST_GET_STATS["fast"] - before["fast"] == 12
    assert storage.read_bytes(url, scfg, start=100, end=50) == b""  # an empty range, like a slice
    assert storage.FAST_GET_STATS["fallback"] == before["fallback"]

    # A signature the server rejects (as after credentials expire): s3fs serves it, the URL is signed anew.
    signed = storage._presigned[(fs, path)]
    storage._presigned[(fs, path)] = (signed[0], signed[1].replace("Signature=", "Signature=0"))
    assert storage.read_bytes(url, scfg, start=3, end=9) == data[3:9]
    assert storage.FAST_GET_STATS["fallback"] == before["fallback"] + 1 and (fs, path) not in storage._presigned
    fast = storage.FAST_GET_STATS["fast"]
    assert storage.read_bytes(url, scfg) == data and storage.FAST_GET_STATS["fast"] == fast + 1

    # The kept-alive connection dies under the client: one fresh connection, no fallback.
    for conn in storage._connections.map.values():
        conn.sock.close()
    assert storage.read_bytes(url, scfg, start=0, end=4) == data[:4]
    assert storage.FAST_GET_STATS["fast"] == fast + 2 and storage.FAST_GET_STATS["fallback"] == before["fallback"] + 1

    # Absent objects are FileNotFoundError as from s3fs (the GET's 404 goes to s3fs).
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(url + ".absent", scfg, start=0, end=10)
