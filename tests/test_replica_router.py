"""The choice of data-parallel replica for each sampling request (engine/replica_router.py)."""
from __future__ import annotations

from engine.replica_router import BLOCK, SLACK_ROWS, ReplicaRouter

MODEL = ("tiny-qwen3", "snapshot-1")


def prompt(first: int, length: int) -> list[int]:
    return list(range(first, first + length))


def test_requests_go_to_the_least_loaded_replica_and_back_when_answered():
    router = ReplicaRouter(3)
    picks = [router.pick(MODEL, prompt(1000 * i, 40), rows=2) for i in range(4)]
    assert picks == [0, 1, 2, 0] and router.rows == [4, 2, 2]
    router.done(0, 4)
    assert router.pick(MODEL, prompt(9000, 40), rows=1) == 0  # now the least loaded


def test_the_next_turn_goes_back_to_the_replica_that_has_the_earlier_turn():
    router = ReplicaRouter(2)
    turn1 = [prompt(1000 * i, 3 * BLOCK) for i in range(4)]
    first = [router.pick(MODEL, p, 1) for p in turn1]
    assert first == [0, 1, 0, 1]
    for r, n in ((0, 2), (1, 2)):
        router.done(r, n)
    # the next turns, in another order: each repeats its first turn (plus an answer and a new message)
    again = {i: router.pick(MODEL, turn1[i] + prompt(500 + i, BLOCK), 1) for i in (3, 2, 1, 0)}
    assert [again[i] for i in range(4)] == first  # least-loaded alone would have given 1, 0, 1, 0 here


def test_affinity_needs_most_of_the_prompt_and_the_same_model():
    router = ReplicaRouter(2)
    system = prompt(7, 2 * BLOCK)
    assert router.pick(MODEL, system + prompt(100, BLOCK), 1) == 0
    # a shared system prompt is a third of this one: the least loaded replica takes it
    assert router.pick(MODEL, system + prompt(200, 4 * BLOCK), 1) == 1
    # the same prompt under another adapter is not in any cache: least loaded (0 on a tie)
    assert router.pick(("tiny-qwen3", "snapshot-2"), system + prompt(100, BLOCK), 1) == 0
    assert router.pick(("tiny-qwen3", "snapshot-2"), system + prompt(100, BLOCK), 1) == 0  # now it is


def test_affinity_yields_to_balance_beyond_the_slack():
    router = ReplicaRouter(2)
    p = prompt(0, 4 * BLOCK)
    assert router.pick(MODEL, p, 1) == 0
    assert router.pick(MODEL, p, SLACK_ROWS) == 0  # 1 row ahead of replica 1: within the slack
    assert router.rows == [1 + SLACK_ROWS, 0]
    assert router.pick(MODEL, p, 1) == 1  # now too far ahead


def test_one_replica_takes_everything():
    router = ReplicaRouter(1)
    assert {router.pick(MODEL, prompt(i, 40), 3) for i in range(5)} == {0}
    assert router.rows == [15]
