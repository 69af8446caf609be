"""AdamW over one adapter's parameters, with Tinker's AdamParams applied at every step.

The global gradient norm (for `grad_clip_norm` and the reported metric) counts a
tensor-parallel shard once per rank and a replicated tensor once in total.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist


class AdapterOptimizer:
    def __init__(self, params: list[tuple[str, torch.nn.Parameter, bool]], tp_group=None) -> None:
        self.params = params
        self.tp_group = tp_group
        self.opt = torch.optim.AdamW([p for _, p, _ in params], lr=0.0)
        self.steps = 0

    def grad_norm(self) -> float:
        sharded = torch.zeros((), dtype=torch.float64)
        replicated = torch.zeros((), dtype=torch.float64)
        for _, p, is_sharded in self.params:
            if p.grad is not None:
                sq = p.grad.detach().double().pow(2).sum().cpu()
                if is_sharded:
                    sharded += sq
                else:
                    replicated += sq
        if self.tp_group is not None and dist.is_initialized() and dist.get_world_size(self.tp_group) > 1:
            sharded = sharded.to(self._device())
            dist.all_reduce(sharded, group=self.tp_group)
            sharded = sharded.cpu()
        return math.sqrt(float(sharded + replicated))

    def _device(self) -> torch.device:
        return self.params[0][1].device if self.params else torch.device("cpu")

    def step(self, adam: dict[str, float]) -> dict[str, float]:
        norm = self.grad_norm()
        clip = adam["grad_clip_norm"]
        if clip > 0 and norm > clip:
            scale = clip / (norm + 1e-6)
            for _, p, _ in self.params:
                if p.grad is not None:
                    p.grad.mul_(scale)
        for group in self.opt.param_groups:
            group.update(lr=adam["learning_rate"], betas=(adam["beta1"], adam["beta2"]), eps=adam["eps"],
                         weight_decay=adam["weight_decay"])
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.steps += 1
        return {"grad_norm:mean": norm, "learning_rate:mean": adam["learning_rate"], "step:max": float(self.steps)}
