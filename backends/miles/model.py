"""Builds the frozen base GPTModel from an HF checkpoint and scores tokens with it.

`build_model` gives this rank's tensor-parallel shard of the model (base weights frozen;
LoRA adapters live in `lora.py`); `token_logprobs` turns a batch of token rows into
per-token log p(target) (one target per position, or K for top-K losses), straight from the
vocab-parallel logits; `ModelInfo` holds the facts
about a model that callers need without building it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

from backends.miles.attention import SdpaAttention
from backends.miles.fusions import check_kernels, compile_layer_spec, compile_layers, route_rope
from backends.miles.hf_checkpoint import load_hf_weights, read_hf_config, transformer_config_from_hf
from backends.miles.parallel import is_first_stage, is_last_stage, pp_size, tp_rank, tp_size
from backends.miles.swiglu import use_swiglu


@dataclass(frozen=True)
class ModelInfo:
    architecture: str
    vocab_size: int
    max_context: int
    eos_token_ids: tuple[int, ...]

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "ModelInfo":
        hf_cfg = read_hf_config(model_dir)
        eos: list[int] = []
        generation_config = Path(model_dir) / "generation_config.json"
        sources = [hf_cfg.get("eos_token_id")]
        if generation_config.exists():
            sources.append(json.loads(generation_config.read_text()).get("eos_token_id"))
        for ids in sources:
            for token in [ids] if isinstance(ids, int) else ids or []:
                if token not in eos:
                    eos.append(token)
        return cls(
            architecture=hf_cfg["architectures"][0],
            vocab_size=hf_cfg["vocab_size"],
            max_context=hf_cfg["max_position_embeddings"],
            eos_token_ids=tuple(eos),
        )


def build_model(model_dir: str | Path, device: torch.device | str, dtype: torch.dtype = torch.float32,
                recompute: str = "none", random_weights: bool = False, kernels: str = "eager") -> GPTModel:
    """This rank's shard of the HF model as an mcore GPTModel, base weights frozen.

    Needs `parallel.init_distributed` first. The shard is this rank's tensor-parallel slice of
    its pipeline stage (the embedding on the first stage, final norm and output layer on the
    last). When tp does not divide the vocabulary, the embedding and output layer get zero rows
    up to the next multiple of tp; `token_logprobs` masks them out
    (`model.unpadded_vocab_size` records the real size). `random_weights` skips the checkpoint
    (only its config.json is read): every matrix N(0, 0.02), every norm 1, drawn on `device`, for
    throughput benchmarks of a model shape whose weights do not matter. `kernels`: "compiled" fuses
    RMSNorm, RoPE and SwiGLU with torch.compile, "compiled_layers" compiles each whole decoder
    layer (`fusions.py`), "eager" does neither.
    """
    config, gpt_kwargs = transformer_config_from_hf(
        read_hf_config(model_dir), tensor_parallel_size=tp_size(), pipeline_parallel_size=pp_size(), dtype=dtype,
        recompute=recompute)
    vocab = gpt_kwargs.pop("vocab_size")
    if pp_size() > 1:
        # Tied embeddings across stages would make megatron sync the two copies at build time (on
        # CUDA only); the weights are frozen, so the last stage simply loads its own copy.
        gpt_kwargs["share_embeddings_and_output_weights"] = False
    padded_vocab = -(-vocab // tp_size()) * tp_size()
    spec = get_gpt_layer_local_spec(qk_layernorm=config.qk_layernorm, normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = SdpaAttention
    check_kernels(kernels, device)
    route_rope()
    if kernels == "compiled":
        compile_layer_spec(spec, config)
    use_swiglu(spec, config)  # eager SwiGLU with one gradient buffer (not with the compiled one above)
    model = GPTModel(config, spec, vocab_size=padded_vocab, pre_process=is_first_stage(),
                     post_process=is_last_stage(), **gpt_kwargs)
    if random_weights:
        model.to(device)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("layernorm.weight"):
                    param.fill_(1.0)
                else:
                    param.normal_(0.0, 0.02)
    else:
        load_hf_weights(model, model_dir)
    _norm_weights_in(model, dtype)
    model.requires_grad_(False)
    if recompute == "full" and model.pre_process:
        # A recomputed layer only gets gradients if its input requires them, and the frozen
        # embedding's output does not: without this the adapters of every layer get none.
        model.embedding.register_forward_hook(_inputs_require_grad)
    if model.post_process:
        model.output_layer.register_forward_hook(_contiguous_logits_grad)
    model.unpadded_vocab_size = vocab
    model = model.to(device)
    if kernels == "compiled_layers":
        compile_layers(model)
    return model


def _norm_weights_in(model: GPTModel, dtype: torch.dtype) -> None:
    """RMSNorm weights in the model's dtype, as Hugging Face loads them: megatron-core's torch
    norms make them float32 whatever `params_dtype` says, and torch.rms_norm runs its fused
    kernel only when input and weight dtypes match (else about six kernels forward and more
    backward per norm, on a GPU; Qwen3-8B has 145 norms per forward pass). Same values for a
    bf16 checkpoint (torch computes in float32 either way and rounds once)."""
    for module in model.modules():
        if isinstance(module, torch.nn.RMSNorm) and module.weight is not None and module.weight.dtype != dtype:
            module.weight.data = module.weight.data.to(dtype)


def _contiguous_logits_grad(module, args, output) -> None:
    """GPTModel returns logits transposed to [b, s, vocab], so their gradient reaches the output
    layer as a non-contiguous [s, b, vocab] view. With a frozen weight, torch.matmul then refuses
    to fold it into one matrix product and instead expands the weight to [s, vocab, hidden] and
    runs a batched product: 57% of an 8B training step on an H100, most of a CPU step of the
    embedded model. A gradient hook hands the layer a contiguous copy: one mm. (At tp=1 the LoRA
    wrapper computes the frozen product itself, `LoraLinear._base`, and autograd's own matmul
    backward folds the gradient into one mm as well; the hook matters where megatron-core's
    layer runs.)"""
    logits = output[0]
    if torch.is_grad_enabled() and logits.requires_grad:
        logits.register_hook(torch.Tensor.contiguous)


def _inputs_require_grad(module, args, output: torch.Tensor) -> torch.Tensor:
    return output.requires_grad_(True) if torch.is_grad_enabled() and not output.requires_grad else output


def token_logprobs(model: GPTModel, tokens: torch.Tensor, targets: torch.Tensor,
                   attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """log p(targets[b, t] | tokens[b, :t+1]) as float32 [b, s]; differentiable; exact under TP.
    With targets [b, s, K] (K candidate tokens per position) the result is [b, s, K].
    `attention_mask` ([b or 1, 1, s, s] bool, True = masked) replaces the plain causal mask,
    e.g. a block-diagonal one for rows that pack several sequences.

    Any LoRA routing (`LoraManager.route`) must be active around this call.
    """
    return logprobs_from_logits(model, forward(model, tokens, attention_mask), targets)


def forward(model: GPTModel, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The model on token rows [b, s]: logits [b, s, vocab / tp] from the last pipeline stage,
    hidden states [s, b, hidden] from the others (whose input comes from `set_input_tensor`).
    No `attention_mask`: plain causal attention."""
    batch, seq_len = tokens.shape
    position_ids = torch.arange(seq_len, device=tokens.device).expand(batch, seq_len)
    return model(tokens, position_ids, attention_mask)


def logprobs_from_logits(model: GPTModel, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """`token_logprobs` from this rank's vocabulary shard of the logits."""
    local_vocab = logits.shape[-1]
    first_padded = model.unpadded_vocab_size - tp_rank() * local_vocab
    if first_padded < local_vocab:
        is_padding = torch.arange(local_vocab, device=logits.device) >= first_padded
        logits = logits.masked_fill(is_padding, float("-inf"))
    if targets.dim() == 3:
        return _many_target_logprobs(logits.float(), targets)
    return -vocab_parallel_cross_entropy(logits.float(), targets)


def _many_target_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits)[..., targets] for targets [b, s, K], from this rank's vocab shard.

    The normaliser log(sum exp) is summed over the TP ranks, and so is each target's logit
    (only the rank holding it contributes); mcore's all-reduce copies gradients back, so the
    result and its gradient are those of the full-vocabulary log-softmax.
    """
    local_vocab = logits.shape[-1]
    group = parallel_state.get_tensor_model_parallel_group()
    peak = logits.detach().amax(-1, keepdim=True)
    if tp_size() > 1:
        dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
    shifted = logits - peak
    log_normaliser = reduce_from_tensor_model_parallel_region(shifted.exp().sum(-1), group=group).log()
    local = targets - tp_rank() * local_vocab
    here = (local >= 0) & (local < local_vocab)
    picked = torch.where(here, shifted.gather(-1, local.clamp(0, local_vocab - 1)), 0.0)
    return reduce_from_tensor_model_parallel_region(picked.contiguous(), group=group) - log_normaliser[..., None]
