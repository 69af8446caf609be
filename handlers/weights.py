"""Weight routes: save and load checkpoints, sampler snapshots, external exports, weights_info.

Every save is a `tinker://<run>/<kind>/<name>` folder in standard PEFT format, written
atomically by the workers in the model's seq_id order: `save_weights` (kind `weights`, with
the AdamW state), `save_weights_for_sampler` (kind `sampler_weights`, or an ephemeral sampler
with no path) and `save_weights_external` (kind `external_weights`, what `tinker checkpoint
download` fetches). A sampler always reads a frozen snapshot taken at save time, never the
live adapter. `load_weights` either loads into an existing run (in its seq_id order) or
creates a new run from a checkpoint (`create_training_client_from_state*`).
"""
from __future__ import annotations

import asyncio
from typing import Any, Callable

from aiohttp import web

from engine.messages import UserError
from engine.registry import (LoraSpec, TinkerPath, TrainingRun, check_checkpoint_name, new_snapshot_id,
                             parse_tinker_path)
from handlers.common import check_optimizer_config, idempotent, json_body, need, opt, state, submit_in_order
from handlers.state import ServerState


def _new_checkpoint(st: ServerState, run: TrainingRun, kind: str, body: dict[str, Any]) -> tuple[TinkerPath, dict, str]:
    """(tinker path, metadata, folder) for saving `body["path"]` of `run` as `kind`."""
    path = TinkerPath(run.model_id, kind, check_checkpoint_name(need(body, "path", str)))
    meta = st.registry.new_checkpoint_meta(path, run, body.get("ttl_seconds"), body.get("user_metadata"))
    return path, meta, str(st.registry.checkpoint_dir(path))


def _replying(reply: dict[str, Any]) -> Callable[[Any], tuple[dict[str, Any], str]]:
    return lambda _: (reply, "json")


async def save_weights_for_sampler(request: web.Request) -> web.Response:
    async def make() -> dict[str, Any]:
        st = state(request)
        body = await json_body(request)
        run = st.registry.run(need(body, "model_id", str))

        def build():
            if body.get("path") is not None:
                path, meta, folder = _new_checkpoint(st, run, "sampler_weights", body)
                args = {"model_id": run.model_id, "sampler_key": meta["snapshot_id"], "path": folder, "meta": meta,
                        "evict": st.snapshots.saved(meta["snapshot_id"])}
                reply = {"path": str(path), "sampling_session_id": None}
            else:
                seq = need(body, "sampling_session_seq_id", int)
                snapshot = new_snapshot_id()
                sampler = st.registry.new_sampler(run.session_id, seq, run.base_model, None, {"key": snapshot})
                args = {"model_id": run.model_id, "sampler_key": snapshot, "path": None, "meta": None,
                        "evict": st.snapshots.saved(snapshot)}
                reply = {"path": None, "sampling_session_id": sampler.sampler_id}
            return args, _replying({**reply, "type": "save_weights_for_sampler"})

        return submit_in_order(request, run.model_id, need(body, "seq_id", int), "save_for_sampler", build)

    return await idempotent(request, make)


async def save_weights(request: web.Request) -> web.Response:
    """`save_state`: the adapter and its AdamW state, refusing an existing name unless `overwrite`."""
    return await _save_checkpoint(request, "weights", "save_weights", with_optimizer=True)


async def save_weights_external(request: web.Request) -> web.Response:
    """The adapter alone, for download (`tinker checkpoint download` exports through this)."""
    return await _save_checkpoint(request, "external_weights", "save_weights_external", with_optimizer=False)


async def _save_checkpoint(request: web.Request, kind: str, reply_type: str, with_optimizer: bool) -> web.Response:
    async def make() -> dict[str, Any]:
        st = state(request)
        body = await json_body(request)
        run = st.registry.run(need(body, "model_id", str))

        def build():
            path, meta, folder = _new_checkpoint(st, run, kind, body)
            args = {"model_id": run.model_id, "path": folder, "meta": meta,
                    "overwrite": opt(body, "overwrite", bool, False), "with_optimizer": with_optimizer}
            return args, _replying({"path": str(path), "type": reply_type})

        return submit_in_order(request, run.model_id, need(body, "seq_id", int), "save_checkpoint", build)

    return await idempotent(request, make)


async def _read_checkpoint(st: ServerState, body: dict[str, Any]) -> tuple[TinkerPath, dict[str, Any]] | UserError:
    """(path, metadata) of the checkpoint a load_weights request names, read in a worker thread
    (the lookup may also remove an expired checkpoint); or the UserError saying what is wrong,
    for `_loadable` to raise in the request's turn."""
    try:
        path = parse_tinker_path(need(body, "path", str))
        return path, await asyncio.to_thread(st.registry.checkpoint_info, path)
    except UserError as e:
        return e


def _loadable(body: dict[str, Any], found: tuple[TinkerPath, dict[str, Any]] | UserError,
              ) -> tuple[TinkerPath, dict[str, Any], bool]:
    """(path, metadata, with_optimizer) of the checkpoint a load_weights request names."""
    if isinstance(found, UserError):
        raise found
    path, meta = found
    with_optimizer = opt(body, "optimizer", bool, False)
    if with_optimizer and path.kind != "weights":
        raise UserError(f"{path} holds no optimizer state (only weights/ checkpoints from save_state do); "
                        "load it without the optimizer")
    return path, meta, with_optimizer


async def load_weights(request: web.Request) -> web.Response:
    async def make() -> dict[str, Any]:
        st = state(request)
        body = await json_body(request)
        if body.get("session_id") is not None:
            return _create_run_from_checkpoint(st, body, await _read_checkpoint(st, body))
        found = await _read_checkpoint(st, body)
        run = st.registry.run(need(body, "model_id", str))  # after the await: it may have been unloaded meanwhile

        def build():
            path, meta, with_optimizer = _loadable(body, found)
            if meta["base_model"] != run.base_model:
                raise UserError(f"{path} was trained on {meta['base_model']}, but {run.model_id} is {run.base_model}")
            if meta["lora"] != run.lora.flags():
                raise UserError(f"{path} has LoRA settings {meta['lora']}, which differ from {run.model_id}'s "
                                f"{run.lora.flags()}; create a new training client from it instead")
            args = {"model_id": run.model_id, "base_model": run.base_model,
                    "path": str(st.registry.checkpoint_dir(path)), "with_optimizer": with_optimizer}
            return args, _replying({"path": str(path), "model_id": run.model_id, "type": "load_weights"})

        return submit_in_order(request, run.model_id, need(body, "seq_id", int), "load_checkpoint", build)

    return await idempotent(request, make)


def _create_run_from_checkpoint(st: ServerState, body: dict[str, Any], found) -> dict[str, Any]:
    """create_training_client_from_state[_with_optimizer]: a new run whose first act is the load.
    The SDK computes the model id itself (`<session>:train:<model_seq_id>`)."""
    path, meta, with_optimizer = _loadable(body, found)
    base_model = opt(body, "base_model", str, meta["base_model"])
    if base_model != meta["base_model"]:
        raise UserError(f"{path} was trained on {meta['base_model']}; it cannot be loaded onto {base_model}")
    st.model_info(base_model)
    check_optimizer_config(body)
    run = st.registry.new_run(need(body, "session_id", str), need(body, "model_seq_id", int), base_model,
                              LoraSpec(**meta["lora"]), opt(body, "user_metadata", dict, {}))
    args = {"model_id": run.model_id, "base_model": base_model, "path": str(st.registry.checkpoint_dir(path)),
            "with_optimizer": with_optimizer}
    rid = st.scheduler.submit("load_checkpoint", args,
                              _replying({"path": str(path), "model_id": run.model_id, "type": "load_weights"}))
    return {"request_id": rid, "model_id": run.model_id}


async def weights_info(request: web.Request) -> web.Response:
    body = await json_body(request)
    path = parse_tinker_path(need(body, "tinker_path", str))
    meta = (await asyncio.to_thread(state(request).registry.checkpoint, path)).meta
    lora = meta["lora"]
    return web.json_response({
        "base_model": meta["base_model"], "is_lora": True, "lora_rank": lora["rank"], "lora_alpha": lora["alpha"],
        "train_attn": lora["train_attn"], "train_mlp": lora["train_mlp"], "train_unembed": lora["train_unembed"],
        "optimizer_config": {"type": "adamw"},
    })
