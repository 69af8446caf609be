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


class BoundedDict(OrderedDict):
    """A dict that forgets its oldest entries beyond `limit` (for retry bookkeeping)."""

    def __init__(self, limit: int = 10_000) -> None:
        super().__init__()
        self.limit = limit

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        while len(self) > self.limit:
            self.popitem(last=False)


@dataclass
class ServerState:
    config: Config
    pool: WorkerPool
    futures: FutureStore
    scheduler: Scheduler
    registry: Registry
    models: dict[str, dict[str, Any]]  # base model name -> ModelInfo fields (from the workers)
    # X-Idempotency-Key -> the response first given for it
    idempotent: BoundedDict = field(default_factory=BoundedDict)
    # (sampling_session_id, seq_id) -> the asample handle first given for it
    sample_handles: BoundedDict = field(default_factory=BoundedDict)

    def model_info(self, base_model: str) -> dict[str, Any]:
        info = self.models.get(base_model)
        if info is None:
            raise LookupError(f"base model {base_model!r} is not served here; served: {sorted(self.models)}")
        return info


STATE = web.AppKey("state", ServerState)
