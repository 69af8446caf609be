"""What the server knows about sessions, training runs, samplers and checkpoints.

Ids follow the SDK's expectations: training runs are `<session>:train:<n>`, samplers
`<session>:sample:<n>`. Checkpoint paths are `tinker://<run>/<kind>/<name>`, parsed
strictly; they map to `<data_dir>/checkpoints/<run>/<kind>/<name>/` and a name can never
leave that folder.
"""
from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.messages import UserError

CHECKPOINT_KINDS = ("weights", "sampler_weights")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,127}$")
_RUN = re.compile(r"^[A-Za-z0-9\-]+:train:\d+$")
DEFAULT_LORA_ALPHA = 32.0


@dataclass
class LoraSpec:
    rank: int
    alpha: float = DEFAULT_LORA_ALPHA
    seed: int = 0
    train_attn: bool = True
    train_mlp: bool = True
    train_unembed: bool = False


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
    ready: bool = False  # the adapter exists on the workers


@dataclass
class Sampler:
    sampler_id: str
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


def parse_tinker_path(path: str) -> TinkerPath:
    if not isinstance(path, str) or not path.startswith("tinker://"):
        raise UserError(f"checkpoint path must look like tinker://<run>/<kind>/<name>, got {path!r}")
    parts = path[len("tinker://"):].split("/")
    if len(parts) != 3:
        raise UserError(f"checkpoint path must have exactly three parts after tinker://, got {path!r}")
    run_id, kind, name = parts
    if kind not in CHECKPOINT_KINDS:
        raise UserError(f"checkpoint kind must be one of {CHECKPOINT_KINDS}, got {kind!r} in {path!r}")
    check_run_id(run_id)
    check_checkpoint_name(name)
    return TinkerPath(run_id, kind, name)


def check_checkpoint_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise UserError(f"checkpoint name {name!r} is invalid: use 1-128 letters, digits, '.', '_' or '-', "
                        "starting with a letter or digit")
    return name


def check_run_id(run_id: str) -> str:
    if not _RUN.match(run_id or ""):
        raise UserError(f"training run id {run_id!r} is not of the form <session>:train:<n>")
    return run_id


class Registry:
    def __init__(self, data_dir: str) -> None:
        self.checkpoint_root = Path(data_dir).resolve() / "checkpoints"
        self.sessions: dict[str, Session] = {}
        self.runs: dict[str, TrainingRun] = {}
        self.samplers: dict[str, Sampler] = {}

    # ---- sessions ------------------------------------------------------------------------
    def new_session(self, user_metadata: dict | None, tags: list | None) -> Session:
        now = time.time()
        s = Session(str(uuid.uuid4()), now, now, dict(user_metadata or {}), list(tags or []))
        self.sessions[s.session_id] = s
        return s

    def session(self, session_id: str) -> Session:
        s = self.sessions.get(session_id)
        if s is None:
            raise LookupError(f"unknown session_id {session_id!r}")
        return s

    # ---- training runs -------------------------------------------------------------------
    def new_run(self, session_id: str, model_seq_id: int, base_model: str, lora: LoraSpec,
                user_metadata: dict | None) -> TrainingRun:
        session = self.session(session_id)
        model_id = f"{session_id}:train:{int(model_seq_id)}"
        if model_id in self.runs:
            raise UserError(f"model {model_id} already exists (model_seq_id {model_seq_id} reused)")
        session.next_model_seq = max(session.next_model_seq, int(model_seq_id) + 1)
        run = TrainingRun(model_id, session_id, base_model, lora, time.time(), dict(user_metadata or {}))
        self.runs[model_id] = run
        return run

    def run(self, model_id: str) -> TrainingRun:
        r = self.runs.get(model_id)
        if r is None:
            raise LookupError(f"unknown model_id {model_id!r}: create it with create_model first")
        return r

    # ---- samplers ------------------------------------------------------------------------
    def new_sampler(self, session_id: str, seq: int, base_model: str, model_path: str | None,
                    adapter: dict | None) -> Sampler:
        sid = f"{session_id}:sample:{int(seq)}"
        s = Sampler(sid, base_model, model_path, adapter)
        self.samplers[sid] = s
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

    def checkpoint_info(self, p: TinkerPath) -> dict[str, Any]:
        """The saved adapter's metadata; UserError if no such checkpoint exists."""
        meta = self.checkpoint_dir(p) / "tinkercloud.json"
        if not meta.is_file():
            raise UserError(f"checkpoint {p} does not exist")
        return json.loads(meta.read_text())
