"""``torchrun`` process groups and the few collective helpers the engine needs.

Launched by ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``
set), :func:`init_distributed` joins the default process group (NCCL on CUDA, Gloo on CPU) and
pins this process to ``cuda:<LOCAL_RANK>``. Launched as a plain ``python`` process it does nothing
and every helper below degenerates to the single-process answer, so the same engine code runs both
ways::

    info = init_distributed()
    try:
        ...
        if agree(trial.should_prune()):   # every rank gets rank 0's decision
            break
    finally:
        cleanup()
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

__all__ = [
    "DistInfo",
    "agree",
    "all_gather_object",
    "all_reduce_mean",
    "barrier",
    "broadcast_object",
    "cleanup",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_dist",
    "is_main",
]

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    is_main: bool

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    try:
        return int(raw) if raw != "" else default
    except ValueError:
        raise ValueError(f"{name}={raw!r}: expected an integer (set by torchrun)") from None


def init_distributed(backend: str | None = None, timeout_s: float = 1800.0) -> DistInfo:
    """Join the torchrun process group if launched by torchrun; otherwise a single-process DistInfo.

    ``backend``: None picks ``nccl`` when CUDA is available, else ``gloo``. Calling it twice is
    harmless (an already initialised group is reused).
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    cuda = torch.cuda.is_available()

    if cuda:
        n = torch.cuda.device_count()
        device = torch.device("cuda", local_rank % max(n, 1))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")

    if world_size > 1 and not (dist.is_available() and dist.is_initialized()):
        if not dist.is_available():
            raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
            raise RuntimeError("WORLD_SIZE > 1 but MASTER_ADDR/MASTER_PORT are not set: launch with torchrun")
        chosen = backend or ("nccl" if cuda else "gloo")
        kwargs: dict[str, Any] = {
            "backend": chosen,
            "init_method": "env://",
            "rank": rank,
            "world_size": world_size,
            "timeout": datetime.timedelta(seconds=timeout_s),
        }
        if chosen == "nccl":
            kwargs["device_id"] = device  # binds the communicator eagerly, avoids barrier() warnings
        dist.init_process_group(**kwargs)
    elif dist.is_available() and dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()

    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device, is_main=rank == 0)


def cleanup() -> None:
    """Destroy the process group (no-op when there is none)."""
    if is_dist():
        dist.destroy_process_group()


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): the rank that logs, checkpoints and tracks."""
    return get_rank() == 0


def _nccl() -> bool:
    return is_dist() and dist.get_backend() == "nccl"


def barrier() -> None:
    if not is_dist():
        return
    if _nccl():
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def all_gather_object(obj: T) -> list[T]:
    """``[obj_from_rank0, obj_from_rank1, ...]`` on every rank (``[obj]`` without a group)."""
    if not is_dist():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: T, src: int = 0) -> T:
    """Every rank returns ``src``'s ``obj`` (the others' values are ignored)."""
    if not is_dist():
        return obj
    box = [obj if dist.get_rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """The mean of ``tensor`` over ranks, as a new tensor on the input's device (input unchanged).

    Integer tensors are averaged in float32. On NCCL the reduction runs on this rank's GPU.
    """
    t = tensor.detach().clone()
    if not t.is_floating_point():
        t = t.float()
    if not is_dist():
        return t
    orig_device = t.device
    if _nccl() and t.device.type != "cuda":
        t = t.to(torch.device("cuda", torch.cuda.current_device()))
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    t /= dist.get_world_size()
    return t.to(orig_device)


def agree(flag: bool) -> bool:
    """Rank 0's ``flag`` on every rank: one decision (prune, early stop, time is up) for all."""
    return bool(broadcast_object(bool(flag), src=0))
