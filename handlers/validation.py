"""Checks a decoded forward/backward request against its model and the loss's contract.

Everything the workers would otherwise trip over is caught here, with a message naming the
datum, the field and the limit, so a bad request fails alone and early.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from engine.batch import pack_datums
from engine.messages import UserError
from handlers.codec import ForwardBackwardIn

# loss_fn -> the loss_fn_inputs it needs (each shaped like target_tokens)
LOSS_INPUTS: dict[str, tuple[str, ...]] = {
    "cross_entropy": ("target_tokens", "weights"),
    "importance_sampling": ("target_tokens", "logprobs", "advantages"),
}


def check_tokens(tokens: np.ndarray, vocab_size: int, where: str) -> None:
    bad = np.flatnonzero((tokens < 0) | (tokens >= vocab_size))
    if bad.size:
        raise UserError(f"{where}: token id {int(tokens[bad[0]])} at position {int(bad[0])} is outside "
                        f"the vocabulary (ids 0..{vocab_size - 1})")


def validate_forward_backward(fb: ForwardBackwardIn, info: dict[str, Any]) -> dict[str, Any]:
    """The packed batch for the workers, or UserError saying what is wrong."""
    if fb.loss_fn not in LOSS_INPUTS:
        raise UserError(f"unknown loss_fn {fb.loss_fn!r}; this server supports {sorted(LOSS_INPUTS)}")
    if not fb.data:
        raise UserError("forward_backward needs at least one datum")
    needed = LOSS_INPUTS[fb.loss_fn]
    tokens, inputs = [], []
    for i, d in enumerate(fb.data):
        n = len(d.tokens)
        if n == 0:
            raise UserError(f"datum {i}: model_input has no tokens")
        if n > info["max_context"]:
            raise UserError(f"datum {i}: {n} tokens is longer than the model's maximum context of {info['max_context']}")
        check_tokens(d.tokens, info["vocab_size"], f"datum {i}: model_input")
        picked = {}
        for name in needed:
            arr = d.loss_fn_inputs.get(name)
            if arr is None:
                raise UserError(f"datum {i}: loss_fn {fb.loss_fn!r} needs loss_fn_inputs[{name!r}]")
            if arr.ndim != 1:
                raise UserError(f"datum {i}: loss_fn_inputs[{name!r}] has shape {list(arr.shape)}; "
                                "only [N] inputs are supported (top-K [N, K] targets are not yet)")
            if arr.shape[0] != n:
                raise UserError(f"datum {i}: loss_fn_inputs[{name!r}] has {arr.shape[0]} entries but model_input "
                                f"has {n} tokens; they must be equal (position t predicts target t)")
            if name == "target_tokens":
                check_tokens(arr, info["vocab_size"], f"datum {i}: target_tokens")
                picked[name] = arr.astype(np.int64)
            else:
                if not np.all(np.isfinite(arr)):
                    raise UserError(f"datum {i}: loss_fn_inputs[{name!r}] contains NaN or infinity")
                picked[name] = arr.astype(np.float32)
        tokens.append(d.tokens)
        inputs.append(picked)
    return pack_datums(tokens, inputs)
