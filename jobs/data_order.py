"""Check what a run trained on: the global batch of every step, recorded by its ranks (a run trained with
data.audit_order=true), against the data order its recipe plans: same samples, same order, none repeated
or skipped, across preemptions, requeues and changes of the number of ranks. Exit 0 when they are equal,
1 naming the first differences.

    python jobs/data_order.py run=runs/tiny/NAME
"""

import sys

from waveforge import cli

JOB_KEYS = {"run": "the run folder (required; trained with data.audit_order=true)"}


def main() -> None:
    args = cli.parse(sys.argv[1:], "data_order", __doc__, job_keys=JOB_KEYS, recipe=False, require=["run"])
    from waveforge.data import audit

    steps, problems = audit.check_run(args.job["run"])
    if not steps:
        print("no step recorded yet")
        return
    if problems:
        print(f"the run's global batches differ from its data order ({len(problems)} problem(s)):")
        print("\n".join(f"  {p}" for p in problems))
        raise SystemExit(1)
    print(f"steps 0..{steps - 1}: every global batch is the one the data order plans ({steps} steps)")


if __name__ == "__main__":
    cli.run_main(main)
