"""The logprob options of an `asample` request, checked and turned into worker arguments.

Options (fields of the SDK's SampleRequest): `prompt_logprobs` (+ `prompt_logprobs_last_n`,
which also limits the top-k prompt rows), `topk_prompt_logprobs`, `topk_sample_logprobs`,
`target_prompt_logprobs` (an int64 TensorData [len(prompt) - 1, K], dense or CSR, -1 = no id;
row i is scored at prompt position i + 1) and `prompt_alt_tokens_k`; `record_stability_info`
is accepted. Each logprob table one request asks for may hold at most `MAX_LOGPROB_CELLS`
cells (positions x width, where the sampled positions of all samples count together; for
target ids: prompt length x distinct ids). The workers get the target ids as (rows, ids) of
the cells that name one; `TargetLayout.answer` puts their logprobs back into the request's
shape and layout, 0.0 where it had -1.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.messages import UserError
from handlers.codec import TensorOut
from handlers.common import opt

MAX_LOGPROB_CELLS = 1 << 22


@dataclass
class TargetLayout:
    """Where the scored cells of a `target_prompt_logprobs` request sit, to answer in its layout."""

    shape: list[int]
    size: int  # values in the request: rows x K when dense, nnz when CSR
    named: np.ndarray  # indices of the values that name a token id (not -1)
    csr: tuple[np.ndarray, np.ndarray] | None

    def answer(self, logprobs: np.ndarray) -> TensorOut:
        values = np.zeros(self.size, dtype=np.float32)  # 0.0 where the request had -1
        values[self.named] = logprobs
        return TensorOut(values, self.shape, self.csr)


def _int_list(value: Any, what: str) -> np.ndarray:
    if not isinstance(value, list) or not all(type(v) is int for v in value):
        raise UserError(f"target_prompt_logprobs: {what} must be a list of integers")
    return np.asarray(value, dtype=np.int64)


def _target_cells(td: Any, prompt_len: int, vocab: int) -> tuple[tuple[np.ndarray, np.ndarray], TargetLayout]:
    """((rows, ids) of the cells naming a token, layout) for a `target_prompt_logprobs`
    TensorData: int64 [len(prompt) - 1, K], row i scored at prompt position i + 1, -1 = none."""
    if not isinstance(td, dict) or td.get("dtype") != "int64":
        raise UserError("target_prompt_logprobs must be an int64 TensorData of token ids")
    shape = td.get("shape")
    if not (isinstance(shape, list) and len(shape) == 2 and all(type(d) is int and d >= 0 for d in shape)):
        raise UserError(f"target_prompt_logprobs must be 2-D, [len(prompt) - 1, K], got shape {shape}")
    rows, width = shape
    if rows != prompt_len - 1:
        raise UserError(f"target_prompt_logprobs needs len(prompt) - 1 = {prompt_len - 1} rows, got {rows}")
    values = _int_list(td.get("data"), "data")
    crow, col = td.get("sparse_crow_indices"), td.get("sparse_col_indices")
    if crow is None and col is None:
        if values.size != rows * width:
            raise UserError(f"target_prompt_logprobs: shape {shape} needs {rows * width} values, got {values.size}")
        row_of, csr = np.repeat(np.arange(rows), width), None
    else:
        crow, col = _int_list(crow, "sparse_crow_indices"), _int_list(col, "sparse_col_indices")
        if len(crow) != rows + 1 or crow[0] != 0 or crow[-1] != values.size or np.any(np.diff(crow) < 0):
            raise UserError(f"target_prompt_logprobs: sparse_crow_indices must be {rows + 1} non-decreasing "
                            f"offsets from 0 to {values.size}")
        if len(col) != values.size or np.any((col < 0) | (col >= width)):
            raise UserError(f"target_prompt_logprobs: sparse_col_indices must be {values.size} columns in [0, {width})")
        row_of, csr = np.repeat(np.arange(rows), np.diff(crow)), (crow, col)
    bad = np.flatnonzero((values < -1) | (values >= vocab))
    if bad.size:
        raise UserError(f"target_prompt_logprobs: token id {int(values[bad[0]])} is outside the vocabulary "
                        f"(ids 0..{vocab - 1}, or -1 for none)")
    named = np.flatnonzero(values != -1)
    if named.size == 0:
        raise UserError("target_prompt_logprobs names no token id (every cell is -1)")
    _check_cells("target_prompt_logprobs", prompt_len, len(np.unique(values[named])))
    return (row_of[named], values[named]), TargetLayout(shape, values.size, named, csr)


def _check_cells(name: str, positions: int, width: int) -> None:
    if positions * width > MAX_LOGPROB_CELLS:
        raise UserError(f"{name}: {positions} positions x {width} is more than the {MAX_LOGPROB_CELLS} logprob "
                        "cells one request may ask for")


def _width(body: dict[str, Any], name: str) -> int:
    k = opt(body, name, int, 0)
    if k < 0:
        raise UserError(f"{name} must be 0 or greater, got {k}")
    return k


def logprob_args(body: dict[str, Any], prompt_len: int, sampled_tokens: int,
                 vocab: int) -> tuple[dict[str, Any], TargetLayout | None]:
    """The worker arguments of the logprob options, and the target layout if targets were asked.
    `sampled_tokens`: the most tokens the request can sample (num_samples x max_tokens)."""
    prompt_logprobs = opt(body, "prompt_logprobs", bool, False)
    topk_prompt, topk_sample = _width(body, "topk_prompt_logprobs"), _width(body, "topk_sample_logprobs")
    for name, k in (("topk_prompt_logprobs", topk_prompt), ("topk_sample_logprobs", topk_sample)):
        if k > vocab:
            raise UserError(f"{name} ({k}) is larger than the vocabulary ({vocab} tokens)")
    alt_k = _width(body, "prompt_alt_tokens_k")
    _check_cells("topk_prompt_logprobs", prompt_len, topk_prompt)
    _check_cells("topk_sample_logprobs", sampled_tokens, topk_sample)
    _check_cells("prompt_alt_tokens_k", prompt_len - 1, alt_k)
    last_n = opt(body, "prompt_logprobs_last_n", int, None)
    if last_n is not None and not prompt_logprobs:
        raise UserError("prompt_logprobs_last_n applies to prompt logprobs; set prompt_logprobs "
                        "(include_prompt_logprobs) too")
    if last_n is not None and not 1 <= last_n <= prompt_len - 1:
        raise UserError(f"prompt_logprobs_last_n must be between 1 and len(prompt) - 1 = {prompt_len - 1}, "
                        f"got {last_n}")
    opt(body, "record_stability_info", bool, False)  # accepted: nothing server-side depends on it yet
    target = body.get("target_prompt_logprobs")
    cells, layout = (None, None) if target is None else _target_cells(target, prompt_len, vocab)
    return {
        "prompt_logprobs": prompt_logprobs, "prompt_logprobs_last_n": last_n, "topk_prompt_logprobs": topk_prompt,
        "topk_sample_logprobs": topk_sample, "prompt_alt_tokens_k": alt_k, "target_prompt_ids": cells,
    }, layout
