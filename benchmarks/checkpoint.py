"""Checkpoint speed: save/load of real-sized DeepSpeed engines vs plain torch.save/torch.load of the same
tensors to the same disk, and the training stall caused by a background upload to SeaweedFS.

    .venv/bin/python benchmarks/checkpoint.py [dir=/tmp/wf-ckpt-bench] [upload=1] [repeats=2]
        [resume_repeats=5] [upload_cases=200:19,20:10] [upload_window_s=60] [big=1]

One process (world size 1), CPU, ZeRO-2, bf16. Cases:
  celebahq256: G + D engines built from the recipe's model section (waveforge.models)
  celebahq1024: the 1024 px generator alone (G engine)
For each, in alternating rounds (the minimum of each is reported): a synchronous save (`Saver(background=False)`, a
run's saver with checkpoint.background=false: shards + EMA + RNG written in parallel, the torch.save files with
O_DIRECT, BLAKE3 while writing, fsync, atomic publish; the pruned checkpoint's files removed in its background
thread), a background save (`Saver(background=True)`: the stall is the time save() takes, the snapshot; then the
time until it is published), plain torch.save (+ fsync) of a dict of the same tensors (16-bit weights, fp32 master,
Adam moments, EMA: the limit of the disk and the serializer) and a clone of those tensors (the "device-to-host copy"
the stall is compared with; the trainer's save also computes `weights_checksum`, a float64 sum of every weight,
before the snapshot: `trainer_stall_vs_clone` counts it); then verification (`checkpoint.verify`, what a resume does
before loading) + load against plain torch.load. Reads come from the page cache unless the machine is short of
memory (the checkpoint's files, written with O_DIRECT, are read from disk by the first verification; the minimum of
the rounds is a page-cache read like plain torch.load's). Then a resume in the trainer's order (`bench_resume`: the
check starts in the background, the models and engines are built meanwhile, then the load): the seconds verification
adds to it, started first as the trainer does and, for comparison, run before building. The upload: time per step of
a small training loop (a CPU MLP step) alone and while the Uploader's process copies the celebahq256 checkpoint to a
private `weed mini` (127.0.0.1, free ports; the server runs at normal priority and its CPU is not the upload's), the
upload's MB/s, and the upload process's CPU seconds per GB (getrusage in that process; its start-up, mostly imports,
reported apart), once per upload case MB_S:NICE (checkpoint.upload_mb_s, 0 = unbounded : checkpoint.upload_nice).
The training loop keeps both cores busy, so a nice-19 upload advances slowly: the step times are taken for at most
upload_window_s, then the upload finishes without training (upload_done_while_training says which).
"""

from __future__ import annotations

import copy
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import NoReturn

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))
for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
    os.environ.setdefault(k, v)

import torch  # noqa: E402

from waveforge import checkpoint, config, models, storage  # noqa: E402
from waveforge.checkpointer import weights_checksum  # noqa: E402
from waveforge.config import StorageConfig  # noqa: E402
from waveforge.runtime import free_port  # noqa: E402

WORK = Path(tempfile.gettempdir()) / "wf-ckpt-bench"  # the benchmark's folder: this default, or dir= (main)


def engine(net: torch.nn.Module, step: bool = True) -> object:
    """A ZeRO-2 bf16 engine; with `step`, its Adam state exists (one step on zero gradients, no forward pass)."""
    import deepspeed

    cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
           "optimizer": {"type": "Adam", "params": {"lr": 1e-4, "torch_adam": True}},
           "zero_optimization": {"stage": 2}, "bf16": {"enabled": True}, "steps_per_print": 10**9}
    eng, *_ = deepspeed.initialize(model=net, model_parameters=list(net.parameters()), config=cfg)
    if not step:
        return eng
    loss = sum(p.float().sum() for p in eng.module.parameters()) * 0.0
    eng.backward(loss)
    eng.step()
    return eng


def plain_tensors(engines: dict, ema: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The same tensors a checkpoint holds: 16-bit weights, fp32 master weights, Adam moments, EMA."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    out = {}
    for tag, eng in engines.items():
        for name, p in eng.module.named_parameters():
            out[f"{tag}.w.{name}"] = p.detach().clone()
            out[f"{tag}.fp32.{name}"] = safe_get_full_fp32_param(p).clone()
            out[f"{tag}.m.{name}"] = safe_get_full_optimizer_state(p, "exp_avg").clone()
            out[f"{tag}.v.{name}"] = safe_get_full_optimizer_state(p, "exp_avg_sq").clone()
    for name, t in ema.state_dict().items():
        out[f"ema.{name}"] = t.clone()
    return out


def quiet() -> None:
    """Wait until the savers' background removal of pruned checkpoints (`.tmp-delete-*` folders) is over and
    earlier writes are on disk: on this VM either otherwise lands in whichever measurement comes next (in a
    run it overlaps training steps)."""
    deadline = time.monotonic() + 60
    while any(p.name.startswith(".tmp-delete-") for d in WORK.glob("*/checkpoints") for p in d.iterdir()):
        if time.monotonic() > deadline:
            break
        time.sleep(0.01)
    os.sync()


def timed(fn) -> float:
    """Seconds `fn` takes, started on a quiet machine (`quiet`)."""
    quiet()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_case(name: str, engines: dict, ema: torch.nn.Module, work: Path, repeats: int) -> dict:
    """Alternating rounds (min of each): a synchronous save (returns once published), a background save (its
    stall = the time save() takes, then the time until published), plain torch.save + fsync, a clone of
    every tensor; then verification + load and plain torch.load."""
    run_dir = work / name
    shutil.rmtree(run_dir, ignore_errors=True)
    state = {"step": 0, "images": 0, "recipe": {"model": {}, "diffusion": {}}}
    tensors = plain_tensors(engines, ema)  # before a load (DeepSpeed re-links its Adam views lazily)
    plain = work / f"{name}-plain.pt"

    def plain_save() -> None:
        with open(plain, "wb") as f:
            torch.save(tensors, f)
            f.flush()
            os.fsync(f.fileno())

    saver, sync = checkpoint.Saver(background=True), checkpoint.Saver(background=False)
    saves, stalls, bg_saves, psaves, clones = [], [], [], [], []
    step = 0
    for _ in range(repeats):
        step += 1
        saves.append(timed(lambda s=step: sync.save(run_dir, s, engines, ema, state, keep_last=2)))
        psaves.append(timed(plain_save))
        step += 1
        quiet()
        t0 = time.perf_counter()
        saver.save(run_dir, step, engines, ema, state, keep_last=2)
        stalls.append(time.perf_counter() - t0)
        saver.wait()
        bg_saves.append(time.perf_counter() - t0)
        clones.append(timed(lambda: {k: v.clone() for k, v in tensors.items()}))
    saver.close()
    sync.close()
    checksums = [timed(lambda: weights_checksum(engines)) for _ in range(repeats)]  # the trainer's save runs it
    ck = checkpoint.ckpt_root(run_dir) / checkpoint.step_name(step)
    nbytes = sum(f["size"] for f in checkpoint.read_manifest(ck)["files"].values())
    pbytes = plain.stat().st_size
    loads, verifies, ploads = [], [], []
    for _ in range(repeats):
        verifies.append(checkpoint.verify(ck))
        loads.append(timed(lambda: checkpoint.load(ck, engines, ema)))
        ploads.append(timed(lambda: torch.load(plain, weights_only=True)))
    plain.unlink()
    mb = 1e6
    save_s, bg_s, stall_s, clone_s = min(saves), min(bg_saves), min(stalls), min(clones)
    psave_s, load_s, verify_s, pload_s = min(psaves), min(loads), min(verifies), min(ploads)
    res = {"case": name, "checkpoint_MB": round(nbytes / mb), "plain_MB": round(pbytes / mb),
           "save_s": round(save_s, 2), "save_MB_s": round(nbytes / mb / save_s),
           "background_save_s": round(bg_s, 2), "background_save_MB_s": round(nbytes / mb / bg_s),
           "plain_save_s": round(psave_s, 2), "plain_save_MB_s": round(pbytes / mb / psave_s),
           "save_vs_plain": round(nbytes / save_s / (pbytes / psave_s), 2),
           "background_save_vs_plain": round(nbytes / bg_s / (pbytes / psave_s), 2),
           "stall_s": round(stall_s, 3), "clone_s": round(clone_s, 3),
           "stall_vs_clone": round(stall_s / (clone_s * nbytes / pbytes), 2),
           "weights_checksum_s": round(min(checksums), 3),
           "trainer_stall_vs_clone": round((stall_s + min(checksums)) / (clone_s * nbytes / pbytes), 2),
           "verify_s": round(verify_s, 2), "load_s": round(load_s, 2),
           "load_verified_MB_s": round(nbytes / mb / (load_s + verify_s)),
           "plain_load_s": round(pload_s, 2), "plain_load_MB_s": round(pbytes / mb / pload_s),
           "load_verified_vs_plain": round(nbytes / (load_s + verify_s) / (pbytes / pload_s), 2),
           "verify_share_of_load": round(verify_s / (load_s + verify_s), 2),
           "rounds_s": {"save": [round(v, 2) for v in saves], "background_save": [round(v, 2) for v in bg_saves],
                        "plain_save": [round(v, 2) for v in psaves]}}  # this VM: some rounds run 2x slower
    print(json.dumps(res), flush=True)
    return res


def bench_resume(name: str, recipe: str, with_d: bool, ckpt: Path, repeats: int) -> dict:
    """What verification adds to a resume, in the trainer's order: the check of the newest checkpoint starts
    first (`checkpoint.Verification`, background threads: Checkpointer.start), the models and their engines
    are built meanwhile, then the trainer waits for the check (Checkpointer.plan) and loads. Against the
    same resume without any check and with the check before building (min of alternating rounds). The
    trainer also loads its evaluator and data meanwhile: not counted here."""
    cfg = config.load(recipe)

    def resume(mode: str) -> float:
        gc.collect()
        quiet()
        t0 = time.perf_counter()
        check = checkpoint.Verification(ckpt) if mode == "overlapped" else None
        if mode == "first":
            checkpoint.verify(ckpt)
        G = models.build_generator(cfg.model, cfg.diffusion)
        ema = copy.deepcopy(G).requires_grad_(False)
        engines = {"G": engine(G, step=False)}
        if with_d:
            engines["D"] = engine(models.build_discriminator(cfg.model, cfg.diffusion), step=False)
        if check is not None:
            check.result()
        checkpoint.load(ckpt, engines, ema)
        seconds = time.perf_counter() - t0
        for e in engines.values():
            e.destroy()  # DeepSpeed's hooks keep an engine alive otherwise (0.6 GB per 1024 G round)
        del engines, G, ema
        return seconds

    times: dict[str, list[float]] = {"none": [], "first": [], "overlapped": []}
    for _ in range(repeats):
        for mode in times:
            times[mode].append(resume(mode))
    best = {mode: min(v) for mode, v in times.items()}
    res = {"case": f"{name}_resume", "resume_s_unverified": round(best["none"], 2),
           "resume_s_verify_first": round(best["first"], 2), "resume_s_overlapped": round(best["overlapped"], 2),
           "verify_added_s_first": round(best["first"] - best["none"], 2),
           "verify_added_s_overlapped": round(best["overlapped"] - best["none"], 2),
           "rounds_s": {mode: [round(v, 2) for v in vs] for mode, vs in times.items()}}
    print(json.dumps(res), flush=True)
    return res


def start_weed(state: Path) -> tuple[subprocess.Popen, str, StorageConfig]:
    key, secret = "WFBENCHKEY", "wf-bench-secret-0123456789"
    (state / "s3.json").write_text(json.dumps({"identities": [{
        "name": "admin", "credentials": [{"accessKey": key, "secretKey": secret}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    ports: list[int] = []
    while len(ports) < 5:
        p = free_port()
        if p + 10000 < 65536 and p not in ports:
            ports.append(p)
    s3, master, volume, filer, admin = ports
    (state / "data").mkdir(exist_ok=True)
    weed = Path(sys.executable).parent / "weed"
    proc = subprocess.Popen(
        [str(weed), "mini", f"-dir={state / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
         f"-s3.config={state / 's3.json'}", f"-s3.port={s3}", f"-master.port={master}", f"-volume.port={volume}",
         f"-filer.port={filer}", f"-admin.port={admin}", f"-filer.localSocket={state / 'filer.sock'}",
         f"-s3.localSocket={state / 's3.sock'}", "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0",
         "-s3.port.lance=0", "-master.telemetry=false"],
        stdout=open(state / "weed.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{s3}"
    for _ in range(600):
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except urllib.error.HTTPError:
            break
        except OSError:
            time.sleep(0.1)
    scfg = StorageConfig(endpoint_url=endpoint, access_key=key, secret_key=secret)
    fs, _ = storage.filesystem("s3://bench", scfg)
    if not fs.exists("bench"):
        fs.mkdir("bench")
    return proc, "s3://bench/ckpt", scfg


def bench_stall(ckpt: Path, work: Path, mb_s: float, nice: int, window_s: float) -> dict:
    """Step time of a small CPU training loop alone and while the Uploader's process (bound `mb_s`, priority
    `nice`) copies `ckpt`, for at most `window_s` (then the upload finishes without training); the upload's
    MB/s and its process's CPU seconds per GB (its start-up, the imports, reported apart)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 512))
    opt = torch.optim.Adam(net.parameters(), 1e-4)
    x = torch.randn(64, 512)

    def step() -> None:
        loss = net(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    def loop(seconds: float, until=None) -> list[float]:
        times, t_end = [], time.perf_counter() + seconds
        while (until() if until else time.perf_counter() < t_end):
            times.append(timed(step))
        return times

    for _ in range(20):
        step()
    alone = loop(10.0)
    state = work / "weed"
    shutil.rmtree(state, ignore_errors=True)  # a fresh server: no objects of an earlier run
    state.mkdir()
    proc, url, scfg = start_weed(state)
    try:
        up = checkpoint.Uploader(url, scfg, mb_s=mb_s, nice=nice)
        t0 = time.perf_counter()
        up.submit(ckpt)
        busy = loop(0, until=lambda: bool(up.pending()) and time.perf_counter() - t0 < window_s)
        done_while_training = not up.pending()
        errors = up.close()
        up_s = time.perf_counter() - t0
        after = loop(10.0)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        shutil.rmtree(state, ignore_errors=True)
    nbytes = sum(f["size"] for f in checkpoint.read_manifest(ckpt)["files"].values())
    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    res = {"case": "upload_stall", "upload_mb_s_bound": mb_s, "upload_nice": nice, "upload_MB": round(nbytes / 1e6),
           "upload_done_while_training": done_while_training,
           "upload_s": round(up_s, 1), "upload_MB_s": round(nbytes / 1e6 / up_s, 1), "upload_errors": errors,
           "upload_cpu_s_per_GB": round((up.cpu_s - up.startup_cpu_s) / (nbytes / 1e9), 2),
           "upload_startup_cpu_s": round(up.startup_cpu_s, 2),
           "step_ms_alone": round(1e3 * med(alone), 2), "step_ms_during_upload": round(1e3 * med(busy), 2),
           "step_ms_after": round(1e3 * med(after), 2),
           "slowdown_during_upload": round(med(busy) / med(alone), 3), "steps_during_upload": len(busy)}
    print(json.dumps(res), flush=True)
    return res


USAGE = ("[dir=PATH] [upload=0|1] [repeats=N] [resume_repeats=N] [upload_cases=MB_S:NICE,...] "
         "[upload_window_s=S] [big=0|1]")


def usage_error(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def parse_args(argv: list[str]) -> dict:
    """The key=value arguments, checked: a bad one exits 2 with one line naming it."""
    if any("=" not in a for a in argv):
        usage_error(f"arguments are key=value: {' '.join(argv)}")
    raw = dict(a.split("=", 1) for a in argv)
    unknown = sorted(set(raw) - {"dir", "upload", "repeats", "resume_repeats", "upload_cases", "upload_window_s",
                                 "big"})
    if unknown:
        usage_error(f"unknown argument(s) {unknown}: {USAGE}")
    args: dict = {"dir": Path(raw["dir"]) if "dir" in raw else WORK}
    for key, default in (("repeats", "2"), ("resume_repeats", "5")):
        value = raw.get(key, default)
        if not value.isdigit() or int(value) < 1:
            usage_error(f"{key}={value}: a whole number >= 1")
        args[key] = int(value)
    for key in ("upload", "big"):
        value = raw.get(key, "1")
        if value not in ("0", "1"):
            usage_error(f"{key}={value}: 0 or 1")
        args[key] = value == "1"
    try:
        args["upload_window_s"] = float(raw.get("upload_window_s", "60"))
    except ValueError:
        usage_error(f"upload_window_s={raw['upload_window_s']}: a number of seconds")
    cases = []
    for case in raw.get("upload_cases", "200:19").split(","):
        mb_s, _, nice = case.partition(":")
        try:
            cases.append((float(mb_s), int(nice)))
        except ValueError:
            usage_error(f"upload_cases={raw['upload_cases']}: MB_S:NICE pairs separated by commas (200:19,20:10)")
        if cases[-1][0] < 0 or not 0 <= cases[-1][1] <= 19:
            usage_error(f"upload_cases={raw['upload_cases']}: MB_S >= 0 (0 = unbounded), NICE 0-19")
    args["upload_cases"] = cases
    return args


def main() -> None:
    args = parse_args(sys.argv[1:])
    global WORK
    work = WORK = args["dir"]
    repeats = args["repeats"]
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    results = []

    cfg = config.load("celebahq256")
    G, D = models.build_generator(cfg.model, cfg.diffusion), models.build_discriminator(cfg.model, cfg.diffusion)
    ema = copy.deepcopy(G).requires_grad_(False)
    engines = {"G": engine(G), "D": engine(D)}
    results.append(bench_case("celebahq256_G+D", engines, ema, work, repeats))
    ck256 = checkpoint.complete_checkpoints(checkpoint.ckpt_root(work / "celebahq256_G+D"))[-1]
    resume_repeats = args["resume_repeats"]  # model building on this VM varies 1.6-4 s round to round
    results.append(bench_resume("celebahq256_G+D", "celebahq256", True, ck256, resume_repeats))
    if args["upload"]:
        for mb_s, nice in args["upload_cases"]:
            results.append(bench_stall(ck256, work, mb_s, nice, args["upload_window_s"]))
    for e in engines.values():
        e.destroy()
    del engines, G, D, ema

    if not args["big"]:
        shutil.rmtree(work, ignore_errors=True)
        print("RESULTS " + json.dumps(results))
        torch.distributed.destroy_process_group()
        return
    cfg = config.load("celebahq1024")
    G = models.build_generator(cfg.model, cfg.diffusion)
    ema = copy.deepcopy(G).requires_grad_(False)
    engines = {"G": engine(G)}
    results.append(bench_case("celebahq1024_G", engines, ema, work, repeats))
    engines["G"].destroy()
    del engines, G, ema
    gc.collect()
    ck1024 = checkpoint.complete_checkpoints(checkpoint.ckpt_root(work / "celebahq1024_G"))[-1]
    results.append(bench_resume("celebahq1024_G", "celebahq1024", False, ck1024, resume_repeats))
    shutil.rmtree(work, ignore_errors=True)
    print("RESULTS " + json.dumps(results))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
