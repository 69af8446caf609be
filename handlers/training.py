"""Training routes: create_model, get_info, unload_model, forward_backward, optim_step.

Handlers parse and validate, then hand a typed operation to the scheduler; the result
arrives later as a future. A request with a known model and seq_id but bad content still
takes its place in the model's order, and its future fails with a `user` error.
"""
from __future__ import annotations

from typing import Any

from aiohttp import web

from engine.batch import unpack_outputs
from engine.messages import UserError
from engine.reaper import unload_run
from engine.registry import LoraSpec
from handlers.codec import encode_forward_backward_output, forward_backward_from_message, parse_forward_backward
from handlers.common import check_optimizer_config, idempotent, json_body, need, opt, state, submit_in_order
from handlers.validation import validate_forward_backward

MAX_LORA_RANK = 512
ADAM_FIELDS = ("learning_rate", "beta1", "beta2", "eps", "weight_decay", "grad_clip_norm")


def _lora_spec(cfg: dict[str, Any]) -> LoraSpec:
    rank = need(cfg, "rank", int)
    if not 1 <= rank <= MAX_LORA_RANK:
        raise UserError(f"lora_config.rank must be between 1 and {MAX_LORA_RANK}, got {rank}")
    alpha = opt(cfg, "alpha", float, LoraSpec.alpha)
    if alpha <= 0:
        raise UserError(f"lora_config.alpha must be positive, got {alpha}")
    return LoraSpec(rank=rank, alpha=alpha, seed=opt(cfg, "seed", int, 0),
                    train_attn=opt(cfg, "train_attn", bool, True), train_mlp=opt(cfg, "train_mlp", bool, True),
                    train_unembed=opt(cfg, "train_unembed", bool, False))


async def create_model(request: web.Request) -> web.Response:
    async def make() -> dict[str, Any]:
        st = state(request)
        body = await json_body(request)
        base_model = need(body, "base_model", str)
        st.model_info(base_model)
        check_optimizer_config(body)
        lora = _lora_spec(need(body, "lora_config", dict))
        run = st.registry.new_run(need(body, "session_id", str), need(body, "model_seq_id", int), base_model,
                                  lora, opt(body, "user_metadata", dict, {}))
        args = {"model_id": run.model_id, "base_model": base_model, **vars(lora)}
        rid = st.scheduler.submit("create_adapter", args,
                                  lambda _: ({"model_id": run.model_id, "type": "create_model"}, "json"))
        return {"request_id": rid, "model_id": run.model_id}

    return await idempotent(request, make)


async def get_info(request: web.Request) -> web.Response:
    st = state(request)
    body = await json_body(request)
    run = st.registry.run(need(body, "model_id", str))
    info = st.model_info(run.base_model)
    return web.json_response({
        "model_id": run.model_id, "type": "get_info", "is_lora": True, "model_name": run.base_model,
        "lora_rank": run.lora.rank, "lora_alpha": run.lora.alpha, "optimizer_config": {"type": "adamw"},
        "model_data": {"arch": info["arch"], "model_name": run.base_model, "tokenizer_id": info["tokenizer_id"]},
    })


async def unload_model(request: web.Request) -> web.Response:
    async def make() -> dict[str, Any]:
        st = state(request)
        body = await json_body(request)
        run = st.registry.run(need(body, "model_id", str))
        return {"request_id": unload_run(st.registry, st.scheduler, run.model_id), "model_id": run.model_id}

    return await idempotent(request, make)


def _encode_forward_backward(result: dict[str, Any]) -> tuple[bytes, str]:
    return encode_forward_backward_output(unpack_outputs(result["outputs"]), result["metrics"]), "proto"


async def forward_backward(request: web.Request) -> web.Response:
    async def make() -> dict[str, Any]:
        st = state(request)
        msg = parse_forward_backward(await request.read(), request.headers.get("Content-Encoding"))
        if msg.loss_fn == "custom":  # its loss may have to be read back from disk: not on the loop
            run = st.registry.run(msg.model_id)
            await st.custom_losses.prefetch(_named_loss_id(msg), run.session_id)
        run = st.registry.run(msg.model_id)  # after the await: the run may have been unloaded meanwhile

        def build():
            fb = forward_backward_from_message(msg)
            batch, config = validate_forward_backward(fb, st.model_info(run.base_model), run.session_id,
                                                      st.custom_losses)
            return {"model_id": run.model_id, "batch": batch, "loss_fn": fb.loss_fn,
                    "loss_fn_config": config, "forward_only": fb.forward_only}, _encode_forward_backward

        return submit_in_order(request, run.model_id, msg.seq_id, "forward_backward", build)

    return await idempotent(request, make)


def _named_loss_id(msg) -> str | None:
    """The `loss_id` a custom-loss request names, if it names one as text."""
    value = msg.loss_fn_config_v2.get("loss_id") if "loss_id" in msg.loss_fn_config_v2 else None
    return value.text if value is not None and value.WhichOneof("value") == "text" else None


def _adam_params(body: dict[str, Any]) -> dict[str, float]:
    if body.get("adam_params") is None and body.get("optimizer_params") is not None:
        kind = (body["optimizer_params"] or {}).get("type")
        raise UserError(f"optimizer {kind!r} is not supported; send adam_params (AdamW)")
    p = need(body, "adam_params", dict)
    adam = {k: float(need(p, k, (int, float))) for k in ADAM_FIELDS}
    if adam["learning_rate"] < 0 or adam["eps"] <= 0 or adam["weight_decay"] < 0 or adam["grad_clip_norm"] < 0:
        raise UserError(f"adam_params out of range (need learning_rate >= 0, eps > 0, weight_decay >= 0, "
                        f"grad_clip_norm >= 0): {adam}")
    if not (0 <= adam["beta1"] < 1 and 0 <= adam["beta2"] < 1):
        raise UserError(f"adam_params beta1 and beta2 must be in [0, 1): {adam}")
    return adam


async def optim_step(request: web.Request) -> web.Response:
    async def make() -> dict[str, Any]:
        st = state(request)
        body = await json_body(request)
        run = st.registry.run(need(body, "model_id", str))
        encode = lambda r: ({"metrics": r["metrics"], "type": "optim_step"}, "json")  # noqa: E731
        return submit_in_order(request, run.model_id, need(body, "seq_id", int), "optim_step",
                               lambda: ({"model_id": run.model_id, "adam": _adam_params(body)}, encode))

    return await idempotent(request, make)
