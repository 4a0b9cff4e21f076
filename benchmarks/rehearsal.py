"""The preemption rehearsal of tests/test_rehearsal.py at more ranks than CI runs (CI: 8 -> 4):

    .venv/bin/python benchmarks/rehearsal.py ranks=16 [steps=64] [dir=/tmp/wf-rehearsal-16]

Starts the real local Slurm (2 fake nodes with ranks/2 CPUs each), SeaweedFS and MLflow from infra/ (the
test's fixtures), runs the tiny model on `ranks` ranks, stops it by Slurm's time-limit signal (requeued,
resumes on `ranks`), stops it again (SIGTERM) and continues it by a new submission on ranks/2 to the end.
Prints the test's report: the stops, the seconds of each phase, and that the data order was exact (the test
fails, and this script exits non-zero, on any difference). Needs ~0.7 GB of memory per rank. The run folder
(logs of every task) stays in `dir` (emptied first).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NoReturn

REPO = Path(__file__).resolve().parents[1]


def usage_error(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def main() -> None:
    if any("=" not in a for a in sys.argv[1:]):
        usage_error(f"arguments are key=value: {' '.join(sys.argv[1:])}")
    args = dict(a.split("=", 1) for a in sys.argv[1:])
    unknown = set(args) - {"ranks", "steps", "dir"}
    if unknown:
        usage_error(f"unknown argument(s) {sorted(unknown)}: ranks=4|8|16 [steps=N] [dir=PATH]")
    raw, steps = args.get("ranks", "16"), args.get("steps", "64")
    ranks = int(raw) if raw.isdigit() else 0
    if ranks not in (4, 8, 16):
        usage_error(f"ranks={raw}: 4, 8 or 16 (the tiny recipe's global batch of 16 is split over the ranks)")
    if not steps.isdigit() or int(steps) < 16:
        usage_error(f"steps={steps}: a whole number >= 16 (the stops come after the first few steps)")
    tmp = Path(args.get("dir", f"{tempfile.gettempdir()}/wf-rehearsal-{ranks}"))
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    report = tmp / "report.json"
    env = {**os.environ, "WAVEFORGE_REHEARSAL_RANKS": str(ranks), "WAVEFORGE_SLURM_CPUS": str(ranks // 2),
           "WAVEFORGE_REHEARSAL_STEPS": steps, "WAVEFORGE_REHEARSAL_REPORT": str(report),
           "WAVEFORGE_REQUIRE_SERVICES": "1"}
    r = subprocess.run([sys.executable, "-m", "pytest", "tests/test_rehearsal.py", "-q", "-p", "no:cacheprovider",
                        f"--basetemp={tmp}/pytest"], cwd=REPO, env=env)
    if r.returncode != 0 or not report.is_file():
        raise SystemExit(f"the rehearsal at {ranks} ranks failed (pytest exit {r.returncode}); see above and the "
                         f"task logs in {tmp}/pytest/*/run/logs")
    print("RESULT " + json.dumps(json.loads(report.read_text())))


if __name__ == "__main__":
    main()
