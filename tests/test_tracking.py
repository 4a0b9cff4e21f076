"""Tracking component: MLflow runs through the embedded SQLite default and a real server (infra/mlflow with
SeaweedFS artifacts), resume rules, asynchronous logging through a server outage, and the UI page."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn
from urllib.parse import quote

import numpy as np
import pytest

from waveforge import config, tracking

if TYPE_CHECKING:
    from conftest import ChromiumPage, MlflowServer


def _cfg(name: str = "trk", **overrides) -> config.Recipe:
    return config.load("tiny", {"run.name": name, "storage.secret_key": "s3cr3t", **overrides})


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One runs/<recipe> folder (one embedded mlflow.db: creating its tables takes seconds) per module."""
    return tmp_path_factory.mktemp("runs") / "tiny"


def _grid(step: int) -> np.ndarray:
    rng = np.random.default_rng(step)
    return rng.integers(0, 256, size=(32, 48, 3), dtype=np.uint8)


def test_embedded_sqlite_run_then_continue(runs_root: Path) -> None:
    from mlflow.tracking import MlflowClient

    cfg = _cfg()
    run_dir = runs_root / "trk"
    t = tracking.open_tracker(cfg, run_dir, None, {"git_commit": "abc123", "slurm_job_id": "11"}, rank=0)
    assert isinstance(t, tracking.Tracker)
    for step in range(3):
        t.log_metrics({"loss_g": 1.0 / (step + 1), "loss_d": 0.5}, step=step)
    t.log_image(_grid(2), key="samples", step=2)
    assert t.close("FINISHED") == 0

    uri = f"sqlite:///{runs_root}/mlflow.db"
    assert tracking.read_run_id(run_dir) == t.run_id
    client = MlflowClient(uri)
    run = client.get_run(t.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "trk"
    assert run.data.params["train.lr_g"] == str(cfg.train.lr_g)
    assert run.data.params["storage.secret_key"] == config.MASK  # secrets never leave the process
    assert run.data.tags["recipe_hash"] == config.training_hash(cfg)
    assert run.data.tags["slurm_job_ids"] == "11" and run.data.tags["git_commit"] == "abc123"
    assert [m.value for m in client.get_metric_history(t.run_id, "loss_g")] == [1.0, 0.5, 1.0 / 3]
    # Artifacts of the embedded default sit beside the database; the image is step-indexed.
    assert run.info.artifact_uri.startswith((runs_root / "mlartifacts").as_uri())
    images = [a.path for a in client.list_artifacts(t.run_id, "images")]
    assert any(p.startswith("images/samples+step+2") and p.endswith(".png") for p in images), images

    # Continue the same run after a "requeue": same run id, no param re-log error, RUNNING while open.
    cfg2 = _cfg(**{"train.max_steps": 99})  # a non-training field may change
    t2 = tracking.Tracker.open(cfg2, run_dir, t.run_id, {"slurm_job_id": "12"})
    assert t2.run_id == t.run_id
    assert client.get_run(t.run_id).info.status == "RUNNING"
    for step in range(3, 5):
        t2.log_metrics({"loss_g": 0.1 * step}, step=step)
    t2.set_tags({"slurm_job_id": "13"})
    assert t2.close("FAILED", error="RuntimeError: boom") == 0
    run = client.get_run(t.run_id)
    assert run.info.status == "FAILED" and run.data.tags["error"] == "RuntimeError: boom"
    assert run.data.tags["slurm_job_ids"] == "11,12,13"
    assert [m.step for m in client.get_metric_history(t.run_id, "loss_g")] == [0, 1, 2, 3, 4]
    assert [r.info.run_id for r in client.search_runs([run.info.experiment_id], "attributes.run_name = 'trk'")] \
        == [t.run_id]


def test_resume_with_changed_training_field_names_it(runs_root: Path) -> None:
    run_dir = runs_root / "r"
    t = tracking.Tracker.open(_cfg("r"), run_dir, None, {})
    t.close()
    with pytest.raises(config.ConfigError, match=r"train\.lr_g: '0\.0008' -> '0\.0001'") as e:
        tracking.Tracker.open(_cfg("r", **{"train.lr_g": 1e-4}), run_dir, t.run_id, {})
    assert str(e.value).count("->") == 1  # only the changed field is named


def test_a_run_that_cannot_be_opened_leaves_nothing_behind(runs_root: Path, run_python, tmp_path: Path) -> None:
    """A refused continuation, or a server that does not answer at start (the trainer then goes on with a
    tracker that connects later): no tracker of the failed attempt reports a 'KILLED' run or undelivered
    records when the process exits."""
    run_dir = runs_root / "refused"
    t = tracking.Tracker.open(_cfg("refused"), run_dir, None, {})
    t.close()
    r = run_python(f"""
        from pathlib import Path
        from waveforge import config, tracking
        cfg = config.load("tiny", {{"run.name": "refused", "train.lr_g": 1e-4}})
        try:
            tracking.Tracker.open(cfg, Path({str(run_dir)!r}), {t.run_id!r}, {{}})
        except config.ConfigError as e:
            print("refused:", e)
        down = config.load("tiny", {{"tracking.uri": "http://127.0.0.1:9"}})
        late = tracking.Tracker.start(down, Path({str(tmp_path / "down")!r}), None, {{}})
        late.close(None, timeout=2.0)  # nothing logged, status left: nothing to report
        """, env={**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "2"})
    assert "refused: " in r.stdout and "does not answer" in r.stdout
    assert "exiting without Tracker.close()" not in r.stderr and "NOT delivered" not in r.stderr, r.stderr


def test_exit_without_close_flushes_and_ends_killed(runs_root: Path, run_python) -> None:
    from mlflow.tracking import MlflowClient

    r = run_python(f"""
        from pathlib import Path
        from waveforge import config, tracking
        cfg = config.load("tiny", {{"run.name": "noclose"}})
        t = tracking.Tracker.open(cfg, Path({str(runs_root / "noclose")!r}), None, {{}})
        for s in range(4):
            t.log_metrics({{"loss": float(s)}}, step=s)
        print(t.run_id)
        """)
    run_id = r.stdout.strip().splitlines()[-1]
    assert "exiting without Tracker.close()" in r.stderr
    client = MlflowClient(f"sqlite:///{runs_root}/mlflow.db")
    assert client.get_run(run_id).info.status == "KILLED"
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [0, 1, 2, 3]


@pytest.mark.slow
def test_two_processes_open_runs_in_one_fresh_embedded_store(tmp_path: Path) -> None:
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    code = """
import sys
from pathlib import Path
from waveforge import config, tracking
cfg = config.load("tiny", {"run.name": sys.argv[1]})
t = tracking.Tracker.open(cfg, Path(sys.argv[2]) / sys.argv[1], None, {})
t.log_metrics({"loss": 1.0}, step=0)
assert t.close() == 0
"""
    procs = [subprocess.Popen([sys.executable, "-c", code, name, str(tmp_path)], stderr=subprocess.PIPE, text=True)
             for name in ("job-a", "job-b")]
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read()
    runs = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").search_runs(
        [MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_experiment_by_name("tiny").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["job-a", "job-b"]
    assert all(r.info.status == "FINISHED" and r.data.metrics["loss"] == 1.0 for r in runs)


def test_system_metrics_carry_the_node_id(runs_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket
    import time

    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")
    monkeypatch.delenv("MLFLOW_SYSTEM_METRICS_NODE_ID", raising=False)
    t = tracking.open_tracker(_cfg("sysm"), runs_root / "sysm", None, {}, rank=0, system_metrics=True)
    time.sleep(2.0)
    assert t.close() == 0
    keys = MlflowClient(f"sqlite:///{runs_root}/mlflow.db").get_run(t.run_id).data.metrics
    prefix = f"system/{socket.gethostname()}/"
    assert any(k.startswith(prefix + "cpu_utilization_percentage") for k in keys), sorted(keys)


def test_null_tracker_and_disabled(tmp_path: Path) -> None:
    cfg = _cfg()
    for tr in (tracking.open_tracker(cfg, tmp_path / "a", None, {}, rank=1),
               tracking.open_tracker(_cfg(**{"tracking.enabled": False}), tmp_path / "b", None, {}, rank=0)):
        assert isinstance(tr, tracking.NullTracker) and tr.run_id is None
        tr.log_metrics({"x": 1.0}, step=0)
        tr.log_image(_grid(0), key="s", step=0)
        tr.set_tags({"a": "b"})
        assert tr.close("KILLED") == 0
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_bad_input_is_rejected_at_the_call(runs_root: Path, tmp_path: Path) -> None:
    t = tracking.Tracker.open(_cfg("bad"), runs_root / "bad", None, {})
    with pytest.raises(TypeError, match="loss"):
        t.log_metrics({"loss": "high"}, step=0)
    with pytest.raises(TypeError, match="uint8"):
        t.log_image(np.zeros((4, 4, 3), np.float32), key="s", step=0)
    with pytest.raises(FileNotFoundError):
        t.log_artifact(tmp_path / "nope.txt")
    with pytest.raises(ValueError, match="FINISHED"):
        t.close("DONE")
    assert t.close() == 0
    with pytest.raises(RuntimeError, match="closed"):
        t.log_metrics({"x": 1.0}, step=1)


@pytest.mark.services
def test_real_server_params_curve_image_artifact_in_s3(mlflow_server, s3_server, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    cfg = _cfg("server-run", **{"tracking.uri": mlflow_server.uri, "tracking.experiment": "trk-server"})
    run_dir = tmp_path / "run"
    t = tracking.Tracker.open(cfg, run_dir, None, {"nodes": "1"})
    losses = [2.0 * 0.8**s for s in range(20)]
    for s, v in enumerate(losses):
        t.log_metrics({"loss_g": v}, step=s)
    t.log_image(_grid(19), key="samples", step=19)
    (run_dir / "recipe.yaml").write_text(config.to_yaml(cfg))
    t.log_artifact(run_dir / "recipe.yaml")
    assert t.close("FINISHED") == 0

    client = MlflowClient(mlflow_server.uri)
    run = client.get_run(t.run_id)
    assert run.info.status == "FINISHED" and run.data.params["model.resolution"] == str(cfg.model.resolution)
    assert [m.value for m in client.get_metric_history(t.run_id, "loss_g")] == losses
    keys = [p for p in s3_server.filesystem().find("mlflow-artifacts") if t.run_id in p]
    assert any(k.endswith("/artifacts/recipe.yaml") for k in keys), keys
    assert any("/artifacts/images/samples+step+19" in k and k.endswith(".png") for k in keys), keys


@pytest.mark.services
@pytest.mark.slow
def test_server_outage_buffers_and_delivers(mlflow_server_factory, tmp_path: Path, caplog) -> None:
    from mlflow.tracking import MlflowClient

    server = mlflow_server_factory()  # a server of this test alone: it is stopped and restarted
    cfg = _cfg("outage", **{"tracking.uri": server.uri})
    comes_back = tracking.Tracker.open(cfg, tmp_path / "run1", None, {})
    stays_down = tracking.Tracker.open(cfg, tmp_path / "run2", None, {})
    comes_back.log_metrics({"loss": 1.0}, step=0)
    caplog.set_level(logging.WARNING, logger="waveforge.tracking")
    server.stop()
    for s in range(1, 11):  # the server is down: the calls return at once
        comes_back.log_metrics({"loss": 1.0 / (s + 1)}, step=s)
    for s in range(7):
        stays_down.log_metrics({"a": 1.0, "b": 2.0}, step=s)

    # Down for good: close gives up after its timeout, reports the exact count lost, keeps the values.
    assert stays_down.close("FINISHED", timeout=3) == 14
    assert "14 metric value(s)" in caplog.text and "NOT delivered" in caplog.text
    lines = (tmp_path / "run2" / "tracking-undelivered.jsonl").read_text().splitlines()
    assert len(lines) == 14 and '"key": "a"' in lines[0]

    # Back again: the buffered values arrive, in order, and the run ends FINISHED.
    server.start()
    assert comes_back.close("FINISHED", timeout=120) == 0
    assert caplog.text.count("cannot reach MLflow") == 2  # once per tracker and outage, not per retry
    client = MlflowClient(server.uri)
    assert [m.step for m in client.get_metric_history(comes_back.run_id, "loss")] == list(range(11))
    assert client.get_run(comes_back.run_id).info.status == "FINISHED"
    assert client.get_run(stays_down.run_id).info.status == "RUNNING"  # its end never arrived

    # What run2 could not deliver arrives later (jobs/track_sync.py, or the run's next start), exactly once:
    # twice is harmless (MLflow keeps one copy of an identical point).
    config.save(cfg, tmp_path / "run2" / "recipe.yaml")
    for _ in range(2):
        (tmp_path / "run2" / "tracking-undelivered.jsonl").write_text("\n".join(lines) + "\n")
        assert tracking.sync_undelivered(cfg, tmp_path / "run2") == 14
        assert not (tmp_path / "run2" / "tracking-undelivered.jsonl").exists()
    for key in ("a", "b"):
        assert [m.step for m in client.get_metric_history(stays_down.run_id, key)] == list(range(7))
    assert tracking.sync_undelivered(cfg, tmp_path / "run2") == 0


@pytest.mark.services
@pytest.mark.slow
def test_training_starts_while_the_server_is_down_and_delivers_when_it_is_back(mlflow_server_factory,  # noqa: ANN001
                                                                               tmp_path: Path) -> None:
    """The tracking server is down when a (requeued) job starts: training starts anyway, keeps its records,
    connects when the server is back, and every logged step arrives once."""
    import json
    import os
    import sys

    from mlflow.tracking import MlflowClient

    from waveforge import data

    server = mlflow_server_factory()
    server.stop()
    shards = tmp_path / "shards"
    data.make_shards("synthetic", str(shards), 32, num_samples=128, samples_per_shard=16, progress=False)
    run = tmp_path / "run"
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, str(repo / "jobs/train.py"), "recipe=tiny", f"run.dir={run}",
                             f"data.url={shards}", "train.max_steps=400", "train.log_every_images=160",
                             "eval.every_images=0", "data.num_workers=0", f"tracking.uri={server.uri}"],
                            env={**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        end = time.monotonic() + 300
        while not (run / "metrics.jsonl").exists() and time.monotonic() < end:  # training started anyway
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            time.sleep(0.5)
        server.start()
        out, _ = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    assert "does not answer" in out and "answers now" in out, out[-3000:]
    run_id = json.loads((run / "tracking.json").read_text())["run_id"]
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    history = MlflowClient(server.uri).get_metric_history(run_id, "d_loss")
    assert sorted(m.step for m in history) == steps and len(steps) == 40
    assert not (run / "tracking-undelivered.jsonl").exists()


# --------------------------------------------------------------------------------------------------
# The MLflow UI in a real browser: what a person opening the run's page sees
# --------------------------------------------------------------------------------------------------

UI_WAIT_S = 30.0  # the longest the UI may take to show one thing (1-5 s on 2 busy cores)
UI_MODE = "?workflowType=machine_learning"  # MLflow 3 opens runs in its GenAI view without it
UI_CARD = '[data-testid="experiment-view-compare-runs-card"]'  # one chart of the Model metrics tab
UI_SPINNER = '[class*="-spin-spinning"]'  # MLflow's loading spinner (du-bois-*-spin-spinning)
# A sample grid a pixel check recognises: 2 rows x 3 columns of 32 px tiles in six distinct colours.
TILES = [[(230, 25, 25), (25, 200, 25), (25, 25, 230)], [(240, 220, 20), (220, 30, 220), (20, 210, 220)]]
TILE_PX = 32
TILE_TOLERANCE = 40  # per channel: the chart card shows MLflow's lossy WebP copy, scaled

# Probes run in the page; each returns what it sees, for `_ui_wait`'s readiness test and failure message.
_CHART_TITLES_JS = f"""() => [...document.querySelectorAll('{UI_CARD}')].map(
    c => {{ const h = c.querySelector('h4'); return h ? h.getAttribute('title') : null; }})"""
_RUN_PAGE_JS = f"""(texts) => {{
  const main = document.querySelector('main');
  if (!main) return {{main: false, body: document.body.innerText.slice(0, 300)}};
  const q = s => document.querySelector(s);
  return {{main: true,
    run_name: q('[data-testid="runs-header"]') ? q('[data-testid="runs-header"]').innerText : null,
    view: q('[data-testid="experiment-observatory-link-runs"]')
      ? q('[data-testid="experiment-observatory-link-runs"]').innerText : null,
    missing: texts.filter(t => !main.innerText.includes(t)), text: main.innerText.slice(0, 300),
    spinners: main.querySelectorAll('{UI_SPINNER}').length}};
}}"""
_METRIC_CHART_JS = f"""(title) => {{
  const titles = ({_CHART_TITLES_JS})();
  const card = [...document.querySelectorAll('{UI_CARD}')][titles.indexOf(title)];
  if (!card) return {{charts: titles}};
  const svg = card.querySelector('.js-plotly-plot svg.main-svg');
  const box = svg ? svg.getBoundingClientRect() : null;
  const traces = [...card.querySelectorAll('.js-plotly-plot g.trace path.js-line')].map(  // d="Mx,yLx,y..."
    p => [...(p.getAttribute('d') || '').matchAll(/[ML]([-\\d.e]+),([-\\d.e]+)/g)].map(m => [+m[1], +m[2]]));
  return {{charts: titles, spinners: card.querySelectorAll('{UI_SPINNER}').length,
    plot: box ? [box.width, box.height] : null, vertices: traces.reduce((a, b) => b.length > a.length ? b : a, [])}};
}}"""
# Images inside the chart card titled `title` (or, with title null, in the page's main area) whose src
# contains `src` and whose natural size is `natural` (either may be null); "visible": at least 16 px a side,
# its centre inside that card or area and not covered (clipped by overflow, or under another element).
_IMAGE_JS = f"""([title, src, natural]) => {{
  let root = document.querySelector('main'), charts = null;
  if (title !== null) {{
    charts = ({_CHART_TITLES_JS})();
    root = [...document.querySelectorAll('{UI_CARD}')][charts.indexOf(title)];
    if (!root) return {{charts}};
  }}
  if (!root) return {{main: false}};
  const area = root.getBoundingClientRect();
  const images = [...root.querySelectorAll('img')].filter(
    i => (src === null || (i.getAttribute('src') || '').includes(src))
      && (natural === null || (i.naturalWidth === natural[0] && i.naturalHeight === natural[1]))).map(i => {{
    const b = i.getBoundingClientRect(), x = b.x + b.width / 2, y = b.y + b.height / 2;
    return {{loaded: i.complete && i.naturalWidth > 0, natural: [i.naturalWidth, i.naturalHeight],
      box: [b.x, b.y, b.width, b.height], visible: b.width >= 16 && b.height >= 16 && y >= area.top
        && y <= area.bottom && x >= area.left && x <= area.right && document.elementFromPoint(x, y) === i}};
  }});
  return {{charts, spinners: root.querySelectorAll('{UI_SPINNER}').length, images}};
}}"""


def _tile_grid() -> np.ndarray:
    grid = np.zeros((2 * TILE_PX, 3 * TILE_PX, 3), np.uint8)
    for r, row in enumerate(TILES):
        for c, rgb in enumerate(row):
            grid[r * TILE_PX:(r + 1) * TILE_PX, c * TILE_PX:(c + 1) * TILE_PX] = rgb
    return grid


def _ui_fail(ui: ChromiumPage, what: str, shot: Path, detail: str) -> NoReturn:
    ui.page.screenshot(path=str(shot))
    errors = "\n    ".join([e for e in ui.errors if "/users/current" not in e][-12:]) or "none"  # that 404 is normal
    pytest.fail(f"MLflow UI: {what}\n  page: {ui.page.url}\n  {detail}\n  screenshot: {shot}\n"
                f"  browser errors so far:\n    {errors}", pytrace=False)


def _ui_wait(ui: ChromiumPage, what: str, probe: str, arg: Any, ready: Callable[[dict[str, Any]], bool],
             shot: Path) -> dict[str, Any]:
    """Poll `probe` (JS, called with `arg`) until `ready(state)`; after UI_WAIT_S fail, saying what was seen."""
    from playwright.sync_api import Error as PlaywrightError

    deadline = time.monotonic() + UI_WAIT_S
    while True:
        try:
            state = ui.page.evaluate(probe, arg)
        except PlaywrightError as e:  # e.g. the page navigating while the probe ran: look again
            state = {"error": str(e).splitlines()[0]}
        if "error" not in state and ready(state):
            return state
        if time.monotonic() > deadline:
            _ui_fail(ui, f"{what}: not shown within {UI_WAIT_S:.0f} s", shot, f"last seen: {state}")
        ui.page.wait_for_timeout(200)


def _ui_step(ui: ChromiumPage, what: str, shot: Path, action: Callable[[], None]) -> None:
    """Run a Playwright action (it waits for its elements); a failure names the step and keeps a screenshot."""
    from playwright.sync_api import Error as PlaywrightError

    try:
        action()
    except PlaywrightError as e:
        _ui_fail(ui, f"could not {what}", shot, str(e).splitlines()[0])


def _shown_image(state: dict[str, Any]) -> dict[str, Any] | None:
    """The first image of an _IMAGE_JS state that is loaded and visible."""
    return next((i for i in state.get("images") or [] if i["loaded"] and i["visible"]), None)


def _wait_shown_image(ui: ChromiumPage, what: str, arg: list[Any], shot: Path) -> dict[str, Any]:
    """Wait until _IMAGE_JS(arg) sees no spinner and a loaded, visible image; return that image."""
    state = _ui_wait(ui, what, _IMAGE_JS, arg, lambda s: s.get("main", True) and "spinners" in s
                     and not s["spinners"] and _shown_image(s) is not None, shot)
    shown = _shown_image(state)
    assert shown is not None
    return shown


def _check_tiles(ui: ChromiumPage, what: str, box: list[float], shot: Path) -> None:
    """The screen pixels of `box` show the TILES grid: each tile's centre area has its colour."""
    from PIL import Image

    png = ui.page.screenshot(path=str(shot), clip={"x": box[0], "y": box[1], "width": box[2], "height": box[3]})
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float64)
    h, w = pixels.shape[:2]
    wrong = []
    for r, row in enumerate(TILES):
        for c, want in enumerate(row):
            patch = pixels[int((r + 0.3) * h / 2):int((r + 0.7) * h / 2), int((c + 0.3) * w / 3):int((c + 0.7) * w / 3)]
            got = patch.reshape(-1, 3).mean(0)
            if np.abs(got - want).max() > TILE_TOLERANCE:
                wrong.append(f"tile ({r},{c}) shows RGB {tuple(int(v) for v in got)}, logged {want}")
    if wrong:
        _ui_fail(ui, f"{what} does not show the logged sample grid", shot, "; ".join(wrong))
    print(f"MLflow UI screenshot ({what}, its pixels): {shot}")


def check_mlflow_run_page(ui: ChromiumPage, uri: str, run_id: str, metric: str, values: list[float],
                          image_key: str, image_step: int, shots: Path) -> None:
    """What a person sees on the run's page in MLflow's training view, waiting (up to UI_WAIT_S each) for:

    1. Overview: the run's name, "Finished", the metric's name, no spinner, and the training view (the
       breadcrumb says "Runs"; the GenAI view says "Evaluations").
    2. Model metrics tab: the chart card titled `metric` without spinner, its plot drawn (non-zero size) with
       one trace vertex per logged value, left to right, each vertex above the previous one where the value
       rose and below it where the value fell.
    3. The same tab: the image card titled `image_key` without spinner, its image of step `image_step`
       loaded. MLflow 3.17 prints every run param above that image, and a waveforge run's ~130 params (the
       whole recipe) push it out of the card, also in the card's full-screen view: the check turns the card's
       "Show run parameters" off (Configure), as a person has to, then the image must be visible and its
       pixels must show the TILES grid.
    4. Artifacts tab, on the image's PNG: displayed, at its logged size, visible, pixels the TILES grid.
    Screenshots of each (paths printed) land in `shots`."""
    from mlflow.tracking import MlflowClient

    page = ui.page
    page.set_default_timeout(UI_WAIT_S * 1000)
    run = MlflowClient(uri).get_run(run_id)
    run_url = f"{uri}/#/experiments/{run.info.experiment_id}/runs/{run_id}"

    shot = shots / "mlflow-run-overview.png"
    page.goto(run_url + UI_MODE)
    _ui_wait(ui, f"run page of {run.info.run_name!r} in the training view", _RUN_PAGE_JS, ["Finished", metric],
             lambda s: (s["main"] and s["run_name"] == run.info.run_name and s["view"] == "Runs" and not s["spinners"]
                        and not s["missing"]), shot)
    page.screenshot(path=str(shot))
    print(f"MLflow UI screenshot (run overview): {shot}")

    shot = shots / "mlflow-run-metrics.png"
    page.goto(f"{run_url}/model-metrics{UI_MODE}")
    chart = _ui_wait(ui, f"chart of metric {metric!r} (drawn, no spinner)", _METRIC_CHART_JS, metric,
                     lambda s: ("spinners" in s and not s["spinners"] and s["plot"] is not None
                                and min(s["plot"]) > 0 and len(s["vertices"]) >= len(values)), shot)
    xs, ys = zip(*chart["vertices"])
    if len(xs) != len(values) or any(b <= a for a, b in zip(xs, xs[1:])) or any(
            (yb < ya) != (vb > va) for ya, yb, va, vb in zip(ys, ys[1:], values, values[1:]) if va != vb):
        _ui_fail(ui, f"the chart of {metric!r} does not draw the logged values", shot,
                 f"trace vertices (px) {chart['vertices']} for values {values}")

    src = quote(f"{image_key}+step+{image_step}+", safe="")  # get-artifact?path=images%2F<key>%2Bstep%2B<step>...
    _ui_wait(ui, f"image card {image_key!r} with its step-{image_step} image loaded (no spinner)", _IMAGE_JS,
             [image_key, src, None], lambda s: ("spinners" in s and not s["spinners"]
                                                 and any(i["loaded"] for i in s["images"])), shot)

    def hide_run_params() -> None:
        card = page.locator(UI_CARD, has=page.locator(f'h4[title="{image_key}"]'))
        card.get_by_test_id("experiment-view-compare-runs-card-menu").click()
        page.get_by_role("menuitem", name="Configure").click()
        switch = page.get_by_role("switch", name="Show run parameters")
        if switch.get_attribute("aria-checked") == "true":
            switch.click()
        page.get_by_role("button", name="Save changes").click()

    _ui_step(ui, f"turn 'Show run parameters' off in the {image_key!r} card's Configure dialog", shot, hide_run_params)
    shown = _wait_shown_image(ui, f"image card {image_key!r} showing its step-{image_step} image",
                              [image_key, src, None], shot)
    page.screenshot(path=str(shot))
    print(f"MLflow UI screenshot (model metrics): {shot}")
    _check_tiles(ui, f"image card {image_key!r}", shown["box"], shots / "mlflow-run-samples-card.png")

    artifacts = [a.path for a in MlflowClient(uri).list_artifacts(run_id, "images")]
    png = next((a for a in artifacts if a.startswith(f"images/{image_key}+step+{image_step}+") and a.endswith(".png")),
               None)
    assert png is not None, f"no PNG of {image_key!r} at step {image_step} among the run's artifacts {artifacts}"
    shot = shots / "mlflow-run-artifact.png"
    page.goto(f"{run_url}/artifacts/{png}{UI_MODE}")
    shown = _wait_shown_image(ui, f"artifact view of {png} (the image at its logged size)",
                              [None, None, [3 * TILE_PX, 2 * TILE_PX]], shot)
    page.screenshot(path=str(shot))
    print(f"MLflow UI screenshot (artifact view): {shot}")
    _check_tiles(ui, "artifact view", shown["box"], shots / "mlflow-run-artifact-image.png")


@pytest.mark.services
@pytest.mark.slow
def test_mlflow_ui_run_page_in_headless_chromium(mlflow_server: MlflowServer, chromium_page: ChromiumPage,
                                                  tmp_path: Path) -> None:
    """A run logged through Tracker shows, in MLflow's UI (a real browser waiting for the page), its loss chart
    drawn from the logged points and its sample grid's pixels (check_mlflow_run_page)."""
    cfg = _cfg("ui-visible-run", **{"tracking.uri": mlflow_server.uri, "tracking.experiment": "trk-ui"})
    t = tracking.Tracker.open(cfg, tmp_path / "run", None, {})
    losses = [1.0, 0.55, 0.7, 0.3, 0.2]  # not monotonic: the chart must follow the values, not just a slope
    for s, v in enumerate(losses):
        t.log_metrics({"loss_generator": v}, step=s)
    t.log_image(_tile_grid(), key="samples", step=len(losses) - 1)
    assert t.close("FINISHED") == 0
    check_mlflow_run_page(chromium_page, mlflow_server.uri, t.run_id, "loss_generator", losses, "samples",
                          len(losses) - 1, tmp_path)
