"""What work items cost on their way through the engine, per operation.

`TransportMetrics` keeps, per operation: work items, the API requests they carried, failures,
array bytes carried both ways (shared memory or inline, `engine.shm_queue`), and the latency of each request in stages, from
its arrival at its HTTP handler to its future being stored. All stamps are `time.time()` (see
`engine.messages.Transport`): one clock for every process of the machine. Served read-only by
`GET /api/v1/metrics` (`handlers/metrics.py`).
"""
from __future__ import annotations

import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from engine.messages import Transport, WorkResult

METRICS_WINDOW = 256  # latency statistics cover each operation's most recent requests


# The latency stages of a request, from the stamps its job and its work item's Transport carry.
STAGES = ("arrival_to_enqueued",  # HTTP handler reached -> put on the workers' queues (parse, order, batching)
          "submit_to_enqueued",  # of which: waiting in the scheduler (lower seq_ids, the sampling batch in flight)
          "enqueued_to_start",  # queues -> rank 0 starts it (shared-memory hop, work queued before it)
          "compute",  # rank 0 running it
          "end_to_stored",  # rank 0 done -> future stored (shared-memory hop back, encoding, futures store)
          "arrival_to_start",  # HTTP handler reached -> rank 0 starts it
          "total")  # HTTP handler reached -> future stored


def _stage_seconds(job, t: Transport, stored_at: float) -> dict[str, float]:
    seconds = {
        "arrival_to_enqueued": t.enqueued_at - job.arrived_at, "submit_to_enqueued": t.enqueued_at - job.submitted_at,
        "enqueued_to_start": t.started_at - t.enqueued_at, "compute": t.finished_at - t.started_at,
        "end_to_stored": stored_at - t.finished_at, "arrival_to_start": t.started_at - job.arrived_at,
        "total": stored_at - job.arrived_at,
    }
    return {name: max(0.0, s) for name, s in seconds.items()}  # a wall-clock step must not go negative


def _summary_ms(seconds: deque, count: int, total: float) -> dict[str, float | int]:
    """All-time `count` and `sum`, then n, mean, p50, p90 and max of the recent window; in ms."""
    ms = lambda v: round(1000 * v, 3)  # noqa: E731
    out: dict[str, float | int] = {"count": count, "sum": ms(total), "n": len(seconds)}
    if seconds:
        ordered = sorted(seconds)
        at = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
        out.update(mean=ms(statistics.fmean(ordered)), p50=ms(at(0.5)), p90=ms(at(0.9)), max=ms(ordered[-1]))
    return out


@dataclass
class _OpMetrics:
    items: int = 0  # work items sent to the workers (one sampling batch is one item)
    requests: int = 0  # the API requests those items carried
    failed_items: int = 0  # items that came back as an error (or were lost with a worker)
    joined_items: int = 0  # sampling items that joined a sampling batch already running
    interleaved_items: int = 0  # other items that ran between two decode steps of a sampling batch
    replica_items: dict[int, int] = field(default_factory=dict)  # sampling: items each data-parallel replica ran
    request_bytes: int = 0  # array bytes the requests carried to the workers (shared memory or inline), all ranks
    result_bytes: int = 0  # array bytes of the results
    timed: int = 0  # requests with latencies (rank 0 ran their item)
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))  # all-time sums
    recent: dict[str, deque] = field(default_factory=lambda: {name: deque(maxlen=METRICS_WINDOW) for name in STAGES})

    def add(self, job, t: Transport, stored_at: float) -> None:
        self.timed += 1
        for name, seconds in _stage_seconds(job, t, stored_at).items():
            self.seconds[name] += seconds
            self.recent[name].append(seconds)

    def summary(self) -> dict[str, Any]:
        return {"items": self.items, "requests": self.requests, "failed_items": self.failed_items,
                "joined_items": self.joined_items, "interleaved_items": self.interleaved_items,
                "replica_items": {str(r): n for r, n in sorted(self.replica_items.items())},
                "request_bytes": self.request_bytes, "result_bytes": self.result_bytes,
                "latency_ms": {name: _summary_ms(self.recent[name], self.timed, self.seconds[name]) for name in STAGES}}


class TransportMetrics:
    """Per-operation aggregates of every work item sent to the workers; lives on the event loop."""

    def __init__(self) -> None:
        self._ops: dict[str, _OpMetrics] = {}

    def record(self, op: str, jobs: list, res: WorkResult, replica: int | None = None) -> None:
        """`res` came back for the item that carried `jobs` (run by data-parallel replica
        `replica`, or by every rank), whose futures are now stored."""
        stored_at, t = time.time(), res.transport
        m = self._ops.setdefault(op, _OpMetrics())
        m.items += 1
        if replica is not None:
            m.replica_items[replica] = m.replica_items.get(replica, 0) + 1
        m.requests += len(jobs)
        m.failed_items += res.error is not None
        m.joined_items += t.joined
        m.interleaved_items += t.interleaved
        m.request_bytes += t.request_bytes
        m.result_bytes += t.result_bytes
        if t.started_at:  # rank 0 ran it (a lost item has no worker stamps)
            for job in jobs:
                m.add(job, t, stored_at)

    def snapshot(self) -> dict[str, Any]:
        return {"clock": "time.time() of the server and of worker rank 0 (one machine)",
                "latency_window": METRICS_WINDOW,
                "ops": {op: m.summary() for op, m in sorted(self._ops.items())}}
