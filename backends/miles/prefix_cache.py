"""Prefix cache for the sampler: K/V of token sequences already run, reused by later prompts.

One `PrefixCache` belongs to one base model on one worker rank. Each entry is the per-layer
K/V (this rank's shard, [kv_groups, n, head_dim]) of a token sequence run under one adapter:
a prompt, or a prompt plus the tokens sampled after it (so the next turn of a chat, whose
prompt repeats the previous turn and its answer, finds it). The K/V of positions [0, m)
depends only on tokens [0, m) and the weights, so a later prompt under the *same* adapter
may reuse the longest common prefix it shares with any entry. Entries of different adapters
are never mixed (the adapter name is part of every lookup; adapter names are frozen
snapshots, so one name never means two sets of weights), and different base models have
different caches.

Memory is bounded by a token budget (`max_tokens`, default `DEFAULT_MAX_TOKENS` tokens per
base model and rank; one token costs 2 x layers x kv_groups x head_dim x dtype bytes), with
least-recently-used entries evicted first. An entry that another entry extends is dropped
(the longer one holds its K/V too), so repeated and growing prompts do not pile up copies.
Entries are also filed by (adapter, first token): only those can share a prefix with a
sequence, so a lookup or insert compares against them alone, not against every entry.
Every TP rank sees the same requests in the same order, so all ranks make the same
decisions.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

__all__ = ["PrefixCache", "DEFAULT_MAX_TOKENS"]

DEFAULT_MAX_TOKENS = 16384

LayerKV = tuple[torch.Tensor, torch.Tensor]  # (K, V), each [kv_groups, n, head_dim]


@dataclass
class _Entry:
    adapter: str | None
    tokens: np.ndarray  # int64 [n]
    kv: list[LayerKV]


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if differ.size else n


class PrefixCache:
    def __init__(self, max_tokens: int = DEFAULT_MAX_TOKENS) -> None:
        self.max_tokens = max_tokens
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # least recently used first
        self._by_head: dict[tuple[str | None, int], set[int]] = {}  # (adapter, first token) -> entry ids
        self._next_id = 0
        self.tokens = 0  # tokens held, always <= max_tokens

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, adapter: str | None, prompt: Sequence[int], limit: int) -> tuple[int, list[LayerKV] | None]:
        """(n, kv): the longest cached prefix of `prompt` under `adapter`, at most `limit`
        tokens; `kv` holds at least n positions per layer. (0, None) when nothing matches."""
        want = np.asarray(prompt, dtype=np.int64)
        best, best_id = 0, None
        for entry_id in self._same_head(adapter, want):
            n = min(_common_prefix(self._entries[entry_id].tokens, want), limit)
            if n > best:
                best, best_id = n, entry_id
        if best_id is None:
            return 0, None
        self._entries.move_to_end(best_id)
        return best, self._entries[best_id].kv

    def insert(self, adapter: str | None, tokens: Sequence[int], kv: Callable[[], list[LayerKV]]) -> None:
        """Remember the K/V of `tokens` under `adapter`. `kv()` is only called when the entry
        is stored; it must return tensors the cache may keep (copies, not views)."""
        seq = np.asarray(tokens, dtype=np.int64)
        if len(seq) == 0 or len(seq) > self.max_tokens:
            return
        for entry_id in self._same_head(adapter, seq):
            entry = self._entries[entry_id]
            shared = _common_prefix(entry.tokens, seq)
            if shared == len(seq):  # an existing entry already covers these tokens
                self._entries.move_to_end(entry_id)
                return
            if shared == len(entry.tokens):  # the new entry covers this one
                self._drop(entry_id)
        self._entries[self._next_id] = _Entry(adapter, seq, kv())
        self._by_head.setdefault((adapter, int(seq[0])), set()).add(self._next_id)
        self._next_id += 1
        self.tokens += len(seq)
        while self.tokens > self.max_tokens:
            self._drop(next(iter(self._entries)))

    def retain(self, keep: Callable[[str | None], bool]) -> None:
        """Drop every entry whose adapter `keep` rejects (e.g. adapters no longer loaded)."""
        for entry_id in [i for i, e in self._entries.items() if not keep(e.adapter)]:
            self._drop(entry_id)

    def _same_head(self, adapter: str | None, tokens: np.ndarray) -> list[int]:
        """The ids of the entries under `adapter` that start with `tokens[0]`, least recently used
        first (the order in which every entry used to be compared)."""
        same = self._by_head.get((adapter, int(tokens[0]))) if len(tokens) else None
        return [i for i in self._entries if i in same] if same else []

    def _drop(self, entry_id: int) -> None:
        entry = self._entries.pop(entry_id)
        self.tokens -= len(entry.tokens)
        head = (entry.adapter, int(entry.tokens[0]))
        self._by_head[head].discard(entry_id)
        if not self._by_head[head]:
            del self._by_head[head]
