"""Small helpers for tests that drive the real SDK or raw HTTP against a server process."""
from __future__ import annotations

import time
from typing import Any

import httpx
import numpy as np
from tinker import types
from tinker.proto.request_conv import forward_backward_request_to_proto

from tests.conftest import API_KEY


def sft_datum(prompt: list[int], completion: list[int]) -> types.Datum:
    """Next-token datum: weight 0 on the prompt's predictions, 1 on the completion's."""
    seq = prompt + completion
    weights = [0.0] * (len(prompt) - 1) + [1.0] * len(completion)
    return types.Datum(model_input=types.ModelInput.from_ints(seq[:-1]),
                       loss_fn_inputs={"target_tokens": seq[1:], "weights": weights})


def logprobs_of(result: types.ForwardBackwardOutput) -> list[np.ndarray]:
    return [np.asarray(o["logprobs"].to_numpy(), dtype=np.float64) for o in result.loss_fn_outputs]


def fb_body(model_id: str, seq_id: int, data: list[types.Datum], loss_fn: str = "cross_entropy",
            forward_only: bool = False) -> bytes:
    """A forward_backward request body exactly as the SDK encodes it."""
    req = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(data=data, loss_fn=loss_fn), model_id=model_id, seq_id=seq_id)
    msg = forward_backward_request_to_proto(req)
    msg.forward_only = forward_only
    return msg.SerializeToString()


class RawClient:
    """Plain HTTP to the server, for requests the SDK would refuse to send."""

    def __init__(self, url: str, api_key: str = API_KEY) -> None:
        self.http = httpx.Client(base_url=url, headers={"X-API-Key": api_key}, timeout=60)

    def post(self, path: str, json: Any = None, content: bytes | None = None, headers: dict | None = None):
        hdrs = dict(headers or {})
        if content is not None:
            hdrs.setdefault("Content-Type", "application/x-protobuf")
        return self.http.post(f"/api/v1/{path}", json=json, content=content, headers=hdrs)

    def get_json(self, path: str) -> tuple[int, Any]:
        r = self.http.get(f"/api/v1/{path}")
        return r.status_code, r.json()

    def session(self) -> str:
        return self.post("create_session", {"tags": [], "user_metadata": {}, "sdk_version": "0.38.0",
                                            "type": "create_session"}).json()["session_id"]

    def create_model(self, session_id: str, base_model: str, rank: int = 4, seq: int = 0) -> str:
        r = self.post("create_model", {"session_id": session_id, "model_seq_id": seq, "base_model": base_model,
                                       "lora_config": {"rank": rank}, "type": "create_model"})
        r.raise_for_status()
        return self.result(r.json()["request_id"])["model_id"]

    def result(self, request_id: str, timeout: float = 120) -> Any:
        """Poll a future until it is not `try_again`; JSON results as dicts, proto as bytes."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            r = self.post("retrieve_future", {"request_id": request_id, "allow_metadata_only": False})
            if r.headers.get("content-type", "").startswith("application/x-protobuf"):
                return r.content
            body = r.json()
            if body.get("type") != "try_again":
                return body
        raise TimeoutError(request_id)


def post_in_one_turn(server, path: str, bodies: list[dict]) -> list[dict]:
    """POST every body to `path` so that all of them reach the server in the same event-loop
    turn: keep-alive connections are opened first, the requests are written while the server
    process is stopped (SIGSTOP), then it continues. Returns the JSON answers, in order."""
    import http.client
    import json as json_module
    import os
    import signal

    conns = [http.client.HTTPConnection("127.0.0.1", server.port, timeout=60) for _ in bodies]
    for conn in conns:  # open keep-alive connections the server is already reading
        conn.request("GET", "/api/v1/healthz")
        conn.getresponse().read()
    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        for conn, body in zip(conns, bodies):
            conn.request("POST", path, body=json_module.dumps(body),
                         headers={"X-API-Key": API_KEY, "Content-Type": "application/json"})
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
    answers = []
    for conn in conns:
        r = conn.getresponse()
        answers.append(json_module.loads(r.read()))
        conn.close()
        assert r.status == 200, answers[-1]
    return answers
