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
    victim = int(ld.plan.layout(0).perm[4])
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
