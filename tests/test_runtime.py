"""The runtime layer: `dist.on_rank0` shares rank 0's result or its exception (same type, same message,
rank 0's traceback) with every rank; one CPU rank starts without compiling DeepSpeed's shared-memory op."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from waveforge import runtime

REPO = Path(__file__).resolve().parents[1]

WORKER = textwrap.dedent('''
    import json, os, sys
    import torch.distributed as tdist
    from waveforge import dist

    class Odd(Exception):  # a constructor that pickling cannot call again
        def __init__(self, a, b):
            super().__init__(f"odd {a} {b}")

    tdist.init_process_group("gloo")
    out = {"result": dist.on_rank0(lambda: {"rank": dist.rank(), "items": [1, 2]})}

    def fail():
        raise FileNotFoundError("manifest s3://b/x/index.json not found")

    for name, fn in (("plain", fail), ("odd", lambda: (_ for _ in ()).throw(Odd(1, 2)))):
        try:
            dist.on_rank0(fn)
        except Exception as e:
            out[name] = {"type": type(e).__name__, "message": str(e),
                         "note": "".join(getattr(e, "__notes__", []))}
    box = []
    out["first"] = dist.rank0_first(lambda: box.append(dist.rank()) or len(box))
    out["any"] = dist.any_rank(dist.rank() == 1)
    out["all"] = dist.all_ranks(dist.rank() == 1)
    os.write(1, ("RESULT " + json.dumps(out) + "\\n").encode())  # one write: the ranks' lines never interleave
    tdist.destroy_process_group()
''')


def _torchrun(code: str, tmp: Path, nproc: int = 2) -> list[dict]:
    script = tmp / "worker.py"
    script.write_text(code)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                        "--master_port", str(runtime.free_port()), str(script)], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return [json.loads(line.split("RESULT ", 1)[1]) for line in r.stdout.splitlines() if "RESULT " in line]


def test_on_rank0_shares_the_result_or_the_same_exception(tmp_path: Path) -> None:
    outs = _torchrun(WORKER, tmp_path)
    assert len(outs) == 2
    for out in outs:
        assert out["result"] == {"rank": 0, "items": [1, 2]}  # rank 0's result, on every rank
        assert out["plain"]["type"] == "FileNotFoundError"
        assert out["plain"]["message"] == "manifest s3://b/x/index.json not found"
        assert out["odd"]["type"] == "Odd" or out["odd"]["type"] == "RankZeroError"
        assert "odd 1 2" in out["odd"]["message"]
        assert out["first"] == 1  # each rank ran fn itself, rank 0 first
        assert out["any"] is True and out["all"] is False
    notes = {o["plain"]["note"] != "" for o in outs}
    assert notes == {True, False}  # rank 0 raises the original; the other rank's copy carries its traceback
    other = next(o for o in outs if o["plain"]["note"])
    assert "raised on rank 0" in other["plain"]["note"] and "Traceback" in other["plain"]["note"]


def test_one_cpu_rank_compiles_no_deepspeed_op(tmp_path: Path) -> None:
    """The embedded default (one local CPU task) must not spend the first minute of every fresh machine
    compiling DeepSpeed's shared-memory all-reduce, which one rank never uses."""
    ext = tmp_path / "torch_extensions"
    ext.mkdir()
    code = textwrap.dedent('''
        import torch, deepspeed
        from waveforge import runtime
        runtime.init_distributed("gloo")
        net = torch.nn.Linear(4, 4)
        cfg = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 1},
               "optimizer": {"type": "Adam", "params": {"lr": 1e-3, "torch_adam": True}}}
        engine, *_ = deepspeed.initialize(model=net, model_parameters=list(net.parameters()), config=cfg)
        engine.backward(engine(torch.ones(1, 4)).sum())
        engine.step()
        runtime.shutdown()
        print("TRAINED")
    ''')
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(TORCH_EXTENSIONS_DIR=str(ext), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "TRAINED" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    assert not any(ext.rglob("*")), f"DeepSpeed compiled ops into {ext}: {sorted(ext.rglob('*'))[:5]}"
    assert "built successfully" not in r.stdout + r.stderr
