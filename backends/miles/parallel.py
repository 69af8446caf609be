"""Parallel layout of the worker processes, set up in one place.

Reads the torchrun-style environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT), joins the process group (NCCL on GPUs, gloo on CPU) and builds megatron-core's
model-parallel groups from one small `ParallelDims`. Model code never touches this.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from backends.miles import cpu_compat


@dataclass(frozen=True)
class ParallelDims:
    tp: int = 1

    @property
    def world_size(self) -> int:
        return self.tp


def init_distributed(dims: ParallelDims, seed: int = 1234) -> torch.device:
    """Join the process group described by the environment; returns this rank's device."""
    cpu_compat.enable()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != dims.world_size:
        raise ValueError(f"WORLD_SIZE={world} does not match the layout {dims}")
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, init_method="env://")

    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=dims.tp)
    model_parallel_cuda_manual_seed(seed)
    return device


def tp_rank() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_rank()


def tp_size() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_world_size()
