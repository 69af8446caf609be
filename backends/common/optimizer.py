"""AdamW over one adapter's parameters, with Tinker's AdamParams applied at every step.

Data parallelism: each DP rank accumulates the gradient of its share of every batch; `step`
first sums the gradients over the DP group (one all-reduce of one flat buffer), so every
replica then holds the global gradient and takes the same step. Summing once per step, not
after each backward, keeps accumulation over several forward_backward calls exact.

The global gradient norm (for `grad_clip_norm` and the reported metric) counts a
tensor-parallel shard once per rank and a replicated tensor once in total, and adds up the
pipeline stages (each holds the factors of its own layers; a stage may hold none). The optimizer
state can be taken out and put back by parameter name (`moments` / `load_moments`), so a
checkpoint can restore it exactly, whatever the tensor-parallel layout of the reader.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

MOMENT_KINDS = ("exp_avg", "exp_avg_sq", "step")


class AdapterOptimizer:
    def __init__(self, params: list[tuple[str, torch.nn.Parameter, bool]], tp_group=None, dp_group=None,
                 pp_group=None, device: torch.device | None = None, fused: bool | None = None) -> None:
        self.params = params
        # where collectives' buffers live: a stage without this adapter's factors still takes part
        self.device = device if device is not None else params[0][1].device if params else torch.device("cpu")
        self.tp_group = tp_group
        self.dp_group = dp_group
        self.pp_group = pp_group
        # torch refuses an empty parameter list; a pipeline stage without this adapter's layers has one.
        # On a GPU the fused AdamW: one kernel for the whole update (the step is host-bound; an 8B
        # adapter has ~290 factor tensors); elsewhere foreach, one multi-tensor kernel per update
        # stage (torch picks neither by itself on CPU). Both are AdamW to float32 rounding.
        self.fused = self.device.type == "cuda" if fused is None else fused
        self.opt = torch.optim.AdamW([p for _, p, _ in params] or [torch.nn.Parameter(torch.zeros(0))], lr=0.0,
                                     **({"fused": True} if self.fused else {"foreach": True}))
        self.steps = 0

    def grad_norm(self) -> float:
        """The global gradient norm; one host sync (the squared sums stay on the device). Every
        factor's norm comes from one multi-tensor kernel, in float64 like the sum of their squares."""
        grads: dict[bool, list[torch.Tensor]] = {True: [], False: []}
        for _, p, is_sharded in self.params:
            if p.grad is not None:
                grads[is_sharded].append(p.grad.detach())
        sharded, replicated = (  # float64 norms: no overflow or underflow of float32 squares
            torch.stack(torch._foreach_norm(g, 2, dtype=torch.float64)).pow(2).sum() if g
            else torch.zeros((), dtype=torch.float64, device=self.device)
            for g in (grads[True], grads[False]))
        if _spans(self.tp_group):
            dist.all_reduce(sharded, group=self.tp_group)
        total = sharded + replicated
        if _spans(self.pp_group):
            dist.all_reduce(total, group=self.pp_group)
        return math.sqrt(float(total))

    def sum_data_parallel_grads(self) -> None:
        """Sum every parameter's gradient over the DP group (collective). A rank without a
        gradient adds zeros; a parameter no rank has a gradient for keeps none."""
        if not _spans(self.dp_group):
            return
        grads = [p.grad for _, p, _ in self.params]
        has_grad = torch.tensor([float(g is not None) for g in grads], device=self.device)
        flat = torch.cat([has_grad, *(p.detach().new_zeros(p.numel()) if g is None else g.reshape(-1)
                                      for (_, p, _), g in zip(self.params, grads))])
        dist.all_reduce(flat, group=self.dp_group)
        offset = len(grads)
        for i, (_, p, _) in enumerate(self.params):
            summed = flat[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
            p.grad = summed.to(p.dtype).clone() if flat[i] > 0 else None

    def step(self, adam: dict[str, float]) -> dict[str, float]:
        self.sum_data_parallel_grads()
        norm = self.grad_norm()
        clip = adam["grad_clip_norm"]
        if clip > 0 and norm > clip:
            torch._foreach_mul_([p.grad for _, p, _ in self.params if p.grad is not None], clip / (norm + 1e-6))
        for group in self.opt.param_groups:
            group.update(lr=adam["learning_rate"], betas=(adam["beta1"], adam["beta2"]), eps=adam["eps"],
                         weight_decay=adam["weight_decay"])
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.steps += 1
        return {"grad_norm:mean": norm, "learning_rate:mean": adam["learning_rate"], "step:max": float(self.steps)}

    def moments(self) -> dict[str, dict[str, torch.Tensor]]:
        """AdamW state by kind ("exp_avg", "exp_avg_sq", "step") and parameter name; empty before
        the first step."""
        out: dict[str, dict[str, torch.Tensor]] = {kind: {} for kind in MOMENT_KINDS}
        for name, p, _ in self.params:
            for kind, value in self.opt.state.get(p, {}).items():
                out[kind][name] = value.detach().clone()
        return out if self.opt.state else {}

    def load_moments(self, moments: dict[str, dict[str, torch.Tensor]]) -> None:
        """Restore what `moments` returned (tensors of this rank's shapes); every parameter's
        state must be present, or none."""
        names = [name for name, _, _ in self.params]
        if not moments or not any(moments.values()):
            return
        for kind in MOMENT_KINDS:
            missing = sorted(set(names) - set(moments.get(kind, {})))
            if missing:
                raise ValueError(f"optimizer state lacks {kind} of {missing[:3]}")
        for name, p, _ in self.params:
            for kind in ("exp_avg", "exp_avg_sq"):
                if tuple(moments[kind][name].shape) != tuple(p.shape):
                    raise ValueError(f"{kind} of {name} has shape {tuple(moments[kind][name].shape)}, "
                                     f"the parameter {tuple(p.shape)}")
        for name, p, _ in self.params:
            self.opt.state[p] = {  # the fused kernel reads the step count on the parameter's device
                "step": moments["step"][name].detach().to(p.device if self.fused else "cpu", torch.float32)
                .reshape(()).clone(),
                "exp_avg": moments["exp_avg"][name].detach().to(p.device, p.dtype).clone(),
                "exp_avg_sq": moments["exp_avg_sq"][name].detach().to(p.device, p.dtype).clone(),
            }
        # every stage's step counts are in `moments` (a stage without factors has none of its own)
        self.steps = int(max((float(v) for v in moments["step"].values()), default=self.steps))


def _spans(group) -> bool:
    """Whether `group` has more than one rank (a collective over it has work to do)."""
    return group is not None and dist.is_initialized() and dist.get_world_size(group) > 1
