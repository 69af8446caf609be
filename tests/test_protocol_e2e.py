"""The wire protocol as the SDK relies on it: ordering, idempotency, long-poll, errors."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import tinker
from tinker import types
from tinker.proto import tinker_public_pb2 as pb

from tests.conftest import API_KEY
from tests.helpers import RawClient, fb_body, sft_datum

QWEN = "tiny-qwen3"


@pytest.fixture()
def raw(server):
    return RawClient(server.url)


def _tokens(n: int, start: int = 100) -> list[int]:
    return list(range(start, start + n))


def test_requests_run_in_seq_id_order_whatever_order_they_arrive_in(raw):
    model_id = raw.create_model(raw.session(), QWEN)
    data = [sft_datum(_tokens(4), _tokens(4, 300))]
    # optim_step (seq 2) arrives before the forward_backward (seq 1) whose gradients it applies.
    opt = raw.post("optim_step", {"model_id": model_id, "seq_id": 2, "type": "optim_step", "adam_params": {
        "learning_rate": 1e-3, "beta1": 0.9, "beta2": 0.95, "eps": 1e-12, "weight_decay": 0.0, "grad_clip_norm": 0.0}})
    fb = raw.post("forward_backward", content=fb_body(model_id, 1, data))
    assert raw.result(fb.json()["request_id"])  # proto bytes
    metrics = raw.result(opt.json()["request_id"])["metrics"]
    assert metrics["grad_norm:mean"] > 0, "optim_step ran before the forward_backward it follows"


def test_a_retried_submission_runs_once(raw):
    model_id = raw.create_model(raw.session(), QWEN)
    body = fb_body(model_id, 1, [sft_datum(_tokens(3), _tokens(3, 200))])
    headers = {"X-Idempotency-Key": "stainless-python-retry-abc"}
    first = raw.post("forward_backward", content=body, headers=headers).json()
    again = raw.post("forward_backward", content=body, headers=headers).json()
    other_key = raw.post("forward_backward", content=body, headers={"X-Idempotency-Key": "another"}).json()
    assert first["request_id"] == again["request_id"] == other_key["request_id"]  # same seq_id, same request


def test_futures_long_poll_and_unknown_ones_are_404(raw):
    r = raw.post("retrieve_future", {"request_id": "req-does-not-exist", "allow_metadata_only": True})
    assert r.status_code == 404 and "unknown request_id" in r.json()["error"]


def test_api_key_is_required_except_for_health(server):
    bad = RawClient(server.url, api_key="tml-wrong")
    r = bad.post("create_session", {"tags": [], "user_metadata": {}, "sdk_version": "0.38.0"})
    assert r.status_code == 401 and "API key" in r.json()["error"]
    assert bad.http.get("/api/v1/healthz").status_code == 200


def test_capabilities_list_the_served_models(server):
    import tinker

    caps = tinker.RestClient(base_url=server.url, api_key=API_KEY).get_server_capabilities().result()
    names = {m.model_name for m in caps.supported_models}
    assert names == {"tiny-qwen3", "tiny-llama"}


def _fails_with_user_error(fn, *needles):
    with pytest.raises(tinker.RequestFailedError) as info:
        fn()
    assert "user" in str(info.value.category).lower()
    for needle in needles:
        assert needle in str(info.value), str(info.value)


def test_bad_input_gets_clear_errors_while_another_client_trains(service_client, server, raw):
    # Another client trains the whole time; none of the bad requests may disturb it.
    other = service_client.create_lora_training_client(QWEN, rank=4, seed=11).result()
    good = [sft_datum(_tokens(6, 500), _tokens(6, 700))]
    other_losses, other_errors = [], []

    def train_other():
        try:
            for _ in range(12):
                other_losses.append(other.forward_backward(good, "cross_entropy").result().metrics["loss:sum"])
                other.optim_step(types.AdamParams(learning_rate=5e-3)).result()
        except Exception as e:  # noqa: BLE001 - reported below
            other_errors.append(e)

    thread = threading.Thread(target=train_other)
    thread.start()

    tc = service_client.create_lora_training_client(QWEN, rank=4).result()
    vocab = 151936
    out_of_vocab = types.Datum(model_input=types.ModelInput.from_ints([1, 2, vocab + 5]),
                               loss_fn_inputs={"target_tokens": [2, 3, 4], "weights": [1.0, 1.0, 1.0]})
    _fails_with_user_error(lambda: tc.forward_backward([out_of_vocab], "cross_entropy").result(), "vocabulary", str(vocab + 5))
    mismatch = types.Datum(model_input=types.ModelInput.from_ints([1, 2, 3]),
                           loss_fn_inputs={"target_tokens": [2, 3, 4], "weights": [1.0, 1.0]})
    _fails_with_user_error(lambda: tc.forward_backward([mismatch], "cross_entropy").result(), "weights", "2 entries")
    too_long = sft_datum(_tokens(2100, 10), [5])
    _fails_with_user_error(lambda: tc.forward([too_long], "cross_entropy").result(), "2048")
    target_oov = types.Datum(model_input=types.ModelInput.from_ints([1, 2]),
                             loss_fn_inputs={"target_tokens": [2, -1], "weights": [1.0, 1.0]})
    _fails_with_user_error(lambda: tc.forward([target_oov], "cross_entropy").result(), "target_tokens")
    # After all that, the same client still trains normally (its seq_ids stayed in order).
    ok = tc.forward_backward([good[0]], "cross_entropy").result()
    assert np.isfinite(ok.metrics["loss:sum"])

    # Requests the SDK would not send: raw HTTP.
    model_id = tc.model_id
    r = raw.post("forward_backward", content=b"\x08\x96\x01garbage\xff\xff")
    assert r.status_code == 400 and "protobuf" in r.json()["error"].lower()
    r = raw.post("forward_backward", content=fb_body("nobody:train:0", 1, good))
    assert r.status_code == 404 and "nobody:train:0" in r.json()["error"]
    body = pb.ForwardBackwardRequest.FromString(fb_body(model_id, 100, good))
    body.loss_fn = "no_such_loss"
    r = raw.post("forward_backward", content=body.SerializeToString())
    assert r.status_code == 200  # accepted into the model's order, then failed in-band
    thread.join(120)
    assert not other_errors, other_errors
    assert len(other_losses) == 12 and other_losses[-1] < other_losses[0]


def test_unknown_loss_fn_fails_in_band_naming_the_supported_ones(raw):
    model_id = raw.create_model(raw.session(), QWEN)
    body = pb.ForwardBackwardRequest.FromString(fb_body(model_id, 1, [sft_datum(_tokens(3), _tokens(3))]))
    body.loss_fn = "no_such_loss"
    handle = raw.post("forward_backward", content=body.SerializeToString()).json()
    result = raw.result(handle["request_id"])
    assert result["category"] == "user"
    assert "no_such_loss" in result["error"] and "cross_entropy" in result["error"]


def test_bad_sampling_requests_are_rejected_with_a_message(service_client, raw):
    sampler = service_client.create_sampling_client(base_model=QWEN).result()
    with pytest.raises(tinker.BadRequestError, match="vocabulary"):
        sampler.sample(types.ModelInput.from_ints([1, 999999]), 1, types.SamplingParams(max_tokens=2)).result()
    with pytest.raises(tinker.BadRequestError, match="maximum context"):
        sampler.sample(types.ModelInput.from_ints([1, 2]), 1, types.SamplingParams(max_tokens=5000)).result()
    r = raw.post("create_sampling_session", {"session_id": raw.session(), "sampling_session_seq_id": 0,
                                             "model_path": "tinker://x:train:0/sampler_weights/../../etc"})
    assert r.status_code == 400 and "three parts" in r.json()["error"]
    r = raw.post("create_sampling_session", {"session_id": raw.session(), "sampling_session_seq_id": 2,
                                             "model_path": "tinker://x:train:0/sampler_weights/..hidden"})
    assert r.status_code == 400 and "invalid" in r.json()["error"]
    r = raw.post("create_sampling_session", {"session_id": raw.session(), "sampling_session_seq_id": 1,
                                             "base_model": "no/such-model"})
    assert r.status_code == 404 and "no/such-model" in r.json()["error"]


def test_zstd_compressed_bodies_are_accepted(raw):
    import zstandard

    model_id = raw.create_model(raw.session(), QWEN)
    body = fb_body(model_id, 1, [sft_datum(_tokens(5), _tokens(3, 900))], forward_only=True)
    handle = raw.post("forward_backward", content=zstandard.ZstdCompressor().compress(body),
                      headers={"Content-Encoding": "zstd"}).json()
    out = pb.ForwardBackwardOutput.FromString(raw.result(handle["request_id"]))
    assert out.metrics["loss:sum"] > 0


def test_session_routes_and_unload_model(raw):
    session = raw.session()
    assert raw.post("session_heartbeat", {"session_id": session, "type": "session_heartbeat"}).status_code == 200
    assert raw.post("telemetry", {"events": [], "session_id": session}).json() == {"status": "accepted"}
    model_id = raw.create_model(session, QWEN)
    info = raw.post("get_info", {"model_id": model_id, "type": "get_info"}).json()
    assert info["lora_rank"] == 4 and info["lora_alpha"] == 32.0 and info["model_data"]["model_name"] == QWEN
    done = raw.result(raw.post("unload_model", {"model_id": model_id, "type": "unload_model"}).json()["request_id"])
    assert done["model_id"] == model_id
    r = raw.post("forward_backward", content=fb_body(model_id, 1, [sft_datum(_tokens(3), _tokens(3))]))
    assert r.status_code == 404 and "unknown model_id" in r.json()["error"]
    assert raw.post(f"sessions/{session}/finish", {"reason": {"type": "success"}, "detail": None}).status_code == 200
