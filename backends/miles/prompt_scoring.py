"""What a sampling request asks about its own prompt, read off the prefill's hidden states.

Hidden state at prompt position p (after the final norm) gives the model's next-token
distribution for position p + 1. From it, per request (fields of `SampleSpec`):

* `prompt_logprobs`: log p(prompt[p+1] | prompt[:p+1]) at every position, NaN at position 0
  (nothing predicts it) and, with `prompt_logprobs_last_n = n`, at every position before the
  last n;
* `topk_prompt_logprobs = k`: the k most likely tokens at each of those same positions, as
  [len(prompt), k] matrices (`distributions.topk_table`); rows not scored are empty;
* `target_prompt_ids = (rows, ids)`: the log-prob of token ids[j] at position rows[j] + 1;
* `prompt_alt_tokens_k = k`: k independent draws (with replacement) at every position after
  the first, from the next-token distribution at the request's temperature (no top-k/top-p),
  with the log-prob of each draw under that same distribution: the convention of sampled
  tokens. Temperature 0 repeats the argmax with the model's own log-prob. The uniforms come
  from a generator seeded from the request's seed only, so the same seed gives the same draws.
All other log-probs are the model's own (temperature 1, no filtering).

`first_hidden_needed` says how much of the prompt may be served from a prefix cache without
losing a hidden state these need.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from backends.miles.distributions import empty_table, inverse_cdf, topk_table

if TYPE_CHECKING:
    from backends.miles.sampler import SampleSpec

__all__ = ["PromptScores", "wants_scores", "first_hidden_needed", "score_prompt"]

# Logits are computed for at most this many (position x vocab) cells at a time.
_LOGIT_CELLS = 1 << 23


@dataclass
class PromptScores:
    logprobs: list[float] | None = None  # [P]
    topk: tuple[np.ndarray, np.ndarray] | None = None  # token ids int32 [P, k], log-probs float32 [P, k]
    target_logprobs: np.ndarray | None = None  # float32, one per requested (row, id)
    alt_tokens: tuple[np.ndarray, np.ndarray] | None = None  # token ids int64 [P-1, k], log-probs float32 [P-1, k]


def wants_scores(spec: "SampleSpec") -> bool:
    return bool(spec.prompt_logprobs or spec.topk_prompt_logprobs or spec.target_prompt_ids is not None
                or spec.prompt_alt_tokens_k)


def _first_scored(spec: "SampleSpec") -> int:
    """First prompt position whose logprob and top-k are reported."""
    n = spec.prompt_logprobs_last_n
    return 1 if n is None else max(1, len(spec.prompt) - n)


def first_hidden_needed(spec: "SampleSpec") -> int:
    """The earliest prompt position whose hidden state the request reads. The last position
    is always needed (it predicts the first sampled token)."""
    firsts = [len(spec.prompt) - 1]
    if spec.prompt_logprobs or spec.topk_prompt_logprobs:
        firsts.append(_first_scored(spec) - 1)
    if spec.target_prompt_ids is not None and len(spec.target_prompt_ids[0]):
        firsts.append(int(np.asarray(spec.target_prompt_ids[0]).min()))
    if spec.prompt_alt_tokens_k:
        firsts.append(0)
    return min(firsts)


def _alt_seed(seed: int) -> int:
    digest = hashlib.sha256(f"{int(seed)}:prompt-alt-tokens".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def score_prompt(
    spec: "SampleSpec",
    hidden: torch.Tensor,
    start: int,
    logits_of: Callable[[torch.Tensor], torch.Tensor],
    vocab_size: int,
) -> PromptScores:
    """`hidden` [len(prompt) - start, H] holds positions start.. of the prompt, with
    start <= first_hidden_needed(spec); `logits_of(h [c, H])` -> float32 logits [c, V]."""
    P = len(spec.prompt)
    first = first_hidden_needed(spec)
    if start > first:
        raise ValueError(f"prompt scores need hidden states from position {first}, got them from {start}")
    prompt = torch.tensor(spec.prompt, dtype=torch.long, device=hidden.device)
    out = PromptScores()
    if spec.prompt_logprobs:
        logprobs = np.full(P, np.nan, dtype=np.float32)
    k = spec.topk_prompt_logprobs
    if k:
        out.topk = empty_table(P, k)  # rows of scored positions are filled below
    if spec.target_prompt_ids is not None:
        t_rows, t_ids = (np.asarray(a, dtype=np.int64) for a in spec.target_prompt_ids)
        out.target_logprobs = np.zeros(len(t_rows), dtype=np.float32)
    alt_k = spec.prompt_alt_tokens_k
    if alt_k:
        out.alt_tokens = (np.zeros((P - 1, alt_k), dtype=np.int64), np.zeros((P - 1, alt_k), dtype=np.float32))
        gen = torch.Generator().manual_seed(_alt_seed(spec.seed))
        uniforms = torch.rand((P - 1, alt_k), generator=gen, dtype=torch.float64)

    scored = _first_scored(spec) - 1  # hidden positions from here on give logprobs / top-k
    step = max(1, _LOGIT_CELLS // vocab_size)
    for a in range(first, P - 1, step):
        b = min(P - 1, a + step)  # hidden positions [a, b) predict prompt positions [a+1, b+1)
        logits = logits_of(hidden[a - start : b - start])
        logp = torch.log_softmax(logits, dim=-1)
        lo = max(a, scored)
        if lo < b:
            part = logp[lo - a :]
            if spec.prompt_logprobs:
                logprobs[lo + 1 : b + 1] = part.gather(1, prompt[lo + 1 : b + 1, None])[:, 0].cpu().numpy()
            if k:
                ids, lps = topk_table(part, k)
                out.topk[0][lo + 1 : b + 1], out.topk[1][lo + 1 : b + 1] = ids, lps
        if out.target_logprobs is not None:
            cells = np.flatnonzero((t_rows >= a) & (t_rows < b))
            if cells.size:
                r = torch.as_tensor(t_rows[cells] - a, device=logp.device)
                i = torch.as_tensor(t_ids[cells], device=logp.device)
                out.target_logprobs[cells] = logp[r, i].cpu().numpy()
        if alt_k:
            ids, lps = _alt_draws(logits, logp, uniforms[a:b], spec.temperature)
            out.alt_tokens[0][a:b], out.alt_tokens[1][a:b] = ids, lps
    if spec.prompt_logprobs:
        out.logprobs = logprobs.tolist()
    return out


def _alt_draws(logits, logp, uniforms, temperature) -> tuple[np.ndarray, np.ndarray]:
    """uniforms [c, k] -> (ids [c, k], log-probs [c, k]) drawn at `temperature`."""
    if temperature <= 0:
        top = logp.argmax(-1, keepdim=True).expand(-1, uniforms.shape[1])
        return top.cpu().numpy(), logp.gather(1, top).cpu().numpy()
    logq = torch.log_softmax(logits / temperature, dim=-1)
    ids = inverse_cdf(logq, uniforms)
    return ids.cpu().numpy(), logq.gather(1, ids).float().cpu().numpy()
