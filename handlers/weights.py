"""Weight routes: save_weights_for_sampler (named checkpoints and ephemeral samplers).

A sampler always reads a frozen snapshot taken at save time, never the live adapter.
"""
from __future__ import annotations

import uuid
from typing import Any

from aiohttp import web

from engine.messages import UserError
from engine.registry import TinkerPath, check_checkpoint_name
from handlers.common import idempotent, json_body, need, opt, state


async def save_weights_for_sampler(request: web.Request) -> web.Response:
    async def make() -> dict[str, Any]:
        st = state(request)
        body = await json_body(request)
        run = st.registry.run(need(body, "model_id", str))
        seq_id = need(body, "seq_id", int)
        snapshot = f"snap-{uuid.uuid4().hex}"
        name = opt(body, "path", str, None)
        args, rejection, result = None, None, {}
        try:
            if name is not None:
                path = TinkerPath(run.model_id, "sampler_weights", check_checkpoint_name(name))
                meta = {"snapshot_id": snapshot, "base_model": run.base_model, "tinker_path": str(path),
                        "kind": "sampler_weights", "lora": vars(run.lora), "ttl_seconds": body.get("ttl_seconds")}
                args = {"path": str(st.registry.checkpoint_dir(path)), "meta": meta}
                result = {"path": str(path), "sampling_session_id": None}
            else:
                seq = need(body, "sampling_session_seq_id", int)
                sampler = st.registry.new_sampler(run.session_id, seq, run.base_model, None, {"key": snapshot})
                args = {"path": None, "meta": None}
                result = {"path": None, "sampling_session_id": sampler.sampler_id}
            args.update(model_id=run.model_id, sampler_key=snapshot)
        except UserError as e:
            rejection = str(e)
        rid = st.scheduler.submit_ordered(run.model_id, seq_id, "save_for_sampler", args,
                                          lambda _: ({**result, "type": "save_weights_for_sampler"}, "json"), rejection)
        return {"request_id": rid, "model_id": run.model_id}

    return await idempotent(request, make)
