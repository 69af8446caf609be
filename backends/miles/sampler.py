"""Token generation from a megatron-core GPTModel with a KV cache, many requests batched together.

This module's one job: given a (possibly LoRA-wrapped, tensor- or pipeline-parallel) mcore
`GPTModel` and a list of `SampleSpec`s, produce the sampled tokens, their logprobs and,
on request, top-k tables and scores of the prompt, reusing K/V of earlier prompts from a
prefix cache when given one. It walks the model's own submodules (embedding, each
layer's norms / `linear_qkv` / `linear_proj` / `mlp`, final norm, output layer) instead of
calling `model.forward`, so each decode step costs one token per row, not a recompute of
the whole sequence. LoRA wrappers that replace those linear modules in place are picked up
automatically; the caller's `route` context tells them which adapter each batch row uses.

How a batch runs (per chunk of at most `max_batch_rows` rows; a row is one sample):
  * prompts are left-padded to the chunk's longest prompt; each row has its own position
    ids (0 at its first real token) and an attention mask that hides its padding;
  * each distinct prompt of the chunk is prefilled once (the `num_samples` rows of a spec
    share it), its K/V is copied into a preallocated per-layer cache for every row;
  * then one token per step is decoded for the rows still running; finished rows are
    dropped from the batch.
Every row honours its own spec (max_tokens, stops, temperature, top-k/top-p, seed).

Sampling and the returned logprobs
  * temperature == 0: greedy (argmax). The logprob returned is the model's own
    log-softmax (temperature 1, no filtering) at that token.
  * otherwise the logits are divided by the temperature, top-k then top-p (nucleus, at
    least one token kept) filtering is applied, the result renormalised, and the token is
    drawn from that distribution. The logprob returned is the log-probability of the token
    under exactly that distribution (after temperature and top-k/top-p renormalisation),
    i.e. the distribution it was actually drawn from. With temperature 1 and no filtering
    it equals the model's log-softmax.
  * each row draws from its own `torch.Generator`, seeded from (spec.seed, sample index),
    one uniform per sampled token (inverse-CDF draw), so a row's tokens do not depend on
    what else is in the batch, and every TP rank (which sees the same gathered logits)
    draws the same tokens.
  * `topk_sample_logprobs = k`: per sampled token, the k most likely tokens of the
    distribution it was drawn from (so the sampled token's own logprob matches its cell);
    tokens filtered out by top-k/top-p are empty cells (token 0, log-prob -99999.0).
  * prompt logprobs, top-k prompt logprobs, target-token logprobs and alternative-token draws
    are read off the prefill's hidden states by `prompt_scoring` (see there).

Prefix cache: with a `PrefixCache`, each distinct prompt first looks up the longest prefix
already computed under the same adapter (a previous prompt, or a previous prompt plus its
sampled tokens) and copies that K/V instead of recomputing it; only the rest of the prompt is
prefilled. Never more is reused than the prompt scores allow (a position whose hidden state
they read must be computed) and never the last prompt token (its logits start sampling).
The count reused is reported per spec as `prompt_cache_hit_tokens`. Rows that reuse the
cache are prefilled over a right-aligned window of the chunk, their cached columns kept
as is; after sampling, every row's prompt + sampled tokens go back into the cache.
Results agree with a full prefill up to float rounding (the same tokens; fp32 logprobs
within ~1e-5).

Stops: a sampled token in `stop_token_ids` ends the row (token kept, "stop"); after each
token, if `decode(generated)` contains a stop string, the row ends there (token kept,
"stop"); reaching `max_tokens`, or the model's `max_sequence_length`, gives "length".
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import weakref
from dataclasses import dataclass, field
from typing import Callable, ContextManager

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from backends.miles import packed_weights
from backends.miles.distributions import empty_table, inverse_cdf, topk_table
from backends.miles.prefix_cache import PrefixCache
from backends.miles.prompt_scoring import PromptScores, first_hidden_needed, score_prompt, wants_scores

__all__ = ["SampleSpec", "SampledSeq", "SampleResult", "generate"]

# Prefill is run in sub-batches of at most this many (padded) tokens, to bound the memory
# of activations and attention scores; the KV cache itself is allocated per chunk.
_PREFILL_TOKENS = 16384


@dataclass
class SampleSpec:
    prompt: list[int]
    num_samples: int = 1
    max_tokens: int = 16
    temperature: float = 1.0  # 0 => greedy
    top_k: int = -1  # -1 (or 0) => no limit
    top_p: float = 1.0
    stop_token_ids: tuple[int, ...] = ()  # the caller resolves EOS defaults; () => never stop on a token
    stop_strings: tuple[str, ...] = ()
    seed: int = 0  # the server always fills it, so every TP rank draws the same tokens
    prompt_logprobs: bool = False
    adapter: str | None = None  # LoRA adapter for these rows (routing done by `route`)
    prompt_logprobs_last_n: int | None = None  # score only the last n prompt positions (logprobs, top-k)
    topk_prompt_logprobs: int = 0
    topk_sample_logprobs: int = 0
    target_prompt_ids: tuple[np.ndarray, np.ndarray] | None = None  # (rows, ids): ids[j] at position rows[j]+1
    prompt_alt_tokens_k: int = 0


@dataclass
class SampledSeq:
    tokens: list[int]
    logprobs: list[float]
    stop_reason: str  # "stop" | "length"
    topk_logprobs: tuple[np.ndarray, np.ndarray] | None = None  # token ids int32 [n, k], log-probs float32 [n, k]


@dataclass
class SampleResult:
    sequences: list[SampledSeq]  # num_samples of them
    prompt_logprobs: list[float] | None  # len(prompt), NaN at 0 (and before the last n), when asked
    topk_prompt_logprobs: tuple[np.ndarray, np.ndarray] | None = None  # [len(prompt), k] each
    target_prompt_logprobs: np.ndarray | None = None  # float32, one per (row, id) of target_prompt_ids
    prompt_alt_tokens: tuple[np.ndarray, np.ndarray] | None = None  # [len(prompt) - 1, k] each
    prompt_cache_hit_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache


def _row_seed(seed: int, sample_index: int) -> int:
    """A 63-bit generator seed from (spec seed, sample index), identical on every process."""
    digest = hashlib.sha256(f"{int(seed)}:{int(sample_index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass
class _Row:
    spec_idx: int
    sample_idx: int
    spec: SampleSpec
    budget: int  # max new tokens for this row (max_tokens capped by the context length)
    gen: torch.Generator
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    topk_ids: list[np.ndarray] = field(default_factory=list)  # one [k] row per token, when asked
    topk_lps: list[np.ndarray] = field(default_factory=list)
    stop_reason: str | None = None

    def topk_logprobs(self) -> tuple[np.ndarray, np.ndarray] | None:
        k = self.spec.topk_sample_logprobs
        if not k:
            return None
        if not self.tokens:
            return empty_table(0, k)
        return np.stack(self.topk_ids), np.stack(self.topk_lps)


def _unwrap(model):
    """Strip DDP / Float16Module style wrappers down to the GPTModel."""
    while not hasattr(model, "decoder") and hasattr(model, "module"):
        model = model.module
    return model


class _Runner:
    """The model walk: prefill and decode over a per-layer KV cache ([b, groups, L, head_dim])."""

    def __init__(self, model):
        from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
        from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

        self.model = model
        self.cfg = cfg = model.config
        self._apply_rope = apply_rotary_pos_emb
        self._gather = gather_from_tensor_model_parallel_region
        if getattr(model, "position_embedding_type", "rope") not in ("rope", "learned_absolute", "none"):
            raise NotImplementedError(f"sampler: position embedding {model.position_embedding_type!r}")
        if getattr(cfg, "multi_latent_attention", False):
            raise NotImplementedError("sampler: multi-latent attention is not supported")
        if getattr(cfg, "window_size", None) is not None:
            raise NotImplementedError("sampler: sliding-window attention is not supported")
        if getattr(cfg, "sequence_parallel", False):
            raise NotImplementedError("sampler: sequence parallel is not supported")
        if getattr(cfg, "context_parallel_size", 1) != 1:
            raise NotImplementedError("sampler: context parallel is not supported")
        self.layers = list(model.decoder.layers)
        self.final_norm = getattr(model.decoder, "final_layernorm", None)
        head_dim = self.layers[0].self_attention.hidden_size_per_attention_head if self.layers else 1
        # mcore's DotProductAttention: softmax_scale, else 1/sqrt(head_dim) (query-key layer
        # scaling divides and multiplies back by the layer number, a no-op overall).
        self.scale = cfg.softmax_scale if getattr(cfg, "softmax_scale", None) else 1.0 / math.sqrt(head_dim)
        self.output_gate = bool(getattr(cfg, "attention_output_gate", False))
        self.max_len = int(getattr(model, "max_sequence_length", 1 << 30))
        self.vocab_size = int(getattr(model, "unpadded_vocab_size", model.vocab_size))
        self.use_rope = getattr(model, "position_embedding_type", "rope") == "rope"
        self.rope_table = None
        if self.use_rope:
            from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
                _yarn_get_concentration_factor_from_config,
            )

            self.mscale = _yarn_get_concentration_factor_from_config(cfg)
            # [max_len, 1, 1, rot_dim] -> [max_len, rot_dim]; indexed by per-row positions.
            self.rope_table = model.rotary_pos_emb(self.max_len)[:, 0, 0, :]
            self.interleaved = bool(getattr(cfg, "rotary_interleaved", False))
            self.rope_fused = bool(getattr(cfg, "apply_rope_fusion", False))
        attn = self.layers[0].self_attention if self.layers else None
        pgc = getattr(attn, "pg_collection", None)
        self.cp_group = getattr(pgc, "cp", None)
        self.stages = _Stages()
        self.out_weight = (
            model.shared_embedding_or_output_weight()
            if model.share_embeddings_and_output_weights and self.stages.last else None
        )
        self.gather_output = self.stages.last and bool(getattr(model.output_layer, "gather_output", False))
        weight = model.embedding.word_embeddings.weight if self.stages.first else next(model.parameters())
        # the activations' dtype; not any parameter's (a later stage's first one may be a norm weight)
        self.device, self.dtype = weight.device, getattr(model.config, "params_dtype", weight.dtype)
        if self.use_rope and not self.rope_fused:
            self.rope_cos, self.rope_sin = _rope_cos_sin(model, self.rope_table, self.mscale, self.dtype)

    # -- pieces --------------------------------------------------------------------------
    def _rope_at(self, pos: torch.Tensor):
        """What `_rope` needs for positions `pos` [s, b]: (cos, sin) [s, b, 1, rot_dim], or the
        angles themselves when megatron-core's fused RoPE is configured."""
        if self.rope_fused:
            return self.rope_table[pos].unsqueeze(2)
        return self.rope_cos[pos].unsqueeze(2), self.rope_sin[pos].unsqueeze(2)

    def _rope(self, t: torch.Tensor, at) -> torch.Tensor:
        """t [s, b, heads, d] rotated at each row's own positions (`at` from `_rope_at`)."""
        if self.rope_fused:
            kw = {"config": self.cfg, "mscale": self.mscale}
            if self.cp_group is not None:
                kw["cp_group"] = self.cp_group
            return self._apply_rope(t, at, **kw)
        cos, sin = at
        rot = cos.shape[-1]
        t, rest = t[..., :rot], t[..., rot:]
        if self.interleaved:
            x1, x2 = t[..., ::2], t[..., 1::2]
            half = torch.stack((-x2, x1), dim=-1).flatten(-2)
        else:
            x1, x2 = torch.chunk(t, 2, dim=-1)
            half = torch.cat((-x2, x1), dim=-1)
        t = (t * cos) + (half * sin)
        return torch.cat((t, rest), dim=-1) if rest.shape[-1] else t

    def _qkv(self, attn, x):
        if self.output_gate:
            q, k, v, gate = attn.get_query_key_value_tensors(x, None, output_gate=True)
        else:
            q, k, v = attn.get_query_key_value_tensors(x, None)
            gate = None
        return q, k, v, gate

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """h [s, b, H] (after the final norm) -> full-vocab float32 logits [s, b, V] on every rank
        (the last pipeline stage computes them and sends them to the other stages, whose `h`
        only gives the shape)."""
        if not self.stages.last:
            return self.stages.from_last(torch.empty(*h.shape[:2], self.vocab_size, device=self.device))
        logits, _ = self.model.output_layer(h, weight=self.out_weight)
        if not self.gather_output:
            logits = self._gather(logits)
        real = getattr(self.model, "unpadded_vocab_size", None)  # rows added only to divide by tp
        if real is not None and real < logits.shape[-1]:
            logits = logits[..., :real]
        return self.stages.from_last(logits.float().contiguous())

    def row_logits(self, h: torch.Tensor) -> torch.Tensor:
        """h [c, H] (one row's positions) -> float32 logits [c, V]."""
        return self._logits(h[:, None, :])[:, 0]

    def forward(self, tokens, pos, caches, col0, key_ok, fixed=None):
        """Run `tokens` [b, s] (positions `pos` [b, s]) whose K/V go to cache columns
        [col0, col0+s). `key_ok` [b, s, col0+s] says which cache columns each query sees;
        `fixed` [b, s], if given, marks columns whose K/V the cache already holds (from the
        prefix cache): those keep their cached K/V. Returns the hidden states after the
        final norm, [s, b, H]."""
        s = tokens.shape[1]
        if self.stages.first:
            h = self.model.embedding(input_ids=tokens, position_ids=pos)  # [s, b, H]
        else:
            h = self.stages.from_previous((s, tokens.shape[0], self.cfg.hidden_size), self.dtype, self.device)
        rope_at = self._rope_at(pos.t()) if self.use_rope else None
        mask = None  # SDPA turns a boolean mask into an additive one on every call: made once, below
        for layer, (kc, vc) in zip(self.layers, caches):
            attn = layer.self_attention
            residual = h
            x = layer.input_layernorm(h)
            q, k, v, gate = self._qkv(attn, x)  # q [s,b,np,d], k/v [s,b,ng,d]
            if self.use_rope:
                q = self._rope(q, rope_at)
                k = self._rope(k, rope_at)
            k, v = k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3)  # [b, groups, s, d]
            if fixed is not None:
                keep = fixed[:, None, :, None]
                k = torch.where(keep, kc[:, :, col0 : col0 + s], k)
                v = torch.where(keep, vc[:, :, col0 : col0 + s], v)
            kc[:, :, col0 : col0 + s] = k
            vc[:, :, col0 : col0 + s] = v
            keys, vals = kc[:, :, : col0 + s], vc[:, :, : col0 + s]
            if mask is None:  # [b, 1, s, kv], in the queries' dtype as SDPA wants it
                mask = torch.zeros(key_ok.shape, dtype=q.dtype, device=q.device).masked_fill_(~key_ok, float("-inf"))
                mask = mask.unsqueeze(1)
            ctx = F.scaled_dot_product_attention(  # [b, np, s, d]; query heads read their group's K/V
                q.permute(1, 2, 0, 3), keys, vals, attn_mask=mask, scale=self.scale,
                enable_gqa=q.shape[2] != keys.shape[1],
            )
            ctx = ctx.permute(2, 0, 1, 3).reshape(s, ctx.shape[0], -1)
            if gate is not None:
                ctx = (ctx * torch.sigmoid(gate.reshape(ctx.shape).float())).to(ctx.dtype)
            out, bias = attn.linear_proj(ctx)
            h = residual + (out + bias if bias is not None else out)
            residual = h
            out, bias = layer.mlp(layer.pre_mlp_layernorm(h))
            h = residual + (out + bias if bias is not None else out)
        if not self.stages.last:
            self.stages.to_next(h)
        elif self.final_norm is not None:
            h = self.final_norm(h)
        return h

    def new_caches(self, b: int, length: int):
        """Zeroed per-layer (K, V) caches [b, kv_groups_on_this_rank, length, head_dim]."""
        caches = []
        for layer in self.layers:
            attn = layer.self_attention
            shape = (b, attn.num_query_groups_per_partition, length, attn.hidden_size_per_attention_head)
            caches.append(
                (
                    torch.zeros(shape, dtype=self.dtype, device=self.device),
                    torch.zeros(shape, dtype=self.dtype, device=self.device),
                )
            )
        return caches


# model -> ((angles' storage, shape, mscale, dtype), cos, sin): see _rope_cos_sin
_ROPE_COS_SIN: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _rope_cos_sin(model, table: torch.Tensor, mscale: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """megatron-core's unfused RoPE is (t * cos) + (rotate_half(t) * sin), with cos and sin of
    the angles times mscale in the activations' dtype, computed twice per layer and step; here
    they are computed once for every position of the model and kept while it lives (a
    generation would otherwise redo [max_len, rot_dim] of them): the same numbers."""
    key = (table.data_ptr(), tuple(table.shape), mscale, dtype)  # megatron-core caches the angles' tensor
    kept = _ROPE_COS_SIN.get(model)
    if kept is None or kept[0] != key:
        kept = (key, (torch.cos(table) * mscale).to(dtype), (torch.sin(table) * mscale).to(dtype))
        _ROPE_COS_SIN[model] = kept
    return kept[1], kept[2]


class _Stages:
    """The sampler's pipeline hops: hidden states go stage to stage, and the last stage's
    logits go back to every stage, which then all draw the same tokens (same seeds)."""

    def __init__(self) -> None:
        from megatron.core import parallel_state as ps

        self.size = ps.get_pipeline_model_parallel_world_size() if ps.model_parallel_is_initialized() else 1
        rank = ps.get_pipeline_model_parallel_rank() if self.size > 1 else 0
        self.first, self.last = rank == 0, rank == self.size - 1
        if self.size > 1:
            self.group = ps.get_pipeline_model_parallel_group()
            self.last_rank = ps.get_pipeline_model_parallel_last_rank()
            self.next_rank = ps.get_pipeline_model_parallel_next_rank()
            self.prev_rank = ps.get_pipeline_model_parallel_prev_rank()

    def from_previous(self, shape, dtype, device) -> torch.Tensor:
        h = torch.empty(shape, dtype=dtype, device=device)
        dist.recv(h, src=self.prev_rank)
        return h

    def to_next(self, h: torch.Tensor) -> None:
        dist.send(h.contiguous(), dst=self.next_rank)

    def from_last(self, logits: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.broadcast(logits, src=self.last_rank, group=self.group)
        return logits


def _sample(logits: torch.Tensor, rows: list[_Row]) -> tuple[list[int], list[float]]:
    """One token per row from float32 logits [n, V]; see the module docstring. Rows asking
    for top-k sample logprobs get this step's table appended."""
    vocab = logits.shape[1]
    dev = logits.device
    tokens = logits.argmax(dim=-1)
    model_logp = torch.log_softmax(logits, dim=-1)
    lps = model_logp.gather(1, tokens[:, None])[:, 0]
    greedy, plain, filtered = [], [], []
    for i, r in enumerate(rows):
        k = r.spec.top_k
        if r.spec.temperature <= 0:
            greedy.append(i)
        elif (k is not None and 0 < k < vocab) or r.spec.top_p < 1.0:
            filtered.append(i)
        else:
            plain.append(i)

    def uniforms(idx):
        """One uniform per row from the row's own generator, [len(idx), 1]."""
        return torch.cat([torch.rand(1, generator=rows[i].gen, dtype=torch.float64) for i in idx])[:, None]

    if greedy:
        _record_topk(rows, greedy, model_logp[torch.tensor(greedy, device=dev)])
    if plain:
        idx = torch.tensor(plain, device=dev)
        temps = torch.tensor([rows[i].spec.temperature for i in plain], device=dev, dtype=torch.float32)
        logq = torch.log_softmax(logits[idx] / temps[:, None], dim=-1)
        pick = inverse_cdf(logq, uniforms(plain))[:, 0]
        tokens[idx] = pick
        lps[idx] = logq.gather(1, pick[:, None])[:, 0]
        _record_topk(rows, plain, logq)
    if filtered:
        idx = torch.tensor(filtered, device=dev)
        temps = torch.tensor([rows[i].spec.temperature for i in filtered], device=dev, dtype=torch.float32)
        ks = torch.tensor(
            [rows[i].spec.top_k if 0 < (rows[i].spec.top_k or 0) < vocab else vocab for i in filtered], device=dev
        )
        ps = torch.tensor([rows[i].spec.top_p for i in filtered], device=dev, dtype=torch.float32)
        x, order = torch.sort(logits[idx] / temps[:, None], dim=-1, descending=True, stable=True)
        rank = torch.arange(vocab, device=dev)[None, :]
        x = x.masked_fill(rank >= ks[:, None], float("-inf"))
        probs = torch.softmax(x, dim=-1)
        before = probs.cumsum(-1) - probs  # mass of the strictly more likely tokens
        drop = (before > ps[:, None]) & (ps < 1.0)[:, None]
        drop[:, 0] = False
        x = x.masked_fill(drop, float("-inf"))
        logq = torch.log_softmax(x, dim=-1)  # in sorted order
        pick = inverse_cdf(logq, uniforms(filtered))[:, 0]
        tokens[idx] = order.gather(1, pick[:, None])[:, 0]
        lps[idx] = logq.gather(1, pick[:, None])[:, 0]
        if any(rows[i].spec.topk_sample_logprobs for i in filtered):
            _record_topk(rows, filtered, torch.empty_like(logq).scatter_(1, order, logq))
    return tokens.tolist(), lps.tolist()


def _record_topk(rows: list[_Row], idx: list[int], logq: torch.Tensor) -> None:
    """Append the top-k table of `logq` (aligned with `idx`, vocabulary order) to the rows
    of `idx` that ask for one."""
    want = [n for n, i in enumerate(idx) if rows[i].spec.topk_sample_logprobs]
    if not want:
        return
    widest = max(rows[idx[n]].spec.topk_sample_logprobs for n in want)
    ids, lps = topk_table(logq[torch.tensor(want, device=logq.device)], widest)
    for n, ids_row, lps_row in zip(want, ids, lps):
        r = rows[idx[n]]
        r.topk_ids.append(ids_row[: r.spec.topk_sample_logprobs])
        r.topk_lps.append(lps_row[: r.spec.topk_sample_logprobs])


def _hits_stop_string(text: str, stops) -> bool:
    return any(stop and stop in text for stop in stops)  # an empty stop string never matches


@dataclass
class _Prompts:
    """The distinct prompts (specs) of one chunk, in prefill order (shortest part left to
    compute first), left-padded to the longest, with what the prefix cache already holds."""

    specs: list[int]  # spec index of each distinct prompt
    lens: list[int]
    reuse: list[int]  # leading tokens whose K/V comes from the prefix cache
    P: int  # the longest prompt: every row's prompt ends at column P

    def suffix(self, j: int) -> int:
        return self.lens[j] - self.reuse[j]


def _distinct_prompts(rows: list[_Row], specs, cache: PrefixCache | None):
    """(_Prompts, cached K/V of each) for the specs of `rows`."""
    uniq = list(dict.fromkeys(r.spec_idx for r in rows))
    found = {}
    for i in uniq:
        limit = first_hidden_needed(specs[i])
        found[i] = cache.lookup(specs[i].adapter, specs[i].prompt, limit) if cache is not None else (0, None)
    uniq.sort(key=lambda i: len(specs[i].prompt) - found[i][0])  # stable: shortest first, as before
    lens = [len(specs[i].prompt) for i in uniq]
    prompts = _Prompts(uniq, lens, [found[i][0] for i in uniq], max(lens))
    return prompts, [found[i][1] for i in uniq]


def _prefill(runner: _Runner, prompts: _Prompts, cached_kv, specs, route, out: dict) -> tuple:
    """Fill the per-prompt K/V caches; returns (caches [distinct, groups, P, d] per layer,
    last-position logits [distinct, V], left pads [distinct]). Prompt scores go to `out`."""
    dev, P, n = runner.device, prompts.P, len(prompts.specs)
    caches = runner.new_caches(n, P)
    tok = torch.zeros(n, P, dtype=torch.long, device=dev)
    pads = torch.tensor([P - m for m in prompts.lens], device=dev)
    for j, i in enumerate(prompts.specs):
        tok[j, P - prompts.lens[j] :] = torch.tensor(specs[i].prompt, dtype=torch.long, device=dev)
        if prompts.reuse[j]:
            c0, m = P - prompts.lens[j], prompts.reuse[j]
            for (kc, vc), (k, v) in zip(caches, cached_kv[j]):
                kc[j, :, c0 : c0 + m] = k[:, :m]
                vc[j, :, c0 : c0 + m] = v[:, :m]
    cols = torch.arange(P, device=dev)
    pos = (cols[None, :] - pads[:, None]).clamp(min=0)
    reuse = torch.tensor(prompts.reuse, device=dev)
    last_logits = torch.empty(n, runner.vocab_size, device=dev)
    a = 0
    while a < n:  # sub-batches of distinct prompts; each computes a right-aligned window
        b = a + 1
        while b < n and (b + 1 - a) * prompts.suffix(b) <= _PREFILL_TOKENS:
            b += 1
        sl, S = slice(a, b), prompts.suffix(b - 1)
        c0 = P - S
        qcols = cols[c0:]
        visible = (cols[None, :] <= qcols[:, None])[None] & (cols[None, None, :] >= pads[sl, None, None])
        # Padding queries see themselves only, so no row is all-masked (no NaN anywhere).
        key_ok = visible | (cols[None, None, :] == qcols[None, :, None])
        fixed = None
        if bool(reuse[sl].any()):
            fixed = (qcols[None, :] >= pads[sl, None]) & (qcols[None, :] < (pads + reuse)[sl, None])
        sub = [(kc[sl], vc[sl]) for kc, vc in caches]
        with route([specs[i].adapter for i in prompts.specs[sl]]):
            h = runner.forward(tok[sl, c0:], pos[sl, c0:], sub, c0, key_ok, fixed)  # [S, b, H]
            last_logits[sl] = runner._logits(h[-1:])[0]
            for j in range(a, b):
                i = prompts.specs[j]
                if wants_scores(specs[i]) and i not in out:
                    first = max(0, prompts.lens[j] - S)  # the first prompt position in the window
                    out[i] = score_prompt(specs[i], h[max(0, S - prompts.lens[j]) :, j - a], first,
                                          runner.row_logits, runner.vocab_size)
        a = b
    return caches, last_logits, pads


def _remember(cache: PrefixCache, rows: list[_Row], caches, row_pad, done: list[int]) -> None:
    """Store the prompt + sampled tokens of finished batch rows `done` in the prefix cache
    (all but the last sampled token, which was never fed back, have K/V)."""
    for n in done:
        r = rows[n]
        c0 = int(row_pad[n])
        c1 = c0 + len(r.spec.prompt) + max(len(r.tokens) - 1, 0)

        def kv(n=n, c0=c0, c1=c1):
            return [(kc[n, :, c0:c1].clone(), vc[n, :, c0:c1].clone()) for kc, vc in caches]

        cache.insert(r.spec.adapter, r.spec.prompt + r.tokens[:-1], kv)


@dataclass
class _Batch:
    """The rows being decoded together and their per-layer K/V caches [rows, groups, L, d].

    Every row writes the token it feeds at step t into the same column `col`; row i's prompt
    ends just before the column where it joined, and `row_pad[i]` is its first column."""

    rows: list[_Row]
    caches: list
    logits: torch.Tensor  # [rows, V]: what each row samples from next
    row_pad: torch.Tensor  # [rows]
    col: int  # the column the next decode step writes


def _prefilled(runner: _Runner, rows: list[_Row], specs, out: dict, hits: dict, route, cache):
    """Prefill the prompts of `rows`: (per-row caches [rows, groups, P, d] per layer, their
    last-position logits [rows, V], left pads [rows], P), every prompt ending at column P."""
    dev = runner.device
    prompts, cached_kv = _distinct_prompts(rows, specs, cache)
    for j, i in enumerate(prompts.specs):
        hits.setdefault(i, prompts.reuse[j])
    caches_u, last_logits, pads = _prefill(runner, prompts, cached_kv, specs, route, out)
    where = {i: j for j, i in enumerate(prompts.specs)}
    row_u = torch.tensor([where[r.spec_idx] for r in rows], device=dev)
    caches = [(kc[row_u], vc[row_u]) for kc, vc in caches_u]  # one cache row per sample
    return caches, last_logits[row_u], pads[row_u], prompts.P


def _widen(caches, left: int, length: int):
    """Caches with `left` empty columns added in front and room for `length` columns in all."""
    out = []
    for kc, vc in caches:
        shape = (kc.shape[0], kc.shape[1], length, kc.shape[3])
        k2, v2 = kc.new_zeros(shape), vc.new_zeros(shape)
        k2[:, :, left : left + kc.shape[2]] = kc
        v2[:, :, left : left + vc.shape[2]] = vc
        out.append((k2, v2))
    return out


def _join(batch: _Batch | None, runner: _Runner, rows: list[_Row], specs, out, hits, route, cache) -> _Batch:
    """`batch` with `rows` prefilled and added, their prompts ending just before its next column
    (if a prompt is longer than the columns so far, every row shifts right to make room)."""
    caches, logits, pads, P = _prefilled(runner, rows, specs, out, hits, route, cache)
    if batch is None:
        batch = _Batch([], [], logits[:0], pads[:0], P)
    shift = max(0, P - batch.col)  # columns added in front of the running rows
    col = batch.col + shift
    # a row with t of its b tokens sampled still feeds b - t - 1 (the last sampled token is never fed back)
    need = col + max(max(r.budget - len(r.tokens) for r in rows + batch.rows) - 1, 0)
    length = max(need, (batch.caches[0][0].shape[2] + shift) if batch.caches else 0, col)
    old = _widen(batch.caches, shift, length) if batch.caches else None
    new = _widen(caches, col - P, length)
    merged = new if old is None else [(torch.cat([ko, kn]), torch.cat([vo, vn])) for (ko, vo), (kn, vn) in zip(old, new)]
    return _Batch(batch.rows + rows, merged, torch.cat([batch.logits, logits]),
                  torch.cat([batch.row_pad + shift, pads + (col - P)]), col)


def _run_chunk(runner: _Runner, rows: list[_Row], specs, out: dict, hits: dict, decode, route, cache,
               admit: Callable[[int], list[_Row]] | None = None,
               finished: Callable[[list[_Row]], None] | None = None) -> None:
    """Decode `rows` to the end. Between decode steps `admit(rows in the batch)` may hand over
    new rows, which are prefilled and decoded along with the others from then on;
    `finished(rows)` hears of rows as they finish."""
    dev = runner.device
    batch = _join(None, runner, rows, specs, out, hits, route, cache)
    for r in rows:
        if r.budget <= 0:
            r.stop_reason = "length"
    while True:
        joining = admit(len(batch.rows)) if admit is not None else []
        if joining:
            batch = _join(batch, runner, joining, specs, out, hits, route, cache)
            for r in joining:
                if r.budget <= 0:
                    r.stop_reason = "length"
        if not batch.rows:
            return
        live = [n for n, r in enumerate(batch.rows) if r.stop_reason is None]
        if live:
            lg = batch.logits if len(live) == len(batch.rows) else batch.logits[torch.tensor(live, device=dev)]
            toks, lps = _sample(lg, [batch.rows[n] for n in live])
            for n, t, lp in zip(live, toks, lps):
                r = batch.rows[n]
                r.tokens.append(t)
                r.logprobs.append(lp)
                if t in r.spec.stop_token_ids:
                    r.stop_reason = "stop"
                elif r.spec.stop_strings and _hits_stop_string(decode(r.tokens), r.spec.stop_strings):
                    r.stop_reason = "stop"
                elif len(r.tokens) >= r.budget:
                    r.stop_reason = "length"
        done = [n for n, r in enumerate(batch.rows) if r.stop_reason is not None]
        if cache is not None and done:
            _remember(cache, batch.rows, batch.caches, batch.row_pad, done)
        if done and finished is not None:
            finished([batch.rows[n] for n in done])
        if done:  # drop finished rows from the batch
            keep = [n for n, r in enumerate(batch.rows) if r.stop_reason is None]
            idx = torch.tensor(keep, dtype=torch.long, device=dev)
            batch = _Batch([batch.rows[n] for n in keep], [(kc[idx], vc[idx]) for kc, vc in batch.caches],
                           batch.logits[idx], batch.row_pad[idx], batch.col)
        if not batch.rows:
            continue  # one more chance for rows to join before the chunk ends
        col = batch.col
        inp = torch.tensor([[r.tokens[-1]] for r in batch.rows], dtype=torch.long, device=dev)
        p = torch.tensor([[len(r.spec.prompt) + len(r.tokens) - 1] for r in batch.rows], device=dev)
        key_ok = (torch.arange(col + 1, device=dev)[None, :] >= batch.row_pad[:, None])[:, None, :]
        with route([r.spec.adapter for r in batch.rows]), packed_weights.decode_step():
            h = runner.forward(inp, p, batch.caches, col, key_ok)
            batch.logits = runner._logits(h)[0]
        batch.col = col + 1


def _check_spec(si: int, spec: SampleSpec, max_len: int, vocab: int, decode) -> None:
    if not spec.prompt:
        raise ValueError(f"spec {si}: empty prompt")
    if spec.num_samples < 1:
        raise ValueError(f"spec {si}: num_samples must be >= 1")
    if spec.max_tokens < 0:
        raise ValueError(f"spec {si}: max_tokens must be >= 0")
    if spec.temperature < 0 or not 0.0 < spec.top_p <= 1.0:
        raise ValueError(f"spec {si}: need temperature >= 0 and 0 < top_p <= 1")
    if len(spec.prompt) > max_len:
        raise ValueError(f"spec {si}: prompt of {len(spec.prompt)} tokens exceeds the context of {max_len}")
    if spec.stop_strings and decode is None:
        raise ValueError(f"spec {si}: stop strings need a `decode` function")
    if min(spec.topk_prompt_logprobs, spec.topk_sample_logprobs, spec.prompt_alt_tokens_k) < 0:
        raise ValueError(f"spec {si}: top-k widths and prompt_alt_tokens_k must be >= 0")
    if spec.prompt_logprobs_last_n is not None and spec.prompt_logprobs_last_n < 1:
        raise ValueError(f"spec {si}: prompt_logprobs_last_n must be >= 1")
    if spec.target_prompt_ids is not None:
        rows, ids = (np.asarray(a) for a in spec.target_prompt_ids)
        if rows.shape != ids.shape or rows.ndim != 1:
            raise ValueError(f"spec {si}: target_prompt_ids needs equally long 1-D rows and ids")
        if rows.size and (rows.min() < 0 or rows.max() >= len(spec.prompt) - 1 or ids.min() < 0 or ids.max() >= vocab):
            raise ValueError(f"spec {si}: target_prompt_ids rows must be in [0, len(prompt) - 1), ids in [0, {vocab})")


def generate(
    model,
    specs: list[SampleSpec],
    *,
    decode: Callable[[list[int]], str] | None = None,
    route: Callable[[list[str | None]], ContextManager] = lambda rows: contextlib.nullcontext(),
    max_batch_rows: int = 64,
    prefix_cache: PrefixCache | None = None,
    poll: Callable[[], list[SampleSpec]] | None = None,
    on_done: Callable[[int, SampleResult], None] | None = None,
) -> list[SampleResult]:
    """Sample `spec.num_samples` continuations of every spec's prompt; one result per spec.

    `decode(tokens) -> str` is needed when any spec has stop strings. `route(adapters)`
    is entered around every model computation with the adapter name of each batch row
    (batch order), so LoRA wrappers can pick per-row adapters. `prefix_cache` (one per base
    model) lets prompts reuse K/V computed by earlier calls under the same adapter. `poll()`,
    called between decode steps, may return more specs: they join the running batch (continuous
    batching) and their results follow the given specs' in the returned list. `on_done(i,
    result)` hears of spec i's result as soon as all its samples are finished. All TP and PP
    ranks of the model must call this with identical arguments, and their `poll`s must return
    the same specs (they run the same collectives, draw the same tokens and make the same cache
    decisions).
    """
    model = _unwrap(model)
    if max_batch_rows < 1:
        raise ValueError("max_batch_rows must be >= 1")
    specs = list(specs)
    spec_rows: list[list[_Row]] = []  # per spec, its rows in sample order
    max_len = int(getattr(model, "max_sequence_length", 1 << 30))
    vocab = int(getattr(model, "unpadded_vocab_size", model.vocab_size))

    def rows_of(si: int) -> list[_Row]:
        spec = specs[si]
        _check_spec(si, spec, max_len, vocab, decode)
        budget = min(spec.max_tokens, max_len - len(spec.prompt))
        made = []
        for k in range(spec.num_samples):
            g = torch.Generator(device="cpu")
            g.manual_seed(_row_seed(spec.seed, k))
            made.append(_Row(si, k, spec, budget, g))
        spec_rows.append(made)
        return made

    rows = [r for si in range(len(specs)) for r in rows_of(si)]
    pending: list[_Row] = []  # rows of specs that arrived through `poll`, waiting for room

    def admit(current_rows: int) -> list[_Row]:
        for spec in poll() if poll is not None else ():
            specs.append(spec)
            pending.extend(rows_of(len(specs) - 1))
        room = max(0, max_batch_rows - current_rows)
        joining = pending[:room]
        del pending[:room]
        return joining

    scores: dict[int, PromptScores] = {}
    hits: dict[int, int] = {}

    def finished(done: list[_Row]) -> None:
        if on_done is None:
            return
        for si in dict.fromkeys(r.spec_idx for r in done):  # each spec once, even if several rows ended now
            if all(r.stop_reason is not None for r in spec_rows[si]):
                on_done(si, _result_of(si, spec_rows[si], scores, hits))

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            runner = _Runner(model)
            # Similar prompt lengths together keep padding small; results do not depend on it.
            order = sorted(range(len(rows)), key=lambda i: (len(rows[i].spec.prompt), rows[i].spec_idx))
            chunks = [[rows[i] for i in order[a : a + max_batch_rows]] for a in range(0, len(order), max_batch_rows)]
            while chunks or pending:
                if chunks:
                    chunk = chunks.pop(0)
                else:  # rows that joined through `poll` but found no room
                    chunk = pending[:max_batch_rows]
                    del pending[:max_batch_rows]
                _run_chunk(runner, chunk, specs, scores, hits, decode, route, prefix_cache, admit, finished)
    finally:
        model.train(was_training)

    return [_result_of(si, spec_rows[si], scores, hits) for si in range(len(specs))]


def _result_of(si: int, mine: list[_Row], scores: dict, hits: dict) -> SampleResult:
    """Spec `si`'s result from its finished rows `mine` (in sample order)."""
    got = scores.get(si, PromptScores())
    return SampleResult(
        sequences=[SampledSeq(r.tokens, r.logprobs, r.stop_reason or "length", r.topk_logprobs()) for r in mine],
        prompt_logprobs=got.logprobs, topk_prompt_logprobs=got.topk, target_prompt_logprobs=got.target_logprobs,
        prompt_alt_tokens=got.alt_tokens, prompt_cache_hit_tokens=hits.get(si, 0),
    )
