"""HTTP routes. This table is the one place that lists every endpoint the server answers."""
from __future__ import annotations

from aiohttp import web

from handlers import futures, sampling, sessions, training, weights

V1 = "/api/v1"


def routes() -> list[web.RouteDef]:
    return [
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
        web.post(f"{V1}/save_weights_for_sampler", weights.save_weights_for_sampler),
        web.post(f"{V1}/create_sampling_session", sampling.create_sampling_session),
        web.get(f"{V1}/samplers/{{sampler_id}}", sampling.get_sampler),
        web.post(f"{V1}/asample", sampling.asample),
        web.post(f"{V1}/retrieve_future", futures.retrieve_future),
    ]
