"""The narrow waist: the only types the server process and the worker processes share.

The server sends a `WorkItem` (an operation name and its arguments: plain Python values
and numpy arrays) to every rank, and rank 0 answers with one `WorkResult`; or, for sampling, to
the ranks of one data-parallel replica, whose leader answers. Large arrays travel through
shared memory, small ones inside the message (see `shm_queue`). Workers raise `UserError` for mistakes in the caller's
input; anything else is reported as a server error. Each result carries a `Transport` record:
the array bytes the round trip carried and when rank 0 ran it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# The operations a worker understands; each is a method of `backends.base.TrainingBackend`.
OPS = (
    "create_adapter",
    "remove_adapter",
    "forward_backward",
    "optim_step",
    "save_for_sampler",
    "save_checkpoint",
    "load_checkpoint",
    "sample",
)


class UserError(Exception):
    """The request itself is wrong (bad token ids, unknown adapter, ...): category "user"."""


@dataclass
class WorkItem:
    request_id: str
    op: str
    args: dict[str, Any] = field(default_factory=dict)
    # sampling only: the data-parallel replica whose ranks alone run it (its leader answers);
    # None: every rank runs it and global rank 0 answers
    replica: int | None = None


@dataclass
class Transport:
    """How one work item travelled. Times are `time.time()` seconds, the wall clock, which every
    process on this machine reads alike, so stamps of the server and of rank 0 can be subtracted
    (`perf_counter` and `monotonic` have an undefined reference point: only differences within
    one process are meaningful by their documentation)."""

    request_bytes: int = 0  # server: array bytes the request carried to its ranks, all together (engine.shm_queue)
    result_bytes: int = 0  # rank 0: array bytes of its result
    enqueued_at: float = 0.0  # server: put on the ranks' queues
    started_at: float = 0.0  # rank 0: began running it (0: it never ran)
    finished_at: float = 0.0  # rank 0: done running it
    joined: bool = False  # rank 0: a sampling item that joined a sampling batch already running
    interleaved: bool = False  # rank 0: another operation that ran between two decode steps of a sampling batch


@dataclass
class WorkResult:
    request_id: str
    result: Any = None
    error: str | None = None
    category: str = "server"  # "user" | "server", meaningful when error is set
    transport: Transport = field(default_factory=Transport)


@dataclass
class WorkerReady:
    """Sent once by rank 0 when every rank has built its models."""

    models: dict[str, dict[str, Any]]  # base model name -> ModelInfo fields


@dataclass
class WorkerFailed:
    """Sent by a rank whose start-up failed, just before it exits."""

    rank: int
    error: str
