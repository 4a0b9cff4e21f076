"""Tiny explicit distributed helpers: rank, world, barrier, broadcast, reductions, print0, and `on_rank0`.

Work the same in one plain process (no process group), under torchrun, under srun/submitit (Slurm's
environment is translated to torch's by `waveforge.runtime`), on CPU (gloo) and CUDA (nccl).

Decisions every rank must agree on (stop, save, an error on rank 0) travel over a CPU "control" group:
the default group under gloo, a gloo group beside NCCL on GPUs (created by the first collective helper that
needs it: every helper here is called by all ranks in the same order), so that agreeing on a flag never
waits for the GPU's queue of kernels. Tensor data (metrics, features) is reduced on the communication
device of the default group.
"""

from __future__ import annotations

import os
import pickle
import sys
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

_control: Any = None  # a gloo process group for CPU-side agreement beside NCCL (None: the default group)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else int(os.environ.get("RANK", 0))


def world() -> int:
    return dist.get_world_size() if is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def device() -> torch.device:
    if torch.cuda.is_available():
        # one visible GPU per task (Slurm --gpus-per-task binding) or all node GPUs indexed by local rank
        return torch.device("cuda", local_rank() if torch.cuda.device_count() > 1 else 0)
    return torch.device("cpu")


def _group() -> Any:
    """COLLECTIVE on first use under NCCL: the CPU group for flags and small objects (None = the default)."""
    global _control
    if _control is None and dist.get_backend() == "nccl":
        _control = dist.new_group(backend="gloo")
    return _control


def forget_control_group() -> None:
    """Drop the control group (the process group is being destroyed)."""
    global _control
    _control = None


def barrier() -> None:
    if is_initialized():
        dist.barrier(group=_group())


def print0(*args: Any, **kwargs: Any) -> None:
    """Print on global rank 0 only (flushes: logs of requeued jobs are read while they run)."""
    if rank() == 0:
        kwargs.setdefault("file", sys.stdout)
        print(*args, **kwargs, flush=True)


def _comm_device() -> torch.device:
    """Tensors for collectives of the default group live on CUDA with nccl, on CPU with gloo."""
    if is_initialized() and dist.get_backend() == "nccl":
        return device()
    return torch.device("cpu")


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s picklable object on every rank (over the CPU control group)."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=_group())
    return box[0]


def gather_object(obj: Any) -> list[Any]:
    """Every rank's picklable `obj`, in rank order, on every rank (over the CPU control group)."""
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * world()
    dist.all_gather_object(out, obj, group=_group())
    return out


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of `t` over ranks (a new tensor on t's device; float64 stays float64)."""
    if not is_initialized():
        return t.clone()
    out = t.detach().to(_comm_device()).clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(t.device)


def max_over_ranks(x: float) -> float:
    """The largest of each rank's `x` (a metric such as peak memory), on every rank."""
    if not is_initialized():
        return x
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_group())
    return float(t.item())


def any_rank(flag: bool) -> bool:
    """True on every rank if `flag` is True on any rank: decisions all ranks must agree on (stop, save).
    A CPU all-reduce over the control group: it does not wait for the GPU."""
    if not is_initialized():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=_group())
    return bool(t.item() > 0)


def all_ranks(flag: bool) -> bool:
    """True on every rank iff `flag` is True on every rank."""
    return not any_rank(not flag)


class RankZeroError(RuntimeError):
    """Rank 0 failed with an exception that could not be rebuilt on this rank (its type and message are in
    the text, its traceback in the note)."""


def _portable(exc: BaseException) -> BaseException:
    """`exc`, or an exception of the same type and message, that survives pickling to the other ranks."""
    try:
        return pickle.loads(pickle.dumps(exc))
    except Exception:  # noqa: BLE001 - an exception class with a custom constructor
        pass
    try:
        again = type(exc)(str(exc))
        pickle.loads(pickle.dumps(again))
        return again
    except Exception:  # noqa: BLE001 - fall back to a generic type that names the original
        return RankZeroError(f"{type(exc).__name__}: {exc}")


def on_rank0(fn: Callable[[], T]) -> T:
    """COLLECTIVE: run `fn()` on rank 0 only and share the outcome: every rank returns rank 0's result (which
    must pickle), or raises the exception rank 0 raised, of the same type with the same message. Rank 0
    raises the original (its traceback intact); the other ranks' copy carries rank 0's traceback as a note.

    For work that must happen once (reading a manifest, downloading, creating a folder, opening a tracking
    run) and whose failure must stop every rank, not leave the others waiting in the next collective."""
    if not is_initialized() or world() == 1:
        return fn()
    payload: tuple[Any, ...] = ("ok", None)
    original: BaseException | None = None
    if rank() == 0:
        try:
            payload = ("ok", fn())
        except Exception as e:  # noqa: BLE001 - shared with every rank below, raised everywhere
            original = e
            payload = ("error", _portable(e), traceback.format_exc())
    payload = broadcast_object(payload)
    if payload[0] == "ok":
        return payload[1]
    if original is not None:
        raise original
    exc = payload[1]
    exc.add_note(f"(raised on rank 0)\n{payload[2]}")
    raise exc


def rank0_first(fn: Callable[[], T]) -> T:
    """COLLECTIVE: `fn()` on rank 0, then, once it succeeded, on every other rank; each rank returns its own
    result. For loading something that rank 0 may have to download or build first (a cache that the others
    then find), where the result itself should not travel between ranks. A failure on rank 0 is raised on
    every rank as `on_rank0` raises it."""
    if not is_initialized() or world() == 1:
        return fn()
    box: list[T] = []
    on_rank0(lambda: box.append(fn()))
    return box[0] if box else fn()
