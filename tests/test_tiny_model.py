"""Tiny random-init checkpoints from scripts/make_tiny_model.py load offline with a real Qwen tokenizer."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from scripts.make_tiny_model import NORMAL_ADDED_TOKENS, SPECIAL_TOKENS, make_tiny_model

REPO = Path(__file__).resolve().parents[1]
# Non-default sizes, so the config check proves the arguments are honoured.
REQUESTED = {
    "qwen3": dict(hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, max_position_embeddings=512,
                  tie_word_embeddings=False),
    "llama": dict(hidden_size=48, num_layers=2, num_heads=4, num_kv_heads=1, max_position_embeddings=1024,
                  tie_word_embeddings=True),
}
ROPE_THETA = {"qwen3": 1_000_000.0, "llama": 500_000.0}
RMS_NORM_EPS = {"qwen3": 1e-6, "llama": 1e-5}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny")
    return {arch: make_tiny_model(str(root / arch), arch, **kwargs) for arch, kwargs in REQUESTED.items()}


@pytest.mark.parametrize("arch", sorted(REQUESTED))
def test_tokenizer_matches_qwen_ids(checkpoints, arch):
    tok = AutoTokenizer.from_pretrained(checkpoints[arch], local_files_only=True)
    assert tok.encode("Hello world", add_special_tokens=False) == [9707, 1879]
    added = SPECIAL_TOKENS + NORMAL_ADDED_TOKENS
    assert tok.convert_tokens_to_ids(list(added)) == list(range(151643, 151643 + 26))
    assert (tok.eos_token_id, tok.pad_token_id) == (151645, 151643)

    text = "Grüße, 世界! naïve café 🙂\n\tdef f(x):  return x**2  "
    ids = tok.encode(text, add_special_tokens=False)
    assert max(ids) < 151643 and tok.decode(ids) == text

    ids = tok.encode("<|im_start|>user\nhi<|im_end|><think>ok</think>", add_special_tokens=False)
    assert ids[0] == 151644 and 151645 in ids and 151667 in ids
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi<think>ok</think>"


@pytest.mark.parametrize("arch", sorted(REQUESTED))
def test_model_loads_float32_with_requested_config(checkpoints, arch):
    model = AutoModelForCausalLM.from_pretrained(checkpoints[arch], local_files_only=True)
    cfg, req = model.config, REQUESTED[arch]
    assert cfg.model_type == arch
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (
        req["hidden_size"], req["num_layers"], req["num_heads"], req["num_kv_heads"])
    assert cfg.head_dim == req["hidden_size"] // req["num_heads"]
    assert cfg.intermediate_size == 3 * req["hidden_size"]
    assert cfg.vocab_size == 151936 and cfg.max_position_embeddings == req["max_position_embeddings"]
    assert cfg.tie_word_embeddings == req["tie_word_embeddings"]
    rope_theta = cfg.rope_parameters["rope_theta"] if getattr(cfg, "rope_parameters", None) else cfg.rope_theta
    assert rope_theta == ROPE_THETA[arch] and cfg.rms_norm_eps == RMS_NORM_EPS[arch]
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (151643, 151645, 151643)
    assert model.generation_config.eos_token_id == [151645, 151643]
    logits = model(torch.tensor([[9707, 1879]])).logits
    assert logits.shape == (1, 2, 151936) and torch.isfinite(logits).all()


def test_same_seed_gives_identical_weights(tmp_path):
    small = dict(hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1)
    a = make_tiny_model(str(tmp_path / "a"), seed=3, **small)
    b = make_tiny_model(str(tmp_path / "b"), seed=3, **small)
    c = make_tiny_model(str(tmp_path / "c"), seed=4, **small)
    weights = {name: (Path(d) / "model.safetensors").read_bytes() for name, d in zip("abc", (a, b, c))}
    assert weights["a"] == weights["b"] != weights["c"]
    assert not list(tmp_path.glob("*.tmp-*"))  # staging directories are cleaned up


def test_existing_checkpoint_is_kept(checkpoints):
    config = Path(checkpoints["qwen3"]) / "config.json"
    before = config.stat().st_mtime_ns
    assert make_tiny_model(checkpoints["qwen3"], hidden_size=128) == checkpoints["qwen3"]
    assert config.stat().st_mtime_ns == before


def test_cli(tmp_path):
    out = tmp_path / "cli"
    subprocess.run(
        [sys.executable, "scripts/make_tiny_model.py", "--out", str(out), "--arch", "llama", "--hidden-size", "32",
         "--layers", "1", "--heads", "2", "--kv-heads", "1", "--seed", "7", "--max-position-embeddings", "256",
         "--tie"],
        cwd=REPO, check=True, capture_output=True,
    )
    cfg = AutoConfig.from_pretrained(out, local_files_only=True)
    assert (cfg.model_type, cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == ("llama", 32, 1, 2)
    assert (cfg.num_key_value_heads, cfg.max_position_embeddings, cfg.tie_word_embeddings) == (1, 256, True)
