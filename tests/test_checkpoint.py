"""Checkpoints of the two-engine (G, D) DeepSpeed trainer: bit-exact resume, kills at any moment (also
inside a save), resharding 2 <-> 1 ranks, object-storage round trip, export.

The multi-process tests run tests/_ckpt_worker.py (a toy GAN loop over two DeepSpeed engines, re-seeded per
step like the trainer) as 1 or 2 gloo ranks on CPU and compare full snapshots of the training state
(fp32 master weights, Adam moments, 16-bit weights, LR schedulers, EMA) with torch.equal: exact, not close.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import safetensors.torch
import torch

from waveforge import checkpoint, runtime
from waveforge.checkpoint.files import _check_plain as check_plain
from waveforge.checkpoint.remote import _remote_checkpoints as remote_checkpoints

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "_ckpt_worker.py"
STEPS = 6


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1",
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR",
                                                   str(Path.home() / ".cache" / "torch_extensions")))
    env.update(extra or {})
    return env


def start(world: int, run_dir: Path, env: dict[str, str] | None = None, **args: object) -> list[subprocess.Popen]:
    """Start `world` worker ranks (each in its own session so a test can SIGKILL the whole job)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    port = str(runtime.free_port())
    argv = [sys.executable, str(WORKER), f"run_dir={run_dir}"] + [f"{k}={v}" for k, v in args.items()]
    procs = []
    for r in range(world):
        e = _env({**(env or {}), "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world),
                  "MASTER_PORT": port})
        log = open(run_dir / f"log-{len(list(run_dir.glob('log-*')))}-rank{r}.txt", "w")
        procs.append(subprocess.Popen(argv, env=e, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        log.close()
    return procs


def wait(procs: list[subprocess.Popen], run_dir: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            kill(procs)
            raise
    if any(p.returncode for p in procs):
        logs = sorted(run_dir.glob("log-*"))[-len(procs):]
        tail = "\n".join(f"--- {f.name}\n" + f.read_text()[-3000:] for f in logs)
        raise AssertionError(f"worker failed (exit codes {[p.returncode for p in procs]}):\n{tail}")


def kill(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)  # the worker's own session: this rank and nothing else
    for p in procs:
        p.wait()


def run(world: int, run_dir: Path, env: dict[str, str] | None = None, **args: object) -> Path:
    wait(start(world, run_dir, env, **args), run_dir)
    return run_dir


def snap(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


def assert_same_state(a: Path, b: Path) -> None:
    sa, sb = snap(a), snap(b)
    assert sa.keys() == sb.keys()
    differ = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not differ, f"{a.name} vs {b.name}: differ in {differ[:8]} (max abs diff " \
        f"{max((sa[k].double() - sb[k].double()).abs().max().item() for k in differ):.3g})"


def losses(run_dir: Path) -> dict[int, list[tuple[float, float]]]:
    out: dict[int, list[tuple[float, float]]] = {}
    for line in (run_dir / "losses.jsonl").read_text().splitlines():
        d = json.loads(line)
        out.setdefault(d["step"], []).append((d["loss_d"], d["loss_g"]))
    return out


def events(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]


CONFIGS = {"z2-z2-bf16": dict(zero_g=2, zero_d=2, precision="bf16"),
           "z3-z2-bf16": dict(zero_g=3, zero_d=2, precision="bf16"),
           "z2-z2-fp32": dict(zero_g=2, zero_d=2, precision="fp32")}


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory):
    """Uninterrupted 2-rank runs of STEPS steps per config (saving at 3 and 6), made on first use."""
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            made[name] = run(2, tmp_path_factory.mktemp(f"straight-{name}"), steps=STEPS, save_every=3,
                             snap="3,6", keep_last=5, **CONFIGS[name])
        return made[name]

    return get


# --------------------------------------------------------------------------------------------------
# Exact resume, resharding
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
def test_resume_is_bit_exact(straight, tmp_path: Path, name: str) -> None:
    a = straight(name)
    ck = checkpoint.ckpt_root(a) / "step-000000003"
    assert checkpoint.is_complete(ck, hashes=True)
    m = checkpoint.read_manifest(ck)
    assert m["world"] == 2 and m["step"] == 3 and set(m["engines"]) == {"G", "D"}
    assert (checkpoint.ckpt_root(a) / "latest").read_text().strip() == "step-000000006"

    b = run(2, tmp_path / "resumed", steps=STEPS, save_every=3, snap="6", resume=str(ck), **CONFIGS[name])
    assert_same_state(a / "snap-3.pt", b / "snap-resumed-3.pt")  # right after load
    assert_same_state(a / "snap-6.pt", b / "snap-6.pt")  # after 3 more steps
    la, lb = losses(a), losses(b)
    assert sorted(lb) == [4, 5, 6] and all(lb[s] == la[s] for s in lb)
    ema_a = safetensors.torch.load_file(str(checkpoint.ckpt_root(a) / "step-000000006" / "ema.safetensors"))
    ema_b = safetensors.torch.load_file(str(checkpoint.ckpt_root(b) / "step-000000006" / "ema.safetensors"))
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["z2-z2-bf16", "z3-z2-bf16"])
def test_reshard_2_to_1_to_2(straight, tmp_path: Path, name: str) -> None:
    """2 -> 1 for both configs; back 1 -> 2 for the ZeRO-3 one (the CI time budget)."""
    a = straight(name)
    ck = checkpoint.ckpt_root(a) / "step-000000003"
    assert checkpoint.needs_universal(ck, 1) and not checkpoint.needs_universal(ck, 2)
    # 2 -> 1: the full state after load equals the one saved; training goes on and saves at world 1.
    one = run(1, tmp_path / "one", steps=5, save_every=5, snap="5", resume=str(ck), **CONFIGS[name])
    assert_same_state(a / "snap-3.pt", one / "snap-resumed-3.pt")
    assert (ck / "G_universal" / ".complete").is_file() and (ck / "D_universal" / ".complete").is_file()
    assert sorted(losses(one)) == [4, 5] and all(map(lambda v: torch.isfinite(torch.tensor(v)).all(),
                                                     losses(one).values()))
    ck1 = checkpoint.ckpt_root(one) / "step-000000005"
    assert checkpoint.read_manifest(ck1)["world"] == 1
    if name != "z3-z2-bf16":
        return
    # 1 -> 2
    two = run(2, tmp_path / "two", steps=6, save_every=6, resume=str(ck1), **CONFIGS[name])
    assert_same_state(one / "snap-5.pt", two / "snap-resumed-5.pt")
    assert sorted(losses(two)) == [6]


def test_load_on_other_world_without_patch_is_a_clear_error(straight, tmp_path: Path) -> None:
    ck = checkpoint.ckpt_root(straight("z2-z2-bf16")) / "step-000000003"

    class FakeEngine:
        def load_universal_checkpoint(self) -> bool:
            return False

    with pytest.raises(checkpoint.CheckpointError, match="ds_config_patch"):
        checkpoint.load(ck, {"G": FakeEngine(), "D": FakeEngine()}, torch.nn.Linear(1, 1))
    with pytest.raises(checkpoint.CheckpointError, match="engines"):
        checkpoint.load(ck, {"G": FakeEngine()}, torch.nn.Linear(1, 1))


# --------------------------------------------------------------------------------------------------
# Kills at random moments and inside a save
# --------------------------------------------------------------------------------------------------


def _check_invariants(run_dir: Path) -> int:
    """`latest` names a complete checkpoint; every step-* folder is complete. Returns the newest step (or 0)."""
    root = checkpoint.ckpt_root(run_dir)
    folders = sorted(p for p in root.glob("step-*")) if root.is_dir() else []
    for p in folders:
        assert checkpoint.is_complete(p, hashes=True), f"{p} is published but incomplete"
    if (root / "latest").exists():
        target = root / (root / "latest").read_text().strip()
        assert checkpoint.is_complete(target), f"latest -> {target} is not complete"
    return checkpoint.read_manifest(folders[-1])["step"] if folders else 0


def _wait_for(cond, procs: list[subprocess.Popen], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
            kill(procs)
            raise AssertionError("the worker ended or stalled before the kill point")
        time.sleep(0.02)


@pytest.mark.slow
def test_sigkill_at_any_moment_resumes_exactly(straight, tmp_path: Path) -> None:
    name = "z2-z2-bf16"
    a = straight(name)
    d = tmp_path / "killed"
    args = dict(steps=STEPS, save_every=1, keep_last=2, step_sleep=0.3, snap="6", **CONFIGS[name])
    rng = random.Random(1234)
    resumed_at: list[int] = []

    def n_losses() -> int:
        f = d / "losses.jsonl"
        return len(f.read_text().splitlines()) if f.exists() else 0

    # Kill 1: deterministically inside the first save, after every rank wrote its shards and RNG file,
    # before the manifest (the save sleeps there).
    procs = start(2, d, pause_before_manifest=30, **args)
    tmp = checkpoint.ckpt_root(d) / ".tmp-000000001"
    _wait_for(lambda: len(list((tmp / "rng").glob("*.pt"))) == 2 and (tmp / "state.pt").exists(), procs)
    time.sleep(0.2)
    kill(procs)
    assert _check_invariants(d) == 0 and tmp.exists()  # nothing published, the leftover is there

    # Kills 2-4: at random moments after the restarted job made progress (during steps or saves).
    for _ in range(3):
        before = _check_invariants(d)
        seen = n_losses()
        procs = start(2, d, **args)
        _wait_for(lambda seen=seen: n_losses() > seen, procs)
        time.sleep(rng.uniform(0.0, 0.6))
        kill(procs)
        after = _check_invariants(d)
        assert after >= before
    before = _check_invariants(d)
    run(2, d, **args)
    assert not list(checkpoint.ckpt_root(d).glob(".tmp-*"))  # leftovers of the killed saves cleaned

    ev = events(d)
    starts = [e for e in ev if e["kind"] in ("start", "resume")]
    for e in starts:
        if e["kind"] == "resume":
            resumed_at.append(e["step"])
    assert resumed_at == sorted(resumed_at) and resumed_at[-1] == before  # resumed from the newest complete
    # Every step computed (again, after a kill) gave the uninterrupted run's losses, and the final state is
    # identical to it: no step was applied twice or skipped.
    la, lk = losses(a), losses(d)
    assert sorted(lk) == list(range(1, STEPS + 1))
    assert all(v == la[s][0] for s, vals in lk.items() for v in vals)
    assert_same_state(a / "snap-6.pt", d / "snap-6.pt")
    assert checkpoint.read_manifest(checkpoint.ckpt_root(d) / "step-000000006")["step"] == STEPS
    assert len(list(checkpoint.ckpt_root(d).glob("step-*"))) == 2  # keep_last


# --------------------------------------------------------------------------------------------------
# find_resume, pruning, state checks (one process)
# --------------------------------------------------------------------------------------------------


def test_find_resume_choices(straight, tmp_path: Path) -> None:
    a = straight("z2-z2-bf16")
    root = checkpoint.ckpt_root(a)
    assert checkpoint.find_resume(a, "never") is None
    assert checkpoint.find_resume(a, "auto") == root / "step-000000006"
    assert checkpoint.find_resume(tmp_path / "new", "auto") is None
    assert checkpoint.find_resume(tmp_path / "x", str(root / "step-000000003")) == root / "step-000000003"
    assert checkpoint.find_resume(tmp_path / "x", str(a)) == root / "step-000000006"
    with pytest.raises(checkpoint.CheckpointError, match="no complete checkpoint"):
        checkpoint.find_resume(tmp_path / "x", str(tmp_path / "missing"))
    # An incomplete copy (a file lost) is never chosen, and naming it is a clear error.
    bad = tmp_path / "copy" / "checkpoints"
    import shutil

    shutil.copytree(root, bad)
    (bad / "step-000000006" / "G" / "mp_rank_00_model_states.pt").unlink()
    assert checkpoint.find_resume(tmp_path / "copy", "auto") == bad / "step-000000003"
    with pytest.raises(checkpoint.CheckpointError, match="not a complete checkpoint"):
        checkpoint.find_resume(tmp_path / "y", str(bad / "step-000000006"))


def test_state_must_be_plain_data() -> None:
    import numpy as np

    check_plain({"step": 1, "loader": {"order": torch.arange(3), "names": ["a"]}, "x": None})
    with pytest.raises(TypeError, match=r"state\['loader'\]\['order'\] is a ndarray"):
        check_plain({"loader": {"order": np.arange(3)}})


class _FakeEngine:
    """Stands in for a DeepSpeed engine in one-process tests of publication, pruning and upload."""

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict, save_latest: bool) -> None:
        assert not save_latest
        Path(save_dir, tag).mkdir(parents=True, exist_ok=True)
        torch.save({"w": torch.arange(4)}, Path(save_dir, tag, "mp_rank_00_model_states.pt"))

    def zero_optimization_stage(self) -> int:
        return 2


def _fake_save(run_dir: Path, step: int, **kw: object) -> Path:
    state = {"step": step, "images": step * 10, "recipe": {"model": {}, "diffusion": {}}}
    return checkpoint.save(run_dir, step, {"G": _FakeEngine(), "D": _FakeEngine()}, torch.nn.Linear(2, 2), state,
                           **kw)


def test_publication_pruning_and_milestones(tmp_path: Path) -> None:
    root = checkpoint.ckpt_root(tmp_path)
    (root / ".tmp-000000007").mkdir(parents=True)  # leftover of a killed save
    for step in range(1, 8):
        _fake_save(tmp_path, step, keep_last=2, milestone_every_images=25)
    # newest 2 + milestones (first checkpoint at or after 25, 50 images: steps 3 and 5)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000000003", "step-000000005",
                                                      "step-000000006", "step-000000007"]
    assert (root / "latest").read_text() == "step-000000007\n"
    assert checkpoint.read_manifest(root / "step-000000003")["milestone"]
    m = checkpoint.read_manifest(root / "step-000000007")
    assert m["world"] == 1 and m["images"] == 70 and set(m["files"]) == {
        "G/mp_rank_00_model_states.pt", "D/mp_rank_00_model_states.pt", "ema.safetensors", "state.pt",
        "rng/rank-00000.pt"}
    # re-saving an existing step (after resuming an older checkpoint) replaces it
    _fake_save(tmp_path, 6, keep_last=2)
    assert checkpoint.is_complete(root / "step-000000006", hashes=True)
    with pytest.raises(TypeError, match="ndarray"):
        import numpy as np

        checkpoint.save(tmp_path, 9, {}, torch.nn.Linear(1, 1), {"x": np.zeros(2)}, keep_last=1)


def test_uploader_to_a_folder_and_failures_are_counted(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    remote = tmp_path / "remote"
    up = checkpoint.Uploader(str(remote), keep_last=1, retries=1, backoff_s=0.01)
    for step in (1, 2):
        _fake_save(tmp_path / "run", step, keep_last=1, uploader=up)
    assert up.wait() == 0
    assert (remote / "latest").read_text() == "step-000000002\n"
    assert not (remote / "step-000000001").exists() and checkpoint.is_complete(remote / "step-000000002", True)
    # resume=auto prefers the remote copy when it is newer than the local one
    got = checkpoint.find_resume(tmp_path / "fresh", "auto", url=str(remote))
    assert got == checkpoint.ckpt_root(tmp_path / "fresh") / "step-000000002" and checkpoint.is_complete(got, True)
    # an upload that cannot succeed is retried, reported loudly and counted, never silently dropped
    (tmp_path / "blocker").write_text("a file where a folder should be")
    bad = checkpoint.Uploader(str(tmp_path / "blocker" / "sub"), retries=1, backoff_s=0.01)
    bad.submit(checkpoint.ckpt_root(tmp_path / "run") / "step-000000002")
    assert bad.wait() == 1 and bad.failed == ["step-000000002"]
    assert "CHECKPOINT UPLOAD FAILED" in capsys.readouterr().err


class _LiveEngine(_FakeEngine):
    """Like DeepSpeed: writes through its checkpoint engine a state dict that references live tensors (a view
    among them), which the training steps after a save change in place."""

    def __init__(self) -> None:
        from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

        self.checkpoint_engine = TorchCheckpointEngine()
        self.w = torch.arange(1000, dtype=torch.float32)

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict, save_latest: bool) -> None:
        Path(save_dir, tag).mkdir(parents=True, exist_ok=True)
        self.checkpoint_engine.save({"w": self.w, "part": self.w[10:20], "lr": [0.1]},
                                    os.path.join(save_dir, tag, "mp_rank_00_model_states.pt"))


def _gated(monkeypatch: pytest.MonkeyPatch, gate: threading.Event) -> None:
    """Every file write of a save waits for `gate` (the writes are slow, training goes on meanwhile)."""
    from waveforge.checkpoint import writer

    for name in ("_write_torch", "_write_safetensors"):
        original = getattr(writer, name)
        monkeypatch.setattr(writer, name, lambda obj, path, f=original: (gate.wait(), f(obj, path))[1])


def test_background_save_is_a_snapshot_published_only_once_durable(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    engines, ema = {"G": _LiveEngine(), "D": _LiveEngine()}, torch.nn.Linear(3, 3)
    ema_at_save = {k: v.clone() for k, v in ema.state_dict().items()}
    state = {"step": 1, "images": 10, "counts": [1, 2], "recipe": {"model": {}, "diffusion": {}}}
    gate = threading.Event()
    _gated(monkeypatch, gate)
    saver = checkpoint.Saver(background=True)
    path = saver.save(tmp_path, 1, engines, ema, state, keep_last=2)
    # save() returned; the files are not written yet. Training changes every tensor in place.
    for e in engines.values():
        e.w.add_(1000)
    with torch.no_grad():
        ema.weight.mul_(-1)
    state["counts"].append(3)
    root = checkpoint.ckpt_root(tmp_path)
    assert not path.exists() and not (root / "latest").exists()  # nothing published before the files are durable
    gate.set()
    saver.wait()
    assert checkpoint.is_complete(path, hashes=True) and (root / "latest").read_text() == "step-000000001\n"
    for tag in ("G", "D"):
        saved = torch.load(path / tag / "mp_rank_00_model_states.pt", weights_only=True)
        assert torch.equal(saved["w"], torch.arange(1000, dtype=torch.float32)) and saved["lr"] == [0.1]
        assert torch.equal(saved["part"], torch.arange(10, 20, dtype=torch.float32))
    got = safetensors.torch.load_file(str(path / "ema.safetensors"))
    assert all(torch.equal(got[k], ema_at_save[k]) for k in ema_at_save)
    assert checkpoint.read_state(path)["counts"] == [1, 2]
    # the next save's snapshot reuses the first one's memory: it holds the new values
    path2 = saver.save(tmp_path, 2, engines, ema, {**state, "step": 2}, keep_last=2)
    engines["G"].w.zero_()
    saver.wait()
    saved = torch.load(path2 / "G" / "mp_rank_00_model_states.pt", weights_only=True)
    assert torch.equal(saved["w"], torch.arange(1000, dtype=torch.float32) + 1000)
    assert checkpoint.is_complete(path, hashes=True) and checkpoint.is_complete(path2, hashes=True)
    saver.close()


def test_a_background_failure_is_raised_by_the_next_save(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from waveforge.checkpoint import writer

    def full_disk(obj: object, path: Path) -> dict:
        raise OSError(28, "No space left on device")

    saver = checkpoint.Saver(background=True)
    kw = dict(keep_last=2)
    state = {"step": 1, "images": 10, "recipe": {"model": {}, "diffusion": {}}}
    with monkeypatch.context() as m:
        m.setattr(writer, "_write_safetensors", full_disk)
        saver.save(tmp_path, 1, {"G": _LiveEngine()}, torch.nn.Linear(2, 2), state, **kw)  # returns: writes go on
        with pytest.raises(checkpoint.CheckpointError, match="No space left on device"):
            saver.save(tmp_path, 2, {"G": _LiveEngine()}, torch.nn.Linear(2, 2), {**state, "step": 2}, **kw)
    root = checkpoint.ckpt_root(tmp_path)
    assert not list(root.glob("step-*")) and not (root / "latest").exists()
    path = saver.save(tmp_path, 3, {"G": _LiveEngine()}, torch.nn.Linear(2, 2), {**state, "step": 3}, **kw)
    saver.close()
    assert checkpoint.is_complete(path, hashes=True) and not list(root.glob(".tmp-*"))


def _wait_until(cond: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_upload_process_gets_no_secret_on_its_command_line_and_its_death_is_counted(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from waveforge.config import StorageConfig

    secret = "wf-upload-secret-6b2d9e"
    ck = _fake_save(tmp_path / "run", 1, keep_last=2)
    up = checkpoint.Uploader(str(tmp_path / "remote"), StorageConfig(access_key="KEYID", secret_key=secret),
                             retries=0, mb_s=0.001)  # 1 kB/s: still copying when it is killed
    up.submit(ck)
    _wait_until(lambda: up.pid is not None and up.startup_cpu_s > 0)
    pid = up.pid
    assert secret not in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    assert secret not in Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
    assert int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16]) == 19  # its nice value
    os.kill(pid, signal.SIGKILL)
    assert up.wait() == 1 and up.failed == ["step-000000001"] and up.pending() == set()
    assert "CHECKPOINT UPLOAD FAILED" in capsys.readouterr().err
    # the next checkpoint gets a new process
    up.mb_s = 0.0
    ck2 = _fake_save(tmp_path / "run", 2, keep_last=2)
    up.submit(ck2)
    assert up.wait() == 1 and checkpoint.is_complete(tmp_path / "remote" / "step-000000002", hashes=True)
    assert up.close() == 1 and up.cpu_s > 0
    leaked = [p for p in tmp_path.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    assert not leaked


def test_upload_rate_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bound holds on a fake clock: the copy of N bytes at R MB/s takes at least N / R (time only advances
    in its sleeps), and about that (it does not sleep more than it must)."""
    from types import SimpleNamespace

    from waveforge.checkpoint import remote

    clock = [0.0]
    monkeypatch.setattr(remote, "time", SimpleNamespace(monotonic=lambda: clock[0], perf_counter=time.perf_counter,
                                                        sleep=lambda s: clock.__setitem__(0, clock[0] + s)))
    ck = _fake_save(tmp_path / "run", 1, keep_last=2)
    sent = sum(f["size"] for f in checkpoint.read_manifest(ck)["files"].values())
    sent += (ck / "manifest.json").stat().st_size
    remote.upload(ck, str(tmp_path / "remote"), mb_s=0.01)
    assert clock[0] == pytest.approx(sent / 1e4, rel=1e-6)
    assert checkpoint.is_complete(tmp_path / "remote" / ck.name, hashes=True)


# --------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------


def test_export_loads_into_a_fresh_module(straight, tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from _ckpt_worker import make_g

    a = straight("z2-z2-bf16")
    out = checkpoint.export(str(a))
    assert out == a / "export"
    cfg = json.loads((out / "model_config.json").read_text())
    assert cfg["model"] == {"nf": 8} and cfg["diffusion"] == {"num_timesteps": 2} and cfg["step"] == 6
    g = make_g()
    missing, unexpected = safetensors.torch.load_model(g, str(out / "generator_ema.safetensors"))
    assert not missing and not unexpected
    ema = safetensors.torch.load_file(str(checkpoint.ckpt_root(a) / "step-000000006" / "ema.safetensors"))
    assert all(torch.equal(g.state_dict()[k], ema[k]) for k in ema)
    assert snap(a / "snap-6.pt")["ema.0.weight"].equal(g.state_dict()["0.weight"])
    # a chosen step, through the job entry point
    res = subprocess.run([sys.executable, str(ROOT / "jobs" / "export.py"), f"run={a}", "checkpoint=3",
                          f"out={tmp_path / 'e3'}"], capture_output=True, text=True, env=_env())
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "e3" / "model_config.json").read_text())["step"] == 3


def test_export_job_bad_input_exits_2(tmp_path: Path) -> None:
    job = str(ROOT / "jobs" / "export.py")
    for argv, msg in (([], "missing run="), ([f"run={tmp_path}"], "no complete checkpoint"),
                      ([f"run={tmp_path}", "bogus=1"], "unknown key"),
                      ([f"run={tmp_path}", "checkpoint=latest-ish"], "checkpoint=")):
        res = subprocess.run([sys.executable, job, *argv], capture_output=True, text=True, env=_env())
        assert res.returncode == 2 and "error:" in res.stderr and msg in res.stderr, (argv, res.stderr)


def test_checkpoint_benchmark_bad_arguments_exit_2() -> None:
    """benchmarks/checkpoint.py: a bad argument is one line naming it, exit 2, before anything runs."""
    bench = str(ROOT / "benchmarks" / "checkpoint.py")
    for argv, msg in ((["repeats=x"], "repeats=x: a whole number"), (["bogus=1"], "unknown argument(s) ['bogus']"),
                      (["upload_cases=200"], "upload_cases=200: MB_S:NICE"), (["big=yes"], "big=yes: 0 or 1"),
                      (["upload_cases=20:25"], "NICE 0-19"), (["repeats"], "arguments are key=value")):
        res = subprocess.run([sys.executable, bench, *argv], capture_output=True, text=True, env=_env())
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and lines[-1].startswith("error:") and msg in lines[-1], (argv, res.stderr)
        assert "Traceback" not in res.stderr


# --------------------------------------------------------------------------------------------------
# Object storage (real SeaweedFS)
# --------------------------------------------------------------------------------------------------


@pytest.mark.services
@pytest.mark.slow
def test_object_storage_round_trip(s3_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = s3_server.make_bucket("ckpt-roundtrip") + "/runs/toy"
    env = {"TEST_S3_ENDPOINT": s3_server.endpoint_url, "AWS_ACCESS_KEY_ID": s3_server.access_key,
           "AWS_SECRET_ACCESS_KEY": s3_server.secret_key}
    name = "z2-z2-bf16"
    d = run(2, tmp_path / "up", env, steps=4, save_every=2, snap="4", keep_last=1, url=url, **CONFIGS[name])
    assert [e for e in events(d) if e["kind"] == "done"][0]["upload_errors"] == 0
    for k, v in env.items():
        if k.startswith("AWS_"):
            monkeypatch.setenv(k, v)
    from waveforge import storage
    from waveforge.config import StorageConfig

    scfg = StorageConfig(endpoint_url=s3_server.endpoint_url)
    assert storage.read_text(url + "/latest", scfg).strip() == "step-000000004"
    # remote keep_last=1: step 2 is gone (SeaweedFS may keep an empty folder entry; no object is left)
    assert remote_checkpoints(url, scfg) == ["step-000000004"]
    fs, path = storage.filesystem(url, scfg)
    assert fs.du(path + "/step-000000002") == 0
    # Lose the local checkpoints: resume=auto fetches the newest from object storage, exactly.
    import shutil

    shutil.rmtree(checkpoint.ckpt_root(d))
    r = run(2, d, env, steps=5, save_every=5, url=url, keep_last=1, **CONFIGS[name])
    resumes = [e for e in events(r) if e["kind"] == "resume"]
    assert resumes and resumes[-1]["step"] == 4
    assert_same_state(d / "snap-4.pt", d / "snap-resumed-4.pt")
    # export straight from the URL
    out = checkpoint.export(url, tmp_path / "exp", storage=scfg)
    assert json.loads((out / "model_config.json").read_text())["step"] == 5
    # an incomplete remote checkpoint (manifest missing) is refused with a clear error
    storage.remove(url + "/step-000000005/manifest.json", scfg)
    with pytest.raises(checkpoint.CheckpointError, match="not a complete checkpoint"):
        checkpoint.find_resume(tmp_path / "z", url + "/step-000000005", storage=scfg)



# --------------------------------------------------------------------------------------------------
# Verification: nothing is loaded (or unpickled) before it matches the manifest
# --------------------------------------------------------------------------------------------------


class _Unpickled:
    """Runs a command when unpickled: what a swapped checkpoint shard could do to a trainer that trusts it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.slow
def test_a_corrupted_checkpoint_is_passed_over_before_anything_is_unpickled(straight, tmp_path: Path) -> None:
    """One flipped byte in the EMA, in an optimizer shard, or a swapped weight shard (a pickle that runs code)
    in the newest checkpoint: the resume takes the one before (saying so), is bit-exact from there, and never
    unpickles the bad file; with none left that verifies it stops naming each."""
    a = straight("z2-z2-bf16")
    marker = tmp_path / "code-ran"
    for name, rel in (("ema", "ema.safetensors"), ("optim", "D/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"),
                      ("swapped", "G/mp_rank_00_model_states.pt")):
        d = tmp_path / name
        shutil.copytree(checkpoint.ckpt_root(a), checkpoint.ckpt_root(d))
        target = checkpoint.ckpt_root(d) / "step-000000006" / rel
        if name == "swapped":
            torch.save({"module": _Unpickled(marker)}, target)
        else:
            _flip_byte(target)
        run(2, d, steps=STEPS, save_every=3, snap="6", keep_last=5, **CONFIGS["z2-z2-bf16"])
        assert [e["step"] for e in events(d) if e["kind"] == "resume"] == [3], name  # not 6
        assert_same_state(a / "snap-6.pt", d / "snap-6.pt")  # steps 4-6 again, exactly
        assert not marker.exists(), "a file that does not match its manifest was unpickled"
        # nothing verifies any more: the error names every checkpoint it tried (exit 2 at the command line)
        _flip_byte(checkpoint.ckpt_root(d) / "step-000000003" / "state.pt")
        _flip_byte(checkpoint.ckpt_root(d) / "step-000000006" / "state.pt")
        with pytest.raises(checkpoint.CheckpointError, match="no checkpoint to resume from verifies") as e:
            checkpoint.find_resume(d, "auto")
        assert "step-000000003" in str(e.value) and "step-000000006" in str(e.value) and "state.pt" in str(e.value)


def test_the_trainers_check_runs_in_the_background_and_falls_back(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The trainer starts checking the newest checkpoint first (Checkpointer.start) and builds its models
    meanwhile: plan() waits for that check. A corrupted newest one is passed over for the one before, said in
    the notes (an MLflow tag); one that verifies is taken."""
    from waveforge import config
    from waveforge.checkpointer import Checkpointer

    cfg = config.load("tiny", [f"run.dir={tmp_path}", "run.resume=auto"])
    for step in (1, 2):
        state = {"step": step, "images": step * 10, "recipe": config.to_dict(cfg)}
        checkpoint.save(tmp_path, step, {"G": _FakeEngine(), "D": _FakeEngine()}, torch.nn.Linear(2, 2), state,
                        keep_last=2)
    root = checkpoint.ckpt_root(tmp_path)
    started: list[str] = []
    real = checkpoint.Verification.__init__

    def spy(self: checkpoint.Verification, ckpt: Path, names: list[str] | None = None,
            background: bool = True) -> None:
        if background:
            started.append(Path(ckpt).name)
        real(self, ckpt, names, background)

    monkeypatch.setattr(checkpoint.Verification, "__init__", spy)
    good = Checkpointer(cfg, tmp_path)
    good.start()
    assert started == ["step-000000002"]  # before plan: the trainer builds its models while it runs
    assert good.plan(1) == {} and good.source == root / "step-000000002" and not good.notes
    assert started == ["step-000000002"]  # plan waited for it, did not check again
    good.close()

    _flip_byte(root / "step-000000002" / "ema.safetensors")
    bad = Checkpointer(cfg, tmp_path)
    bad.start()
    assert bad.plan(1) == {} and bad.source == root / "step-000000001"
    assert "step-000000002" in bad.notes["resume_passed_over"]
    assert "ema.safetensors: blake3" in bad.notes["resume_passed_over"]
    bad.close()


def test_a_check_left_midway_in_the_background_is_finished_in_the_foreground(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The background check hashes each file in pieces and stops between two when the trainer asks for the
    result; the foreground goes on from there: the digest is the whole file's, and a flipped byte after the
    hand-over is found."""
    from waveforge.checkpoint import files

    class StopAfter(threading.Event):
        def __init__(self, n: int) -> None:
            super().__init__()
            self.n = n

        def is_set(self) -> bool:
            self.n -= 1
            return self.n < 0

    monkeypatch.setattr(files._FileCheck, "PIECE", 64)  # many pieces per file
    ckpt = _fake_save(tmp_path / "run", 1, keep_last=1)
    for flip in (False, True):
        if flip:
            _flip_byte(ckpt / "G" / "mp_rank_00_model_states.pt")  # its middle: after the hand-over
        check = checkpoint.Verification(ckpt, background=False)
        big = next(c for c in check._checks if c.rel == "G/mp_rank_00_model_states.pt")
        big.run(StopAfter(3))  # what a background thread does before it is stopped
        assert 0 < big.pos < big.size / 2 and not big.done
        if flip:
            with pytest.raises(checkpoint.CheckpointError, match="G/mp_rank_00_model_states.pt: blake3"):
                check.result()
        else:
            assert check.result()[0] > 0 and big.done and big.pos == big.size


def _nice_of_this_thread() -> int:
    stat = Path(f"/proc/self/task/{threading.get_native_id()}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[16])


def test_the_background_check_yields_the_cpu_and_the_wait_hashes_at_full_priority(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The background threads run at nice 19 (the trainer's model building, whose OpenMP threads spin while a
    sibling waits for a core, must not share the cores with them equally); what is left when the trainer
    asks for the result is hashed at the caller's priority; the process's own priority is untouched."""
    from waveforge.checkpoint import files

    seen: list[tuple[str, int]] = []
    real = files._FileCheck.run
    gate = threading.Event()

    def run(self: files._FileCheck, stop: threading.Event | None = None) -> None:
        if stop is not None:  # a background thread: hold it until the caller has asked for the result
            seen.append(("background", _nice_of_this_thread()))
            gate.wait(10)
            return
        seen.append(("foreground", _nice_of_this_thread()))
        real(self, stop)

    monkeypatch.setattr(files._FileCheck, "run", run)
    ckpt = _fake_save(tmp_path / "run", 1, keep_last=1)
    check = checkpoint.Verification(ckpt)
    deadline = time.monotonic() + 10
    while not seen and time.monotonic() < deadline:
        time.sleep(0.01)
    threading.Timer(0.2, gate.set).start()
    check.result()
    assert seen and {n for kind, n in seen if kind == "background"} == {19}
    assert {n for kind, n in seen if kind == "foreground"} == {_nice_of_this_thread()} != {19}
    assert all(c.done for c in check._checks)


def test_manifests_hold_blake3_and_older_sha256_ones_still_verify(tmp_path: Path) -> None:
    """A new manifest lists each file's BLAKE3 (what the file's bytes hash to, computed while it was
    written); a checkpoint of the first format (version 1, sha256 entries) still verifies and loads, and a
    flipped byte in it is still found."""
    import blake3

    ckpt = _fake_save(tmp_path / "run", 1, keep_last=1)
    m = checkpoint.read_manifest(ckpt)
    assert m["version"] == 2
    for rel, entry in m["files"].items():
        assert set(entry) == {"size", "blake3"}, rel
        assert entry["blake3"] == blake3.blake3((ckpt / rel).read_bytes()).hexdigest(), rel
    old = {**m, "version": 1, "files": {rel: {"size": e["size"], "sha256": hashlib.sha256((ckpt / rel).read_bytes())
                                              .hexdigest()} for rel, e in m["files"].items()}}
    (ckpt / checkpoint.MANIFEST).write_text(json.dumps(old))
    assert checkpoint.verify(ckpt) >= 0 and checkpoint.is_complete(ckpt, hashes=True)
    assert checkpoint.find_resume(tmp_path / "run", "auto") == ckpt
    _flip_byte(ckpt / "state.pt")
    with pytest.raises(checkpoint.CheckpointError, match="state.pt: sha256 .*manifest says"):
        checkpoint.verify(ckpt)
    assert not checkpoint.is_complete(ckpt, hashes=True)


def test_export_verifies_and_never_writes_non_finite_weights(tmp_path: Path) -> None:
    ckpt = _fake_save(tmp_path / "run", 1, keep_last=1)
    _flip_byte(ckpt / "ema.safetensors")
    with pytest.raises(checkpoint.CheckpointError, match="ema.safetensors: blake3"):
        checkpoint.export(str(ckpt), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    nan = torch.nn.Linear(2, 2)
    with torch.no_grad():
        nan.weight[0, 0] = float("nan")
    state = {"step": 2, "images": 20, "recipe": {"model": {}, "diffusion": {}}}
    ckpt = checkpoint.save(tmp_path / "run", 2, {"G": _FakeEngine(), "D": _FakeEngine()}, nan, state, keep_last=2)
    with pytest.raises(checkpoint.CheckpointError, match="non-finite weights .1 values in 1 tensor"):
        checkpoint.export(str(ckpt), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_export_is_checked_before_it_is_used(tmp_path: Path) -> None:
    """An export records its generator file's size and BLAKE3 in model_config.json; a flipped byte in it, or a
    NaN in an export without a digest (written by hand), is refused by read_export and by jobs/sample.py
    (exit 2, one line naming the file) before any model is built."""
    ckpt = _fake_save(tmp_path / "run", 1, keep_last=1)
    out = checkpoint.export(str(ckpt), tmp_path / "out")
    info = json.loads((out / checkpoint.CONFIG_FILE).read_text())
    gen = out / checkpoint.GENERATOR_FILE
    assert info["generator_file"]["size"] == gen.stat().st_size
    tensors, meta = checkpoint.read_export(out)
    ema = safetensors.torch.load_file(str(ckpt / "ema.safetensors"))
    assert meta["step"] == 1 and tensors.keys() == ema.keys()
    assert all(torch.equal(tensors[k], ema[k]) for k in ema)
    _flip_byte(gen)
    with pytest.raises(checkpoint.CheckpointError, match="generator_ema.safetensors: .* blake3 .*model_config.json "
                                                         "says .*corrupt or was replaced"):
        checkpoint.read_export(out)
    res = subprocess.run([sys.executable, str(ROOT / "jobs" / "sample.py"), f"run={out}", "num=2",
                          f"out={tmp_path / 'samples'}"], capture_output=True, text=True, env=_env())
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "generator_ema.safetensors" in lines[0] and "corrupt" in lines[0], res.stderr
    assert not (tmp_path / "samples").exists()
    # written by hand (no digest) with a NaN: still refused
    ema["weight"][0, 0] = float("nan")
    safetensors.torch.save_file(ema, str(gen))
    del info["generator_file"]
    (out / checkpoint.CONFIG_FILE).write_text(json.dumps(info))
    with pytest.raises(checkpoint.CheckpointError, match=r"holds non-finite weights \(1 values in 1 tensor"):
        checkpoint.read_export(out)


def _odd_tensors() -> dict:
    """A state dict whose records are not multiples of the block size, some bigger than a staging buffer."""
    g = torch.Generator().manual_seed(0)
    return {"a": torch.randn(12345, generator=g), "b": torch.randn(3, 7, generator=g).to(torch.bfloat16),
            "big": torch.randn(40_001, generator=g), "view": [1, "x", 2.5]}


def _needs_direct_io(folder: Path) -> None:
    """Skip the test where `folder`'s filesystem refuses O_DIRECT (tmpfs)."""
    from waveforge.checkpoint import writer

    probe = writer._open_direct(folder / "probe")
    if probe is None:
        pytest.skip(f"{folder} is on a filesystem that refuses O_DIRECT")
    os.close(probe)


def test_direct_writes_are_byte_identical_to_buffered_ones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint file written with O_DIRECT (staging buffers, padded last block, truncated) holds exactly the
    bytes torch.save produces, and its manifest entry is their size and BLAKE3."""
    import blake3

    from waveforge.checkpoint import writer

    _needs_direct_io(tmp_path)
    import fcntl

    probe = writer._open_direct(tmp_path / "probe")
    assert fcntl.fcntl(probe, fcntl.F_GETFL) & os.O_DIRECT
    os.close(probe)
    obj = _odd_tensors()
    monkeypatch.setattr(writer, "STAGE", 4 * writer.DIRECT_ALIGN)  # 16 KB: many buffers, several in flight
    monkeypatch.setattr(writer, "_refused_direct", set())  # the buffered case below marks this filesystem
    direct = writer._write_torch(obj, tmp_path / "direct.pt")
    with monkeypatch.context() as m:
        m.setattr(writer, "_open_direct", lambda path: None)
        buffered = writer._write_torch(obj, tmp_path / "buffered.pt")
    data = (tmp_path / "direct.pt").read_bytes()
    assert data == (tmp_path / "buffered.pt").read_bytes() and len(data) % writer.DIRECT_ALIGN
    assert direct == buffered == {"size": len(data), "blake3": blake3.blake3(data).hexdigest()}
    got = torch.load(tmp_path / "direct.pt", weights_only=True)
    assert all(torch.equal(got[k], obj[k]) for k in ("a", "b", "big")) and got["view"] == obj["view"]


def test_a_filesystem_without_o_direct_gets_buffered_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture) -> None:
    """A filesystem that refuses O_DIRECT (EINVAL at open: some network and FUSE filesystems): the save falls
    back to buffered writes, the checkpoint is complete and loads."""
    import errno

    from waveforge.checkpoint import writer

    real_open = os.open

    def no_direct(path: object, flags: int, *args: object, **kwargs: object) -> int:
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(writer.os, "open", no_direct)
    monkeypatch.setattr(writer, "_refused_direct", set())
    assert writer._open_direct(tmp_path / "probe") is None
    state = {"step": 1, "images": 10, "recipe": {"model": {}, "diffusion": {}}}
    path = checkpoint.save(tmp_path, 1, {"G": _LiveEngine()}, torch.nn.Linear(3, 3), state, keep_last=1)
    assert checkpoint.is_complete(path, hashes=True)
    saved = torch.load(path / "G" / "mp_rank_00_model_states.pt", weights_only=True)
    assert torch.equal(saved["w"], torch.arange(1000, dtype=torch.float32))
    err = capsys.readouterr().err  # three torch.save files in two folders of one filesystem: one line
    assert err.count("cannot be opened with O_DIRECT") == 1 and "written through the page cache" in err


def test_a_failed_direct_write_is_raised_and_returns_its_buffers(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A write error of the background writer (a full disk) reaches the save; the staging buffers go back to
    the pool (the next file writes normally)."""
    from waveforge.checkpoint import writer

    _needs_direct_io(tmp_path)
    monkeypatch.setattr(writer, "STAGE", 4 * writer.DIRECT_ALIGN)
    staging = writer._Staging(keep=16)
    monkeypatch.setattr(writer, "_STAGING", staging)
    real_pwrite, calls = os.pwrite, []

    def full_disk(fd: int, data: object, offset: int) -> int:
        calls.append(offset)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real_pwrite(fd, data, offset)

    with monkeypatch.context() as m:
        m.setattr(writer.os, "pwrite", full_disk)
        with pytest.raises(OSError, match="No space left on device"):
            writer._write_torch(_odd_tensors(), tmp_path / "full.pt")
    pooled = len(staging._free)
    assert pooled == writer.STAGE_DEPTH  # every buffer it used is back
    entry = writer._write_torch(_odd_tensors(), tmp_path / "ok.pt")
    assert entry["size"] == (tmp_path / "ok.pt").stat().st_size and len(staging._free) == pooled
    assert torch.equal(torch.load(tmp_path / "ok.pt", weights_only=True)["big"], _odd_tensors()["big"])


def test_direct_io_false_writes_through_the_page_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """checkpoint.direct_io=false: no file of the save is opened with O_DIRECT; the default opens the torch.save
    files (shards, RNG states, trainer state) that way."""
    from waveforge.checkpoint import writer

    opened: list[str] = []
    real = writer._open_direct
    monkeypatch.setattr(writer, "_open_direct", lambda path: (opened.append(Path(path).name), real(path))[1])
    state = {"step": 1, "images": 10, "recipe": {"model": {}, "diffusion": {}}}
    for step, direct_io in ((1, False), (2, True)):
        saver = checkpoint.Saver(direct_io=direct_io)
        path = saver.save(tmp_path, step, {"G": _LiveEngine()}, torch.nn.Linear(3, 3), {**state, "step": step},
                          keep_last=2)
        saver.close()
        assert checkpoint.is_complete(path, hashes=True)
        assert sorted(opened) == ([] if not direct_io else
                                  ["mp_rank_00_model_states.pt", "rank-00000.pt", "state.pt"])


def test_a_filesystem_refusing_o_direct_writes_gets_buffered_ones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture) -> None:
    """A filesystem that opens with O_DIRECT but refuses the writes (EINVAL): the file is written again through
    the page cache, complete and identical, and the console says so once."""
    import errno

    from waveforge.checkpoint import writer

    _needs_direct_io(tmp_path)
    monkeypatch.setattr(writer, "STAGE", 4 * writer.DIRECT_ALIGN)
    monkeypatch.setattr(writer, "_refused_direct", set())
    obj = _odd_tensors()
    expected = writer._write_buffered(obj, tmp_path / "expected.pt")

    def einval(fd: int, data: object, offset: int) -> int:
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(writer.os, "pwrite", einval)
    assert writer._write_torch(obj, tmp_path / "a.pt") == expected
    assert writer._write_torch(obj, tmp_path / "b.pt") == expected
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "expected.pt").read_bytes()
    err = capsys.readouterr().err
    assert err.count("are refused (Invalid argument)") == 1 and "a.pt" in err
