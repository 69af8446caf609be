"""Which data-parallel replica samples a request: the least loaded one, unless another replica
already holds most of its prompt in its prefix cache.

Every replica keeps its own prefix cache (the K/V of earlier prompts and their samples, per
adapter). The next turn of a conversation, or a prompt sampled again, repeats an earlier prompt,
and only the replica that computed that prompt can reuse it. So the router remembers which
replica each prompt went to, by the hashes of its BLOCK-token prefixes (block i's hash covers
every token before its end, and the base model and adapter), and sends a request back to the
replica that saw its longest remembered prefix when

  * that prefix covers at least MIN_SHARE of the prompt (a shared system prompt alone does not
    pin every request of a batch to one replica), and
  * that replica has at most SLACK_ROWS more sample rows in flight than the least loaded one
    (affinity never costs more than a little balance);

otherwise the request goes to the replica with the fewest rows in flight (the lowest index on a
tie). Remembered blocks are kept in an LRU of MAX_BLOCKS entries. One replica: always 0, and
nothing is hashed.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Hashable, Sequence

BLOCK = 16  # tokens per remembered prefix block
MIN_SHARE = 0.5  # of the prompt that a remembered prefix must cover to attract the request
SLACK_ROWS = 16  # how much busier than the least loaded replica an attracting replica may be
MAX_BLOCKS = 1 << 16  # remembered blocks, over every replica and model


class ReplicaRouter:
    def __init__(self, replicas: int) -> None:
        self.rows = [0] * replicas  # sample rows sent to each replica and not answered yet
        self._seen: OrderedDict[int, int] = OrderedDict()  # prefix-block hash -> replica

    def pick(self, model: Hashable, prompt: Sequence[int], rows: int) -> int:
        """The replica for a request of `rows` sample rows on `prompt` under `model` (base model
        and adapter); counts its rows as in flight there until `done`."""
        replica = 0
        if len(self.rows) > 1:
            least = min(range(len(self.rows)), key=self.rows.__getitem__)
            hashes = _block_hashes(model, prompt)
            replica = least
            for blocks in range(len(hashes), 0, -1):  # the longest remembered prefix decides
                seen = self._seen.get(hashes[blocks - 1])
                if seen is not None:
                    if blocks * BLOCK >= MIN_SHARE * len(prompt) and self.rows[seen] <= self.rows[least] + SLACK_ROWS:
                        replica = seen
                    break
            self._remember(hashes, replica)
        self.rows[replica] += rows
        return replica

    def done(self, replica: int, rows: int) -> None:
        """A request of `rows` rows that `pick` sent to `replica` has been answered."""
        self.rows[replica] -= rows

    def _remember(self, hashes: list[int], replica: int) -> None:
        for h in hashes:
            self._seen[h] = replica
            self._seen.move_to_end(h)
        while len(self._seen) > MAX_BLOCKS:
            self._seen.popitem(last=False)


def _block_hashes(model: Hashable, prompt: Sequence[int]) -> list[int]:
    """The hash of every whole BLOCK-token prefix of `prompt`, each chained to the one before."""
    tokens = [int(t) for t in prompt]
    hashes, h = [], hash(model)
    for end in range(BLOCK, len(tokens) + 1, BLOCK):
        h = hash((h, tuple(tokens[end - BLOCK:end])))
        hashes.append(h)
    return hashes
