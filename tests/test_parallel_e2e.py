"""Data and pipeline parallelism through the whole stack: 2 CPU workers as DP=2 (TP=1) and as
PP=2 (TP=1) each equal one worker.

DP: each rank runs a contiguous share of the batch (3 datums: 2 + 1; 1 datum: one rank has
none), rank 0 gathers the outputs in batch order, and the optimizer step sums gradients over
DP once. PP: each stage holds one of the two layers (the first the embedding, the last the
output layer), megatron-core's 1F1B schedule runs the micro-batches, and the sampler passes
hidden states stage to stage. Compared with the shared one-worker server: logprobs, per-token
losses, `loss:sum`, grad norms and the weights after each step (a huge Adam eps makes the step
proportional to the gradient, so equal weights after it mean equal gradients), sampling and a
checkpoint round trip; a loss that fails on one rank only (a DP share, or the last stage) fails
the request on all of them without a hang. A layout that does not divide the workers is
refused at start-up.

With DP=2 both replicas may be sampling when a training step arrives: it runs between decode
steps only once every replica is ready for it, and a replica that cannot run it yet (its batch
closed by a request of another base model) does not stop the other from decoding.
"""
from __future__ import annotations

import time

import numpy as np
import pytest
import tinker
from tinker import types

from engine.config import Config
from tests.conftest import API_KEY, ServerProcess
from tests.helpers import RawClient, logprobs_of, post_in_one_turn, sft_datum

QWEN = "tiny-qwen3"
SEQS = [[151644, 872, 198, 9707, 1879, 0, 17, 4, 3, 9, 100, 2000, 30000, 151645],
        [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15],
        [42, 43, 44, 45, 46, 47]]
LINEAR_STEP = types.AdamParams(learning_rate=1.0, eps=1e3)


def _data(n: int) -> list[types.Datum]:
    return [sft_datum(s[:3], s[3:]) for s in SEQS[:n]]


LAYOUTS = {"dp2": ("--tp", "1"), "pp2": ("--tp", "1", "--pp", "2")}
LOGGED = {"dp2": "tp=1 x pp=1 x dp=2", "pp2": "tp=1 x pp=2 x dp=1"}


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def server_dp2(request, tiny_models, tmp_path_factory):
    """A two-worker server: DP=2, then PP=2."""
    srv = ServerProcess(tmp_path_factory.mktemp(request.param), {QWEN: tiny_models[QWEN]}, workers=2,
                        extra_args=LAYOUTS[request.param]).start()
    assert LOGGED[request.param] in srv.log_path.read_text()
    yield srv
    srv.stop()


def _client(url: str) -> tinker.ServiceClient:
    return tinker.ServiceClient(base_url=url, api_key=API_KEY)


def _train(url: str, n: int) -> dict:
    """Two steps on an n-datum batch; the second accumulates two forward_backward calls."""
    tc = _client(url).create_lora_training_client(QWEN, rank=4, seed=3).result()
    data = _data(n)
    out = {"lp0": logprobs_of(tc.forward(data, "cross_entropy").result())}
    fb = tc.forward_backward(data, "cross_entropy").result()
    out["loss"] = fb.metrics["loss:sum"]
    out["elementwise"] = [o["elementwise_loss"].to_numpy() for o in fb.loss_fn_outputs]
    out["norm1"] = tc.optim_step(types.AdamParams(learning_rate=1e-2)).result().metrics["grad_norm:mean"]
    tc.forward_backward(data, "cross_entropy").result()
    tc.forward_backward(data[::-1], "cross_entropy").result()
    out["norm2"] = tc.optim_step(LINEAR_STEP).result().metrics["grad_norm:mean"]
    out["lp2"] = logprobs_of(tc.forward(data, "cross_entropy").result())
    out["client"] = tc
    return out


def _assert_close_lists(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, atol=1e-5, rtol=0)


@pytest.mark.parametrize("datums", [3, 1, 2])
def test_two_workers_match_one_worker(server, server_dp2, datums):
    one, two = _train(server.url, datums), _train(server_dp2.url, datums)
    for key in ("lp0", "elementwise", "lp2"):
        _assert_close_lists(two[key], one[key])
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-6)
    assert two["norm1"] == pytest.approx(one["norm1"], rel=1e-5)
    assert two["norm2"] == pytest.approx(one["norm2"], rel=1e-5)


def test_sampling_and_checkpoints_after_data_parallel_training(server, server_dp2):
    one, two = _train(server.url, 3), _train(server_dp2.url, 3)
    params = types.SamplingParams(max_tokens=8, temperature=1.0, seed=11, stop=[])
    prompt = types.ModelInput.from_ints(SEQS[0][:5])
    samples = []
    for run in (one, two):  # concurrent requests: DP replicas each take a share of a batch
        sampler = run["client"].save_weights_and_get_sampling_client().result()
        futures = [sampler.sample(types.ModelInput.from_ints(s[:4]), 2,
                                  types.SamplingParams(max_tokens=8, temperature=1.0, seed=11 + i, stop=[]))
                   for i, s in enumerate(SEQS)] + [sampler.sample(prompt, 2, params)]
        samples.append([s for f in futures for s in f.result().sequences])
    assert [s.tokens for s in samples[1]] == [s.tokens for s in samples[0]]
    np.testing.assert_allclose([s.logprobs for s in samples[1]], [s.logprobs for s in samples[0]], atol=1e-5)

    saved = two["client"].save_state("dp2").result().path
    resumed = _client(server_dp2.url).create_training_client_from_state_with_optimizer(saved).result()
    _assert_close_lists(logprobs_of(resumed.forward(_data(3), "cross_entropy").result()), two["lp2"])
    norms = [tc.forward_backward(_data(3), "cross_entropy").result() and
             tc.optim_step(LINEAR_STEP).result().metrics["grad_norm:mean"] for tc in (two["client"], resumed)]
    assert norms[1] == pytest.approx(norms[0], rel=1e-6)


def _sample_bodies(raw: RawClient, n: int, max_tokens: int) -> list[dict]:
    sampler_id = raw.post("create_sampling_session", {"session_id": raw.session(), "sampling_session_seq_id": 0,
                                                      "base_model": QWEN}).json()["sampling_session_id"]
    return [{"sampling_session_id": sampler_id, "seq_id": i, "num_samples": 1, "type": "sample",
             "prompt": {"chunks": [{"type": "encoded_text", "tokens": SEQS[i % 3][:4]}]},
             "sampling_params": {"max_tokens": max_tokens, "seed": i, "stop": []}} for i in range(n)]


def _replica_items(server) -> dict[str, int]:
    status, body = RawClient(server.url).get_json("metrics")
    assert status == 200, body
    return body["transport"]["ops"].get("sample", {}).get("replica_items", {})


def test_a_burst_of_sampling_requests_is_spread_over_the_data_parallel_replicas(server_dp2):
    """Eight requests that reach the server in one event-loop turn: with DP=2 each replica gets
    one item of four (its ranks alone run it); with PP=2 there is one replica, which gets all."""
    raw = RawClient(server_dp2.url)
    before = _replica_items(server_dp2)
    handles = post_in_one_turn(server_dp2, "/api/v1/asample", _sample_bodies(raw, 8, 3))
    assert all(isinstance(raw.result(h["request_id"]), bytes) for h in handles)  # SampleResponses
    after = _replica_items(server_dp2)
    grew = {r: n - before.get(r, 0) for r, n in after.items() if n != before.get(r, 0)}
    assert grew == ({"0": 1, "1": 1} if "dp=2" in server_dp2.log_path.read_text() else {"0": 1})


def test_replicas_sample_on_their_own_and_training_runs_between_decode_steps(server_dp2):
    """A long generation runs on one replica; short ones, which go to the other replica (DP=2) or
    join the running batch (PP=2), are answered before it ends. A training step submitted while
    it runs needs every rank: the replica that samples runs it between two decode steps (its
    tensors were read from the queue there, inside inference mode), the other one at once, so it
    too is answered before the long one ends. Nothing hangs."""
    run = _client(server_dp2.url).create_lora_training_client(QWEN, rank=4, seed=3).result()
    sampler = run.save_weights_and_get_sampling_client().result()
    long = sampler.sample(types.ModelInput.from_ints(SEQS[1][:4]), 1,
                          types.SamplingParams(max_tokens=2000, temperature=1.0, seed=5, stop=[]))
    time.sleep(0.3)  # the long one is running
    short = [sampler.sample(types.ModelInput.from_ints(s[:4]), 1,
                            types.SamplingParams(max_tokens=2, temperature=1.0, seed=i, stop=[]))
             for i, s in enumerate(SEQS)]
    assert [len(f.result(timeout=120).sequences[0].tokens) for f in short] == [2, 2, 2]
    assert not long.done()  # the short ones did not wait for it
    fb = run.forward_backward(_data(3), "cross_entropy")
    step = run.optim_step(types.AdamParams(learning_rate=1e-2))
    assert np.isfinite(fb.result(timeout=300).metrics["loss:sum"])
    assert step.result(timeout=120).metrics["grad_norm:mean"] > 0
    assert not long.done()  # the training step did not wait for it either
    assert len(long.result(timeout=300).sequences[0].tokens) == 2000


def test_the_next_turn_goes_to_the_replica_whose_prefix_cache_holds_the_first(server_dp2):
    """Four first turns reach the server in one event-loop turn (DP=2: two per replica); their
    next turns (each first turn, its answer and two new tokens) arrive in the opposite order, which
    the least-loaded choice alone would send to the other replicas. Every one of them reuses its
    first turn's K/V from the prefix cache."""
    from tinker.proto.response_conv import deserialize_sample_response

    raw = RawClient(server_dp2.url)
    first_turns = _sample_bodies(raw, 4, 4)
    for i, body in enumerate(first_turns):
        body["prompt"]["chunks"][0]["tokens"] = [3000 + 100 * i + t for t in range(48)]
    answers = [deserialize_sample_response(raw.result(h["request_id"]))
               for h in post_in_one_turn(server_dp2, "/api/v1/asample", first_turns)]
    assert all(a.prompt_cache_hit_tokens == 0 for a in answers)
    next_turns = []
    for i, (body, answer) in enumerate(zip(first_turns, answers)):
        tokens = body["prompt"]["chunks"][0]["tokens"] + answer.sequences[0].tokens + [7, 8]
        next_turns.append({**body, "seq_id": 10 + i, "prompt": {"chunks": [{"type": "encoded_text", "tokens": tokens}]}})
    handles = post_in_one_turn(server_dp2, "/api/v1/asample", next_turns[::-1])
    hits = [deserialize_sample_response(raw.result(h["request_id"])).prompt_cache_hit_tokens for h in handles]
    assert all(hit >= 48 for hit in hits), hits  # the first turn at least (and the answer's K/V)


def test_every_replica_keeps_the_same_in_memory_samplers(server_dp2):
    """Samplers saved without a path live only in memory, 64 of them, the least recently used out.
    Sampling reaches one replica at a time, yet every replica must keep the same ones: after 64
    newer saves, the first sampler, used once since, is still there for every request, whichever
    replica takes it; the second, never used, is gone for every request."""
    run = _client(server_dp2.url).create_lora_training_client(QWEN, rank=4, seed=3).result()
    first, second = (run.save_weights_and_get_sampling_client().result() for _ in range(2))
    params = types.SamplingParams(max_tokens=2, temperature=1.0, seed=1, stop=[])
    prompt = types.ModelInput.from_ints(SEQS[2][:4])
    newer = [run.save_weights_and_get_sampling_client().result() for _ in range(62)]
    assert len(first.sample(prompt, 1, params).result().sequences[0].tokens) == 2  # one replica uses it
    newer.append(run.save_weights_and_get_sampling_client().result())  # the 65th: the least recently used goes

    def outcomes(sampler) -> list:
        got = []
        for f in [sampler.sample(prompt, 1, params) for _ in range(4)]:  # spread over the replicas
            try:
                got.append(len(f.result().sequences[0].tokens))
            except tinker.RequestFailedError as e:
                got.append("gone" if "no longer in memory" in str(e) else str(e))
        return got

    assert outcomes(second) == ["gone"] * 4
    assert outcomes(first) == [2] * 4
    assert outcomes(newer[-1]) == [2] * 4


def _sft_loss(logprobs, weights):
    return -(logprobs * weights).sum(), {"custom/lp:mean": logprobs.mean(), "custom/loss:sum": -(logprobs * weights).sum()}


def _sixth_token(logprobs, weights):
    return -logprobs[5], {}


def test_custom_loss_metrics_and_errors_on_one_rank_only(server, server_dp2):
    results = {}
    for name, srv in (("one", server), ("two", server_dp2)):
        client = _client(srv.url)
        handle = client.create_custom_loss(_sft_loss, {"logprobs": 1, "weights": 1}).result()
        tc = client.create_lora_training_client(QWEN, rank=4, seed=3).result()
        results[name] = tc.forward_backward_custom(_data(3), handle).result().metrics
    for key in ("custom/lp:mean", "custom/loss:sum"):
        assert results["two"][key] == pytest.approx(results["one"][key], rel=1e-5)

    # The third datum has 5 targets, so only DP rank 1 (which holds it), or only the last
    # pipeline stage, fails: the other rank must not wait for it for ever, the caller gets the
    # error, and the workers keep serving.
    client = _client(server_dp2.url)
    handle = client.create_custom_loss(_sixth_token, {"logprobs": 1, "weights": 1}).result()
    tc = client.create_lora_training_client(QWEN, rank=4, seed=3).result()
    with pytest.raises(tinker.RequestFailedError, match="index 5"):
        tc.forward_backward_custom(_data(3), handle).result()
    assert tc.forward_backward(_data(3), "cross_entropy").result().metrics["loss:sum"] > 0


def test_a_tp_that_does_not_divide_the_workers_is_refused_at_start_up(tiny_models, tmp_path):
    srv = ServerProcess(tmp_path, {QWEN: tiny_models[QWEN]}, workers=2, extra_args=("--tp", "3"))
    with pytest.raises(RuntimeError, match="--tp 3 x --pp 1 does not divide --workers 2"):
        srv.start(timeout=60)
    srv.stop()


def test_tp_comes_from_the_flag_or_the_environment(monkeypatch):
    monkeypatch.setenv("TINKERCLOUD_TP", "2")
    assert Config.from_args(["--workers", "4"]).tp == 2
    assert Config.from_args(["--workers", "4", "--tp", "1"]).tp == 1
    with pytest.raises(ValueError, match="TINKERCLOUD_TP"):
        Config(tp=-1)


@pytest.mark.parametrize("tp, pp, dp", [(1, 1, 2), (2, 1, 2), (1, 2, 2), (2, 2, 2), (2, 2, 3), (4, 1, 1)])
def test_replica_ranks_are_megatron_cores_model_parallel_groups(tp, pp, dp):
    """The server sends a sampling item to one replica's ranks (`ParallelDims.replica_ranks`);
    they must be the model-parallel group megatron-core builds for that DP index, leader first."""
    from megatron.core.parallel_state import RankGenerator

    from backends.miles.parallel import ParallelDims

    dims = ParallelDims(tp=tp, pp=pp, dp=dp)
    groups = RankGenerator(tp=tp, ep=1, dp=dp, pp=pp, cp=1, order="tp-cp-ep-dp-pp").get_ranks("tp-pp")
    assert sorted(sorted(dims.replica_ranks(d)) for d in range(dp)) == sorted(sorted(g) for g in groups)
    data_parallel = RankGenerator(tp=tp, ep=1, dp=dp, pp=pp, cp=1, order="tp-cp-ep-dp-pp").get_ranks("dp")
    for d in range(dp):
        leader = dims.replica_ranks(d)[0]
        assert leader < tp * dp and leader % tp == 0  # first stage, TP rank 0
        assert next(g for g in data_parallel if leader in g).index(leader) == d  # its DP index is d


def test_micro_batches_keep_order_and_respect_the_token_budget():
    from backends.miles.parallel import micro_batches

    assert micro_batches([3, 3, 3, 10, 1, 1], 9) == [[0, 1, 2], [3], [4, 5]]
    assert micro_batches([], 5) == [] and micro_batches([20], 5) == [[0]]


def test_layout_is_chosen_from_checkpoint_size_and_gpu_memory_unless_given():
    from backends.miles.parallel import ParallelDims

    gib = 1 << 30
    assert ParallelDims.for_workers(2) == ParallelDims(tp=2, pp=1, dp=1)  # CPU: one TP group
    assert ParallelDims.for_workers(2, tp=1, pp=2) == ParallelDims(tp=1, pp=2, dp=1)
    # 8 GPUs of 80 GiB: weights may take 40 GiB per rank.
    assert ParallelDims.for_workers(8, weight_bytes=16 * gib, device_bytes=80 * gib) == ParallelDims(1, 8, 1)
    assert ParallelDims.for_workers(8, weight_bytes=140 * gib, device_bytes=80 * gib) == ParallelDims(4, 2, 1)
    assert ParallelDims.for_workers(8, pp=2, weight_bytes=140 * gib, device_bytes=80 * gib) == ParallelDims(2, 2, 2)
    assert ParallelDims.for_workers(8, tp=2, weight_bytes=140 * gib, device_bytes=80 * gib) == ParallelDims(2, 2, 2)
    # Too big even for all 8: every GPU in one model-parallel group.
    assert ParallelDims.for_workers(8, weight_bytes=900 * gib, device_bytes=80 * gib).world_size == 8
    with pytest.raises(ValueError, match="--tp 2 x --pp 2 does not divide --workers 6"):
        ParallelDims.for_workers(6, tp=2, pp=2)
    # Stages hold equal numbers of layers: pp must divide the layer count.
    assert ParallelDims.for_workers(4, tp=1, weight_bytes=900 * gib, device_bytes=80 * gib, layers=6).pp == 2
    with pytest.raises(ValueError, match="--pp 2 does not divide the models' 3 layers"):
        ParallelDims.for_workers(2, tp=1, pp=2, layers=3)


def test_tensor_and_pipeline_parallel_together_match_one_worker(server, tiny_models, tmp_path):
    """4 workers as TP=2 x PP=2: LoRA factors split over TP within each stage's layers."""
    srv = ServerProcess(tmp_path, {QWEN: tiny_models[QWEN]}, workers=4, extra_args=("--tp", "2", "--pp", "2")).start()
    try:
        assert "tp=2 x pp=2 x dp=1" in srv.log_path.read_text()
        one, four = _train(server.url, 3), _train(srv.url, 3)
    finally:
        srv.stop()
    for key in ("lp0", "elementwise", "lp2"):
        _assert_close_lists(four[key], one[key])
    for key in ("loss", "norm1", "norm2"):
        assert four[key] == pytest.approx(one[key], rel=1e-5)


def test_two_replicas_of_two_pipeline_stages_sample_on_their_own_and_match_one_worker(server, tiny_models, tmp_path):
    """4 workers as PP=2 x DP=2: a burst of sampling requests is spread over both replicas, each
    passing hidden states between its own two stages while the other does the same, and gives
    one worker's tokens; training before and after uses all four ranks."""
    srv = ServerProcess(tmp_path, {QWEN: tiny_models[QWEN]}, workers=4, extra_args=("--tp", "1", "--pp", "2")).start()
    try:
        assert "tp=1 x pp=2 x dp=2" in srv.log_path.read_text()
        got = []
        for url in (server.url, srv.url):
            run = _train(url, 3)
            sampler = run["client"].save_weights_and_get_sampling_client().result()
            futures = [sampler.sample(types.ModelInput.from_ints(SEQS[i % 3][:3 + i]), 2,
                                      types.SamplingParams(max_tokens=6, temperature=1.0, seed=20 + i, stop=[]))
                       for i in range(6)]
            after = run["client"].forward(_data(3), "cross_entropy")  # queued behind the burst on every rank
            got.append(([s.tokens for f in futures for s in f.result().sequences], logprobs_of(after.result()),
                        run["loss"]))
        replicas = _replica_items(srv)
    finally:
        srv.stop()
    assert got[1][0] == got[0][0]
    _assert_close_lists(got[1][1], got[0][1])
    assert got[1][2] == pytest.approx(got[0][2], rel=1e-5)
    assert set(replicas) == {"0", "1"}


def test_tied_embeddings_split_over_two_stages_with_the_automatic_micro_batch_budget(tmp_path):
    """A tied-embedding checkpoint (like Qwen3-0.6B) on PP=2: the last stage loads its own copy of
    the embedding as the output layer. Both servers plan micro-batches from free memory (no fixed
    budget), which the two pipeline ranks must agree on."""
    from tests.mcore_harness import make_hf_checkpoint

    tied = make_hf_checkpoint(tmp_path / "tied", "qwen3", tie_word_embeddings=True)
    auto_budget = {"TINKERCLOUD_MICROBATCH_LOGITS": ""}
    data = [sft_datum([5, 6, 7], [8, 9, 10, 11, 12, 13]), sft_datum([20, 21], [22, 23, 24])]
    results = []
    for name, args, workers in (("one", (), 1), ("pp2", ("--tp", "1", "--pp", "2"), 2)):
        srv = ServerProcess(tmp_path / name, {"tied": tied}, workers=workers, extra_args=args, env=auto_budget).start()
        try:
            tc = _client(srv.url).create_lora_training_client("tied", rank=4, seed=3).result()
            fb = tc.forward_backward(data, "cross_entropy").result()
            norm = tc.optim_step(LINEAR_STEP).result().metrics["grad_norm:mean"]
            sampled = tc.save_weights_and_get_sampling_client().result().sample(
                types.ModelInput.from_ints([5, 6, 7]), 1,
                types.SamplingParams(max_tokens=6, temperature=0.0, stop=[])).result().sequences[0].tokens
            results.append((logprobs_of(fb), fb.metrics["loss:sum"], norm,
                            logprobs_of(tc.forward(data, "cross_entropy").result()), sampled))
            if workers == 2:  # each stage reports loading its own layers
                log = srv.log_path.read_text()
                assert all(f"(pipeline stage {k}/2): 100%" in log for k in (1, 2)), srv.tail()
        finally:
            srv.stop()
    (lp_a, loss_a, norm_a, after_a, tok_a), (lp_b, loss_b, norm_b, after_b, tok_b) = results
    _assert_close_lists(lp_b, lp_a)
    _assert_close_lists(after_b, after_a)
    assert loss_b == pytest.approx(loss_a, rel=1e-5) and norm_b == pytest.approx(norm_a, rel=1e-5)
    assert tok_b == tok_a


LLAMA = "tiny-llama"


@pytest.fixture(scope="module")
def server_dp2_two_models(tiny_models, tmp_path_factory):
    """DP=2 (TP=1) serving both tiny models: a sampling item of the other base model cannot join
    a running batch and closes it."""
    srv = ServerProcess(tmp_path_factory.mktemp("dp2-two-models"), tiny_models, workers=2,
                        extra_args=("--tp", "1")).start()
    assert "tp=1 x pp=1 x dp=2" in srv.log_path.read_text()
    yield srv
    srv.stop()


def _interleaved(server) -> dict[str, int]:
    status, body = RawClient(server.url).get_json("metrics")
    assert status == 200, body
    return {op: m.get("interleaved_items", 0) for op, m in body["transport"]["ops"].items()}


def _long(sampler, first_token: int, rows: int, tokens: int, seed: int):
    return sampler.sample(types.ModelInput.from_ints([first_token, 6, 7, 8]), rows,
                          types.SamplingParams(max_tokens=tokens, temperature=1.0, seed=seed, stop=[]))


def test_a_training_step_waits_for_a_replica_whose_batch_is_closed_and_the_other_decodes_on(server_dp2_two_models):
    """Replica 0 decodes a generation of 4 x 600 tokens; replica 1 one of 2040 tokens, closed by a
    Llama request (it cannot join, so it runs after it). A forward_backward then needs every rank:
    replica 1 can run it only once its batch has ended. Replica 0 must not wait for that inside the
    step's collectives: it decodes on and finishes its generation while replica 1 still decodes,
    and the step runs afterwards, once both are ready, with exactly its result on an idle server."""
    srv = server_dp2_two_models
    client = _client(srv.url)
    run = client.create_lora_training_client(QWEN, rank=4, seed=3).result()
    sampler = run.save_weights_and_get_sampling_client().result()
    short = _long(sampler, 5, 4, 600, seed=1)  # replica 0 (both idle: the first)
    time.sleep(0.3)
    long = _long(sampler, 9, 1, 2040, seed=2)  # replica 1, the less loaded
    time.sleep(0.3)
    llama = client.create_sampling_client(base_model=LLAMA).result().sample(
        types.ModelInput.from_ints([1, 2, 3]), 1, types.SamplingParams(max_tokens=2, temperature=1.0, seed=3, stop=[]))
    time.sleep(0.3)  # replica 1's batch is closed now (the Llama request is next in its stash)
    assert not short.future().done() and not long.future().done()
    fb = run.forward_backward(_data(3), "cross_entropy")
    assert len(short.result(timeout=300).sequences[0].tokens) == 600
    assert not long.future().done(), "replica 0 stopped decoding until replica 1's batch ended"
    assert not fb.future().done()  # it needs replica 1, whose batch is still running
    during = fb.result(timeout=300)
    assert len(long.result(timeout=300).sequences[0].tokens) == 2040
    assert len(llama.result(timeout=60).sequences[0].tokens) == 2
    again = _client(srv.url).create_lora_training_client(QWEN, rank=4, seed=3).result()
    alone = again.forward_backward(_data(3), "cross_entropy").result()
    _assert_close_lists(logprobs_of(during), logprobs_of(alone))
    assert during.metrics["loss:sum"] == pytest.approx(alone.metrics["loss:sum"], rel=1e-6)


def test_both_replicas_sampling_run_training_between_their_decode_steps(server_dp2_two_models):
    """Each replica decodes a long generation; another client creates an adapter, trains a step and
    saves a sampler meanwhile. Every rank of both replicas runs each operation between two of its
    decode steps (the metrics count them on replica 0's leader, which answers), neither generation
    waits for them nor they for it, and the results are those of an idle server."""
    srv = server_dp2_two_models
    sampler = _client(srv.url).create_lora_training_client(QWEN, rank=4, seed=5).result() \
        .save_weights_and_get_sampling_client().result()
    before = _interleaved(srv)
    longs = [_long(sampler, 5, 1, 2040, seed=11)]
    time.sleep(0.3)
    longs.append(_long(sampler, 9, 1, 2040, seed=12))  # the other replica
    time.sleep(0.3)

    def train() -> tuple:
        tc = _client(srv.url).create_lora_training_client(QWEN, rank=4, seed=9).result()
        fb = tc.forward_backward(_data(3), "cross_entropy").result(timeout=300)
        step = tc.optim_step(types.AdamParams(learning_rate=1e-2)).result(timeout=300)
        new = tc.save_weights_and_get_sampling_client().result(timeout=300)
        after = tc.forward(_data(3), "cross_entropy").result(timeout=300)
        return fb, step, after, new

    during = train()
    assert not any(f.future().done() for f in longs), "the training waited for a generation"
    counted = {op: n - before.get(op, 0) for op, n in _interleaved(srv).items()}
    assert {op: counted.get(op, 0) for op in ("create_adapter", "forward_backward", "optim_step", "save_for_sampler")} \
        == {"create_adapter": 1, "forward_backward": 2, "optim_step": 1, "save_for_sampler": 1}
    assert [len(f.result(timeout=300).sequences[0].tokens) for f in longs] == [2040, 2040]
    alone = train()
    for got, ref in ((during[0], alone[0]), (during[2], alone[2])):
        _assert_close_lists(logprobs_of(got), logprobs_of(ref))
    assert during[0].metrics["loss:sum"] == pytest.approx(alone[0].metrics["loss:sum"], rel=1e-6)
    assert during[1].metrics["grad_norm:mean"] == pytest.approx(alone[1].metrics["grad_norm:mean"], rel=1e-6)


def test_a_replica_sampling_two_base_models_at_once_runs_training_between_its_decode_steps(server_dp2_two_models):
    """Replica 0 decodes 4 x 600 tokens; a burst of a Qwen and a Llama request (one event-loop
    turn) goes to replica 1 as one item, a batch of two base models (nothing can join it). A
    forward_backward sent then runs between decode steps on both replicas: the batch of two base
    models takes part too, so neither replica waits for the other's generation to end."""
    from tinker.proto.response_conv import deserialize_sample_response

    srv = server_dp2_two_models
    run = _client(srv.url).create_lora_training_client(QWEN, rank=4, seed=3).result()
    sampler = run.save_weights_and_get_sampling_client().result()
    short = _long(sampler, 5, 4, 600, seed=1)  # replica 0
    time.sleep(0.3)
    raw = RawClient(srv.url)
    session = raw.session()
    bodies = []
    for seq, (base, tokens) in enumerate(((QWEN, 2040), (LLAMA, 300))):
        sampler_id = raw.post("create_sampling_session", {"session_id": session, "sampling_session_seq_id": seq,
                                                          "base_model": base}).json()["sampling_session_id"]
        bodies.append({"sampling_session_id": sampler_id, "seq_id": 0, "num_samples": 1, "type": "sample",
                       "prompt": {"chunks": [{"type": "encoded_text", "tokens": [9, 6, 7, 8]}]},
                       "sampling_params": {"max_tokens": tokens, "seed": 2, "stop": []}})
    items_before = _replica_items(srv).get("1", 0)
    burst = [h["request_id"] for h in post_in_one_turn(srv, "/api/v1/asample", bodies)]  # both to replica 1
    time.sleep(0.3)
    fb = run.forward_backward(_data(3), "cross_entropy").result(timeout=300)
    assert np.isfinite(fb.metrics["loss:sum"])
    assert _replica_items(srv).get("1", 0) == items_before, "the training step waited for replica 1's batch"
    assert not short.future().done(), "the training step waited for replica 0's generation"
    got = [deserialize_sample_response(raw.result(r, timeout=300)) for r in burst]
    assert [len(g.sequences[0].tokens) for g in got] == [2040, 300]
    assert _replica_items(srv)["1"] - items_before == 1  # one item of both base models
    assert len(short.result(timeout=300).sequences[0].tokens) == 600
