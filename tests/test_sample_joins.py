"""What a worker does with the items that arrive while it decodes a sampling batch
(`engine.sample_joins`), driven directly with in-memory queues and a controlled clock: order is
kept, other operations run between decode steps one per turn and take at most their share of the
time, and they run only when every rank (the replica's others, other replicas) is ready for them.
Ranks that meet in collectives are threads here, and a collective is a barrier."""
from __future__ import annotations

import queue
import threading
from collections import deque

import pytest

from engine import sample_joins
from engine.messages import WorkItem, WorkResult
from engine.sample_joins import SampleJoins
from engine.worker import wait_for_every_rank

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


class Collective:
    """`size` ranks (threads) meet: each gives a value and every one gets what `combine` makes of
    them all, {rank: value} (barrier, read, barrier: consecutive rounds do not mix); the least by
    default, as `all_agree`."""

    def __init__(self, size: int, combine=lambda values: min(values.values())) -> None:
        self.barrier, self.combine, self.values = threading.Barrier(size, timeout=20), combine, {}

    def __call__(self, who: int, value: int) -> int:
        self.values[who] = value
        self.barrier.wait()
        out = self.combine(self.values)
        self.barrier.wait()
        return out


class Rank:
    """One rank's view: its inbox, what it ran between decode steps (and when), what it answered."""

    def __init__(self, clock: Clock, leader: bool, agree=lambda v: v, op_seconds: float = 2.0, share: float = 0.5,
                 all_agree=lambda v: v, stash: deque | None = None) -> None:
        self.clock, self.inbox, self.ran, self.answers = clock, queue.Queue(), [], []
        self.op_seconds = op_seconds
        self.asked: list[int] = []  # what this rank answered each time every rank was asked

        def run_between(item: WorkItem) -> None:
            self.ran.append((item.request_id, clock.now))
            clock.now += self.op_seconds  # the operation takes this long

        def ask_everyone(value: int) -> int:
            self.asked.append(value)
            return all_agree(value)

        outbox = type("Outbox", (), {"put": lambda _, reply: self.answers.append(reply)})()
        self.joins = SampleJoins(_sample("first"), self.inbox, outbox, deque() if stash is None else stash, leader,
                                 agree, run_between, share=share, all_agree=ask_everyone)

    def send(self, *items: WorkItem) -> None:
        for item in items:
            self.inbox.put(item)

    def take(self) -> list[str]:
        return [reqs[0]["name"] for reqs in self.joins.take(_same_base)]


def together(*steps):
    """Run the callables at once, one thread each (ranks meeting in collectives); their results."""
    results = [None] * len(steps)

    def run(i):
        results[i] = steps[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(steps))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads), "a rank is stuck in a collective"
    return results


@pytest.fixture()
def clock(monkeypatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(sample_joins, "monotonic", c)
    return c


def test_operations_run_between_decode_steps_in_arrival_order(clock):
    rank = Rank(clock, leader=True)
    rank.send(_sample("a"), _op("fb"), _sample("b"))
    assert rank.take() == ["a", "b"]
    assert [name for name, _ in rank.ran] == ["fb"]
    assert rank.take() == []  # nothing new


@pytest.mark.parametrize("share", [0.5, 0.25])
def test_operations_take_at_most_their_share_of_a_batchs_time(clock, share):
    rank = Rank(clock, leader=True, op_seconds=2.0, share=share)
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


def test_a_turn_runs_one_operation_so_a_long_queue_does_not_stall_decoding(clock):
    """Five operations waiting at once: each turn runs one, and the batch decodes its share of time
    between them (with share 1, one per decode step); the sample behind them joins after the last."""
    rank = Rank(clock, leader=True, op_seconds=1.0, share=0.5)
    rank.send(*[_op(f"s{i}") for i in range(5)], _sample("behind"))
    steps, joined = 0, []
    while not joined:
        ran_before = len(rank.ran)
        joined = rank.take()
        assert len(rank.ran) - ran_before <= 1
        clock.now += 0.25  # a decode step
        steps += 1
    assert joined == ["behind"] and len(rank.ran) == 5  # it joined right after the last one ran
    assert steps >= 4 * 4  # 1 s of decoding (four steps) after each of the first four
    eager = Rank(clock, leader=True, op_seconds=1.0, share=1.0)
    eager.send(*[_op(f"e{i}") for i in range(3)], _sample("after"))
    assert [eager.take() for _ in range(3)] == [[], [], ["after"]] and len(eager.ran) == 3


def test_shutdown_and_sampling_of_another_base_model_close_the_batch(clock):
    rank = Rank(clock, leader=True)
    rank.send(_sample("a"), _sample("other", base="tiny-llama"), _op("fb"), _sample("b"))
    assert rank.take() == ["a"]
    assert rank.take() == [] and rank.ran == []  # closed: the rest runs after the batch, in order
    assert [item.request_id for item in rank.joins.stash] == ["other", "fb", "b"]
    shut = Rank(clock, leader=True)
    shut.send(WorkItem("bye", "shutdown"), _sample("c"))
    assert shut.take() == [] and shut.joins.closed
    assert shut.asked == []  # shutdown is no operation the other ranks wait for: nobody is asked


def test_a_batch_starts_with_the_items_left_from_the_one_before(clock):
    """The worker starts the next batch with the items the last one left in `stash`: they come
    first, in order, before anything in the inbox: the operation at the front runs at the first
    step, the sample behind it joins, the sample of another base model closes the batch."""
    left = deque([_op("left"), _sample("b"), _sample("other", base="tiny-llama"), _sample("c")])
    rank = Rank(clock, leader=True, stash=left)
    rank.send(_sample("d"))
    assert rank.take() == ["b"]
    assert [name for name, _ in rank.ran] == ["left"] and rank.joins.closed
    assert [item.request_id for item in rank.joins.stash] == ["other", "c", "d"]
    joins_at_once = Rank(clock, leader=True, stash=deque([_sample("e")]))
    assert joins_at_once.take() == ["e"] and joins_at_once.asked == []


def test_the_other_ranks_of_the_replica_follow_the_leaders_decisions(clock):
    """The leader's count reaches a follower in one broadcast; the follower moves exactly that many
    items from its inbox (blocking for ones still on their way). An operation runs on both or on
    neither: when the leader's clock says wait, the follower's (whose operations take no time)
    does not decide alone."""
    broadcast, least = Collective(2, combine=lambda v: v[0]), Collective(2)
    leader = Rank(clock, leader=True, agree=lambda v: broadcast(0, v), all_agree=lambda v: least(0, v), op_seconds=2.0)
    follower = Rank(clock, leader=False, agree=lambda v: broadcast(1, v), all_agree=lambda v: least(1, v),
                    op_seconds=0.0)
    for rank in (leader, follower):
        rank.send(_op("step1"), _sample("a"))
    assert together(leader.take, follower.take) == [["a"], ["a"]]
    for rank in (leader, follower):
        rank.send(_op("step2"), _sample("b"))
    assert together(leader.take, follower.take) == [[], []]  # the leader's turn has not come
    assert follower.asked[-1] == 1 and leader.asked[-1] == 0
    clock.now += 10.0
    assert together(leader.take, follower.take) == [["b"], ["b"]]
    assert [n for n, _ in leader.ran] == [n for n, _ in follower.ran] == ["step1", "step2"]


def test_an_operation_waits_until_every_rank_has_the_memory_for_it(clock):
    """Each rank asks its own memory; the operation runs when all of them have room, on all."""
    broadcast, least = Collective(2, combine=lambda v: v[0]), Collective(2)
    leader = Rank(clock, leader=True, agree=lambda v: broadcast(0, v), all_agree=lambda v: least(0, v))
    follower = Rank(clock, leader=False, agree=lambda v: broadcast(1, v), all_agree=lambda v: least(1, v))
    fits = [True, False]
    leader.joins.room = lambda: fits[0]
    follower.joins.room = lambda: fits[1]
    for rank in (leader, follower):
        rank.send(_op("step"), _sample("behind"))
    assert together(leader.take, follower.take) == [[], []]  # the follower lacks room; the sample waits too
    assert leader.ran == follower.ran == []
    fits[1] = True  # rows finished and freed their K/V
    assert together(leader.take, follower.take) == [["behind"], ["behind"]]
    assert [n for n, _ in leader.ran] == [n for n, _ in follower.ran] == ["step"]


def test_a_rank_that_cannot_tell_its_memory_waits_without_raising(clock):
    rank = Rank(clock, leader=True)
    rank.joins.room = lambda: 1 / 0
    rank.send(_op("step"))
    assert rank.take() == [] and rank.ran == [] and rank.asked == [0]


def test_an_operation_waits_for_a_replica_whose_batch_is_closed_and_neither_batch_stops(clock):
    """Data parallelism: an operation reaches every rank of both replicas. Replica A's batch is
    open and its turn has come; replica B's batch is closed (sampling of another base model is next
    in its stash, the operation behind it). A does not run the operation (its collectives would
    wait for B until B's batch ends): both batches decode on, asking every step, B answering no,
    and B keeps reading its inbox. Once B's batch has ended, B's worker loop says yes and the
    operation runs on A between two of its decode steps. The time A spent asking is not counted
    toward its share: its next turn comes one operation's length later."""
    least = Collective(2)
    a = Rank(clock, leader=True, all_agree=lambda v: least(0, v), op_seconds=2.0)
    b = Rank(clock, leader=True, all_agree=lambda v: least(1, v), op_seconds=0.0)
    b.send(_sample("other", base="tiny-llama"))
    assert together(a.take, b.take) == [[], []] and b.joins.closed
    for rank in (a, b):
        rank.send(_op("step1"))
    for _ in range(3):
        assert together(a.take, b.take) == [[], []]
    assert a.ran == b.ran == [] and a.asked == [1, 1, 1] and b.asked == [0, 0, 0]
    b.send(_sample("late"))  # a closed batch still moves what arrives to its stash
    assert together(a.take, b.take) == [[], []]
    assert [item.request_id for item in b.joins.stash] == ["other", "step1", "late"]

    # B's batch has ended: its worker runs the llama sample (a batch that may also see step1 wait),
    # or here, with step1 next, waits in its main loop until every rank is ready.
    backend = type("Backend", (), {"all_agree": staticmethod(lambda v: least(1, v))})()
    waited_at = clock.now

    def b_ends_its_batch_late():
        clock.now += 30.0  # meanwhile A waits in the question for 30 s
        wait_for_every_rank(backend)

    assert together(a.take, b_ends_its_batch_late) == [[], None]
    assert [n for n, _ in a.ran] == ["step1"] and a.ran[0][1] == waited_at + 30.0
    a.send(_op("step2"))
    clock.now += 2.0 - 0.01  # share 0.5: the batch decodes 2 s after a 2 s operation (not after 32 s)
    assert together(a.take, lambda: least(1, 1)) == [[], 0] and a.asked[-1] == 0
    clock.now += 0.02
    assert together(a.take, lambda: least(1, 1)) == [[], 1]
    assert [n for n, _ in a.ran] == ["step1", "step2"]


def test_an_answer_that_cannot_be_sent_becomes_an_error_never_an_exception(clock):
    class FlakyOutbox:
        def __init__(self):
            self.sent = []

        def put(self, reply):
            if reply.error is None:
                raise OSError("no room in shared memory")
            self.sent.append(reply)

    rank = Rank(clock, leader=True)
    rank.joins.outbox = FlakyOutbox()
    rank.joins.reply(0, [{"sequences": []}])  # does not raise: the other ranks go on to collectives
    [sent] = rank.joins.outbox.sent
    assert isinstance(sent, WorkResult) and sent.request_id == "first" and "no room" in sent.error
    assert 0 in rank.joins.replied


def test_share_1_runs_operations_at_every_step_and_share_0_after_the_batch(clock):
    eager = Rank(clock, leader=True, share=1.0)
    for step in ("s1", "s2", "s3"):
        eager.send(_op(step))
        eager.take()
    assert [n for n, _ in eager.ran] == ["s1", "s2", "s3"]
    never = Rank(clock, leader=True, share=0.0)
    never.send(_op("step"), _sample("behind"))
    clock.now += 1e6
    assert never.take() == [] and never.ran == []
    assert [item.request_id for item in never.joins.stash] == ["step", "behind"]  # run by the worker after the batch
