"""Numerics through the whole stack: HF parity of logprobs, and TP=2 equal to TP=1."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from tinker import types

from tests.conftest import API_KEY, ServerProcess
from tests.helpers import logprobs_of, sft_datum

SEQS = [[151644, 872, 198, 9707, 1879, 0, 17, 4, 3, 9, 100, 2000, 30000, 151645],
        [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]]


def _data() -> list[types.Datum]:
    return [sft_datum(s[:3], s[3:]) for s in SEQS]


def hf_logprobs(model_dir, datum: types.Datum) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    tokens = torch.tensor([datum.model_input.to_ints()])
    targets = torch.tensor(datum.loss_fn_inputs["target_tokens"].to_numpy())
    with torch.no_grad():
        logits = model(tokens).logits[0].float()
    return torch.log_softmax(logits, -1).gather(-1, targets[:, None])[:, 0].numpy()


@pytest.mark.parametrize("name", ["tiny-qwen3", "tiny-llama"])
def test_logprobs_match_a_hugging_face_float32_forward(service_client, tiny_models, name):
    tc = service_client.create_lora_training_client(name, rank=4).result()
    ours = logprobs_of(tc.forward(_data(), "cross_entropy").result())
    for datum, got in zip(_data(), ours):
        np.testing.assert_allclose(got, hf_logprobs(tiny_models[name], datum), atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def server_tp2(tiny_models, tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("tp2"), tiny_models, workers=2).start()
    yield srv
    srv.stop()


def _run_steps(url: str, name: str) -> dict:
    import tinker

    client = tinker.ServiceClient(base_url=url, api_key=API_KEY)
    tc = client.create_lora_training_client(name, rank=4, seed=3).result()
    out = {"lp0": logprobs_of(tc.forward(_data(), "cross_entropy").result())}
    fb = tc.forward_backward(_data(), "cross_entropy").result()
    out["loss"] = fb.metrics["loss:sum"]
    out["norm1"] = tc.optim_step(types.AdamParams(learning_rate=1e-2)).result().metrics["grad_norm:mean"]
    tc.forward_backward(_data(), "cross_entropy").result()
    # A huge eps makes the step proportional to the gradient, so equal weights after it mean equal gradients.
    out["norm2"] = tc.optim_step(types.AdamParams(learning_rate=1.0, eps=1e3)).result().metrics["grad_norm:mean"]
    out["lp2"] = logprobs_of(tc.forward(_data(), "cross_entropy").result())
    sampler = tc.save_weights_and_get_sampling_client().result()
    seq = sampler.sample(types.ModelInput.from_ints(SEQS[0][:5]), 2,
                         types.SamplingParams(max_tokens=8, temperature=1.0, seed=11, stop=[])).result().sequences
    out["sampled"] = [s.tokens for s in seq]
    out["sampled_lp"] = [s.logprobs for s in seq]
    return out


@pytest.mark.parametrize("name", ["tiny-qwen3", "tiny-llama"])
def test_tensor_parallel_2_matches_1(server, server_tp2, name):
    _assert_same_steps(_run_steps(server.url, name), _run_steps(server_tp2.url, name), loss_rel=1e-6)


def _assert_same_steps(one: dict, two: dict, loss_rel: float) -> None:
    """Two `_run_steps` results agree: logprobs before and after, loss, both steps' grad norms
    (so the gradients), and the samples."""
    for key in ("lp0", "lp2"):
        for a, b in zip(one[key], two[key]):
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    assert two["loss"] == pytest.approx(one["loss"], rel=loss_rel)
    assert two["norm1"] == pytest.approx(one["norm1"], rel=1e-5)
    assert two["norm2"] == pytest.approx(one["norm2"], rel=1e-5)
    assert two["sampled"] == one["sampled"]
    np.testing.assert_allclose(np.array(two["sampled_lp"]), np.array(one["sampled_lp"]), atol=1e-5)


@pytest.fixture(scope="module")
def server_compiled_layers(tiny_models, tmp_path_factory):
    # this test process may have set TORCHINDUCTOR_CACHE_DIR (torch does once it looks for its cache);
    # empty, the server uses its own default
    srv = ServerProcess(tmp_path_factory.mktemp("layers"), {"tiny-qwen3": tiny_models["tiny-qwen3"]},
                        extra_args=("--kernels", "compiled_layers"), env={"TORCHINDUCTOR_CACHE_DIR": ""}).start()
    yield srv
    srv.stop()


def test_compiled_layers_server_matches_eager(server, server_compiled_layers):
    """`--kernels compiled_layers` (each decoder layer one compiled graph, forward and backward)
    through the SDK: eager's logprobs, loss, gradients (two optimizer steps) and samples, and
    torch.compile's cache kept in the server's data dir for the next start."""
    _assert_same_steps(_run_steps(server.url, "tiny-qwen3"), _run_steps(server_compiled_layers.url, "tiny-qwen3"),
                       loss_rel=1e-5)
    cache = server_compiled_layers.data_dir / "compile_cache"
    assert cache.is_dir() and any(p.is_file() for p in cache.rglob("*"))
