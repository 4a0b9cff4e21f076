"""Resource plan of a recipe: parameters, memory per GPU (ZeRO, activations), what fits 40/80 GB, FLOPs, the
bytes each rank communicates per iteration, and a model of the step time and scaling efficiency at 1/2/8 nodes.

    python jobs/plan.py recipe=celebahq1024 [nodes=2 gpus_per_node=8 ...] [step_s=2.3 step_batch=4] [--json]

The scaling table is a prediction of a model (its assumptions are printed with it). Its compute time comes from
a measured one-GPU step (step_s= seconds per iteration at step_batch= images, default this plan's images per
GPU) or, without one, from the plan's FLOPs at mfu= of the H100's dense peak (peak_tflops=).
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any

from waveforge import cli
from waveforge.plan import DEFAULT_MFU, NVLINK_GBS, format_plan, plan

JOB_KEYS = {
    "step_s": "measured seconds per training iteration of one GPU (the scaling model's compute basis)",
    "step_batch": "images per iteration of that measured step (default: this plan's images per GPU)",
    "mfu": f"without step_s: model FLOPs utilisation of the FLOP-based estimate (default {DEFAULT_MFU:g})",
    "peak_tflops": "without step_s: the GPU's peak TFLOP/s (default H100 SXM dense: 989 bf16/fp16, 495 TF32)",
    "nvlink_gbs": f"NVLink bus bandwidth within a node, GB/s per direction (default {NVLINK_GBS:g})",
    "nics": "network cards a node, 200 or 400 Gb/s each (default one per GPU)",
}


def _positive(job: dict[str, Any], key: str, *, integer: bool = False, at_most: float | None = None) -> Any:
    """Job key `key` as a finite number > 0 (an integer >= 1 if `integer`, at most `at_most` if given); None
    when absent. Anything else exits with status 2."""
    if key not in job:
        return None
    v = job[key]
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
    ok = ok and (not integer or v == int(v)) and (at_most is None or v <= at_most)
    if not ok:
        cli.fail(f"{key}={v!r}: expected {'an integer >= 1' if integer else 'a number > 0'}"
                 + (f" and <= {at_most:g}" if at_most is not None else ""))
    return int(v) if integer else float(v)


def main() -> None:
    args = cli.parse(sys.argv[1:], prog="plan", description=__doc__, job_keys=JOB_KEYS,
                     flags={"--json": "print one JSON object instead of the table"})
    j = args.job
    if "step_batch" in j and "step_s" not in j:
        cli.fail("step_batch= is the batch of a measured step: give step_s= with it")
    if "step_s" in j and ("mfu" in j or "peak_tflops" in j):
        cli.fail("mfu= and peak_tflops= set the FLOP-based estimate, which step_s= replaces: give one or the other")
    mfu = _positive(j, "mfu", at_most=1.0)
    nvlink = _positive(j, "nvlink_gbs")
    result = plan(args.cfg, step_s=_positive(j, "step_s"), step_batch=_positive(j, "step_batch", integer=True),
                  mfu=DEFAULT_MFU if mfu is None else mfu, peak_tflops=_positive(j, "peak_tflops"),
                  nvlink_gbs=NVLINK_GBS if nvlink is None else nvlink,
                  nics_per_node=_positive(j, "nics", integer=True))
    if "--json" in args.flags:
        print(json.dumps(result))
    else:
        print(format_plan(result))


if __name__ == "__main__":
    cli.run_main(main)
