"""Sampling routes: create_sampling_session, GET samplers/{id}, asample.

`asample` validates the prompt, every SamplingParams field and every logprob option, fills
the defaults the SDK documents (stop omitted: the model's EOS tokens; `[]`: no stop at all;
no seed: a random one, the same on every rank) and queues the request for batched sampling.
The logprob options are read by `handlers.logprob_options`; a `target_prompt_logprobs`
answer is put back into the request's own layout when the result is encoded.
"""
from __future__ import annotations

import asyncio

import functools
import math
import random
from typing import Any

import numpy as np
from aiohttp import web

from engine.messages import UserError
from engine.registry import parse_tinker_path
from handlers.codec import SequenceOut, encode_sample_response, model_input_tokens
from handlers.common import idempotent, json_body, need, opt, state
from handlers.logprob_options import TargetLayout, logprob_args
from handlers.validation import check_tokens

MAX_NUM_SAMPLES = 128


async def create_sampling_session(request: web.Request) -> web.Response:
    st = state(request)
    body = await json_body(request)
    session = st.registry.session(need(body, "session_id", str))
    seq = need(body, "sampling_session_seq_id", int)
    model_path = opt(body, "model_path", str, None)
    if model_path is not None:
        path = parse_tinker_path(model_path)
        meta = await asyncio.to_thread(st.registry.checkpoint_info, path)  # may remove an expired one
        adapter = {"key": meta["snapshot_id"], "path": str(st.registry.checkpoint_dir(path))}
        sampler = st.registry.new_sampler(session.session_id, seq, meta["base_model"], model_path, adapter)
    else:
        base_model = need(body, "base_model", str)
        st.model_info(base_model)
        sampler = st.registry.new_sampler(session.session_id, seq, base_model, None, None)
    return web.json_response({"sampling_session_id": sampler.sampler_id, "type": "create_sampling_session"})


async def get_sampler(request: web.Request) -> web.Response:
    s = state(request).registry.sampler(request.match_info["sampler_id"])
    return web.json_response({"sampler_id": s.sampler_id, "base_model": s.base_model, "model_path": s.model_path})


def _stops(stop: Any, eos: list[int]) -> tuple[list[int], list[str]]:
    """(stop token ids, stop strings) for the SDK's `stop` field."""
    if stop is None:
        return list(eos), []
    if isinstance(stop, str):
        return list(eos), [stop]
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return (list(eos) if stop else []), stop
    if isinstance(stop, list) and all(isinstance(s, int) and not isinstance(s, bool) for s in stop):
        return stop, []
    raise UserError("sampling_params.stop must be a string, a list of strings or a list of token ids")


def _sample_args(body: dict[str, Any], info: dict[str, Any]) -> tuple[dict[str, Any], int, TargetLayout | None]:
    prompt = np.asarray(model_input_tokens(need(body, "prompt", dict)), dtype=np.int64)
    if prompt.size == 0:
        raise UserError("the prompt has no tokens")
    check_tokens(prompt, info["vocab_size"], "prompt")
    n = need(body, "num_samples", int)
    if not 1 <= n <= MAX_NUM_SAMPLES:
        raise UserError(f"num_samples must be between 1 and {MAX_NUM_SAMPLES}, got {n}")
    p = opt(body, "sampling_params", dict, {})
    room = info["max_context"] - prompt.size
    max_tokens = opt(p, "max_tokens", int, room)
    if max_tokens < 1:
        raise UserError(f"max_tokens must be at least 1, got {max_tokens}")
    if prompt.size + max_tokens > info["max_context"]:
        raise UserError(f"prompt ({prompt.size} tokens) + max_tokens ({max_tokens}) exceeds the model's maximum "
                        f"context of {info['max_context']}")
    temperature = opt(p, "temperature", float, 1.0)
    top_k = opt(p, "top_k", int, -1)
    top_p = opt(p, "top_p", float, 1.0)
    if not (math.isfinite(temperature) and temperature >= 0):
        raise UserError(f"temperature must be >= 0, got {temperature}")
    if top_k == 0 or top_k < -1:
        raise UserError(f"top_k must be -1 (no limit) or >= 1, got {top_k}")
    if not 0 < top_p <= 1:
        raise UserError(f"top_p must be in (0, 1], got {top_p}")
    stop_ids, stop_strings = _stops(p.get("stop"), info["eos_token_ids"])
    check_tokens(np.asarray(stop_ids, dtype=np.int64), info["vocab_size"], "sampling_params.stop")
    seed = opt(p, "seed", int, None)
    args = {
        "prompt": prompt, "num_samples": n, "max_tokens": max_tokens, "temperature": temperature,
        "top_k": top_k, "top_p": top_p, "stop_token_ids": stop_ids, "stop_strings": stop_strings,
        "seed": random.getrandbits(62) if seed is None else seed,
    }
    options, target_layout = logprob_args(body, prompt.size, n * max_tokens, info["vocab_size"])
    return {**args, **options}, n, target_layout


def _encode_sample(result: dict[str, Any], target_layout: TargetLayout | None = None) -> tuple[bytes, str]:
    seqs = [SequenceOut(s["tokens"], s["logprobs"], s["stop_reason"], s.get("topk_logprobs"))
            for s in result["sequences"]]
    targets = None if target_layout is None else target_layout.answer(result["target_prompt_logprobs"])
    payload = encode_sample_response(
        seqs, prompt_logprobs=result.get("prompt_logprobs"), topk_prompt_logprobs=result.get("topk_prompt_logprobs"),
        prompt_cache_hit_tokens=result.get("prompt_cache_hit_tokens", 0), target_prompt_logprobs=targets,
        prompt_alt_tokens=result.get("prompt_alt_tokens"))
    return payload, "proto"


async def asample(request: web.Request) -> web.Response:
    async def make() -> dict[str, Any]:
        st = state(request)
        body = await json_body(request)
        sampler = st.registry.sampler(need(body, "sampling_session_id", str))
        seq_id = opt(body, "seq_id", int, None)
        handle_key = (sampler.sampler_id, seq_id)
        if seq_id is not None and handle_key in st.sample_handles:
            return st.sample_handles[handle_key]
        args, rows, target_layout = _sample_args(body, st.model_info(sampler.base_model))
        args.update(base_model=sampler.base_model, adapter=sampler.adapter)
        st.snapshots.used((sampler.adapter or {}).get("key"))
        rid = st.scheduler.submit_sample(args, rows, functools.partial(_encode_sample, target_layout=target_layout),
                                         client=sampler.session_id)
        tag = seq_id if seq_id is not None else rid
        reply = {"request_id": rid, "sample_sequence_ids": [f"{sampler.sampler_id}:{tag}:{i}" for i in range(rows)]}
        if seq_id is not None:
            st.sample_handles[handle_key] = reply
        return reply

    return await idempotent(request, make)
