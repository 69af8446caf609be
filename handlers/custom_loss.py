"""POST /api/v1/create_custom_loss: accept a traced custom loss, check it, keep it by loss_id.

The uploaded graph is rebuilt from allow-lists (`backends.common.custom_loss`) before it is
accepted; one that uses anything else fails its future with a user error naming the node and
the op. An accepted loss belongs to the session that created it and is kept in the server's
`CustomLossStore` (handlers/state.py): on disk under the data dir, so it survives a restart,
and parsed in memory while recently used. The SDK uploads each loss once per session, then
names it by `loss_id` in `forward_backward` requests with `loss_fn: "custom"`.
"""
from __future__ import annotations

from typing import Any

from aiohttp import web

from backends.common.custom_loss import CustomLoss
from engine.messages import UserError
from handlers.common import idempotent, json_body, need, state


async def create_custom_loss(request: web.Request) -> web.Response:
    async def make() -> dict[str, Any]:
        st = state(request)
        body = await json_body(request)
        session = st.registry.session(need(body, "session_id", str))
        if session.finished:  # its losses are deleted at the next sweep
            raise UserError(f"session {session.session_id} has finished; create a new one")
        request_id = st.futures.create()
        try:
            loss = CustomLoss.parse(body.get("name"), body.get("inputs"), body.get("graph"))
        except UserError as e:
            st.futures.fail(request_id, str(e), "user")
            return {"request_id": request_id}
        try:
            loss_id = await st.custom_losses.add(session.session_id, loss)
        except OSError as e:
            st.futures.fail(request_id, f"could not store the custom loss: {type(e).__name__}: {e}", "server")
        else:
            st.futures.complete(request_id, {"loss_id": loss_id, "type": "create_custom_loss"})
        return {"request_id": request_id}

    return await idempotent(request, make)
