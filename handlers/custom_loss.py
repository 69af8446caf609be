"""POST /api/v1/create_custom_loss: accept a traced custom loss, check it, keep it by loss_id.

The uploaded graph is rebuilt from allow-lists (`backends.common.custom_loss`) before it is
accepted; one that uses anything else fails its future with a user error naming the node and
the op. An accepted loss belongs to the session that created it and lives as long as this
server process (the SDK uploads each loss once per session, then names it by `loss_id` in
`forward_backward` requests with `loss_fn: "custom"`).
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from backends.common.custom_loss import CustomLoss
from engine.messages import UserError
from handlers.common import idempotent, json_body, need, state
from handlers.state import BoundedDict

MAX_STORED_LOSSES = 4096


@dataclass(frozen=True)
class _StoredLoss:
    session_id: str
    loss: CustomLoss


_losses: BoundedDict = BoundedDict(MAX_STORED_LOSSES)  # loss_id -> _StoredLoss


def find_loss(loss_id: str, session_id: str) -> CustomLoss:
    """The loss `loss_id`, if the session `session_id` created it; else UserError."""
    stored = _losses.get(loss_id)
    if stored is None:
        raise UserError(f"unknown custom loss_id {loss_id!r} (create it with create_custom_loss on this server; "
                        "losses do not survive a server restart)")
    if stored.session_id != session_id:
        raise UserError(f"custom loss {loss_id!r} belongs to another session; create it in this one")
    return stored.loss


async def create_custom_loss(request: web.Request) -> web.Response:
    async def make() -> dict[str, Any]:
        st = state(request)
        body = await json_body(request)
        session = st.registry.session(need(body, "session_id", str))
        request_id = st.futures.create()
        try:
            loss = CustomLoss.parse(body.get("name"), body.get("inputs"), body.get("graph"))
        except UserError as e:
            st.futures.fail(request_id, str(e), "user")
        else:
            loss_id = f"loss-{uuid.uuid4().hex}"
            _losses[loss_id] = _StoredLoss(session.session_id, loss)
            st.futures.complete(request_id, {"loss_id": loss_id, "type": "create_custom_loss"})
        return {"request_id": request_id}

    return await idempotent(request, make)
