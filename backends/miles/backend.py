"""The `miles` backend: LoRA training and sampling on megatron-core models, in a worker.

Holds, per served base model, the frozen GPTModel shard of this rank and its
`LoraManager`; per training run, an adapter and its `AdapterOptimizer`; and frozen adapter
snapshots that samplers read. Losses come from `backends.common.losses` (shared by every
backend). On CPU the sampler is the in-process KV-cache sampler; the GPU image swaps in
SGLang behind the same `sample` operation.
"""
from __future__ import annotations

import json
import os
import shutil
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from backends.base import TrainingBackend
from backends.common.losses import compute_loss
from backends.common.optimizer import AdapterOptimizer
from backends.miles.lora import LoraManager
from backends.miles.model import ModelInfo, build_model, token_logprobs
from backends.miles.parallel import ParallelDims, init_distributed, tp_rank
from backends.miles.sampler import SampleSpec, generate
from engine.batch import unpack_datums
from engine.messages import UserError

MAX_SNAPSHOTS = 64  # frozen sampler adapters kept in memory (least recently used go first)


@dataclass
class _Base:
    name: str
    path: str
    info: ModelInfo
    model: Any
    lora: LoraManager
    tokenizer: Any = None

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
        self.device = init_distributed(ParallelDims(tp=spec.world_size))
        self.bases: dict[str, _Base] = {}
        for name, path in spec.models.items():
            model = build_model(path, self.device)
            self.bases[name] = _Base(name, path, ModelInfo.from_dir(path), model, LoraManager(model))
        self.runs: dict[str, _Run] = {}
        self.snapshots: OrderedDict[str, _Base] = OrderedDict()  # snapshot key -> its base model

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
        from megatron.core import parallel_state

        opt = AdapterOptimizer(base.lora.adapter_params(model_id), parallel_state.get_tensor_model_parallel_group())
        self.runs[model_id] = _Run(base, opt, {"rank": rank, "alpha": alpha, **flags})
        return {"model_id": model_id}

    def remove_adapter(self, model_id):
        run = self.runs.pop(model_id, None)
        if run is not None:
            run.base.lora.remove_adapter(model_id)
        return {"model_id": model_id}

    # ---- training ------------------------------------------------------------------------
    def forward_backward(self, model_id, batch, loss_fn, loss_fn_config, forward_only):
        run = self._run(model_id)
        tokens, inputs = unpack_datums(batch)
        lengths = [len(t) for t in tokens]
        rows, seq_len = len(tokens), max(lengths)
        tok = torch.zeros(rows, seq_len, dtype=torch.long)
        tgt = torch.zeros(rows, seq_len, dtype=torch.long)
        for i, (t, inp) in enumerate(zip(tokens, inputs)):
            tok[i, : lengths[i]] = t
            tgt[i, : lengths[i]] = inp["target_tokens"]
        with torch.set_grad_enabled(not forward_only), run.base.lora.route([model_id] * rows):
            lp = token_logprobs(run.base.model, tok.to(self.device), tgt.to(self.device))
            lps = [lp[i, :n] for i, n in enumerate(lengths)]
            inputs = [{k: v.to(self.device) for k, v in inp.items()} for inp in inputs]
            loss, elementwise, metrics = compute_loss(loss_fn, lps, inputs, loss_fn_config)
            if not forward_only:
                loss.backward()
        outputs = [{"logprobs": l.detach().float().cpu(), "elementwise_loss": e.detach().float().cpu()}
                   for l, e in zip(lps, elementwise)]
        return {"outputs": outputs, "metrics": metrics}

    def optim_step(self, model_id, adam):
        return {"metrics": self._run(model_id).optimizer.step(adam)}

    # ---- sampler snapshots ---------------------------------------------------------------
    def save_for_sampler(self, model_id, sampler_key, path, meta):
        run = self._run(model_id)
        lora = run.base.lora
        lora.clone_adapter(model_id, sampler_key, trainable=False)
        self._remember(sampler_key, run.base)
        if path is not None:
            full = lora.gather_full_state(lora.adapter_state(sampler_key))  # collective
            if tp_rank() == 0:
                _write_checkpoint(Path(path), full, {**meta, "lora": run.spec})
            _barrier()
        return {"sampler_key": sampler_key}

    def _load_snapshot(self, base: _Base, key: str, path: str) -> None:
        """Load a saved adapter (full layout, so any TP degree can read it) as a frozen one."""
        folder = Path(path)
        lora = json.loads((folder / "tinkercloud.json").read_text())["lora"]
        full = load_file(str(folder / "adapter.safetensors"))
        base.lora.load_adapter_state(key, base.lora.shard_full_state(full), rank=lora["rank"],
                                     alpha=lora["alpha"], trainable=False)
        self._remember(key, base)

    def _remember(self, key: str, base: _Base) -> None:
        self.snapshots[key] = base
        self.snapshots.move_to_end(key)
        while len(self.snapshots) > MAX_SNAPSHOTS:
            old, old_base = self.snapshots.popitem(last=False)
            old_base.lora.remove_adapter(old)

    # ---- sampling ------------------------------------------------------------------------
    def _adapter_for(self, req: dict[str, Any]) -> str | None:
        adapter = req.get("adapter")
        if adapter is None:
            return None
        key = adapter["key"]
        if key in self.snapshots:
            self.snapshots.move_to_end(key)
            return key
        if adapter.get("path"):
            self._load_snapshot(self.bases[req["base_model"]], key, adapter["path"])
            return key
        raise UserError("this sampler's weights are no longer in memory (evicted or lost in a restart); "
                        "save the weights again")

    def sample(self, requests):
        results: list[dict[str, Any] | None] = [None] * len(requests)
        by_base: dict[str, list[tuple[int, SampleSpec]]] = {}
        for i, req in enumerate(requests):
            try:
                adapter = self._adapter_for(req)
            except UserError as e:
                results[i] = {"error": str(e), "category": "user"}
                continue
            spec = SampleSpec(
                prompt=[int(t) for t in req["prompt"]], num_samples=req["num_samples"], max_tokens=req["max_tokens"],
                temperature=req["temperature"], top_k=req["top_k"], top_p=req["top_p"],
                stop_token_ids=tuple(req["stop_token_ids"]), stop_strings=tuple(req["stop_strings"]),
                seed=req["seed"], prompt_logprobs=req["prompt_logprobs"], adapter=adapter)
            by_base.setdefault(req["base_model"], []).append((i, spec))
        for name, items in by_base.items():
            base = self.bases[name]
            outs = generate(base.model, [s for _, s in items], decode=base.decode, route=base.lora.route)
            for (i, _), out in zip(items, outs):
                results[i] = {
                    "sequences": [{"tokens": s.tokens, "logprobs": s.logprobs, "stop_reason": s.stop_reason}
                                  for s in out.sequences],
                    "prompt_logprobs": None if out.prompt_logprobs is None else torch.tensor(out.prompt_logprobs),
                }
        return results


def _write_checkpoint(final: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write into a temporary folder, then swap it in whole: no half checkpoint is ever visible."""
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / "adapter.safetensors"))
    (tmp / "tinkercloud.json").write_text(json.dumps(meta, indent=1))
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()

