"""The worker pool: starts torchrun-style worker processes and talks to them.

One process per rank (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR,
MASTER_PORT set for each, as torchrun would; CPU workers share the cores by LOCAL_WORLD_SIZE).
`submit()` puts a `WorkItem` on every rank's shared-memory queue (a sampling item: on those of
its data-parallel replica) and returns an asyncio future for rank 0's (the replica leader's)
`WorkResult`, whose `transport` record the pool completes with the
request's array bytes and the time it was queued (rank 0 stamped the rest). A
reader thread hands results to the event loop; a watcher thread notices a rank that dies,
fails everything in flight with a clear server error and marks the pool unhealthy. The
event loop never waits on a worker.
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import wait as wait_for_sentinels
from typing import Any

from engine.messages import Transport, WorkerFailed, WorkerReady, WorkItem, WorkResult
from engine.shm_queue import CONTEXT, ShmQueue, raise_open_file_limit
from engine.worker_env import set_worker_env

log = logging.getLogger("tinkercloud.pool")


@dataclass
class WorkerSpec:
    """What every worker needs to build its backend."""

    backend: str
    models: dict[str, str]  # base model name -> HF checkpoint dir
    data_dir: str
    world_size: int
    tp: int  # tensor-parallel degree
    pp: int = 1  # pipeline-parallel degree; world_size // (tp * pp) data-parallel replicas
    dtype: str = "auto"  # base weights (Config.dtype)
    recompute: str = "none"  # activation recomputation (Config.recompute)
    lora_compute: str = "float32"  # dtype of the LoRA products (Config.lora_compute)
    kernels: str = "eager"  # fused or eager elementwise kernels (Config.kernels)
    interleave_share: float = 0.5  # of a sampling batch's time, what operations between its steps may take
    # the global ranks of each data-parallel replica, its leader first (ParallelDims.replica_ranks);
    # empty: one replica of every rank
    replicas: tuple[tuple[int, ...], ...] = ()

    def replica_ranks(self, replica: int | None) -> tuple[int, ...]:
        """The ranks that run an item for `replica` (None: every rank)."""
        if replica is None or not self.replicas:
            return tuple(range(self.world_size))
        return self.replicas[replica]


def _free_port(avoid: frozenset[int] = frozenset()) -> int:
    """A loopback port free now, not one of `avoid` (ports this process is about to bind)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in avoid:
            return port


class WorkerPool:
    def __init__(self, spec: WorkerSpec, reserved_ports: frozenset[int] = frozenset()) -> None:
        replicas = spec.world_size // (spec.tp * spec.pp)
        if replicas > 1 and len(spec.replicas) != replicas:  # else sampling items would reach every rank
            raise ValueError(f"a layout with {replicas} data-parallel replicas needs their ranks in WorkerSpec.replicas")
        self.spec = spec
        # the server's own port, bound only after the workers start: never their rendezvous port
        self.reserved_ports = reserved_ports
        self.models: dict[str, dict[str, Any]] = {}
        self.failure: str | None = None  # set once a rank has died
        self._inbox = [ShmQueue(numpy_out=False) for _ in range(spec.world_size)]
        self._outbox = ShmQueue(numpy_out=True)
        self._procs: list = []
        self._inflight: dict[str, tuple[asyncio.Future, Transport]] = {}  # the server's half of each transport
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready: asyncio.Future | None = None
        self._stopping = False

    # ---- life cycle ----------------------------------------------------------------------
    async def start(self) -> None:
        from engine import worker

        raise_open_file_limit()
        # The allocators' settings (huge pages, glibc keeping freed blocks): the workers inherit
        # this process's environment and read them once (engine.worker_env).
        set_worker_env()
        self._loop = asyncio.get_running_loop()
        self._ready = self._loop.create_future()
        port = _free_port(self.reserved_ports)
        for rank in range(self.spec.world_size):
            env = {
                "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(self.spec.world_size),
                "LOCAL_WORLD_SIZE": str(self.spec.world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                # torch.compile's caches (inductor's, Triton's inside it) in the data dir rather than /tmp,
                # so a restarted server or container reuses them: an 8B shape's compiled layers took 26 s
                # cold and under 4 s warm on an H100 (BENCHMARKS.md)
                "TORCHINDUCTOR_CACHE_DIR": (os.environ.get("TORCHINDUCTOR_CACHE_DIR")
                                            or os.path.join(self.spec.data_dir, "compile_cache")),
            }
            proc = CONTEXT.Process(
                target=worker.main, args=(env, self.spec, self._inbox[rank], self._outbox),
                name=f"tinkercloud-worker-{rank}", daemon=True,
            )
            proc.start()
            self._procs.append(proc)
        threading.Thread(target=self._read_results, name="pool-reader", daemon=True).start()
        threading.Thread(target=self._watch_processes, name="pool-watcher", daemon=True).start()
        self.models = await self._ready
        log.info("worker pool ready: %d rank(s), models %s", self.spec.world_size, sorted(self.models))

    async def stop(self) -> None:
        self._stopping = True
        for q in self._inbox:
            q.put(WorkItem("", "shutdown"))
        loop = asyncio.get_running_loop()
        for proc in self._procs:
            await loop.run_in_executor(None, proc.join, 10)
            if proc.is_alive():
                proc.kill()
        for q in (*self._inbox, self._outbox):
            q.close()

    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    @property
    def healthy(self) -> bool:
        return self.failure is None

    # ---- requests ------------------------------------------------------------------------
    def submit(self, item: WorkItem) -> asyncio.Future:
        """Send `item` to every rank (or to its replica's); the future resolves to the WorkResult
        of rank 0 (or of the replica's leader)."""
        fut = self._loop.create_future()
        if self.failure is not None:
            fut.set_result(WorkResult(item.request_id, error=self.failure, category="server"))
            return fut
        sent = Transport(enqueued_at=time.time())
        sent.request_bytes = sum(self._inbox[rank].put(item) for rank in self.spec.replica_ranks(item.replica))
        self._inflight[item.request_id] = (fut, sent)
        return fut

    # ---- threads -------------------------------------------------------------------------
    def _read_results(self) -> None:
        while True:
            try:
                msg = self._outbox.get()
            except (EOFError, OSError, ValueError):  # the queue was closed: the pool is stopping
                return
            except Exception:  # noqa: BLE001 - one unreadable message must not stop all results
                log.exception("could not read a worker result")
                continue
            self._loop.call_soon_threadsafe(self._on_message, msg)

    def _on_message(self, msg: Any) -> None:
        if isinstance(msg, WorkerReady):
            if not self._ready.done():
                self._ready.set_result(msg.models)
        elif isinstance(msg, WorkerFailed):
            self._on_failure(f"worker rank {msg.rank} failed to start: {msg.error}")
        elif isinstance(msg, WorkResult):
            fut, sent = self._inflight.pop(msg.request_id, (None, None))
            if fut is not None and not fut.done():
                msg.transport.request_bytes, msg.transport.enqueued_at = sent.request_bytes, sent.enqueued_at
                fut.set_result(msg)

    def _watch_processes(self) -> None:
        sentinels = {p.sentinel: p for p in self._procs}
        dead = wait_for_sentinels(list(sentinels))
        if self._stopping:
            return
        proc = sentinels[dead[0]]
        proc.join(1)
        rank = self._procs.index(proc)
        self._loop.call_soon_threadsafe(self._on_failure, f"worker rank {rank} exited unexpectedly (exit code {proc.exitcode})")

    def _on_failure(self, reason: str) -> None:
        if self.failure is None:
            self.failure = reason
            log.error("worker pool is down: %s", reason)
        if not self._ready.done():
            self._ready.set_exception(RuntimeError(reason))
        for request_id, (fut, sent) in list(self._inflight.items()):
            if not fut.done():
                fut.set_result(WorkResult(request_id, error=f"{reason}; the request was lost", category="server",
                                          transport=sent))
        self._inflight.clear()
