"""Sampling through the real SDK: every SamplingParams field, logprobs, batching."""
from __future__ import annotations

import numpy as np
import pytest
from tinker import types

from tests.helpers import logprobs_of, sft_datum

QWEN = "tiny-qwen3"
PROMPT = types.ModelInput.from_ints([9707, 1879, 11, 1075, 374])


@pytest.fixture(scope="module")
def trained(server):
    """A lightly trained adapter and a sampler of its snapshot (so LoRA is in the path)."""
    import tinker

    from tests.conftest import API_KEY

    client = tinker.ServiceClient(base_url=server.url, api_key=API_KEY)
    tc = client.create_lora_training_client(QWEN, rank=4, seed=2).result()
    data = [sft_datum(PROMPT.to_ints(), [100, 200, 300, 400, 13])]
    for _ in range(3):
        tc.forward_backward(data, "cross_entropy")
        tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    return tc, tc.save_weights_and_get_sampling_client().result()


def _sample(sampler, n=1, prompt=PROMPT, **params):
    return sampler.sample(prompt, n, types.SamplingParams(**params)).result()


def test_seed_reproduces_and_samples_differ(trained):
    _, sampler = trained
    a = _sample(sampler, 3, max_tokens=12, seed=123, stop=[])
    b = _sample(sampler, 3, max_tokens=12, seed=123, stop=[])
    c = _sample(sampler, 3, max_tokens=12, seed=124, stop=[])
    assert [s.tokens for s in a.sequences] == [s.tokens for s in b.sequences]
    assert [s.tokens for s in a.sequences] != [s.tokens for s in c.sequences]
    assert len({tuple(s.tokens) for s in a.sequences}) > 1  # num_samples are independent draws
    for s in a.sequences:
        assert len(s.tokens) == len(s.logprobs) == 12 and s.stop_reason == "length"


def test_greedy_top_k_1_and_temperature_0_agree(trained):
    _, sampler = trained
    greedy = _sample(sampler, max_tokens=8, temperature=0.0, stop=[]).sequences[0]
    top1 = _sample(sampler, max_tokens=8, temperature=1.0, top_k=1, seed=5, stop=[]).sequences[0]
    tiny_p = _sample(sampler, max_tokens=8, temperature=1.0, top_p=1e-6, seed=6, stop=[]).sequences[0]
    assert greedy.tokens == top1.tokens == tiny_p.tokens


def test_sampled_logprobs_and_compute_logprobs_agree_with_the_trainer(trained):
    tc, sampler = trained
    seq = _sample(sampler, max_tokens=6, temperature=1.0, seed=9, stop=[]).sequences[0]
    full = PROMPT.to_ints() + seq.tokens
    trainer = logprobs_of(tc.forward([sft_datum(full[:1], full[1:])], "cross_entropy").result())[0]
    np.testing.assert_allclose(seq.logprobs, trainer[-len(seq.tokens):], atol=1e-4)
    prompt_lp = sampler.compute_logprobs(types.ModelInput.from_ints(full)).result()
    assert prompt_lp[0] is None
    np.testing.assert_allclose(np.array(prompt_lp[1:], dtype=np.float64), trainer, atol=1e-4)


def test_stop_token_ids_stop_strings_and_empty_stop(trained, tokenizer):
    _, sampler = trained
    free = _sample(sampler, max_tokens=10, temperature=0.0, stop=[]).sequences[0]
    assert free.stop_reason == "length" and len(free.tokens) == 10
    stop_tok = free.tokens[3]
    first = free.tokens.index(stop_tok)
    by_id = _sample(sampler, max_tokens=10, temperature=0.0, stop=[stop_tok]).sequences[0]
    assert by_id.stop_reason == "stop" and by_id.tokens == free.tokens[: first + 1]
    text = tokenizer.decode(free.tokens[first:first + 1])
    by_str = _sample(sampler, max_tokens=10, temperature=0.0, stop=[text]).sequences[0]
    assert by_str.stop_reason == "stop" and text in tokenizer.decode(by_str.tokens)
    assert len(by_str.tokens) <= first + 1


def test_concurrent_requests_are_batched_without_changing_results(trained):
    _, sampler = trained
    prompts = [types.ModelInput.from_ints(PROMPT.to_ints()[: 2 + i % 4]) for i in range(8)]
    params = [dict(max_tokens=4 + i, temperature=0.5 + 0.1 * i, seed=i, stop=[]) for i in range(8)]
    alone = [_sample(sampler, 2, p, **kw) for p, kw in zip(prompts, params)]
    futures = [sampler.sample(p, 2, types.SamplingParams(**kw)) for p, kw in zip(prompts, params)]
    together = [f.result() for f in futures]
    for a, t, kw in zip(alone, together, params):
        assert [s.tokens for s in a.sequences] == [s.tokens for s in t.sequences]
        assert all(len(s.tokens) == kw["max_tokens"] for s in t.sequences)  # each its own max_tokens
        np.testing.assert_allclose([s.logprobs for s in a.sequences], [s.logprobs for s in t.sequences], atol=1e-4)


def test_default_stop_is_the_models_eos(service_client):
    sampler = service_client.create_sampling_client(base_model=QWEN).result()
    out = _sample(sampler, 4, max_tokens=3, seed=1)  # stop omitted: EOS stops; nothing else changes
    assert all(s.stop_reason in ("stop", "length") for s in out.sequences)
    for s in out.sequences:
        if s.stop_reason == "stop":
            assert s.tokens[-1] in (151645, 151643)


# ---- logprob options ---------------------------------------------------------------------
SCORED = PROMPT.to_ints() + [100, 200, 300, 400]  # a prompt long enough for per-position options


def _trainer_logprobs(tc, tokens):
    """The trainer's log p(tokens[i] | tokens[:i]) for i >= 1."""
    return logprobs_of(tc.forward([sft_datum(tokens[:1], tokens[1:])], "cross_entropy").result())[0]


def _score(sampler, tokens=SCORED, **options):
    params = types.SamplingParams(max_tokens=1, temperature=0.0, stop=[])
    return sampler.sample(types.ModelInput.from_ints(tokens), 1, params, **options).result()


def test_prompt_logprobs_top_k_and_target_ids_agree_with_the_trainer(trained):
    import torch

    tc, sampler = trained
    P = len(SCORED)
    trainer = _trainer_logprobs(tc, SCORED)
    targets = torch.full((P - 1, 2), -1, dtype=torch.int64)
    targets[:, 0] = torch.tensor(SCORED[1:])  # the real next token at every position ...
    targets[3, 1] = 7  # ... and one extra id at position 4
    out = _score(sampler, include_prompt_logprobs=True, topk_prompt_logprobs=3,
                 target_prompt_logprobs=types.TensorData.from_torch(targets))
    assert out.prompt_logprobs[0] is None
    np.testing.assert_allclose(np.array(out.prompt_logprobs[1:], dtype=np.float64), trainer, atol=1e-4)
    # top-k: nothing at position 0; then the 3 likeliest tokens, best first, the real one among them when likely
    assert out.topk_prompt_logprobs[0] is None and len(out.topk_prompt_logprobs) == P
    for p in range(1, P):
        row = out.topk_prompt_logprobs[p]
        assert len(row) == 3 and [lp for _, lp in row] == sorted((lp for _, lp in row), reverse=True)
        assert row[0][1] >= out.prompt_logprobs[p] - 1e-5
        cell = dict(row).get(SCORED[p])
        assert cell is None or abs(cell - out.prompt_logprobs[p]) < 1e-5
    # targets: same shape, the real tokens' logprobs, 0.0 where the request had -1
    got = out.target_prompt_logprobs
    assert got.shape == [P - 1, 2] and got.sparse_crow_indices is None
    got = got.to_numpy().reshape(P - 1, 2)
    np.testing.assert_allclose(got[:, 0], trainer, atol=1e-4)
    assert got[3, 1] < 0 and np.all(np.delete(got[:, 1], 3) == 0.0)


def test_sparse_target_ids_come_back_in_the_same_layout(trained):
    import torch

    tc, sampler = trained
    P = len(SCORED)
    trainer = _trainer_logprobs(tc, SCORED)
    ids = torch.full((P - 1, 4), -1, dtype=torch.int64)
    ids[P - 2, 2] = SCORED[P - 1]  # the last prompt token, in column 2 of the last row
    ids[5, 0] = SCORED[6]
    request = types.TensorData.from_torch_sparse(ids, pad_value=-1)
    assert request.sparse_crow_indices is not None  # the SDK really sends CSR
    got = _score(sampler, target_prompt_logprobs=request).target_prompt_logprobs
    assert got.shape == [P - 1, 4]
    assert got.sparse_crow_indices == request.sparse_crow_indices
    assert got.sparse_col_indices == request.sparse_col_indices
    np.testing.assert_allclose(np.asarray(got.data), [trainer[5], trainer[P - 2]], atol=1e-4)  # row-major cells
    dense = got.to_numpy()  # unlisted cells read as 0.0
    assert dense[5, 0] == got.data[0] and dense[P - 2, 2] == got.data[1] and np.count_nonzero(dense) == 2


def test_prompt_logprobs_last_n_scores_only_the_suffix(trained):
    _, sampler = trained
    P = len(SCORED)
    whole = _score(sampler, include_prompt_logprobs=True, topk_prompt_logprobs=2)
    last = _score(sampler, include_prompt_logprobs=True, topk_prompt_logprobs=2, prompt_logprobs_last_n=3)
    assert last.prompt_logprobs[: P - 3] == [None] * (P - 3)
    np.testing.assert_allclose(last.prompt_logprobs[P - 3 :], whole.prompt_logprobs[P - 3 :], atol=1e-5)
    assert last.topk_prompt_logprobs[: P - 3] == [None] * (P - 3)
    assert [[t for t, _ in row] for row in last.topk_prompt_logprobs[P - 3 :]] == \
        [[t for t, _ in row] for row in whole.topk_prompt_logprobs[P - 3 :]]


def test_topk_sample_logprobs_describe_the_distribution_sampled_from(trained):
    _, sampler = trained
    free = sampler.sample(PROMPT, 2, types.SamplingParams(max_tokens=6, seed=41, stop=[]),
                          topk_sample_logprobs=4).result()
    top2 = sampler.sample(PROMPT, 1, types.SamplingParams(max_tokens=6, seed=42, top_k=2, stop=[]),
                          topk_sample_logprobs=4).result()
    for seq in free.sequences + top2.sequences:
        assert len(seq.topk_logprobs) == len(seq.tokens) == 6
        for token, lp, row in zip(seq.tokens, seq.logprobs, seq.topk_logprobs):
            assert [v for _, v in row] == sorted((v for _, v in row), reverse=True)
            if token in dict(row):
                assert abs(dict(row)[token] - lp) < 1e-5
    assert all(len(row) == 4 for seq in free.sequences for row in seq.topk_logprobs)
    # top_k=2 sampling: only the two allowed tokens have a probability; the sampled one is one of them
    for token, row in zip(top2.sequences[0].tokens, top2.sequences[0].topk_logprobs):
        assert len(row) == 2 and token in dict(row)
        assert abs(np.logaddexp(row[0][1], row[1][1])) < 1e-5  # renormalised over the two


def test_prompt_alt_tokens_are_seeded_draws_scored_like_targets(trained):
    _, sampler = trained
    P = len(SCORED)

    def draws(seed):
        params = types.SamplingParams(max_tokens=1, temperature=1.0, seed=seed, stop=[])
        return sampler.sample(types.ModelInput.from_ints(SCORED), 1, params, prompt_alt_tokens_k=3).result()

    a, b, c = draws(1), draws(1), draws(2)
    tokens, logprobs = a.prompt_alt_tokens.tokens.to_numpy(), a.prompt_alt_tokens.logprobs.to_numpy()
    assert a.prompt_alt_tokens.tokens.shape == [P - 1, 3] and a.prompt_alt_tokens.tokens.dtype == "int64"
    assert np.array_equal(tokens, b.prompt_alt_tokens.tokens.to_numpy())  # the same seed draws the same
    assert not np.array_equal(tokens, c.prompt_alt_tokens.tokens.to_numpy())
    # at temperature 1 a draw's logprob is the model's: score the drawn ids as targets
    target = types.TensorData(data=tokens.ravel().tolist(), dtype="int64", shape=[P - 1, 3])
    scored = _score(sampler, target_prompt_logprobs=target).target_prompt_logprobs.to_numpy()
    np.testing.assert_allclose(logprobs.reshape(P - 1, 3), scored, atol=1e-4)


def test_record_stability_info_is_accepted(trained):
    tc, _ = trained
    sampler = tc.save_weights_and_get_sampling_client(record_stability_info=True).result()
    out = _sample(sampler, 2, max_tokens=3, seed=1, stop=[])
    assert all(len(s.tokens) == len(s.logprobs) == 3 for s in out.sequences)


# ---- prefix cache ------------------------------------------------------------------------
def test_prefix_cache_serves_multi_turn_prompts_with_identical_results(trained, service_client):
    _, sampler = trained
    turn1 = types.ModelInput.from_ints([4000 + i for i in range(12)])  # used by no other test
    params = dict(max_tokens=6, temperature=1.0, seed=51, stop=[])
    first = _sample(sampler, prompt=turn1, **params)
    again = _sample(sampler, prompt=turn1, **params)
    assert first.prompt_cache_hit_tokens == 0
    assert again.prompt_cache_hit_tokens == turn1.length - 1  # all but the last prompt token
    assert again.sequences[0].tokens == first.sequences[0].tokens
    np.testing.assert_allclose(again.sequences[0].logprobs, first.sequences[0].logprobs, atol=1e-4)
    # the next turn repeats the first turn and its answer: the answer's K/V is reused too
    answer = first.sequences[0].tokens
    turn2 = types.ModelInput.from_ints(turn1.to_ints() + answer + [4100, 4101])
    cached = _sample(sampler, prompt=turn2, **params)
    assert cached.prompt_cache_hit_tokens == turn1.length + len(answer) - 1
    # full prompt logprobs need every position computed: the same request without the cache
    uncached = sampler.sample(turn2, 1, types.SamplingParams(**params), include_prompt_logprobs=True).result()
    assert uncached.prompt_cache_hit_tokens == 0
    assert cached.sequences[0].tokens == uncached.sequences[0].tokens
    np.testing.assert_allclose(cached.sequences[0].logprobs, uncached.sequences[0].logprobs, atol=1e-4)
    # other weights never see this sampler's K/V
    base = service_client.create_sampling_client(base_model=QWEN).result()
    assert _sample(base, prompt=turn1, **params).prompt_cache_hit_tokens == 0


# ---- bad input ---------------------------------------------------------------------------
def test_bad_logprob_options_get_clear_errors(server, trained):
    from tests.helpers import RawClient

    raw = RawClient(server.url)
    session = raw.session()
    sampler_id = raw.post("create_sampling_session", {"session_id": session, "sampling_session_seq_id": 0,
                                                      "base_model": QWEN}).json()["sampling_session_id"]
    P = 5
    prompt = {"chunks": [{"type": "encoded_text", "tokens": [11, 12, 13, 14, 15]}]}

    def asample(**fields):
        body = {"num_samples": 1, "prompt": prompt, "sampling_params": {"max_tokens": 2}, "type": "sample",
                "sampling_session_id": sampler_id, **fields}
        return raw.post("asample", body)

    def target(data, shape, **csr):
        return {"data": data, "dtype": "int64", "shape": shape, **csr}

    cases = [
        (dict(topk_prompt_logprobs=-1), "topk_prompt_logprobs must be 0 or greater"),
        (dict(topk_sample_logprobs=10**7), "larger than the vocabulary"),
        (dict(prompt_alt_tokens_k=-2), "prompt_alt_tokens_k must be 0 or greater"),
        (dict(prompt_logprobs=True, prompt_logprobs_last_n=P), "between 1 and len(prompt) - 1 = 4"),
        (dict(prompt_logprobs_last_n=2), "set prompt_logprobs"),
        (dict(target_prompt_logprobs=target([1, 2, 3], [3, 1])), "needs len(prompt) - 1 = 4 rows"),
        (dict(target_prompt_logprobs=target([1, 2, 3], [4, 1])), "needs 4 values"),
        (dict(target_prompt_logprobs=target([-1] * 4, [4, 1])), "names no token id"),
        (dict(target_prompt_logprobs=target([1, 2, 3, 10**7], [4, 1])), "outside the vocabulary"),
        (dict(target_prompt_logprobs={**target([1, 2, 3, 4], [4, 1]), "dtype": "float32"}), "int64"),
        (dict(target_prompt_logprobs=target([5], [4, 2], sparse_crow_indices=[0, 1, 1, 1, 1],
                                            sparse_col_indices=[2])), "sparse_col_indices"),
    ]
    for fields, needle in cases:
        r = asample(**fields)
        assert r.status_code == 400 and needle in r.json()["error"], (fields, r.text)
    # the server is fine: a good request with every option still works
    ok = asample(prompt_logprobs=True, topk_prompt_logprobs=2, topk_sample_logprobs=2, prompt_alt_tokens_k=2,
                 prompt_logprobs_last_n=2, record_stability_info=True,
                 target_prompt_logprobs=target([5], [4, 2], sparse_crow_indices=[0, 0, 0, 1, 1], sparse_col_indices=[1]))
    assert ok.status_code == 200 and len(ok.json()["sample_sequence_ids"]) == 1
    assert isinstance(raw.result(ok.json()["request_id"]), bytes)  # a protobuf SampleResponse


def test_requests_arriving_during_a_long_sample_join_it_and_give_what_they_give_alone(server, trained):
    """Continuous batching: requests sent while a long generation runs join its batch between
    decode steps (the metrics count them), are answered as soon as they are done (before the
    long one), and get exactly what they get when run alone."""
    import time

    from tests.test_metrics_e2e import _ops

    _, sampler = trained

    def joined() -> int:
        return _ops(server).get("sample", {}).get("joined_items", 0)

    before = joined()
    prompts = [types.ModelInput.from_ints([9707, 11, 1879] + [i]) for i in range(3)]
    params = [types.SamplingParams(max_tokens=6, temperature=1.0, seed=40 + i, stop=[]) for i in range(3)]
    long = sampler.sample(PROMPT, 1, types.SamplingParams(max_tokens=1500, temperature=1.0, seed=7, stop=[]))
    time.sleep(0.5)
    short = [sampler.sample(p, 2, sp) for p, sp in zip(prompts, params)]
    together = [f.result() for f in short]
    assert not long.future().done()  # the short ones did not wait for it
    assert len(long.result().sequences[0].tokens) == 1500
    assert joined() > before
    for got, p, sp in zip(together, prompts, params):
        alone = sampler.sample(p, 2, sp).result()
        assert [s.tokens for s in got.sequences] == [s.tokens for s in alone.sequences]
        np.testing.assert_allclose([s.logprobs for s in got.sequences], [s.logprobs for s in alone.sequences],
                                   atol=1e-4)


def test_the_request_that_started_a_batch_is_answered_before_a_longer_one_that_joined_it(server, trained):
    """The first request of a batch does not wait for the batch to end: a long request that
    joined it (the metrics count the join) is still running when the first one's result arrives."""
    import time

    from tests.test_metrics_e2e import _ops

    _, sampler = trained

    def joined() -> int:
        return _ops(server).get("sample", {}).get("joined_items", 0)

    before = joined()
    first_params = types.SamplingParams(max_tokens=500, temperature=1.0, seed=3, stop=[])
    first = sampler.sample(PROMPT, 1, first_params)
    time.sleep(0.1)  # the first request's batch is decoding
    long = sampler.sample(PROMPT, 1, types.SamplingParams(max_tokens=1800, temperature=1.0, seed=8, stop=[]))
    got = first.result()
    assert not long.future().done(), "the first request waited for the long one that joined its batch"
    assert len(long.result().sequences[0].tokens) == 1800
    assert joined() > before  # counted once answered
    alone = sampler.sample(PROMPT, 1, first_params).result()
    assert got.sequences[0].tokens == alone.sequences[0].tokens


def _interleaved(server) -> dict[str, int]:
    from tests.test_metrics_e2e import _ops

    return {op: m.get("interleaved_items", 0) for op, m in _ops(server).items()}


def test_training_sent_during_a_long_sample_runs_between_its_decode_steps(server, trained):
    """Another client's training (a new adapter, forward, forward_backward, optim_step) does not
    wait for a long generation to end: each step runs between two of its decode steps (the metrics
    count them) and is answered while it still runs, with exactly what it gives on an idle server;
    a sampling request sent after them still joins the batch."""
    import time

    from tests.test_metrics_e2e import _ops

    _, sampler = trained
    data = [sft_datum([9707, 11, 1879], [374, 13, 100, 200])]
    before, joined_before = _interleaved(server), _ops(server)["sample"]["joined_items"]
    long = sampler.sample(PROMPT, 1, types.SamplingParams(max_tokens=2000, temperature=1.0, seed=11, stop=[]))
    time.sleep(0.5)  # the long one is decoding

    def train(client) -> tuple:
        tc = client.create_lora_training_client(QWEN, rank=4, seed=9).result()
        fwd = tc.forward(data, "cross_entropy").result()
        fb = tc.forward_backward(data, "cross_entropy").result()
        step = tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
        after = tc.forward(data, "cross_entropy").result()
        return fwd, fb, step, after

    import tinker

    from tests.conftest import API_KEY

    client = tinker.ServiceClient(base_url=server.url, api_key=API_KEY)
    during = train(client)
    short = sampler.sample(PROMPT, 1, types.SamplingParams(max_tokens=3, temperature=1.0, seed=1, stop=[])).result()
    assert not long.future().done(), "the training steps or the short request waited for the long generation"
    counted = {op: n - before.get(op, 0) for op, n in _interleaved(server).items()}
    assert {op: counted.get(op, 0) for op in ("create_adapter", "forward_backward", "optim_step")} == \
        {"create_adapter": 1, "forward_backward": 3, "optim_step": 1}  # forward is forward_backward, forward-only
    assert _ops(server)["sample"]["joined_items"] > joined_before and len(short.sequences[0].tokens) == 3
    assert len(long.result().sequences[0].tokens) == 2000

    alone = train(client)  # the same on an idle server
    for got, ref in ((during[0], alone[0]), (during[1], alone[1]), (during[3], alone[3])):
        for a, b in zip(logprobs_of(got), logprobs_of(ref)):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
        assert got.metrics["loss:sum"] == pytest.approx(ref.metrics["loss:sum"], abs=1e-5)
    assert during[2].metrics["grad_norm:mean"] == pytest.approx(alone[2].metrics["grad_norm:mean"], rel=1e-6)
    assert not np.allclose(logprobs_of(during[3])[0], logprobs_of(during[0])[0])  # the step changed the adapter


def test_a_sampler_evicted_while_a_batch_uses_it_keeps_serving_that_batch(server, trained):
    """Snapshots saved during a long generation push the sampler it uses out of memory (64 newer
    ones: it is the least recently used). The running rows keep its weights to the end: the long
    generation gives exactly what it gave before; only afterwards is the sampler gone. (That its
    factors go as soon as the last row using it is done: tests/test_snapshot_use.py.)"""
    import time

    tc, _ = trained
    sampler = tc.save_weights_and_get_sampling_client().result()
    params = types.SamplingParams(max_tokens=2000, temperature=1.0, seed=12, stop=[])
    reference = sampler.sample(PROMPT, 1, params).result()
    saves_before = _interleaved(server).get("save_for_sampler", 0)
    long = sampler.sample(PROMPT, 1, params)
    time.sleep(0.5)  # the long one is decoding
    newer = [tc.save_weights_and_get_sampling_client().result() for _ in range(64)]
    assert not long.future().done(), "the saves waited for the long generation"
    assert _interleaved(server)["save_for_sampler"] - saves_before == 64
    got = long.result()
    assert got.sequences[0].tokens == reference.sequences[0].tokens
    np.testing.assert_allclose(got.sequences[0].logprobs, reference.sequences[0].logprobs, atol=1e-4)
    with pytest.raises(Exception, match="no longer in memory"):
        sampler.sample(PROMPT, 1, types.SamplingParams(max_tokens=2, seed=1)).result()
    assert len(newer[-1].sample(PROMPT, 1, types.SamplingParams(max_tokens=2, seed=1)).result().sequences[0].tokens) == 2


def test_with_interleave_share_0_training_waits_for_the_generation(tiny_models, tmp_path):
    """`--interleave-share 0` reaches the workers: a training step sent during a long generation
    runs only after it (none runs between its decode steps), as an operator who wants sampling
    undisturbed asks: when the step's result is there, so is the generation's (asked once, without
    waiting: this server answers a pending future after 0.2 s)."""
    import time

    import tinker

    from tests.conftest import API_KEY, ServerProcess
    from tests.helpers import RawClient

    config = tmp_path / "config.yaml"
    config.write_text("long_poll_seconds: 0.2\n")
    srv = ServerProcess(tmp_path, {QWEN: tiny_models[QWEN]},
                        extra_args=("--interleave-share", "0", "--config", str(config))).start()
    try:
        client = tinker.ServiceClient(base_url=srv.url, api_key=API_KEY)
        tc = client.create_lora_training_client(QWEN, rank=4, seed=2).result()
        raw = RawClient(srv.url)
        sampler_id = raw.post("create_sampling_session", {"session_id": raw.session(), "sampling_session_seq_id": 0,
                                                          "base_model": QWEN}).json()["sampling_session_id"]
        long = raw.post("asample", {"sampling_session_id": sampler_id, "seq_id": 0, "num_samples": 1, "type": "sample",
                                    "prompt": {"chunks": [{"type": "encoded_text", "tokens": PROMPT.to_ints()}]},
                                    "sampling_params": {"max_tokens": 1000, "seed": 3, "stop": []}}).json()["request_id"]

        def generation_done() -> bool:
            r = raw.post("retrieve_future", {"request_id": long, "allow_metadata_only": False})
            return not r.headers.get("content-type", "").startswith("application/json") or r.json().get("type") != "try_again"

        time.sleep(0.5)
        assert not generation_done()  # the training step arrives while the generation decodes
        fb = tc.forward_backward([sft_datum(PROMPT.to_ints(), [100, 200])], "cross_entropy").result()
        assert generation_done(), "the training step ran during the generation"
        assert np.isfinite(fb.metrics["loss:sum"])
        assert _interleaved(srv).get("forward_backward", 0) == 0  # none ran between its decode steps
        from tinker.proto.response_conv import deserialize_sample_response

        assert len(deserialize_sample_response(raw.result(long)).sequences[0].tokens) == 1000
    finally:
        srv.stop()
