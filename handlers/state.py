"""Typed application state shared by the handlers (one `web.AppKey`)."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from engine.config import Config
from engine.futures import FutureStore
from engine.pool import WorkerPool
from engine.registry import Registry
from engine.scheduler import Scheduler


@dataclass
class ServerState:
    config: Config
    pool: WorkerPool
    futures: FutureStore
    scheduler: Scheduler
    registry: Registry
    models: dict[str, dict[str, Any]]  # base model name -> ModelInfo fields (from the workers)
    # X-Idempotency-Key -> the response first given for it (bounded, oldest dropped first)
    idempotent: OrderedDict = field(default_factory=OrderedDict)
    sample_handles: dict[tuple[str, int], dict] = field(default_factory=dict)

    def model_info(self, base_model: str) -> dict[str, Any]:
        info = self.models.get(base_model)
        if info is None:
            raise LookupError(f"base model {base_model!r} is not served here; served: {sorted(self.models)}")
        return info


STATE = web.AppKey("state", ServerState)
