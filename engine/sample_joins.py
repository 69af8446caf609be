"""Work that reaches a worker while it runs a sampling batch (continuous batching), in a worker.

While a worker decodes one sampling batch, the server keeps sending work items. Between decode
steps the backend calls `SampleJoins.take`, which goes through the items already waiting in this
rank's inbox, in order: a `sample` item's rows join the batch instead of waiting for it to end;
any other operation (training, checkpoints, adapters: whatever another client asked for meanwhile)
runs right there, between two decode steps (`run_between`), and is answered at once, so neither
a long generation nor a stream of joining requests keeps it waiting. Nothing overtakes anything:
items run or join in the order they arrived.

Sampling items go to the ranks of one data-parallel replica (`WorkItem.replica`), and every rank
of it must take the same items at the same step. The replica's leader decides: it takes what
its inbox holds, and `agree` (a broadcast from the leader over the replica) tells the other ranks
how many items to take from theirs, which receive the same items in the same order. The first
item that can do neither (`shutdown`, or sampling of another base model) is kept aside in
`stash`, to run right after the batch, and nothing more joins or runs during this batch. Every
item of the batch, the one that started it (item 0) and each that joined (items 1, 2, ...), is
answered (`reply`) as soon as all its requests are done, not when the whole batch ends: under a
steady stream of joining requests a batch may run for as long as the stream lasts.
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
                 agree: Callable[[int], int], run_between: Callable[[WorkItem], None]) -> None:
        self.inbox, self.outbox, self.stash, self.leader, self.agree = inbox, outbox, stash, leader, agree
        self.run_between = run_between  # runs (and answers) another operation between two decode steps
        self.closed = bool(stash)  # items already set aside come first: nothing may overtake them
        self.items: list[tuple[WorkItem, float]] = [(running, time.time())]  # (item, when it started or joined)
        self.replied: set[int] = set()  # indices into `items` already answered

    def take(self, can_join: Callable[[list[dict]], bool]) -> list[list[dict]]:
        """The request lists of the items that join now, after running the other operations that
        arrived before them (a collective over the replica's ranks)."""
        if self.closed:
            return []
        waiting = 0
        if self.leader:
            while True:
                try:
                    self.stash.append(self.inbox.get_nowait())
                except queue.Empty:
                    break
                waiting += 1
        count = self.agree(waiting)
        if not self.leader:
            for _ in range(count):
                self.stash.append(self.inbox.get())
        taken = []
        while self.stash:  # just the `count` items taken now: the batch closes on any left from before
            item = self.stash[0]
            if item.op == "shutdown" or (item.op == "sample" and not can_join(item.args["requests"])):
                self.closed = True
                break
            self.stash.popleft()
            if item.op == "sample":
                self.items.append((item, time.time()))
                taken.append(item.args["requests"])
            else:
                self.run_between(item)
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
