"""The frozen base weights a second time, in oneDNN's blocked layout, for the sampler on CPU.

Why: a decode step multiplies a few rows (one per sample) by every weight of the model. MKL's
`torch.matmul` repacks the weight on each such call; with a model's weights cycling through the
caches that made the base products about half of a CPU decode step. oneDNN's linear on a weight
packed once runs the same products in 0.5-0.7 of the time (BENCHMARKS.md, finding 13), and in
float32 it gives each row the same bits whatever the number of rows beside it, where MKL's
small-row paths (1, 2, 9 rows, ...) round differently: a sampled row no longer depends on its
batch mates even in the last bit. (Not so in bfloat16 on CPUs with AMX, whose kernels oneDNN picks
by the row count: there a row's last bit can depend on its batch, as it does with MKL; bfloat16
models make no such promise anyway, their LoRA products being float32 on MKL.)

What: `pack_frozen_weights(lora, budget_bytes)` gives every LoRA-wrapped linear that computes its
frozen base product itself (`LoraLinear.own_product`) a packed copy of that weight, while the
copies fit in `budget_bytes`; `LoraLinear._base` uses it inside `torch.inference_mode` (the
sampler: prefill, decode and prompt scoring) and the plain weight everywhere else, so training,
`forward` and their gradients keep every number they had. In float32 models the frozen LoRA
factors (sampler snapshots) of those layers go the same way (`LoraFactors.packed`, made at their
first use in the sampler), so when every layer was packed no product of a sampled row depends on
its batch mates. Not so where a layer stayed on MKL: past the budget (the layers are packed in
order, the output layer last), the float32 LoRA products of a bfloat16 model, column-parallel
layers at tp > 1 (megatron-core computes those), and adapters sampled while trainable. The copies
match `torch.matmul` to float rounding (the same products summed in another order). CPU float32
and, where the CPU has bfloat16 instructions, bfloat16 weights only; elsewhere nothing is packed.

A frozen adapter (a sampler snapshot) of a float32 model goes further: its rows are multiplied by
merged weights, W + scale * B A packed once per adapter and layer (`MergedCopies`, in what is left
of the packing budget, least recently used first out, made again bit for bit after being dropped),
one product instead of W x, A x, B h and an add: about a quarter of a CPU sampling round of
skyrl-tiny (BENCHMARKS.md, finding 16). Logprobs then differ from the separate products by float
rounding (W + scale * B A is rounded once), and a row's bits still do not depend on its batch
mates: each adapter's rows are one product of their own (`LoraLinear._merged_forward`). Only at
tp=1; a trainable adapter's rows, and a layer too big for the merge budget, keep what follows.

A decode step's LoRA products are a few rows by a rank-r factor, where a oneDNN call costs several
times the arithmetic. So inside `decode_step()` (the sampler's decode steps, not its prefills) a
factor of at most ROWWISE_MAX_ELEMENTS runs `rowwise`: one small product per row, batched in one
call, which gives a row the same bits whatever its batch mates by construction; larger factors, and
every prefill and prompt-scoring pass, keep their oneDNN copies. In paired in-process rounds on
skyrl-tiny (1, 8 and 64 rows; ranks 8 and 32; one and two threads) a round took 0.87-0.97 of its
time (BENCHMARKS.md, finding 14).
"""
from __future__ import annotations

import contextlib
import weakref
from collections import OrderedDict
from contextvars import ContextVar
from typing import Iterator

import torch

# The row count oneDNN is told to expect when packing: a hint for its layout; in float32 the results
# are the same bits for any row count (tests/test_packed_weights.py).
_PACK_ROWS_HINT = 8

# In a decode step, LoRA factors with at most this many elements (64 KB in float32) are multiplied
# row by row (`rowwise`) rather than on oneDNN.
ROWWISE_MAX_ELEMENTS = 1 << 14

_DECODING: ContextVar[bool] = ContextVar("tinkercloud_decode_step", default=False)


def supported(weight: torch.Tensor) -> bool:
    """Whether this weight can be packed for oneDNN's CPU linear."""
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if weight.dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return weight.dtype == torch.float32


def pack(weight: torch.Tensor) -> torch.Tensor:
    """`weight` [out, in] in oneDNN's layout (an opaque tensor: only `linear` reads it)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _PACK_ROWS_HINT)


def linear(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """x [..., in] @ weight.t() for the weight that `packed` was made from."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


def pack_frozen_weights(lora, budget_bytes: int) -> int:
    """Pack the frozen weight of each layer of `lora` (a `LoraManager`) whose base product it
    computes itself, in layer order, while the copies fit in `budget_bytes`; returns the bytes
    packed (0 on GPUs, for other dtypes, or when nothing fits). The packed layers share one
    `MergedCopies` for their frozen adapters' merged weights (`lora.merged_copies`), of budget 0
    until the caller gives it what is left (`backend.pack_sampler_weights`)."""
    model = lora.model
    used = 0
    merges = lora.merged_copies = MergedCopies(0)
    for module in lora.modules.values():
        # a tied output layer has no weight of its own: the sampler hands it the embedding's
        weight = module.base.weight if module.base.weight is not None else model.shared_embedding_or_output_weight()
        if not module.own_product or weight is None or not supported(weight):
            continue
        size = weight.numel() * weight.element_size()
        if used + size > budget_bytes:
            break
        module.packed = (weight, pack(weight))
        module.merges = merges
        used += size
    return used


class MergedCopies:
    """The sampler's merged weights of frozen adapters, W + scale * B A packed for oneDNN, one per
    (adapter, layer), made at first use and kept within `budget_bytes`, least recently used first
    out. A layer whose merged copy alone would not fit never merges (`fits`), whatever else is
    kept, so whether a layer merges depends on its size only; a copy dropped to make room is made
    again, bit for bit the same, at its next use. A copy lives on its `LoraFactors` and goes with
    it (its bytes with it)."""

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self.used = 0
        self._kept: "OrderedDict[int, weakref.ref]" = OrderedDict()  # id(factors) -> factors, oldest first

    def fits(self, weight: torch.Tensor) -> bool:
        return weight.dtype == torch.float32 and weight.numel() * weight.element_size() <= self.budget_bytes

    def get(self, factors, weight: torch.Tensor) -> torch.Tensor:
        """The packed W + scale * B A of `factors` (frozen) on the layer of frozen weight `weight`."""
        key = id(factors)
        if factors._merged is not None:
            self._kept.move_to_end(key)
            self._make_room(0)  # the budget may have shrunk since
            return factors._merged
        size = weight.numel() * weight.element_size()
        self._make_room(size)
        with torch.no_grad():
            merged = torch.addmm(weight.detach(), factors.lora_B.detach(), factors.lora_A.detach(), alpha=factors.scale)
        factors._merged, factors._merged_bytes = pack(merged), size
        self.used += size
        self._kept[key] = weakref.ref(factors, lambda _, key=key, size=size: self._forget(key, size))
        return factors._merged

    def _make_room(self, size: int) -> None:
        """Drop the least recently used copies until `size` more bytes fit (never the newest one,
        which the caller is about to use)."""
        while len(self._kept) > (0 if size else 1) and self.used + size > self.budget_bytes:
            _, ref = self._kept.popitem(last=False)
            old = ref()
            if old is not None and old._merged is not None:
                old._merged = None
                self.used -= old._merged_bytes

    def _forget(self, key: int, size: int) -> None:
        if self._kept.pop(key, None) is not None:
            self.used -= size


@contextlib.contextmanager
def decode_step() -> Iterator[None]:
    """Marks a sampler decode step (one new token per row) for the products inside it (`decoding`)."""
    token = _DECODING.set(True)
    try:
        yield
    finally:
        _DECODING.reset(token)


def decoding() -> bool:
    """Whether the products running now belong to a sampler decode step (`decode_step`)."""
    return _DECODING.get()


def rowwise(x: torch.Tensor, weight_t: torch.Tensor) -> torch.Tensor:
    """x [..., in] @ weight_t [in, out], each row its own one-row product (all in one batched call):
    a row's bits never depend on how many rows are beside it, or where. A lone row goes as a batch
    of two (itself twice): with two threads on AVX-512/AMX CPUs a batch of one takes another kernel
    than larger batches and rounds differently (rank-4 and rank-8 B products, 256 or 768 inputs)."""
    flat = x.reshape(-1, x.shape[-1])
    rows = flat.shape[0]
    if rows == 1:
        flat = flat.expand(2, -1)
    out = torch.bmm(flat.unsqueeze(1), weight_t.expand(flat.shape[0], *weight_t.shape))
    return out[:rows].view(*x.shape[:-1], weight_t.shape[1])
