"""Data component: make_shards (folder/zip/synthetic), manifest, plain tar/webdataset compatibility, the
streaming loader's exact resume across world sizes and workers, error handling, FID iteration."""

from __future__ import annotations

import collections
import io
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from waveforge import config, data
from waveforge.data import (
    DataError,
    ShardLoader,
    ensure_dataset,
    iterate_dataset,
    make_shards,
    read_manifest,
    synthetic_image,
)

ROOT = Path(__file__).resolve().parents[1]
N, G, RES = 300, 16, 16  # 300 samples: not a multiple of the 16 streams, so epochs do not align with batches


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("data") / "synth")
    make_shards("synthetic", out, RES, num_samples=N, samples_per_shard=23, workers=2, progress=False)
    return out


def run_keys(url: str, world: int, steps: int, *, state: dict | None = None, num_workers: int = 0,
             grad_accum: int = 1, window: int = 0, global_batch: int = G) -> tuple[list[list[str]], dict]:
    """Global batches (lists of keys, rank 0's share first) of `steps` steps from `state`, ranks simulated."""
    loaders = [ShardLoader(url, global_batch=global_batch, rank=r, world=world, grad_accum=grad_accum,
                           num_workers=num_workers, shuffle_window=window, seed=3) for r in range(world)]
    if state is not None:
        for ld in loaders:
            ld.load_state_dict(json.loads(json.dumps(state)))  # the state survives JSON
    batches = []
    for _ in range(steps):
        keys = []
        for ld in loaders:
            micro = ld.next_step()
            assert len(micro) == grad_accum
            for mb in micro:
                assert mb["image"].shape == (global_batch // (world * grad_accum), 3, RES, RES)
                assert mb["image"].dtype == torch.uint8
                keys += mb["key"]
        batches.append(keys)
    states = [ld.state_dict() for ld in loaders]
    assert all(s == states[0] for s in states), "the state must not depend on the rank"
    for ld in loaders:
        ld.close()
    return batches, states[0]


# --------------------------------------------------------------------------------------------------
# make_shards
# --------------------------------------------------------------------------------------------------


def test_shards_readable_by_plain_tar_and_webdataset(synth):
    m = json.loads(Path(synth, "index.json").read_text())
    assert m["total_samples"] == N and m["resolution"] == RES and m["encoding"] == "png"
    assert sum(s["samples"] for s in m["shards"]) == N and len(m["shards"]) == m["num_shards"] == 14
    assert m["skipped"] == {"count": 0, "names": []}
    names = []
    for s in m["shards"]:
        path = Path(synth, s["name"])
        assert path.stat().st_size == s["bytes"]
        listing = subprocess.run(["tar", "tf", str(path)], check=True, capture_output=True, text=True).stdout.split()
        assert len([n for n in listing if n.endswith(".png")]) == s["samples"]
        names += listing
    keys = [n.split(".")[0] for n in names if n.endswith(".png")]
    assert keys == sorted(keys) and len(set(keys)) == N  # unique and sortable

    import webdataset as wds

    urls = [str(Path(synth, s["name"])) for s in m["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("rgb8"))
    assert len(samples) == N
    assert samples[0]["png"].shape == (RES, RES, 3) and samples[0]["json"]["source"] == "synthetic/000000000"


def _tar_bytes(files: list[tuple[str, bytes | None]], fmt: int = tarfile.USTAR_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, body in files:
            info = tarfile.TarInfo(name)
            if body is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(body)
                tar.addfile(info, io.BytesIO(body))
    return buf.getvalue()


def test_parse_tar_groups_samples_as_webdataset_does(synth):
    """The loader's own tar scan gives webdataset's samples (keys, extensions, bytes) for make_shards' shards
    and for hand-made tars: directories, __meta__ files, names long enough for the ustar prefix field, mixed
    case extensions, and a pax archive (which goes through webdataset's iterator); truncation is an error."""
    import gc

    import webdataset.tariterators as wti

    from waveforge.data.tar import parse_tar

    def reference(data: bytes, url: str) -> list[dict]:
        files = [{**f, "__url__": url} for f in wti.tar_file_iterator(io.BytesIO(data))]
        return [{k: (bytes(v) if k not in ("__key__", "__url__") else v) for k, v in s.items()}
                for s in wti.group_by_keys(files)]

    def ours(data: bytes, url: str) -> list[dict]:
        return [{k: (bytes(v) if k not in ("__key__", "__url__") else v) for k, v in s.items()}
                for s in parse_tar(data, url)]

    shard = Path(synth, json.loads(Path(synth, "index.json").read_text())["shards"][0]["name"]).read_bytes()
    assert ours(shard, "u") == reference(shard, "u") and len(ours(shard, "u")) > 1
    deep = "d" * 90 + "/" + "e" * 60 + "/sample7"
    files = [("top", None), ("a/000.png", b"png0"), ("a/000.json", b"{}"), ("__meta__.json", b"meta"),
             ("__info__/x.json", b"skipped"),
             ("a/001.PNG", b"png1"), ("a/001.cls", b"3"), (deep + ".webp", b"w" * 700), (deep + ".txt", b"t"),
             ("a/002.seg.png", b"s")]
    for fmt in (tarfile.USTAR_FORMAT, tarfile.PAX_FORMAT):
        data = _tar_bytes(files, fmt)
        assert ours(data, "x") == reference(data, "x")
    got = parse_tar(_tar_bytes(files), "x")
    assert [s["__key__"] for s in got] == ["a/000", "__meta__", "a/001", deep, "a/002"]
    assert got[2]["png"] == b"png1" and got[4]["seg.png"] == b"s"
    assert isinstance(got[0]["png"], bytearray)  # writable, its own copy
    assert not any(gc.is_tracked(s) for s in got)  # dicts of str and bytearray: no work for the cyclic GC
    with pytest.raises(tarfile.ReadError):
        parse_tar(shard[: len(shard) // 2 + 700], "x")
    with pytest.raises(ValueError, match="duplicate"):
        parse_tar(_tar_bytes([("k.png", b"1"), ("k.png", b"2")]), "x")


def test_synthetic_images_are_pure_functions():
    a, b = synthetic_image(7, 11, 24), synthetic_image(7, 11, 24)
    assert a.dtype == np.uint8 and a.shape == (24, 24, 3) and np.array_equal(a, b)
    assert not np.array_equal(a, synthetic_image(8, 11, 24)) and not np.array_equal(a, synthetic_image(7, 12, 24))
    assert synthetic_image(0, 0, 37).shape == (37, 37, 3) and a.std() > 5


def _image_folder(root: Path) -> dict[str, int]:
    """A folder tree with valid images of several modes/sizes and three unreadable files."""
    rng = np.random.default_rng(0)
    (root / "b" / "deep").mkdir(parents=True)
    valid = {"a1.png": (40, 30, "RGB"), "a2.jpg": (31, 64, "RGB"), "b/c.webp": (20, 20, "RGB"),
             "b/deep/d.png": (50, 17, "RGBA"), "b/deep/e.png": (33, 33, "L"), "f.JPEG": (16, 16, "RGB")}
    for name, (w, h, mode) in valid.items():
        arr = rng.integers(0, 255, (h, w, len(mode)), dtype=np.uint8)
        Image.fromarray(arr.squeeze() if mode == "L" else arr).save(root / name)
    (root / "bad.jpg").write_bytes(b"this is not an image")
    good = (root / "a1.png").read_bytes()
    (root / "b" / "truncated.png").write_bytes(good[: len(good) // 3])
    (root / "b" / "empty.webp").write_bytes(b"")
    (root / "notes.txt").write_text("ignored: not an image extension")
    return {"valid": len(valid), "bad": 3}


def test_corrupt_images_are_skipped_and_counted(tmp_path):
    counts = _image_folder(tmp_path / "src")
    s = make_shards(str(tmp_path / "src"), str(tmp_path / "out"), 8, samples_per_shard=2, progress=False)
    assert s["samples"] == counts["valid"] and s["skipped"] == counts["bad"]
    assert sorted(s["skipped_names"]) == ["b/empty.webp", "b/truncated.png", "bad.jpg"]
    m = read_manifest(str(tmp_path / "out"))
    assert m["skipped"]["count"] == 3 and m["total_samples"] == counts["valid"]
    imgs = torch.cat(list(iterate_dataset(str(tmp_path / "out"), rank=0, world=1, batch_size=4)))
    assert imgs.shape == (counts["valid"], 3, 8, 8) and imgs.dtype == torch.uint8


def test_rerun_skips_complete_shards_and_redoes_damaged_ones(tmp_path):
    out = str(tmp_path / "out")
    first = make_shards("synthetic", out, 8, num_samples=40, samples_per_shard=10, workers=2, progress=False)
    assert first["written_shards"] == 4
    index = Path(out, "index.json").read_bytes()
    again = make_shards("synthetic", out, 8, num_samples=40, samples_per_shard=10, workers=2, progress=False)
    assert again["written_shards"] == 0 and again["reused_shards"] == 4
    shard = Path(out, "shard-000002.tar")
    shard.write_bytes(shard.read_bytes()[:-1024])  # damaged: size/checksum no longer match
    Path(out, "_parts", "shard-000001.json").unlink()  # an interrupted shard (no completion record)
    fixed = make_shards("synthetic", out, 8, num_samples=40, samples_per_shard=10, workers=2, progress=False)
    assert fixed["written_shards"] == 2 and Path(out, "index.json").read_bytes() == index  # byte-identical
    with pytest.raises(config.ConfigError, match="other settings"):
        make_shards("synthetic", out, 16, num_samples=40, samples_per_shard=10, progress=False)


def test_zip_source(tmp_path):
    rng = np.random.default_rng(1)
    with zipfile.ZipFile(tmp_path / "imgs.zip", "w") as z:
        for i in range(7):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (12 + i, 20, 3), dtype=np.uint8)).save(buf, "PNG")
            z.writestr(f"set/{i:02d}.png", buf.getvalue())
        z.writestr("set/broken.png", b"garbage")
        z.writestr("readme.md", b"not an image")
    s = make_shards(str(tmp_path / "imgs.zip"), str(tmp_path / "out"), 8, encoding="jpg", quality=90,
                    samples_per_shard=3, progress=False)
    assert s["samples"] == 7 and s["shards"] == 3 and s["skipped_names"] == ["set/broken.png"]
    with tarfile.open(tmp_path / "out" / "shard-000000.tar") as t:
        assert t.getnames()[:2] == ["000000000.jpg", "000000000.json"]


def test_cli_runs_and_rejects_bad_input(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    job = [sys.executable, str(ROOT / "jobs" / "make_shards.py")]
    ok = subprocess.run(job + ["source=synthetic", "num_samples=20", f"output={tmp_path / 'o'}", "resolution=8",
                               "samples_per_shard=8", "--json"], capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["shards"] == 3
    bad = subprocess.run(job + ["source=synthetic", f"output={tmp_path / 'o'}", "resolution=8", "encodng=png"],
                         capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "did you mean encoding" in bad.stderr


# --------------------------------------------------------------------------------------------------
# The loader: order, resume, workers
# --------------------------------------------------------------------------------------------------


def test_epochs_cover_every_sample_once(synth):
    batches, _ = run_keys(synth, 1, 75)  # 75 x 16 = 4 epochs of 300 (the streams realign after 4 epochs)
    flat = [k for b in batches for k in b]
    assert len(set(flat[: (N // G) * G])) == (N // G) * G  # no repeat inside the first epoch
    assert set(collections.Counter(flat).values()) == {4} and len(set(flat)) == N
    epoch0, epoch1 = flat[:N], flat[N: 2 * N]
    assert epoch0 != epoch1  # a fresh permutation every epoch


@pytest.mark.parametrize("w0,w1", [(1, 1), (2, 2), (2, 1), (1, 2)])
def test_resume_is_exact_across_world_sizes(synth, w0, w1):
    full, _ = run_keys(synth, 1, 45)
    for stop in (1, 18, 19, 30):  # mid-epoch, right at and across the epoch boundary (300/16 = 18.75 batches)
        head, state = run_keys(synth, w0, stop)
        tail, _ = run_keys(synth, w1, 45 - stop, state=state)
        assert state["step"] == stop and head + tail == full, (w0, w1, stop)


def test_resume_with_workers_and_shuffle_window(synth):
    full, _ = run_keys(synth, 1, 40, window=50)
    two, _ = run_keys(synth, 2, 40, window=50, num_workers=2)
    assert two == full  # workers never change the order
    head, state = run_keys(synth, 2, 13, window=50, num_workers=2)
    tail, _ = run_keys(synth, 1, 27, window=50, state=state, num_workers=2)
    assert head + tail == full
    flat = [k for b in full for k in b]
    assert len(set(flat[:288])) == 288
    plain, _ = run_keys(synth, 1, 40)
    assert plain != full  # the window changes the order (mixing across shards)


def test_micro_batches_images_and_flips(synth):
    ld = ShardLoader(synth, global_batch=G, rank=1, world=2, grad_accum=4, seed=3, hflip=True)
    micro = ld.next_step()
    assert len(micro) == 4 and all(mb["image"].shape == (2, 3, RES, RES) for mb in micro)
    x = torch.cat([mb["image"] for mb in micro])
    assert x.dtype == torch.uint8
    f = data.normalize(x.clone())
    assert f.min() >= -1 and f.max() <= 1 and f.std() > 0.1
    torch.testing.assert_close(f, x.float() / 127.5 - 1)
    noflip = ShardLoader(synth, global_batch=G, rank=1, world=2, grad_accum=4, seed=3, hflip=False)
    y = torch.cat([mb["image"] for mb in noflip.next_step()])
    flipped = [bool(torch.equal(a, b.flip(-1))) and not torch.equal(a, b) for a, b in zip(x, y)]
    assert 0 < sum(flipped) < len(flipped) and all(torch.equal(a, b) or f for a, b, f in zip(x, y, flipped))
    assert ld.stats() == {"corrupt_samples": 0, "missing_shards": 0, "read_retries": 0,
                          "shards_read": ld.stats()["shards_read"], "bytes_read": ld.stats()["bytes_read"]}


def test_worker_batches_equal_in_process_batches_and_stay_valid(synth):
    """Workers write batches into shared-memory slots that next_step hands out in place: every batch a caller
    keeps stays intact while the workers go on (a slot is written again only once no tensor uses it; a
    caller that keeps many gets copies, never a stall), and once the caller drops its batches their slots
    come back."""
    from waveforge.data.loader import _AHEAD_MIN, _RING_SLOTS

    ref = ShardLoader(synth, global_batch=G, rank=0, world=1, seed=5)
    want = [torch.cat([mb["image"] for mb in ref.next_step()]) for _ in range(24)]
    ld = ShardLoader(synth, global_batch=G, rank=0, world=1, seed=5, num_workers=2)
    slots = {a.ctypes.data for a in ld._slots}
    kept = [ld.next_step()[0]["image"] for _ in range(12)]  # twice as many steps as there are slots
    ptrs = [x.data_ptr() for x in kept]
    lent = _RING_SLOTS - _AHEAD_MIN
    assert set(ptrs[:lent]) <= slots and not set(ptrs[lent:]) & slots and len(set(ptrs)) == 12
    assert all(torch.equal(x, y) for x, y in zip(kept, want))
    del kept
    ptrs = []
    for y in want[12:]:  # each batch dropped at once: in place again, in the slots
        x = ld.next_step()[0]["image"]
        assert torch.equal(x, y)
        ptrs.append(x.data_ptr())
    assert set(ptrs) <= slots
    ld.close()


def test_worker_failures_reach_the_caller(synth, tmp_path):
    """A worker's error is raised by next_step (same type and message), a killed worker is a DataError
    within seconds, not a hang, and close() leaves no worker process behind."""
    import signal
    import time

    url = _copy_dataset(synth, tmp_path / "w")
    Path(url, "shard-000004.tar").write_bytes(b"garbage" * 100)  # unreadable: with on_error=fail, an error
    strict = ShardLoader(url, global_batch=G, rank=0, world=1, num_workers=2, on_error="fail", seed=3)
    with pytest.raises(DataError, match="shard-000004"):
        for _ in range(40):
            strict.next_step()
    strict.close()
    ld = ShardLoader(synth, global_batch=G, rank=0, world=1, num_workers=2, seed=3)
    ld.next_step()
    pids = ld.worker_pids()
    assert len(pids) == 2
    os.kill(pids[1], signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(DataError, match="exited unexpectedly"):
        for _ in range(20):  # the steps it finished before dying still arrive
            ld.next_step()
    assert time.monotonic() - start < 30
    ld.close()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_stop_signals_are_the_trainers_not_the_workers(synth):
    """Slurm sends USR2 and TERM to every process of a job and Ctrl-C reaches the whole process group: the
    loader's workers and multiprocessing's resource tracker ignore them (the trainer handles them), so a
    stop signal neither kills a worker under the collective checkpoint nor relaunches the tracker."""
    import signal
    import time
    from multiprocessing import resource_tracker

    ld = ShardLoader(synth, global_batch=G, rank=0, world=1, num_workers=2, seed=3)
    ld.next_step()
    pids = ld.worker_pids()
    tracker = resource_tracker._resource_tracker._pid  # noqa: SLF001 - the tracker's pid, for this check only
    assert tracker is not None
    for pid in [*pids, tracker]:
        for sig in (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT):
            os.kill(pid, sig)
    time.sleep(0.5)
    for _ in range(5):
        ld.next_step()
    for pid in [*pids, tracker]:
        os.kill(pid, 0)  # still alive
    assert resource_tracker._resource_tracker._pid == tracker  # noqa: SLF001 - not relaunched
    ld.close()


def test_sigkill_leaves_nothing_in_dev_shm(synth, tmp_path):
    """A trainer killed with SIGKILL together with its loader workers, forkserver and resource tracker (its
    whole process group) leaves no POSIX semaphore or shared-memory file behind."""
    import signal
    import subprocess
    import sys
    import time

    before = set(os.listdir("/dev/shm"))
    code = ("from waveforge.data import ShardLoader\n"
            f"ld = ShardLoader({synth!r}, global_batch={G}, rank=0, world=1, num_workers=2, seed=3)\n"
            "for _ in range(3):\n    ld.next_step()\n"
            "print('READY', flush=True)\nimport time\ntime.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "READY"
        during = set(os.listdir("/dev/shm")) - before
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    time.sleep(1.0)
    left = {n for n in set(os.listdir("/dev/shm")) - before if n.startswith(("sem.", "torch_", "psm_", "wnsm_"))}
    assert not left, f"left in /dev/shm after SIGKILL: {sorted(left)} (while running: {sorted(during)})"


def test_worker_waits_for_its_next_slot_to_be_named():
    """A worker writes a step only into the slot the main process named for it (none named: it waits), and
    stops waiting when the loader closes."""
    import multiprocessing as mp
    import threading

    from waveforge.data.loader import _Ring, _Stopped

    ctx = mp.get_context("spawn")
    buf = torch.zeros((3, 4, 2, 2, 3), dtype=torch.uint8)
    todo, name = ctx.Pipe(duplex=False)
    ring = _Ring(buf, 1, 3, todo, ctx.Event())
    got: list = []
    t = threading.Thread(target=lambda: got.append(ring.acquire()))
    t.start()
    t.join(0.7)
    assert t.is_alive() and not got  # nothing named yet: the writer waits
    name.send(2)
    t.join(5)
    assert not t.is_alive() and ring.slot == 2 and got[0].shape == (2, 2, 2, 3)
    got[0][:] = 7
    assert buf[2, 1:3].eq(7).all() and buf[2, 0].eq(0).all() and buf[:2].eq(0).all()  # its rows of slot 2
    ring.stop.set()
    with pytest.raises(_Stopped):
        ring.acquire()


def test_decoders_agree_and_pil_takes_what_torchvision_rejects():
    from waveforge.data.decode import _decode_pil, _decode_torchvision, decode_hwc, decode_image

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    images = {"RGB": Image.fromarray(rgb), "RGBA": Image.fromarray(rgb).convert("RGBA"),
              "L": Image.fromarray(rgb).convert("L"), "P": Image.fromarray(rgb).quantize(16)}
    for mode, im in images.items():
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        tv, pil = _decode_torchvision(buf.getvalue()), _decode_pil(buf.getvalue(), "png")
        assert tv is not None and torch.equal(tv, pil), mode  # the same pixels from either decoder
        assert tv.shape == (8, 8, 3) and tv.is_contiguous() and pil.is_contiguous()  # HWC, one memcpy to a batch
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=95)
    tv, pil = _decode_torchvision(buf.getvalue()), _decode_pil(buf.getvalue(), "jpg")
    assert tv is not None and (tv.int() - pil.int()).abs().max() <= 2  # libjpeg builds may round apart
    buf = io.BytesIO()
    Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(buf, format="PNG")  # mode I;16
    assert _decode_torchvision(buf.getvalue()) is None  # 16-bit: torchvision gives uint16, PIL converts
    img = decode_image({"png": buf.getvalue()}, 8)
    assert img is not None and img.dtype == torch.uint8 and img.shape == (3, 8, 8)
    flipped = decode_image({"png": buf.getvalue()}, 8, flip=True)
    assert torch.equal(flipped, img.flip(-1))
    assert torch.equal(decode_hwc({"png": buf.getvalue()}, 8, flip=True), img.permute(1, 2, 0).flip(1))
    assert decode_hwc({"png": buf.getvalue()}, 8, flip=True).is_contiguous()
    assert decode_image({"png": b"not a png"}, 8) is None and decode_image({"png": buf.getvalue()}, 16) is None


def test_geometry_errors(synth):
    with pytest.raises(config.ConfigError, match=r"number of ranks \(3\) must divide 16"):
        ShardLoader(synth, global_batch=G, rank=0, world=3)
    with pytest.raises(config.ConfigError, match="needs 32 px"):
        ShardLoader(synth, global_batch=G, rank=0, world=1, resolution=32)
    with pytest.raises(config.ConfigError, match="make_shards"):
        ShardLoader(synth + "-nothing", global_batch=G, rank=0, world=1)
    ld = ShardLoader(synth, global_batch=G, rank=0, world=1)
    with pytest.raises(config.ConfigError, match="global_batch"):
        ld.load_state_dict({**ld.state_dict(), "global_batch": 32})


def test_fewer_shards_than_streams(tmp_path):
    out = str(tmp_path / "few")
    make_shards("synthetic", out, 8, num_samples=37, samples_per_shard=15, progress=False)  # 3 shards, 16 streams
    loaders = [ShardLoader(out, global_batch=16, rank=r, world=2) for r in range(2)]
    flat = [k for _ in range(37) for ld in loaders for mb in ld.next_step() for k in mb["key"]]
    assert set(collections.Counter(flat).values()) == {16}  # 16 epochs, every sample once in each


# --------------------------------------------------------------------------------------------------
# Errors: corrupt samples, missing shards, cache
# --------------------------------------------------------------------------------------------------


def _copy_dataset(src: str, dst: Path) -> str:
    dst.mkdir()
    for p in Path(src).iterdir():
        if p.is_file():
            (dst / p.name).write_bytes(p.read_bytes())
    return str(dst)


def _garble(url: str, shard: str, member: str) -> None:
    """Replace one member of a shard by bytes that are not an image (the tar itself stays valid)."""
    path = Path(url, shard)
    buf = io.BytesIO()
    with tarfile.open(path) as src, tarfile.open(fileobj=buf, mode="w") as dst:
        for info in src.getmembers():
            raw = src.extractfile(info).read()
            if info.name == member:
                raw = b"not a png" * 10
                info.size = len(raw)
            dst.addfile(info, io.BytesIO(raw))
    path.write_bytes(buf.getvalue())


def test_corrupt_sample_is_replaced_and_counted(synth, tmp_path):
    url = _copy_dataset(synth, tmp_path / "c")
    _garble(url, "shard-000004.tar", "000000095.png")
    batches, _ = run_keys(url, 1, 19)
    flat = [k for b in batches for k in b]
    assert "000000095" not in flat[: (N // G) * G] and len(flat) == 19 * G
    ld = ShardLoader(url, global_batch=G, rank=0, world=1)
    for _ in range(19):
        ld.next_step()
    assert ld.stats()["corrupt_samples"] == 1
    strict = ShardLoader(url, global_batch=G, rank=0, world=1, on_error="fail")
    with pytest.raises(DataError, match=r"sample 000000095 of shard .*shard-000004\.tar"):
        for _ in range(19):
            strict.next_step()


@pytest.mark.parametrize("num_workers", [0, 2])
def test_deferred_flip_gives_the_same_normalized_batches(synth, tmp_path, num_workers):
    """defer_flip hands out unflipped images and flip bits; normalize(image, flip) mirrors them: the same
    float batches as flipping in the loader, also for the samples that replace a corrupt sample and a
    missing shard's samples."""
    url = _copy_dataset(synth, tmp_path / "d")
    Path(url, "shard-000007.tar").unlink()
    _garble(url, "shard-000004.tar", "000000095.png")
    kw = dict(global_batch=G, rank=0, world=1, grad_accum=2, seed=4, num_workers=num_workers)
    here, later = ShardLoader(url, **kw), ShardLoader(url, defer_flip=True, **kw)
    flips = []
    for _ in range(19):  # more than an epoch
        for a, b in zip(here.next_step(), later.next_step()):
            assert a["key"] == b["key"] and b["flip"].dtype == torch.bool and b["flip"].shape == (len(b["key"]),)
            torch.testing.assert_close(data.normalize(b["image"], b["flip"]), data.normalize(a["image"]),
                                       rtol=0, atol=0)
            assert torch.equal(a["image"][~b["flip"]], b["image"][~b["flip"]])
            flips += b["flip"].tolist()
            assert "flip" not in a
    assert 0.3 < sum(flips) / len(flips) < 0.7
    assert later.stats()["corrupt_samples"] >= 1 and later.stats()["missing_shards"] >= 1
    here.close()
    later.close()


def test_missing_shard_is_reported_and_skipped(synth, tmp_path):
    url = _copy_dataset(synth, tmp_path / "m")
    Path(url, "shard-000007.tar").unlink()
    ld = ShardLoader(url, global_batch=G, rank=0, world=1, num_workers=2)
    flat = [k for _ in range(19) for mb in ld.next_step() for k in mb["key"]]
    assert len(flat) == 19 * G and not any("000000161" <= k <= "000000183" for k in flat)
    assert ld.stats()["missing_shards"] >= 1  # once per reading worker and epoch
    ld.close()
    strict = ShardLoader(url, global_batch=G, rank=0, world=1, on_error="fail")
    with pytest.raises(DataError, match="shard-000007.tar"):
        for _ in range(19):
            strict.next_step()


def test_shard_that_no_longer_matches_the_manifest_is_reported(synth, tmp_path):
    url = _copy_dataset(synth, tmp_path / "c")
    with open(Path(url, "shard-000007.tar"), "ab") as f:  # still a valid tar, but not the one the manifest lists
        f.write(bytes(1024))
    strict = ShardLoader(url, global_batch=G, rank=0, world=1, on_error="fail")
    with pytest.raises(DataError, match="shard-000007.tar.*manifest lists"):
        for _ in range(19):
            strict.next_step()


def test_cache_dir_gives_the_same_batches(synth, tmp_path):
    a, _ = run_keys(synth, 1, 20)
    ld = ShardLoader(synth, global_batch=G, rank=0, world=1, seed=3, cache_dir=str(tmp_path / "cache"))
    b = [[k for mb in ld.next_step() for k in mb["key"]] for _ in range(20)]
    assert a == b and len(list((tmp_path / "cache").rglob("*.tar"))) == 14


def test_workers_read_a_shared_shard_once(tmp_path):
    """Neighbouring streams share a shard: with 2 workers one epoch still reads each shard once, not once per
    worker (8 shards of 40 samples, 16 streams of 20 samples: every shard is split between two streams)."""
    out = str(tmp_path / "pairs")
    make_shards("synthetic", out, 8, num_samples=320, samples_per_shard=40, progress=False)
    ld = ShardLoader(out, global_batch=16, rank=0, world=1, num_workers=2, seed=0, hflip=False)
    keys = [k for _ in range(20) for mb in ld.next_step() for k in mb["key"]]  # one epoch
    reads = ld.stats()["shards_read"]
    ld.close()
    assert len(keys) == len(set(keys)) == 320  # the whole epoch, each sample once
    # 8 for the epoch; the rest are the next epoch's first shards, read ahead (some already cached).
    assert 8 <= reads < 16, reads


# --------------------------------------------------------------------------------------------------
# FID iteration and the trainer's dataset hook
# --------------------------------------------------------------------------------------------------


def test_iterate_dataset_visits_each_sample_once(synth):
    whole = torch.cat(list(iterate_dataset(synth, rank=0, world=1, batch_size=64)))
    assert whole.shape == (N, 3, RES, RES) and whole.dtype == torch.uint8
    parts = [torch.cat(list(iterate_dataset(synth, rank=r, world=3, batch_size=7, num_samples=100)))
             for r in range(3)]
    assert sum(p.shape[0] for p in parts) == 100 and torch.equal(torch.cat(parts), whole[:100])


def test_worker_server_starts_early_without_importing_torch_here(run_python):
    """jobs/train.py launches the workers' forkserver before it imports torch: the launch itself must not
    import torch (or wait for the server), and the server must be the one the loader's workers come from."""
    out = run_python(
        "import os, sys\n"
        "from waveforge.data import start_worker_server\n"
        "start_worker_server()\n"
        "import multiprocessing.forkserver as fsv\n"
        "pid = fsv._forkserver._forkserver_pid\n"
        "print('torch' in sys.modules, pid is not None and os.path.exists(f'/proc/{pid}'))\n"
        "from waveforge.data import worker_context\n"
        "p = worker_context().Process(target=print, args=('from the server',))\n"
        "p.start(); p.join()\n"
        "print(fsv._forkserver._forkserver_pid == pid, p.exitcode)\n")
    assert out.stdout.split() == ["False", "True", "from", "the", "server", "True", "0"]


def test_ensure_dataset_draws_synthetic_set_once(tmp_path, monkeypatch):
    """The embedded default draws its synthetic set into the recipe's own data.url (relative: under the working
    folder), once; any other data.url without a data set is an error naming it, never a synthetic set."""
    monkeypatch.chdir(tmp_path)
    cfg = config.load("tiny", {"data.synthetic_samples": 70, "model.resolution": 16})
    murl = ensure_dataset(cfg)
    assert murl == "data/synthetic-32/index.json" and read_manifest("data/synthetic-32")["total_samples"] == 70
    mtime = Path(murl).stat().st_mtime_ns
    assert ensure_dataset(cfg) == murl and Path(murl).stat().st_mtime_ns == mtime
    assert ensure_dataset(config.load("tiny", {"data.url": str(tmp_path / "data/synthetic-32")}))  # same place
    typo = str(tmp_path / "typo")  # a typo is not training data
    with pytest.raises(config.ConfigError, match=f"data.url={typo}: no data set there"):
        ensure_dataset(config.load("tiny", {"data.url": typo}))
    assert not (tmp_path / "typo").exists()
    with pytest.raises(config.UserError):  # not a synthetic set in a bucket either (here: no credentials)
        ensure_dataset(config.load("tiny", {"data.url": "s3://datasets/does-not-exist", "data.retries": 0,
                                            "storage.endpoint_url": "http://127.0.0.1:9"}))
    cfg2 = config.load("tiny", {"data.url": str(tmp_path / "none"), "data.synthetic_if_missing": False})
    with pytest.raises(config.ConfigError, match="make_shards"):
        ensure_dataset(cfg2)


# --------------------------------------------------------------------------------------------------
# Storage: options, transient errors, unreachable endpoints
# --------------------------------------------------------------------------------------------------


def test_storage_options_from_recipe_or_environment(monkeypatch):
    from waveforge import storage
    from waveforge.config import StorageConfig

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://env:1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "envkey")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "envsecret")
    opts = storage.storage_options(None, "s3://b/x")
    assert opts["client_kwargs"]["endpoint_url"] == "http://env:1" and opts["key"] == "envkey"
    opts = storage.storage_options(StorageConfig(endpoint_url="http://cfg:2", access_key="k", secret_key="s",
                                                 region="eu-1"), "s3://b/x")
    assert opts["client_kwargs"] == {"endpoint_url": "http://cfg:2", "region_name": "eu-1"}
    assert (opts["key"], opts["secret"]) == ("k", "s") and storage.storage_options(None, "/tmp/x") == {}


@pytest.mark.parametrize("url", ["file://rel/a.bin", "rel/a.bin", "file://~/a.bin", "file://{tmp}/abs/a.bin"])
def test_local_urls_are_written_where_they_are_read(tmp_path, monkeypatch, url):
    from waveforge import storage

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    url = url.format(tmp=tmp_path)
    storage.write_bytes(url, b"payload")
    assert storage.read_bytes(url) == b"payload"  # written through local_path, read through fsspec
    where = {"file://rel/a.bin": "rel/a.bin", "rel/a.bin": "rel/a.bin", "file://~/a.bin": "home/a.bin"}
    assert (tmp_path / where.get(url, "abs/a.bin")).read_bytes() == b"payload"


def test_unreachable_endpoint_is_a_clear_error():
    from waveforge import storage
    from waveforge.config import StorageConfig

    dead = StorageConfig(endpoint_url="http://127.0.0.1:9", access_key="a", secret_key="b")
    with pytest.raises(storage.StorageError, match=r"s3://bucket/x .*unreachable.*endpoint"):
        storage.with_retries(lambda: storage.filesystem("s3://bucket/x", dead)[0].cat_file("bucket/x"),
                             "s3://bucket/x", "reading", retries=1, scfg=dead, base_delay=0.05)


def test_transient_read_errors_are_retried(synth, monkeypatch):
    from fsspec.implementations.local import LocalFileSystem

    from waveforge import storage

    expected, _ = run_keys(synth, 1, 3)
    monkeypatch.setattr(storage, "BASE_DELAY_S", 0.01)
    real, calls = LocalFileSystem.cat_file, {"n": 0}

    def flaky(self, path, *args, **kw):  # the first two shard reads fail like a dropped connection
        if str(path).endswith(".tar"):
            calls["n"] += 1
            if calls["n"] <= 2:
                raise ConnectionResetError("connection reset by peer (injected)")
        return real(self, path, *args, **kw)

    monkeypatch.setattr(LocalFileSystem, "cat_file", flaky)
    ld = ShardLoader("file://" + synth + "/index.json", global_batch=G, rank=0, world=1, seed=3)
    got = [[k for mb in ld.next_step() for k in mb["key"]] for _ in range(3)]
    assert got == expected and ld.stats()["read_retries"] == 2
