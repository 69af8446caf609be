"""Transport metrics through the real server: GET /api/v1/metrics after real SDK work, its
auth, and sampling requests that arrive together (or one after another, gathered) running as
one batch on the workers."""
from __future__ import annotations

import gc
import http.client
import json

import pytest
from tinker import types

from tests.conftest import API_KEY, ServerProcess
from tests.helpers import RawClient, post_in_one_turn, sft_datum

QWEN = "tiny-qwen3"
STAGES = ("arrival_to_enqueued", "submit_to_enqueued", "enqueued_to_start", "compute", "end_to_stored",
          "arrival_to_start", "total")


def _metrics(server, api_key: str | None = API_KEY) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("GET", "/api/v1/metrics", headers={"X-API-Key": api_key} if api_key else {})
    r = conn.getresponse()
    body = json.loads(r.read())
    conn.close()
    return r.status, body


def _ops(server) -> dict:
    status, body = _metrics(server)
    assert status == 200, body
    return body["transport"]["ops"]


def _delta(after: dict, before: dict, op: str, field: str | None) -> int:
    """How much `after[op][field]` grew since `before` (`after[op]` itself with no field)."""
    if field is None:
        return after[op] - before.get(op, 0)
    return after[op][field] - before.get(op, {}).get(field, 0)


def test_metrics_need_the_api_key(server):
    for key in (None, "not-a-key"):
        status, body = _metrics(server, key)
        assert status == 401 and "API key" in body["error"]


def test_sdk_work_shows_its_bytes_and_latencies(service_client, server):
    before = _ops(server)
    tc = service_client.create_lora_training_client(QWEN, rank=4, seed=3).result()
    datum = sft_datum([9707, 1879, 11, 1075], [374, 100, 200, 300])
    tokens = len(datum.model_input.to_ints())
    tc.forward_backward([datum], "cross_entropy").result()
    tc.optim_step(types.AdamParams(learning_rate=1e-3)).result()
    prompt = types.ModelInput.from_ints([9707, 1879, 11])
    sampler = service_client.create_sampling_client(base_model=QWEN).result()
    sampler.sample(prompt, 1, types.SamplingParams(max_tokens=3, seed=1, stop=[])).result()
    after = _ops(server)

    for op in ("create_adapter", "forward_backward", "optim_step", "sample"):
        assert _delta(after, before, op, "items") == 1 and _delta(after, before, op, "requests") == 1, op
        assert _delta(after, before, op, "failed_items") == 0, op
    # forward_backward: int64 token ids and targets plus float weights go to the worker; float
    # logprobs come back (one worker: one copy of the request)
    assert _delta(after, before, "forward_backward", "request_bytes") >= tokens * (8 + 8 + 4)
    assert _delta(after, before, "forward_backward", "result_bytes") >= tokens * 4
    assert _delta(after, before, "sample", "request_bytes") >= len(prompt.to_ints()) * 8  # the int64 prompt
    # AdamW's parameters are plain numbers: nothing goes through shared memory for optim_step
    assert _delta(after, before, "optim_step", "request_bytes") == 0

    for op in ("forward_backward", "optim_step", "sample"):
        lat = after[op]["latency_ms"]
        assert set(lat) == set(STAGES)
        for stage, s in lat.items():
            assert s["count"] >= s["n"] >= 1 and s["sum"] >= 0, (op, stage, s)
            assert 0 <= s["p50"] <= s["p90"] <= s["max"] and 0 <= s["mean"] <= s["max"], (op, stage, s)
        # per request: total >= arrival->start and >= compute, so the maxima keep that order
        assert lat["total"]["max"] >= max(lat["arrival_to_start"]["max"], lat["compute"]["max"])
        assert lat["arrival_to_enqueued"]["max"] >= lat["submit_to_enqueued"]["max"] - 1e-3
    assert after["forward_backward"]["latency_ms"]["compute"]["max"] > 0


def test_sample_requests_that_arrive_together_run_as_one_batch(server):
    """Eight requests reach the server in the same event-loop turn (they are written while the
    server process is stopped, then it continues); the idle sampler must not start the first
    one alone."""
    raw = RawClient(server.url)
    sampler_id = raw.post("create_sampling_session", {"session_id": raw.session(), "sampling_session_seq_id": 0,
                                                      "base_model": QWEN}).json()["sampling_session_id"]
    bodies = [{"sampling_session_id": sampler_id, "seq_id": i, "num_samples": 1, "type": "sample",
               "prompt": {"chunks": [{"type": "encoded_text", "tokens": [11, 12, 13 + i]}]},
               "sampling_params": {"max_tokens": 2, "seed": i, "stop": []}} for i in range(8)]
    before = _ops(server)
    handles = post_in_one_turn(server, "/api/v1/asample", bodies)
    assert all(isinstance(raw.result(h["request_id"]), bytes) for h in handles)  # SampleResponses
    after = _ops(server)
    assert _delta(after, before, "sample", "requests") == 8
    assert _delta(after, before, "sample", "items") == 1  # one batch, not 1 + 7
    assert _delta(after["sample"]["replica_items"], before.get("sample", {}).get("replica_items", {}), "0", None) == 1


@pytest.fixture(scope="module")
def gathering_server(tiny_models, tmp_path_factory):
    """A server that gathers a sampling burst until no request has come for 100 ms (at most 0.5 s),
    wide enough that the SDK's requests of one burst are never 100 ms apart, even on a busy machine."""
    srv = ServerProcess(tmp_path_factory.mktemp("gathering"), {QWEN: tiny_models[QWEN]},
                        extra_args=("--sample-gather-ms", "100")).start()
    yield srv
    srv.stop()


def test_a_burst_sent_request_by_request_is_gathered_into_one_batch(gathering_server):
    """The SDK sends the requests of a burst one after another (a millisecond or so apart): an idle
    sampler gathers them and prefills them together, with the same samples as one at a time."""
    import tinker

    service = tinker.ServiceClient(base_url=gathering_server.url, api_key=API_KEY)
    sampler = service.create_sampling_client(base_model=QWEN).result()
    prompts = [types.ModelInput.from_ints([11, 12, 13 + i]) for i in range(8)]
    params = [types.SamplingParams(max_tokens=3, seed=i, stop=[]) for i in range(8)]
    alone = [sampler.sample(p, 1, sp).result().sequences[0].tokens for p, sp in zip(prompts[:2], params[:2])]
    before = _ops(gathering_server)
    gc.collect()  # this process's collector can pause it for over 100 ms: not in the middle of the burst
    futures = [sampler.sample(p, 1, sp) for p, sp in zip(prompts, params)]
    together = [f.result().sequences[0].tokens for f in futures]
    after = _ops(gathering_server)
    assert _delta(after, before, "sample", "requests") == 8
    assert _delta(after, before, "sample", "items") == 1  # gathered, not 1 + 7 or one per request
    assert together[:2] == alone  # seeded samples do not depend on their batch mates


def test_a_clients_burst_waits_for_as_many_requests_as_its_last_one(gathering_server):
    """A client whose last burst had 4 requests pauses for 4 quiet gaps after its second: the
    server waits for the other two (a client's bursts tend to repeat their size) and runs all four
    as one batch, where the quiet gap alone would have started the first two by themselves. The
    client is the SDK session: the second burst comes from a new sampling client of it, as an RL
    loop makes one at every step."""
    import time

    import tinker

    service = tinker.ServiceClient(base_url=gathering_server.url, api_key=API_KEY)
    sampler = service.create_sampling_client(base_model=QWEN).result()
    prompts = [types.ModelInput.from_ints([21, 22, 23 + i]) for i in range(4)]
    params = types.SamplingParams(max_tokens=2, seed=0, stop=[])
    for f in [sampler.sample(p, 1, params) for p in prompts]:  # its first burst: 4 requests
        f.result()
    sampler = service.create_sampling_client(base_model=QWEN).result()
    before = _ops(gathering_server)
    gc.collect()  # as above
    futures = [sampler.sample(p, 1, params) for p in prompts[:2]]
    time.sleep(0.4)  # 4 x the server's 100 ms quiet gap
    futures += [sampler.sample(p, 1, params) for p in prompts[2:]]
    assert all(f.result().sequences[0].tokens for f in futures)
    after = _ops(gathering_server)
    assert _delta(after, before, "sample", "requests") == 4
    assert _delta(after, before, "sample", "items") == 1  # one batch, not 2 + 2
