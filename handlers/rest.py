"""REST routes of `tinker.RestClient` and the `tinker` CLI: runs, checkpoints, sessions, downloads.

Training runs and sessions come from the registry (persisted across restarts); checkpoints
are what is on disk, with expired ones removed as they are listed. Downloads are URLs of
this server signed with the registry's key: each names one file of one checkpoint (a PEFT
file, or `archive.tar` holding both) and carries its own expiry and an HMAC over both, so a
plain HTTP GET (urllib, curl) fetches it without an API key. `external_weights_urls` is what
`tinker checkpoint download` uses; `archive` answers older SDKs' archive-URL call with a
redirect to the tar.

Registry methods that touch checkpoint folders (scans, metadata reads and writes, deletions,
removal of expired checkpoints, tar archives) block, so these handlers run them in a worker
thread (`asyncio.to_thread`), keeping the event loop free for other requests.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import io
import json
import tarfile
import time
from datetime import datetime, timezone
from typing import Any

from aiohttp import web

from engine.messages import UserError
from engine.registry import PEFT_FILES, CheckpointEntry, Registry, TinkerPath, TrainingRun, checkpoint_path
from handlers.common import SIGNED_DOWNLOADS, error_response, json_body, state

CHECKPOINT_TYPES = {"weights": "training", "sampler_weights": "sampler", "external_weights": "external"}
ARCHIVE_FILE = "archive.tar"
SIGNED_URL_SECONDS = 3600
MODEL_OWNER = "local"
MAX_PAGE = 10_000


# ---- JSON shapes of the SDK's types ----------------------------------------------------------
def _iso(seconds: float | None) -> str | None:
    return None if seconds is None else datetime.fromtimestamp(seconds, timezone.utc).isoformat()


def _strings(metadata: dict[str, Any] | None) -> dict[str, str] | None:
    """The SDK types user_metadata as string -> string."""
    if not metadata:
        return None
    return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}


def _checkpoint_json(entry: CheckpointEntry) -> dict[str, Any]:
    meta = entry.meta
    return {
        "checkpoint_id": entry.path.checkpoint_id, "checkpoint_type": CHECKPOINT_TYPES[entry.path.kind],
        "time": _iso(meta.get("created_at", 0.0)), "tinker_path": str(entry.path), "size_bytes": entry.size_bytes,
        "public": bool(meta.get("public")), "user_metadata": _strings(meta.get("user_metadata")),
        "expires_at": _iso(meta.get("expires_at")),
    }


def _run_json(registry: Registry, run: TrainingRun) -> dict[str, Any]:
    """The run with its last checkpoints (scans its checkpoint folders: call off the event loop)."""
    checkpoints = registry.checkpoints(run.model_id)

    def last(kind: str) -> dict[str, Any] | None:
        found = [c for c in checkpoints if c.path.kind == kind]
        return _checkpoint_json(found[-1]) if found else None

    last_time = max([run.created, *(c.meta.get("created_at", 0.0) for c in checkpoints)])
    return {
        "training_run_id": run.model_id, "base_model": run.base_model, "model_owner": MODEL_OWNER, "is_lora": True,
        "corrupted": False, "lora_rank": run.lora.rank, "last_request_time": _iso(last_time),
        "last_checkpoint": last("weights"), "last_sampler_checkpoint": last("sampler_weights"),
        "user_metadata": _strings(run.user_metadata),
    }


def _page(request: web.Request, default_limit: int) -> tuple[int, int]:
    """(limit, offset) from the query string."""
    values = []
    for name, default in (("limit", default_limit), ("offset", 0)):
        raw = request.query.get(name, str(default))
        try:
            value = int(raw)
        except ValueError:
            raise UserError(f"query parameter {name} must be an integer, got {raw!r}") from None
        if not 0 <= value <= (MAX_PAGE if name == "limit" else 10**9):
            raise UserError(f"query parameter {name} is out of range: {value}")
        values.append(value)
    return values[0], values[1]


def _paged(items: list[Any], limit: int, offset: int) -> tuple[list[Any], dict[str, int]]:
    return items[offset: offset + limit], {"offset": offset, "limit": limit, "total_count": len(items)}


def _path_of(request: web.Request) -> TinkerPath:
    m = request.match_info
    return checkpoint_path(m["run_id"], m["kind"], m["name"])


# ---- training runs ---------------------------------------------------------------------------
async def list_training_runs(request: web.Request) -> web.Response:
    limit, offset = _page(request, 20)
    registry = state(request).registry
    runs = sorted(registry.runs.values(), key=lambda r: r.created, reverse=True)
    page, cursor = _paged(runs, limit, offset)
    listed = await asyncio.to_thread(lambda: [_run_json(registry, r) for r in page])
    return web.json_response({"training_runs": listed, "cursor": cursor})


async def get_training_run(request: web.Request) -> web.Response:
    registry = state(request).registry
    run = registry.training_run(request.match_info["run_id"])
    return web.json_response(await asyncio.to_thread(_run_json, registry, run))


# ---- checkpoints -----------------------------------------------------------------------------
async def list_run_checkpoints(request: web.Request) -> web.Response:
    registry = state(request).registry
    run = registry.training_run(request.match_info["run_id"])
    checkpoints = await asyncio.to_thread(registry.checkpoints, run.model_id)
    return web.json_response({"checkpoints": [_checkpoint_json(c) for c in checkpoints]})


async def list_checkpoints(request: web.Request) -> web.Response:
    """Every checkpoint on this server, newest first."""
    limit, offset = _page(request, 100)
    checkpoints = await asyncio.to_thread(state(request).registry.checkpoints)
    page, cursor = _paged(checkpoints[::-1], limit, offset)
    return web.json_response({"checkpoints": [_checkpoint_json(c) for c in page], "cursor": cursor})


async def delete_checkpoint(request: web.Request) -> web.Response:
    await asyncio.to_thread(state(request).registry.delete_checkpoint, _path_of(request))
    return web.json_response({})


async def publish_checkpoint(request: web.Request) -> web.Response:
    return await _set_public(request, True)


async def unpublish_checkpoint(request: web.Request) -> web.Response:
    return await _set_public(request, False)


async def _set_public(request: web.Request, public: bool) -> web.Response:
    # Not 409 (the hosted service's answer): the SDK retries a 409 for five minutes.
    registry, path = state(request).registry, _path_of(request)

    def change() -> None:
        if bool(registry.checkpoint(path).meta.get("public")) == public:
            raise UserError(f"checkpoint {path} is already {'public' if public else 'private'}")
        registry.update_checkpoint(path, public=public)

    await asyncio.to_thread(change)
    return web.json_response({})


async def set_checkpoint_ttl(request: web.Request) -> web.Response:
    body = await json_body(request)
    if "ttl_seconds" not in body:
        raise UserError("missing field 'ttl_seconds' (a number of seconds, or null to never expire)")
    await asyncio.to_thread(state(request).registry.set_checkpoint_ttl, _path_of(request), body["ttl_seconds"])
    return web.json_response({})


# ---- downloads -------------------------------------------------------------------------------
def _signature(key: bytes, path: TinkerPath, file: str, expires: int) -> str:
    message = f"{path.run_id}/{path.kind}/{path.name}/{file}\n{expires}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def _signed_url(request: web.Request, path: TinkerPath, file: str, expires: int) -> str:
    signature = _signature(state(request).registry.signing_key, path, file, expires)
    where = f"{SIGNED_DOWNLOADS}{path.run_id}/{path.kind}/{path.name}/{file}"
    return f"{request.url.origin()}{where}?expires={expires}&signature={signature}"


async def external_weights_urls(request: web.Request) -> web.Response:
    """Signed URLs of the checkpoint's PEFT files (adapter weights and adapter_config.json)."""
    path = _path_of(request)
    await asyncio.to_thread(state(request).registry.checkpoint, path)
    expires = int(time.time()) + SIGNED_URL_SECONDS
    return web.json_response({"urls": {f: _signed_url(request, path, f, expires) for f in PEFT_FILES},
                              "expires": _iso(expires)})


async def checkpoint_archive(request: web.Request) -> web.Response:
    """A redirect to a signed URL of a tar of the checkpoint's PEFT files."""
    path = _path_of(request)
    await asyncio.to_thread(state(request).registry.checkpoint, path)
    expires = int(time.time()) + SIGNED_URL_SECONDS
    url = _signed_url(request, path, ARCHIVE_FILE, expires)
    return web.json_response({"url": url, "expires": _iso(expires)}, status=302,
                             headers={"Location": url, "Expires": _http_date(expires)})


def _http_date(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%a, %d %b %Y %H:%M:%S GMT")


async def signed_download(request: web.Request) -> web.StreamResponse:
    """A file of a checkpoint, for whoever holds a valid signed URL (no API key needed)."""
    path, file = _path_of(request), request.match_info["file"]
    try:
        expires = int(request.query.get("expires", ""))
    except ValueError:
        return error_response(403, "this download URL is not signed (get one from external_weights_urls)")
    expected = _signature(state(request).registry.signing_key, path, file, expires)
    if not hmac.compare_digest(expected, request.query.get("signature", "")) or file not in (*PEFT_FILES, ARCHIVE_FILE):
        return error_response(403, "the download URL's signature is not valid")
    if expires < time.time():
        return error_response(403, "the download URL has expired; ask for a new one")
    registry = state(request).registry
    entry = await asyncio.to_thread(registry.checkpoint, path)
    folder = registry.checkpoint_dir(entry.path)
    if file != ARCHIVE_FILE:
        return web.FileResponse(folder / file)
    body = await asyncio.to_thread(_tar_of, folder)
    name = f"{path.run_id}_{path.kind}_{path.name}.tar".replace(":", "_")
    return web.Response(body=body, content_type="application/x-tar",
                        headers={"Content-Disposition": f'attachment; filename="{name}"'})


def _tar_of(folder) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for file in PEFT_FILES:
            tar.add(folder / file, arcname=file)
    return buffer.getvalue()


# ---- sessions --------------------------------------------------------------------------------
async def list_sessions(request: web.Request) -> web.Response:
    limit, offset = _page(request, 20)
    sessions = sorted(state(request).registry.sessions.values(), key=lambda s: s.created, reverse=True)
    page, _ = _paged(sessions, limit, offset)
    return web.json_response({"sessions": [s.session_id for s in page]})


async def get_session(request: web.Request) -> web.Response:
    registry = state(request).registry
    session = registry.session(request.match_info["session_id"])
    return web.json_response({
        "training_run_ids": [r.model_id for r in registry.runs.values() if r.session_id == session.session_id],
        "sampler_ids": [s.sampler_id for s in registry.samplers.values() if s.session_id == session.session_id],
        "user_metadata": _strings(session.user_metadata), "display_name": None,
    })
