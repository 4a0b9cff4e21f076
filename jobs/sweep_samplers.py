"""FID and speed of one trained EDM-family model over samplers x step counts: a table and a FID-vs-NFE plot.

    python jobs/sweep_samplers.py recipe=edm_tiny run=runs/edm_tiny/NAME samplers=heun,euler,fastdpm steps=4,8,16
    python jobs/sweep_samplers.py recipe=edm_cifar10 run=s3://bucket/run/checkpoints eval.num_samples=50000 \\
        samplers=heun,edm_stochastic:s_churn=40,fastdpm:kappa=1:schedule=var,pc:noise_filter=pds steps=8,16,32
    torchrun --nproc_per_node 8 jobs/sweep_samplers.py recipe=edm_cifar10 run=... samplers=heun steps=9,18

samplers= lists sampler names (heun, euler, edm_stochastic, generalized, fastdpm, pc), each with optional
`:key=value` sampler settings; other `sampler.*` overrides apply to every point. Every point uses the same
seeds and the same cached reference statistics (the recipe's data and eval sections). Writes sweep.csv,
sweep.md and fid_vs_nfe.png to out= (default <run>/sweep) and logs them to MLflow (tracking.enabled).
"""

import json
import sys

from waveforge import cli

JOB_KEYS = {"run": "run folder, checkpoint, export folder or URL of an EDM-family model (required)",
            "samplers": "comma-separated sampler[:key=value...] list (default: heun,euler,fastdpm)",
            "steps": "comma-separated step counts (default: 4,8,16)",
            "out": "output folder (default <run>/sweep)"}


def main() -> None:
    args = cli.parse(sys.argv[1:], "sweep_samplers", __doc__, job_keys=JOB_KEYS, require=["run"],
                     flags={"--json": "print the rows as one JSON list on stdout"})
    from waveforge import dist, sweep

    j = args.job
    samplers = sweep.parse_samplers(str(j.get("samplers", "heun,euler,fastdpm")))
    steps = sweep.parse_steps(j.get("steps", "4,8,16"))
    rows = sweep.run_sweep(args.cfg, run=str(j["run"]), samplers=samplers, steps=steps, out=str(j.get("out", "")))
    if "--json" in args.flags and dist.rank() == 0:
        print(json.dumps(rows), flush=True)


if __name__ == "__main__":
    cli.run_main(main)
