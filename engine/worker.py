"""Worker process main loop: receive a WorkItem, run it on the backend, reply from rank 0.

Every rank runs the same commands in the same order (they meet in collectives); only
rank 0's answer goes back to the server. Never imports aiohttp.
"""
from __future__ import annotations

import logging
import os
import traceback

from engine.messages import UserError, WorkerFailed, WorkerReady, WorkItem, WorkResult
from engine.shm_queue import ShmQueue, raise_open_file_limit

log = logging.getLogger("tinkercloud.worker")


def main(env: dict[str, str], spec, inbox: ShmQueue, outbox: ShmQueue) -> None:
    os.environ.update(env)
    raise_open_file_limit()
    rank = int(env["RANK"])
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s worker{rank} %(levelname)s %(message)s")
    try:
        from backends import load_backend

        backend = load_backend(spec)
    except Exception:  # noqa: BLE001 - report any start-up failure to the server
        outbox.put(WorkerFailed(rank, traceback.format_exc(limit=8)))
        raise
    if rank == 0:
        outbox.put(WorkerReady(backend.model_infos()))
    while True:
        item: WorkItem = inbox.get()
        if item.op == "shutdown":
            _leave_process_group()
            return
        reply = run_item(backend, item)
        if rank == 0:
            outbox.put(reply)


def run_item(backend, item: WorkItem) -> WorkResult:
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
