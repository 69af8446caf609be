"""The sampler's oneDNN-packed frozen weights and row-by-row decode products (backends/miles/packed_weights.py).

The products themselves are checked in this process (plain torch). The model-level checks run a
real megatron-core model of a tiny Qwen3 checkpoint in a worker process (this file is its script):
packing leaves every training number bit for bit as it was and is never used there, the sampler
uses it and keeps its tokens and (to float rounding) its logprobs, a row's numbers no longer depend
on how many rows share its batch, and the memory budget is kept.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.mcore_harness import make_hf_checkpoint, run_workers

DTYPES = ("float32", "bfloat16")


def _dtype_or_skip(name: str):
    import torch

    from backends.miles import packed_weights

    dtype = getattr(torch, name)
    if not packed_weights.supported(torch.empty(1, 1, dtype=dtype)):
        pytest.skip(f"this CPU has no oneDNN {name} linear")
    return dtype


@pytest.mark.parametrize("dtype_name", DTYPES)
def test_packed_products_match_matmul_and_ignore_the_row_count(dtype_name):
    import torch

    from backends.miles import packed_weights

    dtype = _dtype_or_skip(dtype_name)
    g = torch.Generator().manual_seed(0)
    for n_in, n_out in ((256, 512), (256, 1536), (768, 256), (64, 1000)):
        weight = torch.randn(n_out, n_in, generator=g).to(dtype)
        x = torch.randn(40, n_in, generator=g).to(dtype)
        packed = packed_weights.pack(weight)
        full = packed_weights.linear(x, packed)
        want = torch.matmul(x.float(), weight.float().t())
        if dtype == torch.float32:  # the same products summed in another order
            torch.testing.assert_close(full, want, rtol=1e-5, atol=1e-4)
        else:  # float32 sums rounded once to bfloat16 (half a spacing: 1/256 of the value)
            torch.testing.assert_close(full.float(), want, rtol=4e-3, atol=1e-2)
        batched = packed_weights.linear(x.view(8, 5, n_in).transpose(0, 1), packed)  # [s, b, in], strided
        if dtype != torch.float32:
            # bfloat16 on AMX: oneDNN picks its kernel by the row count (768 inputs, 6-32 rows round
            # apart from 33-40), so only the values are checked; nothing promises bf16 rows more
            torch.testing.assert_close(batched, full.view(8, 5, n_out).transpose(0, 1), rtol=4e-3, atol=1e-2)
            continue
        # MKL's matmul rounds a row differently with 1, 2 or 9 rows beside it; oneDNN does not
        for rows in range(1, 40):
            assert torch.equal(packed_weights.linear(x[:rows], packed), full[:rows]), (n_in, n_out, rows)
        assert torch.equal(batched, full.view(8, 5, n_out).transpose(0, 1))


def test_a_frozen_adapter_made_inside_inference_mode_packs():
    # a snapshot read from disk while a sampling batch runs is made inside inference mode
    import torch

    from backends.miles import packed_weights
    from backends.miles.lora import LoraFactors

    _dtype_or_skip("float32")
    with torch.inference_mode():
        factors = LoraFactors(torch.randn(4, 64), torch.randn(32, 4), 2.0, trainable=False)
        a, b = factors.packed()
        x = torch.randn(3, 64)
        torch.testing.assert_close(packed_weights.linear(packed_weights.linear(x, a), b),
                                   x @ factors.lora_A.t() @ factors.lora_B.t())
    assert factors.packed()[0] is a  # made once
    with pytest.raises(ValueError, match="frozen"):
        LoraFactors(torch.randn(4, 64), torch.randn(32, 4), 2.0, trainable=True).packed()


@pytest.mark.parametrize("threads", (1, 2))
def test_rowwise_products_match_matmul_and_ignore_the_rows_beside_them(threads):
    """At two threads too, as a worker of the default layout on two cores: there a batch of one row
    took another kernel than larger batches on AVX-512/AMX CPUs (rank-8 B products of 256 or 768
    inputs), until `rowwise` sent a lone row as two."""
    import torch

    from backends.miles import packed_weights

    g = torch.Generator().manual_seed(2)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for n_in, n_out in ((256, 8), (768, 8), (256, 4), (8, 1536), (4, 64), (64, 32)):
            weight_t = torch.randn(n_in, n_out, generator=g)
            x = torch.randn(70, n_in, generator=g)
            full = packed_weights.rowwise(x, weight_t)
            torch.testing.assert_close(full, x @ weight_t, rtol=1e-5, atol=1e-4)
            for rows in (1, 2, 3, 5, 9, 17, 64):  # any count, any position in the batch
                assert torch.equal(packed_weights.rowwise(x[:rows], weight_t), full[:rows]), (n_in, n_out, rows)
                assert torch.equal(packed_weights.rowwise(x[-rows:], weight_t), full[-rows:]), (n_in, n_out, rows)
            batched = packed_weights.rowwise(x[:40].view(8, 5, n_in).transpose(0, 1), weight_t)  # [s, b, in], strided
            assert torch.equal(batched, full[:40].view(8, 5, n_out).transpose(0, 1))
            lone = packed_weights.rowwise(x[3].view(1, 1, n_in), weight_t)  # [1, 1, in]: one row, 3-D
            assert lone.shape == (1, 1, n_out) and torch.equal(lone[0, 0], full[3])
    finally:
        torch.set_num_threads(before)


def test_a_decode_step_multiplies_small_frozen_factors_row_by_row():
    import torch

    from backends.miles import packed_weights
    from backends.miles.lora import LoraFactors

    _dtype_or_skip("float32")
    small = LoraFactors(torch.randn(8, 256), torch.randn(512, 8), 4.0, trainable=False)
    large = LoraFactors(torch.randn(32, 1024), torch.randn(1024, 32), 1.0, trainable=False)
    assert small.lora_B.numel() <= packed_weights.ROWWISE_MAX_ELEMENTS < large.lora_A.numel()
    with torch.inference_mode():
        x, h = torch.randn(1, 6, 256), torch.randn(1, 6, 8)
        with packed_weights.decode_step():
            assert packed_weights.decoding()
            in_step = small.product(x, 0), small.product(h, 1), large.product(torch.randn(1, 6, 1024), 0)
        assert not packed_weights.decoding()
        assert torch.equal(in_step[0], packed_weights.rowwise(x, small.lora_A.t().contiguous()))
        assert torch.equal(in_step[1], packed_weights.rowwise(h, small.lora_B.t().contiguous()))
        assert large._transposed == [None, None]  # a large factor stays on oneDNN, in a decode step too
        mixed = LoraFactors(torch.randn(8, 64), torch.randn(4096, 8), 1.0, trainable=False)
        with packed_weights.decode_step():
            mixed.product(torch.randn(1, 3, 64), 0), mixed.product(torch.randn(1, 3, 8), 1)
        assert mixed._transposed[0] is not None and mixed._transposed[1] is None  # only the small one copied
        assert torch.equal(small.product(x, 0), packed_weights.linear(x, small.packed()[0]))  # outside a step
        torch.testing.assert_close(in_step[0], small.product(x, 0), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="frozen"):
        LoraFactors(torch.randn(4, 64), torch.randn(32, 4), 2.0, trainable=True).transposed(0)


@pytest.fixture(scope="module")
def model_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("packed")
    model_dir = make_hf_checkpoint(tmp / "qwen3", "qwen3", tie_word_embeddings=True)
    out = tmp / "result.json"
    run_workers(Path(__file__), 1, str(out), str(model_dir))
    return json.loads(out.read_text())


def test_training_and_forward_keep_every_bit_and_never_use_the_packed_weights(model_run):
    assert model_run["packed_modules"] == model_run["wrapped_modules"] > 0
    assert model_run["train_bitwise_equal"]
    assert model_run["packed_calls_in_training"] == 0


def test_the_sampler_uses_them_with_the_same_tokens(model_run):
    assert model_run["packed_calls_in_sampling"] > 0
    # the snapshot's small factors row by row in decode steps; never in training or forward
    assert model_run["rowwise_calls_in_training"] == 0 < model_run["rowwise_calls_in_sampling"]
    # a snapshot's factors are packed at their first use; a trainable adapter's never (they change)
    assert model_run["factors_packed"] == {"a": False, "snap": True}
    assert model_run["inference_made_snapshot_same"]
    assert model_run["tokens_equal"]
    assert model_run["max_logprob_diff"] < 1e-4  # float rounding of another summation order


def test_a_row_gets_the_same_bits_beside_any_number_of_rows(model_run):
    # a base-model row and an adapter's row: alone, with 1 and with 8 batch mates of the same
    # adapter, and with 8 of others (the LoRA products then run on the routed rows only)
    assert model_run["rows_invariant_packed"] == {"None": [True] * 3, "snap": [True] * 3}


def test_frozen_adapters_sample_through_merged_weights_with_the_same_tokens(model_run):
    """W + scale * B A packed once per frozen adapter and layer: one product a row instead of three
    and an add; the same tokens, logprobs to float rounding, and a row's bits beside any rows."""
    assert model_run["merged_calls"] > 0 and model_run["merged_bytes"] > 0
    assert model_run["merged_tokens_equal"]
    assert model_run["merged_max_logprob_diff"] < 1e-4
    assert model_run["rows_invariant_merged"] == [True] * 3
    assert model_run["train_bitwise_equal_after_merging"]


def test_merged_weights_keep_to_their_budget_and_go_with_their_adapter(model_run):
    # copies pushed out by others are made again bit for bit; a layer too big for the budget
    # keeps the unmerged products; removing the adapter frees its copies
    assert model_run["evicted_same"] and model_run["evicted_bytes_within"]
    assert model_run["unmergeable_same_tokens"]
    assert model_run["merged_bytes_after_removal"] == 0


def test_packing_keeps_to_its_budget(model_run):
    budget = model_run["budget"]
    assert 0 < model_run["budget_used"] <= budget
    assert 0 < model_run["budget_packed_modules"] < model_run["wrapped_modules"]


# ---------------------------------------------------------------------------------------
# worker side
# ---------------------------------------------------------------------------------------
def _worker(out_path: str, model_dir: str) -> None:
    import torch

    from backends.miles import packed_weights
    from backends.miles.lora import LoraManager
    from backends.miles.model import build_model, token_logprobs
    from backends.miles.sampler import SampleSpec, generate
    from tests.mcore_harness import init_worker

    device = init_worker()
    model = build_model(model_dir, device, torch.float32)
    lora = LoraManager(model)
    lora.add_adapter("a", 4, 8.0, train_unembed=True, seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in lora.modules.values():
            factors = module.adapters["a"]
            factors.lora_B.copy_(torch.randn(factors.lora_B.shape, generator=g) * 0.1)
    lora.clone_adapter("a", "snap")
    params = [p for _, p, _ in lora.adapter_params("a")]
    tokens = torch.randint(4, 1000, (2, 12), generator=g)

    def train_numbers():
        for p in params:
            p.grad = None
        with lora.route(["a", "a"]):
            lp = token_logprobs(model, tokens[:, :-1], tokens[:, 1:])
            lp.sum().backward()
            with torch.no_grad():  # a forward-only request: no autograd, yet not the sampler
                scored = token_logprobs(model, tokens[:, :-1], tokens[:, 1:])
        return [lp.detach().clone(), scored] + [p.grad.clone() for p in params]

    def sample(prompts, adapter, temperature=1.0):
        adapters = adapter if isinstance(adapter, list) else [adapter] * len(prompts)
        specs = [SampleSpec(prompt=p, max_tokens=6, temperature=temperature, seed=7, adapter=a)
                 for p, a in zip(prompts, adapters)]
        return [(r.sequences[0].tokens, r.sequences[0].logprobs) for r in generate(model, specs, route=lora.route)]

    prompts = [torch.randint(4, 1000, (9,), generator=g).tolist() for _ in range(9)]
    train_before = train_numbers()
    unpacked = sample(prompts[:3], "snap") + sample(prompts[:3], None, temperature=0.0)

    calls = {"n": 0, "rowwise": 0}
    linear, rowwise = packed_weights.linear, packed_weights.rowwise

    def counted(x, packed):
        calls["n"] += 1
        return linear(x, packed)

    def counted_rowwise(x, weight_t):
        calls["rowwise"] += 1
        return rowwise(x, weight_t)

    packed_weights.linear, packed_weights.rowwise = counted, counted_rowwise
    packed_weights.pack_frozen_weights(lora, 1 << 40)
    result = {"wrapped_modules": len(lora.modules),
              "packed_modules": sum(m.packed is not None for m in lora.modules.values())}
    train_after = train_numbers()
    result["train_bitwise_equal"] = all(torch.equal(a, b) for a, b in zip(train_before, train_after))
    result["packed_calls_in_training"] = calls["n"]
    result["rowwise_calls_in_training"] = calls["rowwise"]
    packed = sample(prompts[:3], "snap") + sample(prompts[:3], None, temperature=0.0)
    result["packed_calls_in_sampling"] = calls["n"]
    result["rowwise_calls_in_sampling"] = calls["rowwise"]
    sample(prompts[:1], "a")
    with torch.inference_mode():  # as a snapshot read from disk for a request joining a running batch
        lora.clone_adapter("snap", "read_mid_batch")
    result["inference_made_snapshot_same"] = sample(prompts[:3], "read_mid_batch") == sample(prompts[:3], "snap")
    some_layer = next(iter(lora.modules.values()))
    result["factors_packed"] = {name: some_layer.adapters[name]._packed is not None for name in ("a", "snap")}
    result["tokens_equal"] = [t for t, _ in packed] == [t for t, _ in unpacked]
    result["max_logprob_diff"] = max(abs(x - y) for (_, a), (_, b) in zip(packed, unpacked) for x, y in zip(a, b))
    result["rows_invariant_packed"] = {}
    for adapter in (None, "snap"):
        alone = sample(prompts[:1], adapter)[0]
        mixed = [adapter] + [None, "a", "snap"] * 3  # rows of other adapters: the routed products
        result["rows_invariant_packed"][str(adapter)] = [
            sample(prompts[:2], adapter)[0] == alone, sample(prompts[:9], adapter)[0] == alone,
            sample(prompts[:9], mixed[:9])[0] == alone]

    # merged weights of frozen adapters (packed_weights.MergedCopies); until now the budget was 0
    merges = lora.merged_copies
    assert merges is not None and merges.used == 0
    merged_calls = {"n": 0}
    get = merges.get

    def counted_get(factors, weight):
        merged_calls["n"] += 1
        return get(factors, weight)

    merges.get = counted_get
    merges.budget_bytes = 1 << 40
    merged = sample(prompts[:3], "snap") + sample(prompts[:3], None, temperature=0.0)
    result["merged_calls"] = merged_calls["n"]
    result["merged_bytes"] = merges.used
    result["merged_tokens_equal"] = [t for t, _ in merged] == [t for t, _ in packed]
    result["merged_max_logprob_diff"] = max(abs(x - y) for (_, a), (_, b) in zip(merged, packed) for x, y in zip(a, b))
    alone = sample(prompts[:1], "snap")[0]
    mixed = ["snap"] + [None, "a", "snap"] * 3  # beside base rows, a trainable adapter's and its own
    result["rows_invariant_merged"] = [sample(prompts[:2], "snap")[0] == alone, sample(prompts[:9], "snap")[0] == alone,
                                       sample(prompts[:9], mixed[:9])[0] == alone]
    result["train_bitwise_equal_after_merging"] = all(torch.equal(a, b) for a, b in zip(train_before, train_numbers()))
    # a budget of one layer's copy: every layer's copy pushes out the one before, and is made again
    largest = max(m.packed[0].numel() * m.packed[0].element_size() for m in lora.modules.values() if m.packed is not None)
    merges.budget_bytes = largest
    result["evicted_same"] = sample(prompts[:3], "snap") == merged[:3]
    result["evicted_bytes_within"] = 0 < merges.used <= largest
    merges.budget_bytes = largest - 1  # the largest layer no longer merges, and samples as before it did
    result["unmergeable_same_tokens"] = [t for t, _ in sample(prompts[:3], "snap")] == [t for t, _ in merged[:3]]
    merges.budget_bytes = 1 << 40
    sample(prompts[:3], "snap")
    lora.remove_adapter("snap")
    lora.remove_adapter("read_mid_batch")
    import gc

    gc.collect()
    result["merged_bytes_after_removal"] = merges.used

    for module in lora.modules.values():
        module.packed = None
    budget = result["budget"] = 3 * 64 * 64 * 4  # a few of the 64-wide layers' weights
    result["budget_used"] = packed_weights.pack_frozen_weights(lora, budget)
    result["budget_packed_modules"] = sum(m.packed is not None for m in lora.modules.values())
    Path(out_path).write_text(json.dumps(result))


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
