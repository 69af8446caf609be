"""Reads a Hugging Face Llama/Qwen3 checkpoint into a megatron-core GPTModel (this rank's shards).

Three pieces: the HF `config.json` -> (`TransformerConfig`, GPTModel keyword arguments);
the row layouts of mcore's fused tensor-parallel weights (`qkv_shard`, `gate_up_shard`,
shared with the LoRA code so an adapter's factors line up with the base weight); and
`load_hf_weights`, which reads only this rank's slices from the safetensors files.

Layouts (HF name -> mcore name, per tensor-parallel rank r of tp):
- q_proj, k_proj, v_proj -> `linear_qkv`: for each KV group g owned by r (groups are split
  contiguously over ranks), rows [q heads of g; k head g; v head g].
- gate_proj, up_proj -> `linear_fc1`: [gate rows of r; up rows of r].
- o_proj, down_proj -> `linear_proj`, `linear_fc2`: input columns split contiguously.
- embed_tokens, lm_head -> `embedding.word_embeddings`, `output_layer`: vocab rows split
  contiguously; rows past the HF vocabulary (padding) are zero.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig
from safetensors import safe_open

from backends.miles.load_progress import LoadProgress
from backends.miles.parallel import dp_rank, pp_rank, pp_size, tp_rank, tp_size

SUPPORTED_ARCHITECTURES = {"Qwen3ForCausalLM": True, "LlamaForCausalLM": False}  # -> qk_layernorm

# megatron-core's llama3 RoPE scaling takes only `factor`; these three are fixed inside it.
_MCORE_LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def read_hf_config(model_dir: str | Path) -> dict:
    return json.loads((Path(model_dir) / "config.json").read_text())


def transformer_config_from_hf(hf_cfg: dict, *, tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1,
                               dtype: torch.dtype = torch.float32, recompute: str = "none",
                               ) -> tuple[TransformerConfig, dict]:
    """The mcore TransformerConfig and GPTModel keyword arguments for an HF config.

    `gpt_kwargs["vocab_size"]` is the HF vocabulary; the caller pads it when tp requires.
    `dtype` is the base weights' (and the activations') dtype; `recompute` is "none",
    "selective" (recompute the attention core in backward) or "full" (every layer's forward).
    Pipeline stages exchange activations whose shapes vary per micro-batch.
    """
    arch = (hf_cfg.get("architectures") or [None])[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"unsupported architecture {arch!r}; supported: {sorted(SUPPORTED_ARCHITECTURES)}")
    if hf_cfg.get("attention_bias") or hf_cfg.get("mlp_bias"):
        raise ValueError(f"{arch} with attention_bias/mlp_bias is not supported")
    if hf_cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"unsupported hidden_act {hf_cfg['hidden_act']!r}; only silu")
    if hf_cfg.get("use_sliding_window"):
        raise ValueError("sliding-window attention is not supported")
    num_heads = hf_cfg["num_attention_heads"]
    config = TransformerConfig(
        num_layers=hf_cfg["num_hidden_layers"],
        hidden_size=hf_cfg["hidden_size"],
        num_attention_heads=num_heads,
        num_query_groups=hf_cfg.get("num_key_value_heads") or num_heads,
        kv_channels=hf_cfg.get("head_dim") or hf_cfg["hidden_size"] // num_heads,
        ffn_hidden_size=hf_cfg["intermediate_size"],
        normalization="RMSNorm",
        layernorm_epsilon=hf_cfg.get("rms_norm_eps", 1e-6),
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        qk_layernorm=SUPPORTED_ARCHITECTURES[arch],
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cpu_initialization=True,
        perform_initialization=False,  # every weight is overwritten by load_hf_weights
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        pipeline_dtype=dtype,
        variable_seq_lengths=True,
        moe_token_dispatcher_type="alltoall",  # dense models: only satisfies a check on variable_seq_lengths
        calculate_per_token_loss=True,  # the pipeline schedule must not rescale our summed losses
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        tensor_model_parallel_size=tensor_parallel_size,
        pipeline_model_parallel_size=pipeline_parallel_size,
        **_recompute_kwargs(recompute),
    )
    if config.num_layers % pipeline_parallel_size:
        raise ValueError(f"{config.num_layers} layers do not split into {pipeline_parallel_size} pipeline stages")
    gpt_kwargs = dict(
        vocab_size=hf_cfg["vocab_size"],
        max_sequence_length=hf_cfg["max_position_embeddings"],
        position_embedding_type="rope",
        share_embeddings_and_output_weights=bool(hf_cfg.get("tie_word_embeddings", False)),
        **_rope_kwargs(hf_cfg),
    )
    return config, gpt_kwargs


def _recompute_kwargs(recompute: str) -> dict:
    if recompute == "none":
        return {}
    if recompute == "selective":
        return {"recompute_granularity": "selective"}
    if recompute == "full":
        return {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
    raise ValueError(f"recompute must be none, selective or full, got {recompute!r}")


def _rope_kwargs(hf_cfg: dict) -> dict:
    # transformers 5 writes `rope_parameters`; older checkpoints `rope_theta` + `rope_scaling`.
    rope = {**(hf_cfg.get("rope_parameters") or {}), **(hf_cfg.get("rope_scaling") or {})}
    theta = float(rope.get("rope_theta", hf_cfg.get("rope_theta", 10000.0)))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        return {"rotary_base": theta}
    if rope_type == "llama3":
        for key, fixed in _MCORE_LLAMA3_FIXED.items():
            if float(rope.get(key, fixed)) != fixed:
                raise ValueError(f"llama3 rope scaling with {key}={rope[key]} is unsupported (mcore fixes {fixed})")
        return {"rotary_base": theta, "rope_scaling": True, "rope_scaling_factor": float(rope["factor"])}
    raise ValueError(f"unsupported rope scaling type {rope_type!r}; supported: default, llama3")


def qkv_shard(q, k, v, config: TransformerConfig, tp: int, rank: int) -> torch.Tensor:
    """This rank's rows of mcore's fused `linear_qkv` from HF-layout q, k, v row blocks.

    q, k, v may be tensors or lazy safetensors slices (anything sliceable by rows).
    """
    head_dim = config.kv_channels
    q_rows = config.num_attention_heads // config.num_query_groups * head_dim
    groups_per_rank = config.num_query_groups // tp
    parts = []
    for g in range(rank * groups_per_rank, (rank + 1) * groups_per_rank):
        kv = slice(g * head_dim, (g + 1) * head_dim)
        parts += [q[g * q_rows : (g + 1) * q_rows], k[kv], v[kv]]
    return torch.cat(parts)


def gate_up_shard(gate, up, config: TransformerConfig, tp: int, rank: int) -> torch.Tensor:
    """This rank's rows of mcore's `linear_fc1`: [gate shard; up shard]."""
    n = config.ffn_hidden_size // tp
    return torch.cat([gate[rank * n : (rank + 1) * n], up[rank * n : (rank + 1) * n]])


class _SafetensorsReader:
    """Lazy access to the tensors of a (possibly sharded) safetensors checkpoint."""

    def __init__(self, model_dir: Path, stack: contextlib.ExitStack):
        index = model_dir / "model.safetensors.index.json"
        if index.exists():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = sorted(p.name for p in model_dir.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors in {model_dir}")
        self._handles = {}
        for file in files:
            handle = stack.enter_context(safe_open(model_dir / file, framework="pt"))
            self._handles.update({name: handle for name in handle.keys()})

    def slice(self, name: str):
        if name not in self._handles:
            raise KeyError(f"checkpoint has no tensor {name!r}")
        return self._handles[name].get_slice(name)

    def tensor(self, name: str) -> torch.Tensor:
        return self.slice(name)[:]


def load_hf_weights(model: torch.nn.Module, model_dir: str | Path) -> None:
    """Fill every parameter of an mcore GPTModel with this rank's slice of the HF weights.

    The model may be one pipeline stage: it then holds the embedding only on the first stage,
    the final norm and output layer only on the last, and its own layers (numbered locally,
    `layer_number` global). Only this rank's tensors (and slices of them) are read."""
    config: TransformerConfig = model.config
    tp, rank = tp_size(), tp_rank()
    model_dir = Path(model_dir)
    hf_cfg = read_hf_config(model_dir)
    vocab = hf_cfg["vocab_size"]

    def columns(w, full: int) -> torch.Tensor:
        n = full // tp
        return w[:, rank * n : (rank + 1) * n]

    def vocab_rows(w) -> torch.Tensor:
        n = model.vocab_size // tp  # padded vocabulary / tp
        rows = w[rank * n : min((rank + 1) * n, vocab)]
        return F.pad(rows, (0, 0, 0, n - rows.shape[0]))

    with contextlib.ExitStack() as stack:
        ckpt = _SafetensorsReader(model_dir, stack)
        sources = {}
        if model.pre_process:
            sources["embedding.word_embeddings.weight"] = lambda: vocab_rows(ckpt.slice("model.embed_tokens.weight"))
        if model.post_process:
            sources["decoder.final_layernorm.weight"] = lambda: ckpt.tensor("model.norm.weight")
            if not model.share_embeddings_and_output_weights:  # untied, or tied but on its own stage
                unembed = "model.embed_tokens.weight" if hf_cfg.get("tie_word_embeddings") else "lm_head.weight"
                sources["output_layer.weight"] = lambda: vocab_rows(ckpt.slice(unembed))
        for i, layer in enumerate(model.decoder.layers):
            sources.update(_layer_sources(ckpt, config, i, layer.layer_number - 1, tp, rank, columns))

        params = dict(model.named_parameters())
        missing = sorted(set(params) - set(sources))
        unexpected = sorted(set(sources) - set(params))
        if missing or unexpected:
            raise RuntimeError(f"HF->mcore mapping mismatch: unfilled {missing}, unknown {unexpected}")
        # The first rank of each pipeline stage reports its stage's load.
        stage = f" (pipeline stage {pp_rank() + 1}/{pp_size()})" if pp_size() > 1 else ""
        reporter = 0 if rank == 0 and dp_rank() == 0 else 1
        with torch.no_grad(), LoadProgress(f"loading {model_dir}{stage}", total=len(sources), unit="tensors",
                                           rank=reporter) as progress:
            for name, read in sources.items():
                value = read()
                if value.shape != params[name].shape:
                    shapes = f"checkpoint gives {tuple(value.shape)}, model has {tuple(params[name].shape)}"
                    raise RuntimeError(f"{name}: {shapes}")
                params[name].copy_(value)
                progress.advance()


def _layer_sources(ckpt: _SafetensorsReader, config: TransformerConfig, i: int, hf_i: int, tp: int, rank: int,
                   columns) -> dict:
    """mcore parameter (local layer i) -> reader of its slice of HF layer hf_i."""
    hf, mc = f"model.layers.{hf_i}.", f"decoder.layers.{i}."
    attn, mlp = hf + "self_attn.", hf + "mlp."
    sources = {
        mc + "input_layernorm.weight": lambda: ckpt.tensor(hf + "input_layernorm.weight"),
        mc + "self_attention.linear_qkv.weight": lambda: qkv_shard(
            ckpt.slice(attn + "q_proj.weight"), ckpt.slice(attn + "k_proj.weight"), ckpt.slice(attn + "v_proj.weight"),
            config, tp, rank,
        ),
        mc + "self_attention.linear_proj.weight": lambda: columns(
            ckpt.slice(attn + "o_proj.weight"), config.num_attention_heads * config.kv_channels
        ),
        mc + "pre_mlp_layernorm.weight": lambda: ckpt.tensor(hf + "post_attention_layernorm.weight"),
        mc + "mlp.linear_fc1.weight": lambda: gate_up_shard(
            ckpt.slice(mlp + "gate_proj.weight"), ckpt.slice(mlp + "up_proj.weight"), config, tp, rank
        ),
        mc + "mlp.linear_fc2.weight": lambda: columns(ckpt.slice(mlp + "down_proj.weight"), config.ffn_hidden_size),
    }
    if config.qk_layernorm:
        sources[mc + "self_attention.q_layernorm.weight"] = lambda: ckpt.tensor(attn + "q_norm.weight")
        sources[mc + "self_attention.k_layernorm.weight"] = lambda: ckpt.tensor(attn + "k_norm.weight")
    return sources
