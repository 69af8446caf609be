"""The packed batch: how a list of datums travels to the workers as a few flat arrays.

One shared-memory segment (and file descriptor) per array instead of one per datum: all
tokens concatenated, their lengths, and each loss input concatenated along its first axis.
Results come back the same way (`pack_outputs`).
"""
from __future__ import annotations

from typing import Any

import numpy as np


def pack_datums(tokens: list[np.ndarray], inputs: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    names = sorted(inputs[0]) if inputs else []
    return {
        "tokens": np.concatenate(tokens).astype(np.int64) if tokens else np.zeros(0, np.int64),
        "lengths": np.array([len(t) for t in tokens], dtype=np.int64),
        "inputs": {n: np.concatenate([d[n] for d in inputs]) for n in names},
    }


def pack_outputs(outputs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-datum result arrays (same field names in every datum) as one array per field."""
    names = sorted(outputs[0]) if outputs else []
    return {
        "lengths": np.array([len(o[names[0]]) for o in outputs] if names else [], dtype=np.int64),
        "fields": {n: np.concatenate([np.asarray(o[n]) for o in outputs]) for n in names},
    }


def unpack_outputs(packed: dict[str, Any]) -> list[dict[str, np.ndarray]]:
    bounds = [int(b) for b in np.cumsum([0, *packed["lengths"]])]
    return [{n: v[bounds[i]:bounds[i + 1]] for n, v in packed["fields"].items()} for i in range(len(bounds) - 1)]


def unpack_datums(batch: dict[str, Any]) -> tuple[list[Any], list[dict[str, Any]]]:
    """Inverse of `pack_datums` (works on numpy arrays and torch tensors alike)."""
    lengths = [int(n) for n in batch["lengths"]]
    bounds = [int(b) for b in np.cumsum([0, *lengths])]
    tokens = [batch["tokens"][bounds[i]:bounds[i + 1]] for i in range(len(lengths))]
    inputs = [{n: v[bounds[i]:bounds[i + 1]] for n, v in batch["inputs"].items()} for i in range(len(lengths))]
    return tokens, inputs
