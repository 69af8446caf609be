"""Parallel layout of the worker processes, set up in one place.

The workers form a TP x PP x DP grid: `ParallelDims(tp, dp, pp)`, world = tp * pp * dp.
`ParallelDims.for_workers` is the one place the layout is chosen (`--tp` / `--pp`, or from
the checkpoint size and GPU memory when unset); the server calls it at start-up, so a layout
that does not fit fails before any worker starts.

`init_distributed` reads the torchrun-style environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT), joins the process group (NCCL on GPUs, gloo on CPU) and lets
megatron-core build the groups in its default order (tp fastest, then dp, then pp):
consecutive ranks form a tensor-parallel group, the DP groups are {r, r + tp, ...} within a
pipeline stage, and global rank 0 (which answers the server) is on the first stage. Model
code never touches this.

A data-parallel replica (`ParallelDims.replica_ranks`, `replica_group`, `leads_replica`) is the
TP x PP ranks of one DP index: sampling runs on one replica alone, its collectives on that group.

Helpers for one forward_backward: `data_parallel_share` (this rank's contiguous slice of the
batch), `first_failure` / `raise_first_failure` (every rank learns whether any rank failed,
so no rank waits in a collective the others never reach), `gather_shares` (every DP rank's
per-datum outputs and metrics, in rank order, on DP rank 0), `to_first_stage` (the last
stage's result to global rank 0) and `merge_over_stages` (dicts each stage holds part of,
e.g. adapter state).
Gradients are summed over DP by `backends.common.optimizer.AdapterOptimizer` at the
optimizer step.

The module imports torch only inside functions: the server process imports `ParallelDims`.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any


WEIGHT_SHARE = 0.5  # of a GPU's memory that one rank's base-weight shard may take when the layout is automatic
# How long a rank may wait in a collective. A training item reaches an idle replica at once and
# waits in its collectives until every other replica has finished the sampling batch it is
# running, which can take many minutes (NCCL's default watchdog would end the pool after 10). A
# peer that dies is noticed by the pool's watcher, not by this timeout.
COLLECTIVE_TIMEOUT_MINUTES = 6 * 60


@dataclass(frozen=True)
class ParallelDims:
    tp: int = 1
    dp: int = 1
    pp: int = 1

    def __post_init__(self) -> None:
        if self.tp < 1 or self.dp < 1 or self.pp < 1:
            raise ValueError(f"parallel sizes must be at least 1, got {self}")

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    def replica_ranks(self, replica: int) -> tuple[int, ...]:
        """The global ranks of data-parallel replica `replica` (its model-parallel group: every
        TP rank of every stage), in megatron-core's default order (tp fastest, then dp, then pp);
        the first is the replica's leader (first stage, TP rank 0)."""
        if not 0 <= replica < self.dp:
            raise ValueError(f"replica {replica} of {self.dp}")
        stage = self.tp * self.dp
        return tuple(p * stage + replica * self.tp + t for p in range(self.pp) for t in range(self.tp))

    @classmethod
    def for_workers(cls, workers: int, tp: int = 0, pp: int = 0, *, weight_bytes: int = 0,
                    device_bytes: int = 0, layers: int = 0) -> "ParallelDims":
        """The layout of `workers` ranks. A degree given (> 0) is kept; one left at 0 is chosen.

        On GPUs (`device_bytes` > 0: one GPU's memory) the smallest pipeline degree, then the
        smallest tensor degree (1, 2, 4, 8: tensor parallelism stays within a node) whose
        per-rank share of `weight_bytes` fits in WEIGHT_SHARE of a GPU; the rest is data
        parallel. Without GPUs every worker joins one tensor-parallel group (pp 1), unless told.
        `layers` (> 0: the layer count every served model's must be a multiple of) limits pp.
        """
        def fits(t: int, p: int) -> bool:
            return t >= 1 and p >= 1 and workers % (t * p) == 0 and (not layers or layers % p == 0)

        if pp and layers and layers % pp:
            raise ValueError(f"--pp {pp} does not divide the models' {layers} layers: each pipeline stage "
                             "holds an equal number of layers")

        if tp and pp:
            chosen = (tp, pp)
        elif not device_bytes:
            chosen = (tp or workers // (pp or 1), pp or 1)
        else:
            budget = WEIGHT_SHARE * device_bytes
            layouts = [(t, p) for p in ([pp] if pp else range(1, workers + 1))
                       for t in ([tp] if tp else (1, 2, 4, 8)) if fits(t, p)]
            chosen = next(((t, p) for t, p in layouts if weight_bytes <= budget * t * p),
                          max(layouts, key=lambda tp_pp: tp_pp[0] * tp_pp[1], default=(tp or 1, pp or 1)))
        if not fits(*chosen):
            raise ValueError(f"--tp {chosen[0]} x --pp {chosen[1]} does not divide --workers {workers}: the "
                             "workers form tp x pp x dp groups, so the worker count must be a multiple of tp x pp")
        return cls(tp=chosen[0], pp=chosen[1], dp=workers // (chosen[0] * chosen[1]))


def init_distributed(dims: ParallelDims, seed: int = 1234):
    """Join the process group described by the environment; returns this rank's torch device."""
    import torch
    import torch.distributed as dist

    from backends.miles import cpu_compat

    cpu_compat.enable()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != dims.world_size:
        raise ValueError(f"WORLD_SIZE={world} does not match the layout {dims}")
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, init_method="env://",
                                timeout=datetime.timedelta(minutes=COLLECTIVE_TIMEOUT_MINUTES))

    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=dims.tp,
                                                 pipeline_model_parallel_size=dims.pp,
                                                 distributed_timeout_minutes=COLLECTIVE_TIMEOUT_MINUTES)
    model_parallel_cuda_manual_seed(seed)
    return device


def tp_rank() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_rank()


def tp_size() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_world_size()


def pp_rank() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_pipeline_model_parallel_rank()


def pp_size() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_pipeline_model_parallel_world_size()


def pp_group():
    from megatron.core import parallel_state

    return parallel_state.get_pipeline_model_parallel_group()


def is_first_stage() -> bool:
    return pp_rank() == 0


def is_last_stage() -> bool:
    return pp_rank() == pp_size() - 1


def last_stage_rank() -> int:
    """The global rank of this pipeline's last stage."""
    from megatron.core import parallel_state

    return parallel_state.get_pipeline_model_parallel_last_rank()


def merge_over_stages(items: dict) -> dict:
    """Every pipeline stage's `items` merged, on every stage (collective over PP; tensors travel
    via CPU)."""
    if pp_size() == 1:
        return items
    import torch.distributed as dist

    stages = [None] * pp_size()
    dist.all_gather_object(stages, {k: getattr(v, "cpu", lambda: v)() for k, v in items.items()}, group=pp_group())
    return {k: v for stage in stages for k, v in stage.items()}


def dp_rank() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_rank()


def dp_size() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_world_size()


def dp_group():
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_group()


def is_global_rank_0() -> bool:
    """Whether this process is the one whose answers go back to the server (and that writes files)."""
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def data_parallel_share(rows: int, parts: int, index: int) -> range:
    """The contiguous rows of a `rows`-row batch that part `index` of `parts` takes: sizes
    differ by at most one, earlier parts take the extra rows, a part may be empty."""
    base, extra = divmod(rows, parts)
    start = index * base + min(index, extra)
    return range(start, start + base + (index < extra))


def micro_batches(lengths: list[int], token_budget: int) -> list[list[int]]:
    """Consecutive groups of row indices whose padded size (rows x longest row) stays within
    `token_budget`; a row longer than the budget goes alone."""
    groups: list[list[int]] = []
    longest = 0
    for i, n in enumerate(lengths):
        if groups and (len(groups[-1]) + 1) * max(longest, n) <= token_budget:
            groups[-1].append(i)
            longest = max(longest, n)
        else:
            groups.append([i])
            longest = n
    return groups


def first_failure(error: BaseException | None, group=None) -> BaseException | None:
    """The error to raise on this rank: its own, else the first one another rank hit (as a
    `UserError` if it was one), else None. A collective over all ranks (or those of `group`): a
    DP rank's share or the last pipeline stage's loss may fail where the others did not."""
    import torch.distributed as dist

    from engine.messages import UserError

    rank = dist.get_rank() if dist.is_initialized() else 0
    mine = {} if error is None else {rank: (isinstance(error, UserError), f"{type(error).__name__}: {error}", str(error))}
    reports = union_over_ranks(mine, group)
    if error is not None or not reports:
        return error
    first = min(reports)
    is_user, described, message = reports[first]
    return UserError(message) if is_user else RuntimeError(f"rank {first} failed: {described}")


def raise_first_failure(error: BaseException | None, group=None) -> None:
    """Raise `first_failure(error)` on every rank (of `group`) if any failed; return on all if none did."""
    error = first_failure(error, group)
    if error is not None:
        raise error


def from_rank_0(value: int, device, group=None) -> int:
    """The `value` of global rank 0 (or of the first rank of `group`), on every rank (of `group`)."""
    def broadcast(dist, t):
        dist.broadcast(t, src=0 if group is None else dist.get_process_group_ranks(group)[0], group=group)

    return _int_collective(value, device, broadcast, group)


def least_over_ranks(value: int, device) -> int:
    """The smallest `value` any rank has, on every rank (a collective over all ranks)."""
    return _int_collective(value, device, lambda dist, t: dist.all_reduce(t, op=dist.ReduceOp.MIN))


def _int_collective(value: int, device, collective, group=None) -> int:
    import torch
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    collective(dist, t)
    return int(t.item())


def union_over_ranks(items: dict, group=None) -> dict:
    """Every rank's `items` merged, on every rank (a collective over all ranks, or those of `group`)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return items
    every = [None] * dist.get_world_size(group)
    dist.all_gather_object(every, items, group=group)
    return {k: v for part in every for k, v in part.items()}


def replica_group():
    """The process group of this rank's data-parallel replica (megatron-core's model-parallel
    group: all TP and PP ranks of one DP index); None without a process group."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    return parallel_state.get_model_parallel_group() if dist.is_initialized() else None


def leads_replica() -> bool:
    """Whether this rank answers for its replica: TP rank 0 of the first pipeline stage."""
    return tp_rank() == 0 and is_first_stage()


@dataclass
class Share:
    """One DP rank's part of a forward_backward result."""

    outputs: list[dict[str, Any]]  # one per datum of the rank's share, in batch order
    metrics: dict[str, float]  # `name:reduction` over the share; empty for an empty share
    datums: int


def _gather_dp(item: Any) -> list | None:
    """Every DP rank's `item`, in rank order, on DP rank 0; None elsewhere (collective over DP)."""
    import torch.distributed as dist

    if dp_size() == 1:
        return [item]
    items = [None] * dp_size() if dp_rank() == 0 else None
    dist.gather_object(item, items, group=dp_group(), group_dst=0)
    return items


def gather_shares(share: Share) -> Share | None:
    """All DP ranks' shares merged in rank order (so in batch order) on DP rank 0; None on
    the other ranks. A collective over the DP group."""
    if dp_size() == 1:
        return share
    shares = _gather_dp(share)
    if shares is None:
        return None
    outputs = [out for s in shares for out in s.outputs]
    return Share(outputs, merge_metrics(shares), sum(s.datums for s in shares))


def to_first_stage(share: Share | None) -> Share | None:
    """On DP rank 0 of the first pipeline stage (which holds global rank 0, the one that
    answers), the share its last stage gathered; elsewhere `share` unchanged. A collective over
    the pipeline groups of DP rank 0."""
    if pp_size() == 1 or dp_rank() != 0:
        return share
    import torch.distributed as dist

    box = [share]
    dist.broadcast_object_list(box, src=last_stage_rank(), group=pp_group())
    return box[0]


def merge_metrics(shares: list[Share]) -> dict[str, float]:
    """Combine per-share metrics by their reduction suffix: `:sum` adds, `:max`/`:min` pick,
    anything else (`:mean`) averages weighted by each share's datum count."""
    present = [s for s in shares if s.datums]
    merged: dict[str, float] = {}
    for key in dict.fromkeys(k for s in present for k in s.metrics):
        values = [(s.metrics[key], s.datums) for s in present if key in s.metrics]
        reduction = key.rpartition(":")[2]
        if reduction == "sum":
            merged[key] = sum(v for v, _ in values)
        elif reduction in ("max", "min"):
            merged[key] = (max if reduction == "max" else min)(v for v, _ in values)
        else:
            merged[key] = sum(v * n for v, n in values) / sum(n for _, n in values)
    return merged
