"""Resource plan of a recipe: parameters, memory per GPU (ZeRO, activations), what fits 40/80 GB, FLOPs.

    python jobs/plan.py recipe=celebahq1024 [nodes=2 gpus_per_node=8 ...] [--json]
"""

from __future__ import annotations

import json
import sys

from waveforge import cli
from waveforge.plan import format_plan, plan


def main() -> None:
    args = cli.parse(sys.argv[1:], prog="plan", description=__doc__,
                     flags={"--json": "print one JSON object instead of the table"})
    result = plan(args.cfg)
    if "--json" in args.flags:
        print(json.dumps(result))
    else:
        print(format_plan(result))


if __name__ == "__main__":
    cli.run_main(main)
