"""Deliver to MLflow what a run could not (its tracking server was down): the metric values saved in
<run>/tracking-undelivered.jsonl, into the run's MLflow run (created now if the server never answered
during the run). Idempotent: MLflow keeps one copy of a point, so running it twice adds nothing.

    python jobs/track_sync.py run=runs/celebahq256/NAME [tracking.uri=http://...]

A run delivers them itself at its next start (a resume, a requeue); this is for runs that ended.
"""

import sys

from waveforge import cli

JOB_KEYS = {"run": "the run folder (required)"}


def main() -> None:
    args = cli.parse(sys.argv[1:], "track_sync", __doc__, job_keys=JOB_KEYS, require=["run"])
    from waveforge import tracking

    sent = tracking.sync_undelivered(args.cfg, str(args.job["run"]))
    print(f"delivered {sent} metric value(s)" if sent else "nothing to deliver")


if __name__ == "__main__":
    cli.run_main(main)
