"""Checks a decoded forward/backward request against its model and the loss's contract.

Everything the workers would otherwise trip over is caught here, with a message naming the
datum, the field and the problem, so a bad request fails alone and early: the loss name,
its `loss_fn_config` (known keys, numbers in range, defaults filled in), each datum's tokens,
and its `loss_fn_inputs` (present, shaped like `target_tokens`, finite). `target_tokens` may
be [N] or, for `cross_entropy` and custom losses, [N, K]. Inputs a loss does not read are
ignored. The result is the packed batch for the workers and the resolved config.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from backends.common.custom_loss import CustomLoss
from backends.common.losses import LOSSES, LossSpec
from engine.batch import pack_datums
from engine.messages import UserError
from handlers.codec import DatumIn, ForwardBackwardIn
from handlers.state import CustomLossStore

SUPPORTED = (*LOSSES, "custom")
UNSUPPORTED = {
    "stable_reinforce": "its objective is not publicly specified, so this server cannot compute it faithfully. "
                        "Use importance_sampling, ppo or cispo instead (e.g. the cookbook's loss_fn option)",
}


def check_tokens(tokens: np.ndarray, vocab_size: int, where: str) -> None:
    bad = np.argwhere((tokens < 0) | (tokens >= vocab_size))
    if bad.size:
        at = tuple(int(x) for x in bad[0])
        raise UserError(f"{where}: token id {int(tokens[at])} at position {at[0] if len(at) == 1 else list(at)} "
                        f"is outside the vocabulary (ids 0..{vocab_size - 1})")


def validate_forward_backward(fb: ForwardBackwardIn, info: dict[str, Any], session_id: str,
                              custom_losses: CustomLossStore) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the packed batch for the workers, the resolved loss_fn_config), or UserError saying what is wrong."""
    if fb.loss_fn in UNSUPPORTED:
        raise UserError(f"loss_fn {fb.loss_fn!r} is not supported: {UNSUPPORTED[fb.loss_fn]}. "
                        f"Supported losses: {list(SUPPORTED)}")
    if fb.loss_fn not in SUPPORTED:
        raise UserError(f"unknown loss_fn {fb.loss_fn!r}; supported losses: {list(SUPPORTED)}")
    if not fb.data:
        raise UserError("forward_backward needs at least one datum")
    if fb.loss_fn == "custom":
        return _custom_batch(fb, info, _custom_loss(fb.loss_fn_config, session_id, custom_losses))
    spec = LOSSES[fb.loss_fn]
    config = _builtin_config(fb.loss_fn, spec, fb.loss_fn_config)
    inputs = [_builtin_inputs(i, d, info, fb.loss_fn, spec) for i, d in enumerate(fb.data)]
    _check_same_width(inputs)
    return pack_datums([d.tokens for d in fb.data], inputs), config


# ---- loss_fn_config ------------------------------------------------------------------------
def _builtin_config(loss_fn: str, spec: LossSpec, raw: dict[str, float | str]) -> dict[str, float]:
    unknown = sorted(set(raw) - set(spec.config))
    if unknown:
        accepted = sorted(spec.config) or "none"
        raise UserError(f"loss_fn_config key(s) {unknown} are not used by {loss_fn!r}; it accepts: {accepted}")
    config = dict(spec.config)
    for key, value in raw.items():
        if isinstance(value, str) or not math.isfinite(value):
            raise UserError(f"loss_fn_config[{key!r}] must be a finite number, got {value!r}")
        config[key] = float(value)
    if "clip_low_threshold" in config:
        low, high = config["clip_low_threshold"], config["clip_high_threshold"]
        if not 0 <= low <= high or high <= 0:
            raise UserError(f"{loss_fn} clip thresholds are absolute bounds on the ratio p/q and need "
                            f"0 <= clip_low_threshold <= clip_high_threshold (and a positive high one); "
                            f"got clip_low_threshold={low}, clip_high_threshold={high}")
    if config.get("beta", 0.0) < 0:
        raise UserError(f"loss_fn_config['beta'] must be >= 0, got {config['beta']}")
    return config


def _custom_loss(raw: dict[str, float | str], session_id: str, custom_losses: CustomLossStore) -> CustomLoss:
    if set(raw) != {"loss_id"} or not isinstance(raw["loss_id"], str):
        raise UserError(f"loss_fn 'custom' needs loss_fn_config {{'loss_id': <text from create_custom_loss>}} "
                        f"and nothing else, got {raw}")
    return custom_losses.find(raw["loss_id"], session_id)


# ---- datums --------------------------------------------------------------------------------
def _check_model_input(i: int, d: DatumIn, info: dict[str, Any]) -> None:
    n = len(d.tokens)
    if n == 0:
        raise UserError(f"datum {i}: model_input has no tokens")
    if n > info["max_context"]:
        raise UserError(f"datum {i}: {n} tokens is longer than the model's maximum context of {info['max_context']}")
    check_tokens(d.tokens, info["vocab_size"], f"datum {i}: model_input")


def _target_tokens(i: int, d: DatumIn, info: dict[str, Any], loss_fn: str, ranks: tuple[int, ...]) -> np.ndarray:
    _check_model_input(i, d, info)
    targets = _required(i, d, loss_fn, "target_tokens")
    if targets.ndim not in ranks:
        shapes = " or ".join(("[N]", "[N, K]")[r - 1] for r in ranks)
        raise UserError(f"datum {i}: loss_fn_inputs['target_tokens'] has shape {list(targets.shape)}; "
                        f"{loss_fn!r} takes {shapes}")
    if targets.shape[0] != len(d.tokens):
        raise UserError(f"datum {i}: loss_fn_inputs['target_tokens'] has {targets.shape[0]} rows but model_input "
                        f"has {len(d.tokens)} tokens; they must be equal (position t predicts target t)")
    if targets.size == 0:
        raise UserError(f"datum {i}: loss_fn_inputs['target_tokens'] has shape {list(targets.shape)}: K must be >= 1")
    check_tokens(targets, info["vocab_size"], f"datum {i}: target_tokens")
    return targets.astype(np.int64)


def _required(i: int, d: DatumIn, loss_fn: str, name: str) -> np.ndarray:
    arr = d.loss_fn_inputs.get(name)
    if arr is None:
        raise UserError(f"datum {i}: loss_fn {loss_fn!r} needs loss_fn_inputs[{name!r}]")
    return arr


def _extent(arr: np.ndarray) -> str:
    return f"{arr.shape[0]} entries" if arr.ndim == 1 else f"shape {list(arr.shape)}"


def _finite(i: int, name: str, arr: np.ndarray) -> np.ndarray:
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        raise UserError(f"datum {i}: loss_fn_inputs[{name!r}] contains NaN or infinity")
    return arr


def _builtin_inputs(i: int, d: DatumIn, info: dict[str, Any], loss_fn: str, spec: LossSpec) -> dict[str, np.ndarray]:
    targets = _target_tokens(i, d, info, loss_fn, (1, 2) if spec.top_k else (1,))
    picked = {"target_tokens": targets}
    for name in spec.inputs:
        arr = _required(i, d, loss_fn, name)
        if arr.shape != targets.shape:
            raise UserError(f"datum {i}: loss_fn_inputs[{name!r}] has {_extent(arr)} but target_tokens has "
                            f"{_extent(targets)}; {loss_fn!r} needs them shaped alike")
        picked[name] = _finite(i, name, arr).astype(np.float32)
    if "sequence_ratio_mask" in picked and not np.any(picked["sequence_ratio_mask"]):
        raise UserError(f"datum {i}: loss_fn_inputs['sequence_ratio_mask'] marks no token; gspo's sequence "
                        "ratio is the mean log-ratio over the marked tokens, so at least one must be non-zero")
    return picked


def _check_same_width(inputs: list[dict[str, np.ndarray]]) -> None:
    widths = [inp["target_tokens"].shape[1:] for inp in inputs]
    for i, width in enumerate(widths):
        if width != widths[0]:
            raise UserError(f"datum {i}: target_tokens has {list(width) or 'no'} columns but datum 0 has "
                            f"{list(widths[0]) or 'no'}; all datums of one request need the same K")


def _custom_batch(fb: ForwardBackwardIn, info: dict[str, Any],
                  loss: CustomLoss) -> tuple[dict[str, Any], dict[str, Any]]:
    logprobs_rank = loss.inputs[0][1]
    targets = [{"target_tokens": _target_tokens(i, d, info, "custom", (logprobs_rank,))} for i, d in enumerate(fb.data)]
    _check_same_width(targets)
    batch = pack_datums([d.tokens for d in fb.data], targets)
    batch["datum_inputs"] = [
        {name: _custom_input(i, d, loss, name, rank) for name, rank in loss.inputs[1:]} for i, d in enumerate(fb.data)]
    return batch, loss.wire


def _custom_input(i: int, d: DatumIn, loss: CustomLoss, name: str, rank: int) -> np.ndarray:
    arr = _required(i, d, f"custom ({loss.name})", name)
    if rank == 0 and arr.size == 1:  # the wire cannot tell shape [] from an omitted shape
        arr = arr.reshape(())
    if arr.ndim != rank:
        raise UserError(f"datum {i}: loss_fn_inputs[{name!r}] has shape {list(arr.shape)}, but custom loss "
                        f"{loss.name!r} declared it with rank {rank}")
    return _finite(i, name, arr)
