"""Multi-tenant LoRA on megatron-core's tensor-parallel linear layers.

`LoraManager` wraps the target linears of a GPTModel once; any number of named adapters can
then be added, loaded, cloned and removed, and `route` says which adapter each batch row
uses, so one forward pass can serve rows of different adapters. The LoRA term is computed
per group of rows that share an adapter: cost grows with the adapters present in a batch,
not with the number loaded. Gradients accumulate in `.grad` across calls; nothing here
zeroes them.

Tensor parallelism (tp ranks; y = W x + scale * B A x, scale = alpha / rank):
- Column-parallel (`linear_qkv`, `linear_fc1`, `output_layer`): A (r x in) is whole on every
  rank, B is split by output rows exactly like the base weight. h = A x goes through
  `copy_to_tensor_model_parallel_region` (identity forward, all-reduce backward), so A's
  gradient is the full sum and identical on every rank.
- Row-parallel (`linear_proj`, `linear_fc2`): A is split by input columns like the base
  weight, B is whole. h = all-reduce(A_k x_k) (one r-wide all-reduce), then B h is added to
  the base layer's (already reduced) output.

Full layout of the factors (what `gather_full_state` returns and `shard_full_state` takes),
in Hugging Face order so an adapter exports to PEFT by splitting B and repeating A:
- `linear_qkv`: A (r, hidden); B (q_dim + 2 kv_dim, r) = [B_q; B_k; B_v] for HF q_proj,
  k_proj, v_proj. Rank k holds the rows of its KV groups, interleaved like the base weight
  (see `hf_checkpoint.qkv_shard`).
- `linear_fc1`: A (r, hidden); B (2 ffn, r) = [B_gate; B_up]; rank k holds
  [gate shard k; up shard k].
- `output_layer`: A (r, hidden); B (padded vocab, r), vocab rows split contiguously; rows past
  the HF vocabulary are dropped on export.
- `linear_proj` (o_proj): A (r, heads * head_dim), B (hidden, r); A's columns split contiguously.
- `linear_fc2` (down_proj): A (r, ffn), B (hidden, r); A's columns split contiguously.

State dicts are keyed `<module path>.lora_A` / `.lora_B`, e.g.
`decoder.layers.0.self_attention.linear_qkv.lora_B`. Wrapping moves a target's base weight
from `<path>.weight` to `<path>.base.weight`.

Pipeline parallelism: a stage wraps only its own layers, but names them by their global layer
number, so keys mean the same on every stage and in a PP=1 model. An adapter's factors on
other stages are simply absent here; `gather_full_state` collects every stage's and
`shard_full_state` keeps this stage's.
"""
from __future__ import annotations

import contextlib
import math
import zlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    copy_to_tensor_model_parallel_region,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
)
from torch import nn

from backends.miles import packed_weights
from backends.miles.hf_checkpoint import gate_up_shard, qkv_shard
from backends.miles.parallel import merge_over_stages, pp_size, tp_rank, tp_size

TARGET_GROUPS = {
    "linear_qkv": "attn",
    "linear_proj": "attn",
    "linear_fc1": "mlp",
    "linear_fc2": "mlp",
    "output_layer": "unembed",
}
FACTOR_DTYPE = torch.float32


class LoraFactors(nn.Module):
    """One adapter's factors on one layer (this rank's shards) and its scale alpha / rank."""

    def __init__(self, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float, trainable: bool):
        super().__init__()
        self.lora_A = nn.Parameter(lora_A, requires_grad=trainable)
        self.lora_B = nn.Parameter(lora_B, requires_grad=trainable)
        self.scale = scale
        # The same value as a tensor, for compiled layers: a Python number would be a constant of
        # the graph, so every new alpha / rank would compile the layers again (`LoraLinear._add_up`).
        self.register_buffer("scale_tensor", torch.tensor(scale, dtype=torch.float32, device=lora_A.device),
                             persistent=False)
        self._packed: tuple[torch.Tensor, torch.Tensor] | None = None  # A and B for the sampler: `packed`
        self._transposed: list[torch.Tensor | None] = [None, None]  # A^T and B^T for the sampler: `transposed`
        self._merged: torch.Tensor | None = None  # W + scale * B A for the sampler (`packed_weights.MergedCopies`)
        self._merged_bytes = 0

    def packed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A and B of a frozen adapter in oneDNN's layout for the sampler's products
        (`packed_weights`), made at first use. Only for frozen factors (sampler snapshots): nothing
        changes them in place, whereas a trainable adapter's factors change at every optimizer step."""
        self._check_frozen()
        if self._packed is None:
            self._packed = (packed_weights.pack(self.lora_A), packed_weights.pack(self.lora_B))
        return self._packed

    def transposed(self, factor: int) -> torch.Tensor:
        """A^T [in, r] (`factor` 0) or B^T [r, out] (1) of a frozen adapter, contiguous, for the
        sampler's row-by-row decode products (`packed_weights.rowwise`), each made at its first use
        (a small A beside a large B, as on a large vocabulary's output layer, copies only A)."""
        self._check_frozen()
        if self._transposed[factor] is None:
            self._transposed[factor] = (self.lora_A if factor == 0 else self.lora_B).detach().t().contiguous()
        return self._transposed[factor]

    def product(self, x: torch.Tensor, factor: int) -> torch.Tensor:
        """x times A^T (`factor` 0) or B^T (1) of a frozen adapter, in the sampler on CPU: row by row
        in a decode step when the factor is small (`packed_weights.ROWWISE_MAX_ELEMENTS`), else on
        its oneDNN copy. Either way a row's bits do not depend on its batch mates."""
        weight = self.lora_A if factor == 0 else self.lora_B
        if packed_weights.decoding() and weight.numel() <= packed_weights.ROWWISE_MAX_ELEMENTS:
            return packed_weights.rowwise(x, self.transposed(factor))
        return packed_weights.linear(x, self.packed()[factor])

    def _check_frozen(self) -> None:
        if self.lora_A.requires_grad:
            raise ValueError("only a frozen adapter's factors are packed")


class LoraLinear(nn.Module):
    """An mcore Column/RowParallelLinear plus any number of named LoRA adapters.

    Same forward signature and `(output, bias)` result as the wrapped layer. Which adapter
    applies to which batch row (dim 1 of the [s, b, h] input) is set by `LoraManager.route`;
    outside `route` the layer is the plain base layer.

    `b_rows_by_rank` (column-parallel only): for each tp rank, the rows of the full B that
    rank holds, in its local order.
    """

    def __init__(
        self,
        base: ColumnParallelLinear | RowParallelLinear,
        device: torch.device,
        b_rows_by_rank: list[torch.Tensor] | None = None,
    ):
        super().__init__()
        self.base = base
        self.device = device  # where the factors live: the model's device
        self.column_parallel = isinstance(base, ColumnParallelLinear)
        if base.sequence_parallel:
            raise ValueError("LoRA with sequence parallelism is not supported")
        if not self.column_parallel and not base.input_is_parallel:
            raise ValueError("LoRA on a RowParallelLinear needs input_is_parallel=True")
        if self.column_parallel and len(b_rows_by_rank) != tp_size():
            raise ValueError("a column-parallel LoraLinear needs B's row layout for every tp rank")
        self.b_rows_by_rank = b_rows_by_rank
        self.tp = tp_size()  # at 1 the r-wide all-reduce / copy mappings are identities: skipped
        # the frozen base product computed here (`_base`): without bias, and column-parallel only at tp=1
        self.own_product = base.bias is None and (self.tp == 1 or not self.column_parallel)
        self.compute_dtype = FACTOR_DTYPE  # the LoRA products' dtype (LoraManager's compute_dtype)
        # (the frozen weight, its oneDNN-packed copy), for the sampler's products on CPU: `packed_weights`
        self.packed: tuple[torch.Tensor, torch.Tensor] | None = None
        # the sampler's merged weights of frozen adapters on this layer, shared by the model's layers
        self.merges: packed_weights.MergedCopies | None = None
        self.adapters: dict[str, LoraFactors] = {}  # not registered: the model's own state stays the base
        # Set by `LoraManager.route`: the adapters of this layer that apply, each with its batch rows
        # (None: all), and the batch size the routing was made for (None: any).
        self.routing: list[tuple[LoraFactors, torch.Tensor | None]] | None = None
        self.routing_batch: int | None = None

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base":
                raise
            return getattr(self.base, name)  # mcore reads attributes such as `sequence_parallel`

    # --- factors ---------------------------------------------------------------------------
    def is_sharded(self, factor: str) -> bool:
        """Whether `lora_A` / `lora_B` is split over tp ranks (else replicated)."""
        return factor == ("lora_B" if self.column_parallel else "lora_A")

    def local_shape(self, factor: str, rank: int) -> tuple[int, int]:
        """The shape of this rank's part of a factor."""
        if factor == "lora_A":
            return (rank, self.base.input_size if self.column_parallel else self.base.input_size_per_partition)
        return (self.base.output_size_per_partition if self.column_parallel else self.base.output_size, rank)

    def shard(self, factor: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's part of a factor given in full layout."""
        if not self.is_sharded(factor):
            return full
        if self.column_parallel:
            return full[self.b_rows_by_rank[tp_rank()].to(full.device)]
        n = self.base.input_size_per_partition
        return full[:, tp_rank() * n : (tp_rank() + 1) * n]

    def unshard(self, factor: str, local: torch.Tensor) -> torch.Tensor:
        """The full layout of a factor from every rank's part (collective over tp ranks)."""
        if not self.is_sharded(factor):
            return local
        shards = _all_gather_tp(local)
        if not self.column_parallel:
            return torch.cat(shards, dim=1)
        full = local.new_empty(self.base.output_size, local.shape[1])
        for rows, shard in zip(self.b_rows_by_rank, shards):
            full[rows.to(full.device)] = shard
        return full

    def new_adapter(self, name: str, rank: int, scale: float, generator: torch.Generator) -> None:
        """B = 0 (an exact no-op); A kaiming-uniform like PEFT, drawn in full shape then sharded."""
        lora_A = torch.empty(rank, self.base.input_size, dtype=FACTOR_DTYPE)
        nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5), generator=generator)
        lora_B = torch.zeros(self.local_shape("lora_B", rank), dtype=FACTOR_DTYPE)
        self.set_adapter(name, self.shard("lora_A", lora_A), lora_B, scale)

    def set_adapter(
        self, name: str, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float, trainable: bool = True
    ) -> None:
        """Install (or replace) an adapter from copies of this rank's factors (shapes as `local_shape`)."""
        lora_A, lora_B = (x.detach().to(self.device, FACTOR_DTYPE, copy=True) for x in (lora_A, lora_B))
        self.adapters[name] = LoraFactors(lora_A, lora_B, scale, trainable)

    # --- forward ---------------------------------------------------------------------------
    def forward(self, input_: torch.Tensor, *args, **kwargs):
        active = self._active_adapters(input_)
        if not active:
            return self._base(input_, *args, **kwargs)
        if self._samples_merged(input_, active, kwargs.get("weight", args[0] if args else None)):
            return self._merged_forward(input_, active), None
        if self.column_parallel:
            return self._column_forward(input_, active, *args, **kwargs)
        output, bias = self._base(input_, *args, **kwargs)
        for factors, rows in active:
            h = self._down(input_, rows, factors)
            if self.tp > 1:
                h = reduce_from_tensor_model_parallel_region(h, group=self.base.tp_group)
            output = self._add_up(output, rows, h, factors)
        return output, bias

    def _column_forward(self, input_, active, weight=None, runtime_gather_output=None):
        gather = self.base.gather_output if runtime_gather_output is None else runtime_gather_output
        output, bias = self._base(input_, weight, runtime_gather_output=False)
        for factors, rows in active:
            h = self._down(input_, rows, factors)
            if self.tp > 1:
                h = copy_to_tensor_model_parallel_region(h, group=self.base.tp_group)
            output = self._add_up(output, rows, h, factors)
        if gather:
            output = gather_from_tensor_model_parallel_region(output, group=self.base.tp_group)
        return output, bias

    def _down(self, input_: torch.Tensor, rows: torch.Tensor | None, factors: LoraFactors) -> torch.Tensor:
        """A x for the routed rows, in `compute_dtype` (the factors stay float32; a cast is a no-op then)."""
        x = _rows(input_, rows)
        if self._samples_packed_factors(x, factors):
            return factors.product(x, 0)
        return x.to(self.compute_dtype) @ factors.lora_A.to(self.compute_dtype).t()

    def _add_up(self, output: torch.Tensor, rows: torch.Tensor | None, h: torch.Tensor,
                factors: LoraFactors) -> torch.Tensor:
        """output + scale * B h on the routed rows. When the product's dtype is the output's, one
        `addmm` (the sum in the product's epilogue, the scale as its alpha), on the routed rows
        alone when others use other adapters: a row gets the same arithmetic whatever shares its
        batch. Else the r-wide h is scaled, multiplied, and the product cast and added.
        In a compiled layer the scale is a tensor, so one graph serves every alpha and rank; the
        addmm then scales h before the product (exact for the power-of-two scales of the usual
        alpha / rank; one rounding of h otherwise, in bf16). In the sampler of a float32 model with
        packed weights (`_samples_packed`) and a frozen adapter, B h on oneDNN (or row by row in
        a decode step, `LoraFactors.product`) then the scaled sum: the same formula, and a row's
        bits whatever its batch mates."""
        if self._samples_packed_factors(h, factors) and output.dtype == FACTOR_DTYPE:  # the sampler
            summed = torch.add(_rows(output, rows), factors.product(h, 1), alpha=factors.scale)
            return summed if rows is None else output.index_copy(1, rows, summed)
        lora_B = factors.lora_B.to(self.compute_dtype)
        scale = factors.scale_tensor if torch.compiler.is_compiling() else factors.scale
        if output.dtype == self.compute_dtype:
            part = _rows(output, rows)
            flat_h, alpha = h.reshape(-1, h.shape[-1]), scale
            if isinstance(scale, torch.Tensor):  # addmm's alpha takes a number only
                flat_h, alpha = scale * flat_h, 1.0
            summed = torch.addmm(part.reshape(-1, part.shape[-1]), flat_h, lora_B.t(), alpha=alpha).view(part.shape)
            return summed if rows is None else output.index_copy(1, rows, summed)
        return _add_rows(output, rows, (scale * h) @ lora_B.t())

    def _base(self, input_: torch.Tensor, weight: torch.Tensor | None = None, **kwargs):
        """The base layer. With its weight frozen and no bias, the product is done here (with the
        all-reduce after it for a row-parallel layer at tp > 1): what megatron-core's
        `LinearWithFrozenWeight` computes, forward and backward, without its autograd Function,
        autocast wrapper and group lookups, which cost more than the product in a decode step
        (and its row-parallel layers call `warnings.warn` on rank 0 at every call, which splits a
        compiled layer). A column-parallel layer at tp > 1 goes through megatron-core, which
        all-reduces its input's gradient."""
        weight = self.base.weight if weight is None else weight
        if self.own_product and not (weight.requires_grad and torch.is_grad_enabled()):
            if self._samples_packed(input_, weight.dtype) and self.packed[0] is weight:  # the sampler
                output = packed_weights.linear(input_, self.packed[1])
            else:
                output = torch.matmul(input_, weight.t())
            if self.tp > 1:
                output = reduce_from_tensor_model_parallel_region(output, group=self.base.tp_group)
            return output, None
        return self.base(input_, weight, **kwargs) if self.column_parallel else self.base(input_)

    def _samples_packed(self, x: torch.Tensor, dtype: torch.dtype) -> bool:
        """Whether a product of `x` with a weight of `dtype` runs on oneDNN's packed weights: in the
        sampler (inference mode, never in a compiled graph), in a layer whose base weight was packed
        (`packed_weights`), when `x` is in that dtype (so the LoRA factors of frozen adapters only in
        float32 models: their products are float32 there, with no cast)."""
        return (self.packed is not None and x.dtype == dtype and not torch.compiler.is_compiling()
                and torch.is_inference_mode_enabled())

    def _samples_merged(self, x: torch.Tensor, active, weight: torch.Tensor | None = None) -> bool:
        """Whether the sampler multiplies this layer's rows of frozen adapters by merged weights,
        W + scale * B A packed once per adapter (`packed_weights.MergedCopies`), instead of
        W x + scale * B (A x): in the sampler of a float32 layer with packed weights at tp=1, when a
        frozen adapter is in the batch and the layer's merged copy fits the model's merge budget.
        One product a row instead of three and an add: a quarter of a CPU sampling round of
        skyrl-tiny (BENCHMARKS.md, finding 16)."""
        if (self.merges is None or self.tp != 1 or not self._samples_packed(x, FACTOR_DTYPE)
                or not self.merges.fits(self.packed[0]) or (weight is not None and weight is not self.packed[0])):
            return False  # (`weight`: the one a tied output layer is handed, which must be the packed one)
        return any(not factors.lora_A.requires_grad for factors, _ in active)

    def _merged_forward(self, x: torch.Tensor, active) -> torch.Tensor:
        """A frozen adapter's rows times its merged weights, the base model's rows times the base
        weights, each on oneDNN's packed copy, whose float32 rows do not depend on their batch
        mates, so a row's bits do not either; a trainable adapter's rows (sampled while training)
        get W x + scale * B (A x) as elsewhere."""
        weight = self.packed[0]
        if len(active) == 1 and active[0][1] is None:  # one frozen adapter for every row
            return packed_weights.linear(x, self.merges.get(active[0][0], weight))
        output = packed_weights.linear(x, self.packed[1])  # the base rows' (the others' are replaced)
        for factors, rows in active:
            if factors.lora_A.requires_grad:
                output = self._add_up(output, rows, self._down(x, rows, factors), factors)
            else:
                merged = packed_weights.linear(_rows(x, rows), self.merges.get(factors, weight))
                output = output.index_copy(1, rows, merged)
        return output

    def _samples_packed_factors(self, x: torch.Tensor, factors: LoraFactors) -> bool:
        """Whether the LoRA product of `x` with these factors runs on their packed copies
        (`LoraFactors.packed`): as `_samples_packed`, for a frozen adapter."""
        return self._samples_packed(x, FACTOR_DTYPE) and not factors.lora_A.requires_grad

    def _active_adapters(self, input_: torch.Tensor) -> list[tuple[LoraFactors, torch.Tensor | None]]:
        if self.routing is None:
            return []
        # The check runs eagerly only: in a compiled layer (`kernels="compiled_layers"`) reading the
        # batch size would make a graph per size, and the routing holds factors, not adapter names,
        # so one graph serves every adapter of the same shape.
        batch = None if torch.compiler.is_compiling() else self.routing_batch
        if batch is not None and input_.shape[1] != batch:
            raise ValueError(f"route() was given {batch} rows but the layer sees batch {input_.shape[1]}")
        return self.routing


def _rows(x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    return x if rows is None else x.index_select(1, rows)


def _add_rows(output: torch.Tensor, rows: torch.Tensor | None, delta: torch.Tensor) -> torch.Tensor:
    delta = delta.to(output.dtype)
    return output + delta if rows is None else output.index_add(1, rows, delta)


def _all_gather_tp(local: torch.Tensor) -> list[torch.Tensor]:
    if tp_size() == 1:
        return [local]
    shards = [torch.empty_like(local) for _ in range(tp_size())]
    dist.all_gather(shards, local.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    return shards


@dataclass(frozen=True)
class AdapterConfig:
    rank: int
    alpha: float
    modules: tuple[str, ...]  # paths of the wrapped layers this adapter applies to


class LoraManager:
    """The adapters of one model: wraps its target linears once, then adds/removes/routes."""

    def __init__(self, model: nn.Module, compute_dtype: torch.dtype = FACTOR_DTYPE):
        """`compute_dtype`: the dtype of the LoRA products (the factors, their gradients and the
        optimizer state stay float32). float32 keeps every number of a float32 reference; the base
        weights' bfloat16 skips casting each activation to float32 and back (a benchmark option,
        `bench_throughput.py --lora-compute base`)."""
        self.model = model
        self.device = next(model.parameters()).device
        self.modules: dict[str, LoraLinear] = {}
        for path, module in list(model.named_modules()):
            parent_path, _, leaf = path.rpartition(".")
            if leaf in TARGET_GROUPS and isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
                rows = _b_rows_by_rank(leaf, module, model.config) if isinstance(module, ColumnParallelLinear) else None
                wrapped = LoraLinear(module, self.device, rows)
                wrapped.compute_dtype = compute_dtype
                setattr(model.get_submodule(parent_path), leaf, wrapped)
                self.modules[_global_path(model, path)] = wrapped
        if not self.modules:
            raise ValueError("no LoRA target layers found (is the model already wrapped?)")
        self.all_paths = _every_stage(list(self.modules))  # the wrapped layers of every pipeline stage
        self.merged_copies: packed_weights.MergedCopies | None = None  # set by packed_weights.pack_frozen_weights
        self._adapters: dict[str, AdapterConfig] = {}
        self._routing_active = False

    # --- adapters --------------------------------------------------------------------------
    def add_adapter(
        self,
        name: str,
        rank: int,
        alpha: float = 32.0,
        *,
        train_attn: bool = True,
        train_mlp: bool = True,
        train_unembed: bool = False,
        seed: int = 0,
    ) -> None:
        """A new trainable adapter (B = 0, so it starts as an exact no-op)."""
        if name in self._adapters:
            raise ValueError(f"adapter {name!r} already exists")
        wanted = {"attn": train_attn, "mlp": train_mlp, "unembed": train_unembed}
        if not any(wanted[TARGET_GROUPS[p.rpartition(".")[2]]] for p in self.all_paths):
            raise ValueError("an adapter needs at least one of train_attn, train_mlp, train_unembed")
        paths = tuple(p for p in self.modules if wanted[TARGET_GROUPS[p.rpartition(".")[2]]])
        for path in paths:
            # Same generator state on every rank, so A's shards come from one full tensor.
            generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{path}".encode()))
            self.modules[path].new_adapter(name, rank, alpha / rank, generator)
        self._adapters[name] = AdapterConfig(rank, alpha, paths)

    def load_adapter_state(
        self, name: str, state: dict[str, torch.Tensor], *, rank: int, alpha: float, trainable: bool = True
    ) -> None:
        """Create or replace adapter `name` from this rank's tensors (as `adapter_state` gives).

        The layers it applies to are those named in `state` (on a pipeline stage, maybe none).
        Replacing makes new Parameters.
        """
        paths = tuple(p for p in self.modules if f"{p}.lora_A" in state or f"{p}.lora_B" in state)
        unknown = set(state) - {f"{p}.{f}" for p in paths for f in ("lora_A", "lora_B")}
        if unknown or (not paths and pp_size() == 1):
            raise ValueError(f"state does not match the model's LoRA layers: unknown keys {sorted(unknown)}")
        for path in paths:
            for factor in ("lora_A", "lora_B"):
                value, expected = state.get(f"{path}.{factor}"), self.modules[path].local_shape(factor, rank)
                if value is None or tuple(value.shape) != expected:
                    got = None if value is None else tuple(value.shape)
                    raise ValueError(f"{path}.{factor}: this rank needs shape {expected}, got {got}")
        for path in paths:
            lora_A, lora_B = state[f"{path}.lora_A"], state[f"{path}.lora_B"]
            self.modules[path].set_adapter(name, lora_A, lora_B, alpha / rank, trainable)
        if name in self._adapters:
            for path in set(self._adapters[name].modules) - set(paths):
                del self.modules[path].adapters[name]
        self._adapters[name] = AdapterConfig(rank, alpha, paths)

    def clone_adapter(self, src: str, dst: str, trainable: bool = False) -> None:
        """A copy of `src` under the name `dst` (by default a frozen snapshot)."""
        config = self.adapter_config(src)
        self.load_adapter_state(dst, self.adapter_state(src), rank=config.rank, alpha=config.alpha, trainable=trainable)

    def rename_adapter(self, src: str, dst: str) -> None:
        """Give adapter `src` the name `dst`, replacing any adapter called `dst`. Its Parameters
        stay the same objects, so an optimizer built on them keeps working."""
        config = self.adapter_config(src)
        if self.has_adapter(dst):
            self.remove_adapter(dst)
        for path in config.modules:
            self.modules[path].adapters[dst] = self.modules[path].adapters.pop(src)
        del self._adapters[src]
        self._adapters[dst] = config

    def discard_adapter(self, name: str) -> None:
        """Remove every factor named `name`, even of an adapter whose loading failed halfway (not
        registered yet); nothing if there is none."""
        for module in self.modules.values():
            module.adapters.pop(name, None)
        self._adapters.pop(name, None)

    def remove_adapter(self, name: str) -> None:
        for path in self.adapter_config(name).modules:
            del self.modules[path].adapters[name]
        del self._adapters[name]

    def has_adapter(self, name: str) -> bool:
        return name in self._adapters

    def adapter_config(self, name: str) -> AdapterConfig:
        if name not in self._adapters:
            raise KeyError(f"no adapter {name!r}")
        return self._adapters[name]

    def adapter_params(self, name: str) -> list[tuple[str, nn.Parameter, bool]]:
        """(qualified name, parameter, is_tp_sharded) for each factor of the adapter on this rank."""
        params = []
        for path in self.adapter_config(name).modules:
            module = self.modules[path]
            factors = module.adapters[name]
            for factor in ("lora_A", "lora_B"):
                params.append((f"{path}.{factor}", getattr(factors, factor), module.is_sharded(factor)))
        return params

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        """This rank's factors of the adapter, cloned."""
        return {key: param.detach().clone() for key, param, _ in self.adapter_params(name)}

    # --- full (HF-order) layout ------------------------------------------------------------
    def shard_full_state(self, full_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's part of a state dict given in full layout (no communication); factors
        of other pipeline stages' layers are left out."""
        local = {}
        for key, value in full_state.items():
            if key.rpartition(".")[0] in self.all_paths and key.rpartition(".")[0] not in self.modules:
                continue
            module, factor = self._module_of(key)
            local[key] = module.shard(factor, value)
        return local

    def gather_full_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The full layout of a per-rank state dict (factors or their gradients).

        Collective: every tp rank must call it with the same keys, and every pipeline stage
        must call it (each with its own layers' keys); every rank gets the whole result.
        """
        full = {}
        for key in sorted(state):
            module, factor = self._module_of(key)
            full[key] = module.unshard(factor, state[key])
        if pp_size() > 1:
            full = {k: v.to(self.device) for k, v in merge_over_stages(full).items()}
        return full

    def _module_of(self, key: str) -> tuple[LoraLinear, str]:
        path, _, factor = key.rpartition(".")
        if path not in self.modules or factor not in ("lora_A", "lora_B"):
            raise KeyError(f"{key!r} is not a LoRA factor of this model")
        return self.modules[path], factor

    # --- routing ---------------------------------------------------------------------------
    def route(self, row_adapters: Sequence[str | None]) -> contextlib.AbstractContextManager:
        """Within the block, batch row i uses adapter `row_adapters[i]` (None: the base model)."""
        rows_of: dict[str, list[int]] = {}
        for i, name in enumerate(row_adapters):
            if name is not None:
                self.adapter_config(name)
                rows_of.setdefault(name, []).append(i)
        batch = len(row_adapters)
        groups = [  # rows None: the whole batch
            (name, None if len(rows) == batch else torch.tensor(rows, device=self.device))
            for name, rows in rows_of.items()
        ]
        return self._routing(batch, groups)

    def route_all(self, name: str) -> contextlib.AbstractContextManager:
        """Within the block, every row of every batch uses adapter `name`, whatever the batch
        size: for a run of micro-batches, and for layers recomputed during backward."""
        self.adapter_config(name)
        return self._routing(None, [(name, None)])

    @contextlib.contextmanager
    def _routing(self, batch: int | None, groups: list) -> Iterator[None]:
        if self._routing_active:
            raise RuntimeError("route() does not nest")
        self._routing_active = True
        for module in self.modules.values():
            module.routing_batch = batch
            module.routing = [(module.adapters[name], rows) for name, rows in groups if name in module.adapters]
        try:
            yield
        finally:
            for module in self.modules.values():
                module.routing = module.routing_batch = None
            self._routing_active = False


def _global_path(model: nn.Module, path: str) -> str:
    """`path` with a decoder layer's local index replaced by its global layer number - 1."""
    parts = path.split(".")
    if parts[:2] == ["decoder", "layers"]:
        parts[2] = str(model.decoder.layers[int(parts[2])].layer_number - 1)
    return ".".join(parts)


def _every_stage(paths: list[str]) -> list[str]:
    """The wrapped-layer paths of every pipeline stage, in stage order (collective over PP)."""
    return list(merge_over_stages(dict.fromkeys(paths)))


def _b_rows_by_rank(leaf: str, module: ColumnParallelLinear, config) -> list[torch.Tensor]:
    """For each tp rank, which rows of the full (HF-order) B it holds, in local order."""
    tp = tp_size()
    rows = torch.arange(module.output_size)
    if leaf == "linear_qkv":
        q_dim = config.num_attention_heads * config.kv_channels
        kv_dim = config.num_query_groups * config.kv_channels
        q, k, v = rows.split([q_dim, kv_dim, kv_dim])
        return [qkv_shard(q, k, v, config, tp, r) for r in range(tp)]
    if leaf == "linear_fc1":
        gate, up = rows.chunk(2)
        return [gate_up_shard(gate, up, config, tp, r) for r in range(tp)]
    return list(rows.chunk(tp))
