"""SwiGLU for eager layers: the same arithmetic as megatron-core's, with one gradient buffer.

megatron-core's unfused MLP activation (no Transformer Engine, `bias_activation_fusion` off)
splits fc1's output with `torch.chunk`, adds `glu_linear_offset` (0.0) to the linear half and
multiplies. Under autograd that costs a copy of the linear half for the `+ 0.0` (held until the
backward pass) and, in the backward pass, a `torch.cat` of the two halves' gradients into fc1's
gradient: on a CPU training step of skyrl-tiny the cats alone were about 6 % of the step.

`swiglu` is megatron-core's activation slot for such a function (`use_te_activation_func`,
`MLPSubmodules.activation_func`; `hf_checkpoint` leaves the offset at 0.0 and sets no clamp):
silu(gate) * linear, whose backward writes both halves' gradients into one buffer shaped like
fc1's output, with the eager ops autograd would run (`mul`, `silu_backward`). Values and
gradients are bit for bit the eager chain's (tests/test_swiglu.py); it keeps fc1's output and
silu(gate), where the chain kept silu(gate) and the copy. Without gradients (the sampler), and
inside a compiled graph (whose compiler fuses the plain ops itself), it is the plain product.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """silu(x's first half) * its second half, over the last dimension."""
    if torch.is_grad_enabled() and x.requires_grad and not torch.compiler.is_compiling():
        return _SwiGLU.apply(x)
    gate, linear = torch.chunk(x, 2, dim=-1)
    return F.silu(gate) * linear


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        gate, linear = torch.chunk(x, 2, dim=-1)
        silu_gate = F.silu(gate)
        ctx.save_for_backward(x, silu_gate)
        return silu_gate * linear

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        x, silu_gate = ctx.saved_tensors
        gate, linear = torch.chunk(x, 2, dim=-1)
        grad_x = torch.empty_like(x)
        grad_gate, grad_linear = torch.chunk(grad_x, 2, dim=-1)
        torch.mul(grad, silu_gate, out=grad_linear)
        torch.ops.aten.silu_backward.grad_input(grad * linear, gate, grad_input=grad_gate)
        return grad_x


def use_swiglu(spec, config) -> None:
    """Route a local GPT layer spec's MLP activation through `swiglu` (a SwiGLU config only)."""
    if not (config.gated_linear_unit and config.activation_func is F.silu and config.glu_linear_offset == 0.0
            and config.activation_func_clamp_value is None and not config.bias_activation_fusion):
        return
    spec.submodules.mlp.submodules.activation_func = swiglu
    config.use_te_activation_func = True  # megatron-core's name for "the spec's activation_func"
