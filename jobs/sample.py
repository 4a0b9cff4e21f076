"""Write samples of a trained generator: N images (seed-indexed) or one grid.

    python jobs/sample.py run=runs/tiny/NAME num=1000 out=samples/
    python jobs/sample.py run=runs/tiny/NAME/export num=64 --grid
    torchrun --nproc_per_node 4 jobs/sample.py recipe=celebahq256 run=s3://bucket/run/checkpoints num=50000

run= is a run folder, a checkpoint folder, an export folder (generator_ema.safetensors) or a URL of one.
Image i always comes from seed i (seed=S shifts the range), whatever the number of ranks or the batch
size (eval.batch_size=N); device=cpu|cuda chooses the device.
"""

import sys

from waveforge import cli

JOB_KEYS = {"run": "run folder, checkpoint, export folder or URL (required)",
            "num": "number of images (default 64)", "seed": "first seed (default 0)",
            "out": "output folder (default <run>/samples)", "device": "cpu or cuda (default: cuda if present)"}


def main() -> None:
    args = cli.parse(sys.argv[1:], "sample", __doc__, job_keys=JOB_KEYS, flags={"--grid": "write one grid PNG"},
                     require=["run"])
    from waveforge import jobs

    j = args.job
    jobs.sample(args.cfg, run=str(j["run"]), num=int(j.get("num", 64)), seed=int(j.get("seed", 0)),
                     out=str(j.get("out", "")), grid="--grid" in args.flags, device=str(j.get("device", "")))


if __name__ == "__main__":
    cli.run_main(main)
