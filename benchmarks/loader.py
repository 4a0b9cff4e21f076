"""Data loader throughput: decoded samples/s from local disk and from S3 (SeaweedFS), next to the raw
decode rate of the same images in memory (the limit).

    python benchmarks/loader.py [resolution=64 num_samples=4096 samples_per_shard=128 batch=64 workers=2 steps=100]

The S3 numbers use AWS_ENDPOINT_URL / AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY when AWS_ENDPOINT_URL is set
(bucket `bucket=`, default waveforge-bench); otherwise the benchmark starts its own SeaweedFS with
infra/s3/start.sh (state in a temporary folder, free ports on 127.0.0.1) and stops it at the end.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        if p + 10000 < 65536:
            with socket.socket() as s2:
                try:
                    s2.bind(("127.0.0.1", p + 10000))
                    return p
                except OSError:
                    continue


def _decode_all(args: tuple[list[dict], int, float]) -> int:
    """Decode the samples over and over for `seconds`; the number decoded."""
    from waveforge.data.loader import decode_image

    samples, res, seconds = args
    n, t0 = 0, time.perf_counter()
    while True:
        for s in samples:
            decode_image(s, res)
        n += len(samples)
        if time.perf_counter() - t0 >= seconds:
            return n


def in_memory_rate(url: str, res: int, workers: int, seconds: float, repeats: int) -> tuple[float, float]:
    """(samples/s of one process, samples/s of `workers` processes) decoding the shards' images from memory."""
    import concurrent.futures as cf
    import json

    from waveforge import storage
    from waveforge.data.loader import parse_tar, worker_context

    m = json.loads(storage.read_bytes(storage.join(url, "index.json")))
    samples = [s for sh in m["shards"] for s in parse_tar(storage.read_bytes(storage.join(url, sh["name"])), "")]
    _decode_all((samples[:64], res, 0.0))  # warm up
    one = many = 0.0
    with cf.ProcessPoolExecutor(workers, mp_context=worker_context()) as pool:
        list(pool.map(_decode_all, [(samples[:32], res, 0.0)] * workers))  # start the processes
        for _ in range(repeats):  # best of `repeats`: the machine may be shared
            t = time.perf_counter()
            one = max(one, _decode_all((samples, res, seconds)) / (time.perf_counter() - t))
            t = time.perf_counter()
            n = sum(pool.map(_decode_all, [(samples[w::workers], res, seconds) for w in range(workers)]))
            many = max(many, n / (time.perf_counter() - t))
    return one, many


def loader_rate(url: str, batch: int, workers: int, steps: int, scfg, repeats: int) -> float:
    """Decoded samples/s of ShardLoader (float [-1,1] batches in the main process): best of `repeats`
    timed runs of `steps` steps, after warm-up steps."""
    from waveforge.data import ShardLoader

    ld = ShardLoader(url, global_batch=batch, rank=0, world=1, num_workers=workers, storage=scfg)
    for _ in range(3):
        ld.next_step()  # worker start-up and the first shards
    rate = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(steps):
            ld.next_step()
        rate = max(rate, steps * batch / (time.perf_counter() - t))
    ld.close()
    return rate


def main(argv: list[str]) -> None:
    from waveforge import cli
    from waveforge.config import StorageConfig
    from waveforge.data import make_shards

    keys = {"resolution": "image size (default 64)", "num_samples": "synthetic images (default 4096)",
            "samples_per_shard": "default 128", "batch": "global batch (default 64)",
            "workers": "DataLoader workers (default 2)", "steps": "timed steps (default 60)",
            "encoding": "png (default), jpg or webp", "bucket": "S3 bucket (default waveforge-bench)",
            "repeats": "timed repetitions, best kept (default 3)"}
    args = cli.parse(argv, "loader", __doc__, job_keys=keys, recipe=False)
    o = {"resolution": 64, "num_samples": 4096, "samples_per_shard": 128, "batch": 64, "workers": 2, "steps": 100,
         "encoding": "png", "bucket": "waveforge-bench", "repeats": 3, **args.job}
    res, workers, repeats = int(o["resolution"]), int(o["workers"]), int(o["repeats"])
    import torch

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="wf-bench-loader-"))
    env, started = dict(os.environ), False
    if not os.environ.get("AWS_ENDPOINT_URL"):
        port = _free_port()
        ports = {"WAVEFORGE_S3_PORT": port}
        for name in ("MASTER", "VOLUME", "FILER", "ADMIN"):
            ports[f"WAVEFORGE_S3_{name}_PORT"] = _free_port()
        env.update({k: str(v) for k, v in ports.items()}, WAVEFORGE_INFRA_DIR=str(tmp / "infra"))
        subprocess.run(["bash", str(REPO / "infra" / "s3" / "start.sh")], env=env, check=True, capture_output=True)
        started = True
        key, secret = (tmp / "infra" / "s3" / "credentials").read_text().split()
        scfg = StorageConfig(endpoint_url=f"http://127.0.0.1:{port}", access_key=key, secret_key=secret)
    else:
        scfg = StorageConfig()
    try:
        local = str(tmp / "shards")
        s3 = f"s3://{o['bucket']}/synthetic-{res}-{o['encoding']}-{o['num_samples']}"
        common = dict(num_samples=int(o["num_samples"]), samples_per_shard=int(o["samples_per_shard"]),
                      encoding=o["encoding"], workers=workers, progress=False)
        s = make_shards("synthetic", local, res, **common)
        make_shards("synthetic", s3, res, storage_cfg=scfg, **common)
        print(f"data: {s['samples']} synthetic {res}px {o['encoding']} images, {s['shards']} shards, "
              f"{s['bytes'] / 2**20:.1f} MiB; global batch {o['batch']}, {workers} workers, "
              f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        seconds = int(o["steps"]) * int(o["batch"]) / 4000  # about as long as one loader run
        one, many = in_memory_rate(local, res, workers, seconds, repeats)
        disk = loader_rate(local, int(o["batch"]), workers, int(o["steps"]), None, repeats)
        remote = loader_rate(s3, int(o["batch"]), workers, int(o["steps"]), scfg, repeats)
        print(f"{'source':<34}{'samples/s':>12}{'per worker':>12}{'vs in-memory':>14}")
        print(f"{'in-memory decode, 1 process':<34}{one:>12.0f}{one:>12.0f}{'':>14}")
        print(f"{f'in-memory decode, {workers} processes':<34}{many:>12.0f}{many / workers:>12.0f}{1:>14.2f}")
        print(f"{'ShardLoader, local disk':<34}{disk:>12.0f}{disk / workers:>12.0f}{disk / many:>14.2f}")
        print(f"{'ShardLoader, SeaweedFS S3':<34}{remote:>12.0f}{remote / workers:>12.0f}{remote / many:>14.2f}")
        print(f"S3 streaming / in-memory decode ({workers} workers): {remote / many:.0%} (target >= 80%)")
    finally:
        if started:
            subprocess.run(["bash", str(REPO / "infra" / "s3" / "stop.sh")], env=env, capture_output=True)
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])
