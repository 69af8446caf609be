"""Token generation from a megatron-core GPTModel with a KV cache, many requests batched together.

This module's one job: given a (possibly LoRA-wrapped, possibly tensor-parallel) mcore
`GPTModel` and a list of `SampleSpec`s, produce the sampled tokens, their logprobs and,
on request, the prompt logprobs. It walks the model's own submodules (embedding, each
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
  * prompt logprobs are model log-probabilities (temperature 1): position 0 is NaN (nothing
    predicts it), position i is log p(prompt[i] | prompt[:i]).

Stops: a sampled token in `stop_token_ids` ends the row (token kept, "stop"); after each
token, if `decode(generated)` contains a stop string, the row ends there (token kept,
"stop"); reaching `max_tokens`, or the model's `max_sequence_length`, gives "length".
"""
from __future__ import annotations

import contextlib
import hashlib
import math
from dataclasses import dataclass, field
from typing import Callable, ContextManager

import torch
import torch.nn.functional as F

__all__ = ["SampleSpec", "SampledSeq", "SampleResult", "generate"]

# Prefill is run in sub-batches of at most this many (padded) tokens, to bound the memory
# of activations and attention scores; the KV cache itself is allocated per chunk.
_PREFILL_TOKENS = 16384
# Prompt logprobs are computed over at most this many positions at a time (full-vocab
# logits of one row).
_PROMPT_LOGPROB_CHUNK = 512


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


@dataclass
class SampledSeq:
    tokens: list[int]
    logprobs: list[float]
    stop_reason: str  # "stop" | "length"


@dataclass
class SampleResult:
    sequences: list[SampledSeq]  # num_samples of them
    prompt_logprobs: list[float] | None  # len(prompt), NaN at 0, when asked


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
    stop_reason: str | None = None


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
        attn = self.layers[0].self_attention if self.layers else None
        pgc = getattr(attn, "pg_collection", None)
        self.cp_group = getattr(pgc, "cp", None)
        self.out_weight = (
            model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights else None
        )
        self.gather_output = bool(getattr(model.output_layer, "gather_output", False))
        weight = model.embedding.word_embeddings.weight
        self.device, self.dtype = weight.device, weight.dtype

    # -- pieces --------------------------------------------------------------------------
    def _rope(self, t: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """t [s, b, heads, d]; pos [s, b] -> t rotated at each row's own positions."""
        freqs = self.rope_table[pos].unsqueeze(2)  # [s, b, 1, rot_dim]
        kw = {"config": self.cfg, "mscale": self.mscale}
        if self.cp_group is not None:
            kw["cp_group"] = self.cp_group
        return self._apply_rope(t, freqs, **kw)

    def _qkv(self, attn, x):
        if self.output_gate:
            q, k, v, gate = attn.get_query_key_value_tensors(x, None, output_gate=True)
        else:
            q, k, v = attn.get_query_key_value_tensors(x, None)
            gate = None
        return q, k, v, gate

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """h [s, b, H] (after the final norm) -> full-vocab float32 logits [s, b, V] on every rank."""
        logits, _ = self.model.output_layer(h, weight=self.out_weight)
        if not self.gather_output:
            logits = self._gather(logits)
        real = getattr(self.model, "unpadded_vocab_size", None)  # rows added only to divide by tp
        if real is not None and real < logits.shape[-1]:
            logits = logits[..., :real]
        return logits.float()

    def forward(self, tokens, pos, caches, col0, key_ok):
        """Run `tokens` [b, s] (positions `pos` [b, s]) whose K/V go to cache columns
        [col0, col0+s). `key_ok` [b, s, col0+s] says which cache columns each query sees.
        Returns the hidden states after the final norm, [s, b, H]."""
        s = tokens.shape[1]
        h = self.model.embedding(input_ids=tokens, position_ids=pos)  # [s, b, H]
        pos_sb = pos.t()
        mask = key_ok.unsqueeze(1)  # [b, 1, s, kv]
        for layer, (kc, vc) in zip(self.layers, caches):
            attn = layer.self_attention
            residual = h
            x = layer.input_layernorm(h)
            q, k, v, gate = self._qkv(attn, x)  # q [s,b,np,d], k/v [s,b,ng,d]
            if self.use_rope:
                q = self._rope(q, pos_sb)
                k = self._rope(k, pos_sb)
            kc[:, :, col0 : col0 + s] = k.permute(1, 2, 0, 3)
            vc[:, :, col0 : col0 + s] = v.permute(1, 2, 0, 3)
            keys, vals = kc[:, :, : col0 + s], vc[:, :, : col0 + s]
            n_heads, n_groups = q.shape[2], keys.shape[1]
            if n_heads != n_groups:
                rep = n_heads // n_groups
                keys = keys.repeat_interleave(rep, dim=1)
                vals = vals.repeat_interleave(rep, dim=1)
            ctx = F.scaled_dot_product_attention(
                q.permute(1, 2, 0, 3), keys, vals, attn_mask=mask, scale=self.scale
            )  # [b, np, s, d]
            ctx = ctx.permute(2, 0, 1, 3).reshape(s, ctx.shape[0], -1)
            if gate is not None:
                ctx = (ctx * torch.sigmoid(gate.reshape(ctx.shape).float())).to(ctx.dtype)
            out, bias = attn.linear_proj(ctx)
            h = residual + (out + bias if bias is not None else out)
            residual = h
            out, bias = layer.mlp(layer.pre_mlp_layernorm(h))
            h = residual + (out + bias if bias is not None else out)
        if self.final_norm is not None:
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


def _sample(logits: torch.Tensor, rows: list[_Row]) -> tuple[list[int], list[float]]:
    """One token per row from float32 logits [n, V]; see the module docstring."""
    vocab = logits.shape[1]
    tokens = logits.argmax(dim=-1)
    lps = torch.log_softmax(logits, dim=-1).gather(1, tokens[:, None])[:, 0]
    plain, filtered = [], []
    for i, r in enumerate(rows):
        if r.spec.temperature <= 0:
            continue
        k = r.spec.top_k
        if (k is not None and 0 < k < vocab) or r.spec.top_p < 1.0:
            filtered.append(i)
        else:
            plain.append(i)
    dev = logits.device

    def draw(idx, logq):
        """Inverse-CDF draw, one uniform per row from the row's own generator."""
        u = torch.cat([torch.rand(1, generator=rows[i].gen, dtype=torch.float64) for i in idx]).to(dev)
        q = logq.double().exp()
        cdf = q.cumsum(-1)
        pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]
        # Guard against rounding at the top end: never pick a zero-probability token.
        last_ok = vocab - 1 - torch.isfinite(logq).flip(-1).int().argmax(-1)
        return torch.minimum(pick, last_ok)

    if plain:
        idx = torch.tensor(plain, device=dev)
        temps = torch.tensor([rows[i].spec.temperature for i in plain], device=dev, dtype=torch.float32)
        logq = torch.log_softmax(logits[idx] / temps[:, None], dim=-1)
        pick = draw(plain, logq)
        tokens[idx] = pick
        lps[idx] = logq.gather(1, pick[:, None])[:, 0]
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
        logq = torch.log_softmax(x, dim=-1)
        pick = draw(filtered, logq)
        tokens[idx] = order.gather(1, pick[:, None])[:, 0]
        lps[idx] = logq.gather(1, pick[:, None])[:, 0]
    return tokens.tolist(), lps.tolist()


def _prompt_logprobs(runner: _Runner, h_row: torch.Tensor, prompt: list[int], pad: int) -> list[float]:
    """h_row [P, H] final hidden states of one left-padded row -> prompt logprobs (NaN at 0)."""
    out = [float("nan")]
    n = len(prompt)
    targets = torch.tensor(prompt[1:], device=h_row.device, dtype=torch.long)
    for a in range(0, n - 1, _PROMPT_LOGPROB_CHUNK):
        b = min(n - 1, a + _PROMPT_LOGPROB_CHUNK)
        logits = runner._logits(h_row[pad + a : pad + b, None, :])[:, 0]  # [c, V]
        lp = torch.log_softmax(logits, dim=-1).gather(1, targets[a:b, None])[:, 0]
        out.extend(lp.tolist())
    return out


def _hits_stop_string(text: str, stops) -> bool:
    return any(stop and stop in text for stop in stops)  # an empty stop string never matches


def _run_chunk(runner: _Runner, rows: list[_Row], specs, prompt_lp: dict, decode, route) -> None:
    dev = runner.device
    # Distinct prompts (specs) in this chunk; every row of a spec shares its prefill.
    uniq: list[int] = []
    where: dict[int, int] = {}
    for r in rows:
        if r.spec_idx not in where:
            where[r.spec_idx] = len(uniq)
            uniq.append(r.spec_idx)
    row_u = torch.tensor([where[r.spec_idx] for r in rows], device=dev)
    lens = [len(specs[i].prompt) for i in uniq]
    P = max(lens)
    max_new = max(r.budget for r in rows)
    L = P + max(max_new - 1, 0)  # the last sampled token is never fed back
    caches_u = runner.new_caches(len(uniq), P)
    tok = torch.zeros(len(uniq), P, dtype=torch.long, device=dev)
    pads = torch.tensor([P - n for n in lens], device=dev)
    for j, i in enumerate(uniq):
        tok[j, P - lens[j] :] = torch.tensor(specs[i].prompt, dtype=torch.long, device=dev)
    cols = torch.arange(P, device=dev)
    pos = (cols[None, :] - pads[:, None]).clamp(min=0)
    last_logits = torch.empty(len(uniq), runner.vocab_size, device=dev)

    # ---- prefill, in sub-batches of distinct prompts ----
    per = max(1, _PREFILL_TOKENS // P)
    causal = cols[None, :] <= cols[:, None]  # [q, k]
    for a in range(0, len(uniq), per):
        sl = slice(a, min(len(uniq), a + per))
        real_k = cols[None, :] >= pads[sl, None]  # [b, k]
        # Padding queries see themselves only, so no row is all-masked (no NaN anywhere).
        key_ok = (causal[None] & real_k[:, None, :]) | torch.eye(P, dtype=torch.bool, device=dev)[None]
        sub = [(kc[sl], vc[sl]) for kc, vc in caches_u]
        with route([specs[i].adapter for i in uniq[sl]]):
            h = runner.forward(tok[sl], pos[sl], sub, 0, key_ok)  # [P, b, H]
            last_logits[sl] = runner._logits(h[-1:])[0]
            for j in range(sl.start, sl.stop):
                i = uniq[j]
                if specs[i].prompt_logprobs and i not in prompt_lp:
                    prompt_lp[i] = _prompt_logprobs(runner, h[:, j - sl.start], specs[i].prompt, P - lens[j])

    # ---- expand to one cache row per sample ----
    caches = []
    for kc_u, vc_u in caches_u:
        kc = kc_u.new_zeros((len(rows), kc_u.shape[1], L, kc_u.shape[3]))
        vc = torch.zeros_like(kc)
        kc[:, :, :P] = kc_u[row_u]
        vc[:, :, :P] = vc_u[row_u]
        caches.append((kc, vc))
    del caches_u
    logits = last_logits[row_u]
    row_pad = pads[row_u]
    row_len = torch.tensor([len(r.spec.prompt) for r in rows], device=dev)

    active = list(range(len(rows)))  # indices into `rows`, aligned with the batch dim
    for r in rows:
        if r.budget <= 0:
            r.stop_reason = "length"
    step = 0
    while True:
        live = [i for i in active if rows[i].stop_reason is None]
        if live:
            sel = [active.index(i) for i in live] if len(live) != len(active) else None
            lg = logits if sel is None else logits[torch.tensor(sel, device=dev)]
            toks, lps = _sample(lg, [rows[i] for i in live])
            for i, t, lp in zip(live, toks, lps):
                r = rows[i]
                r.tokens.append(t)
                r.logprobs.append(lp)
                if t in r.spec.stop_token_ids:
                    r.stop_reason = "stop"
                elif r.spec.stop_strings and _hits_stop_string(decode(r.tokens), r.spec.stop_strings):
                    r.stop_reason = "stop"
                elif len(r.tokens) >= r.budget:
                    r.stop_reason = "length"
        still = [i for i in active if rows[i].stop_reason is None]
        if not still:
            break
        if len(still) != len(active):  # drop finished rows from the batch
            keep = torch.tensor([active.index(i) for i in still], device=dev)
            caches = [(kc[keep], vc[keep]) for kc, vc in caches]
            row_pad, row_len = row_pad[keep], row_len[keep]
            active = still
        col = P + step
        inp = torch.tensor([[rows[i].tokens[-1]] for i in active], dtype=torch.long, device=dev)
        p = (row_len + step)[:, None]
        key_ok = (torch.arange(col + 1, device=dev)[None, :] >= row_pad[:, None])[:, None, :]
        with route([rows[i].spec.adapter for i in active]):
            h = runner.forward(inp, p, caches, col, key_ok)
            logits = runner._logits(h)[0]
        step += 1


def generate(
    model,
    specs: list[SampleSpec],
    *,
    decode: Callable[[list[int]], str] | None = None,
    route: Callable[[list[str | None]], ContextManager] = lambda rows: contextlib.nullcontext(),
    max_batch_rows: int = 64,
) -> list[SampleResult]:
    """Sample `spec.num_samples` continuations of every spec's prompt; one result per spec.

    `decode(tokens) -> str` is needed when any spec has stop strings. `route(adapters)`
    is entered around every model computation with the adapter name of each batch row
    (batch order), so LoRA wrappers can pick per-row adapters. All TP ranks must call this
    with identical arguments (they run the same collectives and draw the same tokens).
    """
    model = _unwrap(model)
    if max_batch_rows < 1:
        raise ValueError("max_batch_rows must be >= 1")
    rows: list[_Row] = []
    max_len = int(getattr(model, "max_sequence_length", 1 << 30))
    for si, spec in enumerate(specs):
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
        budget = min(spec.max_tokens, max_len - len(spec.prompt))
        for k in range(spec.num_samples):
            g = torch.Generator(device="cpu")
            g.manual_seed(_row_seed(spec.seed, k))
            rows.append(_Row(si, k, spec, budget, g))

    prompt_lp: dict[int, list[float]] = {}
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            runner = _Runner(model)
            # Similar prompt lengths together keep padding small; results do not depend on it.
            order = sorted(range(len(rows)), key=lambda i: (len(rows[i].spec.prompt), rows[i].spec_idx))
            for a in range(0, len(order), max_batch_rows):
                chunk = [rows[i] for i in order[a : a + max_batch_rows]]
                _run_chunk(runner, chunk, specs, prompt_lp, decode, route)
    finally:
        model.train(was_training)

    by_spec: list[list[SampledSeq]] = [[] for _ in specs]
    for r in rows:  # rows were built in (spec, sample index) order
        by_spec[r.spec_idx].append(SampledSeq(r.tokens, r.logprobs, r.stop_reason or "length"))
    return [
        SampleResult(sequences=seqs, prompt_logprobs=prompt_lp.get(si) if spec.prompt_logprobs else None)
        for si, (spec, seqs) in enumerate(zip(specs, by_spec))
    ]
