"""Our checkpoints are standard PEFT adapters.

`peft` loads a checkpoint the server wrote onto the Hugging Face model and reproduces the
server's logprobs; `scripts/export_merged.py` bakes it into a plain checkpoint that
`transformers` loads with the same logprobs. Both tiny architectures, trained through the SDK.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tinker
import torch
from tinker import types

from tests.conftest import API_KEY, ROOT
from tests.helpers import logprobs_of, sft_datum

ARCHS = ("tiny-qwen3", "tiny-llama")
DATUM = sft_datum([9707, 1879, 11, 1075, 374, 264], [1273, 315, 279, 6236, 13])


@pytest.fixture(scope="module")
def trained(server) -> dict[str, tuple[Path, np.ndarray]]:
    """Per architecture: a trained adapter's checkpoint folder and the server's logprobs for DATUM."""
    service_client = tinker.ServiceClient(base_url=server.url, api_key=API_KEY)
    out = {}
    for arch in ARCHS:
        tc = service_client.create_lora_training_client(arch, rank=4, seed=4).result()  # attn, mlp and lm_head
        for _ in range(3):
            tc.forward_backward([DATUM], "cross_entropy")
            tc.optim_step(types.AdamParams(learning_rate=2e-2)).result()
        tc.save_state("peft-export").result()
        folder = server.data_dir / "checkpoints" / tc.model_id / "weights" / "peft-export"
        out[arch] = folder, logprobs_of(tc.forward([DATUM], "cross_entropy").result())[0]
    return out


def hf_logprobs(model) -> np.ndarray:
    tokens = torch.tensor([DATUM.model_input.to_ints()])
    targets = torch.as_tensor(DATUM.loss_fn_inputs["target_tokens"].to_numpy())
    with torch.no_grad():
        logp = torch.log_softmax(model(tokens).logits[0].float(), dim=-1)
    return logp[torch.arange(len(targets)), targets].numpy().astype(np.float64)


def load_hf(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_peft_loads_our_adapter_and_reproduces_the_server(trained, tiny_models, arch):
    from peft import PeftModel

    folder, server_lp = trained[arch]
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 32
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj", "lm_head"}
    base = load_hf(tiny_models[arch])
    assert np.abs(hf_logprobs(base) - server_lp).max() > 1e-2, "training should have moved the logprobs"
    model = PeftModel.from_pretrained(base, str(folder)).eval()
    loaded = {n for n, _ in model.named_parameters() if "lora_" in n}
    assert "base_model.model.lm_head.lora_B.default.weight" in loaded
    assert "base_model.model.model.layers.1.self_attn.k_proj.lora_A.default.weight" in loaded
    np.testing.assert_allclose(hf_logprobs(model), server_lp, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_export_merged_writes_a_plain_checkpoint_with_the_same_logprobs(trained, tiny_models, tmp_path, arch):
    from transformers import AutoTokenizer

    folder, server_lp = trained[arch]
    out = tmp_path / f"{arch}-merged"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "export_merged.py"), str(folder),
                           str(tiny_models[arch]), str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert not list(out.glob("adapter_*"))
    np.testing.assert_allclose(hf_logprobs(load_hf(out)), server_lp, atol=1e-4)
    assert AutoTokenizer.from_pretrained(str(out)).encode("Hello world") == [9707, 1879]
    again = subprocess.run([sys.executable, str(ROOT / "scripts" / "export_merged.py"), str(folder),
                            str(tiny_models[arch]), str(out)], capture_output=True, text=True, timeout=120)
    assert again.returncode == 1 and "already exists" in again.stderr


def test_export_merged_unties_a_tied_lm_head(tmp_path):
    """An adapter on lm_head of a tied model must not change the input embeddings."""
    from peft import LoraConfig, get_peft_model

    from scripts.make_tiny_model import make_tiny_model

    base_dir = Path(make_tiny_model(str(tmp_path / "tied"), "llama", seed=3, tie_word_embeddings=True))
    torch.manual_seed(0)
    model = get_peft_model(load_hf(base_dir), LoraConfig(r=2, lora_alpha=8, target_modules=["lm_head", "q_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    model.save_pretrained(str(tmp_path / "adapter"), save_embedding_layers=False)
    expected = hf_logprobs(model.eval())
    out = tmp_path / "merged"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "export_merged.py"), str(tmp_path / "adapter"),
                           str(base_dir), str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    np.testing.assert_allclose(hf_logprobs(load_hf(out)), expected, atol=1e-4)


def test_fused_factors_round_trip_and_unfusable_adapters_are_refused():
    from backends.miles.peft_format import FusedLayout, from_peft, to_peft
    from engine.messages import UserError

    layout = FusedLayout(q_rows=8, kv_rows=4, ffn_rows=6, vocab_size=10, padded_vocab=12)
    g = torch.Generator().manual_seed(0)
    full = {
        "decoder.layers.0.self_attention.linear_qkv.lora_A": torch.randn(2, 5, generator=g),
        "decoder.layers.0.self_attention.linear_qkv.lora_B": torch.randn(16, 2, generator=g),
        "decoder.layers.0.mlp.linear_fc2.lora_A": torch.randn(2, 6, generator=g),
        "decoder.layers.0.mlp.linear_fc2.lora_B": torch.randn(5, 2, generator=g),
        "output_layer.lora_A": torch.randn(2, 5, generator=g),
        "output_layer.lora_B": torch.cat([torch.randn(10, 2, generator=g), torch.zeros(2, 2)]),
    }
    peft = to_peft(full, layout)
    assert peft["base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"].shape == (4, 2)
    assert peft["base_model.model.lm_head.lora_B.weight"].shape == (10, 2)  # padding rows dropped
    assert torch.equal(peft["base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"],
                       full["decoder.layers.0.self_attention.linear_qkv.lora_A"])
    back = from_peft(peft, layout)
    assert set(back) == set(full) and all(torch.equal(back[k], full[k]) for k in full)

    differing = dict(peft)
    differing["base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"] = torch.randn(2, 5)
    with pytest.raises(UserError, match="different lora_A"):
        from_peft(differing, layout)
    partial = {k: v for k, v in peft.items() if ".v_proj." not in k}
    with pytest.raises(UserError, match="all of"):
        from_peft(partial, layout)
    foreign = {**peft, "base_model.model.model.layers.0.self_attn.rotary.lora_A.weight": torch.zeros(2, 5),
               "base_model.model.model.layers.0.self_attn.rotary.lora_B.weight": torch.zeros(5, 2)}
    with pytest.raises(UserError, match="cannot train"):
        from_peft(foreign, layout)


def test_a_checkpoint_read_during_an_overwrite_gives_every_file_of_one_save(tmp_path, monkeypatch):
    """A save with overwrite=True swaps a new folder in; a reader caught in between reads again,
    and one that never gets a stable folder is told to load again."""
    from backends.miles import peft_format
    from engine.messages import UserError

    folder = tmp_path / "ckpt"

    def save(version: float, snapshot: str) -> None:
        peft_format.write_checkpoint(folder, {"w": torch.full((2,), version)}, {"r": 2},
                                     {"snapshot_id": snapshot}, optimizer={"m": torch.full((1,), version)})

    save(1.0, "snap-1")
    real_read = peft_format.read_adapter
    overwrites = iter([(2.0, "snap-2")])

    def read_then_overwrite(f):
        got = real_read(f)  # the old adapter ...
        following = next(overwrites, None)  # ... then, maybe, a save swaps a new folder in
        if following is not None:
            save(*following)
        return got

    monkeypatch.setattr(peft_format, "read_adapter", read_then_overwrite)
    saved = peft_format.read_checkpoint(folder, with_optimizer=True)
    assert saved.snapshot_id == "snap-2"
    assert saved.tensors["w"].tolist() == [2.0, 2.0] and saved.optimizer["m"].tolist() == [2.0]

    hidden = tmp_path / ".ckpt.old-1"  # between the two renames of a swap the folder is missing
    folder.rename(hidden)
    overwrites = iter([])
    monkeypatch.setattr(peft_format.time, "sleep", lambda _: hidden.rename(folder))
    assert peft_format.read_checkpoint(folder).snapshot_id == "snap-2"  # read again once it is back

    overwrites = iter((float(v), f"snap-{v}") for v in range(3, 100))  # saved over on every read
    with pytest.raises(UserError, match="saved over again while it was being read"):
        peft_format.read_checkpoint(folder)
