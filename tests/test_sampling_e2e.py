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
