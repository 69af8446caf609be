"""Sequence packing (backends/miles/packing.py): the plan, the packed tensors, and packed
against unpacked numerics on megatron-core with a LoRA adapter, at TP=1 and TP=2.

The planning tests run in the pytest process. Model work runs in fresh worker processes (this
file doubles as the worker script; megatron-core's parallel state is process-global): each
runs one batch of mixed-length datums both unpacked (one padded row per datum, plain causal
mask, as forward_backward does without packing) and packed, and saves per-datum log-probs,
the cross-entropy loss and the LoRA gradients for the pytest functions to compare. Packed
datums sit at non-zero offsets in their rows, so the comparison also checks that RoPE by
row index gives the same scores as positions from 0.
"""
from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
import torch

from backends.miles.packing import MicroBatch, Segment, in_batch_order, pack
from tests.mcore_harness import init_worker, make_hf_checkpoint, run_workers

RANK, ALPHA, VOCAB, TOP_K = 4, 8.0, 1000, 3
LENGTHS = [5, 40, 12, 33, 7, 20, 26, 9]
BUDGET = 80  # two 40-token rows per micro-batch: the packed run takes several micro-batches


# ---------------------------------------------------------------------------------------
# planning
# ---------------------------------------------------------------------------------------
def _check_plan(lengths: list[int], budget: int, plan: list[MicroBatch], capacity: int) -> None:
    seen = sorted(d for mb in plan for d in mb.datums)
    assert seen == list(range(len(lengths))), "every datum exactly once"
    for mb in plan:
        assert mb.datums == sorted(mb.datums)
        assert mb.width <= max(capacity, 1)
        assert mb.rows == 1 or mb.rows * mb.width <= budget
        used: dict[int, list[tuple[int, int]]] = {}
        for s in mb.segments:
            assert s.length == lengths[s.datum]
            assert 0 <= s.start and s.start + s.length <= mb.width and 0 <= s.row < mb.rows
            used.setdefault(s.row, []).append((s.start, s.start + s.length))
        assert sorted(used) == list(range(mb.rows)), "no empty rows"
        for spans in used.values():
            spans.sort()
            assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:])), "no overlap"


def test_plan_places_every_datum_once_within_capacity_and_budget():
    rng = random.Random(0)
    for _ in range(200):
        lengths = [rng.randint(1, 64) for _ in range(rng.randint(1, 30))]
        budget = rng.choice([1, 16, 64, 100, 256, 10_000])
        plan = pack(lengths, budget)
        _check_plan(lengths, budget, plan, max(lengths))
        assert plan == pack(lengths, budget), "deterministic"
        rows = sum(mb.rows for mb in plan)
        assert rows <= len(lengths)
        assert rows * max(lengths) >= sum(lengths)


def test_first_fit_decreasing_rows():
    plan = pack([5, 40, 10, 30, 5], token_budget=1000)
    assert len(plan) == 1
    (mb,) = plan
    assert (mb.rows, mb.width) == (3, 40)
    rows = {}
    for s in mb.segments:
        rows.setdefault(s.row, []).append((s.datum, s.start))
    # Longest first; equal lengths in index order; rows sorted by fill.
    assert rows == {0: [(1, 0)], 1: [(2, 30), (3, 0)], 2: [(0, 0), (4, 5)]}


def test_micro_batches_under_budget_and_long_datum_alone():
    plan = pack([30, 100, 20, 10], token_budget=60)
    assert [(mb.datums, mb.rows, mb.width) for mb in plan] == [([1], 1, 100), ([0, 2, 3], 1, 60)]
    # The long datum sets the capacity; at budget 60 the 100-token row goes alone.
    plan = pack([30, 25, 20, 10, 8], token_budget=64)  # capacity 30: rows 30 | 20+10 | 25 | 8
    assert [(mb.datums, mb.rows, mb.width) for mb in plan] == [([0, 2, 3], 2, 30), ([1, 4], 2, 25)]
    assert all(mb.rows * mb.width <= 64 for mb in plan)


def test_capacity_option_and_errors():
    assert pack([], 100) == []
    plan = pack([10, 10, 10, 10], token_budget=1000, capacity=40)
    assert [(mb.rows, mb.width) for mb in plan] == [(1, 40)]
    with pytest.raises(ValueError):
        pack([10, 50], token_budget=1000, capacity=40)
    plan = pack([0, 3], token_budget=10)
    assert [mb.datums for mb in plan] == [[0, 1]] and plan[0].width == 3


def test_inputs_mask_and_unpack():
    lengths = [3, 6, 2, 4]
    plan = pack(lengths, token_budget=12)  # capacity 6: rows 6 | 4+2 | 3
    tokens = [torch.arange(n) + 100 * (i + 1) for i, n in enumerate(lengths)]
    top_k = [torch.stack([t, t + 1], dim=1) for t in tokens]  # [len, 2] targets
    unpacked, unpacked_k = [], []
    for mb in plan:
        tok, tgt, mask = mb.inputs([tokens[d] for d in mb.datums], [top_k[d] for d in mb.datums], "cpu")
        assert tok.shape == (mb.rows, mb.width) and tgt.shape == (mb.rows, mb.width, 2)
        assert mask.shape == (mb.rows, 1, mb.width, mb.width) and mask.dtype == torch.bool
        owner = torch.full((mb.rows, mb.width), -1)
        for s in mb.segments:
            owner[s.row, s.start:s.start + s.length] = s.datum
        for r in range(mb.rows):
            for q in range(mb.width):
                for k in range(mb.width):
                    same = owner[r, q] >= 0 and owner[r, q] == owner[r, k] and k <= q
                    assert mask[r, 0, q, k].item() == (not (same or q == k)), (r, q, k)
        assert not mask.all(-1).any(), "no fully masked query"
        unpacked.append(mb.unpack(tok))
        unpacked_k.append(mb.unpack(tgt))
    assert all(torch.equal(a, b) for a, b in zip(in_batch_order(plan, unpacked), tokens, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(in_batch_order(plan, unpacked_k), top_k, strict=True))
    with pytest.raises(ValueError):
        plan[0].inputs([torch.zeros(1, dtype=torch.long)] * len(plan[0].datums), [torch.zeros(1)] * len(plan[0].datums), "cpu")


def test_example_batch_packs_rows():
    plan = pack(LENGTHS, BUDGET)
    assert len(plan) > 1 and sum(mb.rows for mb in plan) < len(LENGTHS)
    assert any(s.start > 0 for mb in plan for s in mb.segments), "some datum sits at an offset"
    assert isinstance(plan[0].segments[0], Segment)


# ---------------------------------------------------------------------------------------
# worker side
# ---------------------------------------------------------------------------------------
def _worker(out_path: str, model_dir: str, inputs_path: str) -> None:
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    device = init_worker()
    from backends.common.losses import compute_loss
    from backends.miles.lora import LoraManager
    from backends.miles.model import build_model, token_logprobs
    from backends.miles.parallel import tp_rank

    model = build_model(model_dir, device)
    manager = LoraManager(model)
    data = torch.load(inputs_path)
    tokens, targets, top_k, weights = data["tokens"], data["targets"], data["top_k_targets"], data["weights"]
    _load_random_adapter(manager, "lora", seed=1)
    params = manager.adapter_params("lora")
    loss_inputs = [{"target_tokens": t, "weights": w} for t, w in zip(targets, weights)]

    def grads():
        full = manager.gather_full_state({key: param.grad for key, param, _ in params})
        for _, param, _ in params:
            param.grad = None
        return full

    def padded(rows: list[torch.Tensor], *extra: int) -> torch.Tensor:
        out = torch.zeros(len(rows), max(len(r) for r in rows), *extra, dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, :len(r)] = r
        return out

    # Unpacked, as forward_backward runs without packing: one padded row per datum, plain causal mask.
    lengths = [len(t) for t in tokens]
    with manager.route(["lora"] * len(tokens)):
        lp = token_logprobs(model, padded(tokens), padded(targets))
        unpacked = [lp[i, :n] for i, n in enumerate(lengths)]
        loss, _, _ = compute_loss("cross_entropy", unpacked, loss_inputs, {})
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as backward:
            loss.backward()
        with torch.no_grad():
            unpacked_top_k = token_logprobs(model, padded(tokens), padded(top_k, TOP_K))
    results = {"unpacked": {
        "logprobs": [x.detach() for x in unpacked], "loss": loss.item(), "grads": grads(),
        "top_k": [unpacked_top_k[i, :n] for i, n in enumerate(lengths)],
        "batched_products": [e.input_shapes for e in backward.events() if e.name == "aten::bmm"],
    }}
    with torch.no_grad(), manager.route([None] * len(tokens)):
        base = token_logprobs(model, padded(tokens), padded(targets))
    results["base_logprobs"] = [base[i, :n] for i, n in enumerate(lengths)]

    # Packed: several micro-batches, gradients accumulated over them.
    plan = pack(lengths, BUDGET)
    packed, packed_top_k, plain_causal, total = [], [], [], 0.0
    for mb in plan:
        picked = mb.datums
        tok, tgt, mask = mb.inputs([tokens[d] for d in picked], [targets[d] for d in picked], device)
        with manager.route(["lora"] * mb.rows):
            lps = mb.unpack(token_logprobs(model, tok, tgt, mask))
            loss, _, _ = compute_loss("cross_entropy", lps, [loss_inputs[d] for d in picked], {})
            loss.backward()
            _, tgt_k, _ = mb.inputs([tokens[d] for d in picked], [top_k[d] for d in picked], device)
            with torch.no_grad():
                packed_top_k.append(mb.unpack(token_logprobs(model, tok, tgt_k, mask)))
                plain_causal.append(mb.unpack(token_logprobs(model, tok, tgt)))  # datums see their row neighbours
        packed.append([x.detach() for x in lps])
        total += loss.item()
    results["packed"] = {
        "logprobs": in_batch_order(plan, packed), "loss": total, "grads": grads(),
        "top_k": in_batch_order(plan, packed_top_k), "plain_causal": in_batch_order(plan, plain_causal),
    }
    if tp_rank() == 0:
        torch.save(results, out_path)
    dist.destroy_process_group()


def _load_random_adapter(manager, name: str, seed: int) -> None:
    """Adapter `name` with factors drawn in full layout from `seed` (B clearly non-zero), so it
    is the same adapter at every TP degree."""
    manager.add_adapter("shapes", RANK, ALPHA, train_unembed=True)
    shapes = {key: value.shape for key, value in manager.gather_full_state(manager.adapter_state("shapes")).items()}
    manager.remove_adapter("shapes")
    generator = torch.Generator().manual_seed(seed)
    full = {}
    for key in sorted(shapes):
        shape = shapes[key]
        scale = 1 / shape[1] ** 0.5 if key.endswith("lora_A") else 0.1
        full[key] = scale * torch.randn(shape, generator=generator)
    manager.load_adapter_state(name, manager.shard_full_state(full), rank=RANK, alpha=ALPHA)


# ---------------------------------------------------------------------------------------
# numerics tests
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def packing_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("packing")
    model_dir = make_hf_checkpoint(root / "qwen3", "qwen3", vocab_size=VOCAB, tie_word_embeddings=True, seed=4)
    generator = torch.Generator().manual_seed(0)
    total = sum(LENGTHS)
    data = {
        "tokens": [torch.randint(0, VOCAB, (n,), generator=generator) for n in LENGTHS],
        "targets": [torch.randint(0, VOCAB, (n,), generator=generator) for n in LENGTHS],
        "top_k_targets": [torch.randint(0, VOCAB, (n, TOP_K), generator=generator) for n in LENGTHS],
        "weights": [torch.rand(n, generator=generator) / total for n in LENGTHS],
    }
    torch.save(data, root / "inputs.pt")
    results = {}
    for tp in (1, 2):
        run_workers(Path(__file__), tp, str(root / f"tp{tp}.pt"), str(model_dir), str(root / "inputs.pt"))
        results[tp] = torch.load(root / f"tp{tp}.pt")
    return results


def _per_datum_diff(a: list, b: list) -> float:
    assert [x.shape for x in a] == [y.shape for y in b]
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def _grad_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max((a[key] - b[key]).abs().max().item() for key in a)


def test_packed_matches_unpacked(packing_run):
    tp1 = packing_run[1]
    unpacked, packed = tp1["unpacked"], tp1["packed"]
    assert [x.shape for x in unpacked["logprobs"]] == [(n,) for n in LENGTHS]
    assert _per_datum_diff(unpacked["logprobs"], tp1["base_logprobs"]) > 0.1, "the adapter should matter"
    assert _per_datum_diff(packed["logprobs"], unpacked["logprobs"]) <= 1e-5
    assert _per_datum_diff(packed["plain_causal"], unpacked["logprobs"]) > 0.1, "the block mask should matter"
    assert [x.shape for x in packed["top_k"]] == [(n, TOP_K) for n in LENGTHS]
    assert _per_datum_diff(packed["top_k"], unpacked["top_k"]) <= 1e-5
    assert abs(packed["loss"] - unpacked["loss"]) <= 1e-5
    assert all(g.abs().max() > 1e-4 for g in unpacked["grads"].values()), "every factor gets a gradient"
    assert _grad_diff(packed["grads"], unpacked["grads"]) <= 1e-5


def test_output_layer_backward_is_one_matrix_product(packing_run):
    # The logits' gradient reaches the frozen output layer transposed; unless it is made
    # contiguous, torch.matmul expands the weight over the sequence ([s, vocab, hidden]) and runs
    # a batched product: most of a training step on a large-vocabulary model.
    for tp, run in packing_run.items():
        over_vocab = [shapes for shapes in run["unpacked"]["batched_products"]
                      if any(VOCAB // tp in shape for shape in shapes)]
        assert not over_vocab, f"TP={tp}: batched products over the vocabulary in backward: {over_vocab}"


def test_tp2_packed_matches_tp1_unpacked(packing_run):
    tp1, tp2 = packing_run[1]["unpacked"], packing_run[2]["packed"]
    assert _per_datum_diff(tp2["logprobs"], tp1["logprobs"]) <= 1e-5
    assert _per_datum_diff(tp2["top_k"], tp1["top_k"]) <= 1e-5
    assert abs(tp2["loss"] - tp1["loss"]) <= 1e-5
    assert _grad_diff(tp2["grads"], tp1["grads"]) <= 1e-5


if __name__ == "__main__":
    _worker(*sys.argv[1:])


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_packed_attention_mask_is_converted_once_with_sdpas_own_numbers(dtype_name):
    """The block-diagonal bool mask becomes SDPA's additive float mask once per mask tensor
    (shared by every layer of a forward pass): attention and its gradients are bit for bit those
    of SDPA's own bool-mask path; a new mask, or inference mode, gets a new conversion."""
    import torch
    import torch.nn.functional as F

    from backends.miles.attention import additive_mask

    dtype = getattr(torch, dtype_name)
    generator = torch.Generator().manual_seed(0)
    masked = torch.ones(12, 12, dtype=torch.bool).triu(1)
    masked[6:, :6] = True  # two packed sequences of 6
    mask = masked[None, None].expand(2, 1, 12, 12)
    q, k, v = (torch.randn(2, 4, 12, 8, generator=generator).to(dtype).requires_grad_() for _ in range(3))
    ours = F.scaled_dot_product_attention(q, k, v, attn_mask=additive_mask(mask, dtype))
    grads_ours = torch.autograd.grad(ours.sum(), (q, k, v))
    theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=~mask)
    grads_theirs = torch.autograd.grad(theirs.sum(), (q, k, v))
    assert torch.equal(ours, theirs) and all(torch.equal(a, b) for a, b in zip(grads_ours, grads_theirs))
    assert additive_mask(mask, dtype) is additive_mask(mask, dtype)
    assert additive_mask(mask.clone(), dtype) is not additive_mask(mask, dtype)
    with torch.inference_mode():
        inferred = additive_mask(mask, dtype)
    assert inferred.is_inference() and not additive_mask(mask, dtype).is_inference()
