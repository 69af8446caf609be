"""What the server knows about sessions, training runs, samplers and checkpoints.

Ids follow the SDK's expectations: training runs are `<session>:train:<n>`, samplers
`<session>:sample:<n>`. Sessions, runs and samplers are kept in a diskcache under
`<data_dir>/registry`, so what the REST API lists survives a restart; which runs have an
adapter on the workers (`active`) is known only to the running process.

Checkpoints live on disk: `tinker://<run>/<kind>/<name>` is the folder
`<data_dir>/checkpoints/<run>/<kind>/<name>/` holding a PEFT adapter and our metadata file
(`META_FILE`: base model, LoRA flags, snapshot id, creation time, expiry, publicity, user
metadata). Paths are parsed strictly and a name can never leave that folder. Folders are
only ever swapped in whole; hidden folders (names starting with ".") are saves or deletions
in progress and are never listed. Expired checkpoints are removed whenever checkpoints are
looked up or listed.

The checkpoint methods are synchronous and block on the filesystem; the REST handlers call
them from worker threads, so two of them may run at once. They use only the folders (never
the in-memory maps), and a checkpoint whose folder disappears while it is being read (deleted
or expired by another call) is treated as gone.
"""
from __future__ import annotations

import json
import os
import queue
import re
import secrets
import shutil
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import diskcache

from engine.messages import UserError

CHECKPOINT_KINDS = ("weights", "sampler_weights", "external_weights")
META_FILE = "tinkercloud.json"  # our metadata, next to the PEFT files
PEFT_FILES = ("adapter_model.safetensors", "adapter_config.json")  # what downloads serve
MAX_TTL_SECONDS = 10 * 365 * 24 * 3600
DEFAULT_LORA_ALPHA = 32.0
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,127}$")
_RUN = re.compile(r"^[A-Za-z0-9\-]+:train:\d+$")


@dataclass
class LoraSpec:
    rank: int
    alpha: float = DEFAULT_LORA_ALPHA
    seed: int = 0
    train_attn: bool = True
    train_mlp: bool = True
    train_unembed: bool = False

    def flags(self) -> dict[str, Any]:
        """What a checkpoint records about the adapter (everything but the init seed)."""
        return {"rank": self.rank, "alpha": self.alpha, "train_attn": self.train_attn,
                "train_mlp": self.train_mlp, "train_unembed": self.train_unembed}


@dataclass
class Session:
    session_id: str
    created: float
    last_heartbeat: float
    user_metadata: dict[str, Any] = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)
    finished: str | None = None
    next_model_seq: int = 0


@dataclass
class TrainingRun:
    model_id: str
    session_id: str
    base_model: str
    lora: LoraSpec
    created: float
    user_metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class Sampler:
    sampler_id: str
    session_id: str
    base_model: str
    model_path: str | None  # tinker:// path it was created from, if any
    adapter: dict[str, Any] | None  # {"key", "path"?}: which frozen adapter the workers use


@dataclass(frozen=True)
class TinkerPath:
    run_id: str
    kind: str
    name: str

    def __str__(self) -> str:
        return f"tinker://{self.run_id}/{self.kind}/{self.name}"

    @property
    def checkpoint_id(self) -> str:
        return f"{self.kind}/{self.name}"


@dataclass
class CheckpointEntry:
    """A checkpoint as found on disk."""

    path: TinkerPath
    meta: dict[str, Any]
    size_bytes: int


def parse_tinker_path(path: str) -> TinkerPath:
    if not isinstance(path, str) or not path.startswith("tinker://"):
        raise UserError(f"checkpoint path must look like tinker://<run>/<kind>/<name>, got {path!r}")
    parts = path[len("tinker://"):].split("/")
    if len(parts) != 3:
        raise UserError(f"checkpoint path must have exactly three parts after tinker://, got {path!r}")
    return checkpoint_path(*parts)


def checkpoint_path(run_id: str, kind: str, name: str) -> TinkerPath:
    """A checked TinkerPath from its three parts (as REST routes give them)."""
    if kind not in CHECKPOINT_KINDS:
        raise UserError(f"checkpoint kind must be one of {CHECKPOINT_KINDS}, got {kind!r}")
    return TinkerPath(check_run_id(run_id), kind, check_checkpoint_name(name))


def check_checkpoint_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise UserError(f"checkpoint name {name!r} is invalid: use 1-128 letters, digits, '.', '_' or '-', "
                        "starting with a letter or digit")
    return name


def check_run_id(run_id: str) -> str:
    if not isinstance(run_id, str) or not _RUN.match(run_id):
        raise UserError(f"training run id {run_id!r} is not of the form <session>:train:<n>")
    return run_id


def check_ttl(ttl_seconds: Any) -> int | None:
    """None (never expires) or a whole number of seconds up to ten years."""
    if ttl_seconds is None:
        return None
    if isinstance(ttl_seconds, bool) or not isinstance(ttl_seconds, int) or not 1 <= ttl_seconds <= MAX_TTL_SECONDS:
        raise UserError(f"ttl_seconds must be a whole number of seconds from 1 to {MAX_TTL_SECONDS} "
                        f"(10 years) or null, got {ttl_seconds!r}")
    return ttl_seconds


def new_snapshot_id() -> str:
    """A fresh name for a frozen copy of an adapter (what samplers use on the workers)."""
    return f"snap-{uuid.uuid4().hex}"


def stamped(meta: dict[str, Any], now: float) -> dict[str, Any]:
    """`meta` with its creation time set to `now` and its expiry derived from its ttl."""
    ttl = meta.get("ttl_seconds")
    return {**meta, "created_at": now, "expires_at": None if ttl is None else now + ttl}


def write_json(path: Path, value: Any) -> None:
    """Write `path` in one step (a temporary file beside it, then a rename): a reader finds the
    whole old or the whole new content, never part of it."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)


def write_meta(folder: Path, meta: dict[str, Any]) -> None:
    """Replace a checkpoint's metadata file in one step."""
    write_json(folder / META_FILE, meta)


class Registry:
    def __init__(self, data_dir: str) -> None:
        root = Path(data_dir).resolve()
        self.checkpoint_root = root / "checkpoints"
        self._store = diskcache.Cache(str(root / "registry"))
        self.sessions: dict[str, Session] = {}
        self.runs: dict[str, TrainingRun] = {}
        self.samplers: dict[str, Sampler] = {}
        self.active: set[str] = set()  # runs whose adapter is on this process's workers
        # REST handlers change checkpoint metadata from worker threads: one read-modify-write at a time
        self._checkpoint_lock = threading.Lock()
        self._load()
        self.signing_key: bytes = self._store.get("signing_key") or self._new_signing_key()
        self._remove_hidden_folders()
        self.sweep_expired()

    # ---- persistence ---------------------------------------------------------------------
    def _load(self) -> None:
        started = time.time()
        for key in list(self._store.iterkeys()):
            kind, _, _ = str(key).partition("/")
            record = self._store.get(key)
            if kind == "session":
                # Heartbeats are not written to disk: this process has heard from no client yet,
                # so every session's silence counts from now (its own files are not deleted for
                # a silence that a restart made look long).
                self.sessions[record["session_id"]] = Session(**{**record, "last_heartbeat": started})
            elif kind == "run":
                self.runs[record["model_id"]] = TrainingRun(**{**record, "lora": LoraSpec(**record["lora"])})
            elif kind == "sampler":
                self.samplers[record["sampler_id"]] = Sampler(**record)

    def _save(self, kind: str, key: str, record: Any) -> None:
        self._store.set(f"{kind}/{key}", asdict(record))

    def _new_signing_key(self) -> bytes:
        key = secrets.token_bytes(32)
        self._store.set("signing_key", key)
        return key

    # ---- sessions ------------------------------------------------------------------------
    def new_session(self, user_metadata: dict | None, tags: list | None) -> Session:
        now = time.time()
        s = Session(str(uuid.uuid4()), now, now, dict(user_metadata or {}), list(tags or []))
        self.sessions[s.session_id] = s
        self._save("session", s.session_id, s)
        return s

    def session(self, session_id: str) -> Session:
        s = self.sessions.get(session_id)
        if s is None:
            raise LookupError(f"unknown session_id {session_id!r}")
        return s

    def finish_session(self, session_id: str, reason: str) -> Session:
        """The client ended the session (kept on disk: its files may then be deleted). The first
        reason given stands."""
        s = self.session(session_id)
        if not s.finished:
            s.finished = reason
            self._save("session", s.session_id, s)
        return s

    # ---- training runs -------------------------------------------------------------------
    def new_run(self, session_id: str, model_seq_id: int, base_model: str, lora: LoraSpec,
                user_metadata: dict | None) -> TrainingRun:
        """A new run, active from now on (its adapter is being created on the workers)."""
        session = self.session(session_id)
        if model_seq_id < 0:
            raise UserError(f"model_seq_id must be >= 0, got {model_seq_id}")
        model_id = f"{session_id}:train:{int(model_seq_id)}"
        if model_id in self.runs:
            raise UserError(f"model {model_id} already exists (model_seq_id {model_seq_id} reused)")
        session.next_model_seq = max(session.next_model_seq, int(model_seq_id) + 1)
        run = TrainingRun(model_id, session_id, base_model, lora, time.time(), dict(user_metadata or {}))
        self.runs[model_id] = run
        self.active.add(model_id)
        self._save("session", session_id, session)
        self._save("run", model_id, run)
        return run

    def run(self, model_id: str) -> TrainingRun:
        """An active run (one whose adapter is on the workers): what training requests need."""
        r = self.runs.get(model_id)
        if r is None:
            raise LookupError(f"unknown model_id {model_id!r}: create it with create_model first")
        if model_id not in self.active:
            raise LookupError(f"unknown model_id {model_id!r}: it is no longer loaded (unloaded, or the server "
                              "restarted); resume it with create_training_client_from_state")
        return r

    def training_run(self, model_id: str) -> TrainingRun:
        """Any run this server has known, loaded or not (for the REST API)."""
        check_run_id(model_id)
        r = self.runs.get(model_id)
        if r is None:
            raise LookupError(f"unknown training run {model_id!r}")
        return r

    def deactivate(self, model_id: str) -> None:
        self.active.discard(model_id)

    # ---- samplers ------------------------------------------------------------------------
    def new_sampler(self, session_id: str, seq: int, base_model: str, model_path: str | None,
                    adapter: dict | None) -> Sampler:
        sid = f"{session_id}:sample:{int(seq)}"
        s = Sampler(sid, session_id, base_model, model_path, adapter)
        self.samplers[sid] = s
        self._save("sampler", sid, s)
        return s

    def sampler(self, sampler_id: str) -> Sampler:
        s = self.samplers.get(sampler_id)
        if s is None:
            raise LookupError(f"unknown sampling_session_id {sampler_id!r}")
        return s

    # ---- checkpoints ---------------------------------------------------------------------
    def checkpoint_dir(self, p: TinkerPath) -> Path:
        d = (self.checkpoint_root / p.run_id / p.kind / p.name).resolve()
        if self.checkpoint_root not in d.parents:
            raise UserError(f"checkpoint path {p} escapes the checkpoint folder")
        return d

    def new_checkpoint_meta(self, p: TinkerPath, run: TrainingRun, ttl_seconds: Any,
                            user_metadata: Any) -> dict[str, Any]:
        """The metadata a save writes (the worker stamps the creation time when it writes)."""
        if user_metadata is not None and not (isinstance(user_metadata, dict) and all(
                isinstance(k, str) and isinstance(v, str) for k, v in user_metadata.items())):
            raise UserError("user_metadata must be an object of string keys and string values")
        return {"tinker_path": str(p), "kind": p.kind, "run_id": p.run_id, "name": p.name,
                "base_model": run.base_model, "lora": run.lora.flags(), "snapshot_id": new_snapshot_id(),
                "ttl_seconds": check_ttl(ttl_seconds), "public": False, "user_metadata": user_metadata or {}}

    def checkpoint(self, p: TinkerPath) -> CheckpointEntry:
        """The checkpoint at `p`; LookupError if it does not exist (or has expired)."""
        folder = self.checkpoint_dir(p)
        entry = self._entry(p, folder)
        if entry is None or self._expire(entry, time.time()):
            raise LookupError(f"checkpoint {p} does not exist")
        return entry

    def checkpoint_info(self, p: TinkerPath) -> dict[str, Any]:
        """The saved adapter's metadata; UserError if no such checkpoint exists."""
        try:
            return self.checkpoint(p).meta
        except LookupError as e:
            raise UserError(str(e)) from None

    def checkpoints(self, run_id: str | None = None) -> list[CheckpointEntry]:
        """Every live checkpoint (of one run, or of all), oldest first; removes expired ones."""
        now = time.time()
        found = [e for e in self._scan(run_id) if not self._expire(e, now)]
        return sorted(found, key=lambda e: (e.meta.get("created_at") or 0, str(e.path)))

    def update_checkpoint(self, p: TinkerPath, **changes: Any) -> CheckpointEntry:
        with self._checkpoint_lock:
            entry = self.checkpoint(p)
            entry.meta.update(changes)
            try:
                write_meta(self.checkpoint_dir(p), entry.meta)
            except FileNotFoundError:  # deleted meanwhile
                raise LookupError(f"checkpoint {p} does not exist") from None
            return entry

    def set_checkpoint_ttl(self, p: TinkerPath, ttl_seconds: Any) -> CheckpointEntry:
        ttl = check_ttl(ttl_seconds)
        return self.update_checkpoint(p, ttl_seconds=ttl, expires_at=None if ttl is None else time.time() + ttl)

    def delete_checkpoint(self, p: TinkerPath) -> None:
        with self._checkpoint_lock:
            self.checkpoint(p)
            _remove_folder(self.checkpoint_dir(p))

    def sweep_expired(self) -> None:
        self.checkpoints()

    def _scan(self, run_id: str | None) -> Iterator[CheckpointEntry]:
        runs = [self.checkpoint_root / check_run_id(run_id)] if run_id else _visible(self.checkpoint_root)
        for run_dir in runs:
            for kind in CHECKPOINT_KINDS:
                for folder in _visible(run_dir / kind):
                    try:
                        p = checkpoint_path(run_dir.name, kind, folder.name)
                    except UserError:
                        continue
                    entry = self._entry(p, folder)
                    if entry is not None:
                        yield entry

    @staticmethod
    def _entry(p: TinkerPath, folder: Path) -> CheckpointEntry | None:
        try:
            meta = json.loads((folder / META_FILE).read_text())
            size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file() and not f.name.startswith("."))
        except (OSError, ValueError):  # not a checkpoint, or removed while being read
            return None
        return CheckpointEntry(p, meta, size)

    def _expire(self, entry: CheckpointEntry, now: float) -> bool:
        """Remove `entry` if its time is up; True if it was removed."""
        expires = entry.meta.get("expires_at")
        if expires is None or expires > now:
            return False
        _remove_folder(self.checkpoint_dir(entry.path))
        return True

    def _remove_hidden_folders(self) -> None:
        """Saves and deletions cut short by a crash leave hidden folders; nobody else writes yet."""
        for run_dir in _visible(self.checkpoint_root):
            for kind in CHECKPOINT_KINDS:
                kind_dir = run_dir / kind
                if kind_dir.is_dir():
                    for folder in kind_dir.iterdir():
                        if folder.name.startswith("."):
                            shutil.rmtree(folder, ignore_errors=True)


def _visible(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    except (FileNotFoundError, NotADirectoryError):
        return []


def _remove_folder(folder: Path) -> None:
    """Hide the folder in one rename (it disappears from listings at once), then delete it in a
    background thread: a checkpoint can be large, and an expired one is removed by whichever
    lookup finds it, some of which run on the event loop. A hidden folder that a crash leaves
    behind is removed at the next start (`_remove_hidden_folders`)."""
    hidden = folder.parent / f".{folder.name}.deleted-{uuid.uuid4().hex}"
    try:
        os.replace(folder, hidden)
    except FileNotFoundError:
        return
    _start_remover()
    _REMOVALS.put(hidden)


def _start_remover() -> None:
    """Start the thread that deletes hidden folders, on the first removal (worker processes, which
    import this module too, never need it)."""
    global _remover
    with _remover_lock:
        if _remover is None:
            _remover = threading.Thread(target=_remove_hidden_folders_forever, name="tinkercloud-remove-checkpoint",
                                        daemon=True)
            _remover.start()


def _remove_hidden_folders_forever() -> None:
    while True:
        folder = _REMOVALS.get()
        shutil.rmtree(folder, ignore_errors=True)
        _REMOVALS.task_done()


# Hidden checkpoint folders to delete, one after another, off the caller's thread (`_remove_folder`).
# A daemon thread: shutting down does not wait for it; what it leaves is removed at the next start.
_REMOVALS: "queue.Queue[Path]" = queue.Queue()
_remover_lock = threading.Lock()
_remover: threading.Thread | None = None
