"""Shared-memory transport between the server process and the worker processes.

A `ShmQueue` is a multiprocessing queue whose pickler moves tensor storage into shared
memory (torch.multiprocessing's reductions): only a small handle goes through the pipe,
the bytes are mapped, not copied, by the receiver. numpy arrays in a message are turned
into tensors on the way in; the server's end turns tensors back into arrays, while workers
keep them as tensors. `put` says how many tensor bytes a message moved into shared memory.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
import torch.multiprocessing as tmp

CONTEXT = tmp.get_context("spawn")


def to_shared(obj: Any) -> Any:
    """numpy arrays -> tensors (which the queue moves to shared memory), recursively."""
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, dict):
        return {k: to_shared(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_shared(v) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: to_shared(getattr(obj, f.name)) for f in dataclasses.fields(obj)})
    return obj


def from_shared(obj: Any) -> Any:
    """Tensors -> numpy arrays (copied out of the shared segment), recursively."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().numpy().copy()
    if isinstance(obj, dict):
        return {k: from_shared(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(from_shared(v) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: from_shared(getattr(obj, f.name)) for f in dataclasses.fields(obj)})
    return obj


def tensor_bytes(obj: Any) -> int:
    """The bytes of every numpy array and tensor in `obj` (what travels through shared memory)."""
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return sum(tensor_bytes(getattr(obj, f.name)) for f in dataclasses.fields(obj))
    return 0


def raise_open_file_limit() -> None:
    """Every tensor in flight holds a file descriptor: allow as many as the system lets us."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class ShmQueue:
    """One-way message queue; tensors inside messages travel through shared memory."""

    def __init__(self, numpy_out: bool) -> None:
        self._q = CONTEXT.Queue()
        self.numpy_out = numpy_out  # True for the server's end: hand out numpy, not tensors

    def put(self, msg: Any) -> int:
        """Queue `msg`; returns the tensor bytes it moves into shared memory (the copy itself
        happens on the queue's feeder thread, when the message is pickled)."""
        shared = to_shared(msg)
        self._q.put(shared)
        return tensor_bytes(shared)

    def get(self, timeout: float | None = None) -> Any:
        with torch.inference_mode(False):  # see get_nowait
            msg = self._q.get(timeout=timeout)
        return from_shared(msg) if self.numpy_out else msg

    def get_nowait(self) -> Any:
        """The next message if one is already here, else `queue.Empty`. Its tensors are ordinary
        ones even when read inside `torch.inference_mode` (a worker takes the items that arrive
        during a sampling batch between its decode steps): a training item's tensors made there
        would be inference tensors, which autograd refuses to save for backward."""
        with torch.inference_mode(False):
            msg = self._q.get_nowait()
        return from_shared(msg) if self.numpy_out else msg

    def close(self) -> None:
        self._q.close()
        self._q.cancel_join_thread()
