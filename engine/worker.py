"""Worker process main loop: receive a WorkItem, run it on the backend, reply from rank 0.

Every rank runs the same commands in the same order (they meet in collectives), except that a
sampling item reaches only the ranks of one data-parallel replica, which run it (and the
sampling items that join it, `SampleJoins`) on their own and whose leader answers. Other
commands that arrive during a sampling batch run between two of its decode steps, in order,
once every rank of every replica is ready for them (`SampleJoins`; a rank that is not sampling
says so from this loop, `wait_for_every_rank`). Otherwise only rank 0's answer goes back to the
server, stamped with when it ran and how many tensor bytes it carries (`Transport`). On CPU the
ranks of this machine share its cores: each takes cores // ranks intra-op threads unless
OMP_NUM_THREADS says otherwise. Never imports aiohttp.
"""
from __future__ import annotations

import functools
import logging
import os
import time
import traceback
from collections import deque

from engine.messages import Transport, UserError, WorkerFailed, WorkerReady, WorkItem, WorkResult
from engine.sample_joins import SampleJoins, send
from engine.shm_queue import ShmQueue, raise_open_file_limit, tensor_bytes

log = logging.getLogger("tinkercloud.worker")


def main(env: dict[str, str], spec, inbox: ShmQueue, outbox: ShmQueue) -> None:
    os.environ.update(env)
    raise_open_file_limit()
    rank = int(env["RANK"])
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s worker{rank} %(levelname)s %(message)s")
    share_cpu_cores(int(env.get("LOCAL_WORLD_SIZE", "1")))
    try:
        from backends import load_backend

        backend = load_backend(spec)
    except Exception:  # noqa: BLE001 - report any start-up failure to the server
        outbox.put(WorkerFailed(rank, traceback.format_exc(limit=8)))
        raise
    if rank == 0:
        outbox.put(WorkerReady(backend.model_infos()))
    stash: deque = deque()  # items taken from the inbox during a sampling batch, to run next (in order)
    while True:
        item: WorkItem = stash.popleft() if stash else inbox.get()
        if item.op == "shutdown":
            _leave_process_group()
            return
        if item.replica is not None:  # a sampling item for this rank's replica: its leader answers
            leader = backend.leads_replica
            between = functools.partial(run_between_decode_steps, backend, outbox, rank == 0)
            joins = SampleJoins(item, inbox, outbox, stash, leader, backend.agree, between, backend.room_beside_sampling,
                                spec.interleave_share, backend.all_agree)
            replies = run_sampling(backend, item, joins)
        else:
            leader = rank == 0
            wait_for_every_rank(backend)
            replies = [run_item(backend, item)]
        if leader:
            for reply in replies:
                outbox.put(reply)


def share_cpu_cores(local_workers: int) -> None:
    """Without a thread count every CPU rank takes all cores, and ranks (or any other busy
    process) oversubscribe them: OpenMP threads then spin at barriers. OMP_NUM_THREADS wins."""
    import torch

    if os.environ.get("OMP_NUM_THREADS") or torch.cuda.is_available():
        return
    threads = max(1, (os.cpu_count() or 1) // max(1, local_workers))
    torch.set_num_threads(threads)
    log.info("CPU worker: %d intra-op thread(s) (%d core(s), %d local worker(s))", threads, os.cpu_count(), local_workers)


def wait_for_every_rank(backend) -> None:
    """Before an operation that every rank runs: the ranks of replicas still sampling are ready
    for it only between two of their decode steps, at their turn (`SampleJoins.take` asks every
    rank, one collective each time); this rank, which is not sampling, answers yes until all are."""
    while not backend.all_agree(1):
        pass


def run_item(backend, item: WorkItem) -> WorkResult:
    started = time.time()
    reply = _run(backend, item)
    reply.transport = Transport(result_bytes=tensor_bytes(reply.result), started_at=started, finished_at=time.time())
    return reply


def run_between_decode_steps(backend, outbox: ShmQueue, answers: bool, item: WorkItem) -> None:
    """Run a command that arrived during a sampling batch, now, between two of its decode steps
    (`backend.paused_sampling()` restores what it needs), and answer it from rank 0."""
    with backend.paused_sampling():
        reply = run_item(backend, item)
    reply.transport.interleaved = True
    if answers:
        send(outbox, reply)  # never raises: the other ranks go on to the batch's next collectives


def run_sampling(backend, item: WorkItem, joins: SampleJoins) -> list[WorkResult]:
    """A sampling item, and the ones that join it while it runs: one reply each, except for the
    items `joins` already answered while the batch ran."""
    reply = _run(backend, WorkItem(item.request_id, "sample", {**item.args, "joins": joins}))
    items = joins.items
    finished = time.time()
    if reply.error is not None:
        replies = [WorkResult(it.request_id, error=reply.error, category=reply.category) for it, _ in items]
    else:
        results, replies = reply.result, []
        for it, _ in items:
            n = len(it.args["requests"])
            replies.append(WorkResult(it.request_id, result=results[:n]))
            results = results[n:]
    for n, (r, (_, started_at)) in enumerate(zip(replies, items)):
        r.transport = Transport(result_bytes=tensor_bytes(r.result), started_at=started_at, finished_at=finished,
                                joined=n > 0)
    return [r for n, r in enumerate(replies) if n not in joins.replied]


def _run(backend, item: WorkItem) -> WorkResult:
    try:
        return WorkResult(item.request_id, result=backend.run(item.op, item.args))
    except UserError as e:
        return WorkResult(item.request_id, error=str(e), category="user")
    except Exception as e:  # noqa: BLE001 - the server keeps serving; the caller sees why
        log.error("request %s (%s) failed:\n%s", item.request_id, item.op, traceback.format_exc())
        return WorkResult(item.request_id, error=f"{type(e).__name__}: {e}", category="server")


def _leave_process_group() -> None:
    """Exiting with live gloo/NCCL threads can abort the process; leave the group first."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
