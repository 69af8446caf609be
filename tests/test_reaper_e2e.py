"""Runs of sessions that finished or stopped sending heartbeats are unloaded from the workers."""
from __future__ import annotations

import time

from tests.conftest import ServerProcess
from tests.helpers import RawClient, fb_body, sft_datum
from tests.test_losses import uploaded, weighted_nll


def test_abandoned_sessions_lose_their_loaded_runs_and_live_ones_keep_them(tmp_path, tiny_models, monkeypatch):
    monkeypatch.setenv("TINKERCLOUD_SESSION_TIMEOUT", "4")
    srv = ServerProcess(tmp_path / "data", {"tiny-qwen3": tiny_models["tiny-qwen3"]}).start()
    try:
        raw = RawClient(srv.url)
        live, silent, finished = raw.session(), raw.session(), raw.session()
        models = {s: raw.create_model(s, "tiny-qwen3") for s in (live, silent, finished)}
        loss = uploaded(weighted_nll, {"logprobs": 1, "weights": 1, "scale": 0}).wire
        losses = {s: raw.result(raw.post("create_custom_loss", {"session_id": s, **loss}).json()["request_id"])
                  for s in (live, finished)}
        assert all(r.get("loss_id") for r in losses.values()), losses
        stored = srv.data_dir / "custom_losses"
        assert sorted(p.name for p in stored.iterdir()) == sorted([live, finished])
        raw.post(f"sessions/{finished}/finish", {"reason": {"type": "success"}, "detail": None})
        late = raw.post("create_custom_loss", {"session_id": finished, **loss})
        assert late.status_code == 400 and "has finished" in late.json()["error"]
        for _ in range(8):  # 8 s: twice the timeout, with heartbeats for `live` only
            raw.post("session_heartbeat", {"session_id": live, "type": "session_heartbeat"})
            time.sleep(1)
        data = [sft_datum([1, 2, 3], [4, 5])]
        ok = raw.post("forward_backward", content=fb_body(models[live], 1, data))
        assert ok.status_code == 200 and raw.result(ok.json()["request_id"])
        for session in (silent, finished):
            gone = raw.post("forward_backward", content=fb_body(models[session], 1, data))
            assert gone.status_code == 404 and "no longer loaded" in gone.json()["error"]
        # the finished session's uploaded loss is deleted; the live one's (and a silent session's,
        # for a week) is kept
        assert [p.name for p in stored.iterdir()] == [live]
    finally:
        srv.stop()


def test_a_finished_session_stays_finished_and_a_restart_does_not_make_one_look_silent(tmp_path):
    """What the reaper reads survives a restart: `finished` is kept on disk; heartbeats are not,
    so a reopened registry counts every session's silence from its own start."""
    from engine.reaper import RETENTION_SECONDS, gone_sessions
    from engine.registry import Registry

    registry = Registry(str(tmp_path))
    done, quiet = registry.new_session(None, None), registry.new_session(None, None)
    registry.finish_session(done.session_id, "success")
    registry.finish_session(done.session_id, "error")  # the first reason stands
    quiet.last_heartbeat -= 2 * RETENTION_SECONDS  # silent far longer than the retention ...
    registry._save("session", quiet.session_id, quiet)
    assert gone_sessions(registry, time.time()) == {done.session_id, quiet.session_id}
    reopened = Registry(str(tmp_path))  # ... then the server restarts
    assert reopened.sessions[done.session_id].finished == "success"
    assert gone_sessions(reopened, time.time()) == {done.session_id}
    assert gone_sessions(reopened, time.time() + RETENTION_SECONDS + 1) == {done.session_id, quiet.session_id}
