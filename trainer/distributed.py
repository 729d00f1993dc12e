"""The few collective helpers the trainer needs, each a no-op (or the identity) in a single process.

Every caller used to write its own `dist.is_available() and dist.is_initialized()` guard; a tool run
without a process group (evaluation, sink analysis, tests) goes through the same code as a rank.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """A process group is up (deepspeed/torchrun launch); False in a plain `python` process."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_rank_zero() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In place over ranks ("sum" or "max"); returns the tensor for chaining."""
    if is_distributed():
        dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return tensor


def any_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True on every rank if `flag` is true on any rank."""
    return bool(all_reduce_(torch.tensor([1.0 if flag else 0.0], device=device), op="max").item())


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order ([obj] in a single process)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int) -> Any:
    """`obj` as held by rank `src`, on every rank."""
    if not is_distributed():
        return obj
    holder = [obj if dist.get_rank() == src else None]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


LAUNCHER_VARS = ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")


def one_process_without_launcher(env=None) -> bool:
    """`python launch/train.py` with no launcher: set what torchrun sets for one process (rank 0 of 1 on a
    free local port), so that DeepSpeed does not go looking for MPI (mpi4py, which is not installed).
    Returns whether it did; a launcher's, MPI's or a multi-task srun's variables are left alone."""
    import os
    import socket

    env = os.environ if env is None else env
    if any(k in env for k in LAUNCHER_VARS) or int(env.get("SLURM_NTASKS", "1") or 1) > 1:
        return False
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    return True
