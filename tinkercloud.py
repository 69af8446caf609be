"""TinkerCloud: a self-hosted server for the Tinker training API.

`python tinkercloud.py [--host H] [--port P] [--workers N] [--model NAME=PATH ...]` starts one
aiohttp process, which starts one worker process per local GPU (or N CPU workers over
gloo) and serves the Tinker HTTP API that the unmodified `tinker` SDK talks to. With no
model configured it generates and serves a tiny random-init Qwen3 model, so it works out
of the box with no GPU and no download.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import sys
from pathlib import Path
from typing import AsyncIterator

from aiohttp import web

from backends.miles.parallel import ParallelDims
from engine.config import EMBEDDED_MODEL_NAME, Config, ServedModel
from engine.futures import FutureStore
from engine.pool import WorkerPool, WorkerSpec
from engine.reaper import reap_periodically
from engine.registry import Registry
from engine.scheduler import Scheduler
from handlers import routes
from handlers.common import auth_middleware, errors_middleware
from handlers.state import STATE, ServerState

log = logging.getLogger("tinkercloud")
ROOT = Path(__file__).resolve().parent
MAX_BODY_BYTES = 512 * 1024 * 1024
REAP_INTERVAL_SECONDS = 30.0


async def ensure_embedded_model(data_dir: str) -> ServedModel:
    """Generate the tiny default model (real Qwen tokenizer, random weights) once."""
    out = Path(data_dir).resolve() / "models" / "tiny-qwen3"
    if not (out / "config.json").is_file():
        log.info("no model configured: generating the embedded tiny Qwen3 model in %s", out)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(ROOT / "scripts" / "make_tiny_model.py"), "--out", str(out), "--arch", "qwen3")
        if await proc.wait() != 0:
            raise RuntimeError("generating the embedded model failed (see the output above)")
    return ServedModel(EMBEDDED_MODEL_NAME, str(out))


def tokenizer_id(name: str, path: str) -> str:
    """What `TrainingClient.get_tokenizer()` loads: a hub-style name (`org/model`) is found in the
    client's Hugging Face cache; anything else by the checkpoint folder (a client on this machine)."""
    return name if "/" in name and not name.startswith("tinkercloud/") else path


def checkpoint_bytes(model_dir: str) -> int:
    """The size of a checkpoint's weight files: what its base weights take in memory, roughly."""
    return sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))


def layer_count(model_dir: str) -> int:
    """The checkpoint's decoder layers (0 if its config does not say)."""
    try:
        return int(json.loads((Path(model_dir) / "config.json").read_text()).get("num_hidden_layers", 0))
    except (OSError, ValueError):
        return 0


def gpu_memory_bytes() -> int:
    """One local GPU's memory (0 without GPUs): what the automatic layout fits the weights into."""
    import torch

    return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else 0


def world_size(config: Config) -> int:
    if config.workers > 0:
        return config.workers
    import torch

    return max(1, torch.cuda.device_count())


def create_app(config: Config) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[errors_middleware, auth_middleware],
                          handler_args={"auto_decompress": False})
    app.add_routes(routes())

    async def engine(app: web.Application) -> AsyncIterator[None]:
        models = list(config.models) or [await ensure_embedded_model(config.data_dir)]
        dims = ParallelDims.for_workers(  # refuses a tp x pp that does not divide the workers
            world_size(config), config.tp, config.pp, weight_bytes=sum(checkpoint_bytes(m.path) for m in models),
            device_bytes=gpu_memory_bytes(), layers=math.gcd(*(layer_count(m.path) for m in models)))
        spec = WorkerSpec(config.backend, {m.name: str(Path(m.path).resolve()) for m in models},
                          str(Path(config.data_dir).resolve()), dims.world_size, dims.tp, dims.pp, config.dtype,
                          recompute=config.recompute, lora_compute=config.lora_compute, kernels=config.kernels,
                          interleave_share=config.interleave_share,
                          replicas=tuple(dims.replica_ranks(d) for d in range(dims.dp)))
        pool = WorkerPool(spec, reserved_ports=frozenset({config.port}))
        futures = FutureStore(config.futures_path)
        try:
            await pool.start()
            infos = {name: {**info, "tokenizer_id": tokenizer_id(name, info["path"])}
                     for name, info in pool.models.items()}
            scheduler = Scheduler(pool, futures, config.max_sample_batch_rows, replicas=dims.dp,
                                  gather_s=config.sample_gather_ms / 1000)
            st = ServerState(config, pool, futures, scheduler,
                             Registry(config.data_dir), infos)
            app[STATE] = st
            reaper = asyncio.create_task(reap_periodically(
                st.registry, st.scheduler, config.session_timeout_seconds,
                min(REAP_INTERVAL_SECONDS, config.session_timeout_seconds / 4), st.custom_losses.forget_sessions))
            log.info("serving %s on http://%s:%d with %d worker(s), tp=%d x pp=%d x dp=%d (%s backend)",
                     ", ".join(sorted(infos)), config.host, config.port, spec.world_size, dims.tp, dims.pp, dims.dp,
                     config.backend)
            yield
            reaper.cancel()
            scheduler.close()
        finally:
            await pool.stop()
            futures.close()

    async def release_long_polls(app: web.Application) -> None:
        # Shutdown waits for running handlers: wake pending long-polls (they answer try_again
        # and the SDK re-polls) instead of holding the process up to long_poll_seconds.
        if STATE in app:
            app[STATE].futures.release_waiters()

    app.cleanup_ctx.append(engine)
    app.on_shutdown.append(release_long_polls)
    return app


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        config = Config.from_args(argv)
    except ValueError as e:  # a bad setting or a model not found: say what, without a traceback
        sys.exit(f"tinkercloud: {e}")
    web.run_app(create_app(config), host=config.host, port=config.port, print=None)


if __name__ == "__main__":
    main()
