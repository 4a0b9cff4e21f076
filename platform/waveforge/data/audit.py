"""What a run trained on, step by step: the keys of every global batch, recorded by the ranks and checked
against the data order (`data.audit_order=true`; `python jobs/data_order.py run=DIR` checks a run).

Each start of a run (an attempt: the first start, a requeue, a resubmission, on any number of ranks) gets
a folder `<run>/data-order/attempt-NNN/` in which rank r of w appends one line per step it trains to
`rank-RRRRR-of-WWWWW.jsonl`: {"step": s, "keys": [its share of the global batch, in order]}. Lines are
flushed as written, so a process killed at any moment loses at most a partial last line (ignored).

A step trained by several attempts (those after a resume from a checkpoint older than the last trained
step) counts as trained by the newest one, as its weights do. The global batch of a step is its ranks'
shares in rank order (the loader gives rank r the r-th contiguous slice, see `waveforge.data.order`).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import IO

from waveforge import config, dist
from waveforge.config import Recipe, UserError
from waveforge.data.loader import from_config

FOLDER = "data-order"
_ATTEMPT = re.compile(r"attempt-(\d+)$")
_RANK = re.compile(r"rank-(\d+)-of-(\d+)\.jsonl$")


class DataAuditError(UserError):
    """A run's data-order record is missing or inconsistent."""


def audit_root(run_dir: Path) -> Path:
    return Path(run_dir) / FOLDER


class OrderAudit:
    """This rank's record of the keys it trains on (see the module docstring). `open` is COLLECTIVE."""

    def __init__(self, folder: Path, rank: int, world: int) -> None:
        self.folder = folder
        self.path = folder / f"rank-{rank:05d}-of-{world:05d}.jsonl"
        self._file: IO[str] | None = open(self.path, "a", buffering=1)  # noqa: SIM115 - closed in close()

    @classmethod
    def open(cls, run_dir: Path) -> OrderAudit:
        """COLLECTIVE: rank 0 creates the next attempt folder; every rank opens its file there."""

        def next_attempt() -> str:
            root = audit_root(run_dir)
            root.mkdir(parents=True, exist_ok=True)
            done = [int(m.group(1)) for p in root.iterdir() if (m := _ATTEMPT.match(p.name))]
            folder = root / f"attempt-{max(done, default=0) + 1:03d}"
            folder.mkdir()
            return str(folder)

        return cls(Path(dist.on_rank0(next_attempt)), dist.rank(), dist.world())

    def record(self, step: int, keys: Iterable[str]) -> None:
        """The keys of this rank's share of step `step` (0-based: the step the batch is trained in)."""
        if self._file is not None:
            self._file.write(json.dumps({"step": step, "keys": list(keys)}) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def recorded_batches(run_dir: Path) -> dict[int, list[str]]:
    """The global batch of every step the run trained ({step: keys}), each from the newest attempt that
    trained it. DataAuditError when an attempt's ranks disagree on which steps it trained (a rank's file
    missing or cut short other than by a kill, which loses at most the steps after the last checkpoint)."""
    root = audit_root(run_dir)
    if not root.is_dir():
        raise DataAuditError(f"{root}: no data-order record (train with data.audit_order=true)")
    attempts = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _ATTEMPT.match(p.name)) and p.is_dir())
    out: dict[int, list[str]] = {}
    for _, folder in attempts:
        shares: dict[int, dict[int, list[str]]] = {}
        worlds = set()
        for f in folder.iterdir():
            if not (m := _RANK.match(f.name)):
                continue
            worlds.add(int(m.group(2)))
            shares[int(m.group(1))] = _read_lines(f)
        if not shares:
            continue
        if len(worlds) != 1 or sorted(shares) != list(range(next(iter(worlds)))):
            raise DataAuditError(f"{folder}: files of ranks {sorted(shares)} of world size(s) {sorted(worlds)}")
        # A step counts when every rank recorded it (a kill may cut ranks' files at different steps).
        steps = set.intersection(*(set(s) for s in shares.values()))
        for step in sorted(steps):
            out[step] = [k for r in sorted(shares) for k in shares[r][step]]
    return dict(sorted(out.items()))


def _read_lines(path: Path) -> dict[int, list[str]]:
    rows: dict[int, list[str]] = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a last line cut by a kill
        rows[int(row["step"])] = list(row["keys"])  # a step trained twice in one attempt: the later one
    return rows


def compare(recorded: dict[int, list[str]], planned: list[list[str]]) -> list[str]:
    """What differs between the recorded global batches and `planned` (the data order's batches of steps
    0, 1, ...): one line per problem, [] when the run trained on exactly the planned batches in order."""
    problems = []
    missing = [s for s in range(len(planned)) if s not in recorded]
    if missing:
        problems.append(f"{len(missing)} step(s) not recorded, first {missing[:5]}")
    extra = sorted(set(recorded) - set(range(len(planned))))
    if extra:
        problems.append(f"{len(extra)} step(s) beyond the planned {len(planned)}, first {extra[:5]}")
    for s, want in enumerate(planned):
        got = recorded.get(s)
        if got is not None and got != want:
            lost, added = sorted(set(want) - set(got)), sorted(set(got) - set(want))
            what = (f"missing {lost[:3]}, unplanned {added[:3]}" if lost or added else "same samples, another order")
            problems.append(f"step {s}: global batch differs from the plan ({what})")
            if len(problems) >= 10:
                break
    return problems


def planned_batches(cfg: Recipe, steps: int) -> list[list[str]]:
    """The keys of the global batches of steps 0..steps-1 that recipe `cfg`'s data order plans: the training
    loader itself (`from_config`), read in this process as the only rank (the order is the same for any
    number of ranks)."""
    loader = from_config(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, num_workers=0)), rank=0,
                         world=1, grad_accum=1)
    try:
        return [[k for mb in loader.next_step() for k in mb["key"]] for _ in range(steps)]
    finally:
        loader.close()


def check_run(run_dir: Path) -> tuple[int, list[str]]:
    """Compare what run `run_dir` recorded with the data order of its recipe (its recipe.yaml), from step 0
    to the last recorded step: (steps compared, problems; [] = exactly the planned global batches)."""
    path = Path(run_dir) / "recipe.yaml"
    if not path.is_file():
        raise DataAuditError(f"{run_dir}: no recipe.yaml (not a run folder)")
    recorded = recorded_batches(Path(run_dir))
    steps = max(recorded) + 1 if recorded else 0
    return steps, compare(recorded, planned_batches(config.load_saved(path), steps))
