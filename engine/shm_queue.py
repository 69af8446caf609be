"""Shared-memory transport between the server process and the worker processes.

A `ShmQueue` is a multiprocessing queue for messages that carry arrays. Large arrays (at least
SHM_MIN_BYTES) travel as tensors whose storage its pickler moves into shared memory
(torch.multiprocessing's reductions): only a handle goes through the pipe, and the receiver maps
the bytes instead of copying them. Small ones travel inside the pickled message: a shared-memory
segment costs a file descriptor that the receiver fetches from the sender with a round trip
(about 0.25 ms each, several ms for a batch of small prompts or datums on a busy machine), where
pickling a few KB costs microseconds. The server's end hands out numpy arrays, the workers' end
tensors, whichever way they came. `put` says how many array bytes a message carried.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np
import torch
import torch.multiprocessing as tmp

CONTEXT = tmp.get_context("spawn")
SHM_MIN_BYTES = 1 << 16  # smaller arrays are pickled into the message itself


def _map_arrays(obj: Any, leaf: Callable[[Any], Any]) -> Any:
    """`obj` with `leaf` applied to every numpy array and tensor in it (dicts, lists, tuples and
    dataclasses are rebuilt; anything else is kept)."""
    if isinstance(obj, (np.ndarray, torch.Tensor)):
        return leaf(obj)
    if isinstance(obj, dict):
        return {k: _map_arrays(v, leaf) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_arrays(v, leaf) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: _map_arrays(getattr(obj, f.name), leaf)
                                           for f in dataclasses.fields(obj)})
    return obj


def _nbytes(a: np.ndarray | torch.Tensor) -> int:
    return a.nbytes if isinstance(a, np.ndarray) else a.numel() * a.element_size()


def _for_the_pipe(a: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """A large array as a tensor (to shared memory), a small one as a numpy array of its own (inline).
    Tensors numpy cannot hold (bfloat16) stay tensors."""
    if _nbytes(a) >= SHM_MIN_BYTES:
        return torch.from_numpy(np.ascontiguousarray(a)) if isinstance(a, np.ndarray) else a
    if isinstance(a, torch.Tensor):
        try:
            return a.detach().cpu().numpy().copy()  # a copy is C-contiguous
        except (TypeError, RuntimeError):  # no numpy dtype for it (bf16), or a conjugate/negative view
            return a
    return a if a.flags.c_contiguous else a.copy(order="C")  # (ascontiguousarray makes 0-d arrays 1-d)


def to_shared(obj: Any) -> Any:
    """`obj` ready for the queue: large arrays as tensors (the queue moves them to shared memory),
    small ones as numpy arrays (pickled into the message)."""
    return _map_arrays(obj, _for_the_pipe)


def as_numpy(obj: Any) -> Any:
    """Every array in `obj` as numpy (tensors copied out of their shared segment)."""
    return _map_arrays(obj, lambda a: a.detach().cpu().numpy().copy() if isinstance(a, torch.Tensor) else a)


def _as_tensor(a: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a
    try:
        return torch.from_numpy(a)
    except (TypeError, ValueError):  # a dtype torch has no tensor for (object, non-native byte order):
        return a  # left to the operation to refuse, never an error in the worker's queue


def as_tensors(obj: Any) -> Any:
    """Every array in `obj` as a tensor (numpy arrays wrapped, not copied), where torch has its dtype."""
    return _map_arrays(obj, _as_tensor)


def tensor_bytes(obj: Any) -> int:
    """The bytes of every numpy array and tensor in `obj` (what a message carries besides its
    small Python values)."""
    total = 0

    def count(a):
        nonlocal total
        total += _nbytes(a)
        return a

    _map_arrays(obj, count)
    return total


def raise_open_file_limit() -> None:
    """Every tensor in flight holds a file descriptor: allow as many as the system lets us."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class ShmQueue:
    """One-way message queue; large arrays inside messages travel through shared memory."""

    def __init__(self, numpy_out: bool) -> None:
        self._q = CONTEXT.Queue()
        self.numpy_out = numpy_out  # True for the server's end: hand out numpy, not tensors

    def put(self, msg: Any) -> int:
        """Queue `msg`; returns the array bytes it carries (small tensors are copied to numpy here;
        the queue's feeder thread pickles the message and moves large arrays to shared memory)."""
        carried = 0

        def ready(a):
            nonlocal carried
            carried += _nbytes(a)
            return _for_the_pipe(a)

        self._q.put(_map_arrays(msg, ready))  # one walk: converted and counted
        return carried

    def get(self, timeout: float | None = None) -> Any:
        with torch.inference_mode(False):  # see get_nowait
            return self._received(self._q.get(timeout=timeout))

    def get_nowait(self) -> Any:
        """The next message if one is already here, else `queue.Empty`. Its tensors are ordinary
        ones even when read inside `torch.inference_mode` (a worker takes the items that arrive
        during a sampling batch between its decode steps): a training item's tensors made there
        would be inference tensors, which autograd refuses to save for backward."""
        with torch.inference_mode(False):
            return self._received(self._q.get_nowait())

    def _received(self, msg: Any) -> Any:
        return as_numpy(msg) if self.numpy_out else as_tensors(msg)

    def close(self) -> None:
        self._q.close()
        self._q.cancel_join_thread()
