"""Tinker's built-in losses, one implementation for every backend.

Pure functions of the learner's per-token log-probs `lp` (this forward pass, no
temperature) and the datum's `loss_fn_inputs`. Every loss is a SUM over tokens and datums,
never a mean: the SDK's custom-loss path and split batches rely on it.

- cross_entropy:        sum(-lp * weights)
- importance_sampling:  sum(-exp(lp - q) * advantages), q = loss_fn_inputs["logprobs"]
                        (the sampler's log-probs); no clipping, no KL term.
"""
from __future__ import annotations

from typing import Callable

import torch

Tensor = torch.Tensor


def cross_entropy(lp: Tensor, inputs: dict[str, Tensor], config: dict) -> Tensor:
    return -lp * inputs["weights"].to(lp.dtype)


def importance_sampling(lp: Tensor, inputs: dict[str, Tensor], config: dict) -> Tensor:
    ratio = torch.exp(lp - inputs["logprobs"].to(lp.dtype))
    return -ratio * inputs["advantages"].to(lp.dtype)


# loss_fn name -> per-token loss (same shape as lp)
LOSSES: dict[str, Callable[[Tensor, dict[str, Tensor], dict], Tensor]] = {
    "cross_entropy": cross_entropy,
    "importance_sampling": importance_sampling,
}


def compute_loss(loss_fn: str, logprobs: list[Tensor], inputs: list[dict[str, Tensor]],
                 config: dict) -> tuple[Tensor, list[Tensor], dict[str, float]]:
    """(total loss to backpropagate, per-datum elementwise losses, metrics `name:reduction`)."""
    per_token = LOSSES[loss_fn]
    elementwise = [per_token(lp, inp, config) for lp, inp in zip(logprobs, inputs)]
    total = torch.stack([e.sum() for e in elementwise]).sum()
    return total, elementwise, {"loss:sum": float(total.detach())}
