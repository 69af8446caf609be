"""Frees the worker memory of training runs whose client session is gone.

A session is gone once its client called `finish`, or when no heartbeat came for
`timeout` seconds (the SDK beats every 10 s). Its loaded runs are unloaded exactly as
`unload_model` unloads one; their checkpoints stay, so they can be resumed from state.
"""
from __future__ import annotations

import asyncio
import logging
import time

from engine.registry import Registry
from engine.scheduler import Scheduler

log = logging.getLogger("tinkercloud.reaper")


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


async def reap_periodically(registry: Registry, scheduler: Scheduler, timeout: float, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        for model_id in abandoned_runs(registry, time.time(), timeout):
            log.info("unloading %s: its session finished or stopped sending heartbeats", model_id)
            unload_run(registry, scheduler, model_id)
