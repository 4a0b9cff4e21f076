"""Training statistics without host synchronisation: accumulated on the device during a log interval,
reduced across ranks once per interval, and timed with CUDA events on a GPU (perf_counter on the CPU).

    timer = PhaseTimer(device)
    with timer.phase("d_fwd_bwd"): ...              # device time of the enclosed work
    meter = IntervalMeter(device, timer)
    meter.add(stats, images=batch)                   # device tensors, no .item()
    metrics = meter.reduce(extra_sums=...)           # COLLECTIVE, once per log interval: one all-reduce
    state = meter.state_dict()                       # COLLECTIVE: the partial interval, carried over a stop

Every value is a mean: a stat given as a tensor counts once per step, a (sum, count) pair is pooled by its
count (e.g. errors of the samples that fell in a noise band). Timings are seconds per step, averaged over
ranks; `data_wait` is host time spent waiting for the loader's next batch.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from PIL import Image

from waveforge import dist


class PhaseTimer:
    """Seconds per named phase: device time between CUDA events on a GPU (read once, when `seconds()` is
    called: recording events never waits for the GPU), wall time on the CPU (where work is synchronous)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._events: list[tuple[str, Any, Any]] = []
        self._host: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((name, start, end))
        else:
            t0 = time.perf_counter()
            yield
            self.add(name, time.perf_counter() - t0)

    def add(self, name: str, seconds: float) -> None:
        """Host-measured seconds of `name` (also on a GPU: e.g. waiting for data)."""
        self._host[name] = self._host.get(name, 0.0) + seconds

    def seconds(self) -> dict[str, float]:
        """Total seconds per phase since the last call (waits for the last recorded event), then resets."""
        out = dict(self._host)
        if self._events:
            self._events[-1][2].synchronize()
            for name, start, end in self._events:
                out[name] = out.get(name, 0.0) + start.elapsed_time(end) / 1000.0
        self._events, self._host = [], {}
        return out


def _as_pair(value: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(value, tuple):
        total, count = value
    else:
        total, count = value, 1.0
    return (torch.as_tensor(total, device=device).detach().double(),
            torch.as_tensor(count, device=device).detach().double())


class IntervalMeter:
    """Sums and counts of one log interval on the device, the interval's images and wall time."""

    def __init__(self, device: torch.device, timer: PhaseTimer) -> None:
        self.device, self.timer = device, timer
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, torch.Tensor] = {}
        self._carried: dict[str, tuple[float, float]] = {}  # a resumed run's partial interval (rank 0 only)
        self.steps = 0
        self.images = 0
        self._seconds = 0.0  # wall time of the interval before a stop (carried over the resume)
        self._started = time.perf_counter()

    def add(self, stats: dict[str, Any], images: int) -> None:
        """One step's stats (tensors or (sum, count) pairs; no host sync) and its global image count."""
        for k, v in stats.items():
            total, count = _as_pair(v, self.device)
            if k in self._sums:
                self._sums[k] += total
                self._counts[k] += count
            else:
                self._sums[k], self._counts[k] = total, count
        self.steps += 1
        self.images += images

    def _totals(self, extra_sums: dict[str, float]) -> dict[str, tuple[float, float]]:
        """COLLECTIVE: (sum, count) of every stat and timing over ranks (and the carried partial interval),
        in one all-reduce; `extra_sums` are summed over ranks (counters)."""
        timings = {f"s_per_step_{k}": v for k, v in sorted(self.timer.seconds().items())}
        keys = sorted(self._sums)
        host = [*(timings[k] for k in timings), *(float(extra_sums[k]) for k in sorted(extra_sums)),
                *(float(self.steps) for _ in timings)]
        parts = [torch.stack([self._sums[k] for k in keys] + [self._counts[k] for k in keys])] if keys else []
        parts.append(torch.tensor(host, dtype=torch.float64, device=self.device))
        vec = dist.all_reduce_sum(torch.cat(parts)).tolist()  # the interval's one host synchronisation
        n = len(keys)
        out = {k: (vec[i], vec[n + i]) for i, k in enumerate(keys)}
        rest = vec[2 * n:]
        nt, ne = len(timings), len(extra_sums)
        for i, k in enumerate(timings):
            out[k] = (rest[i], rest[nt + ne + i])
        for i, k in enumerate(sorted(extra_sums)):
            out[k] = (rest[nt + i], 1.0)
        for k, (s, c) in self._carried.items():
            s0, c0 = out.get(k, (0.0, 0.0))
            out[k] = (s0 + s, c0 + c) if not k.startswith("data_") else (s0, c0)  # counters are totals already
        return out

    def reduce(self, extra_sums: dict[str, float] | None = None) -> dict[str, float]:
        """COLLECTIVE: the interval's means over ranks and steps, images/s and seconds per step; then resets.
        `extra_sums`: this rank's counters, logged as their sum over ranks."""
        totals = self._totals(extra_sums or {})
        elapsed = self._seconds + time.perf_counter() - self._started
        out = {k: (s / c if c > 0 else math.nan) for k, (s, c) in totals.items()}
        for k in extra_sums or {}:
            out[k] = totals[k][0]
        out.update(images_per_s=self.images / max(elapsed, 1e-9), s_per_step=elapsed / max(self.steps, 1),
                   interval_images=float(self.images))
        if "s_per_step_data_wait" in out:
            out["data_wait_share"] = out["s_per_step_data_wait"] / max(out["s_per_step"], 1e-12)
        self._reset()
        return out

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent in the block (an evaluation, a checkpoint) is not the interval's training time: images/s
        and seconds per step stay true to training."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._started += time.perf_counter() - t0

    def _reset(self) -> None:
        self._sums, self._counts, self._carried = {}, {}, {}
        self.steps, self.images, self._seconds = 0, 0, 0.0
        self._started = time.perf_counter()

    def state_dict(self) -> dict[str, Any]:
        """COLLECTIVE: the partial interval so far (sums and counts over ranks, images, wall time), for a
        checkpoint written at a stop: a resumed run logs it with its next point, as if never interrupted."""
        totals = self._totals({})
        return {"totals": {k: [s, c] for k, (s, c) in totals.items()}, "steps": self.steps, "images": self.images,
                "seconds": self._seconds + time.perf_counter() - self._started}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue a partial interval (rank 0 holds the carried totals: the reduction adds them once)."""
        self._reset()
        if dist.rank() == 0:
            self._carried = {k: (float(s), float(c)) for k, (s, c) in state["totals"].items()}
        self.steps, self.images, self._seconds = int(state["steps"]), int(state["images"]), float(state["seconds"])


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this process: allocated on the GPU, or the host's resident set (GiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def _clock(seconds: float) -> str:
    s = int(max(seconds, 0))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class RunLog:
    """Where a run's numbers go: rank 0's MLflow run (the tracker), <run>/metrics.jsonl (readable without
    MLflow) and one console line per log interval. Every rank may call it; only rank 0 writes."""

    SHOWN = ("loss", "d_loss", "g_loss", "r1")  # the EDM loss, the GAN losses

    def __init__(self, tracker: Any, run_dir: Any, *, first_step: int, last_step: int) -> None:
        self.tracker, self.run_dir, self.path = tracker, run_dir, run_dir / "metrics.jsonl"
        self.first_step, self.last_step = first_step, last_step
        self.started = time.perf_counter()
        self.rank0 = dist.rank() == 0
        self.last: dict[str, float] = {}  # the newest value of every metric (for the summary)
        self.grid: Any = None  # the newest sample grid
        # Earlier attempts of the run (crashed, requeued) may have logged steps past the checkpoint this one
        # resumed from: they are recomputed exactly but not logged again, so that metrics.jsonl and MLflow
        # hold one value per step. Every row says which attempt logged it.
        self.logged_up_to, self.attempt = -1, 1
        if self.rank0 and self.path.is_file():
            rows = [json.loads(x) for x in self.path.read_text().splitlines() if x.strip().startswith("{")]
            self.logged_up_to = max((int(r.get("step", -1)) for r in rows), default=-1)
            self.attempt = 1 + max((int(r.get("attempt", 1)) for r in rows), default=0)

    def _write(self, step: int, row: dict[str, float]) -> None:
        self.last.update(row)
        if step <= self.logged_up_to:
            return  # logged by an earlier attempt (the same value: the steps since its checkpoint are exact)
        row = {**row, "attempt": float(self.attempt)}
        self.tracker.log_metrics(row, step=step)
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **row}) + "\n")

    def train(self, step: int, images: int, metrics: dict[str, float]) -> None:
        """One interval's training metrics at `step` (after `images` images), and its console line."""
        if not self.rank0:
            return
        self._write(step, {**metrics, "images_seen": float(images)})
        elapsed = time.perf_counter() - self.started
        eta = elapsed / max(step - self.first_step, 1) * (self.last_step - step)
        losses = "  ".join(f"{k} {metrics[k]:.4g}" for k in self.SHOWN if k in metrics)
        wait = f"  data wait {metrics['data_wait_share']:.1%}" if "data_wait_share" in metrics else ""
        print(f"step {step:>7d}/{self.last_step} ({step / max(self.last_step, 1):4.0%})  img {images:>10d}  "
              f"{metrics['images_per_s']:.1f} img/s  {losses}{wait}  elapsed {_clock(elapsed)}  ETA {_clock(eta)}",
              flush=True)

    def eval(self, step: int, images: int, metrics: dict[str, float], grid: Any = None) -> None:
        """An evaluation's metrics (already named, e.g. eval_fid, sampling_images_per_s) and its sample grid
        (a PNG's path: logged to MLflow as the step-indexed image "samples")."""
        if not self.rank0:
            return
        self._write(step, {"images_seen": float(images), **metrics})
        self.grid = grid or self.grid
        if grid is not None and step > self.logged_up_to:
            with Image.open(grid) as im:
                self.tracker.log_image(im.convert("RGB"), key="samples", step=step)
        print(f"eval at step {step} ({images} images): " + "  ".join(f"{k} {v:.4g}" for k, v in metrics.items()),
              flush=True)

    def summary(self, *, status: str, step: int, checkpoint: Any, ui: str) -> None:
        """What a user needs at the end of a run (rank 0): where everything is, the last numbers, how to look."""
        if not self.rank0:
            return
        shown = ("eval_fid", "eval_fid_proxy", "eval_fid_custom", "eval_kid", "eval_kid_proxy", *self.SHOWN,
                 "images_per_s")
        numbers = "  ".join(f"{k} {self.last[k]:.4g}" for k in shown if k in self.last)
        lines = [f"run {status} at step {step}/{self.last_step}, {_clock(time.perf_counter() - self.started)}",
                 f"  run folder   {self.run_dir}",
                 f"  checkpoint   {checkpoint}",
                 f"  metrics      {numbers}  ({self.path})"]
        if self.grid is not None:
            lines.append(f"  samples      {self.grid}")
        if ui:
            lines.append(f"  MLflow       {ui}")
        print("\n".join(lines), flush=True)
