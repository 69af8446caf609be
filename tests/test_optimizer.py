"""AdapterOptimizer's gradient norm and clipping, on plain tensors (no model, no process group)."""
from __future__ import annotations

import math

import pytest


@pytest.mark.parametrize("scale", [1.0, 1e-25, 1e19])
def test_grad_norm_is_the_float64_norm_at_any_scale_and_clipping_uses_it(scale):
    """The norm is exact in float64 even where float32 squares would underflow (1e-25) or
    overflow (1e19), so clipping never turns a step into zeros or weight decay alone."""
    import torch

    from backends.common.optimizer import AdapterOptimizer

    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(shape)) for shape in ((8, 64), (64, 8), (3,))]
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator) * scale
    expected = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in params))
    optimizer = AdapterOptimizer([(f"p{i}", p, i == 0) for i, p in enumerate(params)])
    assert optimizer.grad_norm() == pytest.approx(expected, rel=1e-12)
    grads = [p.grad.clone() for p in params]
    before = [p.detach().clone() for p in params]
    metrics = optimizer.step(dict(learning_rate=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0,
                                  grad_clip_norm=1.0))
    assert metrics["grad_norm:mean"] == pytest.approx(expected, rel=1e-12)
    # AdamW's first step moves every element by about lr in the direction of its gradient's sign
    for p, b, g in zip(params, before, grads):
        moved = (p.detach() - b)[g != 0]
        assert torch.isfinite(moved).all() and (moved.sign() == -g[g != 0].sign()).all()
