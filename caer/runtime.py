"""Where and how code runs: the device, mixed precision, random state, and torch.distributed glue.

The same code runs as one process or as several under ``torchrun``.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import random

import numpy as np
import torch
import torch.distributed as dist


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present; ``cpu`` / ``cuda`` / ``cuda:N`` are taken as given."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ValueError(f"--device {spec!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {spec}: CUDA is not available on this machine")
    return device


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype on this device: bf16, or fp16 where bf16 is unsupported; None off CUDA."""
    if device.type != "cuda":
        return None
    # emulated bf16 (e.g. a T4) is slower than fp16 with a grad scaler: ask for bf16 only where the hardware has it
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def autocast(device: torch.device, enabled: bool = True, dtype: torch.dtype | None = None):
    """Autocast to ``dtype`` (default ``amp_dtype``) on CUDA; a no-op elsewhere."""
    if device.type != "cuda" or not enabled:
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=dtype or amp_dtype(device))


def amp_note(device: torch.device, enabled: bool) -> str | None:
    """The notice that ``--use-amp`` changes nothing on this device; None where it does (or is off)."""
    return f"note: --use-amp has no effect on {device.type}: full precision" if enabled and device.type != "cuda" else None


def no_autocast(device: torch.device):
    """Autocast off inside (with ``upcast``: products that must stay in full precision under ``autocast``)."""
    return torch.autocast(device.type, enabled=False)


def upcast(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors with 16-bit floats (what autocast made) as float32; the others as they are."""
    return tuple(t.float() if t.dtype in (torch.float16, torch.bfloat16) else t for t in tensors)


def rng_state(device: torch.device | None = None) -> dict:
    """Every random generator's state (saved in checkpoints so that a resumed run repeats itself); of the GPUs,
    only ``device``'s (a process draws on its own GPU alone; a run may resume where fewer GPUs are visible).

    Plain containers and tensors only, so that a checkpoint loads with ``torch.load(weights_only=True)``.
    """
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "numpy": {"bit_generator": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)},
            "python": [version, torch.tensor(internal, dtype=torch.int64), gauss_next],
            "cuda": torch.cuda.get_rng_state(device) if device is not None and device.type == "cuda" else None}


def set_rng_state(state: dict, device: torch.device | None = None) -> None:
    """Restore what ``rng_state`` saved (or what older checkpoints hold: numpy/python tuples, every GPU's state)."""
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    if isinstance(numpy_state, dict):
        n = numpy_state
        numpy_state = (n["bit_generator"], np.asarray(n["keys"], dtype=np.int64).astype(np.uint32), n["pos"],
                       n["has_gauss"], n["cached_gaussian"])
    np.random.set_state(numpy_state)
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(int(x) for x in internal), gauss_next))
    cuda = state.get("cuda")
    if cuda is None or device is None or device.type != "cuda":
        return
    if isinstance(cuda, (list, tuple)):  # older checkpoints: one state per visible GPU
        index = device.index or 0
        if index >= len(cuda):
            return
        cuda = cuda[index]
    torch.cuda.set_rng_state(cuda, device)


# --------------------------------------------------------------------------- torch.distributed

def init(device: torch.device | None = None) -> tuple[int, int]:
    """Join the process group that ``torchrun`` describes in the environment; (rank, world size).

    NCCL when ``device`` is a GPU (training), gloo otherwise (extraction exchanges only small objects).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        # rank 0 alone writes checkpoints and the test report while the others wait in a collective: give it an hour
        # (stage 3 on a large validation split), where the NCCL default gives 10 minutes
        timeout = datetime.timedelta(hours=1)
        if device is not None and device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=device, timeout=timeout)
        else:
            dist.init_process_group("gloo", timeout=timeout)
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def rank() -> int:
    """This process's rank (0 without torchrun); does not join a process group."""
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def to_device(values, device: torch.device | str) -> torch.Tensor:
    """``values`` (a tensor, numpy array or list) as a tensor on ``device``, with no stream synchronisation after
    the copy. A plain ``.to("cuda")`` synchronises the stream: in a thread that queues GPU work (the decode-ahead
    thread), every small index or weight tensor would wait for all the work queued before it (CUDA may still stage
    a copy from pageable memory synchronously; whether this pays on a GPU is not measured). Pageable host memory is
    staged by CUDA before the call returns, so ``values`` may be freed right away."""
    return torch.as_tensor(values).to(device, non_blocking=True)


def local_device(device: torch.device) -> torch.device:
    """A CUDA device with its index, made the process's current one: under torchrun, ``cuda`` means this process's
    own GPU (``LOCAL_RANK``). Current, so that what runs on "the current GPU" (the data loader's pinning thread) does
    not start a context on GPU 0 in every process; indexed, so that every caller names the GPU alike (torchvision
    builds its nvJPEG decoder again for each new spelling)."""
    if device.type != "cuda":
        return device
    if device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
    torch.cuda.set_device(device)
    return device


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm statistics) of ``module``."""
    if dist.is_initialized():
        for buffer in module.buffers():
            dist.broadcast(buffer, 0)


def gather(obj) -> list:
    """Every rank's ``obj``, in rank order (just ``[obj]`` in a single process)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
