"""The mcore model built from an HF checkpoint scores tokens like the HF model, at TP=1 and TP=2.

megatron-core's parallel state is process-global, so the model work runs in fresh
subprocesses (this file doubles as the worker script; `run_workers` starts one process per
tp rank over gloo). The HF reference runs in the pytest process. `make_hf_checkpoint` and
`run_workers` are shared with test_lora.py.
"""
from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BATCH, SEQ = 2, 24


# ---------------------------------------------------------------------------------------
# shared helpers
# ---------------------------------------------------------------------------------------
def make_hf_checkpoint(
    out_dir: Path, arch: str, *, vocab_size: int = 1000, tie_word_embeddings: bool = False, seed: int = 0,
    max_shard_size: str | None = None,
) -> Path:
    """A tiny random HF checkpoint (hidden 64, 2 layers, 4 heads / 2 KV heads of 16, ffn 192).

    Weights are redrawn at fan-in scale and norms perturbed, so the model's outputs are peaked
    and a wrong weight mapping shows up clearly. Llama gets llama3 RoPE scaling.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    common = dict(
        vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(script: Path, world_size: int, *args: str, timeout: float = 120) -> None:
    """Run `python script *args` as `world_size` torchrun-style ranks; raise with their output on failure."""
    port = _free_port()
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


# ---------------------------------------------------------------------------------------
# worker side
# ---------------------------------------------------------------------------------------
def _worker(out_path: str, batch_path: str, *model_dirs: str) -> None:
    import torch
    import torch.distributed as dist

    device = init_worker()
    from backends.miles.model import ModelInfo, build_model, token_logprobs
    from backends.miles.parallel import tp_rank

    batch = torch.load(batch_path)
    results = {}
    for model_dir in model_dirs:
        model = build_model(model_dir, device)
        with torch.no_grad():
            logprobs = token_logprobs(model, batch["tokens"], batch["targets"])
        results[model_dir] = {"logprobs": logprobs, "info": dataclasses.asdict(ModelInfo.from_dir(model_dir))}
    if tp_rank() == 0:
        torch.save(results, out_path)
    dist.destroy_process_group()


# ---------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------
ARCHS = {  # name -> checkpoint options: tied + sharded files for Qwen3; a vocab that TP=2 must pad for Llama
    "qwen3": dict(vocab_size=1000, tie_word_embeddings=True, seed=1, max_shard_size="100KB"),
    "llama": dict(vocab_size=1001, tie_word_embeddings=False, seed=2),
}


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    import torch

    root = tmp_path_factory.mktemp("parity")
    dirs = {arch: make_hf_checkpoint(root / arch, arch, **opts) for arch, opts in ARCHS.items()}
    generator = torch.Generator().manual_seed(0)
    batch = {
        "tokens": torch.randint(0, 1000, (BATCH, SEQ), generator=generator),
        "targets": torch.randint(0, 1000, (BATCH, SEQ), generator=generator),
    }
    torch.save(batch, root / "batch.pt")
    results = {}
    for tp in (1, 2):
        run_workers(Path(__file__), tp, str(root / f"tp{tp}.pt"), str(root / "batch.pt"), *map(str, dirs.values()))
        results[tp] = torch.load(root / f"tp{tp}.pt", weights_only=False)
    return dirs, batch, results


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_tp1_matches_hf(parity, arch):
    from transformers import AutoModelForCausalLM

    dirs, batch, results = parity
    if arch == "qwen3":
        assert (dirs[arch] / "model.safetensors.index.json").exists(), "qwen3 checkpoint should be sharded"
    reference = hf_logprobs(AutoModelForCausalLM.from_pretrained(dirs[arch]).float(), batch["tokens"], batch["targets"])
    ours = results[1][str(dirs[arch])]["logprobs"]
    assert ours.shape == (BATCH, SEQ)
    assert reference.std() > 1.0, "the reference should be far from uniform"
    assert (ours - reference).abs().max() < 1e-4


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_tp2_matches_tp1(parity, arch):
    dirs, _, results = parity
    tp1, tp2 = results[1][str(dirs[arch])]["logprobs"], results[2][str(dirs[arch])]["logprobs"]
    assert (tp1 - tp2).abs().max() < 1e-5


def test_model_info(parity):
    dirs, _, results = parity
    assert results[1][str(dirs["llama"])]["info"] == {
        "architecture": "LlamaForCausalLM", "vocab_size": 1001, "max_context": 131072, "eos_token_ids": (2, 3),
    }


def test_unsupported_configs_fail_clearly():
    from backends.miles.hf_checkpoint import transformer_config_from_hf

    base = {
        "architectures": ["LlamaForCausalLM"], "num_hidden_layers": 1, "hidden_size": 64, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 100, "max_position_embeddings": 64,
    }
    config, kwargs = transformer_config_from_hf({**base, "rope_theta": 5e5})
    assert (config.kv_channels, kwargs["rotary_base"], config.qk_layernorm) == (16, 5e5, False)
    with pytest.raises(ValueError, match="attention_bias"):
        transformer_config_from_hf({**base, "attention_bias": True})
    with pytest.raises(ValueError, match="yarn"):
        transformer_config_from_hf({**base, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="low_freq_factor"):
        llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0}
        transformer_config_from_hf({**base, "rope_scaling": llama3})
    with pytest.raises(ValueError, match="architecture"):
        transformer_config_from_hf({**base, "architectures": ["MistralForCausalLM"]})


if __name__ == "__main__":
    _worker(*sys.argv[1:])
