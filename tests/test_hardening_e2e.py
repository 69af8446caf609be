"""Requests that once hung a client or misled the server (found in review), pinned down."""
from __future__ import annotations

import json

from tinker import types
from tinker.proto import tinker_public_pb2 as pb

from tests.helpers import RawClient, fb_body, sft_datum

QWEN = "tiny-qwen3"
ADAM = {"learning_rate": 1e-3, "beta1": 0.9, "beta2": 0.95, "eps": 1e-12, "weight_decay": 0.0, "grad_clip_norm": 0.0}


def _raw(server) -> tuple[RawClient, str]:
    raw = RawClient(server.url)
    return raw, raw.create_model(raw.session(), QWEN)


def test_undecodable_data_still_takes_its_turn(server):
    raw, model_id = _raw(server)
    msg = pb.ForwardBackwardRequest.FromString(fb_body(model_id, 1, [sft_datum([1, 2], [3])]))
    msg.data[0].model_input.add().image.data = b"\x89PNG"
    bad = raw.post("forward_backward", content=msg.SerializeToString()).json()
    assert "image" in raw.result(bad["request_id"])["error"]
    after = raw.post("optim_step", {"model_id": model_id, "seq_id": 2, "type": "optim_step", "adam_params": ADAM})
    assert "metrics" in raw.result(after.json()["request_id"], timeout=60)


def test_many_datums_come_back_whole(server):
    raw, model_id = _raw(server)
    data = [sft_datum([1 + i % 50], [2 + i % 50]) for i in range(600)]
    out = pb.ForwardBackwardOutput.FromString(
        raw.result(raw.post("forward_backward", content=fb_body(model_id, 1, data, forward_only=True)).json()["request_id"]))
    assert out.loss_fn_outputs[0].num_datums == 600


def test_a_retried_ephemeral_save_keeps_its_sampler_usable(server):
    raw, model_id = _raw(server)
    session = model_id.split(":")[0]
    body = {"model_id": model_id, "seq_id": 1, "sampling_session_seq_id": 0, "kind": "snapshot",
            "type": "save_weights_for_sampler"}
    first = raw.post("save_weights_for_sampler", body, headers={"X-Idempotency-Key": "a1"}).json()
    again = raw.post("save_weights_for_sampler", body, headers={"X-Idempotency-Key": "a2"}).json()
    assert first["request_id"] == again["request_id"]
    sampler_id = raw.result(first["request_id"])["sampling_session_id"]
    assert sampler_id == f"{session}:sample:0"
    handle = raw.post("asample", {"sampling_session_id": sampler_id, "seq_id": 0, "num_samples": 1,
                                  "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2, 3]}]},
                                  "sampling_params": {"max_tokens": 2}}).json()
    result = raw.result(handle["request_id"])
    assert isinstance(result, bytes), result  # a SampleResponse, not an error


def test_unloading_fails_requests_that_were_waiting(server):
    raw, model_id = _raw(server)
    waiting = raw.post("optim_step", {"model_id": model_id, "seq_id": 5, "type": "optim_step", "adam_params": ADAM})
    raw.result(raw.post("unload_model", {"model_id": model_id, "type": "unload_model"}).json()["request_id"])
    failed = raw.result(waiting.json()["request_id"], timeout=20)
    assert failed["category"] == "user" and "unloaded" in failed["error"]


def test_non_finite_numbers_and_huge_sparse_shapes_are_refused(server):
    raw, model_id = _raw(server)
    as_json = {"Content-Type": "application/json"}  # Python's json writes NaN/Infinity; httpx refuses to
    r = raw.post("create_model", content=json.dumps({"session_id": raw.session(), "model_seq_id": 0, "base_model": QWEN,
                                                     "lora_config": {"rank": 4, "alpha": float("nan")}}).encode(),
                 headers=as_json)
    assert r.status_code == 400 and "finite" in r.json()["error"]
    nan_lr = raw.post("optim_step", content=json.dumps({"model_id": model_id, "seq_id": 1, "type": "optim_step",
                                                        "adam_params": {**ADAM, "learning_rate": float("inf")}}).encode(),
                      headers=as_json)
    assert "finite" in raw.result(nan_lr.json()["request_id"])["error"]
    csr = types.TensorData(data=[1, 2], dtype="int64", shape=[5, 200_000_000],
                           sparse_crow_indices=[0, 1, 2, 2, 2, 2], sparse_col_indices=[0, 1])
    datum = types.Datum(model_input=types.ModelInput.from_ints([1, 2, 3, 4, 5]),
                        loss_fn_inputs={"target_tokens": csr, "weights": csr})
    big = raw.post("forward_backward", content=fb_body(model_id, 2, [datum]))
    assert "limit" in raw.result(big.json()["request_id"])["error"]
    assert raw.post("sessions/x/finish", {"reason": "oops"}).status_code in (400, 404)
    assert raw.post("telemetry", {"events": [1, "x"]}).json() == {"status": "accepted"}
