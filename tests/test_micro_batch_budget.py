"""How many tokens one forward_backward micro-batch may hold, from the memory free on the worker.

The tests' servers fix the budget (TINKERCLOUD_MICROBATCH_LOGITS) so micro-batching happens on
any machine; these check the automatic budget itself: what backward keeps per token (against
the H100's measured peaks), that the free memory a CPU worker sees is split between the workers
of the machine, and that a step is planned within what is free when it runs.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch

from backends.miles import backend


def _model(hidden: int, ffn: int, layers: int, dtype: torch.dtype, tp: int = 1, heads: int = 32,
           head_dim: int = 128) -> SimpleNamespace:
    config = SimpleNamespace(hidden_size=hidden, ffn_hidden_size=ffn, params_dtype=dtype, num_attention_heads=heads,
                             kv_channels=head_dim, tensor_model_parallel_size=tp)
    return SimpleNamespace(config=config, decoder=SimpleNamespace(layers=[None] * layers))


def test_activation_bytes_per_token_counts_the_stage_layers_and_recomputation():
    qwen3_8b = _model(4096, 12288, 36, torch.bfloat16)
    assert backend.activation_bytes_per_token(qwen3_8b, "none") == 36 * (10 * 4096 + 4 * 12288) * 2
    assert backend.activation_bytes_per_token(qwen3_8b, "full") == 36 * 4096 * 2
    half = _model(4096, 12288, 18, torch.bfloat16)  # one of two pipeline stages
    assert backend.activation_bytes_per_token(half, "none") * 2 == backend.activation_bytes_per_token(qwen3_8b, "none")
    tp4 = _model(4096, 12288, 36, torch.bfloat16, tp=4)  # the MLP's intermediates are split over TP
    assert backend.activation_bytes_per_token(tp4, "none") == 36 * (10 * 4096 + 12288) * 2
    # float32 LoRA products beside bf16 weights keep a float32 copy of each wrapped linear's input
    # (qkv and fc1: hidden; proj: this rank's heads; fc2: this rank's FFN share)
    assert backend.activation_bytes_per_token(tp4, "none", torch.float32) - \
        backend.activation_bytes_per_token(tp4, "none") == 36 * (2 * 4096 + 4096 // 4 + 12288 // 4) * 4
    assert backend.activation_bytes_per_token(tp4, "none", torch.bfloat16) == \
        backend.activation_bytes_per_token(tp4, "none")


def test_cpu_workers_split_the_available_memory(monkeypatch):
    monkeypatch.setattr(backend, "_available_ram", lambda: 8 << 30)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert backend.free_memory(torch.device("cpu")) == 8 << 30
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert backend.free_memory(torch.device("cpu")) == 2 << 30


def test_the_machine_reports_available_memory():
    assert backend._available_ram() > 0


def test_memory_plan_per_token_matches_what_the_h100_measured():
    """The micro-batch planner's bytes per token (logits + what backward keeps) for the Qwen3
    shapes in bf16 against the H100's in-process peaks (BENCHMARKS.md, GPU results), less the
    weights (8.19 G parameters of the 8B shape: 15.25 GiB; 0.6B: 1.4 GiB) and the adapter with
    its gradient and Adam state (1.2 / 0.2 GiB): 8B, float32 LoRA products, 38.5 GiB at 2 x 1024
    tokens -> 11.5 MB a token; 8B, bf16 products, 50.6 GiB at 4 x 1024 -> 8.95 MB; 0.6B, float32
    products, 32.5 GiB at 8 x 1024 -> 4.05 MB. Within 10 %: a GPU's micro-batch may plan on half
    its free memory."""
    def per_token(hidden, ffn, layers, heads, lora_dtype):
        model = _model(hidden, ffn, layers, torch.bfloat16, heads=heads)
        return 151936 * backend.LOGITS_BYTES + backend.activation_bytes_per_token(model, "none", lora_dtype)

    for planned, measured in ((per_token(4096, 12288, 36, 32, torch.float32), 11.5e6),
                              (per_token(4096, 12288, 36, 32, torch.bfloat16), 8.95e6),
                              (per_token(1024, 3072, 28, 16, torch.float32), 4.05e6)):
        assert abs(planned / measured - 1) < 0.1, (planned, measured)


def test_micro_batch_plan_shrinks_with_the_memory_free_now():
    """Adapters, snapshots and K/V caches take memory after start-up: a step is planned within the
    share of the memory free now when that is less than the start-up plan, never more than it."""
    vocab = 151936  # the floor of 2**27 logits is then 883 tokens, under every plan below
    base = SimpleNamespace(local_vocab=vocab, model=_model(64, 192, 2, torch.float32, heads=4, head_dim=16))
    per_token = vocab * backend.LOGITS_BYTES + backend.activation_bytes_per_token(base.model, "none", torch.float32)
    worker = backend.MilesBackend.__new__(backend.MilesBackend)  # only what planning reads
    worker.device, worker.recompute, worker.lora_dtype = torch.device("cpu"), "none", torch.float32
    worker.memory_share, worker.micro_batch_bytes = 0.5, 4000 * per_token
    for free_now, tokens in ((100_000 * per_token, 4000), (8000 * per_token, 4000), (2000 * per_token, 1000)):
        worker._free_now = lambda free_now=free_now: free_now
        assert worker._token_budget(base) == tokens

