"""GET /api/v1/metrics: the shared-memory transport's per-operation numbers, read-only.

For every operation sent to the workers: work items and the API requests they carried (a
sampling batch is one item), array bytes carried for the requests (all ranks together) and
for the results (through shared memory or inline, `engine.shm_queue`), and per latency stage, from arrival at the HTTP handler
to the stored future (`engine.scheduler.STAGES`), in ms: the all-time `count` and `sum` (the
mean of any interval is the difference of two readings) and n, mean, p50, p90 and max of the
most recent requests. Counters start at zero when the server starts. The scheduler keeps the
numbers; this only reads them.
"""
from __future__ import annotations

from aiohttp import web

from handlers.common import state


async def get_metrics(request: web.Request) -> web.Response:
    return web.json_response({"transport": state(request).scheduler.metrics.snapshot()})
