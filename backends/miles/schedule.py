"""One forward_backward's micro-batches, run through megatron-core's pipeline schedule.

The backend cuts its share of a batch into `MicroBatch`es; `run` hands them to the schedule
megatron-core picks for the layout: with one pipeline stage it runs forward then backward per
micro-batch; with several it runs 1F1B, each stage receiving activations from the one before
and gradients from the one after. Every stage calls `run` with the same micro-batches; the
model's input comes from the tokens on the first stage and from the previous stage elsewhere.
On the last stage each micro-batch's logits become per-token logprobs and `loss_of` turns
those into a summed loss (the config sets `calculate_per_token_loss`, so the schedule neither
divides by the micro-batch count nor by tokens: gradients add up exactly).

A loss that fails on the last stage must not leave the other stages waiting for gradients
that never come: `run` records the error, lets the schedule finish on a zero loss that still
reaches every stage, and returns the error for the caller to spread (`first_failure`) and
undo (the zero loss adds nothing to any gradient).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch

from backends.miles import packing
from backends.miles.model import forward, logprobs_from_logits


@dataclass
class MicroBatch:
    """One forward pass's tensors, laid out by a `packing.MicroBatch`."""

    layout: packing.MicroBatch  # which datums sit where; `layout.datums` is their order below
    tokens: torch.Tensor  # [rows, width] token ids
    targets: torch.Tensor  # [rows, width] or [rows, width, K]
    attention_mask: torch.Tensor | None  # [rows, 1, width, width], True = masked (block-diagonal causal);
    # None: plain causal (every row holds one datum)

    @property
    def datums(self) -> list[int]:
        return self.layout.datums

    def split(self, per_token: torch.Tensor) -> list[torch.Tensor]:
        """Each datum's part of a [rows, width, ...] result, in `datums` order."""
        return self.layout.unpack(per_token)


def run(model, micro_batches: list[MicroBatch], loss_of: Callable[[MicroBatch, torch.Tensor], torch.Tensor], *,
        forward_only: bool) -> BaseException | None:
    """Forward (and unless `forward_only`, backward) every micro-batch; `loss_of(mb, logprobs)`
    runs on the last stage only. Returns the first error a loss raised, else None."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not micro_batches:
        return None
    errors: list[BaseException] = []

    def loss_func(mb: MicroBatch, logits: torch.Tensor):
        try:
            loss = loss_of(mb, logprobs_from_logits(model, logits, mb.targets))
            if not loss.requires_grad and logits.requires_grad:  # e.g. a custom loss ignoring logprobs
                loss = loss + logits.sum() * 0.0
        except Exception as e:  # noqa: BLE001 - returned; the schedule must still reach every stage
            errors.append(e)
            loss = logits.sum() * 0.0
        return loss, torch.ones((), dtype=torch.int), {}

    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        return forward(model, mb.tokens, mb.attention_mask), functools.partial(loss_func, mb)

    with torch.set_grad_enabled(not forward_only):
        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(micro_batches), model=model,
            num_microbatches=len(micro_batches), seq_length=max(mb.tokens.shape[1] for mb in micro_batches),
            micro_batch_size=max(mb.tokens.shape[0] for mb in micro_batches), forward_only=forward_only)
    return errors[0] if errors else None
