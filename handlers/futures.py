"""retrieve_future: long-polls a future and returns its result in the format the SDK expects.

A pending future is held open up to `long_poll_seconds` (the SDK re-polls `try_again` at
once, so an instant answer would spin). Forward/backward and sampling results are protobuf;
everything else is JSON; failures are in-band `{"error", "category"}`.
"""
from __future__ import annotations

from aiohttp import web

from handlers.common import error_response, json_body, need, state


async def retrieve_future(request: web.Request) -> web.Response:
    st = state(request)
    body = await json_body(request)
    request_id = need(body, "request_id", str)
    rec = await st.futures.wait(request_id, st.config.long_poll_seconds)
    if rec is None:
        return error_response(404, f"unknown request_id {request_id!r}")
    if rec.state == "pending":
        return web.json_response({"type": "try_again", "request_id": request_id, "queue_state": "active"})
    if rec.state == "failed":
        return web.json_response({"error": rec.error, "category": rec.category})
    if rec.kind == "proto":
        return web.Response(body=rec.payload, content_type="application/x-protobuf")
    return web.json_response(rec.payload)
