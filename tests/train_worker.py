"""Runs training_loop for each run of a JSON spec in one process group (used by test_train.py under torchrun).

    torchrun --nproc_per_node 2 tests/train_worker.py spec.json

spec: {"runs": [{"recipe": "tiny", "overrides": ["key=value", ...]}, ...]}. Each run writes its run folder
(metrics.jsonl, checkpoints, status.txt).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from waveforge import config, dist, runtime, train


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    device = runtime.init_distributed("gloo")
    for run in spec["runs"]:
        cfg = config.load(run["recipe"], run["overrides"])
        status = train.training_loop(cfg, device=device, stop=runtime.StopFlag())
        if dist.rank() == 0:
            (Path(cfg.run.dir) / "status.txt").write_text(status)
    runtime.shutdown()


if __name__ == "__main__":
    main()
