"""Work that reaches a worker while it runs a sampling batch (continuous batching), in a worker.

While a worker decodes one sampling batch, the server keeps sending work items. Between decode
steps the backend calls `SampleJoins.take`, which goes through the items waiting for this rank,
in order: a `sample` item's rows join the batch instead of waiting for it to end; any other
operation (training, checkpoints, adapters: whatever another client asked for meanwhile) runs
right there, between two decode steps (`run_between`), and is answered at once, so a long
generation does not keep it waiting. Nothing overtakes anything: items run or join in the order
they arrived.

The two share the worker's time: while the batch has rows to decode, operations between its steps
take at most `share` of it (`Config.interleave_share`, 0.5 by default). After operations that ran
for d seconds, the batch decodes for d * (1 - share) / share seconds before the next one runs (it
waits in `stash`, and what arrived after it waits behind it); with share 0 none runs during the
batch, with 1 they run at every step. At 0.5 a client that trains without pause slows a long
generation to about half its speed, not to a token per training step, and a training step waits
at most about its own length for its turn. An operation also waits while the worker lacks the
memory for it beside the running batch (`room`, the backend's `room_beside_sampling`): rows that
finish free theirs, and at worst it runs once the batch has ended, as it would without this.

Sampling items go to the ranks of one data-parallel replica (`WorkItem.replica`), and every rank
of it must take the same items and run the same operations at the same step. The replica's
leader decides: it moves what its inbox holds to `stash`, and `agree` (a broadcast from the
leader over the replica) tells the other ranks how many items to move from theirs, which receive
the same items in the same order, and whether operations may run at this step. The first item
that can do neither (`shutdown`, or sampling of another base model) stays in `stash`, to run
right after the batch, and nothing more joins or runs during this batch. Every item of the
batch, the one that started it (item 0) and each that joined (items 1, 2, ...), is answered
(`reply`) as soon as all its requests are done, not when the whole batch ends: under a steady
stream of joining requests a batch may run for as long as the stream lasts.
"""
from __future__ import annotations

import queue
import time
from collections import deque
from typing import Callable

from engine.messages import Transport, WorkItem, WorkResult
from engine.shm_queue import ShmQueue, tensor_bytes


class SampleJoins:
    def __init__(self, running: WorkItem, inbox: ShmQueue, outbox: ShmQueue, stash: deque, leader: bool,
                 agree: Callable[[int], int], run_between: Callable[[WorkItem], None],
                 room: Callable[[], bool] = lambda: True, share: float = 0.5) -> None:
        self.inbox, self.outbox, self.stash, self.leader, self.agree = inbox, outbox, stash, leader, agree
        self.run_between = run_between  # runs (and answers) another operation between two decode steps
        self.room = room  # whether the memory left beside the running batch fits an operation now
        self.share = share  # of the batch's time, what operations between its decode steps may take
        self.closed = False  # set: nothing more joins or runs during this batch
        self.next_turn = 0.0  # leader: time.time() from which operations may run between decode steps
        self.items: list[tuple[WorkItem, float]] = [(running, time.time())]  # (item, when it started or joined)
        self.replied: set[int] = set()  # indices into `items` already answered

    def take(self, can_join: Callable[[list[dict]], bool]) -> list[list[dict]]:
        """The request lists of the items that join now, after running the operations that
        arrived before them if it is their turn (a collective over the replica's ranks)."""
        if self.closed:
            return []
        waiting, turn = 0, 0
        if self.leader:
            while True:
                try:
                    self.stash.append(self.inbox.get_nowait())
                except queue.Empty:
                    break
                waiting += 1
            waits = any(item.op != "sample" for item in self.stash)
            turn = int(waits and self.share > 0 and time.time() >= self.next_turn and self.room())
        count, turn = divmod(self.agree(2 * waiting + turn), 2)  # the leader's two answers in one broadcast
        if not self.leader:
            for _ in range(count):
                self.stash.append(self.inbox.get())
        taken, ran = [], 0.0
        while self.stash:
            item = self.stash[0]
            if item.op == "shutdown" or (item.op == "sample" and not can_join(item.args["requests"])):
                self.closed = True
                break
            if item.op != "sample" and not turn:
                break  # its turn comes once the batch has decoded for long enough (and it fits); the rest waits
            self.stash.popleft()
            if item.op == "sample":
                self.items.append((item, time.time()))
                taken.append(item.args["requests"])
            else:
                started = time.time()
                self.run_between(item)
                ran += time.time() - started
        if ran:
            self.next_turn = time.time() + ran * (1 - self.share) / self.share
        return taken

    def reply(self, k: int, results: list) -> None:
        """Answer item `k` (0: the running one, then the joined ones in joining order) now, from the leader."""
        self.replied.add(k)
        if self.leader:
            item, started_at = self.items[k]
            reply = WorkResult(item.request_id, result=results)
            reply.transport = Transport(result_bytes=tensor_bytes(results), started_at=started_at,
                                        finished_at=time.time(), joined=k > 0)
            self.outbox.put(reply)
