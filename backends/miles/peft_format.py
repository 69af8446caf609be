"""The on-disk checkpoint format: a standard Hugging Face PEFT LoRA adapter folder.

A checkpoint folder holds `adapter_model.safetensors` and `adapter_config.json` exactly as
`peft` writes them for Qwen3ForCausalLM / LlamaForCausalLM (module names
`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`, ...,
`base_model.model.lm_head.lora_B.weight`), our metadata file (`engine.registry.META_FILE`)
and, for training checkpoints, `optimizer.safetensors` (AdamW moments and step count of every
factor, in the same full layout as the factors, keyed by their megatron names).

Conversion from our full (HF-order) factor layout (see `lora.py`):
- fused `linear_qkv` shares one A: it is written to each of q_proj, k_proj and v_proj, and
  B is split into [B_q; B_k; B_v]; `linear_fc1` likewise into gate_proj / up_proj. Reading
  refuses q/k/v (gate/up) A factors that differ, since they cannot share one fused A.
- `output_layer` is `lm_head`; B's padded vocabulary rows are dropped on write and zero-filled
  on read.
Folders are written into a hidden temporary folder and then renamed into place, so a crash
mid-save never leaves a half-written checkpoint visible; `read_checkpoint` gives every file of
one save even while a save with overwrite swaps the folder.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from engine.messages import UserError
from engine.registry import META_FILE, PEFT_FILES

ADAPTER_FILE, CONFIG_FILE = PEFT_FILES
OPTIMIZER_FILE = "optimizer.safetensors"
PREFIX = "base_model.model."

# megatron module (in a decoder layer) -> the HF modules it fuses, in B's row order
_LAYER_MODULES = {
    "self_attention.linear_qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attention.linear_proj": ("self_attn.o_proj",),
    "mlp.linear_fc1": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.linear_fc2": ("mlp.down_proj",),
}
_GROUP_TARGETS = {
    "train_attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "train_mlp": ("gate_proj", "up_proj", "down_proj"),
    "train_unembed": ("lm_head",),
}
_FACTOR_KEY = re.compile(r"^(.+)\.lora_([AB])$")
_PEFT_KEY = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])\.weight$")
_LAYER_PATH = re.compile(r"^(decoder|model)\.layers\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class FusedLayout:
    """Row counts needed to split (and re-fuse) B factors of one base model."""

    q_rows: int
    kv_rows: int
    ffn_rows: int
    vocab_size: int  # lm_head rows in the HF model
    padded_vocab: int  # rows of our full output_layer B

    @classmethod
    def from_hf_config(cls, hf_cfg: dict[str, Any], padded_vocab: int | None = None) -> "FusedLayout":
        heads = hf_cfg["num_attention_heads"]
        head_dim = hf_cfg.get("head_dim") or hf_cfg["hidden_size"] // heads
        kv_heads = hf_cfg.get("num_key_value_heads") or heads
        vocab = hf_cfg["vocab_size"]
        return cls(heads * head_dim, kv_heads * head_dim, hf_cfg["intermediate_size"], vocab, padded_vocab or vocab)

    def fused_rows(self, mcore_module: str) -> list[int]:
        """How the rows of a fused module's full B split over the HF modules it stands for."""
        if mcore_module.endswith("linear_qkv"):
            return [self.q_rows, self.kv_rows, self.kv_rows]
        return [self.ffn_rows, self.ffn_rows]  # linear_fc1: [gate; up]


def _hf_modules(mcore_module: str) -> list[str]:
    """The HF modules (in B's row order) that one megatron module stands for."""
    if mcore_module == "output_layer":
        return ["lm_head"]
    m = _LAYER_PATH.match(mcore_module)
    if m is None or m.group(1) != "decoder" or m.group(3) not in _LAYER_MODULES:
        raise ValueError(f"{mcore_module!r} is not a LoRA module this format knows")
    return [f"model.layers.{m.group(2)}.{target}" for target in _LAYER_MODULES[m.group(3)]]


def _mcore_module(hf_module: str) -> tuple[str, int]:
    """(megatron module, position among the HF modules it fuses) of an HF module."""
    if hf_module == "lm_head":
        return "output_layer", 0
    m = _LAYER_PATH.match(hf_module)
    for module, targets in _LAYER_MODULES.items():
        if m is not None and m.group(1) == "model" and m.group(3) in targets:
            return f"decoder.layers.{m.group(2)}.{module}", targets.index(m.group(3))
    raise UserError(f"the adapter targets {hf_module!r}, which this server cannot train")


# ---- tensors ---------------------------------------------------------------------------------
def to_peft(full: dict[str, torch.Tensor], layout: FusedLayout) -> dict[str, torch.Tensor]:
    """PEFT tensors from our full-layout factors (keys like `decoder.layers.0.mlp.linear_fc1.lora_A`)."""
    out = {}
    for key, value in full.items():
        module, factor = _FACTOR_KEY.match(key).groups()
        targets = _hf_modules(module)
        value = value.detach().to("cpu", torch.float32)
        if factor == "A":
            parts = [value] * len(targets)
        elif module == "output_layer":
            parts = [value[: layout.vocab_size]]  # padded vocabulary rows are ours alone
        else:
            parts = value.split(layout.fused_rows(module)) if len(targets) > 1 else [value]
        for target, part in zip(targets, parts):
            out[f"{PREFIX}{target}.lora_{factor}.weight"] = part.clone().contiguous()
    return out


def from_peft(tensors: dict[str, torch.Tensor], layout: FusedLayout) -> dict[str, torch.Tensor]:
    """Our full-layout factors from PEFT tensors; UserError if they cannot be fused back."""
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        m = _PEFT_KEY.match(key)
        if m is None:
            raise UserError(f"adapter tensor {key!r} is not a LoRA factor (base_model.model.<module>.lora_A/B.weight)")
        factors.setdefault(m.group(1), {})[m.group(2)] = value.to(torch.float32)
    fused: dict[str, list[dict[str, torch.Tensor] | None]] = {}
    for hf_module, pair in factors.items():
        if set(pair) != {"A", "B"}:
            raise UserError(f"{hf_module}: the adapter needs both lora_A and lora_B")
        module, position = _mcore_module(hf_module)
        fused.setdefault(module, [None] * len(_hf_modules(module)))[position] = pair
    full = {}
    for module, pairs in fused.items():
        names = ", ".join(_hf_modules(module))
        if any(p is None for p in pairs):
            raise UserError(f"the adapter must have all of {names} or none of them (they are one fused layer here)")
        a = pairs[0]["A"]
        if any(p["A"].shape != a.shape or not torch.equal(p["A"], a) for p in pairs[1:]):
            raise UserError(f"{names} have different lora_A; this server fuses them and needs one shared A")
        b = torch.cat([p["B"] for p in pairs])
        full[f"{module}.lora_A"] = a
        full[f"{module}.lora_B"] = _pad_rows(b, layout.padded_vocab) if module == "output_layer" else b
    return full


def _pad_rows(b: torch.Tensor, rows: int) -> torch.Tensor:
    if b.shape[0] > rows:
        raise UserError(f"lm_head lora_B has {b.shape[0]} rows but the model's vocabulary has {rows}")
    return torch.cat([b, b.new_zeros(rows - b.shape[0], b.shape[1])])


# ---- adapter_config.json ---------------------------------------------------------------------
def adapter_config(lora: dict[str, Any], base_model: str) -> dict[str, Any]:
    """The adapter_config.json peft expects for our LoRA flags ({"rank", "alpha", "train_*"})."""
    targets = sorted(t for flag, names in _GROUP_TARGETS.items() if lora[flag] for t in names)
    alpha = lora["alpha"]
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": lora["rank"], "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "target_modules": targets, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
        "modules_to_save": None,
    }


def lora_flags(config: dict[str, Any]) -> dict[str, Any]:
    """Our LoRA flags from an adapter_config.json; UserError for adapters we cannot serve."""
    if config.get("peft_type", "LORA") != "LORA":
        raise UserError(f"adapter peft_type {config.get('peft_type')!r} is not supported; only LORA")
    for flag in ("use_rslora", "use_dora"):
        if config.get(flag):
            raise UserError(f"adapters with {flag}=true are not supported")
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(rank, int) or rank < 1 or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise UserError(f"adapter_config.json needs a positive integer r and a positive lora_alpha, "
                        f"got {rank!r} and {alpha!r}")
    targets = set(config.get("target_modules") or [])
    flags = {flag: bool(targets & set(names)) for flag, names in _GROUP_TARGETS.items()}
    return {"rank": rank, "alpha": float(alpha), **flags}


# ---- folders ---------------------------------------------------------------------------------
def write_checkpoint(folder: Path, adapter: dict[str, torch.Tensor], config: dict[str, Any],
                     meta: dict[str, Any], optimizer: dict[str, torch.Tensor] | None = None) -> None:
    """Write a whole checkpoint folder, then swap it into place at `folder`."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{uuid.uuid4().hex}"
    try:
        tmp.mkdir()
        save_file(adapter, str(tmp / ADAPTER_FILE))
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        if optimizer is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in optimizer.items()}, str(tmp / OPTIMIZER_FILE))
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
        _swap_in(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _swap_in(tmp: Path, folder: Path) -> None:
    if not folder.exists():
        os.replace(tmp, folder)
        return
    old = folder.parent / f".{folder.name}.old-{uuid.uuid4().hex}"
    os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def read_adapter(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(PEFT tensors, adapter_config) of a checkpoint folder; UserError if unreadable."""
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
        return load_file(str(folder / ADAPTER_FILE)), config
    except (OSError, ValueError, SafetensorError) as e:
        raise UserError(f"checkpoint at {folder.name} cannot be read as a PEFT adapter: {e}") from None


def read_optimizer(folder: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(folder / OPTIMIZER_FILE))
    except (OSError, ValueError, SafetensorError) as e:
        raise UserError(f"checkpoint at {folder.name} has no readable optimizer state: {e}") from None


def read_meta(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / META_FILE).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"checkpoint at {folder.name} has no readable metadata: {e}") from None


@dataclass
class SavedCheckpoint:
    """One version of a checkpoint folder, every file of it from the same save."""

    snapshot_id: str | None  # the save's id (new for every save, overwrites included)
    tensors: dict[str, torch.Tensor]  # PEFT adapter tensors
    config: dict[str, Any]  # adapter_config.json
    optimizer: dict[str, torch.Tensor] | None  # flat AdamW state, when asked for


def read_checkpoint(folder: Path, with_optimizer: bool = False, attempts: int = 3) -> SavedCheckpoint:
    """The checkpoint in `folder`, all of its files from one save. A save with overwrite=True
    swaps a whole new folder in, so a reader could get some files of each; the metadata's
    snapshot_id is read before and after the other files, and the read is repeated when a swap
    came in between. UserError if the folder cannot be read or keeps changing."""
    for attempt in range(attempts):
        try:
            before = read_meta(folder).get("snapshot_id")
            tensors, config = read_adapter(folder)
            optimizer = read_optimizer(folder) if with_optimizer else None
            if read_meta(folder).get("snapshot_id") == before:
                return SavedCheckpoint(before, tensors, config, optimizer)
        except UserError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.05)  # maybe between the two renames of a swap: the folder comes back
    raise UserError(f"checkpoint at {folder.name} was saved over again while it was being read; load it again")

