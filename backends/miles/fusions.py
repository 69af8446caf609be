"""Fused kernels for the elementwise parts of our layers, compiled by torch.compile.

Without Transformer Engine or apex, megatron-core's local layers run RMSNorm, RoPE and SwiGLU as
chains of small kernels (RoPE alone: about a dozen per call, cos/sin recomputed each time), and
on a GPU those launches and memory passes cost about as much as the matrix products (an 8B
training step on an H100 spent ~110 ms in them against 120 ms of products). Compiling each
of the three into one kernel (forward and backward) is what `kernels="compiled"` does:

- RMSNorm: the layers' norms are `CompiledRMSNorm`, torch.nn.RMSNorm's arithmetic (all in
  float32, then one cast to the activations' dtype) in one compiled function; same parameter,
  same state-dict key. (Eager, torch has a fused RMSNorm kernel of its own, which it takes since
  the norm weights are held in the model's dtype: `model._norm_weights_in`.)
- SwiGLU: megatron-core's own fused SwiGLU (`bias_activation_fusion`; its `jit_fuser` is
  torch.compile), with its hand-written backward.
- RoPE: megatron-core's unfused `_apply_rotary_pos_emb_bshd`, compiled. Its attention module's
  `apply_rotary_pos_emb` is routed through `_rope` once per process, which takes the compiled
  one for models built with `kernels="compiled"` and, for the others, `_eager_rope`: the same
  arithmetic as megatron-core's, with cos/sin made once per forward pass instead of for every q
  and k of every layer.

The arithmetic is the eager one; only rounding inside a fused kernel may differ (float32:
within 1e-5, tests/test_fusions.py; bf16: closer to float32 than eager, one rounding per kernel).
An option, not the default: on an H100 it cut an 8B step's device time by 44 % (with bf16 LoRA
products) but not its wall time, which the host bounds at batch 2 x 1024, and the first step
pays the compilation (BENCHMARKS.md, GPU results).

`kernels="compiled_layers"` goes further for that host bound: each decoder layer, as built
(eager norms, RoPE, SwiGLU, SDPA and the LoRA wrappers), is compiled whole (`compile_layers`),
so a layer is one graph forward and one backward and the compiler fuses the elementwise work
itself. Nothing in a layer may split the graph: `TensorMemo` makes its value inside the graph,
and the LoRA layers pass megatron-core its tensor-parallel group (without one it warns at every
call, which dynamo cannot trace). tests/test_fusions.py checks eager's results, tp=2, no graph
breaks and one set of graphs for every adapter. Sampling does not use them: the sampler walks a
layer's parts itself around its K/V cache (compiling those parts measured slower on CPU).
"""
from __future__ import annotations

import torch

from backends.miles.tensor_memo import TensorMemo
from engine.config import KERNELS


def check_kernels(kernels: str, device: torch.device | str) -> None:
    """Refuses an unknown choice, and compiled kernels on a GPU without Triton (their compiler)."""
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
    if kernels != "eager" and torch.device(device).type == "cuda" and not _has_triton():
        raise ValueError("compiled kernels on a GPU need Triton, which is not installed")


def _has_triton() -> bool:
    try:
        from torch.utils._triton import has_triton
    except ImportError:
        return False
    return has_triton()


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """torch.rms_norm as it runs for our layers (activations and weights float32 or bf16):
    everything in float32, one cast back to the activations' dtype at the end."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


_compiled_rms_norm = torch.compile(_rms_norm, dynamic=True)
# Each compiled function keeps one graph per grad mode (training, no_grad, inference) and per
# 1-vs-more rows; past torch's default of 8 it would silently fall back to eager.
RECOMPILE_LIMIT = 64


class CompiledRMSNorm(torch.nn.RMSNorm):
    """torch.nn.RMSNorm computed by one compiled kernel; built like megatron-core's norms
    (`config, hidden_size, eps`, the rest ignored as `WrappedTorchNorm` ignores it)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_ignored):
        if config.normalization != "RMSNorm":
            raise ValueError(f"CompiledRMSNorm is an RMSNorm, the model asks for {config.normalization}")
        super().__init__(hidden_size, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One rank (2-D) for every caller: the layers' [s, b, h] and the q/k norms' [s, b, heads, d].
        return _compiled_rms_norm(x.reshape(-1, x.shape[-1]), self.weight, self.eps).view(x.shape)


def route_rope() -> None:
    """Make megatron-core's attention call `_rope` for RoPE (idempotent; `build_model` calls it)."""
    from megatron.core.transformer import attention

    if attention.apply_rotary_pos_emb is not _rope:
        global _megatron_rope
        _megatron_rope = attention.apply_rotary_pos_emb
        attention.apply_rotary_pos_emb = _rope


_megatron_rope = None
_compiled_rope_bshd = None


def _rope(t, freqs, config, cu_seqlens=None, mscale: float = 1.0, cp_group=None):
    """RoPE for megatron-core's attention: the compiled kernel for models built with compiled
    kernels, else `_eager_rope`; packed (thd) or multi-latent inputs, and configs that ask for
    Transformer Engine's fused RoPE, go to megatron-core's own."""
    if cu_seqlens is not None or config.multi_latent_attention or config.apply_rope_fusion:
        return _megatron_rope(t, freqs, config=config, cu_seqlens=cu_seqlens, mscale=mscale, cp_group=cp_group)
    if not getattr(config, "compiled_rope", False):
        return _eager_rope(t, freqs, config.rotary_interleaved, mscale)
    global _compiled_rope_bshd
    if _compiled_rope_bshd is None:
        from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

        _compiled_rope_bshd = torch.compile(_apply_rotary_pos_emb_bshd, dynamic=True)
    return _compiled_rope_bshd(t, freqs, rotary_interleaved=config.rotary_interleaved,
                               multi_latent_attention=False, mscale=mscale)


def _eager_rope(t: torch.Tensor, freqs: torch.Tensor, interleaved: bool, mscale: float) -> torch.Tensor:
    """megatron-core's unfused RoPE, the same arithmetic, less work: megatron-core recomputes
    cos(freqs) and sin(freqs), scales and casts them for every q and k of every layer (six kernels
    a call), and copies the rotated head into a new tensor even when nothing is left unrotated.
    Here cos/sin are made once per `freqs` tensor (a forward pass hands every layer the same one)
    and the copy happens only for a partial rotation."""
    from megatron.core.models.common.embeddings.rope_utils import _rotate_half

    cos, sin = _cos_sin(freqs, t.dtype, mscale)
    rot = freqs.shape[-1]
    if rot == t.shape[-1]:
        return (t * cos) + (_rotate_half(t, interleaved) * sin)
    head, rest = t[..., :rot], t[..., rot:]
    return torch.cat(((head * cos) + (_rotate_half(head, interleaved) * sin), rest), dim=-1)


_cos_sin_tables = TensorMemo()


def _cos_sin(freqs: torch.Tensor, dtype: torch.dtype, mscale: float) -> tuple[torch.Tensor, torch.Tensor]:
    def make():
        return (torch.cos(freqs) * mscale).to(dtype), (torch.sin(freqs) * mscale).to(dtype)

    return _cos_sin_tables.get(freqs, (dtype, mscale), make)


def compile_layer_spec(spec, config) -> None:
    """Switch a local GPT layer spec (and its config) to the compiled kernels, in place."""
    config.bias_activation_fusion = True
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    config.compiled_rope = True  # read by `_rope`
    spec.submodules.input_layernorm = CompiledRMSNorm
    spec.submodules.pre_mlp_layernorm = CompiledRMSNorm
    if config.qk_layernorm:
        attention = spec.submodules.self_attention.submodules
        attention.q_layernorm = attention.k_layernorm = CompiledRMSNorm


def compile_layers(model) -> None:
    """`kernels="compiled_layers"`: each decoder layer of a built model (eager modules, LoRA
    included) runs as one compiled graph forward and one backward. The layers share their graphs
    (torch.compile treats their parameters as inputs); what makes a new one is the layer's input
    needing gradients or not (the first layer's input does not), grad mode, a new shape after the
    first (then one graph for all lengths; the same for LoRA ranks), and how many adapters a batch
    mixes; never an adapter's name (`LoraLinear._active_adapters`) or its scale (a tensor in the graph).
    With `recompute="full"` a layer stays one graph (recomputed whole); "selective" recomputes the
    attention core through megatron-core's checkpoint inside the layer, which splits its graph.
    Past RECOMPILE_LIMIT graphs torch runs the layer eagerly: the same results, more slowly."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    # LoRA factors are parameters, whose shapes torch.compile otherwise takes as constants: every
    # new rank would compile the layers again; this way the second rank seen makes it a variable.
    torch._dynamo.config.force_parameter_static_shapes = False
    for layer in model.decoder.layers:
        layer.compile()

