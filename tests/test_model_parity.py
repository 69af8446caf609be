"""The mcore model built from an HF checkpoint scores tokens like the HF model, at TP=1 and TP=2.

megatron-core's parallel state is process-global, so the model work runs in fresh
subprocesses (this file doubles as the worker script; `tests.mcore_harness.run_workers` starts one process
per tp rank over gloo). The HF reference runs in the pytest process.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest

from tests.mcore_harness import hf_logprobs, init_worker, make_hf_checkpoint, run_workers

BATCH, SEQ = 2, 24


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
