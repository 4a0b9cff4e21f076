"""MLflow tracking for a run: called by the trainer, never calls back.

Rank 0 holds a `Tracker`; every other rank (and `tracking.enabled=false`) a `NullTracker` with the same
methods. `open_tracker(cfg, run_dir, run_id, tags, rank)` picks the right one.

Where runs go (first that is set):
  cfg.tracking.uri            e.g. http://127.0.0.1:5001 (infra/mlflow/start.sh)
  MLFLOW_TRACKING_URI         the environment variable
  embedded default            sqlite:///<run_dir.parent>/mlflow.db, artifacts in <run_dir.parent>/mlartifacts;
                              browse with `mlflow ui --backend-store-uri sqlite:///<run_dir.parent>/mlflow.db`

A new run logs the resolved recipe (secrets masked) as params once, and the tag recipe_hash. Continuing
a run (`run_id`) never re-logs params; if the training fields differ from the stored ones it raises
ConfigError naming them. Tags `slurm_job_id`/`slurm_job_ids` accumulate in `slurm_job_ids` (comma list).

All MLflow I/O after `open` happens on one background thread that works through a bounded FIFO of
records (metric batches, images, artifacts, tags): calls return at once and never block training. While
the server is unreachable the thread keeps the records, retries with backoff and warns once per outage;
`close` waits up to `timeout` seconds and then reports loudly how many metric values (and which other
records) were not delivered, writing the undelivered metrics to <run_dir>/tracking-undelivered.jsonl.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import fcntl
import json
import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from waveforge import config

log = logging.getLogger(__name__)

MAX_PARAM_LEN = 6000  # MLflow's limit on a param value (mlflow.utils.validation.MAX_PARAM_VAL_LENGTH)
MAX_TAG_LEN = 8000  # ... on a tag value
MAX_BATCH_METRICS = 1000  # ... metrics per log_batch call
MAX_BATCH_PARAMS = 100  # ... params per log_batch call
QUEUE_RECORDS = 10_000  # records waiting for the background thread before log_* starts dropping
MAX_PENDING_VALUES = 200_000  # metric values kept through an outage before the oldest are dropped
STATUSES = ("FINISHED", "FAILED", "KILLED")
UNDELIVERED = "tracking-undelivered.jsonl"  # metrics a process could not deliver, sent by the next start
# Errors that retrying cannot fix: the record is dropped (and counted) instead of retried forever.
_PERMANENT = {"INVALID_PARAMETER_VALUE", "BAD_REQUEST", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE",
              "RESOURCE_ALREADY_EXISTS", "PERMISSION_DENIED", "UNAUTHENTICATED"}


def tracking_uri(cfg: config.Recipe, run_dir: Path) -> str:
    """cfg.tracking.uri, else $MLFLOW_TRACKING_URI, else the embedded sqlite store beside the run folder."""
    if cfg.tracking.uri:
        return cfg.tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return embedded_uri(run_dir)


def embedded_uri(run_dir: Path) -> str:
    """The embedded default store of the runs beside `run_dir` (artifacts in <run_dir.parent>/mlartifacts)."""
    return f"sqlite:///{Path(run_dir).resolve().parent}/mlflow.db"


def ui_hint(run_dir: Path) -> str:
    """How to look at the run of `run_dir` in MLflow's UI: the command to start the UI for the embedded
    store (or the server's address) and the page of the run on the classic training view (MLflow 3 opens
    its GenAI view unless the URL asks for workflowType=machine_learning). "" when the run has no MLflow run."""
    path = Path(run_dir) / "tracking.json"
    if not path.is_file():
        return ""
    meta = json.loads(path.read_text())
    page = f"#/experiments/{meta['experiment_id']}/runs/{meta['run_id']}?workflowType=machine_learning"
    uri = meta["tracking_uri"]
    if uri.startswith(("http://", "https://")):
        return f"open {uri.rstrip('/')}/{page}"
    return f"mlflow ui --backend-store-uri {uri} --port 5000, then open http://127.0.0.1:5000/{page}"


def read_run_id(run_dir: Path) -> str | None:
    """The MLflow run id a previous `Tracker.open` wrote to <run_dir>/tracking.json (None if none)."""
    path = Path(run_dir) / "tracking.json"
    return json.loads(path.read_text())["run_id"] if path.is_file() else None


@contextlib.contextmanager
def _store_lock(uri: str):
    """For an sqlite:/// store: an exclusive file lock beside the database, so that processes opening runs
    at the same time (jobs sharing a runs folder) do not create its tables or experiment concurrently."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    db = Path(uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _param_value(v: Any) -> str:
    return str(v)[:MAX_PARAM_LEN]


def _tag_value(v: Any) -> str:
    return str(v)[:MAX_TAG_LEN]


def _merge_job_ids(old: str, new: list[str]) -> str:
    ids = [x for x in old.split(",") if x]
    for x in new:
        for y in str(x).split(","):
            if y and y not in ids:
                ids.append(y)
    return ",".join(ids)


def _to_pil(image: Any) -> Any:
    """PIL image or HWC (or HW) uint8 array -> an independent PIL image (the caller may reuse its buffer)."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.copy()
    if hasattr(image, "detach"):  # a torch tensor: expect HWC uint8 on any device
        image = image.detach().cpu().numpy()
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise TypeError(f"log_image: expected a PIL image or a uint8 HWC array, got dtype {arr.dtype}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
        raise ValueError(f"log_image: expected shape HxW, HxWx3 or HxWx4, got {arr.shape}")
    return Image.fromarray(np.ascontiguousarray(arr))


@dataclass
class _Record:
    """One unit of work for the background thread: a metric batch or another MLflow call."""

    label: str  # what it is, for the loss report
    metrics: list[Any] | None = None  # mlflow.entities.Metric values, or
    call: Callable[[], None] | None = None  # any other MLflow call


_STOP = _Record(label="stop")


class Tracker:
    """The rank-0 MLflow run of a training run. Create with `Tracker.open`."""

    def __init__(self, client: Any, run_id: str | None, uri: str, run_dir: Path, tags: dict[str, str],
                 monitor: Any = None, continued: bool = False) -> None:
        self._client = client
        self._run_id = run_id  # None until connected (see `start`)
        self._opener: Callable[[], dict[str, Any]] | None = None  # connects a tracker started offline
        self.continued = continued  # an existing run continued (a resume or requeue), not a new one
        self.uri = uri
        self.run_dir = Path(run_dir)
        self._tags = dict(tags)  # the run's tags as we last set them (for slurm_job_ids merging)
        self._monitor = monitor
        self._queue: queue.Queue[_Record] = queue.Queue(maxsize=QUEUE_RECORDS)
        self._pending: collections.deque[_Record] = collections.deque()
        self._lock = threading.Lock()  # guards _pending and the counters below
        self._dropped_values = 0  # metric values dropped (queue full, buffer overflow, permanent error)
        self._dropped_other: list[str] = []  # other records dropped
        self._full_warned = False
        self._closing = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._worker, name="waveforge-tracking", daemon=True)
        self._thread.start()
        atexit.register(self._close_at_exit)  # a process that ends without close() still flushes and reports

    def _adopt(self, parts: dict[str, Any]) -> None:
        """Become the tracker of the run `_connect` opened; queue what earlier processes left undelivered."""
        self._client, self._tags, self._monitor = parts["client"], parts["tags"], parts["monitor"]
        self.continued = parts["continued"]
        self._run_id = parts["run_id"]
        self._requeue_undelivered()

    def _requeue_undelivered(self) -> None:
        """Metrics of this run (or of its offline start) that an earlier process saved as undelivered: sent
        again with their own steps and timestamps (MLflow stores one copy of identical points), the file
        removed once they are through."""
        from mlflow.entities import Metric

        path = self.run_dir / UNDELIVERED
        if not path.is_file():
            return
        rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
        values = [Metric(key=r["key"], value=float(r["value"]), timestamp=int(r["timestamp"]), step=int(r["step"]))
                  for r in rows if r.get("run_id") in (None, self._run_id)]
        for i in range(0, len(values), MAX_BATCH_METRICS):
            part = values[i:i + MAX_BATCH_METRICS]
            self._take(_Record(label=f"{len(part)} earlier undelivered values", metrics=part))
        # Removed once everything before it went through; if not, `close` appends what is still undelivered
        # to the same file (points it already holds are harmless: MLflow keeps one copy of each).
        self._take(_Record(label=f"removing {path.name}", call=lambda: path.unlink(missing_ok=True)))
        log.info("tracking: sending %d metric values an earlier process could not deliver", len(values))

    def _close_at_exit(self) -> None:
        if not self._closed:
            log.warning("tracking: process exiting without Tracker.close(): ending run %s as KILLED", self._run_id)
            self.close("KILLED", error="the process exited without closing its tracker", timeout=15.0)

    # ---------------------------------------------------------------------------------------------
    # Opening a run
    # ---------------------------------------------------------------------------------------------

    @classmethod
    def open(cls, cfg: config.Recipe, run_dir: Path, run_id: str | None, tags: dict[str, str],
             system_metrics: bool = False) -> Tracker:
        """Create the MLflow run (run_id=None) or continue `run_id` (status back to RUNNING).

        Raises config.ConfigError if a continued run was started with other training fields, and
        mlflow's MlflowException if the tracking server cannot be reached now (see `start` for a tracker
        that connects later instead). Metrics an earlier process of the run could not deliver
        (<run_dir>/tracking-undelivered.jsonl) are sent again first (MLflow keeps one copy of each).
        system_metrics: also log this node's CPU/memory/disk/network (and GPU with pynvml) every 10 s as
        system/* metrics (needs psutil), with the host name as node id.
        """
        tracker = cls(None, None, tracking_uri(cfg, run_dir), Path(run_dir), {})
        try:
            tracker._adopt(cls._connect(cfg, run_dir, run_id, tags, system_metrics))
        except BaseException:
            tracker._discard()
            raise
        return tracker

    def _discard(self) -> None:
        """Forget a tracker whose run could not be opened: its thread stops and it has no exit hook (which
        would report a run that never was as KILLED and its records as undelivered)."""
        self._stop_worker(timeout=5.0)

    def _stop_worker(self, timeout: float) -> None:
        """Mark the tracker closed (no exit hook any more), and let its thread deliver what is queued and end,
        waiting up to `timeout` s."""
        self._closed = True
        self._closing.set()
        atexit.unregister(self._close_at_exit)
        deadline = time.monotonic() + timeout
        try:
            self._queue.put(_STOP, timeout=max(0.1, timeout))
        except queue.Full:
            pass
        self._thread.join(max(0.0, deadline - time.monotonic()))

    @classmethod
    def start(cls, cfg: config.Recipe, run_dir: Path, run_id: str | None, tags: dict[str, str],
              system_metrics: bool = False) -> Tracker:
        """`open`, except that a tracking server that does not answer now does not stop the caller: the
        tracker keeps every record and connects in the background (retrying with backoff) when the server
        answers; what is still undelivered at `close` is saved for the next start or `jobs/track_sync.py`.
        A recipe that does not fit a continued run (ConfigError) is still raised at once."""
        try:
            return cls.open(cfg, run_dir, run_id, tags, system_metrics)
        except config.ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 - the server (or store) does not answer: connect later
            uri = tracking_uri(cfg, run_dir)
            print(f"tracking: MLflow at {uri} does not answer ({type(e).__name__}: {str(e)[:160]}); training "
                  "goes on, its records are kept and sent when it answers", flush=True)
            tracker = cls(None, None, uri, Path(run_dir), {})
            tracker._opener = lambda: cls._connect(cfg, run_dir, run_id, tags, system_metrics)
            return tracker

    @staticmethod
    def _connect(cfg: config.Recipe, run_dir: Path, run_id: str | None, tags: dict[str, str],
                 system_metrics: bool) -> dict[str, Any]:
        """Create or continue the run in MLflow (synchronously); the pieces of a connected tracker."""
        uri = tracking_uri(cfg, run_dir)
        if uri.startswith(("http://", "https://")):
            # Fail over to our own retry loop quickly instead of MLflow's default 7 retries x 120 s.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        with _store_lock(uri):  # several processes may open runs in one embedded store at once
            client = MlflowClient(tracking_uri=uri)
            tags = {str(k): _tag_value(v) for k, v in tags.items()}
            new_ids = [tags.pop(k) for k in ("slurm_job_id", "slurm_job_ids") if k in tags]
            continued = run_id is not None
            if not continued:
                experiment = cfg.tracking.experiment or cfg.recipe or "waveforge"
                exp = client.get_experiment_by_name(experiment)
                if exp is None:
                    location = None
                    if uri == embedded_uri(run_dir):  # the default: artifacts beside the database
                        location = (run_dir.resolve().parent / "mlartifacts").as_uri()
                    try:
                        exp_id = client.create_experiment(experiment, artifact_location=location)
                    except Exception:  # created meanwhile by another run
                        exp = client.get_experiment_by_name(experiment)
                        if exp is None:
                            raise
                        exp_id = exp.experiment_id
                else:
                    exp_id = exp.experiment_id
                run = client.create_run(exp_id, run_name=cfg.run.name or run_dir.name)
                run_id = run.info.run_id
                params = [Param(k, _param_value(v)) for k, v in config.flat(cfg).items()]
                for i in range(0, len(params), MAX_BATCH_PARAMS):
                    client.log_batch(run_id, params=params[i:i + MAX_BATCH_PARAMS], synchronous=True)
                client.set_tag(run_id, "recipe_hash", config.training_hash(cfg))
                stored_tags: dict[str, str] = {}
            else:
                run = client.get_run(run_id)
                stored_tags = dict(run.data.tags)
                _check_same_training(cfg, run_id, run.data.params, stored_tags.get("recipe_hash"))
                client.update_run(run_id, status="RUNNING")
                exp_id = run.info.experiment_id
            all_tags = dict(tags)
            if new_ids or stored_tags.get("slurm_job_ids"):
                all_tags["slurm_job_ids"] = _merge_job_ids(stored_tags.get("slurm_job_ids", ""), new_ids)
                all_tags["slurm_job_id"] = new_ids[-1] if new_ids else stored_tags.get("slurm_job_id", "")
            all_tags.setdefault("host", socket.gethostname())
            for k, v in all_tags.items():
                if v != "":
                    client.set_tag(run_id, k, v)

        (run_dir / "tracking.json").write_text(json.dumps(
            {"run_id": run_id, "experiment_id": exp_id, "tracking_uri": uri}, indent=1) + "\n")

        monitor = None
        if system_metrics:
            monitor = _start_system_metrics(run_id, uri, resume=continued)
        log.info("tracking: MLflow run %s at %s", run_id, uri)
        return {"client": client, "run_id": run_id, "tags": {**stored_tags, **all_tags}, "monitor": monitor,
                "continued": continued}

    @property
    def run_id(self) -> str | None:
        """The MLflow run's id (None while a tracker started offline has not connected yet)."""
        return self._run_id

    # ---------------------------------------------------------------------------------------------
    # Logging (all asynchronous)
    # ---------------------------------------------------------------------------------------------

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queue `metrics` at `step` (returns at once). Values must convert to float."""
        from mlflow.entities import Metric

        self._check_open()
        ts = int(time.time() * 1000)
        batch = []
        for k, v in metrics.items():
            try:
                value = float(v)
            except (TypeError, ValueError) as e:
                raise TypeError(f"log_metrics: {k}={v!r} is not a number") from e
            batch.append(Metric(key=str(k), value=value, timestamp=ts, step=int(step)))
        for i in range(0, len(batch), MAX_BATCH_METRICS):
            part = batch[i:i + MAX_BATCH_METRICS]
            self._put(_Record(label=f"{len(part)} metric values at step {step}", metrics=part))

    def log_image(self, image: Any, key: str, step: int) -> None:
        """Queue an image (PIL, or HWC uint8 array) as step-indexed image `key` (MLflow's image slider)."""
        self._check_open()
        pil = _to_pil(image)
        self._put(_Record(label=f"image {key!r} at step {step}",
                          call=lambda: self._client.log_image(self._run_id, pil, key=key, step=int(step),
                                                              synchronous=True)))

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Queue the upload of a file or folder. It is read when uploaded: keep it until `close`."""
        self._check_open()
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"log_artifact: {path} does not exist")
        if path.is_dir():
            call = lambda: self._client.log_artifacts(self._run_id, str(path), artifact_path)  # noqa: E731
        else:
            call = lambda: self._client.log_artifact(self._run_id, str(path), artifact_path)  # noqa: E731
        self._put(_Record(label=f"artifact {path}", call=call))

    def set_tags(self, tags: dict[str, Any]) -> None:
        """Queue tags; slurm_job_id / slurm_job_ids values are appended to the slurm_job_ids list."""
        self._check_open()
        if not tags:
            return
        tags = {str(k): _tag_value(v) for k, v in tags.items()}
        new_ids = [tags.pop(k) for k in ("slurm_job_id", "slurm_job_ids") if k in tags]
        if new_ids:
            tags["slurm_job_ids"] = _merge_job_ids(self._tags.get("slurm_job_ids", ""), new_ids)
            tags["slurm_job_id"] = new_ids[-1]
        self._tags.update(tags)
        from mlflow.entities import RunTag

        batch = [RunTag(k, v) for k, v in tags.items()]
        self._put(_Record(label=f"tags {sorted(tags)}",
                          call=lambda: self._client.log_batch(self._run_id, tags=batch, synchronous=True)))

    def close(self, status: str | None = "FINISHED", error: str | None = None, timeout: float = 60.0) -> int:
        """End the run with `status` (FAILED: `error` becomes the run's tag `error` and its note; None: leave
        the run's status as it is, e.g. when only delivering what an earlier process could not).

        Waits up to `timeout` s for everything queued to reach MLflow. Returns the number of metric
        values that were NOT delivered (0 normally); a non-zero count is also logged as an error and
        those values are appended to <run_dir>/tracking-undelivered.jsonl (sent again by the next start
        of the run, or by `python jobs/track_sync.py run=<run_dir>`).
        """
        if status is not None and status not in STATUSES:
            raise ValueError(f"close: status must be one of {', '.join(STATUSES)}, got {status!r}")
        if self._closed:
            return 0
        if self._monitor is not None:
            try:
                self._monitor.finish()
            except Exception as e:  # system metrics are best effort
                log.warning("tracking: stopping the system metrics monitor failed: %s", e)
        if error:
            tags = {"error": _tag_value(error), "mlflow.note.content": _tag_value(f"{status}: {error}")}
            self.set_tags(tags)
        if status is not None:
            self._put(_Record(label=f"run status {status}",
                              call=lambda: self._client.set_terminated(self._run_id, status=status)))
        self._stop_worker(timeout)
        with self._lock:
            # Whatever is still queued or pending was not delivered.
            while True:
                try:
                    rec = self._queue.get_nowait()
                except queue.Empty:
                    break
                if rec is not _STOP:
                    self._pending.append(rec)
            left = list(self._pending)
            self._pending.clear()
            lost_values = self._dropped_values + sum(len(r.metrics) for r in left if r.metrics)
            lost_other = self._dropped_other + [r.label for r in left if r.metrics is None]
        undelivered = [m for r in left if r.metrics for m in r.metrics]
        run_id = self._run_id  # None: the server never answered; the values go to whichever run is opened next
        if undelivered:
            with open(self.run_dir / UNDELIVERED, "a") as f:
                for m in undelivered:
                    f.write(json.dumps({"run_id": run_id, "key": m.key, "value": m.value, "step": m.step,
                                        "timestamp": m.timestamp}) + "\n")
        if lost_values or lost_other:
            log.error("tracking: %d metric value(s) and %d other record(s) were NOT delivered to MLflow at %s "
                      "(run %s)%s%s", lost_values, len(lost_other), self.uri, run_id,
                      f"; undelivered metrics saved to {self.run_dir / UNDELIVERED} (sent by the next start "
                      f"or python jobs/track_sync.py run={self.run_dir})"
                      if undelivered else "", f"; lost: {', '.join(lost_other[:10])}" if lost_other else "")
        else:
            log.info("tracking: run %s closed (%s), all records delivered", run_id, status)
        return lost_values

    # ---------------------------------------------------------------------------------------------
    # The background thread
    # ---------------------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("tracker is closed")

    def _put(self, rec: _Record) -> None:
        try:
            self._queue.put_nowait(rec)
            self._full_warned = False
        except queue.Full:
            with self._lock:
                if rec.metrics:
                    self._dropped_values += len(rec.metrics)
                else:
                    self._dropped_other.append(rec.label)
            if not self._full_warned:
                log.warning("tracking: queue full (%d records waiting for MLflow at %s): dropping new records; "
                            "the count is reported at close", QUEUE_RECORDS, self.uri)
                self._full_warned = True

    def _take(self, rec: _Record) -> None:
        """Move a record into the pending buffer, dropping the oldest metrics past MAX_PENDING_VALUES."""
        with self._lock:
            self._pending.append(rec)
            n = sum(len(r.metrics) for r in self._pending if r.metrics)
            while n > MAX_PENDING_VALUES:
                oldest = next(r for r in self._pending if r.metrics)
                self._pending.remove(oldest)
                n -= len(oldest.metrics)
                self._dropped_values += len(oldest.metrics)

    def _send_one(self) -> bool:
        """Deliver the head of the pending buffer (metrics: merged into one batch). False when empty."""
        with self._lock:
            if not self._pending:
                return False
            head = self._pending[0]
            if head.metrics is not None:
                recs, values = [], []
                for r in self._pending:
                    if r.metrics is None or len(values) + len(r.metrics) > MAX_BATCH_METRICS and values:
                        break
                    recs.append(r)
                    values += r.metrics
            else:
                recs, values = [head], []
        try:
            if values:
                self._client.log_batch(self._run_id, metrics=values, synchronous=True)
            else:
                head.call()
        except Exception as e:
            if getattr(e, "error_code", None) not in _PERMANENT:
                raise
            log.error("tracking: MLflow rejected %s: %s (dropped)", ", ".join(r.label for r in recs), e)
            with self._lock:
                self._dropped_values += len(values)
                if not values:
                    self._dropped_other.append(head.label)
        with self._lock:  # by identity: an overflow may have dropped records meanwhile
            sent = {id(r) for r in recs}
            self._pending = collections.deque(r for r in self._pending if id(r) not in sent)
        return True

    def _worker(self) -> None:
        backoff, next_try, outage, stop = 0.5, 0.0, False, False
        while True:
            with self._lock:
                has_pending = bool(self._pending)
            if stop and not has_pending:
                return
            wait = max(0.0, next_try - time.monotonic()) if has_pending else None
            try:
                rec = self._queue.get(timeout=wait) if wait is None or wait > 0 else self._queue.get_nowait()
                while True:  # take everything queued now, so that metrics go out in large batches
                    if rec is _STOP:  # closing: retry now, then every <= 2 s until close's timeout
                        stop, next_try, backoff = True, 0.0, 0.5
                    else:
                        self._take(rec)
                    rec = self._queue.get_nowait()
            except queue.Empty:
                pass
            if time.monotonic() < next_try:
                continue
            try:
                if self._run_id is None and self._opener is not None:  # started while the server was down
                    self._adopt(self._opener())
                    log.warning("tracking: connected to MLflow at %s, run %s; sending the buffered records",
                                self.uri, self._run_id)
                    print(f"tracking: MLflow at {self.uri} answers now: run {self._run_id}, buffered records "
                          "follow", flush=True)
                    outage = True  # so that the delivery below is reported
                delivered = 0
                while self._run_id is not None and self._send_one():
                    delivered += 1
                if outage:
                    log.warning("tracking: MLflow at %s reachable again; buffered records delivered", self.uri)
                outage, backoff = False, 0.5
            except Exception as e:
                if not outage:
                    log.warning("tracking: cannot reach MLflow at %s (%s: %s); buffering and retrying in the "
                                "background", self.uri, type(e).__name__, str(e)[:200])
                    outage = True
                next_try = time.monotonic() + backoff
                backoff = min(backoff * 2, 2.0 if self._closing.is_set() else 30.0)


def _check_same_training(cfg: config.Recipe, run_id: str, params: dict[str, str], stored_hash: str | None) -> None:
    """ConfigError if the run `run_id` was started with other training fields than `cfg`."""
    new_hash = config.training_hash(cfg)
    if stored_hash is None:
        log.warning("tracking: run %s has no recipe_hash tag; cannot check that the recipe is unchanged", run_id)
        return
    if stored_hash == new_hash:
        return
    diffs = [f"{k}: {params.get(k)!r} -> {_param_value(v)!r}" for k, v in sorted(config.training_fields(cfg).items())
             if params.get(k) != _param_value(v)]
    raise config.ConfigError(
        f"MLflow run {run_id} was started with other training settings (recipe_hash {stored_hash}, now {new_hash}): "
        + ("; ".join(diffs) if diffs else "fields not recoverable from its params")
        + ". Restore them, or start a new run (another run.name / run.dir).")


def _start_system_metrics(run_id: str, uri: str, resume: bool) -> Any:
    """This node's system metrics (MLflow's monitor, node id = host name); None without psutil."""
    try:
        import psutil  # noqa: F401
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
    except ImportError:
        log.warning("tracking: system metrics need psutil; not logging them")
        return None
    os.environ.setdefault("MLFLOW_SYSTEM_METRICS_NODE_ID", socket.gethostname())
    monitor = SystemMetricsMonitor(run_id, node_id=os.environ["MLFLOW_SYSTEM_METRICS_NODE_ID"], tracking_uri=uri,
                                   resume_logging=resume)
    monitor.start()
    return monitor


class NullTracker:
    """The tracker of ranks other than 0 and of `tracking.enabled=false`: logs nothing. It may carry the
    system-metrics monitor of its node (`start_node_monitor`), which `close` stops."""

    run_id: str | None = None
    continued = False

    def __init__(self, monitor: Any = None) -> None:
        self._monitor = monitor

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_image(self, image: Any, key: str, step: int) -> None:
        pass

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        pass

    def set_tags(self, tags: dict[str, Any]) -> None:
        pass

    def close(self, status: str | None = "FINISHED", error: str | None = None, timeout: float = 60.0) -> int:
        if status is not None and status not in STATUSES:
            raise ValueError(f"close: status must be one of {', '.join(STATUSES)}, got {status!r}")
        if self._monitor is not None:
            monitor, self._monitor = self._monitor, None
            try:
                monitor.finish()
            except Exception as e:  # noqa: BLE001 - system metrics are best effort
                log.warning("tracking: stopping this node's system metrics failed: %s", e)
        return 0


def open_tracker(cfg: config.Recipe, run_dir: Path, run_id: str | None, tags: dict[str, str], rank: int,
                 system_metrics: bool = False) -> Tracker | NullTracker:
    """Rank 0 with tracking enabled: `Tracker.start(...)` (a server that does not answer is connected to
    later, never stopping the caller); otherwise a `NullTracker`."""
    if rank != 0 or not cfg.tracking.enabled:
        return NullTracker()
    return Tracker.start(cfg, run_dir, run_id, tags, system_metrics=system_metrics)


def start_node_monitor(cfg: config.Recipe, run_dir: Path, run_id: str | None) -> Any:
    """System metrics of this node into run `run_id`, for the first rank of every node but rank 0's (whose
    Tracker runs its own). Returns the monitor (call .finish() at the end) or None."""
    if not cfg.tracking.enabled or not run_id:
        return None
    try:
        return _start_system_metrics(run_id, tracking_uri(cfg, run_dir), resume=True)
    except Exception as e:  # noqa: BLE001 - system metrics are optional: never stop training for them
        log.warning("tracking: system metrics of this node could not start: %s", e)
        return None


def sync_undelivered(cfg: config.Recipe, run_dir: str | Path) -> int:
    """Send <run_dir>/tracking-undelivered.jsonl to the run's MLflow run (from tracking.json; the run's saved
    recipe creates it when the server never answered), leaving the run's status as it is. Returns the
    number of values sent; raises (ConfigError: exit 2) when they could not all be delivered."""
    run = Path(run_dir)
    path = run / UNDELIVERED
    if not path.is_file():
        return 0
    n = sum(1 for line in path.read_text().splitlines() if line.strip())
    recipe = run / "recipe.yaml"
    saved = config.load_saved(recipe) if recipe.is_file() else cfg
    if cfg.tracking.uri:
        saved.tracking.uri = cfg.tracking.uri
    saved.tracking.enabled = True
    try:
        tracker = Tracker.open(saved, run, read_run_id(run), {})
    except config.ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - one line for the user
        raise config.ConfigError(f"tracking at {tracking_uri(saved, run)} does not answer: {e}") from None
    lost = tracker.close(None)
    if lost:
        raise config.ConfigError(f"{lost} of {n} values could not be delivered to {tracker.uri}; they are kept in "
                                 f"{path}: try again when the server answers")
    return n
