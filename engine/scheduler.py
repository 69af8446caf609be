"""The scheduler: decides when each accepted request runs on the worker pool.

- Training requests of one model run strictly in `seq_id` order (1, 2, 3, ...), whatever
  order they arrive in; a request whose seq_id was already accepted is the same request
  (a retry) and gets the same future.
- Everything else runs as soon as it arrives (the pool's queues are FIFO).
- Sampling requests go to one data-parallel replica each (`WorkItem.replica`: its ranks alone
  run them), the one `engine.replica_router` picks: the least loaded, unless one holds most of
  the prompt in its prefix cache. A burst of requests is spread over the replicas that way and
  goes as one item per replica. While some replica is idle, a burst is gathered first, so that
  its prompts are prefilled together (the SDK's requests of one `asyncio.gather` reach the server
  one after another, 1-3 ms apart on two busy cores, with the odd longer pause). A client's bursts
  tend to repeat their size (a training loop samples as many prompts at every step), so each
  client's last burst is remembered (`_ClientBurst`; a client: an SDK session, with every sampling
  client it makes, such as the new one an RL loop makes at each step; a burst: the requests it
  sends from having none in flight until it has none in flight again): while a waiting client has
  sent fewer than last time, the burst waits for the rest, at most EXPECT_LIMIT × `gather_s` after
  its first request. Otherwise (each has sent as many, or it is a client's first burst) it is gathered
  until no new request has come for `gather_s` (2 ms by default), at most GATHER_LIMIT ×
  `gather_s` after its first request (a lone request waits `gather_s`). When every replica is
  sampling, requests go at the next event-loop turn: an item that reaches a replica already
  sampling joins its running batch between decode steps (continuous batching, see
  `engine.sample_joins`). A new request never postpones a dispatch that is due.
Results are encoded by the caller-supplied `encode` function and stored as futures.

Each finished work item is recorded in `engine.metrics.TransportMetrics` (bytes, latency
stages from `ARRIVED_AT`, set by the HTTP layer, to the stored future).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Callable

from engine.futures import FutureStore
from engine.messages import WorkItem, WorkResult
from engine.metrics import TransportMetrics
from engine.pool import WorkerPool
from engine.replica_router import ReplicaRouter

log = logging.getLogger("tinkercloud.scheduler")

RETRY_WINDOW = 1024  # how many already-run seq_ids per model are remembered for retries
GATHER_LIMIT = 5  # a sampling burst is gathered for at most this many times the quiet gap
EXPECT_LIMIT = 20  # ... or, waiting for a client to send as many as in its last burst, this many
CLIENTS_REMEMBERED = 4096  # sessions whose last sampling burst size is kept (least recent dropped)

# When the HTTP request being handled reached its handler (time.time()); None outside a request.
ARRIVED_AT: ContextVar[float | None] = ContextVar("tinkercloud_arrived_at", default=None)

# encode(result) -> (payload, kind) where kind is "json" or "proto"
Encoder = Callable[[Any], tuple[Any, str]]


def as_json(result: Any) -> tuple[Any, str]:
    return result, "json"


@dataclass
class _Job:
    request_id: str
    op: str
    args: dict[str, Any]
    encode: Encoder
    rejection: str | None = None  # set: fail in order with this user error instead of running
    arrived_at: float = 0.0  # the HTTP request reached its handler (time.time())
    submitted_at: float = 0.0  # the handler handed it to the scheduler
    client: str | None = None  # the SDK session that sent it (sampling)


@dataclass
class _ClientBurst:
    """One sampling client's requests: in flight now, sent in its current burst and in its last.
    A burst runs from a request sent with none of the client's in flight until none is again."""

    in_flight: int = 0
    sent: int = 0
    last: int = 0  # 0: no burst finished yet


@dataclass
class _ModelLane:
    next_seq: int = 1
    waiting: dict[int, _Job] = field(default_factory=dict)
    accepted: dict[int, str] = field(default_factory=dict)  # seq_id -> request_id


class Scheduler:
    def __init__(self, pool: WorkerPool, futures: FutureStore, max_sample_rows: int = 64, replicas: int = 1,
                 gather_s: float = 0.0) -> None:
        self.pool = pool
        self.futures = futures
        self.max_sample_rows = max_sample_rows
        self._lanes: dict[str, _ModelLane] = {}
        self._samples: list[tuple[_Job, int]] = []  # (job, rows) waiting for the next turn
        self.router = ReplicaRouter(replicas)  # which data-parallel replica samples each request
        self.gather_s = gather_s  # quiet gap that ends a sampling burst while some replica is idle
        self._sampling_at: asyncio.Handle | None = None  # the waiting samples' dispatch (a TimerHandle: gathering)
        self._burst_began = 0.0  # loop time of the first waiting sample
        self._clients: OrderedDict[str, _ClientBurst] = OrderedDict()  # most recently active last
        self.metrics = TransportMetrics()

    # ---- submission ----------------------------------------------------------------------
    def submit(self, op: str, args: dict[str, Any], encode: Encoder = as_json) -> str:
        """Run as soon as possible; returns the future's request id."""
        job = self._new_job(op, args, encode)
        self._dispatch(job)
        return job.request_id

    def submit_ordered(self, model_id: str, seq_id: int, op: str, args: dict[str, Any],
                       encode: Encoder = as_json, rejection: str | None = None) -> str:
        """Run after every lower seq_id of `model_id`. A `rejection` takes its turn, then fails."""
        lane = self._lanes.setdefault(model_id, _ModelLane())
        if seq_id in lane.accepted:
            return lane.accepted[seq_id]
        job = self._new_job(op, args, encode, rejection)
        lane.accepted[seq_id] = job.request_id
        if seq_id < lane.next_seq:
            self.futures.fail(job.request_id, f"seq_id {seq_id} of {model_id} is out of order: "
                              f"requests up to {lane.next_seq - 1} have already run", "user")
            return job.request_id
        lane.waiting[seq_id] = job
        while lane.next_seq in lane.waiting:
            self._dispatch(lane.waiting.pop(lane.next_seq))
            lane.next_seq += 1
            if lane.next_seq % RETRY_WINDOW == 0:  # retries only ever repeat recent seq_ids
                lane.accepted = {s: r for s, r in lane.accepted.items() if s >= lane.next_seq - RETRY_WINDOW}
        return job.request_id

    def submit_sample(self, args: dict[str, Any], rows: int, encode: Encoder, client: str | None = None) -> str:
        """Queue one sampling request of `client` (the SDK session that sent it) for the next batch."""
        job = self._new_job("sample", args, encode)
        job.client = client
        self._sent_by(client)
        self._samples.append((job, rows))
        loop = asyncio.get_running_loop()
        now = loop.time()
        if len(self._samples) == 1:
            self._burst_began = now
        # Never at once: requests of a burst handled in this loop turn go along. Gathered only
        # while a replica is idle: one that is sampling takes new rows at its next decode step.
        wait = self._gathering_left(now) if self.gather_s > 0 and min(self.router.rows) == 0 else 0.0
        gathering = isinstance(self._sampling_at, asyncio.TimerHandle)
        if self._sampling_at is not None and not gathering:
            return job.request_id  # already going at the next turn: never postponed
        if gathering:
            self._sampling_at.cancel()  # later (the burst goes on) or now (its time is up)
        self._sampling_at = loop.call_at(now + wait, self._start_sampling) if wait else loop.call_soon(self._start_sampling)
        return job.request_id

    def _gathering_left(self, now: float) -> float:
        """How long the waiting burst may still gather (0: send it now)."""
        clients = [self._clients.get(job.client) if job.client is not None else None for job, _ in self._samples]
        if any(c is not None and c.sent < c.last for c in clients):  # a client has more to come
            return max(0.0, self._burst_began + EXPECT_LIMIT * self.gather_s - now)
        # the quiet gap, also after a client sent as many as last time: its burst may be larger now
        return max(0.0, min(self.gather_s, self._burst_began + GATHER_LIMIT * self.gather_s - now))

    def _sent_by(self, client: str | None) -> None:
        """Count a request of `client` in its burst (a new one if none of its requests is in flight)."""
        if client is None:
            return
        burst = self._clients.setdefault(client, _ClientBurst())
        self._clients.move_to_end(client)  # most recently active last
        if burst.in_flight == 0:  # a new burst begins
            burst.last, burst.sent = burst.sent or burst.last, 0
        burst.in_flight += 1
        burst.sent += 1
        while len(self._clients) > CLIENTS_REMEMBERED:
            self._clients.popitem(last=False)

    def _answered(self, job: _Job) -> None:
        burst = self._clients.get(job.client) if job.client is not None else None
        if burst is not None and burst.in_flight > 0:
            burst.in_flight -= 1

    def close(self) -> None:
        """The server is stopping: sampling requests still being gathered fail (retry them) instead
        of reaching workers that are shutting down."""
        if self._sampling_at is not None:
            self._sampling_at.cancel()
            self._sampling_at = None
        for job, _ in self._samples:
            self._answered(job)
            self.futures.fail(job.request_id, "the server is shutting down; submit the request again", "server")
        self._samples = []

    def accepted(self, model_id: str, seq_id: int) -> str | None:
        """The request id already given to this (model, seq_id), if any (a retry)."""
        lane = self._lanes.get(model_id)
        return None if lane is None else lane.accepted.get(seq_id)

    def forget_model(self, model_id: str) -> None:
        """Drop the model's lane; requests still waiting for a lower seq_id fail, never hang."""
        lane = self._lanes.pop(model_id, None)
        for seq_id, job in sorted(lane.waiting.items()) if lane else ():
            self.futures.fail(job.request_id, f"model {model_id} was unloaded before request {seq_id} could run", "user")

    # ---- execution -----------------------------------------------------------------------
    def _new_job(self, op: str, args: dict[str, Any], encode: Encoder, rejection: str | None = None) -> _Job:
        now = time.time()
        arrived = ARRIVED_AT.get()
        return _Job(self.futures.create(), op, args, encode, rejection,
                    arrived_at=now if arrived is None else arrived, submitted_at=now)

    def _dispatch(self, job: _Job) -> None:
        if job.rejection is not None:
            self.futures.fail(job.request_id, job.rejection, "user")
            return
        fut = self.pool.submit(WorkItem(job.request_id, job.op, job.args))
        fut.add_done_callback(lambda f: self._finish_item(job, f.result()))

    def _finish_item(self, job: _Job, res: WorkResult) -> None:
        self._finish(job, res)
        self.metrics.record(job.op, [job], res)

    def _finish(self, job: _Job, res: WorkResult) -> None:
        if res.error is not None:
            self.futures.fail(job.request_id, res.error, res.category)
            return
        try:
            payload, kind = job.encode(res.result)
        except Exception as e:  # noqa: BLE001 - an encoding bug must not leave the future pending
            log.exception("encoding the result of %s failed", job.request_id)
            self.futures.fail(job.request_id, f"could not encode the result: {e}", "server")
            return
        self.futures.complete(job.request_id, payload, kind)

    def _start_sampling(self) -> None:
        """Each waiting request (in arrival order) to the replica the router picks; one item per
        replica, or more where one would exceed `max_sample_rows`."""
        self._sampling_at = None
        batches: dict[int, list[tuple[list[_Job], int]]] = {}  # replica -> its (jobs, rows) items
        for job, n in self._samples:
            adapter = job.args.get("adapter") or {}
            replica = self.router.pick((job.args.get("base_model"), adapter.get("key")), job.args["prompt"], n)
            items = batches.setdefault(replica, [])
            if not items or items[-1][1] + n > self.max_sample_rows:
                items.append(([], 0))
            jobs, rows = items[-1]
            jobs.append(job)
            items[-1] = (jobs, rows + n)
        self._samples = []
        for replica, items in batches.items():
            for jobs, rows in items:
                item = WorkItem(jobs[0].request_id + "+batch", "sample", {"requests": [j.args for j in jobs]},
                                replica=replica)
                self.pool.submit(item).add_done_callback(
                    lambda f, jobs=jobs, replica=replica, rows=rows: self._finish_sampling(jobs, replica, rows, f.result()))

    def _finish_sampling(self, batch: list[_Job], replica: int, rows: int, res: WorkResult) -> None:
        self.router.done(replica, rows)
        for i, job in enumerate(batch):
            self._answered(job)
            if res.error is not None:
                self._finish(job, res)
            else:
                one = res.result[i]
                err = one.get("error") if isinstance(one, dict) else None
                self._finish(job, WorkResult(job.request_id, error=err, category=one.get("category", "server"))
                             if err else WorkResult(job.request_id, result=one))
        self.metrics.record("sample", batch, res, replica)
