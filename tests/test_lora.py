"""Our multi-tenant LoRA (backends/miles/lora.py) against an HF model with the merged delta, and TP=2 against TP=1.

Adapters are given in the full (HF-order) layout, drawn here with a fixed seed, so the test
checks the layout mapping independently of our own gather code. Model work runs in fresh
worker processes (this file doubles as the worker script): one process at TP=1 runs every
scenario, then two gloo processes run the gradient scenario at TP=2. The pytest functions
compare what the workers saved.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.mcore_harness import hf_logprobs, init_worker, make_hf_checkpoint, run_workers

RANK, ALPHA = 4, 8.0
ROWS, SEQ, VOCAB, LAYERS = 4, 24, 1000, 2
FULL_SHAPES = {  # module path -> (A, B) in full layout; hidden 64, q 64, kv 2 x 16, ffn 192
    **{
        f"decoder.layers.{i}.{path}": shapes
        for i in range(LAYERS)
        for path, shapes in {
            "self_attention.linear_qkv": ((RANK, 64), (64 + 2 * 32, RANK)),
            "self_attention.linear_proj": ((RANK, 64), (64, RANK)),
            "mlp.linear_fc1": ((RANK, 64), (2 * 192, RANK)),
            "mlp.linear_fc2": ((RANK, 192), (64, RANK)),
        }.items()
    },
    "output_layer": ((RANK, 64), (VOCAB, RANK)),
}


def random_full_state(seed: int) -> dict:
    """Non-trivial factors in full layout: A at kaiming-like scale, B clearly non-zero."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    state = {}
    for path, (a_shape, b_shape) in FULL_SHAPES.items():
        state[f"{path}.lora_A"] = torch.randn(a_shape, generator=generator) / a_shape[1] ** 0.5
        state[f"{path}.lora_B"] = 0.1 * torch.randn(b_shape, generator=generator)
    return state


def merged_hf_logprobs(model_dir: Path, full_state: dict, tokens, targets):
    """The independent reference: HF weights + scale * B @ A, split into HF's q/k/v and gate/up."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).float()

    def delta(path):
        return ALPHA / RANK * full_state[f"{path}.lora_B"] @ full_state[f"{path}.lora_A"]

    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            q, k, v = delta(f"decoder.layers.{i}.self_attention.linear_qkv").split([64, 32, 32])
            attn.q_proj.weight += q
            attn.k_proj.weight += k
            attn.v_proj.weight += v
            attn.o_proj.weight += delta(f"decoder.layers.{i}.self_attention.linear_proj")
            gate, up = delta(f"decoder.layers.{i}.mlp.linear_fc1").chunk(2)
            mlp.gate_proj.weight += gate
            mlp.up_proj.weight += up
            mlp.down_proj.weight += delta(f"decoder.layers.{i}.mlp.linear_fc2")
        # The checkpoint ties embeddings; LoRA on the unembedding changes only the output side.
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach() + delta("output_layer"))
    return hf_logprobs(model, tokens, targets)


# ---------------------------------------------------------------------------------------
# worker side
# ---------------------------------------------------------------------------------------
def _worker(out_path: str, model_dir: str, inputs_path: str) -> None:
    import torch
    import torch.distributed as dist

    device = init_worker()
    from backends.miles.lora import LoraManager
    from backends.miles.model import build_model, token_logprobs
    from backends.miles.parallel import tp_rank, tp_size

    model = build_model(model_dir, device)
    manager = LoraManager(model)
    inputs = torch.load(inputs_path)
    tokens, targets, weights = inputs["tokens"], inputs["targets"], inputs["weights"]
    for name, full_state in inputs["states"].items():
        manager.load_adapter_state(name, manager.shard_full_state(full_state), rank=RANK, alpha=ALPHA)

    def logprobs(rows: slice, adapters):
        with manager.route(adapters):
            return token_logprobs(model, tokens[rows], targets[rows])

    def backward(rows: slice, adapters):
        (logprobs(rows, adapters) * weights[rows]).sum().backward()

    def full_grads(name):
        return manager.gather_full_state({key: param.grad for key, param, _ in manager.adapter_params(name)})

    def replicated_grad_spread(name):
        """Largest difference between tp ranks' gradients of a replicated factor."""
        spread = 0.0
        for _, param, sharded in manager.adapter_params(name):
            if not sharded:
                copies = [torch.empty_like(param.grad) for _ in range(tp_size())]
                dist.all_gather(copies, param.grad)
                spread = max(spread, max((copy - copies[0]).abs().max().item() for copy in copies))
        return spread

    def zero_grads():
        for name in ("lora", "lora2"):
            for _, param, _ in manager.adapter_params(name):
                param.grad = None

    two = slice(0, 2)
    lora_logprobs = logprobs(two, ["lora", "lora"])
    (lora_logprobs * weights[two]).sum().backward()
    results = {
        "lora_logprobs": lora_logprobs.detach(),
        "lora_grads": full_grads("lora"),
        "replicated_grad_spread": replicated_grad_spread("lora"),
        "roundtrip": manager.gather_full_state(manager.adapter_state("lora")),
        "sharded": {key: sharded for key, _, sharded in manager.adapter_params("lora")},
    }
    if tp_size() == 1:
        results.update(_single_process_scenarios(model, manager, logprobs, backward, full_grads, zero_grads))
        results["bf16"] = _bf16_compute_scenario(model_dir, device, inputs)
    if tp_rank() == 0:
        torch.save(results, out_path)
    dist.destroy_process_group()


def _bf16_compute_scenario(model_dir: str, device, inputs: dict) -> dict:
    """A bf16 base model with the adapter's products in float32 (the server's way) and in
    bf16 (`compute_dtype`): logprobs and float32 gradients of both."""
    import torch

    from backends.miles.lora import LoraManager
    from backends.miles.model import build_model, token_logprobs

    out = {}
    for name, compute in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        model = build_model(model_dir, device, torch.bfloat16)
        manager = LoraManager(model, compute_dtype=compute)
        manager.load_adapter_state("lora", manager.shard_full_state(inputs["states"]["lora"]), rank=RANK, alpha=ALPHA)
        with manager.route(["lora", "lora"]):
            lp = token_logprobs(model, inputs["tokens"][:2], inputs["targets"][:2])
            (lp * inputs["weights"][:2]).sum().backward()
        grads = {key: param.grad for key, param, _ in manager.adapter_params("lora")}
        out[name] = {"logprobs": lp.detach(), "grads": manager.gather_full_state(grads),
                     "grad_dtypes": {str(g.dtype) for g in grads.values()}}
        # the same row alone and beside rows of other adapters (and of none)
        manager.load_adapter_state("lora2", manager.shard_full_state(inputs["states"]["lora2"]), rank=RANK,
                                   alpha=ALPHA)
        with torch.no_grad():
            mixed_rows = ["lora", None, "lora2"]
            with manager.route(mixed_rows):
                out[name]["mixed"] = token_logprobs(model, inputs["tokens"][:3], inputs["targets"][:3])
            alone = []
            for i, row in enumerate(mixed_rows):
                with manager.route([row]):
                    alone.append(token_logprobs(model, inputs["tokens"][i:i + 1], inputs["targets"][i:i + 1]))
            out[name]["alone"] = torch.cat(alone)
    return out


def _single_process_scenarios(model, manager, logprobs, backward, full_grads, zero_grads) -> dict:
    import torch

    two = slice(0, 2)
    results = {"base_params_without_grad": all(p.grad is None for p in model.parameters())}
    with torch.no_grad():
        results["base_logprobs"] = logprobs(two, [None, None])
        manager.add_adapter("new", RANK, ALPHA, train_unembed=True, seed=5)
        results["new_logprobs"] = logprobs(two, ["new", "new"])
        results["new_state"] = manager.gather_full_state(manager.adapter_state("new"))

        mixed_rows = ["lora", None, "lora2"]
        results["mixed"] = logprobs(slice(0, 3), mixed_rows)
        results["alone"] = torch.cat([logprobs(slice(i, i + 1), [name]) for i, name in enumerate(mixed_rows)])

        manager.clone_adapter("lora", "snapshot")
        results["snapshot_logprobs"] = logprobs(two, ["snapshot", "snapshot"])
        results["snapshot_frozen"] = all(not p.requires_grad for _, p, _ in manager.adapter_params("snapshot"))
        manager.remove_adapter("snapshot")
        results["snapshot_removed"] = not manager.has_adapter("snapshot")
        manager.add_adapter("mlp_only", RANK, train_attn=False)
        results["mlp_only_modules"] = manager.adapter_config("mlp_only").modules

    four = ["lora", "lora2", "lora", "lora2"]
    zero_grads()
    backward(slice(0, 4), four)
    results["grads_one_call"] = {name: full_grads(name) for name in ("lora", "lora2")}
    zero_grads()
    backward(slice(0, 2), four[:2])
    backward(slice(2, 4), four[2:])
    results["grads_two_calls"] = {name: full_grads(name) for name in ("lora", "lora2")}
    return results


# ---------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    import torch

    root = tmp_path_factory.mktemp("lora")
    model_dir = make_hf_checkpoint(root / "qwen3", "qwen3", vocab_size=VOCAB, tie_word_embeddings=True, seed=3)
    generator = torch.Generator().manual_seed(0)
    inputs = {
        "tokens": torch.randint(0, VOCAB, (ROWS, SEQ), generator=generator),
        "targets": torch.randint(0, VOCAB, (ROWS, SEQ), generator=generator),
        "weights": torch.rand(ROWS, SEQ, generator=generator) / (ROWS * SEQ),
        "states": {"lora": random_full_state(1), "lora2": random_full_state(2)},
    }
    torch.save(inputs, root / "inputs.pt")
    results = {}
    for tp in (1, 2):
        run_workers(Path(__file__), tp, str(root / f"tp{tp}.pt"), str(model_dir), str(root / "inputs.pt"))
        results[tp] = torch.load(root / f"tp{tp}.pt")
    return model_dir, inputs, results


def _max_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max((a[key] - b[key]).abs().max().item() for key in a)


def test_lora_products_in_bf16_stay_close_and_keep_float32_gradients(lora_run):
    # The benchmark's `--lora-compute base`: on a bf16 model the adapter's products may run in
    # bf16; the factors' gradients stay float32 and near the float32-product ones.
    _, _, results = lora_run
    fp32, bf16 = results[1]["bf16"]["fp32"], results[1]["bf16"]["bf16"]
    assert fp32["grad_dtypes"] == bf16["grad_dtypes"] == {"torch.float32"}
    assert (fp32["logprobs"] - bf16["logprobs"]).abs().max().item() < 0.15  # bf16's spacing is 1/16 at 8..16
    assert (fp32["logprobs"] - bf16["logprobs"]).abs().max().item() > 0  # the option takes effect
    for key in fp32["grads"]:
        a, b = fp32["grads"][key], bf16["grads"][key]
        assert (a - b).norm() <= 0.05 * a.norm(), key


def test_bf16_rows_get_the_same_numbers_whatever_shares_their_batch(lora_run):
    """With bf16 products (one addmm per adapter group), a row's logprobs beside rows of other
    adapters are bit for bit those it gets alone: sampling results do not depend on batch mates."""
    import torch

    _, _, results = lora_run
    for name in ("fp32", "bf16"):
        run = results[1]["bf16"][name]
        assert torch.equal(run["mixed"], run["alone"]), name


def test_new_adapter_is_a_no_op(lora_run):
    _, _, results = lora_run
    tp1 = results[1]
    assert tp1["base_params_without_grad"]
    assert (tp1["new_logprobs"] == tp1["base_logprobs"]).all()
    new = tp1["new_state"]
    assert all((new[key] == 0).all() for key in new if key.endswith("lora_B"))
    assert all(new[key].abs().max() > 0 for key in new if key.endswith("lora_A"))


def test_lora_matches_hf_with_merged_delta(lora_run):
    model_dir, inputs, results = lora_run
    reference = merged_hf_logprobs(model_dir, inputs["states"]["lora"], inputs["tokens"][:2], inputs["targets"][:2])
    ours = results[1]["lora_logprobs"]
    assert (ours - results[1]["base_logprobs"]).abs().max() > 0.1, "the adapter should change the model"
    assert (ours - reference).abs().max() < 1e-4


def test_full_layout_round_trips(lora_run):
    _, inputs, results = lora_run
    for tp in (1, 2):
        assert _max_diff(results[tp]["roundtrip"], inputs["states"]["lora"]) == 0
    expected_sharded = {
        "linear_qkv": {"lora_A": False, "lora_B": True}, "linear_fc1": {"lora_A": False, "lora_B": True},
        "output_layer": {"lora_A": False, "lora_B": True}, "linear_proj": {"lora_A": True, "lora_B": False},
        "linear_fc2": {"lora_A": True, "lora_B": False},
    }
    for key, sharded in results[2]["sharded"].items():
        module, _, factor = key.rpartition(".")
        assert sharded == expected_sharded[module.rpartition(".")[2]][factor], key


def test_tp2_gradients_match_tp1(lora_run):
    _, _, results = lora_run
    assert (results[1]["lora_logprobs"] - results[2]["lora_logprobs"]).abs().max() < 1e-5
    grads1, grads2 = results[1]["lora_grads"], results[2]["lora_grads"]
    assert all(grads1[key].abs().max() > 1e-4 for key in grads1), "every factor should get a gradient"
    assert _max_diff(grads1, grads2) < 1e-5
    assert results[2]["replicated_grad_spread"] < 1e-7


def test_rows_routed_to_different_adapters(lora_run):
    _, _, results = lora_run
    assert (results[1]["mixed"] - results[1]["alone"]).abs().max() < 1e-5
    assert (results[1]["snapshot_logprobs"] == results[1]["lora_logprobs"]).all()
    assert results[1]["snapshot_frozen"] and results[1]["snapshot_removed"]
    assert results[1]["mlp_only_modules"] == tuple(
        f"decoder.layers.{i}.mlp.{name}" for i in range(LAYERS) for name in ("linear_fc1", "linear_fc2")
    )


def test_gradients_accumulate_across_calls(lora_run):
    _, _, results = lora_run
    one, two = results[1]["grads_one_call"], results[1]["grads_two_calls"]
    for name in ("lora", "lora2"):
        assert _max_diff(one[name], two[name]) < 1e-5


if __name__ == "__main__":
    _worker(*sys.argv[1:])
