"""Runs of sessions that finished or stopped sending heartbeats are unloaded from the workers."""
from __future__ import annotations

import time

from tests.conftest import ServerProcess
from tests.helpers import RawClient, fb_body, sft_datum


def test_abandoned_sessions_lose_their_loaded_runs_and_live_ones_keep_them(tmp_path, tiny_models, monkeypatch):
    monkeypatch.setenv("TINKERCLOUD_SESSION_TIMEOUT", "4")
    srv = ServerProcess(tmp_path / "data", {"tiny-qwen3": tiny_models["tiny-qwen3"]}).start()
    try:
        raw = RawClient(srv.url)
        live, silent, finished = raw.session(), raw.session(), raw.session()
        models = {s: raw.create_model(s, "tiny-qwen3") for s in (live, silent, finished)}
        raw.post(f"sessions/{finished}/finish", {"reason": {"type": "success"}, "detail": None})
        for _ in range(8):  # 8 s: twice the timeout, with heartbeats for `live` only
            raw.post("session_heartbeat", {"session_id": live, "type": "session_heartbeat"})
            time.sleep(1)
        data = [sft_datum([1, 2, 3], [4, 5])]
        ok = raw.post("forward_backward", content=fb_body(models[live], 1, data))
        assert ok.status_code == 200 and raw.result(ok.json()["request_id"])
        for session in (silent, finished):
            gone = raw.post("forward_backward", content=fb_body(models[session], 1, data))
            assert gone.status_code == 404 and "no longer loaded" in gone.json()["error"]
    finally:
        srv.stop()
