"""The eager SwiGLU (backends/miles/swiglu.py): megatron-core's arithmetic bit for bit, with one
gradient buffer and less kept for the backward pass.

The function itself is checked in this process against megatron-core's chain of ops; the model
checks run a real megatron-core model of a tiny Qwen3 checkpoint in a worker process (this file
is its script), built once with `swiglu` and once with megatron-core's own activation.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.mcore_harness import make_hf_checkpoint, run_workers


def _megatron_chain(x):
    """megatron-core's unfused gated activation (transformer/mlp.py, glu_linear_offset 0.0)."""
    import torch
    import torch.nn.functional as F

    x_glu, x_linear = torch.chunk(x, 2, dim=-1)
    return F.silu(x_glu) * (x_linear + 0.0)


@pytest.mark.parametrize("dtype_name", ("float32", "bfloat16"))
def test_swiglu_gives_the_chains_values_and_gradients_bit_for_bit(dtype_name):
    import torch

    from backends.miles.swiglu import swiglu

    dtype = getattr(torch, dtype_name)
    g = torch.Generator().manual_seed(0)
    base = torch.randn(16, 3, 96, generator=g).to(dtype)
    grad = torch.randn(16, 3, 48, generator=g).to(dtype)
    want_x, got_x = base.clone().requires_grad_(), base.clone().requires_grad_()
    want, got = _megatron_chain(want_x), swiglu(got_x)
    assert got.grad_fn is not None and "SwiGLU" in type(got.grad_fn).__name__
    want.backward(grad)
    got.backward(grad)
    assert torch.equal(got, want) and torch.equal(got_x.grad, want_x.grad)
    assert got_x.grad.abs().sum() > 0
    with torch.no_grad():  # the sampler's path: the plain product, the same values
        assert torch.equal(swiglu(base), want.detach())
    # a gradient that reaches it non-contiguous (transposed) gives the same gradient too
    strided_x = base.clone().requires_grad_()
    swiglu(strided_x).backward(grad.transpose(0, 1).contiguous().transpose(0, 1))
    assert torch.equal(strided_x.grad, want_x.grad)


@pytest.fixture(scope="module")
def model_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("swiglu")
    model_dir = make_hf_checkpoint(root / "qwen3", "qwen3", num_layers=3)
    out = root / "result.json"
    run_workers(Path(__file__), 1, str(out), str(model_dir))
    return json.loads(out.read_text())


def test_the_layers_use_it_and_train_exactly_as_with_megatrons_activation(model_run):
    assert model_run["activation"] == "swiglu" and model_run["chain_activation"] != "swiglu"
    assert model_run["logprobs_equal"] and model_run["grads_equal"] and model_run["grads_nonzero"]
    assert model_run["sampled_equal"]


def test_it_keeps_half_an_fc1_output_less_per_layer_for_backward(model_run):
    # the chain's `x_linear + 0.0`: [tokens, ffn] floats per layer
    assert model_run["chain_saved_bytes"] - model_run["saved_bytes"] == model_run["expected_saving"] > 0


# ---------------------------------------------------------------------------------------
# worker side
# ---------------------------------------------------------------------------------------
def _worker(out_path: str, model_dir: str) -> None:
    import torch

    import backends.miles.model as model_module
    from backends.miles.lora import LoraManager
    from backends.miles.sampler import SampleSpec, generate
    from backends.miles.swiglu import swiglu
    from tests.mcore_harness import init_worker

    device = init_worker()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(4, 1000, (2, 12), generator=g)

    def run(model):
        lora = LoraManager(model)
        lora.add_adapter("a", 4, 8.0, train_unembed=True, seed=0)
        with torch.no_grad():
            for module in lora.modules.values():
                factors = module.adapters["a"]
                factors.lora_B.copy_(torch.randn(factors.lora_B.shape, generator=torch.Generator().manual_seed(2)) * 0.1)
        params = [p for _, p, _ in lora.adapter_params("a")]
        storages: dict[int, int] = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with lora.route(["a", "a"]), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            lp = model_module.token_logprobs(model, tokens[:, :-1], tokens[:, 1:])
        lp.sum().backward()
        spec = SampleSpec(prompt=tokens[0, :5].tolist(), max_tokens=5, temperature=1.0, seed=3, adapter="a")
        sampled = generate(model, [spec], route=lora.route)[0].sequences[0]
        return lp.detach(), [p.grad.clone() for p in params], sum(storages.values()), (sampled.tokens, sampled.logprobs)

    model = model_module.build_model(model_dir, device, torch.float32)
    ours = run(model)
    activation = model.decoder.layers[0].mlp.activation_func
    keep = model_module.use_swiglu
    model_module.use_swiglu = lambda spec, config: None  # megatron-core's own activation
    try:
        chain_model = model_module.build_model(model_dir, device, torch.float32)
    finally:
        model_module.use_swiglu = keep
    chain = run(chain_model)
    layers = len(model.decoder.layers)
    ffn = model.config.ffn_hidden_size
    result = {
        "activation": activation.__name__ if activation is swiglu else repr(activation),
        "chain_activation": getattr(chain_model.decoder.layers[0].mlp.activation_func, "__name__", "?"),
        "logprobs_equal": torch.equal(ours[0], chain[0]),
        "grads_equal": all(torch.equal(a, b) for a, b in zip(ours[1], chain[1])),
        "grads_nonzero": all(float(g.abs().sum()) > 0 for g in ours[1]),
        "sampled_equal": ours[3] == chain[3],
        "saved_bytes": ours[2], "chain_saved_bytes": chain[2],
        "expected_saving": layers * tokens[:, :-1].numel() * ffn * 4,
    }
    Path(out_path).write_text(json.dumps(result))


if __name__ == "__main__":
    _worker(*sys.argv[1:])
