"""The compiled kernels (`kernels="compiled"`: RMSNorm, RoPE and SwiGLU through torch.compile)
compute what the eager layers compute: logprobs, a LoRA loss's adapter gradients and greedy
samples, with eager and compiled models of the same weights in one process (the RoPE routing
is per model), and the compiled one against Hugging Face.

Here they are compiled for the CPU (inductor's C++ backend), so this test checks the wiring
and the arithmetic, not GPU speed (BENCHMARKS.md).
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest

from tests.mcore_harness import hf_logprobs, init_worker, make_hf_checkpoint, run_workers

BATCH, SEQ = 3, 24


def _train_pass(lora, model, adapter: str, batch: dict):
    """The adapter's B factors set to seeded values (B = 0 would make every A gradient zero), one
    weighted-NLL forward and backward: (logprobs, {factor: gradient})."""
    import torch

    from backends.miles.model import token_logprobs

    generator = torch.Generator().manual_seed(1 + len(adapter) * ord(adapter[0]))
    with torch.no_grad():
        for name, p, _ in lora.adapter_params(adapter):
            if name.endswith("lora_B"):
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))
    with lora.route([adapter] * batch["tokens"].shape[0]):
        logprobs = token_logprobs(model, batch["tokens"], batch["targets"])
        (-(logprobs * batch["weights"]).sum()).backward()
    return logprobs.detach(), {name: p.grad.clone() for name, p, _ in lora.adapter_params(adapter)}


def _worker(out_path: str, model_dir: str, batch_path: str) -> None:
    import torch
    import torch.distributed as dist

    device = init_worker()
    from backends.miles import fusions
    from backends.miles.lora import LoraManager
    from backends.miles.model import build_model, token_logprobs
    from backends.miles.sampler import SampleSpec, generate

    from torch._dynamo.utils import counters

    batch = torch.load(batch_path)
    results = {}
    for kernels in ("eager", "compiled", "compiled_layers"):  # eager first: it must not take the compiled RoPE
        model = build_model(model_dir, device, kernels=kernels)
        lora = LoraManager(model)
        lora.add_adapter("a", 4, 8.0, train_unembed=True, seed=0)
        graphs = counters["stats"]["unique_graphs"]
        logprobs, grads = _train_pass(lora, model, "a", batch)
        a_new_graphs = counters["stats"]["unique_graphs"] - graphs
        graphs = counters["stats"]["unique_graphs"]  # another adapter, same shape, other values and
        lora.add_adapter("b", 4, 16.0, train_unembed=True, seed=7)  # scale: compiled layers make no new graph
        b_logprobs = _train_pass(lora, model, "b", batch)[0]
        b_new_graphs = counters["stats"]["unique_graphs"] - graphs
        rank_graphs = []  # a second rank compiles once more (the rank becomes a variable), a third not
        for name, rank in (("r8", 8), ("r2", 2)):
            graphs = counters["stats"]["unique_graphs"]
            lora.add_adapter(name, rank, 8.0, train_unembed=True, seed=5)
            _train_pass(lora, model, name, batch)
            rank_graphs.append(counters["stats"]["unique_graphs"] - graphs)
            lora.remove_adapter(name)
        for p in lora.adapter_params("a") + lora.adapter_params("b"):
            p[1].grad = None
        with lora.route(["b", "a", None]):  # rows of different adapters (and the base) in one pass
            mixed = token_logprobs(model, batch["tokens"], batch["targets"])
            (-(mixed * batch["weights"]).sum()).backward()
        mixed_grads = {f"{adapter}:{name}": p.grad.clone() for adapter in "ab"
                       for name, p, _ in lora.adapter_params(adapter)}
        lora.remove_adapter("b")
        with torch.no_grad():
            plain = token_logprobs(model, batch["tokens"], batch["targets"])
        lora.clone_adapter("a", "frozen")
        samples = generate(model, [SampleSpec(prompt=batch["tokens"][0, :8].tolist(), num_samples=1, max_tokens=12,
                                              temperature=0.0, seed=0, adapter="frozen")], route=lora.route)
        results[kernels] = {
            "logprobs": logprobs, "grads": grads, "plain": plain, "b_logprobs": b_logprobs,
            "mixed": mixed.detach(), "mixed_grads": mixed_grads, "a_new_graphs": a_new_graphs,
            "b_new_graphs": b_new_graphs, "rank_graphs": rank_graphs,
            "graph_breaks": sum(counters["graph_break"].values()),
            "tokens": samples[0].sequences[0].tokens,
            "norm_types": sorted({type(m).__name__ for n, m in model.named_modules()
                                  if n.rpartition(".")[2] in ("input_layernorm", "pre_mlp_layernorm", "q_layernorm",
                                                              "k_layernorm")}),
            "swiglu_fused": model.config.bias_activation_fusion,
            "compiled_rope_made": fusions._compiled_rope_bshd is not None,
        }
    for kernels in ("eager", "compiled_layers"):  # whole layers recomputed in backward
        model = build_model(model_dir, device, recompute="full", kernels=kernels)
        lora = LoraManager(model)
        lora.add_adapter("a", 4, 8.0, train_unembed=True, seed=0)
        breaks = sum(counters["graph_break"].values())
        results[f"{kernels}_recompute"] = (*_train_pass(lora, model, "a", batch),
                                           sum(counters["graph_break"].values()) - breaks,
                                           all(getattr(layer, "_compiled_call_impl", None) is not None
                                               for layer in model.decoder.layers))
    for kernels in ("eager", "compiled"):  # bf16 activations and norm weights, as on a GPU
        model = build_model(model_dir, device, torch.bfloat16, kernels=kernels)
        norms = [m for m in model.modules() if isinstance(m, torch.nn.RMSNorm)]
        with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            results[f"{kernels}_bf16"] = token_logprobs(model, batch["tokens"], batch["targets"])
            results[f"{kernels}_bf16_norm_dtypes"] = sorted({str(m.weight.dtype) for m in norms})
            results[f"{kernels}_bf16_mismatch_warnings"] = sum("Mismatch dtype" in str(w.message) for w in caught)
            for m in norms:  # the same values in float32, as megatron-core's norms would hold them
                m.weight.data = m.weight.data.float()
            results[f"{kernels}_bf16_float32_norms"] = token_logprobs(model, batch["tokens"], batch["targets"])
    torch.save(results, out_path)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import torch

    root = tmp_path_factory.mktemp("fusions")
    model_dir = make_hf_checkpoint(root / "qwen3", "qwen3", seed=3, num_layers=3)  # 3: compiled layers share graphs
    generator = torch.Generator().manual_seed(0)
    batch = {
        "tokens": torch.randint(0, 1000, (BATCH, SEQ), generator=generator),
        "targets": torch.randint(0, 1000, (BATCH, SEQ), generator=generator),
        "weights": (torch.rand(BATCH, SEQ, generator=generator) > 0.3).float(),
    }
    torch.save(batch, root / "batch.pt")
    run_workers(Path(__file__), 1, str(root / "out.pt"), str(model_dir), str(root / "batch.pt"), timeout=600)
    return model_dir, batch, torch.load(root / "out.pt", weights_only=False)


def test_compiled_layers_are_in_place_and_eager_ones_untouched(runs):
    _, _, results = runs
    eager, compiled = results["eager"], results["compiled"]
    assert compiled["norm_types"] == ["CompiledRMSNorm"] != eager["norm_types"]
    assert (compiled["swiglu_fused"], eager["swiglu_fused"]) == (True, False)
    assert not eager["compiled_rope_made"] and compiled["compiled_rope_made"]


@pytest.mark.parametrize("kernels", ["compiled", "compiled_layers"])
def test_compiled_kernels_give_eager_logprobs_gradients_and_samples(runs, kernels):
    _, _, results = runs
    eager, compiled = results["eager"], results[kernels]
    assert (eager["logprobs"] - compiled["logprobs"]).abs().max() < 1e-5
    assert (eager["b_logprobs"] - compiled["b_logprobs"]).abs().max() < 1e-5
    assert (eager["mixed"] - compiled["mixed"]).abs().max() < 1e-5
    for name, g in eager["mixed_grads"].items():
        assert g.abs().max() > 0, name
        assert (g - compiled["mixed_grads"][name]).abs().max() <= 1e-5 * max(1.0, g.abs().max()), name
    assert (eager["plain"] - compiled["plain"]).abs().max() < 1e-5
    assert eager["grads"].keys() == compiled["grads"].keys() and len(eager["grads"]) > 10
    for name, g in eager["grads"].items():
        assert g.abs().max() > 0, name
        assert (g - compiled["grads"][name]).abs().max() <= 1e-5 * max(1.0, g.abs().max()), name
    assert compiled["tokens"] == eager["tokens"] and len(eager["tokens"]) == 12


def test_compiled_layers_are_whole_graphs_shared_by_adapters(runs):
    """A compiled decoder layer is one graph (megatron-core's warnings and our TensorMemo would
    split it), and a second adapter of the same shape and another scale reuses the first one's
    graphs with its own factors and scale (its logprobs differ from the first adapter's and match
    eager's, above); LoRA ranks cost one recompile in all."""
    _, _, results = runs
    layers = results["compiled_layers"]
    # 3 layers, 2 graphs (forward; backward ones are not counted here): the first layer's input
    # needs no gradient, the others' does, and the layers share the rest
    assert layers["a_new_graphs"] == 2 and results["eager"]["a_new_graphs"] == 0
    assert layers["graph_breaks"] == 0 and layers["b_new_graphs"] == 0 and layers["rank_graphs"] == [2, 0]
    assert (layers["b_logprobs"] - layers["logprobs"]).abs().max() > 1e-2


def test_compiled_layers_with_full_recomputation(runs):
    """Recomputed whole in backward (megatron-core's checkpoint around each layer), a compiled
    layer stays one graph and gives eager's logprobs and adapter gradients."""
    _, _, results = runs
    eager_lp, eager_grads, _, eager_compiled = results["eager_recompute"]
    layers_lp, layers_grads, breaks, layers_compiled = results["compiled_layers_recompute"]
    assert layers_compiled and not eager_compiled and breaks == 0
    assert (eager_lp - layers_lp).abs().max() < 1e-5
    assert (eager_lp - results["eager"]["logprobs"]).abs().max() < 1e-5  # recomputation changes nothing
    for name, g in eager_grads.items():
        assert g.abs().max() > 0, name
        assert (g - layers_grads[name]).abs().max() <= 1e-5 * max(1.0, g.abs().max()), name


def test_compiled_kernels_in_bf16_are_as_close_to_float32_as_eager_bf16(runs):
    """In bf16 the two differ by rounding: a fused kernel rounds once at its end where the eager
    chain rounds after every op. So the test is the distance to the float32 result: about the same
    for both, within 1.25x on the mean and 1.5x on the largest error (a real fault in a fused kernel
    is many times that). Which is closer depends on the CPU's bf16 kernels: on an AVX-512/AMX host
    (2026-12-07) compiled was 1.11x eager's mean error and 0.81x its max."""
    _, _, results = runs
    exact = results["eager"]["plain"]
    eager_error = (results["eager_bf16"] - exact).abs()
    compiled_error = (results["compiled_bf16"] - exact).abs()
    print(f"bf16 logprob error vs float32: eager max {eager_error.max():.4f} mean {eager_error.mean():.4f}, "
          f"compiled max {compiled_error.max():.4f} mean {compiled_error.mean():.4f}")
    assert eager_error.max() > 1e-3, "bf16 should differ from float32"
    assert compiled_error.mean() <= 1.25 * eager_error.mean() and compiled_error.max() <= 1.5 * eager_error.max()


def test_compiled_model_matches_hf(runs):
    from transformers import AutoModelForCausalLM

    model_dir, batch, results = runs
    reference = hf_logprobs(AutoModelForCausalLM.from_pretrained(model_dir).float(), batch["tokens"], batch["targets"])
    assert (results["compiled"]["plain"] - reference).abs().max() < 1e-4


def _tp_worker(out_path: str, model_dir: str, batch_path: str) -> None:
    """A rank of tp=2: logprobs and its shards' gradients with eager and with compiled layers."""
    import torch
    import torch.distributed as dist
    from torch._dynamo.utils import counters

    device = init_worker()
    from backends.miles.lora import LoraManager
    from backends.miles.model import build_model

    batch, results = torch.load(batch_path), {}
    for kernels in ("eager", "compiled_layers"):
        model = build_model(model_dir, device, kernels=kernels)
        lora = LoraManager(model)
        lora.add_adapter("a", 4, 8.0, train_unembed=True, seed=0)
        results[kernels] = _train_pass(lora, model, "a", batch)
    results["graph_breaks"] = sum(counters["graph_break"].values())
    torch.save(results, f"{out_path}.{dist.get_rank()}")  # each rank's shards of the factors
    dist.destroy_process_group()


def test_compiled_layers_under_tensor_parallelism(runs, tmp_path):
    """tp=2: the same logprobs and adapter gradients as eager, and no graph breaks (megatron-core's
    tensor-parallel mappings warn on rank 0 when no group is passed, which would split the layer)."""
    import torch

    model_dir, _, _ = runs
    run_workers(Path(__file__), 2, "tp", str(tmp_path / "tp.pt"), str(model_dir), str(model_dir.parent / "batch.pt"),
                timeout=600)
    for rank in range(2):
        results = torch.load(tmp_path / f"tp.pt.{rank}", weights_only=False)
        (eager_lp, eager_grads), (layers_lp, layers_grads) = results["eager"], results["compiled_layers"]
        assert results["graph_breaks"] == 0
        assert (eager_lp - layers_lp).abs().max() < 1e-5
        assert eager_grads.keys() == layers_grads.keys()
        for name, g in eager_grads.items():
            assert g.abs().max() > 0, name
            assert (g - layers_grads[name]).abs().max() <= 1e-5 * max(1.0, g.abs().max()), name


if __name__ == "__main__":
    (_tp_worker if sys.argv[1] == "tp" else _worker)(*sys.argv[2 if sys.argv[1] == "tp" else 1:])


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("partial", [False, True])
def test_eager_rope_is_megatrons_rope_bit_for_bit(dtype_name, interleaved, partial):
    """`_eager_rope` (cos/sin once per freqs tensor, no copy for a full rotation) gives exactly
    megatron-core's values and gradients, and recomputes cos/sin for a new freqs tensor."""
    import torch
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    from backends.miles.fusions import _eager_rope

    dtype = getattr(torch, dtype_name)
    generator = torch.Generator().manual_seed(0)
    for step in range(2):  # the second step's freqs are a new tensor: cached cos/sin must not be reused
        freqs = torch.rand(12, 1, 1, 8 if partial else 16, generator=generator) * (step + 1) * 10
        t = torch.randn(12, 2, 3, 16, generator=generator).to(dtype)
        with torch.inference_mode():  # first made under inference mode (as the sampler would), then
            inferred = _eager_rope(t, freqs, interleaved, 1.3)  # used with autograd: must be remade
        ours_in, theirs_in = t.clone().requires_grad_(), t.clone().requires_grad_()
        ours = _eager_rope(ours_in, freqs, interleaved, 1.3)
        theirs = _apply_rotary_pos_emb_bshd(theirs_in, freqs, rotary_interleaved=interleaved, mscale=1.3)
        assert torch.equal(ours, theirs) and torch.equal(inferred, theirs.detach())
        upstream = torch.randn(theirs.shape, generator=generator).to(dtype)
        ours.backward(upstream)
        theirs.backward(upstream)
        assert torch.equal(ours_in.grad, theirs_in.grad)


@pytest.mark.parametrize("kernels", ["eager", "compiled"])
def test_bf16_models_keep_norm_weights_in_bf16_with_the_same_logprobs(runs, kernels):
    """Norm weights in the model's dtype let torch.rms_norm take its fused kernel (no dtype
    mismatch); torch computes in float32 and rounds once either way, so the logprobs are those
    of the same weights held in float32, bit for bit."""
    import torch

    _, _, r = runs
    assert r[f"{kernels}_bf16_norm_dtypes"] == ["torch.bfloat16"]
    if kernels == "eager":
        assert r["eager_bf16_mismatch_warnings"] == 0
    assert torch.equal(r[f"{kernels}_bf16"], r[f"{kernels}_bf16_float32_norms"])
