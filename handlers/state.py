"""Typed application state shared by the handlers (one `web.AppKey`), and the bounded maps and
the custom-loss store it holds."""
from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from backends.common.custom_loss import CustomLoss
from engine.config import Config
from engine.futures import FutureStore
from engine.messages import UserError
from engine.pool import WorkerPool
from engine.registry import Registry, write_json
from engine.scheduler import Scheduler

MAX_LOADED_LOSSES = 4096
MAX_SNAPSHOTS = 64  # sampler snapshots the workers keep in memory
LOSS_ID = re.compile(r"loss-[0-9a-f]{32}")
SESSION_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")  # the registry's uuid4s


class BoundedDict(OrderedDict):
    """A dict that forgets its oldest entries beyond `limit` (for retry bookkeeping)."""

    def __init__(self, limit: int = 10_000) -> None:
        super().__init__()
        self.limit = limit

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        while len(self) > self.limit:
            self.popitem(last=False)


class LruDict(BoundedDict):
    """A BoundedDict that forgets its least recently used entries: reading or writing an entry
    makes it the newest."""

    def __getitem__(self, key):
        value = super().__getitem__(key)
        self.move_to_end(key)
        return value

    def get(self, key, default=None):
        return self[key] if key in self else default

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        self.move_to_end(key)


class SnapshotUsage:
    """The sampler snapshots the workers keep in memory, least recently used first, as the server
    sees them: every save makes one and every sampling request uses one. The workers keep what
    this says (each save_for_sampler names the snapshots to drop), so all replicas keep the same
    ones, in least-recently-used order, although each sampling request reaches one replica only."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._keys: OrderedDict[str, None] = OrderedDict()

    def used(self, key: str | None) -> None:
        if key in self._keys:
            self._keys.move_to_end(key)

    def saved(self, key: str) -> list[str]:
        """A new snapshot; the least recently used ones beyond `limit`, for the workers to drop."""
        self._keys[key] = None
        dropped = []
        while len(self._keys) > self.limit:
            dropped.append(self._keys.popitem(last=False)[0])
        return dropped


@dataclass(frozen=True)
class StoredLoss:
    session_id: str  # the session that created it; only that session may use it
    loss: CustomLoss


class CustomLossStore:
    """Uploaded custom losses by loss_id, each written to `<folder>/<session_id>/<loss_id>.json`
    when it is created, so an id a client holds still works after a server restart; files of
    earlier versions, `<folder>/<loss_id>.json`, are still read.

    The most recently used losses are kept parsed in memory (an LRU); one that is not is read
    back from its file when a request names it, and checked against the allow-lists again. The
    losses of sessions that are gone (`forget_sessions`, from the reaper) are deleted.
    """

    def __init__(self, folder: Path, limit: int = MAX_LOADED_LOSSES) -> None:
        self.folder = folder
        self._loaded: LruDict = LruDict(limit)  # loss_id -> StoredLoss
        self._file_flat_losses()

    def _file_flat_losses(self) -> None:
        """Move files of the earlier flat layout into their sessions' folders, so they are
        deleted with their sessions too (at start-up, before the server answers anything)."""
        for file in self.folder.glob("loss-*.json") if self.folder.is_dir() else ():
            try:
                session_id = json.loads(file.read_text()).get("session_id")
            except (OSError, ValueError, AttributeError):
                continue  # unreadable: `find` reports it when asked
            if isinstance(session_id, str) and SESSION_ID.fullmatch(session_id):
                (self.folder / session_id).mkdir(exist_ok=True)
                os.replace(file, self.folder / session_id / file.name)

    async def add(self, session_id: str, loss: CustomLoss) -> str:
        """Store `loss` for `session_id` (the file is written off the event loop); its new loss_id."""
        loss_id = f"loss-{uuid.uuid4().hex}"
        await asyncio.to_thread(self._write, session_id, loss_id, {"session_id": session_id, **loss.wire})
        self._loaded[loss_id] = StoredLoss(session_id, loss)
        return loss_id

    async def prefetch(self, loss_id: str, session_id: str) -> None:
        """Read `loss_id` back from its file into memory (off the event loop) if it is not there,
        so that `find`, which runs on the event loop, never touches the disk. Problems are left
        for `find` to report, in the request's turn."""
        if isinstance(loss_id, str) and loss_id not in self._loaded:
            try:
                stored = await asyncio.to_thread(self._read, loss_id, session_id)
            except UserError:
                return
            if stored is not None:
                self._loaded[loss_id] = stored  # here, on the event loop: the LRU is not thread-safe

    def find(self, loss_id: str, session_id: str) -> CustomLoss:
        """The loss `loss_id`, if the session `session_id` created it; else UserError. Reads its
        file when it is not in memory (the handlers `prefetch` first, so that is rare)."""
        stored = self._loaded.get(loss_id)
        if stored is None:
            stored = self._read(loss_id, session_id)
            if stored is not None:
                self._loaded[loss_id] = stored
        if stored is None:
            raise UserError(f"unknown custom loss_id {loss_id!r} (create it with create_custom_loss on this server)")
        if stored.session_id != session_id:
            raise UserError(f"custom loss {loss_id!r} belongs to another session; create it in this one")
        return stored.loss

    async def forget_sessions(self, gone: set[str]) -> None:
        """Delete the losses of the sessions in `gone` (their files in a worker thread)."""
        removed = await asyncio.to_thread(self._remove_sessions, gone)
        for loss_id in [k for k, stored in self._loaded.items() if stored.session_id in removed]:
            del self._loaded[loss_id]

    def _remove_sessions(self, gone: set[str]) -> set[str]:
        """Remove the folders of the sessions in `gone` that have one; their ids."""
        try:
            have = {p.name for p in self.folder.iterdir() if p.is_dir()}
        except FileNotFoundError:
            return set()
        removed = have & gone
        for session_id in removed:
            shutil.rmtree(self.folder / session_id, ignore_errors=True)
        return removed

    def _files(self, session_id: str, loss_id: str) -> list[Path]:
        """Where the loss may be: its session's folder, then (files of earlier versions) the top."""
        top = self.folder / f"{loss_id}.json"
        return [self.folder / session_id / f"{loss_id}.json", top] if SESSION_ID.fullmatch(session_id) else [top]

    def _write(self, session_id: str, loss_id: str, record: dict[str, Any]) -> None:
        """Write the file in one step: a reader finds the whole record or none."""
        file = self._files(session_id, loss_id)[0]
        file.parent.mkdir(parents=True, exist_ok=True)
        write_json(file, record)

    def _read(self, loss_id: str, session_id: str) -> StoredLoss | None:
        """The stored loss from its file (parsed again), or None if there is no such loss (or it
        belongs to another session, whose folder is not looked in). Touches nothing in memory,
        so it may run in a worker thread."""
        if not LOSS_ID.fullmatch(loss_id):  # also keeps the name inside the folder
            return None
        record = None
        for file in self._files(session_id, loss_id):
            try:
                record = json.loads(file.read_text())
                break
            except FileNotFoundError:
                continue
            except (OSError, ValueError) as e:
                raise UserError(f"custom loss {loss_id!r} could not be read back ({type(e).__name__}); "
                                "create it again") from None
        if record is None:
            return None
        if not isinstance(record, dict) or not isinstance(record.get("session_id"), str):
            raise UserError(f"custom loss {loss_id!r} could not be read back (malformed record); create it again")
        return StoredLoss(record["session_id"], CustomLoss.from_wire(record))


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
    # uploaded custom losses, under <data_dir>/custom_losses
    custom_losses: CustomLossStore = field(init=False)
    # the sampler snapshots in the workers' memory (see SnapshotUsage)
    snapshots: SnapshotUsage = field(default_factory=lambda: SnapshotUsage(MAX_SNAPSHOTS))

    def __post_init__(self) -> None:
        self.custom_losses = CustomLossStore(Path(self.config.data_dir).resolve() / "custom_losses")

    def model_info(self, base_model: str) -> dict[str, Any]:
        info = self.models.get(base_model)
        if info is None:
            raise LookupError(f"base model {base_model!r} is not served here; served: {sorted(self.models)}")
        return info


STATE = web.AppKey("state", ServerState)
