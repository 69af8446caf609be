"""Sampler snapshots evicted while a sampling batch uses them go as soon as the last row using
them is done, not when the batch ends: an RL loop (save_weights_for_sampler, then sample with the
new sampler, again and again) keeps one batch alive for as long as it runs, and the evicted
snapshots' factors must not pile up meanwhile.

The real `MilesBackend` on a tiny checkpoint, in a worker process of its own (this file is the
worker script, `tests.mcore_harness.run_workers`), samples one batch while a scripted inbox
delivers, every few decode steps, a `save_for_sampler` that evicts the previous snapshot and a
sampling request on the new one, through the worker's own `SampleJoins` and
`run_between_decode_steps`. At every decode step the worker records which snapshots still hold
LoRA factors (`LoraManager.has_adapter`)."""
from __future__ import annotations

import json
import queue
import sys
from pathlib import Path

from tests.mcore_harness import make_hf_checkpoint, run_workers

ROUNDS = 12  # snapshots saved (each evicting the one before) while the batch runs
STEPS_PER_ROUND = 3  # decode steps between two saves
TOKENS = 6  # each request's rows decode this many tokens: a row outlives about two rounds


def test_evicted_snapshots_go_when_their_last_row_is_done(tmp_path):
    ckpt = make_hf_checkpoint(tmp_path / "tiny", "qwen3")
    out = tmp_path / "held.json"
    run_workers(Path(__file__), 1, str(ckpt), str(tmp_path / "data"), str(out), timeout=300)
    got = json.loads(out.read_text())
    held, answers = got["held"], got["answers"]
    assert answers == [TOKENS] * (ROUNDS + 1), "every request is answered with all its tokens"
    assert got["rounds_run"] == ROUNDS and got["batch_steps"] > ROUNDS * STEPS_PER_ROUND
    # At any step only the snapshots whose rows still decode, and the newest, hold factors: never
    # more than the rows of two or three rounds (before: every snapshot of the batch, to its end).
    assert max(len(h) for h in held) <= 3, held
    assert "s0" not in held[len(held) // 2]  # the first is long gone while the batch still runs
    assert got["after"] == [f"s{ROUNDS}"]  # after the batch: the newest snapshot alone


def _request(key: str, seed: int) -> dict:
    return {"base_model": "tiny", "prompt": [5, 6, 7, 8], "num_samples": 1, "max_tokens": TOKENS,
            "temperature": 1.0, "top_k": -1, "top_p": 1.0, "stop_token_ids": [], "stop_strings": [],
            "seed": seed, "prompt_logprobs": False, "adapter": {"key": key}}


def _worker(ckpt: str, data_dir: str, out: str) -> None:
    import functools
    from collections import deque

    from engine.messages import WorkItem
    from engine.pool import WorkerSpec
    from engine.sample_joins import SampleJoins
    from engine.worker import run_between_decode_steps, run_sampling
    from backends.miles.backend import MilesBackend

    backend = MilesBackend(WorkerSpec(backend="miles", models={"tiny": ckpt}, data_dir=data_dir, world_size=1, tp=1))
    backend.create_adapter("run", "tiny", rank=4, alpha=32, seed=1, train_attn=True, train_mlp=True,
                           train_unembed=False)
    backend.save_for_sampler("run", "s0", None, None)
    lora = backend.bases["tiny"].lora
    keys = [f"s{k}" for k in range(ROUNDS + 1)]
    held: list[list[str]] = []
    rounds_run = [0]

    class ScriptedInbox:
        """Every STEPS_PER_ROUND decode steps: a save evicting the last snapshot, then a request on the new one."""

        def __init__(self) -> None:
            self.step, self.items = 0, deque()

        def get_nowait(self):
            if not self.items:
                held.append([k for k in keys if lora.has_adapter(k)])  # once per decode step
                self.step += 1
                k = self.step // STEPS_PER_ROUND
                if self.step % STEPS_PER_ROUND == 0 and k <= ROUNDS:
                    save = WorkItem(f"save{k}", "save_for_sampler",
                                    {"model_id": "run", "sampler_key": f"s{k}", "path": None, "meta": None,
                                     "evict": [f"s{k - 1}"]})
                    self.items.extend([save, WorkItem(f"sample{k}", "sample", {"requests": [_request(f"s{k}", k)]},
                                                      replica=0)])
                    rounds_run[0] = k
                raise queue.Empty
            return self.items.popleft()

    answers: dict[str, int] = {}

    class Outbox:
        def put(self, reply):
            assert reply.error is None, reply.error
            if reply.request_id.startswith("sample"):
                answers[reply.request_id] = len(reply.result[0]["sequences"][0]["tokens"])

    first = WorkItem("sample0", "sample", {"requests": [_request("s0", 0)]}, replica=0)
    between = functools.partial(run_between_decode_steps, backend, Outbox(), True)
    joins = SampleJoins(first, ScriptedInbox(), Outbox(), deque(), True, backend.agree, between,
                        backend.room_beside_sampling, share=1.0, all_agree=backend.all_agree)
    for reply in run_sampling(backend, first, joins):
        Outbox().put(reply)
    Path(out).write_text(json.dumps({
        "held": held, "rounds_run": rounds_run[0], "batch_steps": len(held),
        "answers": [answers[f"sample{k}"] for k in range(ROUNDS + 1)],
        "after": [k for k in keys if lora.has_adapter(k)]}))


if __name__ == "__main__":
    _worker(*sys.argv[1:])
