"""Submit a training (or evaluation / sampling) job to Slurm through submitit, or run it as local processes.

    python jobs/submit.py recipe=ffhq1024 nodes=8                    # 8 nodes x 8 GPUs, one task per GPU
    python jobs/submit.py recipe=celebahq256 partition=a100 time=48:00:00 account=vision
    python jobs/submit.py recipe=ffhq1024 nodes=8 --dry-run          # print recipe + sbatch script only
    python jobs/submit.py recipe=tiny cluster=local                  # laptop: local processes, waits
    python jobs/submit.py recipe=tiny job=evaluate run=runs/tiny/NAME

The job gets a run folder (runs/<recipe>/<run name>/: resolved recipe, submission script, per-task logs
under logs/, code version, checkpoints). On preemption or time limit (USR2 from Slurm) every rank saves
a checkpoint together and the job requeues itself; a requeued job (with or without a signal) resumes
from the run folder's latest checkpoint and continues the same MLflow run.
"""

import sys
from pathlib import Path

from waveforge import cli

JOB_KEYS = {
    "job": "train (default), evaluate or sample",
    "run": "for job=evaluate/sample: a run folder, checkpoint or exported generator",
    "num": "for job=sample: number of images",
    "out": "for job=sample/evaluate: output folder / JSON path",
}
FLAGS = {
    "--dry-run": "print the resolved recipe and the full sbatch script; submit nothing",
    "--wait": "wait for the job and stream rank 0's log (always on for cluster=local)",
    "--no-preflight": "skip the checks before submitting (partition size, data readable, tracking server up)",
}


def main() -> None:
    args = cli.parse(sys.argv[1:], "submit", __doc__, job_keys=JOB_KEYS, flags=FLAGS)
    from datetime import UTC, datetime

    from waveforge import config

    job = str(args.job.get("job", "train"))
    if job not in ("train", "evaluate", "sample"):
        cli.fail(f"job={job!r} is not valid: one of train, evaluate, sample")
    cfg = config.with_run_folder(args.cfg, datetime.now(UTC).strftime("%Y%m%d-%H%M%S"))
    config.check_resources(cfg, config.world_size(cfg))  # before anything heavy is imported
    from waveforge import submit

    run_dir = Path(cfg.run.dir)
    if "--dry-run" in args.flags:
        print("# resolved recipe\n" + config.to_yaml(cfg))
        print(f"# run folder: {run_dir}\n# sbatch script\n{submit.sbatch_script(cfg, job)}")
        return
    backend = submit.choose_backend(cfg.cluster.backend)
    job_args = {k: v for k, v in args.job.items() if k != "job"}
    if job == "evaluate" and "run" in job_args:
        job_args["checkpoint"] = str(job_args.pop("run"))
    if "--no-preflight" not in args.flags:
        submit.preflight(cfg, job, job_args, backend)  # nothing is written or submitted before it passes
    handle = submit.submit(cfg, job, job_args, backend)
    logs = submit.log_folder(run_dir)
    print(f"submitted {job} job {handle.job_id} ({backend})\nrun folder: {run_dir}\n"
          f"logs: {logs}/{handle.job_id}_<task>_log.out (rank 0: {handle.paths.stdout})", flush=True)
    if backend == "local" or "--wait" in args.flags:
        try:
            submit.follow(handle)  # rank 0's log; a failed task cancels the rest at once
        except submit.JobFailed as e:  # the job's own traceback is in the log named
            print(str(e), file=sys.stderr)
            raise SystemExit(1) from None


if __name__ == "__main__":
    cli.run_main(main)
