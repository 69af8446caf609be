"""Weight routes: save_weights_for_sampler (named checkpoints and ephemeral samplers).

A sampler always reads a frozen snapshot taken at save time, never the live adapter.
"""
from __future__ import annotations

import uuid
from typing import Any

from aiohttp import web

from engine.registry import TinkerPath, check_checkpoint_name
from handlers.common import idempotent, json_body, need, opt, state, submit_in_order


async def save_weights_for_sampler(request: web.Request) -> web.Response:
    async def make() -> dict[str, Any]:
        st = state(request)
        body = await json_body(request)
        run = st.registry.run(need(body, "model_id", str))

        def build():
            snapshot = f"snap-{uuid.uuid4().hex}"
            args = {"model_id": run.model_id, "sampler_key": snapshot, "path": None, "meta": None}
            name = opt(body, "path", str, None)
            if name is not None:
                path = TinkerPath(run.model_id, "sampler_weights", check_checkpoint_name(name))
                args["path"] = str(st.registry.checkpoint_dir(path))
                args["meta"] = {"snapshot_id": snapshot, "base_model": run.base_model, "tinker_path": str(path),
                                "kind": "sampler_weights", "ttl_seconds": body.get("ttl_seconds")}
                result = {"path": str(path), "sampling_session_id": None}
            else:
                seq = need(body, "sampling_session_seq_id", int)
                sampler = st.registry.new_sampler(run.session_id, seq, run.base_model, None, {"key": snapshot})
                result = {"path": None, "sampling_session_id": sampler.sampler_id}
            return args, lambda _: ({**result, "type": "save_weights_for_sampler"}, "json")

        return submit_in_order(request, run.model_id, need(body, "seq_id", int), "save_for_sampler", build)

    return await idempotent(request, make)
