"""Distributed helpers: torchrun detection, process group, reductions.

Every helper is a no-op (or the identity) when the process is not part of a process group,
so the training loop has one code path for 1 and N processes.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_info() -> DistInfo:
    """What torchrun put in the environment (RANK, WORLD_SIZE, LOCAL_RANK); 1 process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    return DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def init(device: torch.device) -> DistInfo:
    """Join the process group torchrun set up (gloo on CPU, nccl on CUDA); idempotent."""
    info = env_info()
    if info.world_size > 1 and not tdist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(minutes=30)
        if device.type == "cuda":
            tdist.init_process_group(backend, timeout=timeout, device_id=device)
        else:
            tdist.init_process_group(backend, timeout=timeout)
    return info


def shutdown() -> None:
    if tdist.is_initialized():
        tdist.destroy_process_group()


def is_distributed() -> bool:
    return tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1


def rank() -> int:
    return tdist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return tdist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks, in place; returns it."""
    if is_distributed():
        tdist.all_reduce(tensor, op=tdist.ReduceOp.SUM)
    return tensor


def broadcast(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Copy rank ``src``'s ``tensor`` to every rank, in place; returns it."""
    if is_distributed():
        tdist.broadcast(tensor, src)
    return tensor


def barrier() -> None:
    if is_distributed():
        tdist.barrier()


def all_gather_object(obj) -> list:
    """Every rank's ``obj``, in rank order (pickled between our own processes only)."""
    if not is_distributed():
        return [obj]
    out = [None] * world_size()
    tdist.all_gather_object(out, obj)
    return out


# What a surviving rank sees when another process of the group died (gloo and NCCL wording).
_PEER_LOSS = ("connection reset by peer", "connection closed by peer", "broken pipe", "connection refused",
              "socket closed", "remote process exited", "ncclremoteerror", "nccl communicator was aborted",
              "timed out", "timeout")


def is_peer_loss(exc: BaseException) -> bool:
    """Whether ``exc`` (raised inside a collective) means another rank is gone."""
    return isinstance(exc, getattr(tdist, "DistError", ())) or any(m in str(exc).lower() for m in _PEER_LOSS)


def peer_loss_reason(exc: BaseException) -> str:
    """The backend's message in one short line (without its source-file prefix)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = lines[0] if lines else type(exc).__name__
    if text.startswith("[") and "] " in text:
        text = text.split("] ", 1)[1]
    return text.split(". ", 1)[0][:200]     # gloo appends advice after its first sentence
