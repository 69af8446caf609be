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


def test_the_fused_update_gpus_take_is_adamw_like_the_foreach_one_and_restores_its_state():
    """GPUs take torch's fused AdamW (one kernel), CPUs the foreach one: the same AdamW to float32
    rounding over several steps, and the fused one resumes exactly from its saved moments (its step
    count lives on the parameters' device). torch runs the fused kernel on CPU too, so this checks
    it here."""
    import torch

    from backends.common.optimizer import AdapterOptimizer

    adam = dict(learning_rate=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, grad_clip_norm=0.0)
    shapes = ((8, 64), (64, 8), (3,))

    def run(fused: bool, steps: int, start=None, first=0):
        generator = torch.Generator().manual_seed(1)
        params = [torch.nn.Parameter(torch.randn(s, generator=generator)) for s in shapes]
        optimizer = AdapterOptimizer([(f"p{i}", p, False) for i, p in enumerate(params)], fused=fused)
        if start is not None:
            with torch.no_grad():
                for p, w in zip(params, start[0]):
                    p.copy_(w)
            optimizer.load_moments(start[1])
        for k in range(steps):
            grads = torch.Generator().manual_seed(100 + first + k)  # step i's gradients, wherever it runs
            for p in params:
                p.grad = torch.randn(p.shape, generator=grads)
            optimizer.step(adam)
        return [p.detach().clone() for p in params], optimizer.moments(), optimizer

    fused, fused_moments, opt = run(True, 3)
    assert opt.fused and opt.opt.defaults["fused"]
    foreach, _, opt = run(False, 3)
    assert not opt.fused and opt.opt.defaults["foreach"]
    for a, b in zip(fused, foreach):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # 3 steps, saved and restored into a new optimizer, 2 more == 5 steps in one go
    straight, _, _ = run(True, 5)
    resumed, _, opt = run(True, 2, start=(fused, fused_moments), first=3)
    assert all(torch.equal(a, b) for a, b in zip(straight, resumed))
    assert all(float(v) == 5.0 for v in opt.moments()["step"].values())
