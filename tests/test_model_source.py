"""Hub-style model names served from the local Hugging Face cache, and the checkpoint load progress.

Unit tests build the cache layout that `huggingface-cli download` leaves (refs/, snapshots/
with symlinks into blobs/) in tmp_path; the end-to-end test serves a tiny sharded checkpoint
from such a cache by its hub name and trains on it through the real SDK.
"""
from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import pytest

from backends.miles.load_progress import LoadProgress
from engine.config import Config, ServedModel, parse_models
from engine.model_source import ModelNotFoundError, hf_hub_cache_dir, resolve_model_dir
from tests.conftest import API_KEY, ServerProcess
from tests.helpers import sft_datum
from tests.mcore_harness import make_hf_checkpoint

OLD_COMMIT, NEW_COMMIT = "a" * 40, "b" * 40
WEIGHTS = {"config.json": b'{"architectures": ["Qwen3ForCausalLM"]}', "model.safetensors": b"weights"}


def cache_snapshot(cache: Path, repo_id: str, commit: str, files: dict[str, bytes], refs: tuple[str, ...] = ("main",)
                   ) -> Path:
    """Lay out `files` as huggingface_hub does: content-addressed blobs, symlinked from the snapshot."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


def test_a_hub_name_is_the_snapshot_that_refs_main_points_at(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    cache_snapshot(cache, "Qwen/Qwen3-8B", OLD_COMMIT, WEIGHTS, refs=())
    snapshot = cache_snapshot(cache, "Qwen/Qwen3-8B", NEW_COMMIT, WEIGHTS)

    assert resolve_model_dir("Qwen/Qwen3-8B", cache) == snapshot
    assert (snapshot / "model.safetensors").read_bytes() == b"weights"  # through the symlink into blobs/
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    assert parse_models("Qwen/Qwen3-8B") == (ServedModel("Qwen/Qwen3-8B", str(snapshot)),)
    assert Config.from_args(["--model", "Qwen/Qwen3-8B"]).models == (ServedModel("Qwen/Qwen3-8B", str(snapshot)),)
    assert parse_models('[{"model_name": "Qwen/Qwen3-8B"}]') == (ServedModel("Qwen/Qwen3-8B", str(snapshot)),)


def test_the_cache_is_hf_hub_cache_then_hf_home_hub_then_the_home_default(tmp_path, monkeypatch):
    assert hf_hub_cache_dir({"HF_HUB_CACHE": "/c/hub", "HF_HOME": "/h"}) == Path("/c/hub")
    assert hf_hub_cache_dir({"HF_HOME": "/h"}) == Path("/h/hub")
    assert hf_hub_cache_dir({}) == Path.home() / ".cache" / "huggingface" / "hub"

    snapshot = cache_snapshot(tmp_path / "home" / "hub", "SomeOrg/Model", NEW_COMMIT, WEIGHTS)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert parse_models("SomeOrg/Model") == (ServedModel("SomeOrg/Model", str(snapshot)),)


def test_name_at_revision_picks_a_tag_or_a_commit_and_keeps_the_public_name(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    old = cache_snapshot(cache, "SomeOrg/Model", OLD_COMMIT, WEIGHTS, refs=("v1.0",))
    new = cache_snapshot(cache, "SomeOrg/Model", NEW_COMMIT, WEIGHTS)
    assert resolve_model_dir("SomeOrg/Model@v1.0", cache) == old
    assert resolve_model_dir(f"SomeOrg/Model@{OLD_COMMIT}", cache) == old
    assert resolve_model_dir("SomeOrg/Model@main", cache) == new
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    assert parse_models("SomeOrg/Model@v1.0") == (ServedModel("SomeOrg/Model", str(old)),)

    with pytest.raises(ModelNotFoundError) as err:
        resolve_model_dir("SomeOrg/Model@v2.0", cache)
    message = str(err.value)
    assert "revision 'v2.0'" in message and "'v1.0'" in message and "'main'" in message
    assert "huggingface-cli download SomeOrg/Model --revision v2.0" in message


def test_a_model_missing_from_the_cache_says_where_it_looked_and_how_to_fix_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ValueError) as err:
        Config.from_args(["--model", "SomeOrg/Missing"])
    message = str(err.value)
    assert isinstance(err.value, ModelNotFoundError)
    assert str(tmp_path / "hub" / "models--SomeOrg--Missing") in message
    assert "huggingface-cli download SomeOrg/Missing" in message and "NAME=PATH" in message


def test_an_incomplete_download_is_refused(tmp_path):
    cache = tmp_path / "hub"
    index = b'{"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}'
    snapshot = cache_snapshot(cache, "SomeOrg/Sharded", NEW_COMMIT, {
        "config.json": b"{}", "model.safetensors.index.json": index, "model-00001-of-00002.safetensors": b"1",
        "model-00002-of-00002.safetensors": b"2"})
    assert resolve_model_dir("SomeOrg/Sharded", cache) == snapshot
    (snapshot / "model-00002-of-00002.safetensors").resolve().unlink()  # the symlink now dangles
    with pytest.raises(ModelNotFoundError, match=r"lacks weight files \['model-00002-of-00002.safetensors'\]"):
        resolve_model_dir("SomeOrg/Sharded", cache)


def test_local_paths_and_name_equals_path_are_unchanged(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    cache_snapshot(cache, "SomeOrg/Model", NEW_COMMIT, WEIGHTS)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    local = tmp_path / "checkpoints" / "my-model"
    local.mkdir(parents=True)
    assert parse_models(str(local)) == (ServedModel("my-model", str(local)),)
    assert parse_models("m=SomeOrg/Model,n=/not/there") == (ServedModel("m", "SomeOrg/Model"),
                                                            ServedModel("n", "/not/there"))
    assert parse_models("/not/there/either") == (ServedModel("either", "/not/there/either"),)
    # A local directory wins over the cache, even with a hub-style name.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "SomeOrg" / "Model").mkdir(parents=True)
    assert parse_models("SomeOrg/Model") == (ServedModel("Model", "SomeOrg/Model"),)


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_load_progress_logs_every_ten_percent_or_redraws_a_bar_on_rank_0_only():
    log = io.StringIO()
    with LoadProgress("loading m", total=23, unit="tensors", stream=log, rank=0) as progress:
        for _ in range(23):
            progress.advance()
    lines = log.getvalue().splitlines()
    assert lines[0] == "loading m: 0/23 tensors"
    assert [line.split(": ")[1].split("%")[0] for line in lines[1:]] == [str(p) for p in range(10, 101, 10)]
    assert lines[-1].startswith("loading m: 100% (23/23 tensors, ")

    terminal = FakeTerminal()
    with LoadProgress("loading m", total=4, unit="tensors", stream=terminal, rank=0) as progress:
        for _ in range(4):
            progress.advance()
    frames = terminal.getvalue().split("\r")[1:]
    assert len(frames) == 5 and "\n" not in "".join(frames[:-1]) and frames[-1].endswith("\n")
    assert frames[0].startswith("loading m:   0% [....") and frames[-1].startswith("loading m: 100% [####")

    quiet = io.StringIO()
    with LoadProgress("loading m", total=4, stream=quiet, rank=1) as progress:
        progress.advance(4)
    assert quiet.getvalue() == ""


def test_a_server_serves_a_cached_hub_model_by_name_and_logs_the_load(tmp_path):
    import tinker
    from tinker import types

    checkpoint = make_hf_checkpoint(tmp_path / "made", "qwen3", max_shard_size="200KB", seed=5)
    files = {p.name: p.read_bytes() for p in checkpoint.iterdir()}
    assert "model.safetensors.index.json" in files  # sharded, as large hub checkpoints are
    snapshot = cache_snapshot(tmp_path / "hub", "SomeOrg/Tiny-Qwen3", NEW_COMMIT, files)

    srv = ServerProcess(tmp_path / "data", models={}, extra_args=("--model", "SomeOrg/Tiny-Qwen3"),
                        env={"HF_HUB_CACHE": str(tmp_path / "hub")}).start()
    try:
        client = tinker.ServiceClient(base_url=srv.url, api_key=API_KEY)
        capabilities = tinker.RestClient(base_url=srv.url, api_key=API_KEY).get_server_capabilities().result()
        names = [m.model_name for m in capabilities.supported_models]
        assert names == ["SomeOrg/Tiny-Qwen3"]
        tc = client.create_lora_training_client("SomeOrg/Tiny-Qwen3", rank=4, seed=0).result()
        out = tc.forward_backward([sft_datum([5, 6, 7], [8, 9])], "cross_entropy").result()
        assert out.metrics["loss:sum"] > 0
        tc.optim_step(types.AdamParams(learning_rate=1e-3)).result()
    finally:
        srv.stop()
    log = srv.log_path.read_text()
    n_tensors = 3 + 2 * 8  # embedding, final norm, lm_head; per layer qkv, proj, fc1, fc2, 2 norms, q/k norms
    assert f"loading {snapshot.resolve()}: 100% ({n_tensors}/{n_tensors} tensors" in log, log[-3000:]


def test_a_server_with_an_uncached_hub_model_stops_with_the_fix(tmp_path):
    srv = ServerProcess(tmp_path / "data", models={}, extra_args=("--model", "SomeOrg/Not-Downloaded"),
                        env={"HF_HUB_CACHE": str(tmp_path / "hub")})
    with pytest.raises(RuntimeError, match="server exited") as err:
        srv.start(timeout=60)
    srv.stop()
    assert "huggingface-cli download SomeOrg/Not-Downloaded" in str(err.value)
