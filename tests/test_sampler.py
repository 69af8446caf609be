"""KV-cache sampler (backends/miles/sampler.py) against full-forward recompute of a tiny GPTModel.

megatron-core's parallel state is process-global, so the model work runs in fresh
subprocesses (this file doubles as the worker script): one TP=1 process runs every
single-process scenario and saves its weights; then two gloo processes run the same specs
at TP=2 on slices of exactly those weights. The pytest functions only compare the JSON the
workers write.
"""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 1000
MAX_LEN = 64


# ---------------------------------------------------------------------------------------
# worker side
# ---------------------------------------------------------------------------------------
def _build_model(share_embeddings: bool = False):
    import torch
    import torch.nn.functional as F
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg = TransformerConfig(
        num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, kv_channels=16,
        ffn_hidden_size=192, normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu,
        add_bias_linear=False, qk_layernorm=True, hidden_dropout=0.0, attention_dropout=0.0,
        use_cpu_initialization=True, params_dtype=torch.float32, layernorm_epsilon=1e-6,
        bias_activation_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False,
        gradient_accumulation_fusion=False, apply_rope_fusion=False,
    )
    spec = get_gpt_layer_local_spec(qk_layernorm=True, normalization="RMSNorm")
    return GPTModel(
        cfg, spec, vocab_size=VOCAB, max_sequence_length=MAX_LEN, position_embedding_type="rope",
        rotary_base=1e6, share_embeddings_and_output_weights=share_embeddings,
    )


def _randomise(model, seed: int) -> None:
    """Perturb the (near-uniform) default init so the model has peaked, seed-fixed outputs."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.add_(torch.randn(p.shape, generator=g) * 0.5)


def _full_logprobs(model, tokens):
    """Full-forward log-softmax [len(tokens), VOCAB] (gathered across TP)."""
    import torch
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

    s = len(tokens)
    with torch.inference_mode():
        logits = model(
            torch.tensor([tokens]), torch.arange(s)[None], torch.triu(torch.ones(s, s, dtype=torch.bool), 1)[None, None]
        )
        logits = gather_from_tensor_model_parallel_region(logits)[0].float()
    return torch.log_softmax(logits, dim=-1)


def _plain(x):
    """numpy arrays / tuples of them -> JSON-able lists (None stays None)."""
    import numpy as np

    if x is None:
        return None
    if isinstance(x, tuple):
        return [_plain(a) for a in x]
    return np.asarray(x).tolist()


def _result_json(res):
    return [
        {
            "seqs": [{"tokens": s.tokens, "logprobs": s.logprobs, "stop": s.stop_reason, "topk": _plain(s.topk_logprobs)}
                     for s in r.sequences],
            "prompt_logprobs": r.prompt_logprobs,
            "topk_prompt": _plain(r.topk_prompt_logprobs),
            "targets": _plain(r.target_prompt_logprobs),
            "alt": _plain(r.prompt_alt_tokens),
            "hit": r.prompt_cache_hit_tokens,
        }
        for r in res
    ]


PROMPTS = [[5, 17, 300, 42, 7], [901, 3], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21], [640]]


def _mixed_specs():
    """Specs with different lengths and parameters, used for batching and TP checks."""
    from backends.miles.sampler import SampleSpec

    return [
        SampleSpec(PROMPTS[0], num_samples=2, max_tokens=9, temperature=1.0, seed=11, prompt_logprobs=True,
                   topk_prompt_logprobs=3, topk_sample_logprobs=2),
        SampleSpec(PROMPTS[1], num_samples=3, max_tokens=5, temperature=0.7, top_k=20, seed=12, topk_sample_logprobs=4),
        SampleSpec(PROMPTS[2], num_samples=1, max_tokens=12, temperature=0.0, prompt_logprobs=True,
                   prompt_logprobs_last_n=4, target_prompt_ids=([2, 9, 9], [5, 6, 999]), prompt_alt_tokens_k=2),
        SampleSpec(PROMPTS[3], num_samples=2, max_tokens=7, temperature=1.3, top_p=0.8, seed=13, prompt_alt_tokens_k=3),
        SampleSpec(PROMPTS[0], num_samples=1, max_tokens=4, temperature=0.9, seed=14, prompt_alt_tokens_k=2),
    ]


def _scenario_tp1(out_dir: Path) -> dict:
    import time

    import torch

    from backends.miles.sampler import SampleSpec, generate

    model = _build_model()
    _randomise(model, 1234)
    torch.save(model.state_dict(), out_dir / "weights.pt")
    out: dict = {}

    # (1) greedy == step-by-step argmax of full-forward recompute (+ model logprobs)
    prompt = PROMPTS[0]
    r = generate(model, [SampleSpec(prompt, max_tokens=12, temperature=0.0)])[0].sequences[0]
    seq, ref_tok, ref_lp = list(prompt), [], []
    for _ in range(12):
        lp = _full_logprobs(model, seq)[-1]
        t = int(lp.argmax())
        ref_tok.append(t)
        ref_lp.append(float(lp[t]))
        seq.append(t)
    out["greedy"] = {"got": r.tokens, "got_lp": r.logprobs, "ref": ref_tok, "ref_lp": ref_lp, "stop": r.stop_reason}

    # (2) temperature 1: logprobs and prompt logprobs == full forward's log-softmax
    res = generate(model, [SampleSpec(prompt, max_tokens=15, temperature=1.0, seed=5, prompt_logprobs=True)])[0]
    toks = res.sequences[0].tokens
    full = prompt + toks
    lp = _full_logprobs(model, full)
    ref = [float(lp[i - 1, full[i]]) for i in range(1, len(full))]
    out["t1"] = {
        "tokens": toks,
        "got_lp": res.sequences[0].logprobs,
        "ref_lp": ref[len(prompt) - 1 :],
        "got_plp": res.prompt_logprobs,
        "ref_plp": ref[: len(prompt) - 1],
    }

    # (3) batched == each alone; (7) baseline for TP=2
    specs = _mixed_specs()
    together = generate(model, specs)
    alone = [generate(model, [s])[0] for s in specs]
    small = generate(model, specs, max_batch_rows=3)  # rows of one spec split across chunks
    out["batch"] = {"together": _result_json(together), "alone": _result_json(alone), "small": _result_json(small)}

    # (3b) continuous batching: specs that arrive between decode steps (some with prompts longer
    # than the running batch's columns, some finding no room at 3 rows) give what they give alone
    for max_rows in (64, 3):
        arrivals = {1: [specs[2]], 2: [specs[1], specs[3]], 6: [specs[4]]}  # poll call -> new specs
        calls = []

        def poll():
            calls.append(len(calls))
            return arrivals.get(len(calls) - 1, [])

        joined = generate(model, [specs[0]], poll=poll, max_batch_rows=max_rows)
        order = [0, 2, 1, 3, 4]  # the results follow the arrival order
        out.setdefault("joined", []).append(
            {"got": _result_json(joined), "alone": _result_json([alone[i] for i in order]), "polls": len(calls)})

    # (4) seeds
    seeded = [SampleSpec(PROMPTS[1], max_tokens=20, temperature=1.0, seed=s) for s in (7, 7, 8)]
    out["seeds"] = [r.sequences[0].tokens for r in generate(model, seeded)]
    multi = generate(model, [SampleSpec(PROMPTS[1], num_samples=4, max_tokens=20, seed=7)])[0]
    out["seeds_multi"] = [s.tokens for s in multi.sequences]

    # (5) stops
    decode = lambda ts: " ".join(map(str, ts))  # noqa: E731
    g = generate(model, [SampleSpec(PROMPTS[2], max_tokens=20, temperature=0.0)])[0].sequences[0]
    stop_tok = g.tokens[4]
    stop_str = " ".join(map(str, g.tokens[2:4]))
    res = generate(
        model,
        [
            SampleSpec(PROMPTS[2], max_tokens=20, temperature=0.0, stop_token_ids=(stop_tok, VOCAB + 5)),
            SampleSpec(PROMPTS[2], max_tokens=20, temperature=0.0, stop_strings=(stop_str, "no such thing")),
            SampleSpec(PROMPTS[2], max_tokens=20, temperature=0.0),
            SampleSpec(PROMPTS[2], max_tokens=3, temperature=0.0, stop_token_ids=(stop_tok,)),
        ],
        decode=decode,
    )
    out["stops"] = {
        "greedy": g.tokens,
        "greedy_stop": g.stop_reason,
        "stop_tok": stop_tok,
        "stop_str": stop_str,
        "results": _result_json(res),
    }

    # (6) top_k=1 == greedy, whatever the temperature and seed
    res = generate(
        model,
        [SampleSpec(PROMPTS[2], max_tokens=20, temperature=t, top_k=1, seed=s) for t, s in ((1.0, 1), (2.0, 2))]
        + [SampleSpec(PROMPTS[2], max_tokens=20, temperature=1.0, top_p=1e-6, seed=3)],
    )
    out["topk1"] = [r.sequences[0].tokens for r in res] + [[x for x in r.sequences[0].logprobs] for r in res]

    # context limit: never past max_sequence_length
    long_prompt = list(range(1, MAX_LEN - 3))
    r = generate(model, [SampleSpec(long_prompt, max_tokens=10, temperature=0.0)])[0].sequences[0]
    out["ctx"] = {"n": len(r.tokens), "stop": r.stop_reason}
    r = generate(model, [SampleSpec([1, 2], max_tokens=0)])[0].sequences[0]
    out["zero"] = {"n": len(r.tokens), "stop": r.stop_reason}

    # route: called with one adapter name per batch row
    calls = []

    def route(rows):
        import contextlib

        calls.append(list(rows))
        return contextlib.nullcontext()

    generate(
        model,
        [SampleSpec([1, 2, 3], num_samples=2, max_tokens=3, adapter="a"), SampleSpec([4], max_tokens=2, adapter="b")],
        route=route,
    )
    out["route"] = calls

    # shared input/output embeddings
    shared = _build_model(share_embeddings=True)
    _randomise(shared, 99)
    r = generate(shared, [SampleSpec(prompt, max_tokens=8, temperature=0.0)])[0].sequences[0]
    seq, ref_tok = list(prompt), []
    for _ in range(8):
        t = int(_full_logprobs(shared, seq)[-1].argmax())
        ref_tok.append(t)
        seq.append(t)
    out["shared"] = {"got": r.tokens, "ref": ref_tok}

    out["scores"] = _prompt_score_checks(model)
    out["sample_topk"] = _sample_topk_checks(model)
    out["cache"] = _prefix_cache_checks(model)

    # baseline for the TP=2 weight check
    full = PROMPTS[0] + [1, 2, 3, 4]
    lp = _full_logprobs(model, full)
    out["tp1_full_lp"] = [float(lp[i - 1, full[i]]) for i in range(1, len(full))]

    # timing: 8 rows x 32 new tokens
    bench = [SampleSpec([3, 1, 4, 1, 5, 9, 2, 6], max_tokens=32, seed=i) for i in range(8)]
    generate(model, bench[:1])
    t0 = time.perf_counter()
    generate(model, bench)
    out["tok_per_s"] = 8 * 32 / (time.perf_counter() - t0)
    return out


def _prompt_score_checks(model) -> dict:
    """Prompt logprobs / top-k / target ids / alternative draws, and the full-forward reference."""
    import torch

    from backends.miles.sampler import SampleSpec, generate

    prompt = PROMPTS[2]
    P = len(prompt)
    targets = ([0, 3, 3, 9], [7, 42, 999, 0])
    full = dict(prompt_logprobs=True, topk_prompt_logprobs=5, target_prompt_ids=targets, prompt_alt_tokens_k=4)
    specs = [
        SampleSpec(prompt, max_tokens=2, temperature=1.0, seed=3, **full),
        SampleSpec(prompt, max_tokens=2, temperature=1.0, seed=3, prompt_alt_tokens_k=4),  # same seed: same draws
        SampleSpec(prompt, max_tokens=2, temperature=1.0, seed=4, prompt_alt_tokens_k=4),
        SampleSpec(prompt, max_tokens=2, temperature=0.5, seed=5, prompt_alt_tokens_k=3),
        SampleSpec(prompt, max_tokens=2, temperature=0.0, prompt_alt_tokens_k=2),
        SampleSpec(prompt, max_tokens=2, prompt_logprobs=True, topk_prompt_logprobs=3, prompt_logprobs_last_n=3),
        SampleSpec([77], max_tokens=2, prompt_logprobs=True, topk_prompt_logprobs=2, prompt_alt_tokens_k=2),
    ]
    lp = _full_logprobs(model, prompt)  # row p: distribution of position p + 1
    top_v, top_i = torch.topk(lp[: P - 1], 5, dim=-1)
    return {
        "P": P,
        "targets": [list(t) for t in targets],
        "results": _result_json(generate(model, specs)),
        "ref_plp": [float("nan")] + [float(lp[p - 1, prompt[p]]) for p in range(1, P)],
        "ref_top_ids": top_i.tolist(),
        "ref_top_lps": top_v.tolist(),
        "ref_lp": lp[: P - 1].tolist(),  # [P-1, V]: enough to score any draw at any temperature
        "argmax": lp[: P - 1].argmax(-1).tolist(),
    }


def _sample_topk_checks(model) -> dict:
    """Top-k tables of sampled tokens, with the full-forward reference of each sequence."""
    from backends.miles.sampler import SampleSpec, generate

    prompt = PROMPTS[0]
    specs = [
        SampleSpec(prompt, max_tokens=6, temperature=1.0, seed=21, topk_sample_logprobs=5),
        SampleSpec(prompt, max_tokens=6, temperature=0.8, top_k=2, seed=22, topk_sample_logprobs=4),
        SampleSpec(prompt, max_tokens=6, temperature=0.0, topk_sample_logprobs=3),
    ]
    res = generate(model, specs)
    refs = []
    for r in res:
        toks = r.sequences[0].tokens
        lp = _full_logprobs(model, prompt + toks)[len(prompt) - 1 : len(prompt) - 1 + len(toks)]
        refs.append(lp.tolist())
    return {"results": _result_json(res), "ref_lp": refs}


def _prefix_cache_checks(model) -> dict:
    """The same requests with and without a prefix cache, multi-turn, adapters, budget."""
    from backends.miles.prefix_cache import PrefixCache
    from backends.miles.sampler import SampleSpec, generate

    prompt = PROMPTS[2]
    cache = PrefixCache()

    def both(specs):
        return _result_json(generate(model, specs)), _result_json(generate(model, specs, prefix_cache=cache))

    out = {"P": len(prompt)}
    turn1 = [SampleSpec(prompt, num_samples=2, max_tokens=8, temperature=1.0, seed=31)]
    out["cold"] = both(turn1)
    out["warm"] = both(turn1)
    answer = out["warm"][1][0]["seqs"][1]["tokens"]
    prompt2 = prompt + answer + [5, 6]
    out["turn2_len"] = len(prompt2)
    out["answer_len"] = len(answer)
    # a second turn, batched with a new prompt, one asking for its last 3 prompt logprobs, one greedy
    out["turn2"] = both([
        SampleSpec(prompt2, max_tokens=6, temperature=1.0, seed=32, topk_sample_logprobs=2),
        SampleSpec(prompt2, max_tokens=3, temperature=0.0, prompt_logprobs=True, prompt_logprobs_last_n=3,
                   topk_prompt_logprobs=2),
        SampleSpec([900, 901, 902], max_tokens=5, temperature=1.0, seed=33),
    ])
    out["other_adapter"] = both([SampleSpec(prompt, max_tokens=4, temperature=0.0, adapter="other")])
    out["full_prompt_logprobs"] = both([SampleSpec(prompt2, max_tokens=2, temperature=0.0, prompt_logprobs=True)])
    small = PrefixCache(max_tokens=24)
    sizes = []
    for i in range(6):
        generate(model, [SampleSpec([100 + i] * 9, max_tokens=4, temperature=0.0)], prefix_cache=small)
        sizes.append(small.tokens)
    out["budget"] = {"sizes": sizes, "entries": len(small)}
    return out


def _load_tp_slices(model, full_sd: dict, rank: int, tp: int) -> None:
    """Copy this rank's slices of a TP=1 state dict into a TP=`tp` model."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            src = full_sd[name]
            if src.shape == p.shape:
                p.copy_(src)
                continue
            dim = next(d for d in range(p.dim()) if p.shape[d] != src.shape[d])
            if name.endswith("mlp.linear_fc1.weight"):  # [gate; up], each split across ranks
                parts = [c.chunk(tp, dim=0)[rank] for c in src.chunk(2, dim=0)]
                p.copy_(torch.cat(parts, dim=0))
            else:
                p.copy_(src.chunk(tp, dim=dim)[rank])


def _scenario_tp2(out_dir: Path) -> dict:
    import torch

    from backends.miles.parallel import tp_rank
    from backends.miles.sampler import generate

    model = _build_model()
    _load_tp_slices(model, torch.load(out_dir / "weights.pt"), tp_rank(), 2)
    full = PROMPTS[0] + [1, 2, 3, 4]
    lp = _full_logprobs(model, full)
    return {
        "full_lp": [float(lp[i - 1, full[i]]) for i in range(1, len(full))],
        "batch": _result_json(generate(model, _mixed_specs())),
    }


def _worker(scenario: str, out_dir: str) -> None:
    sys.path.insert(0, str(ROOT))
    import warnings

    warnings.filterwarnings("ignore")
    from backends.miles.parallel import ParallelDims, init_distributed

    out = Path(out_dir)
    init_distributed(ParallelDims(tp=int(os.environ["WORLD_SIZE"])), seed=1)
    result = _scenario_tp1(out) if scenario == "tp1" else _scenario_tp2(out)
    rank = int(os.environ["RANK"])
    (out / f"{scenario}.rank{rank}.json").write_text(json.dumps(result))
    import torch.distributed as dist

    dist.destroy_process_group()  # exiting with live gloo threads can abort the process


# ---------------------------------------------------------------------------------------
# pytest side
# ---------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(scenario: str, world: int, out_dir: Path, timeout: float = 120) -> list[dict]:
    port = _free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1" if world > 1 else "2",
                   PYTHONPATH=str(ROOT))
        procs.append(subprocess.Popen([sys.executable, __file__, scenario, str(out_dir)], env=env, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    for p in procs:
        try:
            outputs.append(p.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for p, text in zip(procs, outputs):
        assert p.returncode == 0, f"{scenario} worker failed:\n{text[-4000:]}"
    return [json.loads((out_dir / f"{scenario}.rank{r}.json").read_text()) for r in range(world)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("sampler")
    tp1 = _launch("tp1", 1, out_dir)[0]
    return {"dir": out_dir, "tp1": tp1}


def _close(a, b, tol):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        if isinstance(x, float) and math.isnan(x):
            assert isinstance(y, float) and math.isnan(y)
        else:
            assert abs(x - y) <= tol, (a, b)


def _close2(a, b, tol):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        _close(x, y, tol)


def _same_extras(x, y, tol):
    """Everything but the sampled tokens/logprobs of two results of the same spec agrees."""
    for key in ("prompt_logprobs", "targets"):
        if y[key] is None:
            assert x[key] is None
        else:
            _close(x[key], y[key], tol)
    for key in ("topk_prompt", "alt"):
        if y[key] is None:
            assert x[key] is None
        else:
            assert x[key][0] == y[key][0]  # token ids
            _close2(x[key][1], y[key][1], tol)
    for sx, sy in zip(x["seqs"], y["seqs"]):
        if sy["topk"] is None:
            assert sx["topk"] is None
        else:
            assert sx["topk"][0] == sy["topk"][0]
            _close2(sx["topk"][1], sy["topk"][1], tol)


EMPTY = (0, -99999.0)


def _log_softmax(row, temperature=1.0):
    import numpy as np

    x = np.asarray(row, dtype=np.float64) / temperature
    return x - np.logaddexp.reduce(x)


def test_greedy_matches_full_recompute(runs):
    g = runs["tp1"]["greedy"]
    assert g["got"] == g["ref"]
    assert g["stop"] == "length"
    _close(g["got_lp"], g["ref_lp"], 1e-4)
    s = runs["tp1"]["shared"]
    assert s["got"] == s["ref"]


def test_logprobs_match_full_forward(runs):
    t = runs["tp1"]["t1"]
    assert len(t["tokens"]) == 15
    _close(t["got_lp"], t["ref_lp"], 1e-4)
    assert math.isnan(t["got_plp"][0])
    assert len(t["got_plp"]) == len(PROMPTS[0])
    _close(t["got_plp"][1:], t["ref_plp"], 1e-4)


def test_batching_does_not_change_results(runs):
    b = runs["tp1"]["batch"]
    for together in (b["together"], b["small"]):
        for x, y in zip(together, b["alone"]):
            assert [s["tokens"] for s in x["seqs"]] == [s["tokens"] for s in y["seqs"]]
            assert [s["stop"] for s in x["seqs"]] == [s["stop"] for s in y["seqs"]]
            for sx, sy in zip(x["seqs"], y["seqs"]):
                _close(sx["logprobs"], sy["logprobs"], 1e-4)  # fp32 noise of other batch shapes
            _same_extras(x, y, 1e-4)
    # each row honours its own spec: max_tokens, sample count
    want = [(2, 9), (3, 5), (1, 12), (2, 7)]
    for r, (n, m) in zip(b["together"], want):
        assert len(r["seqs"]) == n
        assert all(len(s["tokens"]) == m and s["stop"] == "length" for s in r["seqs"])
    assert b["together"][1]["prompt_logprobs"] is None


def test_requests_joining_a_running_batch_give_what_they_give_alone(runs):
    for case in runs["tp1"]["joined"]:
        assert case["polls"] > 6
        for x, y in zip(case["got"], case["alone"], strict=True):
            assert [s["tokens"] for s in x["seqs"]] == [s["tokens"] for s in y["seqs"]]
            assert [s["stop"] for s in x["seqs"]] == [s["stop"] for s in y["seqs"]]
            for sx, sy in zip(x["seqs"], y["seqs"]):
                _close(sx["logprobs"], sy["logprobs"], 1e-4)  # fp32 noise of other batch shapes
            _same_extras(x, y, 1e-4)


def test_seeds(runs):
    a, b, c = runs["tp1"]["seeds"]
    assert a == b
    assert a != c
    multi = runs["tp1"]["seeds_multi"]
    assert multi[0] == a  # sample 0 of seed 7 is the same draw as a single sample of seed 7
    assert len({tuple(m) for m in multi}) == 4  # samples of one spec differ


def test_stops(runs):
    s = runs["tp1"]["stops"]
    greedy, tok_res, str_res, none_res, short_res = s["greedy"], *s["results"]
    assert s["greedy_stop"] == "length" and len(greedy) == 20
    # stop token: ends at its first occurrence, token included
    k = greedy.index(s["stop_tok"]) + 1
    assert tok_res["seqs"][0]["tokens"] == greedy[:k]
    assert tok_res["seqs"][0]["stop"] == "stop"
    # stop string: ends at the first token whose decoded text contains it, token included
    k = next(i for i in range(1, 21) if s["stop_str"] in " ".join(map(str, greedy[:i])))
    assert k <= 4
    assert str_res["seqs"][0]["tokens"] == greedy[:k]
    assert str_res["seqs"][0]["stop"] == "stop"
    # () never stops early
    assert none_res["seqs"][0]["tokens"] == greedy and none_res["seqs"][0]["stop"] == "length"
    # max_tokens reached before the stop token
    if s["stop_tok"] not in greedy[:3]:
        assert short_res["seqs"][0]["tokens"] == greedy[:3] and short_res["seqs"][0]["stop"] == "length"


def test_top_k_1_is_greedy(runs):
    t = runs["tp1"]["topk1"]
    greedy = runs["tp1"]["stops"]["greedy"]
    assert t[0] == greedy and t[1] == greedy and t[2] == greedy
    # drawn from a one-token distribution: logprob 0
    for lps in t[3:]:
        assert all(abs(x) < 1e-6 for x in lps)


def test_context_limit_and_zero_tokens(runs):
    assert runs["tp1"]["ctx"] == {"n": 4, "stop": "length"}
    assert runs["tp1"]["zero"] == {"n": 0, "stop": "length"}


def test_route_gets_one_adapter_per_row(runs):
    calls = runs["tp1"]["route"]
    # prefill: one row per distinct prompt (shortest first); then decode rows
    assert calls[0] == ["b", "a"]
    assert ["b", "a", "a"] in calls
    assert calls[-1] == ["a", "a"]
    assert all(c for c in calls)


def test_prompt_scores_match_full_forward(runs):
    sc = runs["tp1"]["scores"]
    P, ref_lp, res = sc["P"], sc["ref_lp"], sc["results"]
    full, same_seed, other_seed, cool, greedy, last_n, single = res
    # prompt logprobs: NaN at 0, the full forward's log-softmax elsewhere
    _close(full["prompt_logprobs"], sc["ref_plp"], 1e-4)
    # top-k: [P, 5]; row 0 empty; row p = the 5 most likely tokens for position p, best first
    ids, lps = full["topk_prompt"]
    assert len(ids) == P and all(len(row) == 5 for row in ids)
    assert all((i, v) == EMPTY for i, v in zip(ids[0], lps[0]))
    assert ids[1:] == sc["ref_top_ids"]
    _close2(lps[1:], sc["ref_top_lps"], 1e-4)
    # target ids: the log-prob of each (row, id) at position row + 1
    rows, tids = sc["targets"]
    _close(full["targets"], [ref_lp[r][t] for r, t in zip(rows, tids)], 1e-4)
    # alternative draws: [P-1, k], scored under the distribution they were drawn from
    for r, temperature in ((full, 1.0), (cool, 0.5)):
        alt_ids, alt_lps = r["alt"]
        assert len(alt_ids) == P - 1
        for i in range(P - 1):
            want = _log_softmax(ref_lp[i], temperature)
            _close(alt_lps[i], [float(want[t]) for t in alt_ids[i]], 1e-4)
    assert same_seed["alt"][0] == full["alt"][0]
    assert other_seed["alt"][0] != full["alt"][0]
    assert len({t for row in full["alt"][0] for t in row}) > P  # real draws, not one token per row
    assert greedy["alt"][0] == [[t, t] for t in sc["argmax"]]
    _close2(greedy["alt"][1], [[ref_lp[i][t]] * 2 for i, t in enumerate(sc["argmax"])], 1e-4)
    # last_n = 3: only the last three positions are scored (logprobs and top-k)
    plp = last_n["prompt_logprobs"]
    assert all(math.isnan(x) for x in plp[: P - 3])
    _close(plp[P - 3 :], sc["ref_plp"][P - 3 :], 1e-4)
    ids, lps = last_n["topk_prompt"]
    assert all((i, v) == EMPTY for row_i, row_v in zip(ids[: P - 3], lps[: P - 3]) for i, v in zip(row_i, row_v))
    assert ids[P - 3 :] == [row[:3] for row in sc["ref_top_ids"][P - 4 :]]
    # a one-token prompt: nothing to score, shapes still right
    assert math.isnan(single["prompt_logprobs"][0]) and len(single["prompt_logprobs"]) == 1
    assert single["topk_prompt"] == [[[0, 0]], [[-99999.0, -99999.0]]]
    assert single["alt"] == [[], []]


def test_sampled_topk_tables(runs):
    st = runs["tp1"]["sample_topk"]
    plain, top2, greedy = st["results"]
    for r, ref in zip(st["results"], st["ref_lp"]):
        seq = r["seqs"][0]
        assert len(seq["topk"][0]) == len(seq["tokens"]) == len(ref)
    # temperature 1, no filter: the model's own top 5; the sampled token's cell matches its logprob
    seq = plain["seqs"][0]
    for step, (ids, lps) in enumerate(zip(*seq["topk"])):
        want = sorted(range(len(st["ref_lp"][0][step])), key=lambda t: -st["ref_lp"][0][step][t])[:5]
        assert ids == want
        _close(lps, [st["ref_lp"][0][step][t] for t in want], 1e-4)
        if seq["tokens"][step] in ids:
            assert abs(lps[ids.index(seq["tokens"][step])] - seq["logprobs"][step]) < 1e-5
    # top_k=2 at temperature 0.8: two cells (renormalised over the two), then empty cells
    seq = top2["seqs"][0]
    for step, (ids, lps) in enumerate(zip(*seq["topk"])):
        ref = st["ref_lp"][1][step]
        a, b = sorted(range(len(ref)), key=lambda t: -ref[t])[:2]
        pair = _log_softmax([ref[a], ref[b]], 0.8)
        assert ids[:2] == [a, b] and (ids[2:], lps[2:]) == ([0, 0], [-99999.0, -99999.0])
        _close(lps[:2], list(pair), 1e-4)
        assert seq["tokens"][step] in (a, b)
        assert abs(lps[ids.index(seq["tokens"][step])] - seq["logprobs"][step]) < 1e-5
    # greedy: the model's top 3, the sampled token first
    seq = greedy["seqs"][0]
    for step, (ids, lps) in enumerate(zip(*seq["topk"])):
        assert ids[0] == seq["tokens"][step]
        _close(lps, [st["ref_lp"][2][step][t] for t in ids], 1e-4)


def _same_results(nocache, cached, tol=1e-4):  # fp32 noise of other shapes, as batching
    for x, y in zip(cached, nocache):
        assert [s["tokens"] for s in x["seqs"]] == [s["tokens"] for s in y["seqs"]]
        for sx, sy in zip(x["seqs"], y["seqs"]):
            _close(sx["logprobs"], sy["logprobs"], tol)
        _same_extras(x, y, tol)


def test_prefix_cache_reuses_kv_without_changing_results(runs):
    c = runs["tp1"]["cache"]
    P = c["P"]
    for case in ("cold", "warm", "turn2", "other_adapter", "full_prompt_logprobs"):
        nocache, cached = c[case]
        assert all(r["hit"] == 0 for r in nocache)
        _same_results(nocache, cached)
    assert c["cold"][1][0]["hit"] == 0
    assert c["warm"][1][0]["hit"] == P - 1  # all but the last prompt token
    # second turn = prompt + sampled answer + 2 tokens: everything the first turn computed is reused
    turn2 = c["turn2"][1]
    assert turn2[0]["hit"] == P + c["answer_len"] - 1
    assert turn2[1]["hit"] == c["turn2_len"] - 4  # last_n=3 needs the hidden state before the last three
    assert turn2[2]["hit"] == 0
    plp = turn2[1]["prompt_logprobs"]
    assert sum(not math.isnan(x) for x in plp) == 3
    assert c["other_adapter"][1][0]["hit"] == 0  # another adapter never sees these K/V
    assert c["full_prompt_logprobs"][1][0]["hit"] == 0  # every hidden state needed: nothing reusable
    budget = c["budget"]
    assert max(budget["sizes"]) <= 24 and budget["entries"] <= 2


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rot_dim", [16, 8])  # head_dim 16: all of it rotated, or half (the rest passes)
@pytest.mark.parametrize("mscale", [1.0, 1.3])
def test_sampler_rope_is_megatron_rope(interleaved, rot_dim, mscale):
    """The sampler's RoPE (cos/sin tables computed once) gives megatron-core's unfused RoPE bit for bit."""
    import types

    import torch
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

    from backends.miles.sampler import _Runner

    g = torch.Generator().manual_seed(0)
    table = torch.rand(40, rot_dim, generator=g) * 30  # angles per position
    runner = _Runner.__new__(_Runner)
    runner.rope_table, runner.mscale, runner.interleaved, runner.rope_fused = table, mscale, interleaved, False
    runner.rope_cos = (torch.cos(table) * mscale).to(torch.float32)
    runner.rope_sin = (torch.sin(table) * mscale).to(torch.float32)
    pos = torch.randint(0, 40, (5, 3), generator=g)  # [s, b]
    t = torch.randn(5, 3, 4, 16, generator=g)
    cfg = types.SimpleNamespace(apply_rope_fusion=False, rotary_interleaved=interleaved,
                                multi_latent_attention=False)
    want = apply_rotary_pos_emb(t, table[pos].unsqueeze(2), cfg, mscale=mscale, cp_group=object())
    assert torch.equal(runner._rope(t, runner._rope_at(pos)), want)


def test_prefix_cache_bookkeeping():
    import torch

    from backends.miles.prefix_cache import PrefixCache

    def kv(n):
        return lambda: [(torch.full((2, n, 4), float(n)), torch.zeros(2, n, 4))]

    cache = PrefixCache(max_tokens=20)
    cache.insert("a", [1, 2, 3, 4], kv(4))
    assert cache.lookup("a", [1, 2, 3, 9, 9], limit=10)[0] == 3  # longest common prefix
    assert cache.lookup("a", [1, 2, 3, 4, 5], limit=2)[0] == 2  # capped by the caller's limit
    assert cache.lookup("b", [1, 2, 3, 4, 5], limit=10) == (0, None)  # other adapters never match
    assert cache.lookup(None, [1, 2, 3, 4, 5], limit=10) == (0, None)
    cache.insert("a", [1, 2, 3, 4, 5, 6], kv(6))  # extends the first entry, which is dropped
    assert len(cache) == 1 and cache.tokens == 6
    cache.insert("a", [1, 2, 3], kv(3))  # already covered: nothing new stored
    assert len(cache) == 1
    n, got = cache.lookup("a", [1, 2, 3, 4, 5, 6, 7], limit=10)
    assert n == 6 and got[0][0].shape == (2, 6, 4)
    cache.insert("b", [7] * 8, kv(8))
    cache.insert("a", [9] * 8, kv(8))  # 22 tokens > 20: the least recently used entry goes
    assert cache.tokens == 16 and cache.lookup("a", [1, 2, 3], limit=10) == (0, None)
    cache.insert("a", [5] * 21, kv(21))  # longer than the whole budget: not stored
    assert cache.tokens == 16
    cache.retain(lambda adapter: adapter != "b")
    assert cache.tokens == 8 and cache.lookup("b", [7] * 8, limit=10) == (0, None)


def test_prefix_cache_lookup_is_the_longest_prefix_over_all_entries():
    # Entries are filed by (adapter, first token); a lookup must still find what comparing
    # against every stored entry finds, through inserts, extensions and evictions.
    import random

    import numpy as np
    import torch

    from backends.miles.prefix_cache import PrefixCache

    rng = random.Random(0)
    cache = PrefixCache(max_tokens=300)
    heads = [[1, 2, 3], [1, 2, 4], [5], [6, 7]]  # shared system-prompt-like starts

    def seq():
        return rng.choice(heads) + [rng.randrange(3) for _ in range(rng.randrange(0, 12))]

    for step in range(400):
        adapter = rng.choice(["a", "b", None])
        tokens = seq()
        if rng.random() < 0.5:
            cache.insert(adapter, tokens, lambda n=len(tokens): [(torch.zeros(1, n, 2), torch.zeros(1, n, 2))])
        limit = rng.randrange(1, 20)
        want = 0
        for entry in cache._entries.values():  # brute force over every stored entry
            if entry.adapter == adapter:
                common = 0
                while common < min(len(entry.tokens), len(tokens)) and entry.tokens[common] == tokens[common]:
                    common += 1
                want = max(want, min(common, limit))
        n, kv = cache.lookup(adapter, np.asarray(tokens), limit)
        assert n == want, (step, adapter, tokens, limit)
        assert (kv is None) == (n == 0) and (kv is None or kv[0][0].shape[1] >= n)
    assert 0 < cache.tokens <= 300


def test_tp2_matches_tp1(runs):
    tp2 = _launch("tp2", 2, runs["dir"])
    tp1 = runs["tp1"]
    for rank_out in tp2:
        _close(rank_out["full_lp"], tp1["tp1_full_lp"], 1e-5)  # the weights really are the same
        for x, y in zip(rank_out["batch"], tp1["batch"]["together"]):
            assert [s["tokens"] for s in x["seqs"]] == [s["tokens"] for s in y["seqs"]]
            for sx, sy in zip(x["seqs"], y["seqs"]):
                _close(sx["logprobs"], sy["logprobs"], 1e-5)
            _same_extras(x, y, 1e-4)  # low-probability cells carry more fp32 noise
    assert tp2[0]["batch"] == tp2[1]["batch"]  # every rank returns the same thing


def test_report_speed(runs, capsys):
    with capsys.disabled():
        print(f"\nsampler: {runs['tp1']['tok_per_s']:.0f} tokens/s (8 rows x 32 new tokens, tiny model, TP=1)")


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
