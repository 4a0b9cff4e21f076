"""Write a dataset as WebDataset tar shards + index.json (local folder or object storage).

    python jobs/make_shards.py source=photos/ output=s3://bucket/ffhq256 resolution=256 workers=8
    python jobs/make_shards.py source=celeba.zip output=data/celeba64 resolution=64 encoding=jpg quality=95
    python jobs/make_shards.py source=synthetic num_samples=10000 output=data/synthetic-64 resolution=64

The logic lives in waveforge.data.shards.make_shards; this file only parses the command line.
"""

from __future__ import annotations

import json
import sys

from waveforge import cli
from waveforge.config import ConfigError, StorageConfig
from waveforge.data.shards import make_shards

JOB_KEYS = {
    "source": "folder of images (jpg/png/webp, recursive), a .zip of images, or 'synthetic'",
    "output": "shard folder: path, file://, s3://bucket/prefix, gs://bucket/prefix",
    "resolution": "output size in pixels (short side resized, then centre-cropped to a square)",
    "num_samples": "use the first N images (sorted order); required for source=synthetic",
    "encoding": "png (default, lossless), jpg or webp",
    "quality": "jpg/webp quality 1-100 (default 95)",
    "shard_mb": "target shard size in MiB (default 32; a loader stream holds ~2 shards in memory)",
    "samples_per_shard": "exact samples per shard (overrides shard_mb)",
    "workers": "parallel encoder processes (default 1)",
    "seed": "seed of the synthetic source (default 0)",
    "prefix": "shard file name prefix (default 'shard': shard-000000.tar, ...)",
    "endpoint_url": "S3 endpoint (default: AWS_ENDPOINT_URL); keys come from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY",
    "region": "S3 region (default: AWS_REGION)",
}
TYPES = {"source": str, "output": str, "resolution": int, "num_samples": int, "encoding": str, "quality": int,
         "shard_mb": float, "samples_per_shard": int, "workers": int, "seed": int, "prefix": str,
         "endpoint_url": str, "region": str}


def main(argv: list[str]) -> None:
    args = cli.parse(argv, "make_shards", __doc__, job_keys=JOB_KEYS, flags={"--json": "print the summary as JSON"},
                     recipe=False, require=("source", "output", "resolution"))
    job = {}
    for k, v in args.job.items():
        tp = TYPES[k]
        if tp is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if tp is str and isinstance(v, (int, float)) and not isinstance(v, bool):
            v = str(v)
        if not isinstance(v, tp) or isinstance(v, bool):
            cli.fail(f"{k}={v!r} is not valid: expected {tp.__name__}")
        job[k] = v
    scfg = StorageConfig(endpoint_url=job.pop("endpoint_url", ""), region=job.pop("region", ""))

    def run() -> None:
        summary = make_shards(job.pop("source"), job.pop("output"), job.pop("resolution"), storage_cfg=scfg,
                              progress="--json" not in args.flags, **job)
        if "--json" in args.flags:
            print(json.dumps(summary))
            return
        print(f"wrote {summary['samples']} samples in {summary['shards']} shards ({summary['bytes'] / 2**20:.1f} MiB; "
              f"{summary['written_shards']} written, {summary['reused_shards']} already complete) to "
              f"{summary['output']} in {summary['seconds']} s")
        print(f"manifest: {summary['manifest']}")
        if summary["skipped"]:
            names = summary["skipped_names"]
            print(f"skipped {summary['skipped']} unreadable images: {', '.join(names[:10])}"
                  f"{' ...' if len(names) > 10 else ''}")
        print(f"train on it with: data.url={summary['output']}")

    cli.run_main(run)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except ConfigError as e:
        cli.fail(str(e))
