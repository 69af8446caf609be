"""The REST API through `tinker.RestClient`, the `tinker` CLI (as a subprocess) and raw HTTP.

Runs, checkpoints and sessions are listed; checkpoints are published, given a TTL (and
expire), deleted and downloaded as PEFT files from signed URLs this server serves itself.
Listings and deletions run in worker threads, so they may overlap; each still answers whole.
"""
from __future__ import annotations

import hashlib
import hmac
import io
import json
import os
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import tinker
from safetensors.torch import load_file
from tinker import types

from tests.conftest import API_KEY
from tests.helpers import RawClient, sft_datum

QWEN = "tiny-qwen3"
DATA = [sft_datum([9707, 1879, 11], [1075, 374, 264])]


@pytest.fixture()
def rest(server) -> tinker.RestClient:
    return tinker.RestClient(base_url=server.url, api_key=API_KEY)


def trained_run(service_client, **kwargs):
    tc = service_client.create_lora_training_client(QWEN, rank=4, seed=8, **kwargs).result()
    tc.forward_backward(DATA, "cross_entropy")
    tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    return tc


def folder_of(server, tinker_path: str) -> Path:
    run, kind, name = tinker_path.removeprefix("tinker://").split("/")
    return server.data_dir / "checkpoints" / run / kind / name


def test_rest_client_lists_runs_checkpoints_and_sessions(service_client, server, rest):
    tc = trained_run(service_client, user_metadata={"renderer_name": "role_colon"})
    state = tc.save_state("rest-a", user_metadata={"step": "1"}).result().path
    sampler = tc.save_weights_for_sampler("rest-s").result().path

    run = rest.get_training_run_by_tinker_path(state).result()
    assert (run.training_run_id, run.base_model, run.lora_rank, run.is_lora) == (tc.model_id, QWEN, 4, True)
    assert run.user_metadata == {"renderer_name": "role_colon"}
    assert run.last_checkpoint.tinker_path == state and run.last_sampler_checkpoint.tinker_path == sampler
    listed = {c.tinker_path: c for c in rest.list_checkpoints(tc.model_id).result().checkpoints}
    assert set(listed) == {state, sampler}
    assert listed[state].checkpoint_type == "training" and listed[sampler].checkpoint_type == "sampler"
    assert listed[state].user_metadata == {"step": "1"} and listed[state].size_bytes > listed[sampler].size_bytes > 0
    everything = rest.list_user_checkpoints(limit=1000).result()
    assert {state, sampler} <= {c.tinker_path for c in everything.checkpoints}
    assert everything.cursor.total_count >= 2
    times = [c.time for c in everything.checkpoints]
    assert times == sorted(times, reverse=True)
    assert tc.model_id in {r.training_run_id for r in rest.list_training_runs(limit=1000).result().training_runs}
    session_id = tc.model_id.split(":train:")[0]
    assert session_id in rest.list_sessions(limit=1000).result().sessions
    assert tc.model_id in rest.get_session(session_id).result().training_run_ids
    info = rest.get_weights_info_by_tinker_path(sampler).result()
    assert (info.base_model, info.lora_rank, info.train_mlp) == (QWEN, 4, True)

    rest.publish_checkpoint_from_tinker_path(state).result()
    assert next(c for c in rest.list_checkpoints(tc.model_id).result().checkpoints if c.tinker_path == state).public
    with pytest.raises(tinker.BadRequestError, match="already public"):
        rest.publish_checkpoint_from_tinker_path(state).result()
    rest.unpublish_checkpoint_from_tinker_path(state).result()

    rest.delete_checkpoint_from_tinker_path(sampler).result()
    assert not folder_of(server, sampler).exists()
    with pytest.raises(tinker.NotFoundError):
        rest.delete_checkpoint_from_tinker_path(sampler).result()

    rest.set_checkpoint_ttl_from_tinker_path(state, 1).result()  # expired checkpoints are removed
    deadline = time.monotonic() + 30
    while rest.list_checkpoints(tc.model_id).result().checkpoints and time.monotonic() < deadline:
        time.sleep(0.2)
    assert rest.list_checkpoints(tc.model_id).result().checkpoints == []
    assert not folder_of(server, state).exists()


def tinker_cli(server, *args: str, cwd: Path, idempotent: bool = True) -> subprocess.CompletedProcess:
    """The SDK's `tinker` command (entry point tinker.cli.__main__:cli), pointed at our server.

    Under heavy load the SDK's CLI process was seen, rarely, to die of SIGABRT at interpreter exit
    after its request had succeeded (server log: 200); an idempotent command is then run again.
    """
    env = {**os.environ, "TINKER_BASE_URL": server.url, "TINKER_API_KEY": API_KEY}
    for _ in range(2):
        done = subprocess.run([sys.executable, "-m", "tinker.cli", *args], env=env, cwd=cwd, capture_output=True,
                              text=True, timeout=180)
        if done.returncode >= 0 or not idempotent:
            return done
    return done


def test_tinker_cli_lists_manages_and_downloads_checkpoints(service_client, server, rest, tmp_path):
    tc = trained_run(service_client)
    state = tc.save_state("cli").result().path
    commands = [("run", "list", "--limit", "0"), ("run", "info", tc.model_id),
                ("checkpoint", "list", "--run-id", tc.model_id), ("checkpoint", "info", state)]
    with ThreadPoolExecutor(len(commands)) as pool:
        runs, run, checkpoints, checkpoint = pool.map(
            lambda c: tinker_cli(server, "-f", "json", *c, cwd=tmp_path), commands)
    for done in (runs, run, checkpoints, checkpoint):
        assert done.returncode == 0, done.stderr
    assert tc.model_id in {r["training_run_id"] for r in json.loads(runs.stdout)["runs"]}
    assert json.loads(run.stdout)["last_checkpoint"]["tinker_path"] == state
    assert [c["tinker_path"] for c in json.loads(checkpoints.stdout)["checkpoints"]] == [state]
    assert json.loads(checkpoint.stdout)["lora_rank"] == 4

    published = tinker_cli(server, "checkpoint", "publish", state, cwd=tmp_path, idempotent=False)
    assert published.returncode <= 0, published.stderr  # (< 0: the exit-time abort above; checked below)
    again = tinker_cli(server, "checkpoint", "publish", state, cwd=tmp_path, idempotent=False)
    assert again.returncode != 0 and "already public" in again.stderr
    assert tinker_cli(server, "checkpoint", "set-ttl", state, "--ttl", "7200", cwd=tmp_path).returncode == 0
    (listed,) = rest.list_checkpoints(tc.model_id).result().checkpoints
    assert listed.public and listed.expires_at is not None

    # download = create a run from the checkpoint, save_weights_external, fetch the signed URLs.
    done = tinker_cli(server, "-f", "json", "checkpoint", "download", state, "--output", str(tmp_path / "dl"),
                      "--force", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    got = Path(json.loads(done.stdout)["destination"])
    assert sorted(p.name for p in got.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    saved = folder_of(server, state)
    config = lambda folder: json.loads((folder / "adapter_config.json").read_text())  # noqa: E731
    assert config(got) == config(saved)
    ours, theirs = (load_file(str(folder / "adapter_model.safetensors")) for folder in (saved, got))
    assert set(ours) == set(theirs) and all((ours[k] == theirs[k]).all() for k in ours)
    assert [c.tinker_path for c in rest.list_checkpoints(tc.model_id).result().checkpoints] == [state]

    assert tinker_cli(server, "checkpoint", "delete", "-y", state, cwd=tmp_path).returncode == 0
    assert rest.list_checkpoints(tc.model_id).result().checkpoints == []


def test_archive_redirects_to_a_signed_tar_and_signatures_are_checked(service_client, server):
    tc = trained_run(service_client)
    path = tc.save_weights_for_sampler("archived").result().path
    raw = RawClient(server.url)
    checkpoint = f"/api/v1/training_runs/{tc.model_id}/checkpoints/sampler_weights/archived"
    r = raw.http.get(f"{checkpoint}/archive")
    assert r.status_code == 302 and r.headers["Location"] == r.json()["url"]
    tar = httpx.get(r.headers["Location"], timeout=60)  # no API key: the URL is signed
    assert tar.status_code == 200 and tar.headers["Content-Type"] == "application/x-tar"
    with tarfile.open(fileobj=io.BytesIO(tar.content)) as archive:
        assert sorted(archive.getnames()) == ["adapter_config.json", "adapter_model.safetensors"]
        config = json.load(archive.extractfile("adapter_config.json"))
    assert config == json.loads((folder_of(server, path) / "adapter_config.json").read_text())

    urls = raw.http.get(f"{checkpoint}/external_weights_urls").json()["urls"]
    good = urls["adapter_config.json"]
    assert httpx.get(good).json() == config
    for bad, needle in [(good.replace("signature=", "signature=0"), "signature"),
                        (good.replace("adapter_config.json", "tinkercloud.json"), "signature"),
                        (good.split("?")[0], "not signed")]:
        r = httpx.get(bad)
        assert r.status_code == 403 and needle in r.json()["error"], (bad, r.text)
    r = httpx.get(_signed_but_expired(server, tc.model_id, good))
    assert r.status_code == 403 and "expired" in r.json()["error"]
    assert httpx.get(f"{server.url}{checkpoint}/archive").status_code == 401  # the archive request needs a key


def _signed_but_expired(server, run_id: str, url: str) -> str:
    """`url` re-signed, with the server's key (read from its data dir), to expire in the past."""
    import diskcache

    with diskcache.Cache(str(server.data_dir / "registry")) as cache:
        key = cache["signing_key"]
    expires = int(time.time()) - 10
    message = f"{run_id}/sampler_weights/archived/adapter_config.json\n{expires}".encode()
    return f"{url.split('?')[0]}?expires={expires}&signature={hmac.new(key, message, hashlib.sha256).hexdigest()}"


def test_bad_rest_requests_get_clear_errors(service_client, server):
    tc = trained_run(service_client)
    tc.save_state("kept").result()
    raw = RawClient(server.url)
    runs = "/api/v1/training_runs"
    checkpoint = f"{runs}/{tc.model_id}/checkpoints/weights/kept"
    cases = [
        ("GET", f"{runs}/not-a-run", None, 400, "not of the form"),
        ("GET", f"{runs}/nobody:train:0", None, 404, "unknown training run"),
        ("GET", f"{runs}/nobody:train:0/checkpoints", None, 404, "unknown training run"),
        ("GET", f"{runs}?limit=lots", None, 400, "limit"),
        ("GET", "/api/v1/checkpoints?offset=-1", None, 400, "offset"),
        ("DELETE", f"{runs}/{tc.model_id}/checkpoints/weights/missing", None, 404, "does not exist"),
        ("DELETE", f"{runs}/{tc.model_id}/checkpoints/secrets/kept", None, 400, "kind"),
        ("DELETE", f"{runs}/{tc.model_id}/checkpoints/weights/..kept", None, 400, "invalid"),
        ("PUT", f"{checkpoint}/ttl", {"ttl_seconds": "soon"}, 400, "ttl_seconds"),
        ("PUT", f"{checkpoint}/ttl", {}, 400, "ttl_seconds"),
        ("POST", f"{runs}/{tc.model_id}/checkpoints/weights/missing/publish", None, 404, "does not exist"),
        ("DELETE", f"{checkpoint}/publish", None, 400, "already private"),
        ("GET", f"{runs}/{tc.model_id}/checkpoints/weights/missing/external_weights_urls", None, 404, "does not exist"),
        ("GET", "/api/v1/sessions/no-such-session", None, 404, "no-such-session"),
        ("GET", "/api/v1/sessions?limit=1000000", None, 400, "limit"),
    ]
    for method, url, body, status, needle in cases:
        r = raw.http.request(method, url, json=body)
        assert r.status_code == status and needle in r.json()["error"], (method, url, r.status_code, r.text)
    # Nothing was lost: the checkpoint and the run are still there and the run still trains.
    assert raw.http.get(f"{runs}/{tc.model_id}/checkpoints").json()["checkpoints"][0]["checkpoint_id"] == "weights/kept"
    assert tc.forward_backward(DATA, "cross_entropy").result().metrics["loss:sum"] > 0


def test_listings_and_deletions_that_overlap_all_answer_whole(service_client, server):
    tc = trained_run(service_client)
    paths = [tc.save_weights_for_sampler(f"overlap-{i}").result().path for i in range(4)]
    raw = RawClient(server.url)
    runs = "/api/v1/training_runs"
    listings = [f"{runs}/{tc.model_id}/checkpoints", "/api/v1/checkpoints?limit=10000", f"{runs}?limit=10000",
                f"{runs}/{tc.model_id}"] * 3
    deletions = [f"{runs}/{tc.model_id}/checkpoints/sampler_weights/{p.rsplit('/', 1)[1]}" for p in paths]
    with ThreadPoolExecutor(8) as pool:
        deleted = [pool.submit(raw.http.delete, url) for url in deletions]
        listed = [pool.submit(raw.http.get, url) for url in listings]
        deleted, listed = [f.result() for f in deleted], [f.result() for f in listed]
    assert [r.status_code for r in deleted] == [200] * len(paths), [r.text for r in deleted]
    assert [r.status_code for r in listed] == [200] * len(listings), [r.text for r in listed]
    for r in listed[:1] + listed[4:5] + listed[8:9]:  # this run's checkpoints: some or none of them, never others
        assert {c["tinker_path"] for c in r.json()["checkpoints"]} <= set(paths)
    assert all(r.json()["training_run_id"] == tc.model_id for r in listed[3::4])
    assert raw.http.get(listings[0]).json() == {"checkpoints": []}
    assert not any(folder_of(server, p).exists() for p in paths)
