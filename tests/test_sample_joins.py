"""What a worker does with the items that arrive while it decodes a sampling batch
(`engine.sample_joins`), driven directly with in-memory queues and a controlled clock: order is
kept, other operations run between decode steps but take at most their share of the time, and
the replica's other ranks do exactly what its leader decided."""
from __future__ import annotations

import queue
from collections import deque

import pytest

from engine import sample_joins
from engine.messages import WorkItem
from engine.sample_joins import SampleJoins

BASE = "tiny-qwen3"


def _sample(name: str, base: str = BASE) -> WorkItem:
    return WorkItem(name, "sample", {"requests": [{"base_model": base, "name": name}]}, replica=0)


def _op(name: str) -> WorkItem:
    return WorkItem(name, "forward_backward", {"name": name})


def _same_base(reqs: list[dict]) -> bool:
    return all(r["base_model"] == BASE for r in reqs)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Rank:
    """One rank's view: its inbox, what it ran between decode steps (and when), what it answered."""

    def __init__(self, clock: Clock, leader: bool, agree, op_seconds: float = 2.0, share: float = 0.5) -> None:
        self.clock, self.inbox, self.ran, self.answers = clock, queue.Queue(), [], []
        self.op_seconds = op_seconds

        def run_between(item: WorkItem) -> None:
            self.ran.append((item.request_id, clock.now))
            clock.now += self.op_seconds  # the operation takes this long

        outbox = type("Outbox", (), {"put": lambda _, reply: self.answers.append(reply)})()
        self.joins = SampleJoins(_sample("first"), self.inbox, outbox, deque(), leader, agree, run_between,
                                 share=share)

    def send(self, *items: WorkItem) -> None:
        for item in items:
            self.inbox.put(item)

    def take(self) -> list[str]:
        return [reqs[0]["name"] for reqs in self.joins.take(_same_base)]


@pytest.fixture()
def clock(monkeypatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(sample_joins.time, "time", c)
    return c


def test_operations_run_between_decode_steps_in_arrival_order(clock):
    rank = Rank(clock, leader=True, agree=lambda v: v)
    rank.send(_sample("a"), _op("fb"), _sample("b"))
    assert rank.take() == ["a", "b"]
    assert [name for name, _ in rank.ran] == ["fb"]
    assert rank.take() == []  # nothing new


@pytest.mark.parametrize("share", [0.5, 0.25])
def test_operations_take_at_most_their_share_of_a_batchs_time(clock, share):
    rank = Rank(clock, leader=True, agree=lambda v: v, op_seconds=2.0, share=share)
    rank.send(_op("step1"))
    assert rank.take() == [] and len(rank.ran) == 1  # the first runs at once
    wait = 2.0 * (1 - share) / share  # the batch now decodes this long: 2 s at 0.5, 6 s at 0.25
    rank.send(_op("step2"), _sample("late"))
    clock.now += wait - 0.01
    assert rank.take() == [] and len(rank.ran) == 1  # not its turn; the sample behind it waits too
    clock.now += 0.02
    assert rank.take() == ["late"]
    assert [name for name, _ in rank.ran] == ["step1", "step2"]
    assert rank.ran[1][1] - (rank.ran[0][1] + 2.0) >= wait  # decoded for `wait` seconds in between


def test_shutdown_and_sampling_of_another_base_model_close_the_batch(clock):
    rank = Rank(clock, leader=True, agree=lambda v: v)
    rank.send(_sample("a"), _sample("other", base="tiny-llama"), _op("fb"), _sample("b"))
    assert rank.take() == ["a"]
    assert rank.take() == [] and rank.ran == []  # closed: the rest runs after the batch, in order
    assert [item.request_id for item in rank.joins.stash] == ["other", "fb", "b"]
    shut = Rank(clock, leader=True, agree=lambda v: v)
    shut.send(WorkItem("bye", "shutdown"), _sample("c"))
    assert shut.take() == [] and shut.joins.closed


def test_the_other_ranks_of_the_replica_follow_the_leaders_decisions(clock):
    """The leader's count and turn reach a follower in one broadcast; the follower moves exactly
    that many items from its inbox (blocking for ones still on their way) and runs operations
    only when the leader does, whatever its own clock says."""
    decided = []
    leader = Rank(clock, leader=True, agree=lambda v: decided.append(v) or v, op_seconds=2.0)
    follower = Rank(clock, leader=False, agree=lambda v: decided[-1], op_seconds=0.0)
    for rank in (leader, follower):
        rank.send(_op("step1"), _sample("a"))
    assert leader.take() == follower.take() == ["a"]
    for rank in (leader, follower):
        rank.send(_op("step2"), _sample("b"))
    assert leader.take() == [] and follower.take() == []  # the leader's clock says wait; the follower's would not
    clock.now += 10.0
    assert leader.take() == ["b"] and follower.take() == ["b"]
    assert [n for n, _ in leader.ran] == [n for n, _ in follower.ran] == ["step1", "step2"]


def test_an_operation_waits_while_the_memory_beside_the_batch_does_not_fit_it(clock):
    rank = Rank(clock, leader=True, agree=lambda v: v)
    fits = [False]
    rank.joins.room = lambda: fits[0]
    rank.send(_op("step"), _sample("behind"))
    assert rank.take() == [] and rank.ran == []  # the sample behind it waits too
    fits[0] = True  # rows finished and freed their K/V
    assert rank.take() == ["behind"] and [n for n, _ in rank.ran] == ["step"]


def test_share_1_runs_operations_at_every_step_and_share_0_after_the_batch(clock):
    eager = Rank(clock, leader=True, agree=lambda v: v, share=1.0)
    for step in ("s1", "s2", "s3"):
        eager.send(_op(step))
        eager.take()
    assert [n for n, _ in eager.ran] == ["s1", "s2", "s3"]
    never = Rank(clock, leader=True, agree=lambda v: v, share=0.0)
    never.send(_op("step"), _sample("behind"))
    clock.now += 1e6
    assert never.take() == [] and never.ran == []
    assert [item.request_id for item in never.joins.stash] == ["step", "behind"]  # run by the worker after the batch
