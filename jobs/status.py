"""The state of a run: its jobs (Slurm or local), requeues, step of total and ETA, last metrics and
evaluation, newest checkpoint, MLflow run, and the last log lines of a failed task.

    python jobs/status.py run=runs/tiny/20261207-011617
    python jobs/status.py run=runs/ffhq1024/NAME --json
"""

import json
import sys

from waveforge import cli

JOB_KEYS = {"run": "the run folder (required)", "tail": "log lines shown of a failed task (default 15)"}


def main() -> None:
    args = cli.parse(sys.argv[1:], "status", __doc__, job_keys=JOB_KEYS, recipe=False, require=["run"],
                     flags={"--json": "print one JSON object"})
    from waveforge import status

    st = status.run_status(str(args.job["run"]), tail=int(args.job.get("tail", 15)))
    print(json.dumps(st) if "--json" in args.flags else status.format_status(st))


if __name__ == "__main__":
    cli.run_main(main)
