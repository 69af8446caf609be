"""The `miles` backend: LoRA training and sampling on megatron-core models, in a worker.

Holds, per served base model, the frozen GPTModel shard of this rank and its
`LoraManager`; per training run, an adapter and its `AdapterOptimizer`; and frozen adapter
snapshots that samplers read. Losses come from `backends.common.losses` (shared by every
backend). On CPU the sampler is the in-process KV-cache sampler; the GPU image swaps in
SGLang behind the same `sample` operation.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from backends.base import TrainingBackend
from backends.common.losses import compute_loss
from backends.common.optimizer import MOMENT_KINDS, AdapterOptimizer
from backends.miles.hf_checkpoint import read_hf_config
from backends.miles.lora import LoraManager
from backends.miles.model import ModelInfo, build_model
from backends.miles.packed_weights import pack_frozen_weights
from backends.miles import packing, schedule
from backends.miles.parallel import (ParallelDims, Share, data_parallel_share, dp_group, dp_rank, dp_size, first_failure,
                                     from_rank_0, gather_shares, init_distributed, leads_replica, least_over_ranks,
                                     raise_first_failure, replica_group, union_over_ranks, is_global_rank_0,
                                     merge_metrics, merge_over_stages, pp_group, pp_size, to_first_stage, tp_size)
from backends.miles.schedule import MicroBatch
from backends.miles.peft_format import (FusedLayout, SavedCheckpoint, adapter_config, from_peft, lora_flags,
                                        read_checkpoint, to_peft, write_checkpoint)
from backends.miles.prefix_cache import PrefixCache
from backends.miles.sampler import SampleResult, SampleSpec, generate
from engine.batch import pack_outputs, unpack_datums
from engine.messages import UserError
from engine.registry import stamped

log = logging.getLogger("tinkercloud.miles")

# Frozen sampler adapters kept in memory: those a replica read back from checkpoints (least
# recently used go first), and at most those save_for_sampler made (the server names which to
# drop, handlers.state.SnapshotUsage; this cap only matters for a server that names none).
MAX_LOADED_SNAPSHOTS = 64
MAX_SAVED_SNAPSHOTS = 256
# Of the memory free (at start-up, and when a step is planned: the less of the two), what one
# micro-batch may plan to take: a GPU is the worker's own; a CPU worker shares the machine's RAM
# with its other workers and processes.
MICROBATCH_MEMORY_SHARE = {"cuda": 0.5, "cpu": 0.25}
# What must be free beside a running sampling batch, as a share of the memory free at start-up,
# before an operation runs between its decode steps (it then plans within what is free).
ROOM_MEMORY_SHARE = 0.25
# The most of a CPU worker's free memory that packed copies of the sampler's weights may take.
PACKED_WEIGHTS_MEMORY_SHARE = 0.125
LOGITS_BYTES = 12  # per logit entry: fp32 logits, their log-softmax and its gradient
MIN_MICROBATCH_LOGITS = 1 << 27  # never fewer logits (rows x width x local vocab) per micro-batch


@dataclass
class _Base:
    name: str
    path: str
    info: ModelInfo
    model: Any
    lora: LoraManager
    tokenizer: Any = None

    @property
    def local_vocab(self) -> int:
        """Columns of this rank's logits (the vocabulary is split across tensor-parallel ranks)."""
        return -(-self.info.vocab_size // tp_size())

    def decode(self, tokens: list[int]) -> str:
        if self.tokenizer is None:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        return self.tokenizer.decode(tokens)


@dataclass
class _Run:
    base: _Base
    optimizer: AdapterOptimizer
    spec: dict[str, Any] = field(default_factory=dict)


class MilesBackend(TrainingBackend):
    def __init__(self, spec) -> None:
        dims = ParallelDims.for_workers(spec.world_size, spec.tp, spec.pp)
        self.device = init_distributed(dims)
        self.replica = replica_group()  # sampling runs on this rank's replica alone
        self.leads_replica = leads_replica()
        mine = dims.replica_ranks(dp_rank())
        group = dist.get_process_group_ranks(self.replica) if self.replica is not None else [0]
        if sorted(group) != sorted(mine) or self.leads_replica != (dist.get_rank() == mine[0]):
            raise RuntimeError(f"rank {dist.get_rank()}: megatron-core's groups differ from the server's layout "
                               f"(replica {dp_rank()} = ranks {mine}, led by the first)")
        dtype = _weights_dtype(spec.dtype, self.device)
        # factors stay float32 either way
        self.lora_dtype = lora_dtype = dtype if spec.lora_compute == "base" else torch.float32
        if is_global_rank_0():
            log.info("base weights in %s, LoRA products in %s, %s kernels", dtype, lora_dtype, spec.kernels)
        self.bases: dict[str, _Base] = {}
        for name, path in spec.models.items():
            model = build_model(path, self.device, dtype, spec.recompute, kernels=spec.kernels)
            self.bases[name] = _Base(name, path, ModelInfo.from_dir(path), model,
                                     LoraManager(model, compute_dtype=lora_dtype))
        self.runs: dict[str, _Run] = {}
        # Frozen sampler adapters, snapshot key -> its base model: those save_for_sampler made (an
        # operation of every rank, so the same on every replica) and those this replica read back
        # from a checkpoint for a sampler (sampling reaches one replica only).
        self.saved: OrderedDict[str, _Base] = OrderedDict()
        self.loaded: OrderedDict[str, _Base] = OrderedDict()
        self.prefix_caches = {name: PrefixCache() for name in self.bases}  # sampler K/V reuse, per base model
        self._pack_sampler_weights()
        # Every rank must cut a batch into the same micro-batches: plan from the least free memory.
        self.memory_share = MICROBATCH_MEMORY_SHARE.get(self.device.type, MICROBATCH_MEMORY_SHARE["cpu"])
        free_at_start = least_over_ranks(free_memory(self.device), self.device)
        self.micro_batch_bytes = int(free_at_start * self.memory_share)
        self.room_bytes = int(free_at_start * ROOM_MEMORY_SHARE)
        self.recompute = spec.recompute
        # Snapshot -> requests of the running sampling batch that use it and have not finished yet:
        # counted when they join, let go when their rows are done (`_let_go`).
        self._in_use: Counter[str] = Counter()
        self._drop_when_unused: dict[str, _Base] = {}  # snapshots forgotten while rows still used them

    def _pack_sampler_weights(self) -> None:
        """`pack_sampler_weights` for every base model, and a log line of what it packed."""
        bases = list(self.bases.values())
        packed_bytes = pack_sampler_weights([b.lora for b in bases], self.device)
        if not is_global_rank_0() or self.device.type != "cpu":
            return
        for base, used in zip(bases, packed_bytes):
            packed = sum(m.packed is not None for m in base.lora.modules.values())
            log.info("%s: %d of %d wrapped layers' frozen weights (%.1f MB) packed for the sampler's oneDNN "
                     "products", base.name, packed, len(base.lora.modules), used / 2**20)

    def model_infos(self) -> dict[str, dict[str, Any]]:
        return {
            name: {"vocab_size": b.info.vocab_size, "max_context": b.info.max_context, "arch": b.info.architecture,
                   "eos_token_ids": list(b.info.eos_token_ids), "path": b.path}
            for name, b in self.bases.items()
        }

    # ---- adapters ------------------------------------------------------------------------
    def _run(self, model_id: str) -> _Run:
        run = self.runs.get(model_id)
        if run is None:
            raise UserError(f"model {model_id} has no adapter on the workers (unloaded or never created)")
        return run

    def create_adapter(self, model_id, base_model, rank, alpha, seed, train_attn, train_mlp, train_unembed):
        base = self.bases[base_model]
        flags = dict(train_attn=train_attn, train_mlp=train_mlp, train_unembed=train_unembed)
        base.lora.add_adapter(model_id, rank, alpha, seed=seed, **flags)
        opt = AdapterOptimizer(base.lora.adapter_params(model_id), _tp_group(), dp_group(), pp_group(), self.device)
        self.runs[model_id] = _Run(base, opt, {"rank": rank, "alpha": alpha, **flags})
        return {"model_id": model_id}

    def remove_adapter(self, model_id):
        run = self.runs.pop(model_id, None)
        if run is not None:
            run.base.lora.remove_adapter(model_id)
        return {"model_id": model_id}

    # ---- training ------------------------------------------------------------------------
    def forward_backward(self, model_id, batch, loss_fn, loss_fn_config, forward_only):
        """Each data-parallel rank runs its contiguous share of the datums (maybe none: it then
        runs no forward, and its tensor- and pipeline-parallel peers, which hold the same share,
        neither) as micro-batches through the pipeline schedule (`schedule.run`); every rank
        learns of any failure before it answers, and the per-datum outputs (made on the last
        pipeline stage) are gathered in batch order on global rank 0. Gradients stay per rank
        until `optim_step` sums them over DP."""
        run = self._run(model_id)
        tokens, inputs = unpack_datums(batch)
        for inp, extra in zip(inputs, batch.get("datum_inputs", ())):  # a custom loss's inputs, any shape
            inp.update(extra)
        mine = data_parallel_share(len(tokens), dp_size(), dp_rank())
        params = [p for _, p, _ in run.base.lora.adapter_params(model_id)]
        grads_before = None if forward_only else [None if p.grad is None else p.grad.clone() for p in params]
        parts: list[Share] = []

        def loss_of(mb: MicroBatch, logprobs: torch.Tensor) -> torch.Tensor:
            lps = mb.split(logprobs)
            picked = [{k: v.to(self.device) for k, v in inputs[mine[j]].items()} for j in mb.datums]
            loss, elementwise, metrics = compute_loss(loss_fn, lps, picked, loss_fn_config)
            outputs = [{"logprobs": lp.detach().float().cpu().numpy()} for lp in lps]
            for out, e in zip(outputs, elementwise or ()):  # custom losses have no per-token loss
                out["elementwise_loss"] = e.detach().float().cpu().numpy()
            parts.append(Share(outputs, metrics, len(lps)))
            return loss

        micro: list[MicroBatch] = []
        try:
            micro = self._micro_batches(run.base, [tokens[i] for i in mine], [inputs[i] for i in mine])
            with run.base.lora.route_all(model_id):
                error = schedule.run(run.base.model, micro, loss_of, forward_only=forward_only)
        except Exception as e:  # noqa: BLE001 - raised below, once every rank knows
            error = e
        error = first_failure(error)  # collective: no rank goes on to gather alone
        if error is not None:
            if grads_before is not None:  # a failed request leaves no partial gradient behind
                for p, g in zip(params, grads_before):
                    p.grad = g
            raise error
        outputs = packing.in_batch_order([mb.layout for mb in micro], [part.outputs for part in parts]) if parts else []
        share = Share(outputs, merge_metrics(parts), len(mine))
        merged = to_first_stage(gather_shares(share))  # collectives; None where the answer is not sent
        return {} if merged is None else {"outputs": pack_outputs(merged.outputs), "metrics": merged.metrics}

    def _micro_batches(self, base: _Base, tokens: list, inputs: list[dict[str, Any]]) -> list[MicroBatch]:
        """This rank's datums packed into micro-batches (`packing.pack`) of at most `_token_budget`
        tokens; with several pipeline stages, also at least as many micro-batches as stages when
        the datums allow (fewer leaves stages idle)."""
        lengths = [len(t) for t in tokens]
        budget = self._token_budget(base)
        if pp_size() > 1 and lengths:
            budget = min(budget, max(max(lengths), -(-sum(lengths) // pp_size())))
        micro = []
        for layout in packing.pack(lengths, budget):
            # one datum per row: no mask (plain causal attention, the fastest kernels)
            tok, tgt, mask = layout.inputs([tokens[i] for i in layout.datums],
                                           [inputs[i]["target_tokens"] for i in layout.datums], self.device,
                                           with_mask=layout.rows != len(layout.datums))
            micro.append(MicroBatch(layout, tok, tgt, mask))
        return micro

    def _token_budget(self, base: _Base) -> int:
        """Tokens per micro-batch: what fits in `micro_batch_bytes`, or in the share of what is
        free now if that is less (adapters, sampler snapshots and K/V caches take memory after
        start-up; the least over ranks, so every rank cuts the same micro-batches), at the logits'
        and the activations' cost per token, and at least MIN_MICROBATCH_LOGITS logits' worth. The
        environment variable TINKERCLOUD_MICROBATCH_LOGITS fixes the logits per micro-batch."""
        fixed = os.environ.get("TINKERCLOUD_MICROBATCH_LOGITS")
        if fixed:
            return max(1, int(fixed) // base.local_vocab)
        per_token = base.local_vocab * LOGITS_BYTES + activation_bytes_per_token(base.model, self.recompute,
                                                                                  self.lora_dtype)
        free_now = least_over_ranks(self._free_now(), self.device)
        plan_bytes = min(self.micro_batch_bytes, int(free_now * self.memory_share))
        return max(MIN_MICROBATCH_LOGITS // base.local_vocab, plan_bytes // per_token)

    def optim_step(self, model_id, adam):
        return {"metrics": self._run(model_id).optimizer.step(adam)}

    # ---- checkpoints and sampler snapshots -----------------------------------------------
    def save_for_sampler(self, model_id, sampler_key, path, meta, evict=()):
        """A frozen copy of the run's adapter for samplers; first the snapshots the server says
        are now the least recently used go."""
        for key in evict:
            if key in self.saved:
                self._forget_snapshot(key)
        run = self._run(model_id)
        run.base.lora.clone_adapter(model_id, sampler_key, trainable=False)
        self._remember_saved(sampler_key, run.base)
        if path is not None:
            self._write_checkpoint(run, sampler_key, Path(path), meta, optimizer=None)
        return {"sampler_key": sampler_key}

    def save_checkpoint(self, model_id, path, meta, overwrite, with_optimizer):
        run = self._run(model_id)
        exists = None
        if Path(path).exists() and not overwrite:
            exists = UserError(f"checkpoint {meta['tinker_path']} already exists; save under another name "
                               "or pass overwrite=True")
        raise_first_failure(exists)  # every rank stops, or none (a delete may land between two ranks' checks)
        optimizer = self._full_moments(run) if with_optimizer else None  # collective
        self._write_checkpoint(run, model_id, Path(path), meta, optimizer)
        return {"path": path}

    def load_checkpoint(self, model_id, base_model, path, with_optimizer):
        """Every rank reads its part of the files into a staging adapter; if any rank fails (a file
        deleted between two ranks' reads, say) or ranks read different saves (one overwrote it in
        between), all of them fail, the staging adapter goes and a run that was loaded keeps its
        adapter and optimizer; else the staging adapter becomes the run's."""
        base = self.bases[base_model]
        staging = f"{model_id}#loading"  # the run's own adapter is replaced only once every rank has this one
        error, saved = None, None
        try:
            saved = read_checkpoint(Path(path), with_optimizer)
            flags = self._install(base, staging, saved, trainable=True)
            optimizer = AdapterOptimizer(base.lora.adapter_params(staging), _tp_group(), dp_group(), pp_group(), self.device)
            if with_optimizer:
                try:
                    optimizer.load_moments(self._local_moments(base, saved.optimizer))
                except (KeyError, ValueError) as e:
                    raise UserError(f"the checkpoint's optimizer state does not fit its adapter: {e}") from None
        except Exception as e:  # noqa: BLE001 - raised below, once every rank knows
            error = e
        error = first_failure(error)
        versions = union_over_ranks({} if saved is None else {dist.get_rank(): saved.snapshot_id})
        if error is None and len(set(versions.values())) > 1:
            error = UserError("the checkpoint was saved over while it was being loaded; load it again")
        if error is not None:
            base.lora.discard_adapter(staging)  # also factors a load that failed halfway installed
            raise error  # a run that was loaded keeps its adapter and optimizer as they were
        base.lora.rename_adapter(staging, model_id)
        self.runs[model_id] = _Run(base, optimizer, flags)
        return {"model_id": model_id}

    def _write_checkpoint(self, run: _Run, adapter: str, folder: Path, meta: dict[str, Any],
                          optimizer: dict[str, torch.Tensor] | None) -> None:
        """Gather the adapter's full layout (collective); global rank 0 writes it as a PEFT folder
        once every rank is past its own checks (the first barrier), so none sees a half-written one."""
        lora = run.base.lora
        full = lora.gather_full_state(lora.adapter_state(adapter))
        failure = None
        _barrier()
        if is_global_rank_0():
            try:
                write_checkpoint(folder, to_peft(full, self._layout(run.base)), adapter_config(run.spec, run.base.name),
                                 stamped(meta, time.time()), optimizer)
            except Exception as e:  # noqa: BLE001 - re-raised after the barrier, so no rank waits for ever
                failure = e
        _barrier()
        if failure is not None:
            raise failure

    def _full_moments(self, run: _Run) -> dict[str, torch.Tensor]:
        """The AdamW state as flat `<factor>.<kind>` tensors in full layout (collective)."""
        moments = run.optimizer.moments()  # this stage's factors' (on a stage without any: empty)
        flat = {f"{name}.step": step for name, step in merge_over_stages(moments.get("step", {})).items()}
        for kind in ("exp_avg", "exp_avg_sq"):
            full = run.base.lora.gather_full_state(moments.get(kind, {}))
            flat.update({f"{name}.{kind}": t for name, t in full.items()})
        return flat

    @staticmethod
    def _local_moments(base: _Base, flat: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        """Inverse of `_full_moments`, as this rank's shards."""
        moments: dict[str, dict[str, torch.Tensor]] = {kind: {} for kind in MOMENT_KINDS}
        for key, value in flat.items():
            name, _, kind = key.rpartition(".")
            moments[kind][name] = value
        for kind in ("exp_avg", "exp_avg_sq"):
            moments[kind] = base.lora.shard_full_state(moments[kind])
        return moments

    def _install(self, base: _Base, name: str, saved: SavedCheckpoint, trainable: bool) -> dict[str, Any]:
        """Load a saved PEFT adapter as adapter `name` (any TP degree can read it); returns its
        LoRA flags."""
        flags = lora_flags(saved.config)
        full = from_peft(saved.tensors, self._layout(base))
        try:
            base.lora.load_adapter_state(name, base.lora.shard_full_state(full), rank=flags["rank"],
                                         alpha=flags["alpha"], trainable=trainable)
        except (KeyError, ValueError) as e:
            raise UserError(f"the checkpoint does not fit {base.name}: {e}") from None
        return flags

    @staticmethod
    def _layout(base: _Base) -> FusedLayout:
        return FusedLayout.from_hf_config(read_hf_config(base.path), base.model.vocab_size)  # padded vocabulary

    def _load_snapshot(self, base: _Base, key: str, path: str) -> None:
        """Load a saved sampler checkpoint as the frozen adapter `key`."""
        saved = read_checkpoint(Path(path))
        if saved.snapshot_id != key:
            raise UserError("the checkpoint this sampler was created from has been overwritten or deleted since")
        self._install(base, key, saved, trainable=False)
        self.loaded[key] = base
        for old in [k for k in self.loaded if k not in self._in_use and k != key]:
            if len(self.loaded) <= MAX_LOADED_SNAPSHOTS:
                break
            self._forget_snapshot(old)  # the least recently used: read back again when needed

    def _has_snapshot(self, key: str) -> bool:
        return key in self.saved or key in self.loaded

    def _forget_snapshot(self, key: str) -> None:
        """Drop snapshot `key` from whichever pool holds it (a key is only ever in one). Rows of the
        running sampling batch may still use it (an operation that ran between its decode steps
        evicted it): then its factors stay until the last of those rows is done."""
        base = self.loaded.pop(key, None) if key in self.loaded else self.saved.pop(key, None)
        if base is None:
            return
        if key in self._in_use:
            self._drop_when_unused[key] = base
        else:
            base.lora.remove_adapter(key)

    def _let_go(self, key: str | None) -> None:
        """A request of the running batch that used snapshot `key` is done (or refused): the
        snapshot's factors go if it was forgotten meanwhile and no other request uses it."""
        if key is None:
            return
        self._in_use[key] -= 1
        if self._in_use[key] <= 0:
            del self._in_use[key]
            base = self._drop_when_unused.pop(key, None)
            if base is not None:
                self._drop_unless_pooled(key, base)

    def _sampling_batch_ended(self) -> None:
        """Every request of the batch is done (some may not have said so: a failure, or a batch of
        several base models): what is still counted in use is not."""
        self._in_use.clear()
        for key, base in self._drop_when_unused.items():
            self._drop_unless_pooled(key, base)
        self._drop_when_unused.clear()

    def _drop_unless_pooled(self, key: str, base: _Base) -> None:
        """Remove a forgotten snapshot's factors, unless it was read back into a pool since."""
        if not self._has_snapshot(key):
            base.lora.remove_adapter(key)

    def _remember_saved(self, key: str, base: _Base) -> None:
        """Keep the snapshot save_for_sampler made. Only this operation, which every rank runs,
        changes `saved`, so every replica keeps the same ones (a snapshot saved without a path
        exists nowhere else): the ones the server did not name for eviction; beyond
        MAX_SAVED_SNAPSHOTS (a server that names none) the oldest go."""
        self.saved[key] = base
        while len(self.saved) > MAX_SAVED_SNAPSHOTS:
            self._forget_snapshot(next(iter(self.saved)))

    # ---- sampling ------------------------------------------------------------------------
    def _adapter_for(self, req: dict[str, Any]) -> str | None:
        adapter = req.get("adapter")
        if adapter is None:
            return None
        key = adapter["key"]
        if key in self.saved:
            return key
        if key in self.loaded:
            self.loaded.move_to_end(key)
            return key
        if adapter.get("path"):
            self._load_snapshot(self.bases[req["base_model"]], key, adapter["path"])
            return key
        raise UserError("this sampler's weights are no longer in memory (evicted or lost in a restart); "
                        "save the weights again")

    def sample(self, requests, joins=None):
        """This rank's data-parallel replica samples the requests on its own (its tensor- and
        pipeline-parallel ranks together; collectives over the replica only); its leader answers.
        Requests that arrive meanwhile join the running batch (`joins`); their results follow."""
        results, error = [], None
        try:
            results = self._sample_share(self._resolve(requests), joins)
        except Exception as e:  # noqa: BLE001 - raised below, once every rank of the replica knows
            error = e
        finally:
            self._sampling_batch_ended()
        raise_first_failure(error, self.replica)
        return results

    def room_beside_sampling(self) -> bool:
        """A quarter of the memory free at start-up (`room_bytes`) is free on this rank beside the
        running batch's KV caches; the operation then plans its micro-batches within what is free
        (`_token_budget`). Each rank asks its own; `SampleJoins` runs the operation only once all
        of them have room."""
        return self._free_now() >= self.room_bytes

    def _free_now(self) -> int:
        """Memory free on this rank now; on a GPU counting what torch's allocator holds unused."""
        free = free_memory(self.device)
        if self.device.type == "cuda":
            free += torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        return free

    @contextlib.contextmanager
    def paused_sampling(self):
        """Training as outside sampling: autograd on (generation runs in inference mode) and the
        models in training mode (generation puts them in eval mode), until the operation is done."""
        modes = [(b.model, b.model.training) for b in self.bases.values()]
        with torch.inference_mode(False), torch.enable_grad():
            try:
                for model, _ in modes:
                    model.train()
                yield
            finally:
                for model, was in modes:
                    model.train(was)

    def agree(self, value: int) -> int:
        return from_rank_0(value, self.device, self.replica)

    def all_agree(self, value: int) -> int:
        return least_over_ranks(value, self.device)

    def _resolve(self, requests: list[dict[str, Any]]) -> list[tuple[dict[str, Any], str | None, str | None]]:
        """(request, its adapter, why it is refused or None) for each request (collectives over the
        replica's ranks). A request whose adapter cannot be loaded on some rank is refused on all of
        them (its checkpoint may vanish between two ranks' reads), so the ranks' batches stay the same."""
        adapters: dict[int, str | None] = {}
        refused: dict[int, str] = {}
        loaded_now: dict[int, str] = {}  # requests whose snapshot this call loaded here
        error = None
        try:
            for i, req in enumerate(requests):
                was_loaded = self._has_snapshot((req.get("adapter") or {}).get("key"))
                try:
                    adapters[i] = self._adapter_for(req)
                except UserError as e:
                    refused[i] = str(e)
                if adapters.get(i) is not None:
                    self._in_use[adapters[i]] += 1  # at once: a later load of this call must not evict it
                    if not was_loaded:
                        loaded_now[i] = adapters[i]
        except Exception as e:  # noqa: BLE001 - raised below, once every rank knows
            error = e
        raise_first_failure(error, self.replica)
        refused = union_over_ranks(refused, self.replica)
        for i in refused:
            self._let_go(adapters.get(i))
        kept = {a for i, a in adapters.items() if a is not None and i not in refused}
        for i in refused.keys() & loaded_now.keys():  # refused elsewhere: keep the ranks' snapshots equal
            if loaded_now[i] in kept:  # another request of this batch uses it
                continue
            self._forget_snapshot(loaded_now[i])
        return [(req, adapters.get(i), refused.get(i)) for i, req in enumerate(requests)]

    def _sample_share(self, items: list[tuple[dict[str, Any], str | None, str | None]], joins=None):
        """One result per (request, adapter, refusal); then one per request that joined."""
        results: list[dict[str, Any] | None] = [None] * len(items)
        by_base: dict[str, list[tuple[int, SampleSpec]]] = {}
        for i, (req, adapter, refusal) in enumerate(items):
            if refusal is not None:
                results[i] = {"error": refusal, "category": "user"}
            else:
                by_base.setdefault(req["base_model"], []).append((i, _spec(req, adapter)))
        # Requests may join only a generation of the one base model this batch samples; a batch of
        # several still takes part in `joins.take` between decode steps (operations may run there,
        # and every rank must answer whether it is ready for them), but nothing joins it.
        one_base = len(by_base) == 1
        joined = None
        if joins is not None:
            joined = _Joined(joins, self._resolve, self._let_go, results,
                             [(i, s.adapter) for i, s in next(iter(by_base.values()))] if one_base else [])
        for name, specs in by_base.items():
            base, cache = self.bases[name], self.prefix_caches[name]
            cache.retain(lambda adapter: adapter is None or self._has_snapshot(adapter))  # evicted snapshots' K/V go too
            poll = on_done = None
            if joined is not None:
                poll = functools.partial(joined.take, name if one_base else None)
                on_done = joined.done if one_base else None
            outs = generate(base.model, [s for _, s in specs], decode=base.decode, route=base.lora.route,
                            prefix_cache=cache, poll=poll, on_done=on_done)
            if on_done is None:  # else `joined.done` already filled `results` in, spec by spec
                for (i, _), out in zip(specs, outs):
                    results[i] = _sample_result(out)
        return results + (joined.results() if joined is not None else [])


class _Joined:
    """The items of a running generation (`SampleJoins`): item 0, whose requests started it, then
    the items whose requests joined it. Each item is answered as soon as all its requests are done
    (or refused), so a short request does not wait for the longest one in its batch; the snapshot
    each request used is let go then (`let_go`)."""

    def __init__(self, joins, resolve, let_go, first: list[dict[str, Any] | None],
                 first_specs: list[tuple[int, str | None]]) -> None:
        self.joins, self.resolve, self.let_go = joins, resolve, let_go
        # per item: its requests' results (item 0's refusals already filled in)
        self.items: list[list[dict[str, Any] | None]] = [first]
        # (item, request, adapter) of each spec, in spec order
        self.slots: list[tuple[int, int, str | None]] = [(0, j, adapter) for j, adapter in first_specs]

    def take(self, base_model: str | None) -> list[SampleSpec]:
        """The specs of the requests that join now (None: none may; a collective over the replica's
        ranks, and one over every rank when an operation waits)."""
        new = []
        for reqs in self.joins.take(lambda reqs: all(r["base_model"] == base_model for r in reqs)):
            k = len(self.items)
            self.items.append([None] * len(reqs))
            for j, (req, adapter, refusal) in enumerate(self.resolve(reqs)):
                if refusal is not None:
                    self.items[k][j] = {"error": refusal, "category": "user"}
                else:
                    self.slots.append((k, j, adapter))
                    new.append(_spec(req, adapter))
            self._answer_if_complete(k)  # every request refused: answered at once
        return new

    def done(self, si: int, out: SampleResult) -> None:
        """Spec `si` of the generation finished: its rows no longer use its snapshot."""
        k, j, adapter = self.slots[si]
        self.items[k][j] = _sample_result(out)
        self.let_go(adapter)
        self._answer_if_complete(k)

    def _answer_if_complete(self, k: int) -> None:
        if all(r is not None for r in self.items[k]):
            self.joins.reply(k, self.items[k])

    def results(self) -> list[dict[str, Any] | None]:
        """The joined items' results (item 0's are the caller's list)."""
        return [r for item in self.items[1:] for r in item]


def _spec(req: dict[str, Any], adapter: str | None) -> SampleSpec:
    """A validated sampling request as the sampler's spec."""
    return SampleSpec(
        prompt=[int(t) for t in req["prompt"]], num_samples=req["num_samples"], max_tokens=req["max_tokens"],
        temperature=req["temperature"], top_k=req["top_k"], top_p=req["top_p"],
        stop_token_ids=tuple(req["stop_token_ids"]), stop_strings=tuple(req["stop_strings"]),
        seed=req["seed"], prompt_logprobs=req["prompt_logprobs"], adapter=adapter,
        prompt_logprobs_last_n=req.get("prompt_logprobs_last_n"),
        topk_prompt_logprobs=req.get("topk_prompt_logprobs", 0),
        topk_sample_logprobs=req.get("topk_sample_logprobs", 0),
        target_prompt_ids=req.get("target_prompt_ids"), prompt_alt_tokens_k=req.get("prompt_alt_tokens_k", 0))


def _sample_result(out: SampleResult) -> dict[str, Any]:
    """A sampler result as the plain values the server's encoder reads."""
    return {
        "sequences": [{"tokens": s.tokens, "logprobs": s.logprobs, "stop_reason": s.stop_reason,
                       "topk_logprobs": s.topk_logprobs} for s in out.sequences],
        "prompt_logprobs": None if out.prompt_logprobs is None else np.asarray(out.prompt_logprobs, dtype=np.float32),
        "topk_prompt_logprobs": out.topk_prompt_logprobs,
        "target_prompt_logprobs": out.target_prompt_logprobs,
        "prompt_alt_tokens": out.prompt_alt_tokens,
        "prompt_cache_hit_tokens": out.prompt_cache_hit_tokens,
    }


def free_memory(device: torch.device) -> int:
    """Bytes free once the models are loaded: this GPU's, or on CPU the machine's available RAM
    split between its workers."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return _available_ram() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def pack_sampler_weights(loras: list[LoraManager], device: torch.device) -> list[int]:
    """On CPU, the sampler's frozen weights of each model a second time in oneDNN's layout
    (`packed_weights`), together within PACKED_WEIGHTS_MEMORY_SHARE of the least memory free over
    ranks (a collective); the bytes packed per model (none on GPUs)."""
    if device.type != "cpu":
        return [0] * len(loras)
    budget = int(least_over_ranks(free_memory(device), device) * PACKED_WEIGHTS_MEMORY_SHARE)
    used = []
    for lora in loras:
        used.append(pack_frozen_weights(lora, budget))
        budget -= used[-1]
    for lora in loras:  # what is left is the snapshots' merged weights', evenly (`MergedCopies`)
        lora.merged_copies.budget_bytes = budget // len(loras)
    return used


def activation_bytes_per_token(model, recompute: str, lora_dtype: torch.dtype | None = None) -> int:
    """What backward keeps per token across this stage's layers, roughly: the inputs of the
    norms, linears and attention, and the MLP's intermediates (hidden states are whole on every
    tensor-parallel rank, the MLP's are split); with full recomputation only each layer's input.
    LoRA products in another dtype than the weights' (float32 beside bf16) also keep that copy of
    each wrapped linear's input. With the logits' 12 bytes this gave 11.8 MB a token for the 8B
    shape and 3.8 for the 0.6B one (bf16, float32 LoRA products), where the H100 measured about
    11.7 and 3.9 (BENCHMARKS.md, GPU results). Since then the eager SwiGLU (`swiglu.py`) keeps one
    ffn-wide tensor a layer less (about 1 MB a token for the 8B shape); the estimate still counts
    it, which errs on the safe side until a GPU measures it again."""
    cfg = model.config
    tp = cfg.tensor_model_parallel_size
    if recompute == "full":
        return len(model.decoder.layers) * cfg.hidden_size * cfg.params_dtype.itemsize
    per_layer = (10 * cfg.hidden_size + 4 * cfg.ffn_hidden_size // tp) * cfg.params_dtype.itemsize
    if lora_dtype is not None and lora_dtype != cfg.params_dtype:
        wrapped_inputs = 2 * cfg.hidden_size + cfg.num_attention_heads * cfg.kv_channels // tp + cfg.ffn_hidden_size // tp
        per_layer += wrapped_inputs * lora_dtype.itemsize
    return len(model.decoder.layers) * per_layer


def _available_ram() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _weights_dtype(name: str, device: torch.device) -> torch.dtype:
    """The base weights' dtype: bfloat16 on GPUs and float32 on CPU unless chosen."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def _tp_group():
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_group()


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()

