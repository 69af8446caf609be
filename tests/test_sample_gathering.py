"""The scheduler's gathering of sampling bursts (engine/scheduler.py), at event-loop level.

These properties are about loop turns and timers, which a real server cannot be driven to hit
deterministically (a request in every loop turn, for thousands of turns), so the scheduler runs
here with a real FutureStore and a stand-in for the worker pool (`AnsweringPool`, named as such:
it answers every item at once, as an idle worker would, and records what it was sent). The
end-to-end behaviour (a burst sent request by request runs as one batch) is in
tests/test_metrics_e2e.py.
"""
from __future__ import annotations

import asyncio

import pytest

from engine.futures import FutureStore
from engine.messages import WorkItem, WorkResult
from engine.scheduler import EXPECT_LIMIT, GATHER_LIMIT, Scheduler


class AnsweringPool:
    """Stand-in for engine.pool.WorkerPool: every sampling item is answered at once."""

    def __init__(self) -> None:
        self.items: list[tuple[float, WorkItem]] = []

    def submit(self, item: WorkItem) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        self.items.append((loop.time(), item))
        fut = loop.create_future()
        fut.set_result(WorkResult(item.request_id, result=[{"ok": True} for _ in item.args["requests"]]))
        return fut


def _scheduler(tmp_path, gather_s: float) -> tuple[Scheduler, AnsweringPool]:
    pool = AnsweringPool()
    return Scheduler(pool, FutureStore(str(tmp_path / "futures")), gather_s=gather_s), pool


def _submit(scheduler: Scheduler, client: str | None = None) -> str:
    return scheduler.submit_sample({"prompt": [1, 2, 3], "base_model": "m"}, 1, lambda r: (r, "json"), client)


@pytest.mark.parametrize("gather_s", [0.0, 0.002])
def test_a_request_in_every_loop_turn_never_holds_dispatch_back(tmp_path, gather_s):
    """Each new request must not push a due dispatch to a later turn: under a steady stream the
    waiting requests still go, with no gathering at the next turn and within GATHER_LIMIT x
    gather_s with it (here: 3000 turns of one request each)."""
    scheduler, pool = _scheduler(tmp_path, gather_s)

    async def stream():
        loop = asyncio.get_running_loop()
        began = loop.time()
        for _ in range(3000):
            _submit(scheduler)
            await asyncio.sleep(0)
        return began, loop.time()

    began, ended = asyncio.run(stream())
    assert pool.items, "nothing was dispatched during the stream"
    first_at = pool.items[0][0]
    if gather_s == 0:
        assert len(pool.items) >= 1000  # about one item per turn or two
    else:
        assert first_at - began <= GATHER_LIMIT * gather_s + 0.05  # bounded by the limit (+ slack for a slow machine)
        assert len(pool.items) >= min(2, (ended - began) / (GATHER_LIMIT * gather_s) - 1)


def test_a_burst_is_gathered_until_it_goes_quiet(tmp_path):
    scheduler, pool = _scheduler(tmp_path, gather_s=0.05)

    async def scenario():
        for _ in range(4):  # a burst, a loop turn apart: gathered into one item
            _submit(scheduler)
            await asyncio.sleep(0)
        assert isinstance(scheduler._sampling_at, asyncio.TimerHandle)
        await asyncio.sleep(GATHER_LIMIT * 0.05 + 0.05)
        assert [len(item.args["requests"]) for _, item in pool.items] == [4]
        _submit(scheduler)  # a lone request waits the quiet gap, then goes alone
        await asyncio.sleep(0.05 + 0.05)
        assert [len(item.args["requests"]) for _, item in pool.items] == [4, 1]

    asyncio.run(scenario())


def test_a_clients_burst_waits_for_as_many_requests_as_its_last_one(tmp_path):
    """A client that sent 4 requests last time and pauses (3 quiet gaps) after its second is waited
    for: its burst still goes as one item. A smaller burst waits at most EXPECT_LIMIT x gather_s;
    another client's first burst keeps the quiet-gap rule."""
    gap = 0.02
    scheduler, pool = _scheduler(tmp_path, gather_s=gap)
    sizes = lambda: [len(item.args["requests"]) for _, item in pool.items]  # noqa: E731

    async def burst(client: str, n: int, pause_after: int | None = None, pause: float = 0.0) -> None:
        for i in range(n):
            if i == pause_after:
                await asyncio.sleep(pause)
            _submit(scheduler, client)
            await asyncio.sleep(0)

    async def scenario():
        loop = asyncio.get_running_loop()
        await burst("a", 4)  # its first burst: the quiet-gap rule
        await asyncio.sleep(GATHER_LIMIT * gap + 0.05)
        assert sizes() == [4]
        await burst("a", 4, pause_after=2, pause=3 * gap)  # would have gone as 2 + 2 on the quiet gap alone
        await asyncio.sleep(gap + 0.05)
        assert sizes() == [4, 4]
        began = loop.time()
        await burst("a", 1)  # smaller than last time: waits for the limit, then goes
        while len(pool.items) < 3:
            await asyncio.sleep(0.005)
        assert pool.items[2][0] - began >= EXPECT_LIMIT * gap - 0.01
        await burst("b", 1)  # a client seen for the first time: the quiet gap
        began = loop.time()
        while len(pool.items) < 4:
            await asyncio.sleep(0.005)
        assert pool.items[3][0] - began < GATHER_LIMIT * gap + 0.05
        assert sizes() == [4, 4, 1, 1]

    asyncio.run(scenario())


def test_closing_fails_the_requests_being_gathered(tmp_path):
    scheduler, pool = _scheduler(tmp_path, gather_s=0.5)

    async def scenario():
        ids = [_submit(scheduler) for _ in range(3)]
        scheduler.close()
        await asyncio.sleep(GATHER_LIMIT * 0.5 / 10)
        return ids

    ids = asyncio.run(scenario())
    assert pool.items == []
    for request_id in ids:
        record = scheduler.futures.get(request_id)
        assert record.state == "failed" and "shutting down" in record.error and record.category == "server"
