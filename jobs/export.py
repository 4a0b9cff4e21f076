"""Export the EMA generator of a run's checkpoint for inference (one process, no GPU needed).

    python jobs/export.py run=runs/celebahq256/20261122-040000
    python jobs/export.py run=runs/celebahq256/20261122-040000 checkpoint=120000 out=/tmp/celeb
    python jobs/export.py run=s3://bucket/runs/celeb out=/tmp/celeb      # remote: out= is required

Writes OUT/generator_ema.safetensors (the EMA generator's full state dict) and OUT/model_config.json (the
recipe's model and diffusion sections, step, source). OUT defaults to RUN_DIR/export/. `run=` may also
name a checkpoints/ folder or one checkpoint folder (step-NNNNNNNNN). S3 credentials and endpoint come
from the AWS_* environment variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY).
"""

import sys
from pathlib import Path

from waveforge import cli

JOB_KEYS = {
    "run": "run folder, checkpoints folder, checkpoint folder, or s3://... URL of one (required)",
    "checkpoint": "step number or step-NNNNNNNNN name (default: the newest complete checkpoint)",
    "out": "output folder (default: RUN_DIR/export; required for a URL)",
}


def main() -> None:
    args = cli.parse(sys.argv[1:], "export", __doc__, job_keys=JOB_KEYS, recipe=False, require=["run"])
    from waveforge import checkpoint

    out = args.job.get("out")
    try:
        path = checkpoint.export(str(args.job["run"]), Path(str(out)) if out is not None else None,
                                 checkpoint=str(args.job.get("checkpoint", "")))
    except checkpoint.CheckpointError as e:
        cli.fail(str(e))
    print(f"exported {path / 'generator_ema.safetensors'} and {path / 'model_config.json'}")


if __name__ == "__main__":
    cli.run_main(main)
