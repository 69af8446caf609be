"""How many tokens one forward_backward micro-batch may hold, from the memory free on the worker.

The tests' servers fix the budget (TINKERCLOUD_MICROBATCH_LOGITS) so micro-batching happens on
any machine; these check the automatic budget itself: what backward keeps per token, and that
the free memory a CPU worker sees is split between the workers of the machine.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch

from backends.miles import backend


def _model(hidden: int, ffn: int, layers: int, dtype: torch.dtype) -> SimpleNamespace:
    config = SimpleNamespace(hidden_size=hidden, ffn_hidden_size=ffn, params_dtype=dtype)
    return SimpleNamespace(config=config, decoder=SimpleNamespace(layers=[None] * layers))


def test_activation_bytes_per_token_counts_the_stage_layers_and_recomputation(monkeypatch):
    monkeypatch.setattr(backend, "tp_size", lambda: 1)
    qwen3_8b = _model(4096, 12288, 36, torch.bfloat16)
    assert backend.activation_bytes_per_token(qwen3_8b, "none") == 36 * (10 * 4096 + 4 * 12288) * 2
    assert backend.activation_bytes_per_token(qwen3_8b, "full") == 36 * 4096 * 2
    half = _model(4096, 12288, 18, torch.bfloat16)  # one of two pipeline stages
    assert backend.activation_bytes_per_token(half, "none") * 2 == backend.activation_bytes_per_token(qwen3_8b, "none")
    monkeypatch.setattr(backend, "tp_size", lambda: 4)  # the MLP's intermediates are split over TP
    assert backend.activation_bytes_per_token(qwen3_8b, "none") == 36 * (10 * 4096 + 12288) * 2


def test_cpu_workers_split_the_available_memory(monkeypatch):
    monkeypatch.setattr(backend, "_available_ram", lambda: 8 << 30)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert backend.free_memory(torch.device("cpu")) == 8 << 30
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert backend.free_memory(torch.device("cpu")) == 2 << 30


def test_the_machine_reports_available_memory():
    assert backend._available_ram() > 0
