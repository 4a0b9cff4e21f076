"""Train a recipe in this process: alone, under torchrun/deepspeed, or under srun in a Slurm allocation.

    python jobs/train.py recipe=tiny
    torchrun --nproc_per_node 2 jobs/train.py recipe=tiny dist.zero_stage_g=3
    srun python jobs/train.py recipe=celebahq256 run.dir=/shared/runs/celeb

To submit to Slurm (or run as local processes) with requeue on preemption, use jobs/submit.py.
"""

import sys

from waveforge import cli


def main() -> None:
    args = cli.parse(sys.argv[1:], "train", __doc__)
    if args.cfg.data.num_workers:
        from waveforge.data import start_worker_server

        start_worker_server()  # its torch import overlaps ours: the loader's workers start at once later
    from waveforge import runtime, train

    try:
        status = train.main(args.cfg)
    finally:
        runtime.shutdown()  # NCCL warns (and may leak) when a process exits with its group alive
    raise SystemExit(0 if status == "finished" else 3)  # 3: stopped on request, checkpoint written


if __name__ == "__main__":
    cli.run_main(main)
