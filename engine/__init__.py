"""The engine: between the HTTP handlers and the worker processes.

request -> handler -> `scheduler` (seq_id order, idempotency, batching) -> `pool` (worker
processes, fed through `shm_queue`) -> `worker` -> backend -> result -> `futures`.
"""
