"""HTTP routes. This table is the one place that lists every endpoint the server answers.

Every handler is wrapped so that work it hands to the scheduler knows when its request
reached the handler (`engine.scheduler.ARRIVED_AT`, for the transport metrics).
"""
from __future__ import annotations

import functools
import time
from typing import Awaitable, Callable

from aiohttp import web

from engine.scheduler import ARRIVED_AT
from handlers import custom_loss, futures, metrics, rest, sampling, sessions, training, weights
from handlers.unsupported import refuse

V1 = "/api/v1"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def stamp_arrival(handler: Handler) -> Handler:
    @functools.wraps(handler)
    async def stamped(request: web.Request) -> web.StreamResponse:
        ARRIVED_AT.set(time.time())
        return await handler(request)

    return stamped


def routes() -> list[web.RouteDef]:
    table = [
        web.post(f"{V1}/client/config", sessions.client_config),
        web.post(f"{V1}/client/dynamic_config", sessions.dynamic_config),
        web.post(f"{V1}/create_session", sessions.create_session),
        web.post(f"{V1}/session_heartbeat", sessions.session_heartbeat),
        web.post(f"{V1}/sessions/{{session_id}}/finish", sessions.finish_session),
        web.post(f"{V1}/telemetry", sessions.telemetry),
        web.get(f"{V1}/get_server_capabilities", sessions.get_server_capabilities),
        web.get(f"{V1}/healthz", sessions.healthz),
        web.get(f"{V1}/health", sessions.healthz),
        web.get("/healthz", sessions.healthz),
        web.post(f"{V1}/create_model", training.create_model),
        web.post(f"{V1}/get_info", training.get_info),
        web.post(f"{V1}/unload_model", training.unload_model),
        web.post(f"{V1}/forward_backward", training.forward_backward),
        web.post(f"{V1}/optim_step", training.optim_step),
        web.post(f"{V1}/create_custom_loss", custom_loss.create_custom_loss),
        web.post(f"{V1}/save_weights_for_sampler", weights.save_weights_for_sampler),
        web.post(f"{V1}/save_weights", weights.save_weights),
        web.post(f"{V1}/save_weights_external", weights.save_weights_external),
        web.post(f"{V1}/load_weights", weights.load_weights),
        web.post(f"{V1}/weights_info", weights.weights_info),
        web.get(f"{V1}/training_runs", rest.list_training_runs),
        web.get(f"{V1}/training_runs/{{run_id}}", rest.get_training_run),
        web.get(f"{V1}/training_runs/{{run_id}}/checkpoints", rest.list_run_checkpoints),
        web.get(f"{V1}/checkpoints", rest.list_checkpoints),
        web.delete(f"{V1}/training_runs/{{run_id}}/checkpoints/{{kind}}/{{name}}", rest.delete_checkpoint),
        web.post(f"{V1}/training_runs/{{run_id}}/checkpoints/{{kind}}/{{name}}/publish", rest.publish_checkpoint),
        web.delete(f"{V1}/training_runs/{{run_id}}/checkpoints/{{kind}}/{{name}}/publish", rest.unpublish_checkpoint),
        web.put(f"{V1}/training_runs/{{run_id}}/checkpoints/{{kind}}/{{name}}/ttl", rest.set_checkpoint_ttl),
        web.get(f"{V1}/training_runs/{{run_id}}/checkpoints/{{kind}}/{{name}}/external_weights_urls",
                rest.external_weights_urls),
        web.get(f"{V1}/training_runs/{{run_id}}/checkpoints/{{kind}}/{{name}}/archive", rest.checkpoint_archive),
        web.get(f"{V1}/signed/{{run_id}}/{{kind}}/{{name}}/{{file}}", rest.signed_download),
        web.post(f"{V1}/sessions/search", refuse("search")),  # before sessions/{session_id}
        web.get(f"{V1}/sessions", rest.list_sessions),
        web.get(f"{V1}/sessions/{{session_id}}", rest.get_session),
        web.post(f"{V1}/create_sampling_session", sampling.create_sampling_session),
        web.get(f"{V1}/samplers/{{sampler_id}}", sampling.get_sampler),
        web.post(f"{V1}/asample", sampling.asample),
        web.post(f"{V1}/retrieve_future", futures.retrieve_future),
        web.post(f"{V1}/copy_weights", refuse("copy_weights")),
        web.put(f"{V1}/sessions/{{session_id}}/project", refuse("project")),
        web.get(f"{V1}/sessions/{{session_id}}/trace_export", refuse("trace_export")),
        web.get(f"{V1}/audit", refuse("audit")),
        web.get(f"{V1}/billing/usage/events", refuse("billing")),
        web.get(f"{V1}/billing/usage/checkpoints/current", refuse("billing")),
        web.get(f"{V1}/metrics", metrics.get_metrics),
    ]
    return [web.route(r.method, r.path, stamp_arrival(r.handler), **r.kwargs) for r in table]
