"""Tinker's built-in losses, one implementation for every backend.

Pure functions of the learner's log-probs `lp` of each target token (this forward pass, no
temperature) and one datum's `loss_fn_inputs`; each returns the per-token loss, shaped like
`lp`. Every loss is a SUM over tokens and datums, never a mean: the SDK's custom-loss path
and split batches rely on it. Notation: q = loss_fn_inputs["logprobs"] (the sampler's
log-probs), A = loss_fn_inputs["advantages"], r = exp(lp - q), sg = stop-gradient,
clip(x) = clamp(x, clip_low_threshold, clip_high_threshold) (absolute ratio bounds).

- cross_entropy        sum(-lp * weights); `target_tokens`/`weights` may be [N] or [N, K]
                       (top-K: K targets per position). Docs: tinker-cookbook docs/losses.mdx.
- importance_sampling  sum(-r * A); no clipping, no KL term. Docs: docs/losses.mdx.
- ppo                  sum(-min(r * A, clip(r) * A)). Defaults 0.8 / 1.2: "epsilon_low and
                       epsilon_high ... currently fixed to 0.2 in Tinker"
                       (tinker-docs.thinkingmachines.ai/tinker/losses/ppo).
- cispo                sum(-sg(clip(r)) * lp * A). Defaults 0.0 / 4.0, the one-sided clip:
                       "CISPO defaults to disabling the lower bound and only capping the upper
                       side (clip_low_threshold=0.0, clip_high_threshold=4.0)"
                       (tinker-docs.thinkingmachines.ai/tinker/losses/cispo).
- dro                  sum(-(lp * A - beta / 2 * (lp - q)^2)) (tinker-docs .../losses/dro).
                       The docs give no default beta; ours is 0.05, the docs' own example value.
- gspo                 GSPO-token (tinker-docs .../losses/gspo): over the tokens M where
                       `sequence_ratio_mask` != 0, s = exp(mean_M(sg(lp) - q)); every token's
                       ratio has s's value and its own gradient, s_t = s * exp(lp - sg(lp));
                       loss sum_t(-min(s_t * A, clip(s_t) * A)) over ALL tokens. The docs give
                       no default thresholds; ours are PPO's 0.8 / 1.2.

`stable_reinforce` is not here: its objective is not publicly specified.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from backends.common.custom_loss import CustomLoss

Tensor = torch.Tensor
PerTokenLoss = Callable[[Tensor, dict[str, Tensor], dict[str, float]], Tensor]


def _clip(ratio: Tensor, config: dict[str, float]) -> Tensor:
    return ratio.clamp(config["clip_low_threshold"], config["clip_high_threshold"])


def _sampler_ratio(lp: Tensor, inputs: dict[str, Tensor]) -> Tensor:
    return torch.exp(lp - inputs["logprobs"].to(lp.dtype))


def _clipped_objective(ratio: Tensor, advantages: Tensor, config: dict[str, float]) -> Tensor:
    return -torch.minimum(ratio * advantages, _clip(ratio, config) * advantages)


def cross_entropy(lp: Tensor, inputs: dict[str, Tensor], config: dict[str, float]) -> Tensor:
    return -lp * inputs["weights"].to(lp.dtype)


def importance_sampling(lp: Tensor, inputs: dict[str, Tensor], config: dict[str, float]) -> Tensor:
    return -_sampler_ratio(lp, inputs) * inputs["advantages"].to(lp.dtype)


def ppo(lp: Tensor, inputs: dict[str, Tensor], config: dict[str, float]) -> Tensor:
    return _clipped_objective(_sampler_ratio(lp, inputs), inputs["advantages"].to(lp.dtype), config)


def cispo(lp: Tensor, inputs: dict[str, Tensor], config: dict[str, float]) -> Tensor:
    coefficient = _clip(_sampler_ratio(lp, inputs), config).detach()
    return -coefficient * lp * inputs["advantages"].to(lp.dtype)


def dro(lp: Tensor, inputs: dict[str, Tensor], config: dict[str, float]) -> Tensor:
    drift = lp - inputs["logprobs"].to(lp.dtype)
    return -(lp * inputs["advantages"].to(lp.dtype) - 0.5 * config["beta"] * drift.square())


def gspo(lp: Tensor, inputs: dict[str, Tensor], config: dict[str, float]) -> Tensor:
    in_ratio = inputs["sequence_ratio_mask"] != 0
    sequence_log_ratio = (lp.detach() - inputs["logprobs"].to(lp.dtype))[in_ratio].mean()
    ratio = torch.exp(sequence_log_ratio + lp - lp.detach())
    return _clipped_objective(ratio, inputs["advantages"].to(lp.dtype), config)


@dataclass(frozen=True)
class LossSpec:
    """A built-in loss and its contract with the caller."""

    per_token: PerTokenLoss
    inputs: tuple[str, ...]  # loss_fn_inputs besides target_tokens, each shaped like it
    config: dict[str, float] = field(default_factory=dict)  # accepted loss_fn_config keys -> defaults
    top_k: bool = False  # accepts [N, K] target_tokens


CLIP_KEYS = ("clip_low_threshold", "clip_high_threshold")
LOSSES: dict[str, LossSpec] = {
    "cross_entropy": LossSpec(cross_entropy, ("weights",), top_k=True),
    "importance_sampling": LossSpec(importance_sampling, ("logprobs", "advantages")),
    "ppo": LossSpec(ppo, ("logprobs", "advantages"), dict(zip(CLIP_KEYS, (0.8, 1.2)))),
    "cispo": LossSpec(cispo, ("logprobs", "advantages"), dict(zip(CLIP_KEYS, (0.0, 4.0)))),
    "dro": LossSpec(dro, ("logprobs", "advantages"), {"beta": 0.05}),
    "gspo": LossSpec(gspo, ("logprobs", "advantages", "sequence_ratio_mask"), dict(zip(CLIP_KEYS, (0.8, 1.2)))),
}


def compute_loss(loss_fn: str, logprobs: list[Tensor], inputs: list[dict[str, Tensor]],
                 config: dict) -> tuple[Tensor, list[Tensor] | None, dict[str, float]]:
    """(total loss to backpropagate, per-datum elementwise losses or None, metrics `name:reduction`).

    `loss_fn` "custom" runs the uploaded graph in `config` (see `custom_loss`), which has no
    per-token losses; built-in losses take missing config keys from their defaults.
    """
    if loss_fn == "custom":
        total, metrics = CustomLoss.from_wire(config).run(logprobs, inputs)
        return total, None, {**metrics, "loss:sum": float(total.detach())}
    spec = LOSSES[loss_fn]
    resolved = {**spec.config, **config}
    elementwise = [spec.per_token(lp, inp, resolved) for lp, inp in zip(logprobs, inputs)]
    total = torch.stack([e.sum() for e in elementwise]).sum()
    return total, elementwise, {"loss:sum": float(total.detach())}
