"""Client start-up, sessions, heartbeats, telemetry, capabilities and health."""
from __future__ import annotations

import logging
import time

from aiohttp import web

from handlers.common import json_body, need, opt, state

log = logging.getLogger("tinkercloud.sessions")


async def client_config(request: web.Request) -> web.Response:
    # Feature flags of the SDK (wire protocol §1.3); defaults suit this server. Proto
    # compression stays off: bodies come over loopback or a LAN. Custom losses made with
    # ServiceClient.create_custom_loss are uploaded and run here (handlers/custom_loss.py).
    return web.json_response({"custom_loss_server_side": True})


async def dynamic_config(request: web.Request) -> web.Response:
    return web.json_response({"refresh_interval_sec": 300})


async def create_session(request: web.Request) -> web.Response:
    body = await json_body(request)
    session = state(request).registry.new_session(opt(body, "user_metadata", dict, {}), opt(body, "tags", list, []))
    return web.json_response({"session_id": session.session_id, "type": "create_session"})


async def session_heartbeat(request: web.Request) -> web.Response:
    body = await json_body(request)
    session = state(request).registry.session(need(body, "session_id", str))
    session.last_heartbeat = time.time()
    return web.json_response({"type": "session_heartbeat"})


async def finish_session(request: web.Request) -> web.Response:
    body = await json_body(request)
    state(request).registry.finish_session(request.match_info["session_id"],
                                           str(opt(body, "reason", dict, {}).get("type", "success")))
    return web.json_response({})


async def telemetry(request: web.Request) -> web.Response:
    body = await json_body(request)
    for event in opt(body, "events", list, []):
        if not isinstance(event, dict):
            continue
        if event.get("event") == "UNHANDLED_EXCEPTION":
            log.warning("client %s reported %s: %s", body.get("session_id"), event.get("error_type"), event.get("error_message"))
    return web.json_response({"status": "accepted"})


async def get_server_capabilities(request: web.Request) -> web.Response:
    models = [
        {"model_name": name, "max_context_length": info["max_context"], "trainable": True, "sampleable": True}
        for name, info in sorted(state(request).models.items())
    ]
    return web.json_response({"supported_models": models})


async def healthz(request: web.Request) -> web.Response:
    pool = state(request).pool
    if pool.healthy:
        return web.json_response({"status": "ok", "workers": pool.pids()})
    return web.json_response({"status": "degraded", "reason": pool.failure}, status=503)
