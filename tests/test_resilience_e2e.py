"""Resilience of a real server process: a worker that dies, a restart, a graceful shutdown.

Each test starts its own server (one CPU worker) because it kills or restarts it.
"""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
import tinker
from tinker import types

from tests.conftest import API_KEY, ServerProcess
from tests.helpers import RawClient, fb_body, sft_datum

QWEN = "tiny-qwen3"
ADAM = {"learning_rate": 1e-3, "beta1": 0.9, "beta2": 0.95, "eps": 1e-12, "weight_decay": 0.0, "grad_clip_norm": 0.0}


def _tokens(n: int, start: int = 100) -> list[int]:
    return list(range(start, start + n))


def _alive(pid: int) -> bool:
    """True while `pid` is a running (not zombie) process."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _stop_gracefully(srv: ServerProcess, worker_pids: list[int], limit: float = 30.0) -> float:
    """SIGINT the server; it must exit by itself within `limit` s and leave no worker behind."""
    t0 = time.monotonic()
    srv.proc.send_signal(signal.SIGINT)
    try:
        srv.proc.wait(limit)
    except subprocess.TimeoutExpired:
        pytest.fail(f"server still running {limit}s after SIGINT:\n{srv.tail()}")
    elapsed = time.monotonic() - t0
    assert srv.proc.returncode == 0, f"exit code {srv.proc.returncode}:\n{srv.tail()}"
    deadline = time.monotonic() + 5
    while any(_alive(p) for p in worker_pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [p for p in worker_pids if _alive(p)]
    assert not left, f"worker processes {left} outlived the server"
    srv.stop()  # closes the log
    return elapsed


def _wait_degraded(srv: ServerProcess, timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code, body = srv.health()
        if code != 200:
            assert code == 503, (code, body)
            return body
        time.sleep(0.1)
    pytest.fail(f"healthz still ok {timeout}s after the worker was killed:\n{srv.tail()}")


def _assert_worker_exited(message: str) -> None:
    assert "worker rank 0 exited" in message, message


def test_a_dead_worker_fails_requests_in_band_while_the_server_keeps_answering(tiny_models, tmp_path):
    srv = ServerProcess(tmp_path / "dead-worker", {QWEN: tiny_models[QWEN]}).start()
    try:
        code, health = srv.health()
        assert code == 200 and health["status"] == "ok" and len(health["workers"]) == 1
        (worker_pid,) = health["workers"]

        client = tinker.ServiceClient(base_url=srv.url, api_key=API_KEY)
        tc = client.create_lora_training_client(QWEN, rank=4).result(timeout=60)
        raw = RawClient(srv.url)
        raw_model = raw.create_model(raw.session(), QWEN)

        # Long sequences so the worker is busy for many seconds when it dies.
        long_data = [sft_datum(_tokens(1000, 100 + i), _tokens(500, 3000 + i)) for i in range(8)]
        sdk_futures = [tc.forward_backward(long_data, "cross_entropy") for _ in range(3)]
        # The raw submission returns once the work has been handed to the pool: certainly in flight.
        in_flight = raw.post("forward_backward", content=fb_body(raw_model, 1, long_data))
        assert in_flight.status_code == 200, in_flight.text
        os.kill(worker_pid, signal.SIGKILL)

        degraded = _wait_degraded(srv)
        assert degraded["status"] == "degraded"
        _assert_worker_exited(degraded["reason"])

        # Work in flight at the kill fails in-band, as a server error naming the cause.
        lost = raw.result(in_flight.json()["request_id"], timeout=30)
        assert isinstance(lost, dict) and lost["category"] == "server", lost
        _assert_worker_exited(lost["error"])
        assert "the request was lost" in lost["error"], lost
        failures = 0
        for fut in sdk_futures:  # every SDK future resolves; none hangs
            try:
                fut.result(timeout=60)  # only possible if it finished before the kill
            except tinker.RequestFailedError as e:
                failures += 1
                assert e.category == types.RequestErrorCategory.Server, e
                _assert_worker_exited(str(e))
        assert failures >= 1, "every long forward_backward finished before the worker was killed?"

        # New requests fail the same way, at once.
        small = [sft_datum(_tokens(4), _tokens(4, 300))]
        with pytest.raises(tinker.RequestFailedError) as info:
            tc.forward_backward(small, "cross_entropy").result(timeout=60)
        assert info.value.category == types.RequestErrorCategory.Server
        _assert_worker_exited(str(info.value))
        r = raw.post("optim_step", {"model_id": raw_model, "seq_id": 2, "type": "optim_step", "adam_params": ADAM})
        failed = raw.result(r.json()["request_id"], timeout=30)
        assert failed["category"] == "server", failed
        _assert_worker_exited(failed["error"])
        r = raw.post("create_model", {"session_id": raw.session(), "model_seq_id": 1, "base_model": QWEN,
                                      "lora_config": {"rank": 4}, "type": "create_model"})
        failed = raw.result(r.json()["request_id"], timeout=30)
        assert failed["category"] == "server", failed
        _assert_worker_exited(failed["error"])

        # The HTTP server itself keeps answering.
        tinker.ServiceClient(base_url=srv.url, api_key=API_KEY)  # creates a session
        caps = tinker.RestClient(base_url=srv.url, api_key=API_KEY).get_server_capabilities().result(timeout=30)
        assert {m.model_name for m in caps.supported_models} == {QWEN}
        assert raw.session() and srv.health()[0] == 503

        _stop_gracefully(srv, [worker_pid])
    finally:
        srv.stop()


def test_futures_survive_a_restart_and_pending_ones_fail_as_restarted(tiny_models, tmp_path):
    data_dir = tmp_path / "data"
    models = {QWEN: tiny_models[QWEN]}
    first = ServerProcess(data_dir, models, log_name="first.log").start()
    try:
        (worker_pid,) = first.health()[1]["workers"]
        raw = RawClient(first.url)
        model_id = raw.create_model(raw.session(), QWEN)
        data = [sft_datum(_tokens(6), _tokens(6, 400)), sft_datum(_tokens(5, 900), _tokens(3, 1200))]
        fb_id = raw.post("forward_backward", content=fb_body(model_id, 1, data)).json()["request_id"]
        opt_id = raw.post("optim_step", {"model_id": model_id, "seq_id": 2, "type": "optim_step",
                                         "adam_params": ADAM}).json()["request_id"]
        fb_bytes = raw.result(fb_id)
        opt_json = raw.result(opt_id)
        assert isinstance(fb_bytes, bytes) and len(fb_bytes) > 0
        assert opt_json["type"] == "optim_step" and opt_json["metrics"]["grad_norm:mean"] > 0, opt_json
        # seq 5 waits forever for 3 and 4: pending when the server stops.
        pending_id = raw.post("forward_backward", content=fb_body(model_id, 5, data)).json()["request_id"]
        # A long forward_backward of another model is running on the worker when the server stops.
        busy_model = raw.create_model(raw.session(), QWEN, seq=1)
        long_data = [sft_datum(_tokens(1000, 100 + i), _tokens(500, 3000 + i)) for i in range(8)]
        busy_id = raw.post("forward_backward", content=fb_body(busy_model, 1, long_data)).json()["request_id"]

        # A client long-polling a pending future must not hold the shutdown up for long_poll_seconds.
        poll: dict = {}

        def long_poll() -> None:
            try:
                r = httpx.post(f"{first.url}/api/v1/retrieve_future", headers={"X-API-Key": API_KEY}, timeout=60,
                               json={"request_id": pending_id, "allow_metadata_only": False})
                poll["body"] = r.json()
            except httpx.HTTPError as e:
                poll["error"] = e
            poll["at"] = time.monotonic()

        poller = threading.Thread(target=long_poll)
        poller.start()
        time.sleep(1.0)  # the poll is parked on the server
        assert poller.is_alive(), poll
        sigint_at = time.monotonic()
        elapsed = _stop_gracefully(first, [worker_pid])
        poller.join(10)
        assert not poller.is_alive()
        assert poll.get("body", {}).get("type") == "try_again", poll
        assert poll["at"] - sigint_at < 10, f"the parked long-poll was answered {poll['at'] - sigint_at:.1f}s after SIGINT"
        print(f"graceful shutdown with a busy worker and a parked long-poll took {elapsed:.1f}s")
    finally:
        first.stop()

    second = ServerProcess(data_dir, models, log_name="second.log").start()
    try:
        (worker_pid,) = second.health()[1]["workers"]
        raw = RawClient(second.url)
        assert raw.result(opt_id, timeout=10) == opt_json
        assert raw.result(fb_id, timeout=10) == fb_bytes
        # Queued when the server stopped: it can never run, so it fails as restarted.
        restarted = raw.result(pending_id, timeout=10)
        assert isinstance(restarted, dict) and restarted.get("category") == "server", restarted
        assert "server restarted" in restarted["error"], restarted
        # Running when the server stopped: shutdown gives the worker a grace period, so the
        # request either finished in it (its result was stored) or failed as restarted. Never pending.
        busy = raw.result(busy_id, timeout=10)
        if isinstance(busy, bytes):
            assert len(busy) > 0 and b"loss:sum" in busy
        else:
            assert isinstance(busy, dict) and busy.get("category") == "server", busy
            assert "server restarted" in busy["error"], busy
        _stop_gracefully(second, [worker_pid])
    finally:
        second.stop()
