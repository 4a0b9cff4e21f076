"""Tiny explicit distributed helpers (rank, world, barrier, broadcast, print0).

Work the same in one plain process (no process group), under torchrun, under srun/submitit (Slurm's
environment is translated to torch's by `waveforge.launch`), on CPU (gloo) and CUDA (nccl).
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch
import torch.distributed as dist


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


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def print0(*args: Any, **kwargs: Any) -> None:
    """Print on global rank 0 only (flushes: logs of requeued jobs are read while they run)."""
    if rank() == 0:
        kwargs.setdefault("file", sys.stdout)
        print(*args, **kwargs, flush=True)


def _comm_device() -> torch.device:
    """Tensors for collectives live on CUDA with nccl, on CPU with gloo."""
    if is_initialized() and dist.get_backend() == "nccl":
        return device()
    return torch.device("cpu")


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s picklable object on every rank."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_comm_device() if dist.get_backend() == "nccl" else None)
    return box[0]


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
    t = torch.tensor([x], dtype=torch.float64, device=_comm_device())  # nccl reduces CUDA tensors only
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def any_rank(flag: bool) -> bool:
    """True on every rank if `flag` is True on any rank: decisions all ranks must agree on (stop, save)."""
    if not is_initialized():
        return flag
    return bool(all_reduce_sum(torch.tensor([1.0 if flag else 0.0], dtype=torch.float64)).item() > 0)
