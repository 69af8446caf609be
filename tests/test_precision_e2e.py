"""Memory options through the whole stack: activation recomputation and bfloat16 base weights.

Recomputation (`--recompute full` re-runs each layer's forward in backward, `selective` only
the attention core) must not change a single number: logprobs, loss, grad norms, the weights
after a step and samples equal the default server's to 1e-5. With `--dtype bfloat16` the base
model runs in bf16 while the adapter and its Adam state stay float32 (the saved checkpoint's
tensors say so); logprobs stay within bf16 rounding of the float32 server's, and training
still lowers the loss.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tinker
from safetensors import safe_open
from tinker import types

from tests.conftest import API_KEY, ServerProcess
from tests.helpers import logprobs_of
from tests.test_numerics_e2e import _data, _run_steps

QWEN = "tiny-qwen3"


def _start(tmp_path: Path, tiny_models, *args: str) -> ServerProcess:
    return ServerProcess(tmp_path, {QWEN: tiny_models[QWEN]}, extra_args=args).start()


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_recomputation_changes_no_number(server, tiny_models, tmp_path, mode):
    srv = _start(tmp_path, tiny_models, "--recompute", mode)
    try:
        again = _run_steps(srv.url, QWEN)
    finally:
        srv.stop()
    base = _run_steps(server.url, QWEN)
    for key in ("lp0", "lp2"):
        for a, b in zip(base[key], again[key]):
            np.testing.assert_allclose(b, a, atol=1e-5, rtol=0)
    for key in ("loss", "norm1", "norm2"):
        assert again[key] == pytest.approx(base[key], rel=1e-5)
    assert again["sampled"] == base["sampled"]


@pytest.mark.parametrize("lora_compute", ["float32", "base"])
def test_bfloat16_base_weights_keep_float32_adapters(server, tiny_models, tmp_path, lora_compute):
    """Also with the LoRA products in bf16 (`--lora-compute base`): the factors, their Adam state
    and the checkpoint stay float32."""
    srv = _start(tmp_path, tiny_models, "--dtype", "bfloat16", "--lora-compute", lora_compute)
    products = "torch.bfloat16" if lora_compute == "base" else "torch.float32"
    assert f"base weights in torch.bfloat16, LoRA products in {products}" in srv.log_path.read_text()
    try:
        client = tinker.ServiceClient(base_url=srv.url, api_key=API_KEY)
        tc = client.create_lora_training_client(QWEN, rank=4, seed=3).result()
        bf16 = logprobs_of(tc.forward(_data(), "cross_entropy").result())
        losses = []
        for _ in range(4):
            losses.append(tc.forward_backward(_data(), "cross_entropy").result().metrics["loss:sum"])
            tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
        tc.save_state("bf16").result()
    finally:
        srv.stop()
    fp32_client = tinker.ServiceClient(base_url=server.url, api_key=API_KEY)
    fp32 = logprobs_of(fp32_client.create_lora_training_client(QWEN, rank=4, seed=3).result()
                       .forward(_data(), "cross_entropy").result())
    for a, b in zip(fp32, bf16):
        assert np.abs(a - b).max() < 0.25  # bf16 keeps 8 bits of mantissa
        assert np.abs(a - b).max() > 0  # and it is really bf16, not float32
    assert losses[-1] < 0.9 * losses[0]
    folder = next(tmp_path.rglob("adapter_model.safetensors")).parent
    for file in ("adapter_model.safetensors", "optimizer.safetensors"):
        with safe_open(folder / file, framework="pt") as f:
            dtypes = {str(f.get_tensor(k).dtype) for k in f.keys()}
        assert dtypes == {"torch.float32"}, (file, dtypes)


def _bf16_samples_and_logprobs(srv: ServerProcess) -> tuple[list[list[int]], list[np.ndarray]]:
    client = tinker.ServiceClient(base_url=srv.url, api_key=API_KEY)
    tc = client.create_lora_training_client(QWEN, rank=4, seed=3).result()
    logprobs = logprobs_of(tc.forward(_data(), "cross_entropy").result())
    sampler = tc.save_weights_and_get_sampling_client().result()
    prompts = [types.ModelInput.from_ints([9707, 1879, 11 + i]) for i in range(3)]
    futures = [sampler.sample(p, 1, types.SamplingParams(max_tokens=6, temperature=0.0, stop=[])) for p in prompts]
    return [f.result().sequences[0].tokens for f in futures], logprobs


def test_bfloat16_pipeline_stages_sample_what_one_stage_samples(tiny_models, tmp_path):
    """With --pp 2 in bf16, the second stage receives bf16 activations and keeps bf16 K/V caches
    (its first parameter is a norm weight, which is not the activations' dtype to go by): its
    greedy samples and logprobs are those of one bf16 stage."""
    results = {}
    for pp in ("1", "2"):
        srv = ServerProcess(tmp_path / f"pp{pp}", {QWEN: tiny_models[QWEN]}, workers=int(pp),
                            extra_args=("--dtype", "bfloat16", "--tp", "1", "--pp", pp)).start()
        try:
            results[pp] = _bf16_samples_and_logprobs(srv)
        finally:
            srv.stop()
    assert results["2"][0] == results["1"][0]
    for a, b in zip(results["1"][1], results["2"][1]):
        np.testing.assert_array_equal(b, a)
