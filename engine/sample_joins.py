"""Work that reaches a worker while it runs a sampling batch (continuous batching), in a worker.

While a worker decodes one sampling batch, the server keeps sending work items. Between decode
steps the backend calls `SampleJoins.take`, which goes through the items waiting for this rank,
in order: a `sample` item's rows join the batch instead of waiting for it to end; any other
operation (training, checkpoints, adapters: whatever another client asked for meanwhile) runs
right there, between two decode steps (`run_between`), and is answered at once, so a long
generation does not keep it waiting. Nothing overtakes anything: items run or join in the order
they arrived.

The two share the worker's time: while the batch has rows to decode, operations between its steps
take at most `share` of it (`Config.interleave_share`, 0.5 by default). A turn runs one
operation; after one that ran for d seconds, the batch decodes for d * (1 - share) / share
seconds before the next one runs (it waits in `stash`, and what arrived after it waits behind
it), so a long queue of operations does not stall decoding either; with share 0 none runs during
the batch, with 1 one runs at every step. At 0.5 a client that trains without pause slows a long
generation to about half its speed, not to a token per training step, and a training step waits
at most about its own length for its turn. An operation also waits while a rank lacks the memory
for it beside the running batch (`room`, the backend's `room_beside_sampling`): rows that finish
free theirs, and at worst it runs once the batch has ended, as it would without this.

Sampling items go to the ranks of one data-parallel replica (`WorkItem.replica`), and every rank
of it must take the same items at the same step. The replica's leader decides: it moves what its
inbox holds to `stash`, and `agree` (a broadcast from the leader over the replica) tells the
other ranks how many items to move from theirs, which receive the same items in the same order.
The first item that can neither join nor run (`shutdown`, or sampling of another base model)
stays in `stash`, to run right after the batch, and nothing more joins or runs during this batch
(it is `closed`; its leader still reads the inbox, to know what waits).

Every other operation reaches every rank of every replica, and its collectives span them all: it
may run only when every rank runs it at once. So while an operation waits in a rank's `stash`,
each `take` asks every rank of the world (`all_agree`, the least of their answers, one collective
over all ranks) whether it is ready for it now: its batch is not closed, the operation is next
in line, its turn has come and it has the memory. Ranks that are not sampling answer yes from the
worker's main loop (`engine.worker`). Only when all say yes does it run, on every rank at that
step; otherwise each batch decodes on, and asks again at its next step. So one replica never
waits inside an operation's collectives for another that cannot run it yet, and a rank's share
counts only the operation's own time, not waits for the others. (While some rank has an
operation waiting, the replicas' decode steps keep pace with each other through this question,
and one that starts a new batch keeps the others waiting in it for the length of its prefill.)

Every item of the batch, the one that started it (item 0) and each that joined (items 1, 2,
...), is answered (`reply`) as soon as all its requests are done, not when the whole batch ends:
under a steady stream of joining requests a batch may run for as long as the stream lasts.
What runs on the leader alone (answering) never raises out of `take` or `reply`: the replica's
other ranks would then wait in collectives it never reaches.
"""
from __future__ import annotations

import logging
import queue
import time
from collections import deque
from time import monotonic
from typing import Callable

from engine.messages import Transport, WorkItem, WorkResult
from engine.shm_queue import ShmQueue, tensor_bytes

log = logging.getLogger("tinkercloud.worker")


def waits_for_everyone(item: WorkItem) -> bool:
    """An operation that every rank of every replica runs together (all but sampling and shutdown)."""
    return item.op not in ("sample", "shutdown")


class SampleJoins:
    def __init__(self, running: WorkItem, inbox: ShmQueue, outbox: ShmQueue, stash: deque, leader: bool,
                 agree: Callable[[int], int], run_between: Callable[[WorkItem], None],
                 room: Callable[[], bool] = lambda: True, share: float = 0.5,
                 all_agree: Callable[[int], int] = lambda value: value) -> None:
        self.inbox, self.outbox, self.stash, self.leader, self.agree = inbox, outbox, stash, leader, agree
        self.all_agree = all_agree  # the least of every rank's value, over every replica (a collective)
        self.run_between = run_between  # runs (and answers) another operation between two decode steps
        self.room = room  # whether the memory left beside the running batch fits an operation now, on this rank
        self.share = share  # of the batch's time, what operations between its decode steps may take
        self.closed = False  # set: nothing more joins or runs during this batch
        self.next_turn = 0.0  # monotonic() from which this rank may run an operation between decode steps
        self.items: list[tuple[WorkItem, float]] = [(running, time.time())]  # (item, when it started or joined)
        self.replied: set[int] = set()  # indices into `items` already answered

    def take(self, can_join: Callable[[list[dict]], bool]) -> list[list[dict]]:
        """The request lists of the items that join now, after running the operation that arrived
        before them if every rank is ready for it (collectives over the replica and the world)."""
        count = self.agree(self._read_inbox() if self.leader else 0)  # the leader's count, on every rank
        if not self.leader:
            for _ in range(count):
                self.stash.append(self.inbox.get())
        taken = self._join(can_join)
        if any(waits_for_everyone(item) for item in self.stash) and self.all_agree(int(self._ready())):
            item = self.stash.popleft()
            started = monotonic()
            self.run_between(item)
            ran = monotonic() - started
            self.next_turn = monotonic() + ran * (1 - self.share) / self.share
            taken += self._join(can_join)
        return taken

    def _read_inbox(self) -> int:
        """Leader: move what its inbox holds to `stash`; how many items that was."""
        moved = 0
        while True:
            try:
                self.stash.append(self.inbox.get_nowait())
            except queue.Empty:
                return moved
            moved += 1

    def _join(self, can_join: Callable[[list[dict]], bool]) -> list[list[dict]]:
        """Join the sampling items at the front of `stash`, up to the first other item; close the
        batch at the first one that can neither join nor run during it."""
        taken = []
        while not self.closed and self.stash and self.stash[0].op in ("sample", "shutdown"):
            item = self.stash[0]
            if item.op == "shutdown" or not can_join(item.args["requests"]):
                self.closed = True
                break
            self.stash.popleft()
            self.items.append((item, time.time()))
            taken.append(item.args["requests"])
        return taken

    def _ready(self) -> bool:
        """Whether this rank could run the operation at the front of `stash` now: the batch is not
        closed, the operation is next in line, its turn has come, and it fits beside the batch."""
        if self.closed or not self.stash or not waits_for_everyone(self.stash[0]):
            return False
        if self.share <= 0 or monotonic() < self.next_turn:
            return False
        try:
            return bool(self.room())
        except Exception:  # noqa: BLE001 - it waits; every rank still answers the question
            log.exception("could not tell the memory free beside the sampling batch; the operation waits")
            return False

    def reply(self, k: int, results: list) -> None:
        """Answer item `k` (0: the running one, then the joined ones in joining order) now, from the leader."""
        self.replied.add(k)
        if self.leader:
            item, started_at = self.items[k]
            reply = WorkResult(item.request_id, result=results)
            reply.transport = Transport(result_bytes=tensor_bytes(results), started_at=started_at,
                                        finished_at=time.time(), joined=k > 0)
            send(self.outbox, reply)


def send(outbox: ShmQueue, reply: WorkResult) -> None:
    """Put `reply` in the outbox; if that fails, an error in its place (logged either way), never
    an exception: only the answering rank does this, in the middle of collectives."""
    try:
        outbox.put(reply)
    except Exception as e:  # noqa: BLE001
        log.exception("could not send the result of %s", reply.request_id)
        try:
            outbox.put(WorkResult(reply.request_id, error=f"the worker could not send the result: {e}",
                                  category="server", transport=reply.transport))
        except Exception:  # noqa: BLE001
            log.exception("could not send the failure of %s either", reply.request_id)
