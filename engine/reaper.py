"""Frees the worker memory of training runs whose client session is gone, and what else the
session left behind.

A session's runs are unloaded once its client called `finish`, or when no heartbeat came for
`timeout` seconds (the SDK beats every 10 s), exactly as `unload_model` unloads one; their
checkpoints stay, so they can be resumed from state. Files kept for the session itself (its
uploaded custom losses) go once it finished, or after RETENTION_SECONDS without a heartbeat.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable

from engine.registry import Registry
from engine.scheduler import Scheduler

log = logging.getLogger("tinkercloud.reaper")

RETENTION_SECONDS = 7 * 24 * 3600  # a silent session's own files are kept this long (a week, like futures)


def unload_run(registry: Registry, scheduler: Scheduler, model_id: str) -> str:
    """Stop accepting requests for the run and free its adapter on the workers."""
    registry.deactivate(model_id)
    scheduler.forget_model(model_id)
    return scheduler.submit("remove_adapter", {"model_id": model_id},
                            lambda _: ({"model_id": model_id, "type": "unload_model"}, "json"))


def abandoned_runs(registry: Registry, now: float, timeout: float) -> list[str]:
    out = []
    for model_id in sorted(registry.active):
        session = registry.sessions.get(registry.runs[model_id].session_id)
        if session is None or session.finished or now - session.last_heartbeat > timeout:
            out.append(model_id)
    return out


def gone_sessions(registry: Registry, now: float, retention: float = RETENTION_SECONDS) -> set[str]:
    """Sessions whose client finished, or sent no heartbeat for `retention` seconds."""
    return {s.session_id for s in registry.sessions.values() if s.finished or now - s.last_heartbeat > retention}


async def reap_periodically(registry: Registry, scheduler: Scheduler, timeout: float, interval: float,
                            forget_sessions: Callable[[set[str]], Awaitable[None]] | None = None) -> None:
    """Every `interval` seconds: unload abandoned runs, and hand the gone sessions to
    `forget_sessions` (which deletes what is kept for them)."""
    while True:
        await asyncio.sleep(interval)
        for model_id in abandoned_runs(registry, time.time(), timeout):
            log.info("unloading %s: its session finished or stopped sending heartbeats", model_id)
            unload_run(registry, scheduler, model_id)
        if forget_sessions is not None:
            try:
                await forget_sessions(gone_sessions(registry, time.time()))
            except Exception:  # noqa: BLE001 - the reaper keeps reaping runs
                log.exception("could not delete the files of finished sessions")
