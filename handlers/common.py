"""What every handler shares: JSON field access, error mapping, auth, idempotent replies.

Mistakes in a request become HTTP 4xx with a JSON body naming the problem
(`{"error", "category": "user"}`); never a bodiless 4xx (the SDK treats those as proxy
failures) and never a 500 for the user's mistake.
"""
from __future__ import annotations

import json
import math
import logging
from typing import Any, Awaitable, Callable

from aiohttp import web

from engine.messages import UserError
from engine.scheduler import Encoder, as_json
from handlers.codec import WireFormatError
from handlers.state import STATE, ServerState

log = logging.getLogger("tinkercloud.http")
PUBLIC_PATHS = ("/api/v1/healthz", "/healthz", "/api/v1/health")
SIGNED_DOWNLOADS = "/api/v1/signed/"  # download URLs that carry their own signature instead of a key


def state(request: web.Request) -> ServerState:
    return request.app[STATE]


def error_response(status: int, message: str, category: str = "user") -> web.Response:
    return web.json_response({"error": message, "category": category}, status=status)


async def json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json(loads=json.loads)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise UserError("request body must be a JSON object")
    return body


def need(body: dict[str, Any], name: str, kind: type | tuple[type, ...] = object) -> Any:
    """A required field of the right JSON type (bool is not accepted as int)."""
    if name not in body or body[name] is None:
        raise UserError(f"missing required field {name!r}")
    value = body[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if (int in kinds or float in kinds) and isinstance(value, bool) and bool not in kinds:
        raise UserError(f"field {name!r} must be a number, got {value!r}")
    if float in kinds and isinstance(value, (int, float)) and not math.isfinite(value):
        raise UserError(f"field {name!r} must be a finite number, got {value!r}")
    if float in kinds and isinstance(value, int):
        return float(value)
    if not isinstance(value, kinds):
        names = "/".join(k.__name__ for k in kinds)
        raise UserError(f"field {name!r} must be {names}, got {type(value).__name__}")
    return value


def opt(body: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any) -> Any:
    return default if body.get(name) is None else need(body, name, kind)


@web.middleware
async def errors_middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
    try:
        return await handler(request)
    except (UserError, WireFormatError) as e:
        return error_response(400, str(e))
    except LookupError as e:
        return error_response(404, e.args[0] if e.args else str(e))
    except web.HTTPException as e:
        if e.status >= 400 and e.content_type != "application/json":
            return error_response(e.status, f"{e.reason}: {request.method} {request.path}")
        raise
    except Exception as e:  # noqa: BLE001 - answer with a body rather than a bare 500
        log.exception("unhandled error in %s %s", request.method, request.path)
        return error_response(500, f"internal server error: {type(e).__name__}: {e}", "server")


@web.middleware
async def auth_middleware(request: web.Request, handler):
    if request.path not in PUBLIC_PATHS and not request.path.startswith(SIGNED_DOWNLOADS):
        key = request.headers.get("X-API-Key", "")
        if key not in state(request).config.api_keys:
            return error_response(401, "missing or unknown API key (send it in the X-API-Key header)")
    return await handler(request)


def check_optimizer_config(body: dict[str, Any]) -> None:
    """A new run's optimizer: only AdamW is offered."""
    kind = opt(body, "optimizer_config", dict, {"type": "adamw"}).get("type", "adamw")
    if kind != "adamw":
        raise UserError(f"optimizer {kind!r} is not supported; use adamw")


def submit_in_order(request: web.Request, model_id: str, seq_id: int, op: str,
                    build: Callable[[], tuple[dict[str, Any], Encoder]]) -> dict[str, Any]:
    """Queue `op` as request `seq_id` of `model_id`. `build()` gives (args, encoder); if it raises
    UserError, the request still takes its turn (later seq_ids must not wait for ever) and its
    future fails with that message. A retry of an accepted seq_id gets the first request's
    future without building anything again."""
    scheduler = state(request).scheduler
    accepted = scheduler.accepted(model_id, seq_id)
    if accepted is not None:
        return {"request_id": accepted, "model_id": model_id}
    try:
        args, encode = build()
        rejection = None
    except (UserError, WireFormatError) as e:
        args, encode, rejection = None, as_json, str(e)
    rid = scheduler.submit_ordered(model_id, seq_id, op, args, encode, rejection)
    return {"request_id": rid, "model_id": model_id}


async def idempotent(request: web.Request, make: Callable[[], Awaitable[dict[str, Any]]]) -> web.Response:
    """Answer a retried submission (same X-Idempotency-Key) with the first answer, unexecuted."""
    key = request.headers.get("X-Idempotency-Key")
    memory = state(request).idempotent
    if key and key in memory:
        return web.json_response(memory[key])
    reply = await make()
    if key:
        memory[key] = reply
    return web.json_response(reply)
