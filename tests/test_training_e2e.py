"""Training through the real SDK, real HTTP, a real server process and real workers."""
from __future__ import annotations

import numpy as np
import pytest
from tinker import types

from tests.helpers import logprobs_of, sft_datum

QWEN = "tiny-qwen3"
PAIRS = [
    ("Question: what colour is the sky?\nAnswer:", " The sky is blue."),
    ("Question: what do cows drink?\nAnswer:", " Cows drink water."),
    ("Question: where do fish live?\nAnswer:", " Fish live in the sea."),
    ("Question: what is two plus two?\nAnswer:", " Two plus two is four."),
]


def encoded_pairs(tokenizer) -> list[tuple[list[int], list[int]]]:
    return [(tokenizer.encode(p), tokenizer.encode(c)) for p, c in PAIRS]


def test_sft_halves_the_loss_and_the_saved_sampler_follows_the_training(service_client, tokenizer):
    pairs = encoded_pairs(tokenizer)
    data = [sft_datum(p, c) for p, c in pairs]
    n_tokens = sum(len(c) for _, c in pairs)
    tc = service_client.create_lora_training_client(QWEN, rank=8, seed=0).result()
    per_token = []
    for _ in range(60):
        fb = tc.forward_backward(data, "cross_entropy")
        opt = tc.optim_step(types.AdamParams(learning_rate=5e-3))
        per_token.append(fb.result().metrics["loss:sum"] / n_tokens)
        opt.result()
    assert per_token[-1] <= 0.5 * per_token[0], per_token

    saved = tc.save_weights_for_sampler("sft-final").result()
    assert saved.path.endswith("/sampler_weights/sft-final")
    sampler = service_client.create_sampling_client(model_path=saved.path).result()
    greedy = types.SamplingParams(max_tokens=6, temperature=0.0, stop=[])
    futures = [sampler.sample(types.ModelInput.from_ints(p), 1, greedy) for p, _ in pairs]
    followed = sum(f.result().sequences[0].tokens[:4] == c[:4] for f, (_, c) in zip(futures, pairs))
    assert followed == len(pairs), "greedy samples should reproduce the trained completions"

    # A named sampler checkpoint is a frozen snapshot: more training does not change it.
    before = sampler.sample(types.ModelInput.from_ints(pairs[0][0]), 1, greedy).result().sequences[0]
    for _ in range(3):
        tc.forward_backward([sft_datum(pairs[0][0], tokenizer.encode(" Something else entirely."))], "cross_entropy")
        tc.optim_step(types.AdamParams(learning_rate=5e-2)).result()
    after = sampler.sample(types.ModelInput.from_ints(pairs[0][0]), 1, greedy).result().sequences[0]
    assert after.tokens == before.tokens
    np.testing.assert_allclose(after.logprobs, before.logprobs, atol=1e-5)


def test_importance_sampling_loss_is_the_documented_sum_and_raises_advantaged_tokens(service_client, tokenizer):
    prompt, completion = encoded_pairs(tokenizer)[1]
    base = sft_datum(prompt, completion)
    targets = base.loss_fn_inputs["target_tokens"].to_numpy()
    tc = service_client.create_lora_training_client(QWEN, rank=4, seed=1).result()
    lp0 = logprobs_of(tc.forward([base], "cross_entropy").result())[0]

    advantages = np.zeros(len(targets), np.float32)
    advantages[-len(completion):] = 1.0
    sampler_lp = (lp0 - 0.25).astype(np.float32)  # the "sampler" was a bit less sure than the learner
    datum = types.Datum(model_input=base.model_input, loss_fn_inputs={
        "target_tokens": targets, "logprobs": sampler_lp, "advantages": advantages})
    out = tc.forward_backward([datum], "importance_sampling").result()
    lp = logprobs_of(out)[0]
    expected = -np.sum(np.exp(lp - sampler_lp) * advantages)
    assert out.metrics["loss:sum"] == pytest.approx(expected, rel=1e-5, abs=1e-5)
    np.testing.assert_allclose(lp, lp0, atol=1e-5)  # same weights, no temperature, no hidden terms
    tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()

    lp1 = logprobs_of(tc.forward([base], "cross_entropy").result())[0]
    mask = advantages > 0
    assert lp1[mask].sum() > lp0[mask].sum() + 0.1


def _train_grad_norm_and_after(client, data_calls, probe):
    tc = client.create_lora_training_client(QWEN, rank=4, seed=7).result()
    tc.forward_backward(probe, "cross_entropy").result()  # B starts at 0: give it a value first
    tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    for data in data_calls:
        tc.forward_backward(data, "cross_entropy").result()
    # A huge eps makes Adam's first step proportional to the gradient itself.
    metrics = tc.optim_step(types.AdamParams(learning_rate=1.0, eps=1e3)).result().metrics
    return metrics["grad_norm:mean"], logprobs_of(tc.forward(probe, "cross_entropy").result())


def test_gradients_accumulate_and_a_split_batch_equals_one_call(service_client, tokenizer):
    data = [sft_datum(p, c) for p, c in encoded_pairs(tokenizer)]
    norm_one, lp_one = _train_grad_norm_and_after(service_client, [data], data)
    norm_two, lp_two = _train_grad_norm_and_after(service_client, [data[:2], data[2:]], data)
    assert norm_one > 0
    assert norm_two == pytest.approx(norm_one, rel=1e-5)
    for a, b in zip(lp_one, lp_two):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_adam_params_are_applied(service_client, tokenizer):
    data = [sft_datum(p, c) for p, c in encoded_pairs(tokenizer)]
    tc = service_client.create_lora_training_client(QWEN, rank=4, seed=3).result()
    before = logprobs_of(tc.forward(data, "cross_entropy").result())
    tc.forward_backward(data, "cross_entropy").result()
    metrics = tc.optim_step(types.AdamParams(learning_rate=0.0)).result().metrics
    assert metrics["grad_norm:mean"] > 0
    after = logprobs_of(tc.forward(data, "cross_entropy").result())
    for a, b in zip(before, after):
        np.testing.assert_allclose(a, b, atol=1e-6)  # learning rate 0: nothing moved
    # grad_clip_norm clips: the reported norm is the pre-clip one, the step is bounded.
    tc.forward_backward(data, "cross_entropy").result()
    clipped = tc.optim_step(types.AdamParams(learning_rate=1e-2, grad_clip_norm=1e-3)).result().metrics
    assert clipped["grad_norm:mean"] > 1e-3


def test_ephemeral_sampler_and_base_model_sampler(service_client, tokenizer):
    prompt, completion = encoded_pairs(tokenizer)[2]
    tc = service_client.create_lora_training_client(QWEN, rank=4, seed=5).result()
    base_sampler = service_client.create_sampling_client(base_model=QWEN).result()
    trained_before = tc.save_weights_and_get_sampling_client().result()
    params = types.SamplingParams(max_tokens=5, temperature=0.0, stop=[])
    # A fresh adapter is an exact no-op: same tokens as the base model.
    a = base_sampler.sample(types.ModelInput.from_ints(prompt), 1, params).result().sequences[0]
    b = trained_before.sample(types.ModelInput.from_ints(prompt), 1, params).result().sequences[0]
    assert a.tokens == b.tokens
    for _ in range(60):
        tc.forward_backward([sft_datum(prompt, completion)], "cross_entropy")
        tc.optim_step(types.AdamParams(learning_rate=5e-3)).result()
    trained = tc.save_weights_and_get_sampling_client().result()
    c = trained.sample(types.ModelInput.from_ints(prompt), 1, params).result().sequences[0]
    assert c.tokens[:3] == completion[:3]
    # The earlier ephemeral sampler still serves its own frozen weights.
    assert trained_before.sample(types.ModelInput.from_ints(prompt), 1, params).result().sequences[0].tokens == b.tokens


def test_a_batch_larger_than_one_micro_batch_gives_the_same_gradient_as_one_datum_at_a_time(service_client):
    # 6 x 400 tokens exceed the logits budget of one micro-batch (2**27 / 151936 = 883 tokens).
    rng = np.random.default_rng(0)
    data = [sft_datum(rng.integers(0, 5000, 200).tolist(), rng.integers(0, 5000, 200).tolist()) for _ in range(6)]
    whole = service_client.create_lora_training_client(QWEN, rank=4, seed=9).result()
    apart = service_client.create_lora_training_client(QWEN, rank=4, seed=9).result()
    loss_whole = whole.forward_backward(data, "cross_entropy").result().metrics["loss:sum"]
    loss_apart = sum(apart.forward_backward([d], "cross_entropy").result().metrics["loss:sum"] for d in data)
    assert loss_whole == pytest.approx(loss_apart, rel=1e-5)
    norm_whole = whole.optim_step(types.AdamParams(learning_rate=1e-3)).result().metrics["grad_norm:mean"]
    norm_apart = apart.optim_step(types.AdamParams(learning_rate=1e-3)).result().metrics["grad_norm:mean"]
    assert norm_whole == pytest.approx(norm_apart, rel=1e-5)


def test_short_datums_packed_into_one_row_give_what_each_gives_alone(service_client):
    # One 24-token datum sets the row length; the four short ones share a second row under a
    # block-diagonal mask (packing), so any attention across them would change their logprobs.
    rng = np.random.default_rng(1)
    lengths = [(4, 20), (2, 4), (3, 3), (2, 4), (1, 3)]  # (prompt, completion) tokens
    data = [sft_datum(rng.integers(0, 5000, p).tolist(), rng.integers(0, 5000, c).tolist()) for p, c in lengths]
    packed = service_client.create_lora_training_client(QWEN, rank=4, seed=9).result()
    alone = service_client.create_lora_training_client(QWEN, rank=4, seed=9).result()
    for tc in (packed, alone):  # a step first, so the adapter is not the identity
        tc.forward_backward(data, "cross_entropy").result()
        tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    together = packed.forward_backward(data, "cross_entropy").result()
    apart = [alone.forward_backward([d], "cross_entropy").result() for d in data]
    for got, want in zip(together.loss_fn_outputs, apart):
        np.testing.assert_allclose(got["logprobs"].to_numpy(), want.loss_fn_outputs[0]["logprobs"].to_numpy(),
                                   atol=1e-5, rtol=0)
    assert together.metrics["loss:sum"] == pytest.approx(sum(a.metrics["loss:sum"] for a in apart), rel=1e-5)
    norms = [tc.optim_step(types.AdamParams(learning_rate=1e-3)).result().metrics["grad_norm:mean"]
             for tc in (packed, alone)]
    assert norms[0] == pytest.approx(norms[1], rel=1e-5)
