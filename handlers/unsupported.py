"""Endpoints of the hosted Tinker service that a self-hosted server does not offer.

Each answers 404 with a message naming the endpoint and why, instead of a bare "Not Found"
(a 4xx, never 5xx/408/409/429, which the SDK would retry for minutes).
"""
from __future__ import annotations

from aiohttp import web

from handlers.common import error_response

WHY = {
    "copy_weights": "copy a checkpoint by saving it again from a training client instead",
    "project": "TinkerCloud has no projects",
    "trace_export": "TinkerCloud keeps no session traces",
    "audit": "TinkerCloud keeps no audit log",
    "billing": "TinkerCloud does not bill",
    "search": "list sessions with GET /api/v1/sessions instead",
}


def refuse(topic: str):
    async def handler(request: web.Request) -> web.Response:
        return error_response(404, f"{request.method} {request.path} is not supported by TinkerCloud: {WHY[topic]}")

    return handler
