"""Shared by the tests that run megatron-core directly: tiny peaked HF checkpoints, the HF
reference, and torchrun-style worker processes over gloo.

megatron-core's parallel state is process-global, so model work runs in fresh subprocesses
(`run_workers`); each test file doubles as its own worker script.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]


def make_hf_checkpoint(
    out_dir: Path, arch: str, *, vocab_size: int = 1000, tie_word_embeddings: bool = False, seed: int = 0,
    max_shard_size: str | None = None, num_layers: int = 2,
) -> Path:
    """A tiny random HF checkpoint (hidden 64, 2 layers unless told, 4 heads / 2 KV heads of 16, ffn 192).

    Weights are redrawn at fan-in scale and norms perturbed, so the model's outputs are peaked
    and a wrong weight mapping shows up clearly. Llama gets llama3 RoPE scaling.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    common = dict(
        vocab_size=vocab_size, hidden_size=64, num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, intermediate_size=192, tie_word_embeddings=tie_word_embeddings, rms_norm_eps=1e-6,
        eos_token_id=2,
    )
    if arch == "qwen3":
        config, model_cls = Qwen3Config(**common, rope_theta=1e6), Qwen3ForCausalLM
    else:
        rope_scaling = {
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        }
        config = LlamaConfig(**common, rope_theta=5e5, rope_scaling=rope_scaling, max_position_embeddings=131072)
        model_cls = LlamaForCausalLM
    torch.manual_seed(seed)
    model = model_cls(config).float()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1 + 0.2 * torch.randn_like(param))
            else:
                param.normal_(0, 2 / param.shape[1] ** 0.5)
    model.save_pretrained(out_dir, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    (out_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 3]}))
    return out_dir


def hf_logprobs(model, tokens, targets):
    import torch

    with torch.no_grad():
        logits = model(tokens).logits.float()
    return torch.log_softmax(logits, dim=-1).gather(-1, targets[..., None])[..., 0]


def run_workers(script: Path, world_size: int, *args: str, timeout: float = 120) -> None:
    """Run `python script *args` as `world_size` torchrun-style ranks; raise with their output on failure."""
    port = free_port()
    procs = []
    for rank in range(world_size):
        env = {
            **os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
        }
        procs.append(subprocess.Popen(
            [sys.executable, str(script), *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True,
        ))
    try:
        outputs = [proc.communicate(timeout=timeout)[0] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for rank, (proc, output) in enumerate(zip(procs, outputs)):
        if proc.returncode != 0:
            raise AssertionError(f"rank {rank} of {world_size} exited with {proc.returncode}:\n{output[-6000:]}")


def init_worker():
    """In a worker process: join the process group that `run_workers` described."""
    from backends.miles.parallel import ParallelDims, init_distributed

    return init_distributed(ParallelDims(tp=int(os.environ["WORLD_SIZE"])), seed=1234)
