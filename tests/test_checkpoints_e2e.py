"""Checkpoints through the real SDK: save_state, resume after a server restart, load_state, bad input.

The restart test runs its own server twice on one data dir; the others share the session server.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import tinker
import torch
from safetensors.torch import load_file, save_file
from tinker import types

from tests.conftest import API_KEY, ServerProcess
from tests.helpers import RawClient, fb_body, logprobs_of, sft_datum

QWEN, LLAMA = "tiny-qwen3", "tiny-llama"
ADAM = types.AdamParams(learning_rate=1e-2, weight_decay=0.01)
BATCHES = [[sft_datum([9707, 1879, 11, 1075 + i], [374, 264 + i, 1273, 13])] for i in range(4)]
GREEDY = types.SamplingParams(max_tokens=6, temperature=0.0, stop=[])


def train(tc, batches) -> list[float]:
    losses = []
    for batch in batches:
        fb = tc.forward_backward(batch, "cross_entropy")
        tc.optim_step(ADAM).result()
        losses.append(fb.result().metrics["loss:sum"])
    return losses


def checkpoint_tensors(data_dir: Path, tinker_path: str,
                       files=("adapter_model.safetensors", "optimizer.safetensors")) -> dict[str, torch.Tensor]:
    run, kind, name = tinker_path.removeprefix("tinker://").split("/")
    folder = data_dir / "checkpoints" / run / kind / name
    return {key: value for file in files for key, value in load_file(str(folder / file)).items()}


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b)
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def test_a_run_resumed_after_a_restart_continues_exactly(tiny_models, tmp_path):
    data_dir = tmp_path / "data"
    first = ServerProcess(data_dir, {QWEN: tiny_models[QWEN]}).start()
    try:
        client = tinker.ServiceClient(base_url=first.url, api_key=API_KEY)
        tc = client.create_lora_training_client(QWEN, rank=4, seed=5).result()
        train(tc, BATCHES[:2])
        saved = tc.save_state("step-2").result().path
        sampler_path = tc.save_weights_for_sampler("step-2").result().path
        prompt = types.ModelInput.from_ints(BATCHES[0][0].model_input.to_ints()[:3])
        sampled_before = client.create_sampling_client(model_path=sampler_path).result().sample(
            prompt, 1, GREEDY).result().sequences[0]
        uninterrupted_loss = train(tc, BATCHES[2:3])[0]
        uninterrupted = tc.save_state("step-3").result().path
    finally:
        first.stop()

    second = ServerProcess(data_dir, {QWEN: tiny_models[QWEN]}, log_name="server-restarted.log").start()
    try:
        client = tinker.ServiceClient(base_url=second.url, api_key=API_KEY)
        rest = tinker.RestClient(base_url=second.url, api_key=API_KEY)  # what REST lists survived the restart
        listed = rest.list_checkpoints(tc.model_id).result().checkpoints
        assert {c.checkpoint_id for c in listed} == {"weights/step-2", "sampler_weights/step-2", "weights/step-3"}
        assert rest.get_training_run(tc.model_id).result().last_checkpoint.tinker_path == uninterrupted
        session_id = tc.model_id.split(":train:")[0]
        assert rest.get_session(session_id).result().training_run_ids == [tc.model_id]
        r = RawClient(second.url).post("forward_backward", content=fb_body(tc.model_id, 7, BATCHES[0]))
        assert r.status_code == 404 and "create_training_client_from_state" in r.json()["error"]

        resumed = client.create_training_client_from_state_with_optimizer(saved).result()
        assert resumed.model_id != tc.model_id and resumed.get_info().model_data.model_name == QWEN
        assert train(resumed, BATCHES[2:3])[0] == pytest.approx(uninterrupted_loss, abs=1e-5)
        after = resumed.save_state("step-3").result().path
        assert max_difference(checkpoint_tensors(data_dir, after), checkpoint_tensors(data_dir, uninterrupted)) <= 1e-5

        # Weights alone: the same starting point, but a fresh AdamW takes a different step.
        weights_only = client.create_training_client_from_state(saved).result()
        assert train(weights_only, BATCHES[2:3])[0] == pytest.approx(uninterrupted_loss, abs=1e-5)
        fresh = weights_only.save_state("step-3").result().path
        adapter_only = ("adapter_model.safetensors",)
        adapters = [checkpoint_tensors(data_dir, p, adapter_only) for p in (fresh, uninterrupted)]
        assert max_difference(*adapters) > 1e-4

        # A sampler checkpoint written before the restart samples the same tokens after it.
        sampled_after = client.create_sampling_client(model_path=sampler_path).result().sample(
            prompt, 1, GREEDY).result().sequences[0]
        assert sampled_after.tokens == sampled_before.tokens
        np.testing.assert_allclose(sampled_after.logprobs, sampled_before.logprobs, atol=1e-5)
    finally:
        second.stop()


def test_load_state_rewinds_a_run_in_order_and_overwrite_is_explicit(service_client, server):
    tc = service_client.create_lora_training_client(QWEN, rank=4, seed=6).result()
    train(tc, BATCHES[:2])
    saved = tc.save_state("rewind").result().path
    probe = logprobs_of(tc.forward(BATCHES[3], "cross_entropy").result())[0]
    train(tc, BATCHES[2:])
    moved = logprobs_of(tc.forward(BATCHES[3], "cross_entropy").result())[0]
    assert np.abs(moved - probe).max() > 1e-3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # load_state is deprecated in the SDK
        tc.load_state_with_optimizer(saved)  # queued in order: the forward below sees the loaded weights
    rewound = logprobs_of(tc.forward(BATCHES[3], "cross_entropy").result())[0]
    np.testing.assert_allclose(rewound, probe, atol=1e-6)

    with pytest.raises(tinker.RequestFailedError, match="already exists"):
        tc.save_state("rewind").result()
    assert tc.save_state("rewind", overwrite=True).result().path == saved
    run, kind, name = saved.removeprefix("tinker://").split("/")
    meta = json.loads((server.data_dir / "checkpoints" / run / kind / name / "tinkercloud.json").read_text())
    assert meta["base_model"] == QWEN and meta["lora"]["rank"] == 4 and meta["expires_at"] is None


def test_a_load_that_fails_on_the_workers_leaves_the_run_as_it_was(service_client, server):
    """A checkpoint whose optimizer state lacks a factor fails load_state_with_optimizer after its
    adapter was installed: the run keeps its own adapter (not the checkpoint's) and an optimizer
    that still moves it."""
    tc = service_client.create_lora_training_client(QWEN, rank=4, seed=8).result()
    train(tc, BATCHES[:1])
    saved = tc.save_state("no-optimizer").result().path
    train(tc, BATCHES[1:2])
    before = logprobs_of(tc.forward(BATCHES[3], "cross_entropy").result())[0]
    run, kind, name = saved.removeprefix("tinker://").split("/")
    optimizer_file = server.data_dir / "checkpoints" / run / kind / name / "optimizer.safetensors"
    moments = load_file(str(optimizer_file))
    dropped = next(k for k in sorted(moments) if k.endswith(".exp_avg"))
    save_file({k: v for k, v in moments.items() if k != dropped}, str(optimizer_file))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        with pytest.raises(tinker.RequestFailedError, match="optimizer state does not fit"):
            tc.load_state_with_optimizer(saved).result()
    kept = logprobs_of(tc.forward(BATCHES[3], "cross_entropy").result())[0]
    np.testing.assert_array_equal(kept, before)  # not the checkpoint's adapter
    train(tc, BATCHES[2:3])
    moved = logprobs_of(tc.forward(BATCHES[3], "cross_entropy").result())[0]
    assert np.abs(moved - before).max() > 1e-4  # its optimizer still updates the live adapter


def test_bad_checkpoint_requests_get_clear_errors_and_the_run_keeps_training(service_client, server):
    tc = service_client.create_lora_training_client(QWEN, rank=4, seed=7).result()
    llama = service_client.create_lora_training_client(LLAMA, rank=4, seed=7).result()
    llama_state = llama.save_state("llama").result().path
    sampler_path = tc.save_weights_for_sampler("only-weights").result().path

    def user_error(future, *needles):
        with pytest.raises(tinker.RequestFailedError) as info:
            future.result()
        assert "user" in str(info.value.category).lower()
        for needle in needles:
            assert needle in str(info.value), str(info.value)

    user_error(tc.save_state("../escape"), "invalid")
    user_error(tc.save_state("ttl", ttl_seconds=-5), "ttl_seconds")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        user_error(tc.load_state(llama_state), "tiny-llama")
        user_error(tc.load_state_with_optimizer(sampler_path), "no optimizer state")
    for path, needle in [(f"tinker://{tc.model_id}/weights/nothing-here", "does not exist"),
                         ("tinker://x:train:0/weights/../../etc", "three parts"),
                         (f"tinker://{tc.model_id}/secrets/x", "kind")]:
        with pytest.raises(tinker.BadRequestError, match=needle):
            service_client.create_training_client_from_state(path).result()
    with pytest.raises(tinker.BadRequestError, match="no optimizer state"):
        service_client.create_training_client_from_state_with_optimizer(sampler_path).result()

    raw = RawClient(server.url)
    r = raw.post("weights_info", {"tinker_path": "tinker://x:train:0/weights/.hidden"})
    assert r.status_code == 400 and "invalid" in r.json()["error"]
    r = raw.post("weights_info", {"tinker_path": f"tinker://{tc.model_id}/weights/missing"})
    assert r.status_code == 404 and "does not exist" in r.json()["error"]
    r = raw.post("load_weights", {"session_id": "no-such-session", "model_seq_id": 5, "path": llama_state,
                                  "optimizer": False})
    assert r.status_code == 404 and "no-such-session" in r.json()["error"]
    r = raw.post("load_weights", {"model_id": tc.model_id, "path": llama_state, "optimizer": False})
    assert r.status_code == 400 and "seq_id" in r.json()["error"]
    other = raw.create_model(raw.session(), QWEN)
    handle = raw.post("save_weights_external", {"model_id": other, "seq_id": 1, "path": "a/b"}).json()
    failed = raw.result(handle["request_id"])  # in-band, in order: the next seq_id still runs
    assert failed["category"] == "user" and "invalid" in failed["error"]
    handle = raw.post("save_weights_external", {"model_id": other, "seq_id": 2, "path": "export"}).json()
    assert raw.result(handle["request_id"])["path"] == f"tinker://{other}/external_weights/export"

    # The client's seq_ids stayed in order through all of that: it still trains and saves.
    assert np.isfinite(train(tc, BATCHES[:1])[0])
    assert tc.save_state("after-errors").result().path.endswith("/weights/after-errors")


def test_a_save_that_fails_midway_leaves_nothing_visible(tmp_path):
    """The writer fills a hidden folder and renames it into place only when complete; hidden
    leftovers of a crash are never listed and are removed when the registry starts."""
    from backends.miles.peft_format import write_checkpoint
    from engine.registry import Registry, checkpoint_path

    registry = Registry(str(tmp_path))
    path = checkpoint_path("s:train:0", "weights", "broken")
    folder = registry.checkpoint_dir(path)
    adapter = {"base_model.model.lm_head.lora_A.weight": torch.ones(2, 3)}
    with pytest.raises(TypeError):  # the metadata is written last; here it cannot be
        write_checkpoint(folder, adapter, {"r": 2}, {"unserializable": object()}, optimizer={"x": torch.ones(1)})
    assert not folder.exists() and registry.checkpoints() == []

    crashed = folder.parent / ".broken.tmp-1234"  # what a killed worker would leave behind
    crashed.mkdir()
    (crashed / "adapter_model.safetensors").write_bytes(b"partial")
    assert registry.checkpoints() == []
    Registry(str(tmp_path))
    assert not crashed.exists()


def test_an_expired_checkpoint_disappears_at_once_and_is_deleted_off_the_calling_thread(tmp_path, monkeypatch):
    """A lookup that finds an expired checkpoint (some run on the event loop) hides it in one
    rename and leaves the deletion of its files, which may be large, to a background thread."""
    import threading

    from engine import registry as registry_module
    from engine.registry import Registry, checkpoint_path, write_meta

    registry = Registry(str(tmp_path))
    path = checkpoint_path("s:train:0", "weights", "old")
    folder = registry.checkpoint_dir(path)
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(b"x" * 1024)
    write_meta(folder, {"tinker_path": str(path), "expires_at": 1.0})  # expired long ago

    removed = []
    real_rmtree = registry_module.shutil.rmtree

    def rmtree(target, **kwargs):
        removed.append((Path(target).name, threading.get_ident()))
        real_rmtree(target, **kwargs)

    monkeypatch.setattr(registry_module.shutil, "rmtree", rmtree)
    with pytest.raises(LookupError, match="does not exist"):
        registry.checkpoint(path)
    assert not folder.exists() and registry.checkpoints() == []  # gone from every listing at once
    registry_module._REMOVALS.join()  # the removal has run
    assert len(removed) == 1 and removed[0][0].startswith(".old.deleted-")
    assert removed[0][1] != threading.get_ident()  # not on the caller's thread
    assert list(folder.parent.iterdir()) == []  # and the hidden copy is gone too
