"""The attention core of our layers: torch's fused scaled_dot_product_attention.

A drop-in for megatron-core's `DotProductAttention` in the local (no Transformer Engine) layer
spec: same constructor, same `forward(query, key, value, attention_mask, ...)` on [s, b, heads,
head_dim] tensors of this tensor-parallel rank's heads, same [s, b, heads * head_dim] result.
mcore's own version materialises the [b, heads, s, s] scores and softmax in separate kernels;
`F.scaled_dot_product_attention` runs flash / memory-efficient kernels (on GPUs and on CPU).

`attention_mask` None means plain causal attention (`is_causal`, the fastest kernels);
otherwise it is a bool mask broadcastable to [b, 1, s, s] with mcore's meaning (True =
masked), e.g. the block-diagonal masks of packed rows, turned into SDPA's additive float mask
once for all layers (`additive_mask`). Dropout, sliding windows, softmax
variants and packed-sequence params are refused rather than silently ignored.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule

from backends.miles.tensor_memo import TensorMemo


class SdpaAttention(MegatronModule):
    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None) -> None:
        super().__init__(config=config)
        from megatron.core import parallel_state

        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout or config.window_size is not None or getattr(config, "softmax_type", "vanilla") != "vanilla":
            raise ValueError("SdpaAttention supports no attention dropout, sliding window or softmax variant")
        if config.context_parallel_size != 1:
            raise ValueError("SdpaAttention does not support context parallelism")
        tp = pg_collection.tp.size() if pg_collection is not None else \
            parallel_state.get_tensor_model_parallel_world_size()
        self.heads = config.num_attention_heads // tp
        self.groups = config.num_query_groups // tp
        # mcore's query-key layer scaling divides the scale by the layer number and the softmax
        # multiplies it back: a no-op overall, so the plain scale is the same attention.
        self.scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None) -> torch.Tensor:
        if attention_bias is not None or packed_seq_params is not None:
            raise ValueError("SdpaAttention takes no attention bias or packed-sequence params")
        seq, batch = query.shape[:2]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads or groups, s, d]
        # CUDA's flash kernel (bf16/fp16) reads each group's K/V for its heads itself (no copies);
        # on CPU, in float32 and with a mask, the groups are repeated out to one K/V per head.
        gqa = (self.heads != self.groups and q.is_cuda and attention_mask is None
               and q.dtype in (torch.float16, torch.bfloat16))
        if self.heads != self.groups and not gqa:
            k = k.repeat_interleave(self.heads // self.groups, dim=1)
            v = v.repeat_interleave(self.heads // self.groups, dim=1)
        context = F.scaled_dot_product_attention(
            q, k, v, attn_mask=None if attention_mask is None else additive_mask(attention_mask, q.dtype),
            is_causal=attention_mask is None, scale=self.scale, enable_gqa=gqa)  # [b, heads, s, d]
        return context.permute(2, 0, 1, 3).reshape(seq, batch, -1)


_masks = TensorMemo()


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """mcore's bool mask (True = masked) as the additive float mask SDPA makes of a bool one (0
    where attended, -inf where not), made once per mask tensor: a forward pass hands every layer
    the same mask, so one conversion and one copy saved for backward serve all layers, where SDPA
    converted (and autograd kept) one [rows, 1, s, s] float mask per layer."""
    return _masks.get(mask, dtype, lambda: torch.zeros(mask.shape, dtype=dtype, device=mask.device)
                      .masked_fill_(mask, float("-inf")))
