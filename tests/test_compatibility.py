"""Every public method of the four tinker SDK clients, tried against a real server: docs/compatibility.md.

The methods of ServiceClient, TrainingClient, SamplingClient and RestClient are enumerated by
introspection of the installed SDK and each one, sync and `_async` variant alike, is called for
real over HTTP against a server process. A method "works" when its result is checked and right
(logprobs that match the trainer's, checkpoints that REST lists, restored optimizer state that
takes the same step), is a "clear error" when the server (or the SDK, for client-side limits)
refuses it with a message naming what is unsupported, and "FAILS" otherwise: a hang, an
unexpected or unclear error, or a wrong result. The test writes the table and fails on any
FAILS row, or when the SDK's set of methods differs from the set this file knows how to call
(so a new SDK version forces an update here).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import time
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import tinker
import torch
from tinker import types
from tinker.lib.api_future_impl import QueueState
from tinker.lib.telemetry import Telemetry

from tests.conftest import API_KEY, ROOT
from tests.helpers import logprobs_of, sft_datum

QWEN, LLAMA = "tiny-qwen3", "tiny-llama"
TIMEOUT = 60  # seconds for any one SDK call: nothing may hang the suite
CLIENTS = {"ServiceClient": tinker.ServiceClient, "TrainingClient": tinker.TrainingClient,
           "SamplingClient": tinker.SamplingClient, "RestClient": tinker.RestClient}
DOC = ROOT / "docs" / "compatibility.md"
PROMPT_TOKENS = [9707, 1879, 11]  # "Hello world,"
SEQUENCE = PROMPT_TOKENS + [1075, 374, 264]
DATA = [sft_datum(PROMPT_TOKENS, SEQUENCE[len(PROMPT_TOKENS):])]
WEIGHTS = np.asarray(DATA[0].loss_fn_inputs["weights"].to_numpy(), dtype=np.float64)
ADAM = types.AdamParams(learning_rate=1e-2)
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


# ---- calling a method, sync or async -----------------------------------------------------------
@dataclass(frozen=True)
class Variant:
    """How a check calls the method under test: `name(...)` or `await name_async(...)`, resolved."""

    suffix: str

    @property
    def tag(self) -> str:
        return "async" if self.suffix else "sync"

    def __call__(self, obj: Any, method: str, *args: Any, **kwargs: Any) -> Any:
        if not self.suffix:
            return resolve(getattr(obj, method)(*args, **kwargs))

        async def run() -> Any:
            value = await getattr(obj, method + self.suffix)(*args, **kwargs)
            return await value.result_async(TIMEOUT) if isinstance(value, tinker.APIFuture) else value

        return asyncio.run(asyncio.wait_for(run(), TIMEOUT))


SYNC, ASYNC = Variant(""), Variant("_async")


def resolve(value: Any) -> Any:
    """The value of an SDK future (APIFuture and the client futures), or the value itself."""
    return value.result(timeout=TIMEOUT) if isinstance(value, tinker.APIFuture) else value


# ---- what every check shares ---------------------------------------------------------------------
@dataclass
class Ctx:
    server: Any
    models_dir: Path
    service: tinker.ServiceClient
    rest: tinker.RestClient
    trainer: tinker.TrainingClient  # holds the checkpoints below
    scratch: tinker.TrainingClient  # takes the gradient and optimizer checks
    sampler: tinker.SamplingClient  # samples the sampler checkpoint
    base_lp: np.ndarray  # the base model's logprobs of DATA (an untrained adapter)
    state_path: str  # save_state after one step
    sampler_path: str  # save_weights_for_sampler at the same point
    external_path: str  # save_weights_external at the same point
    state_lp: np.ndarray  # logprobs of DATA at that point
    resumed_lp: np.ndarray  # ... after one more step from there, with the optimizer state

    @property
    def session_id(self) -> str:
        return self.trainer.model_id.split(":train:")[0]

    def new_run(self) -> tinker.TrainingClient:
        """A fresh run with the trainer's LoRA settings (what load_state needs)."""
        return self.service.create_lora_training_client(QWEN, rank=4, seed=9).result(timeout=TIMEOUT)

    def listed(self) -> dict[str, types.Checkpoint]:
        """The trainer's checkpoints by tinker path, as RestClient lists them."""
        listed = self.rest.list_checkpoints(self.trainer.model_id).result(timeout=TIMEOUT).checkpoints
        return {c.tinker_path: c for c in listed}

    def checkpoint(self, path: str) -> types.Checkpoint:
        listed = self.listed()
        assert path in listed, f"{path} is not listed by RestClient.list_checkpoints"
        return listed[path]


def forward_lp(tc: tinker.TrainingClient) -> np.ndarray:
    return logprobs_of(tc.forward(DATA, "cross_entropy").result(timeout=TIMEOUT))[0]


def train_step(tc: tinker.TrainingClient) -> None:
    tc.forward_backward(DATA, "cross_entropy").result(timeout=TIMEOUT)
    tc.optim_step(ADAM).result(timeout=TIMEOUT)


def cross_entropy(lp: np.ndarray) -> float:
    return float(-(lp * WEIGHTS).sum())


def sequence_lp(sampler: tinker.SamplingClient, tokens: list[int]) -> np.ndarray:
    """compute_logprobs of `tokens` without the first (None) entry."""
    got = sampler.compute_logprobs(types.ModelInput.from_ints(tokens)).result(timeout=TIMEOUT)
    assert got[0] is None and len(got) == len(tokens)
    return np.asarray(got[1:], dtype=np.float64)


def assert_near(a: np.ndarray, b: np.ndarray, atol: float = 1e-4) -> None:
    np.testing.assert_allclose(a, b, atol=atol, rtol=0)


def tokenizer_note(tokenizer: Any) -> str:
    assert tokenizer.encode("Hello world") == [9707, 1879]
    return ("client-side AutoTokenizer.from_pretrained(<model name>): works offline when the name is a local "
            "folder or a cached Hugging Face id (checked: local folder, 'Hello world' -> [9707, 1879])")


# ---- ServiceClient ---------------------------------------------------------------------------------
def svc_create_lora_training_client(ctx: Ctx, call: Variant) -> str:
    tc = call(ctx.service, "create_lora_training_client", LLAMA, rank=2, seed=5, train_unembed=False)
    info = tc.get_info()
    assert tc.model_id.startswith(ctx.session_id + ":train:") and info.model_id == tc.model_id
    assert (info.model_data.model_name, info.lora_rank, info.is_lora) == (LLAMA, 2, True)
    assert forward_lp(tc).shape == WEIGHTS.shape
    return "tiny-llama, rank 2: model_id, get_info and a forward are right"


def svc_create_sampling_client(ctx: Ctx, call: Variant) -> str:
    sampler = call(ctx.service, "create_sampling_client", base_model=QWEN)
    assert sampler.get_base_model() == QWEN
    assert_near(sequence_lp(sampler, SEQUENCE), ctx.base_lp)
    return "base model sampler: compute_logprobs equals an untrained adapter's forward"


def svc_from_state(ctx: Ctx, call: Variant) -> str:
    tc = call(ctx.service, "create_training_client_from_state", ctx.state_path)
    assert tc.model_id != ctx.trainer.model_id and tc.get_info().model_data.model_name == QWEN
    assert_near(forward_lp(tc), ctx.state_lp, atol=1e-6)
    train_step(tc)
    assert np.abs(forward_lp(tc) - ctx.resumed_lp).max() > 1e-3, "a fresh AdamW should take a different step"
    return "new run with the checkpoint's weights (same logprobs) and a fresh optimizer"


def svc_from_state_with_optimizer(ctx: Ctx, call: Variant) -> str:
    tc = call(ctx.service, "create_training_client_from_state_with_optimizer", ctx.state_path)
    assert tc.model_id != ctx.trainer.model_id
    assert_near(forward_lp(tc), ctx.state_lp, atol=1e-6)
    train_step(tc)
    assert_near(forward_lp(tc), ctx.resumed_lp, atol=1e-5)
    return "new run with the checkpoint's weights and AdamW state: its next step equals the original run's"


def svc_get_server_capabilities(ctx: Ctx, call: Variant) -> str:
    caps = call(ctx.service, "get_server_capabilities")
    assert {QWEN, LLAMA} <= {m.model_name for m in caps.supported_models}
    return "lists both served models"


def svc_create_rest_client(ctx: Ctx, call: Variant) -> str:
    rest = call(ctx.service, "create_rest_client")
    assert rest.get_training_run(ctx.trainer.model_id).result(timeout=TIMEOUT).base_model == QWEN
    return "the RestClient it returns reads this server's runs"


def neg_log_likelihood(logprobs, weights):
    loss = -(logprobs * weights).sum()
    return loss, {"custom/nll:sum": loss}


def svc_create_custom_loss(ctx: Ctx, call: Variant) -> str:
    handle = call(ctx.service, "create_custom_loss", neg_log_likelihood, {"logprobs": 1, "weights": 1})
    assert handle.loss_id, "the server advertises custom_loss_server_side, so the loss is uploaded"
    expected = cross_entropy(forward_lp(ctx.scratch))
    metrics = ctx.scratch.forward_backward_custom(DATA, handle).result(timeout=TIMEOUT).metrics
    assert metrics["loss:sum"] == pytest.approx(expected, rel=1e-5)
    assert metrics["custom/nll:sum"] == pytest.approx(expected, rel=1e-5)
    return "uploaded (server-side loss); forward_backward_custom with it gives the cross-entropy value"


def svc_close(ctx: Ctx, call: Variant) -> str:
    client = tinker.ServiceClient(base_url=ctx.server.url, api_key=API_KEY)
    client.create_sampling_client(base_model=QWEN).result(timeout=TIMEOUT)  # opens a session
    assert call(client, "close", "success", "compatibility check") is None
    with pytest.raises(RuntimeError, match="closed"):
        client.create_sampling_client(base_model=QWEN)
    return "the server accepts sessions/{id}/finish; the client then refuses new work"


def svc_get_console_url(ctx: Ctx, call: Variant) -> str:
    url = call(ctx.service, "get_console_url")
    assert url.startswith("https://") and ctx.session_id in url
    return "client-side: a link into the hosted Tinker console, which does not know this server's sessions"


def svc_get_telemetry(ctx: Ctx, call: Variant) -> str:
    return telemetry_note(call(ctx.service, "get_telemetry"))


def telemetry_note(telemetry: Any) -> str:
    enabled = os.environ.get("TINKER_TELEMETRY", "1").lower() in {"1", "true", "yes", "on"}
    assert isinstance(telemetry, Telemetry) if enabled else telemetry is None
    return "client-side; its events go to /api/v1/telemetry, which the server accepts"


def svc_copy_weights(ctx: Ctx, call: Variant) -> Any:
    client = tinker.ServiceClient(project_id="compat-project", base_url=ctx.server.url, api_key=API_KEY)
    return call(client, "copy_weights", ctx.state_path)


# ---- TrainingClient --------------------------------------------------------------------------------
def tc_forward(ctx: Ctx, call: Variant) -> str:
    out = call(ctx.scratch, "forward", DATA, "cross_entropy")
    lp = logprobs_of(out)[0]
    assert lp.shape == WEIGHTS.shape and (lp < 0).all()
    assert out.metrics["loss:sum"] == pytest.approx(cross_entropy(lp), rel=1e-5)
    assert_near(forward_lp(ctx.scratch), lp, atol=1e-6)
    return "logprobs shaped like target_tokens, loss:sum = -sum(weights * logprobs), weights unchanged"


def tc_forward_backward(ctx: Ctx, call: Variant) -> str:
    before = forward_lp(ctx.scratch)
    out = call(ctx.scratch, "forward_backward", DATA, "cross_entropy")
    assert_near(logprobs_of(out)[0], before, atol=1e-6)
    assert out.metrics["loss:sum"] == pytest.approx(cross_entropy(before), rel=1e-5)
    return "same logprobs and loss as forward; gradients kept for optim_step"


def client_side_nll(data: list[types.Datum], logprobs: list[torch.Tensor]) -> tuple[torch.Tensor, dict]:
    loss = sum(-(lp * d.loss_fn_inputs["weights"].to_torch()).sum() for d, lp in zip(data, logprobs))
    return loss, {}


def tc_forward_backward_custom(ctx: Ctx, call: Variant) -> str:
    expected = cross_entropy(forward_lp(ctx.scratch))
    out = call(ctx.scratch, "forward_backward_custom", DATA, client_side_nll)
    assert out.metrics["loss:sum"] == pytest.approx(expected, rel=1e-5)
    return "client-side callable (forward, then the SDK's surrogate backward): loss equals cross-entropy"


def tc_optim_step(ctx: Ctx, call: Variant) -> str:
    ctx.scratch.forward_backward(DATA, "cross_entropy").result(timeout=TIMEOUT)
    before = cross_entropy(forward_lp(ctx.scratch))
    result = call(ctx.scratch, "optim_step", ADAM)
    assert isinstance(result, types.OptimStepResponse)
    assert cross_entropy(forward_lp(ctx.scratch)) < before
    return "AdamW step on the accumulated gradients lowers the loss"


def tc_get_info(ctx: Ctx, call: Variant) -> str:
    info = call(ctx.trainer, "get_info")
    assert (info.model_id, info.model_data.model_name, info.lora_rank) == (ctx.trainer.model_id, QWEN, 4)
    return "model_id, base model and LoRA rank"


def tc_get_tokenizer(ctx: Ctx, call: Variant) -> str:
    return tokenizer_note(call(ctx.trainer, "get_tokenizer"))  # get_info names the local tokenizer folder


def tc_save_state(ctx: Ctx, call: Variant) -> str:
    name = f"compat-save-state-{call.tag}"
    path = call(ctx.trainer, "save_state", name).path
    assert path == f"tinker://{ctx.trainer.model_id}/weights/{name}"
    assert ctx.checkpoint(path).checkpoint_type == "training"
    return "tinker://<run>/weights/<name>, listed by REST as a training checkpoint"


def tc_save_weights_for_sampler(ctx: Ctx, call: Variant) -> str:
    name = f"compat-sampler-{call.tag}"
    path = call(ctx.trainer, "save_weights_for_sampler", name).path
    assert path == f"tinker://{ctx.trainer.model_id}/sampler_weights/{name}"
    assert ctx.checkpoint(path).checkpoint_type == "sampler"
    sampler = ctx.service.create_sampling_client(model_path=path).result(timeout=TIMEOUT)
    assert_near(sequence_lp(sampler, SEQUENCE), forward_lp(ctx.trainer))
    return "tinker://<run>/sampler_weights/<name>; a sampler of it matches the trainer"


def tc_save_weights_external(ctx: Ctx, call: Variant) -> str:
    name = f"compat-external-{call.tag}"
    path = call(ctx.trainer, "save_weights_external", name).path
    assert path == f"tinker://{ctx.trainer.model_id}/external_weights/{name}"
    assert ctx.checkpoint(path).checkpoint_type == "external"
    return "tinker://<run>/external_weights/<name>, listed by REST as an external checkpoint"


def tc_save_weights_and_get_sampling_client(ctx: Ctx, call: Variant) -> str:
    sampler = call(ctx.trainer, "save_weights_and_get_sampling_client")
    assert sampler.get_base_model() == QWEN
    assert_near(sequence_lp(sampler, SEQUENCE), forward_lp(ctx.trainer))
    return "ephemeral sampler of the current weights: compute_logprobs matches the trainer's forward"


def tc_create_sampling_client(ctx: Ctx, call: Variant) -> str:
    sampler = call(ctx.trainer, "create_sampling_client", ctx.sampler_path)
    assert_near(sequence_lp(sampler, SEQUENCE), ctx.state_lp)
    return "sampler of a named sampler checkpoint: logprobs of the weights at save time"


def tc_load_state(ctx: Ctx, call: Variant) -> str:
    tc = ctx.new_run()
    call(tc, "load_state", ctx.state_path)
    assert_near(forward_lp(tc), ctx.state_lp, atol=1e-6)
    return "loads the checkpoint's weights into a run with the same LoRA settings"


def tc_load_state_with_optimizer(ctx: Ctx, call: Variant) -> str:
    tc = ctx.new_run()
    call(tc, "load_state_with_optimizer", ctx.state_path)
    assert_near(forward_lp(tc), ctx.state_lp, atol=1e-6)
    train_step(tc)
    assert_near(forward_lp(tc), ctx.resumed_lp, atol=1e-5)
    return "weights and AdamW state: the next step equals the original run's"


def tc_get_console_url(ctx: Ctx, call: Variant) -> str:
    url = call(ctx.trainer, "get_console_url")
    assert url.startswith("https://") and ctx.trainer.model_id in url
    return "client-side: a link into the hosted Tinker console, which does not know this server's runs"


def tc_get_telemetry(ctx: Ctx, call: Variant) -> str:
    return telemetry_note(call(ctx.trainer, "get_telemetry"))


# ---- SamplingClient --------------------------------------------------------------------------------
def sp_sample(ctx: Ctx, call: Variant) -> str:
    prompt, params = types.ModelInput.from_ints(PROMPT_TOKENS), types.SamplingParams(max_tokens=6, seed=11, stop=[])
    out = call(ctx.sampler, "sample", prompt, 2, params)
    again = ctx.sampler.sample(prompt, 2, params).result(timeout=TIMEOUT)
    assert [s.tokens for s in out.sequences] == [s.tokens for s in again.sequences], "the same seed, the same draw"
    for seq in out.sequences:
        assert len(seq.tokens) == len(seq.logprobs) == 6 and seq.stop_reason == "length"
        assert_near(np.asarray(seq.logprobs), sequence_lp(ctx.sampler, PROMPT_TOKENS + seq.tokens)[-6:])
    return "2 seeded samples, reproducible; their logprobs match compute_logprobs of the sampled text"


def sp_compute_logprobs(ctx: Ctx, call: Variant) -> str:
    got = call(ctx.sampler, "compute_logprobs", types.ModelInput.from_ints(SEQUENCE))
    assert got[0] is None
    assert_near(np.asarray(got[1:], dtype=np.float64), ctx.state_lp)
    return "[None, ...] then the trainer's logprobs of the same weights"


def sp_get_base_model(ctx: Ctx, call: Variant) -> str:
    assert call(ctx.sampler, "get_base_model") == QWEN
    return "the checkpoint's base model"


def sp_get_sampler_handle(ctx: Ctx, call: Variant) -> str:
    handle = call(ctx.sampler, "get_sampler_handle")
    assert isinstance(handle, str) and API_KEY not in handle
    clone = tinker.SamplingClient.from_sampler_handle(handle, api_key=API_KEY)
    assert_near(sequence_lp(clone, SEQUENCE), ctx.state_lp)
    return "a credential-free string; from_sampler_handle(handle) samples the same weights"


def sp_from_sampler_handle(ctx: Ctx, call: Variant) -> str:
    clone = call(tinker.SamplingClient, "from_sampler_handle", ctx.sampler.get_sampler_handle(), api_key=API_KEY)
    assert clone.get_base_model() == QWEN
    assert_near(sequence_lp(clone, SEQUENCE), ctx.state_lp)
    return "a new client for the same sampler (same logprobs)"


def sp_create(ctx: Ctx, call: Variant) -> str:
    sampler = call(tinker.SamplingClient, "create", ctx.service.holder, model_path=ctx.sampler_path)
    assert sampler.get_base_model() == QWEN
    assert_near(sequence_lp(sampler, SEQUENCE), ctx.state_lp)
    return "static, takes the SDK's internal client holder; samples the checkpoint's weights"


def sp_on_queue_state_change(ctx: Ctx, call: Variant) -> str:
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("tinker.lib.public_interfaces.sampling_client")
    logger.addHandler(handler)
    try:
        call(ctx.sampler, "on_queue_state_change", QueueState.PAUSED_CAPACITY, "compat reason")
    finally:
        logger.removeHandler(handler)
    assert any("Reason: compat reason" in r.getMessage() for r in records)
    return "client-side callback of the futures poller: logs the queue-state reason"


def sp_get_tokenizer(ctx: Ctx, call: Variant) -> str:
    with contextlib.chdir(ctx.models_dir):  # where the model names are tokenizer folders
        return tokenizer_note(call(ctx.sampler, "get_tokenizer"))


def sp_get_telemetry(ctx: Ctx, call: Variant) -> str:
    return telemetry_note(call(ctx.sampler, "get_telemetry"))


# ---- RestClient ------------------------------------------------------------------------------------
def rest_get_server_capabilities(ctx: Ctx, call: Variant) -> str:
    caps = call(ctx.rest, "get_server_capabilities")
    assert {QWEN, LLAMA} <= {m.model_name for m in caps.supported_models}
    return "lists both served models"


def rest_get_training_run(ctx: Ctx, call: Variant) -> str:
    run = call(ctx.rest, "get_training_run", ctx.trainer.model_id)
    assert (run.training_run_id, run.base_model, run.lora_rank, run.is_lora) == (ctx.trainer.model_id, QWEN, 4, True)
    return "id, base model, LoRA rank"


def rest_get_training_run_by_tinker_path(ctx: Ctx, call: Variant) -> str:
    run = call(ctx.rest, "get_training_run_by_tinker_path", ctx.state_path)
    assert (run.training_run_id, run.base_model) == (ctx.trainer.model_id, QWEN)
    return "the run that wrote the checkpoint"


def rest_get_weights_info_by_tinker_path(ctx: Ctx, call: Variant) -> str:
    info = call(ctx.rest, "get_weights_info_by_tinker_path", ctx.state_path)
    assert (info.base_model, info.is_lora, info.lora_rank) == (QWEN, True, 4)
    return "base model, LoRA rank"


def rest_list_training_runs(ctx: Ctx, call: Variant) -> str:
    runs = call(ctx.rest, "list_training_runs", limit=1000)
    assert ctx.trainer.model_id in {r.training_run_id for r in runs.training_runs}
    assert runs.cursor.total_count >= len(runs.training_runs)
    return "includes this run; paged with a cursor"


def rest_list_checkpoints(ctx: Ctx, call: Variant) -> str:
    listed = call(ctx.rest, "list_checkpoints", ctx.trainer.model_id).checkpoints
    types_by_path = {c.tinker_path: c.checkpoint_type for c in listed}
    assert types_by_path[ctx.state_path] == "training" and types_by_path[ctx.sampler_path] == "sampler"
    return "the run's checkpoints with their types"


def rest_list_user_checkpoints(ctx: Ctx, call: Variant) -> str:
    listed = call(ctx.rest, "list_user_checkpoints", limit=1000)
    assert {ctx.state_path, ctx.sampler_path} <= {c.tinker_path for c in listed.checkpoints}
    return "every checkpoint on the server, paged"


def rest_get_external_weights_urls(ctx: Ctx, call: Variant) -> str:
    urls = call(ctx.rest, "get_external_weights_urls", ctx.external_path).urls
    with urllib.request.urlopen(urls["adapter_config.json"], timeout=TIMEOUT) as r:  # signed: no API key
        assert json.loads(r.read())["r"] == 4
    return "signed URLs of the PEFT files; plain GET fetches adapter_config.json"


def fresh_checkpoint(ctx: Ctx, name: str) -> str:
    return ctx.trainer.save_state(name, overwrite=True).result(timeout=TIMEOUT).path


def rest_delete_checkpoint(ctx: Ctx, call: Variant) -> str:
    path = fresh_checkpoint(ctx, f"compat-delete-{call.tag}")
    call(ctx.rest, "delete_checkpoint", ctx.trainer.model_id, path.split("/", 3)[3])
    assert path not in ctx.listed()
    return "by run id and checkpoint id; gone from the listing"


def rest_delete_checkpoint_from_tinker_path(ctx: Ctx, call: Variant) -> str:
    path = fresh_checkpoint(ctx, f"compat-delete-path-{call.tag}")
    call(ctx.rest, "delete_checkpoint_from_tinker_path", path)
    assert path not in ctx.listed()
    return "gone from the listing"


def rest_publish(ctx: Ctx, call: Variant) -> str:
    path = fresh_checkpoint(ctx, f"compat-publish-{call.tag}")
    call(ctx.rest, "publish_checkpoint_from_tinker_path", path)
    assert ctx.checkpoint(path).public
    return "the checkpoint is listed as public"


def rest_unpublish(ctx: Ctx, call: Variant) -> str:
    path = fresh_checkpoint(ctx, f"compat-unpublish-{call.tag}")
    ctx.rest.publish_checkpoint_from_tinker_path(path).result(timeout=TIMEOUT)
    call(ctx.rest, "unpublish_checkpoint_from_tinker_path", path)
    assert not ctx.checkpoint(path).public
    return "the checkpoint is listed as private again"


def rest_set_ttl(ctx: Ctx, call: Variant) -> str:
    path = fresh_checkpoint(ctx, f"compat-ttl-{call.tag}")
    call(ctx.rest, "set_checkpoint_ttl_from_tinker_path", path, 3600)
    expires = ctx.checkpoint(path).expires_at
    assert expires is not None and abs(expires.timestamp() - (time.time() + 3600)) < 300
    call(ctx.rest, "set_checkpoint_ttl_from_tinker_path", path, None)
    assert ctx.checkpoint(path).expires_at is None
    return "expires_at set to now + TTL, and cleared by None"


def rest_get_session(ctx: Ctx, call: Variant) -> str:
    session = call(ctx.rest, "get_session", ctx.session_id)
    assert ctx.trainer.model_id in session.training_run_ids and session.sampler_ids
    return "the session's training runs and samplers"


def rest_list_sessions(ctx: Ctx, call: Variant) -> str:
    assert ctx.session_id in call(ctx.rest, "list_sessions", limit=1000).sessions
    return "includes this session"


def rest_get_sampler(ctx: Ctx, call: Variant) -> str:
    ids = ctx.rest.get_session(ctx.session_id).result(timeout=TIMEOUT).sampler_ids
    samplers = [call(ctx.rest, "get_sampler", sampler_id) for sampler_id in ids]
    assert all(s.base_model in (QWEN, LLAMA) for s in samplers)
    assert any(s.model_path == ctx.sampler_path and s.base_model == QWEN for s in samplers)
    return "base model and model_path of each of the session's samplers"


def rest_get_telemetry(ctx: Ctx, call: Variant) -> str:
    return telemetry_note(call(ctx.rest, "get_telemetry"))


# ---- the table of checks ---------------------------------------------------------------------------
Check = Callable[[Ctx, Variant], str]
BOTH, SYNC_ONLY = (SYNC, ASYNC), (SYNC,)


@dataclass(frozen=True)
class Refusal:
    """A method this server (or the SDK against it) cannot serve: it must fail fast, saying so."""

    invoke: Callable[[Ctx, Variant], Any]
    must_mention: str


def rest_refusal(method: str, mention: str, args: Callable[[Ctx], tuple] = lambda ctx: ()) -> Refusal:
    return Refusal(lambda ctx, call: call(ctx.rest, method, *args(ctx)), mention)


# (client, method without `_async`, check, variants), in the order they run.
CHECKS: list[tuple[str, str, Check | Refusal, tuple[Variant, ...]]] = [
    ("ServiceClient", "create_lora_training_client", svc_create_lora_training_client, BOTH),
    ("ServiceClient", "create_sampling_client", svc_create_sampling_client, BOTH),
    ("ServiceClient", "create_training_client_from_state", svc_from_state, BOTH),
    ("ServiceClient", "create_training_client_from_state_with_optimizer", svc_from_state_with_optimizer, BOTH),
    ("ServiceClient", "get_server_capabilities", svc_get_server_capabilities, BOTH),
    ("ServiceClient", "create_rest_client", svc_create_rest_client, SYNC_ONLY),
    ("ServiceClient", "create_custom_loss", svc_create_custom_loss, SYNC_ONLY),
    ("ServiceClient", "get_console_url", svc_get_console_url, SYNC_ONLY),
    ("ServiceClient", "get_telemetry", svc_get_telemetry, SYNC_ONLY),
    ("ServiceClient", "copy_weights", Refusal(svc_copy_weights, "/api/v1/copy_weights"), SYNC_ONLY),
    ("TrainingClient", "forward", tc_forward, BOTH),
    ("TrainingClient", "forward_backward", tc_forward_backward, BOTH),
    ("TrainingClient", "forward_backward_custom", tc_forward_backward_custom, BOTH),
    ("TrainingClient", "optim_step", tc_optim_step, BOTH),
    ("TrainingClient", "get_info", tc_get_info, BOTH),
    ("TrainingClient", "get_tokenizer", tc_get_tokenizer, SYNC_ONLY),
    ("TrainingClient", "save_state", tc_save_state, BOTH),
    ("TrainingClient", "save_weights_for_sampler", tc_save_weights_for_sampler, BOTH),
    ("TrainingClient", "save_weights_external", tc_save_weights_external, BOTH),
    ("TrainingClient", "save_weights_and_get_sampling_client", tc_save_weights_and_get_sampling_client, BOTH),
    ("TrainingClient", "create_sampling_client", tc_create_sampling_client, BOTH),
    ("TrainingClient", "load_state", tc_load_state, BOTH),
    ("TrainingClient", "load_state_with_optimizer", tc_load_state_with_optimizer, BOTH),
    ("TrainingClient", "get_console_url", tc_get_console_url, SYNC_ONLY),
    ("TrainingClient", "get_telemetry", tc_get_telemetry, SYNC_ONLY),
    ("SamplingClient", "sample", sp_sample, BOTH),
    ("SamplingClient", "compute_logprobs", sp_compute_logprobs, BOTH),
    ("SamplingClient", "get_base_model", sp_get_base_model, BOTH),
    ("SamplingClient", "get_sampler_handle", sp_get_sampler_handle, SYNC_ONLY),
    ("SamplingClient", "from_sampler_handle", sp_from_sampler_handle, SYNC_ONLY),
    ("SamplingClient", "create", sp_create, SYNC_ONLY),
    ("SamplingClient", "on_queue_state_change", sp_on_queue_state_change, SYNC_ONLY),
    ("SamplingClient", "get_tokenizer", sp_get_tokenizer, SYNC_ONLY),
    ("SamplingClient", "get_telemetry", sp_get_telemetry, SYNC_ONLY),
    ("RestClient", "get_server_capabilities", rest_get_server_capabilities, SYNC_ONLY),
    ("RestClient", "get_training_run", rest_get_training_run, BOTH),
    ("RestClient", "get_training_run_by_tinker_path", rest_get_training_run_by_tinker_path, BOTH),
    ("RestClient", "get_weights_info_by_tinker_path", rest_get_weights_info_by_tinker_path, SYNC_ONLY),
    ("RestClient", "list_training_runs", rest_list_training_runs, BOTH),
    ("RestClient", "list_checkpoints", rest_list_checkpoints, BOTH),
    ("RestClient", "list_user_checkpoints", rest_list_user_checkpoints, BOTH),
    ("RestClient", "get_external_weights_urls", rest_get_external_weights_urls, BOTH),
    ("RestClient", "delete_checkpoint", rest_delete_checkpoint, BOTH),
    ("RestClient", "delete_checkpoint_from_tinker_path", rest_delete_checkpoint_from_tinker_path, BOTH),
    ("RestClient", "publish_checkpoint_from_tinker_path", rest_publish, BOTH),
    ("RestClient", "unpublish_checkpoint_from_tinker_path", rest_unpublish, BOTH),
    ("RestClient", "set_checkpoint_ttl_from_tinker_path", rest_set_ttl, BOTH),
    ("RestClient", "get_session", rest_get_session, BOTH),
    ("RestClient", "list_sessions", rest_list_sessions, BOTH),
    ("RestClient", "get_sampler", rest_get_sampler, BOTH),
    ("RestClient", "get_telemetry", rest_get_telemetry, SYNC_ONLY),
    ("RestClient", "copy_weights",
     rest_refusal("copy_weights", "/api/v1/copy_weights", lambda ctx: (ctx.state_path, "compat-project")), BOTH),
    ("RestClient", "assign_session_project",
     rest_refusal("assign_session_project", "/project", lambda ctx: (ctx.session_id, "compat-project")), BOTH),
    ("RestClient", "export_session_trace",
     rest_refusal("export_session_trace", "/trace_export", lambda ctx: (ctx.session_id,)), BOTH),
    ("RestClient", "get_audit_log", rest_refusal("get_audit_log", "/api/v1/audit"), BOTH),
    ("RestClient", "get_billing_usage",
     rest_refusal("get_billing_usage", "/api/v1/billing/usage", lambda ctx: ("2025-01-01", "2025-02-01")), BOTH),
    ("RestClient", "get_current_checkpoint_storage_usage",
     rest_refusal("get_current_checkpoint_storage_usage", "/api/v1/billing/usage/checkpoints"), BOTH),
    ("RestClient", "search_sessions",
     rest_refusal("search_sessions", "/api/v1/sessions/search", lambda ctx: (types.SessionSearchRequest(),)),
     SYNC_ONLY),
    ("RestClient", "whoami", rest_refusal("whoami", "requires JWT auth"), SYNC_ONLY),
    ("ServiceClient", "close", svc_close, SYNC_ONLY),
]


# ---- running the checks and writing the table ------------------------------------------------------
@dataclass(frozen=True)
class Row:
    client: str
    method: str
    status: str  # "works" | "clear error" | "FAILS"
    note: str


def public_methods(cls: type) -> set[str]:
    return {name for name in dir(cls) if not name.startswith("_") and callable(getattr(cls, name))}


def enumerated() -> set[tuple[str, str]]:
    return {(client, name) for client, cls in CLIENTS.items() for name in public_methods(cls)}


def known() -> set[tuple[str, str]]:
    return {(client, method + v.suffix) for client, method, _, variants in CHECKS for v in variants}


def clean(message: str) -> str:
    """A message fit for a table cell, without the ids that change from run to run."""
    return UUID.sub("<id>", " ".join(message.split())).replace("|", "\\|")[:300]


def warned_note(caught: list[warnings.WarningMessage]) -> str:
    texts = [str(w.message) for w in caught]
    if any("DEPRECATED" in t for t in texts):
        return "deprecated (FutureWarning). "
    if any("experimental" in t for t in texts):
        return "experimental (ExperimentalWarning). "
    return ""


def run_check(ctx: Ctx, client: str, method: str, check: Check | Refusal, call: Variant) -> Row:
    name = method + call.suffix
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if isinstance(check, Refusal):
                value = check.invoke(ctx, call)
                return Row(client, name, "FAILS", f"expected a refusal naming {check.must_mention!r}, "
                                                  f"got a result: {clean(repr(value))}; update this check")
            note = check(ctx, call)
        except AssertionError as e:
            return Row(client, name, "FAILS", clean(f"wrong result: {e}"))
        except (TimeoutError, asyncio.TimeoutError):
            return Row(client, name, "FAILS", f"no answer within {TIMEOUT} s")
        except Exception as e:  # noqa: BLE001 - every other outcome is recorded in the table
            message = f"{type(e).__name__}: {e}"
            if isinstance(check, Refusal) and check.must_mention in str(e):
                return Row(client, name, "clear error", warned_note(caught) + clean(message))
            return Row(client, name, "FAILS", clean(f"unexpected error: {message}"))
    return Row(client, name, "works", warned_note(caught) + note)


def run_all(ctx: Ctx) -> list[Row]:
    rows = [run_check(ctx, client, method, check, call)
            for client, method, check, variants in CHECKS for call in variants]
    rows += [Row(client, name, "FAILS", "in the installed SDK, but no check here knows how to call it")
             for client, name in sorted(enumerated() - known())]
    rows += [Row(client, name, "FAILS", "checked here, but not a public method of the installed SDK")
             for client, name in sorted(known() - enumerated())]
    return rows


def write_table(rows: list[Row]) -> None:
    order = list(CLIENTS)
    rows = sorted(rows, key=lambda r: (order.index(r.client), r.method.removesuffix("_async"), r.method))
    counts = {s: sum(r.status == s for r in rows) for s in ("works", "clear error", "FAILS")}
    lines = [
        "# Compatibility with the tinker SDK",
        "",
        f"Generated by `tests/test_compatibility.py` against tinker=={tinker.__version__}: every public method of "
        "ServiceClient, TrainingClient, SamplingClient and RestClient (found by introspection, sync and `_async` "
        "variants alike) called for real against a TinkerCloud server process serving tiny Qwen3 and Llama "
        "models. **works**: called with sensible arguments and its result checked; **clear error**: refused "
        "at once with the message shown; **FAILS**: anything else (the test fails). Do not edit by hand.",
        "",
        f"Summary: {len(rows)} methods; {counts['works']} work, {counts['clear error']} give a clear error, "
        f"{counts['FAILS']} fail.",
        "",
        "| Client | Method | Status | Note |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r.client} | `{r.method}` | {r.status} | {r.note} |" for r in rows]
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text("\n".join(lines) + "\n")


# ---- the test --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ctx(server, tiny_models) -> Ctx:
    service = tinker.ServiceClient(base_url=server.url, api_key=API_KEY)
    trainer = service.create_lora_training_client(QWEN, rank=4, seed=1).result(timeout=TIMEOUT)
    base_lp = forward_lp(trainer)  # LoRA starts as the identity: the base model
    train_step(trainer)
    state_path = trainer.save_state("compat-state").result(timeout=TIMEOUT).path
    sampler_path = trainer.save_weights_for_sampler("compat-sampler").result(timeout=TIMEOUT).path
    external_path = trainer.save_weights_external("compat-external").result(timeout=TIMEOUT).path
    state_lp = forward_lp(trainer)
    train_step(trainer)
    return Ctx(
        server=server, models_dir=tiny_models[QWEN].parent, service=service,
        rest=tinker.RestClient(base_url=server.url, api_key=API_KEY), trainer=trainer,
        scratch=service.create_lora_training_client(QWEN, rank=4, seed=2).result(timeout=TIMEOUT),
        sampler=service.create_sampling_client(model_path=sampler_path).result(timeout=TIMEOUT),
        base_lp=base_lp, state_path=state_path, sampler_path=sampler_path, external_path=external_path,
        state_lp=state_lp, resumed_lp=forward_lp(trainer))


def test_every_public_sdk_method_works_or_fails_clearly(ctx):
    rows = run_all(ctx)
    write_table(rows)
    assert enumerated() == known(), "the SDK's public methods changed: update CHECKS (see docs/compatibility.md)"
    failing = [f"{r.client}.{r.method}: {r.note}" for r in rows if r.status == "FAILS"]
    assert not failing, "\n".join(failing)
