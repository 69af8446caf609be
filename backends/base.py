"""The interface every training backend implements: what a worker can be asked to do.

One instance lives in each worker process (one per rank). Every rank receives the same
operations in the same order and rank 0's return value is the answer, except `sample`: it reaches
only the ranks of one data-parallel replica, and the replica leader's return value is the answer. Arguments and results
are plain Python values and tensors/arrays (see `engine.messages`). A method raises
`engine.messages.UserError` when the request itself is wrong.
"""
from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from typing import Any, ContextManager

from engine.messages import OPS


class TrainingBackend(ABC):
    def run(self, op: str, args: dict[str, Any]) -> Any:
        if op not in OPS:
            raise ValueError(f"unknown worker operation {op!r}")
        return getattr(self, op)(**args)

    @abstractmethod
    def model_infos(self) -> dict[str, dict[str, Any]]:
        """Base model name -> {"vocab_size", "max_context", "eos_token_ids", "arch", "path"}."""

    @abstractmethod
    def create_adapter(self, model_id: str, base_model: str, rank: int, alpha: float, seed: int,
                       train_attn: bool, train_mlp: bool, train_unembed: bool) -> dict[str, Any]:
        """A fresh LoRA adapter (B = 0) with its own AdamW state."""

    @abstractmethod
    def remove_adapter(self, model_id: str) -> dict[str, Any]:
        """Free the adapter's weights, gradients and optimizer state."""

    @abstractmethod
    def forward_backward(self, model_id: str, batch: dict[str, Any], loss_fn: str,
                         loss_fn_config: dict[str, Any], forward_only: bool) -> dict[str, Any]:
        """Per-datum outputs ({"logprobs", "elementwise_loss"}) and metrics; accumulates grads
        unless `forward_only`. `batch` is a packed batch (see `backends.common.batch`)."""

    @abstractmethod
    def optim_step(self, model_id: str, adam: dict[str, float]) -> dict[str, Any]:
        """One AdamW step on the accumulated gradients, then zero them; returns metrics."""

    @abstractmethod
    def save_for_sampler(self, model_id: str, sampler_key: str, path: str | None,
                         meta: dict[str, Any] | None, evict: list[str] = ()) -> dict[str, Any]:
        """Freeze a snapshot of the adapter under `sampler_key`; with `path`, also write it
        there as a checkpoint folder (atomically), with `meta` beside it. The snapshots named in
        `evict` (the least recently used, as the server sees them) are dropped first."""

    @abstractmethod
    def save_checkpoint(self, model_id: str, path: str, meta: dict[str, Any], overwrite: bool,
                        with_optimizer: bool) -> dict[str, Any]:
        """Write the adapter (and, `with_optimizer`, its AdamW state) as a checkpoint folder at
        `path`, atomically, with `meta` beside it; UserError if it exists and not `overwrite`."""

    @abstractmethod
    def load_checkpoint(self, model_id: str, base_model: str, path: str, with_optimizer: bool) -> dict[str, Any]:
        """Make `model_id`'s adapter the one saved at `path` (creating it if the run has none),
        with the saved AdamW state if `with_optimizer`, else a fresh one. Gradients start at zero."""

    @abstractmethod
    def sample(self, requests: list[dict[str, Any]], joins=None) -> list[dict[str, Any]]:
        """Generate for many requests at once on this rank's data-parallel replica alone (every
        collective over the replica's ranks only); one result (or {"error", "category"}) each.

        With `joins` (an `engine.sample_joins.SampleJoins`), requests that `joins.take(can_join)`
        hands over between decode steps join the running generation; their results follow, in the
        order they joined. Other operations that arrived meanwhile run inside `joins.take`, under
        `paused_sampling()`: they must neither change nor remove what the running rows use."""

    def room_beside_sampling(self) -> bool:
        """Whether the memory left on this rank beside the running sampling batch fits an operation
        now (else it waits: for rows to finish, at worst for the batch to end). Every rank asks
        its own; the operation runs only when all of them have room (`all_agree`)."""
        return True

    def paused_sampling(self) -> ContextManager:
        """Entered around an operation that runs between two decode steps of a sampling batch:
        undoes, for its duration, whatever state generation put the models in."""
        return contextlib.nullcontext()

    # Whether this rank answers for its data-parallel replica (one process: it does).
    leads_replica: bool = True

    def agree(self, value: int) -> int:
        """The replica leader's `value`, on every rank of the replica (a collective); one process: `value`."""
        return value

    def all_agree(self, value: int) -> int:
        """The least `value` of every rank of every replica, on each of them (a collective over all
        ranks); one process: `value`."""
        return value
