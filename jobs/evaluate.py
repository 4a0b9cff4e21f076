"""FID/KID of a trained generator against its data set, or between two image folders.

    python jobs/evaluate.py recipe=tiny checkpoint=runs/tiny/NAME eval.num_samples=50000 --json
    python jobs/evaluate.py real=data/real_pngs fake=samples/ --json
    torchrun --nproc_per_node 8 jobs/evaluate.py recipe=celebahq256 checkpoint=s3://bucket/run data.url=s3://...

checkpoint= is a run folder, checkpoint folder, export folder or URL. The recipe's eval section chooses
the features (eval.mode=clean|legacy_pytorch|legacy_tensorflow; eval.inception_path=FILE for offline
clusters; eval.feature_extractor=module:callable to inject another extractor) and its data section the
reference set (statistics cached next to the data set). --json prints one JSON object (fid, kid, ...).
"""

import json
import sys

from waveforge import cli

JOB_KEYS = {"checkpoint": "run/checkpoint/export folder or URL of the generator",
            "real": "folder of real images (with fake=)", "fake": "folder of generated images (with real=)",
            "out": "also write the JSON result to this path or URL"}


def main() -> None:
    args = cli.parse(sys.argv[1:], "evaluate", __doc__, job_keys=JOB_KEYS,
                     flags={"--json": "print the result as one JSON object on stdout"})
    from waveforge import dist, jobs

    j = {k: str(v) for k, v in args.job.items()}
    result = jobs.evaluate(args.cfg, checkpoint=j.get("checkpoint", ""), real=j.get("real", ""),
                              fake=j.get("fake", ""), out=j.get("out", ""))
    if "--json" in args.flags and dist.rank() == 0:
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    cli.run_main(main)
