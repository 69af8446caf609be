"""Merges a LoRA checkpoint into its base model: a plain Hugging Face checkpoint that needs no PEFT.

    python scripts/export_merged.py CHECKPOINT_DIR BASE_MODEL_DIR OUT_DIR

CHECKPOINT_DIR is a PEFT adapter folder (`adapter_model.safetensors` + `adapter_config.json`),
as the server writes under `<data_dir>/checkpoints/` or `tinker checkpoint download`
fetches. Every weight the adapter targets becomes W + scale * B @ A (scale = lora_alpha / r,
or lora_alpha / sqrt(r) for rsLoRA), computed in float32 and stored in the base weight's
dtype; every other file of BASE_MODEL_DIR (config, tokenizer, generation config) is copied.
If the base model ties lm_head to the embeddings and the adapter changes lm_head, the output
unties them. OUT_DIR must not exist yet; it appears only once complete.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ADAPTER_FILE, CONFIG_FILE = "adapter_model.safetensors", "adapter_config.json"
INDEX_FILE = "model.safetensors.index.json"
_FACTOR = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])\.weight$")
TIED_SOURCE, TIED_TARGET = "model.embed_tokens.weight", "lm_head.weight"


def lora_deltas(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    """Base weight name -> the float32 update the adapter adds to it."""
    config = json.loads((checkpoint_dir / CONFIG_FILE).read_text())
    if config.get("peft_type", "LORA") != "LORA" or config.get("use_dora"):
        raise ValueError("only plain LoRA adapters can be merged (peft_type LORA, use_dora false)")
    rank = config["r"]
    scale = config["lora_alpha"] / (math.sqrt(rank) if config.get("use_rslora") else rank)
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in load_file(str(checkpoint_dir / ADAPTER_FILE)).items():
        m = _FACTOR.match(key)
        if m is None:
            raise ValueError(f"{key!r} is not a LoRA factor (base_model.model.<module>.lora_A/B.weight)")
        factors.setdefault(m.group(1), {})[m.group(2)] = value.to(torch.float32)
    deltas = {}
    for module, pair in factors.items():
        if set(pair) != {"A", "B"}:
            raise ValueError(f"{module} has only lora_{''.join(pair)}")
        deltas[f"{module}.weight"] = scale * (pair["B"] @ pair["A"])
    return deltas


def merge_tensors(tensors: dict[str, torch.Tensor], deltas: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tensors` with every delta that names one of them added (the deltas used are popped)."""
    merged = dict(tensors)
    for name in [n for n in deltas if n in tensors]:
        base, delta = tensors[name], deltas.pop(name)
        if base.shape != delta.shape:
            raise ValueError(f"{name}: the adapter's update has shape {tuple(delta.shape)}, "
                             f"the base weight {tuple(base.shape)}")
        merged[name] = (base.to(torch.float32) + delta).to(base.dtype).contiguous()
    return merged


def export_merged(checkpoint_dir: Path, base_dir: Path, out_dir: Path) -> None:
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists; choose a new output folder")
    deltas = lora_deltas(checkpoint_dir)
    config = json.loads((base_dir / "config.json").read_text())
    untie = TIED_TARGET in deltas and bool(config.get("tie_word_embeddings"))
    files = sorted(p.name for p in base_dir.glob("*.safetensors"))
    index = json.loads((base_dir / INDEX_FILE).read_text()) if (base_dir / INDEX_FILE).exists() else None
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for item in base_dir.iterdir():
            if item.is_file() and not item.name.endswith(".safetensors") and item.name != INDEX_FILE:
                shutil.copy2(item, tmp / item.name)
        for file in files:
            tensors = load_file(str(base_dir / file))
            if untie and TIED_SOURCE in tensors:
                tensors[TIED_TARGET] = tensors[TIED_SOURCE].clone()
                if index is not None:
                    index["weight_map"][TIED_TARGET] = file
            save_file(merge_tensors(tensors, deltas), str(tmp / file), metadata={"format": "pt"})
        if deltas:
            raise ValueError(f"the adapter changes weights the base model does not have: {sorted(deltas)}")
        if index is not None:
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2))
        if untie:
            (tmp / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}, indent=2))
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint_dir", type=Path,
                        help="PEFT adapter folder (adapter_model.safetensors + adapter_config.json)")
    parser.add_argument("base_model_dir", type=Path, help="the base model's Hugging Face checkpoint folder")
    parser.add_argument("out_dir", type=Path, help="where to write the merged checkpoint (must not exist)")
    args = parser.parse_args(argv)
    try:
        export_merged(args.checkpoint_dir, args.base_model_dir, args.out_dir)
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
