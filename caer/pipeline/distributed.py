"""torch.distributed glue: the same code runs as one process or as several under ``torchrun``."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init(device: torch.device | None = None) -> tuple[int, int]:
    """Join the process group that ``torchrun`` describes in the environment; (rank, world size).

    NCCL when ``device`` is a GPU (training), gloo otherwise (extraction exchanges only small objects).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        if device is not None and device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def local_device(device: torch.device) -> torch.device:
    """Under torchrun, ``cuda`` means this process's own GPU (``LOCAL_RANK``)."""
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def gather(obj) -> list:
    """Every rank's ``obj``, in rank order (just ``[obj]`` in a single process)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
