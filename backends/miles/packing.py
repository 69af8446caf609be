"""Sequence packing for forward_backward: several short datums share one token row.

Padding every datum of a micro-batch to its longest one wastes compute when lengths differ.
`pack(lengths, token_budget)` plans instead:

1. Rows. Each row holds up to `capacity` tokens, by default the longest datum of the batch,
   so a row's attention never costs more than an unpacked padded row (CPU attention is
   unfused and O(s^2): one giant packed row would be slower, not faster). Datums are placed
   first-fit-decreasing: longest first (ties: lower index first), each into the first row
   with room, else into a new row.
2. Micro-batches. Rows are sorted by fill (longest first, stable) and grouped consecutively
   as `parallel.micro_batches` groups datums today: rows x longest fill <= `token_budget`,
   a row alone if it is bigger. A micro-batch's width is its longest fill, not `capacity`.

The plan depends only on the lengths, so every rank of a TP group makes the same one.

`MicroBatch.inputs` builds the [rows, width] token and target tensors and a block-diagonal
causal attention mask [rows, 1, width, width] (True = masked, as `model.token_logprobs`
takes it): a token attends to its own datum's tokens up to itself; a padding position
attends only to itself, so no row of the softmax is fully masked. `MicroBatch.unpack` slices
each datum's [len] (or [len, K]) log-probs back out, in `MicroBatch.datums` order, so the
loss sees exactly the per-datum tensors it sees unpacked.

Positions: mcore's GPTModel applies RoPE by index within the row (it ignores position_ids),
so a datum packed at offset o is rotated as positions o..o+len-1. RoPE attention scores
depend only on the difference of query and key positions, and a datum only attends within
itself, so its scores are those it gets at offset 0 up to float rounding; tests/test_packing.py
checks packed against unpacked log-probs and gradients numerically.

Every row of a micro-batch runs through the same LoRA adapter routing, so a micro-batch must
hold datums of one adapter (forward_backward trains one adapter per call).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from backends.miles.parallel import micro_batches


@dataclass(frozen=True)
class Segment:
    """Where one datum sits: row `row` of its micro-batch, tokens [start, start + length)."""

    datum: int  # index into the `lengths` given to `pack`
    row: int
    start: int
    length: int


@dataclass(frozen=True)
class MicroBatch:
    """One forward pass: `rows` token rows of `width` tokens holding the datums' segments."""

    segments: tuple[Segment, ...]  # in ascending datum order
    rows: int
    width: int

    @property
    def datums(self) -> list[int]:
        """The batch indices of this micro-batch's datums, ascending: the order `inputs`
        takes them in and `unpack` gives them back."""
        return [s.datum for s in self.segments]

    @property
    def real_tokens(self) -> int:
        return sum(s.length for s in self.segments)

    def inputs(self, tokens: Sequence[torch.Tensor], targets: Sequence[torch.Tensor], device: torch.device | str,
               with_mask: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(tokens [rows, width], targets [rows, width(, K)], attention mask [rows, 1, width, width]
        or None without `with_mask`).

        `tokens[i]` and `targets[i]` belong to datum `self.datums[i]`: [len] and [len] or [len, K].
        Padding holds token 0 and target 0; its log-probs are never read.
        """
        if len(tokens) != len(self.segments) or len(targets) != len(self.segments):
            raise ValueError(f"expected {len(self.segments)} datums, got {len(tokens)} tokens, {len(targets)} targets")
        extra = tuple(targets[0].shape[1:]) if targets else ()  # () or (K,)
        token_rows = torch.zeros(self.rows, self.width, dtype=torch.long)
        target_rows = torch.zeros(self.rows, self.width, *extra, dtype=torch.long)
        # Which datum each position belongs to; padding position p gets its own id -1 - p.
        owner = -1 - torch.arange(self.width).repeat(self.rows, 1)
        for segment, datum_tokens, datum_targets in zip(self.segments, tokens, targets):
            if len(datum_tokens) != segment.length or len(datum_targets) != segment.length:
                raise ValueError(f"datum {segment.datum}: planned {segment.length} tokens, "
                                 f"got {len(datum_tokens)} tokens and {len(datum_targets)} targets")
            span = slice(segment.start, segment.start + segment.length)
            token_rows[segment.row, span] = datum_tokens
            target_rows[segment.row, span] = datum_targets
            owner[segment.row, span] = segment.datum
        if not with_mask:
            return token_rows.to(device), target_rows.to(device), None
        causal = torch.ones(self.width, self.width, dtype=torch.bool).tril()
        visible = (owner[:, :, None] == owner[:, None, :]) & causal
        return token_rows.to(device), target_rows.to(device), (~visible)[:, None].to(device)

    def unpack(self, logprobs: torch.Tensor) -> list[torch.Tensor]:
        """Each datum's [len] (or [len, K]) slice of the [rows, width(, K)] result, in `datums` order."""
        return [logprobs[s.row, s.start:s.start + s.length] for s in self.segments]


def pack(lengths: Sequence[int], token_budget: int, capacity: int | None = None) -> list[MicroBatch]:
    """The micro-batches that run datums of these lengths, each datum exactly once (see the
    module docstring). `capacity` (default: the longest datum) caps a row's tokens; it must
    fit every datum. Micro-batches come longest rows first, so their datums interleave:
    put results back by `MicroBatch.datums` (or `in_batch_order`)."""
    if not lengths:
        return []
    longest = max(lengths)
    capacity = longest if capacity is None else capacity
    if min(lengths) < 0 or capacity < longest:
        raise ValueError(f"cannot pack lengths {min(lengths)}..{longest} into rows of {capacity} tokens")
    fills: list[int] = []
    placed: list[list[tuple[int, int, int]]] = []  # per row: (datum, start, length)
    for datum in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        length = lengths[datum]
        row = next((r for r, fill in enumerate(fills) if fill + length <= capacity), None)
        if row is None:
            row = len(fills)
            fills.append(0)
            placed.append([])
        placed[row].append((datum, fills[row], length))
        fills[row] += length
    by_fill = sorted(range(len(fills)), key=lambda r: -fills[r])
    plan = []
    for group in micro_batches([fills[r] for r in by_fill], token_budget):
        rows = [by_fill[g] for g in group]
        segments = [Segment(datum, i, start, length) for i, r in enumerate(rows) for datum, start, length in placed[r]]
        width = max(1, max(fills[r] for r in rows))  # a row of empty datums still needs one position
        plan.append(MicroBatch(tuple(sorted(segments, key=lambda s: s.datum)), len(rows), width))
    return plan


def in_batch_order(plan: list[MicroBatch], per_micro_batch: Sequence[Sequence]) -> list:
    """Per-datum results given per micro-batch (each in its `datums` order) as one list in batch order."""
    slots: dict[int, object] = {}
    for micro_batch, results in zip(plan, per_micro_batch, strict=True):
        slots.update(zip(micro_batch.datums, results, strict=True))
    return [slots[i] for i in range(len(slots))]
