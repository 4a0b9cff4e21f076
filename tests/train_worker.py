"""Runs training_loop for each run of a JSON spec in one process group (used by test_train.py under torchrun).

    torchrun --nproc_per_node 2 tests/train_worker.py spec.json

spec: {"runs": [{"recipe": "tiny", "overrides": ["key=value", ...], "stop_after": N}, ...]}. Each run writes its
run folder (metrics.jsonl, checkpoints, status.txt). stop_after: a stop is requested after N steps, as a
preemption signal would (the loop checks the flag once per step).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from waveforge import config, dist, runtime, train


class StopAfter(runtime.StopFlag):
    """A stop flag that is raised at the N-th step boundary, like USR2 arriving during step N."""

    def __init__(self, steps: int) -> None:
        super().__init__()
        self.left = steps

    @property
    def requested(self) -> bool:
        self.left -= 1
        return self.left < 0 or bool(self.signals)


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    device = runtime.init_distributed("gloo")
    for run in spec["runs"]:
        cfg = config.load(run["recipe"], run["overrides"])
        stop = StopAfter(run["stop_after"] - 1) if run.get("stop_after") else runtime.StopFlag()
        status = train.training_loop(cfg, device=device, stop=stop)
        if dist.rank() == 0:
            (Path(cfg.run.dir) / "status.txt").write_text(status)
    runtime.shutdown()


if __name__ == "__main__":
    main()
