"""Lets megatron-core run on a machine without CUDA (CPU workers over gloo).

megatron-core calls a handful of CUDA APIs unconditionally (RNG state of the model-parallel
tracker, `torch.cuda.current_device()` for buffers, streams in grad sync). When CUDA is
absent, `enable()` routes exactly those calls to their CPU equivalents. On a GPU machine it
does nothing. It must run before megatron-core builds a model.
"""
from __future__ import annotations

import contextlib

import torch

_enabled = False


def enable() -> bool:
    """Install the CPU stand-ins if CUDA is unavailable; returns whether they are active."""
    global _enabled
    if torch.cuda.is_available():
        return False
    if _enabled:
        return True
    cuda = torch.cuda
    # Buffers and RoPE frequencies are allocated on "the current CUDA device".
    cuda.current_device = lambda: "cpu"
    # The model-parallel RNG tracker saves, seeds and restores "the CUDA generator".
    cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    cuda.manual_seed = cuda.manual_seed_all = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.random.get_rng_state = cuda.get_rng_state
    cuda.random.set_rng_state = cuda.set_rng_state
    # Gradient sync and timers use streams/events/synchronize: no-ops on CPU.
    cuda.current_stream = torch.cpu.current_stream
    cuda.default_stream = torch.cpu.current_stream
    cuda.Stream = torch.cpu.Stream
    cuda.Event = torch.cpu.Event
    cuda.stream = torch.cpu.stream
    # (a function of its own: torch.compile keys handlers by function and has one for each)
    cuda.synchronize = lambda device=None: torch.cpu.synchronize(device)
    cuda.nvtx.range_push = lambda *a, **k: None
    cuda.nvtx.range_pop = lambda *a, **k: None
    cuda.nvtx.range = lambda *a, **k: contextlib.nullcontext()

    from megatron.core.tensor_parallel import random as mp_random

    mp_random._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: (
        torch.get_rng_state().clone() if clone else torch.get_rng_state()
    )
    mp_random._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(
        new_state
    )
    # The pipeline schedules count tokens in `torch.zeros([], device="cuda")`: give that
    # module (only) a torch whose `zeros` puts a literal "cuda" on the CPU.
    from megatron.core.pipeline_parallel import schedules

    schedules.torch = _CpuZerosTorch()
    _enabled = True
    return True


class _CpuZerosTorch:
    """`torch`, except that `zeros(..., device="cuda")` allocates on the CPU."""

    def __getattr__(self, name: str):
        return getattr(torch, name)

    @staticmethod
    def zeros(*args, device=None, **kwargs):
        return torch.zeros(*args, device="cpu" if str(device).startswith("cuda") else device, **kwargs)
