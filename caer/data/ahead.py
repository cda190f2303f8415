"""Preparing items ahead on the device: a background thread turns a loader's items into device tensors while the
caller computes on earlier ones.

This is how ``--decode tensor`` runs on a GPU: the data-loader workers only read the frames' bytes and look up their
boxes, and this thread decodes (nvJPEG) and cuts them on the GPU, on a CUDA stream of its own, so that decoding the
next items overlaps encoding (extraction) or the training step on this one.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

AHEAD = 4  # items prepared ahead of the consumer


def _cuda_tensors(item: Any) -> list[torch.Tensor]:
    """The CUDA tensors in an item: itself, or in its fields (a dict's values, a list's or a tuple's elements, at
    any depth)."""
    if isinstance(item, torch.Tensor):
        return [item] if item.is_cuda else []
    values = item.values() if isinstance(item, dict) else item if isinstance(item, (list, tuple)) else ()
    return [tensor for value in values for tensor in _cuda_tensors(value)]


def prepared_ahead(items: Iterable, prepare: Callable[[Any], Any], device: torch.device,
                   ahead: int = AHEAD) -> Iterator:
    """``prepare(item)`` for each of ``items``, in order, computed by a background thread up to ``ahead`` items
    before the caller takes them. On CUDA the thread works on its own stream; each result's tensors are made safe
    to use on the caller's current stream. An exception in the thread is raised here, and closing the iterator
    stops the thread."""
    cuda = device.type == "cuda"
    stream = torch.cuda.Stream(device) if cuda else None
    ready, stop = queue.Queue(maxsize=ahead), threading.Event()

    def work() -> None:
        try:
            with torch.cuda.device(device) if cuda else contextlib.nullcontext(), torch.cuda.stream(stream):
                for item in items:
                    if stop.is_set():
                        return
                    item = prepare(item)
                    done = torch.cuda.Event() if cuda else None
                    if done is not None:
                        done.record(stream)
                    ready.put((item, done))
            ready.put(None)
        except BaseException as err:  # re-raised in the consuming thread
            ready.put(err)

    thread = threading.Thread(target=work, name="caer-prepare-ahead", daemon=True)
    thread.start()
    try:
        while (entry := ready.get()) is not None:
            if isinstance(entry, BaseException):
                raise entry
            item, done = entry
            if done is not None:
                current = torch.cuda.current_stream(device)
                current.wait_event(done)
                for tensor in _cuda_tensors(item):
                    tensor.record_stream(current)  # its memory is not reused before the consumer is done with it
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a thread waiting to put, then let it end
            with contextlib.suppress(queue.Empty):
                ready.get(timeout=0.05)
