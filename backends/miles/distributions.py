"""Tensor helpers over next-token distributions, shared by the sampler and prompt scoring.

* `inverse_cdf`: draws from rows of log-probabilities given uniforms, so the caller owns the
  random numbers (per-row CPU generators: reproducible, identical on every TP rank);
* `topk_table`: the k most likely tokens of each row as the dense [n, k] matrices the Tinker
  protocol uses, where an empty cell is token 0 with log-prob -99999.0.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["EMPTY_TOKEN", "EMPTY_LOGPROB", "inverse_cdf", "empty_table", "topk_table"]

EMPTY_TOKEN = 0
EMPTY_LOGPROB = -99999.0


def inverse_cdf(logq: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """logq [n, V] log-probabilities (rows may hold -inf), u [n, m] uniforms in [0, 1)
    (float64, any device) -> [n, m] token ids, each drawn from its row's distribution.
    A token of probability 0 is never picked, even at the rounding edge of the CDF."""
    q = logq.double().exp()
    cdf = q.cumsum(-1)
    pick = torch.searchsorted(cdf, u.to(cdf.device) * cdf[:, -1:], right=True)
    last_positive = q.shape[-1] - 1 - (q > 0).flip(-1).int().argmax(-1)
    return torch.minimum(pick, last_positive[:, None])


def empty_table(n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """An [n, k] top-k table with every cell empty."""
    return np.full((n, k), EMPTY_TOKEN, dtype=np.int32), np.full((n, k), EMPTY_LOGPROB, dtype=np.float32)


def topk_table(logp: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """logp [n, V] -> (token ids int32 [n, k], log-probs float32 [n, k]), most likely first.
    Cells past the vocabulary or holding a -inf log-prob (a filtered-out token) are empty."""
    n, vocab = logp.shape
    ids, lps = empty_table(n, k)
    width = min(k, vocab)
    if n == 0 or width == 0:
        return ids, lps
    vals, top = torch.topk(logp.float(), width, dim=-1)
    finite = torch.isfinite(vals)
    ids[:, :width] = torch.where(finite, top, EMPTY_TOKEN).cpu().numpy()
    lps[:, :width] = torch.where(finite, vals, EMPTY_LOGPROB).cpu().numpy()
    return ids, lps
