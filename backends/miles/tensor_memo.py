"""One value derived from a tensor, remembered while that very tensor comes back.

A forward pass hands every layer the same RoPE angles and the same attention mask; what each
layer would derive from them (cos/sin tables, an additive float mask) is made once and shared,
which saves the kernels and, for tensors autograd keeps, the memory of one copy per layer. The
memo is keyed on the tensor's identity (it holds the tensor, so the identity cannot be reused),
on what the caller says the value depends on, and on inference mode (a tensor made under it
cannot enter autograd later).
"""
from __future__ import annotations

from typing import Any, Callable, Hashable

import torch


class TensorMemo:
    def __init__(self) -> None:
        self._last: tuple = ()  # (source tensor, key, value)

    def get(self, source: torch.Tensor, key: Hashable, make: Callable[[], Any]) -> Any:
        if torch.compiler.is_compiling():  # inside a compiled graph: made in it, fused by the compiler
            return make()
        key = (key, torch.is_inference_mode_enabled())
        last = self._last
        if not last or last[0] is not source or last[1] != key:
            last = (source, key, make())
            self._last = last
        return last[2]
