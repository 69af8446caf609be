"""Futures: the results of asynchronous requests, kept in diskcache so they survive a restart.

A future is created `pending` when a request is accepted, then completed with a payload
(JSON-able value or protobuf bytes) or failed with `{"error", "category"}`. Pollers wait on
an in-memory event with a deadline (long-poll). Futures still pending when the server
starts again belong to work that died with the old process: they are failed, not lost.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from typing import Any

import diskcache

FUTURE_TTL_SECONDS = 7 * 24 * 3600


@dataclass
class FutureRecord:
    state: str  # "pending" | "done" | "failed"
    kind: str = "json"  # payload encoding when done: "json" | "proto"
    payload: Any = None
    error: str | None = None
    category: str | None = None
    created: float = 0.0


class FutureStore:
    def __init__(self, path: str) -> None:
        # No size-based eviction: a pending future must never disappear (expiry bounds the size).
        self._cache = diskcache.Cache(path, eviction_policy="none")
        self._events: dict[str, asyncio.Event] = {}
        self._closing = False
        self._fail_orphans()

    def _fail_orphans(self) -> None:
        for key in list(self._cache.iterkeys()):
            rec = self._cache.get(key)
            if isinstance(rec, FutureRecord) and rec.state == "pending":
                rec.state, rec.error, rec.category = "failed", "the server restarted before this request finished; submit it again", "server"
                self._cache.set(key, rec, expire=FUTURE_TTL_SECONDS)

    def create(self) -> str:
        request_id = f"req-{uuid.uuid4().hex}"
        self._cache.set(request_id, FutureRecord("pending", created=time.time()), expire=FUTURE_TTL_SECONDS)
        self._events[request_id] = asyncio.Event()
        return request_id

    def complete(self, request_id: str, payload: Any, kind: str = "json") -> None:
        self._finish(request_id, FutureRecord("done", kind=kind, payload=payload))

    def fail(self, request_id: str, error: str, category: str = "server") -> None:
        self._finish(request_id, FutureRecord("failed", error=error, category=category))

    def _finish(self, request_id: str, rec: FutureRecord) -> None:
        old = self._cache.get(request_id)
        if isinstance(old, FutureRecord) and old.state != "pending":
            return  # first outcome wins (e.g. a late result after a worker-death failure)
        rec.created = old.created if isinstance(old, FutureRecord) else time.time()
        self._cache.set(request_id, rec, expire=FUTURE_TTL_SECONDS)
        event = self._events.pop(request_id, None)
        if event is not None:
            event.set()

    def get(self, request_id: str) -> FutureRecord | None:
        rec = self._cache.get(request_id)
        return rec if isinstance(rec, FutureRecord) else None

    async def wait(self, request_id: str, timeout: float) -> FutureRecord | None:
        """The record once it is no longer pending, or the pending record after `timeout`."""
        rec = self.get(request_id)
        if rec is None or rec.state != "pending" or self._closing:
            return rec
        event = self._events.get(request_id)
        if event is not None:
            try:
                await asyncio.wait_for(event.wait(), timeout)
            except asyncio.TimeoutError:
                pass
        return self.get(request_id)

    def release_waiters(self) -> None:
        """Answer every long-poll now (still pending): the server is shutting down."""
        self._closing = True
        for event in self._events.values():
            event.set()

    def close(self) -> None:
        self._cache.close()
