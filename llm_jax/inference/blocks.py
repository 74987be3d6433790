"""Who holds which KV-cache block (the blocks themselves are device arrays: llm_jax/model/kv_pages.py),
with prefix sharing: requests whose prompts begin alike read the same blocks for that beginning.

A full block of prompt tokens is keyed by everything up to its end (`prefix_keys`: a chained BLAKE2b
digest, so equal keys mean equal prefixes). Once a request's prompt is written, its full blocks are
shared under their keys; a later request whose prompt starts with the same blocks takes them as they
are (counted per holder) and prefills only the rest. A shared block that nobody holds any more stays
readable until its space is needed: fresh blocks come from the never-shared ones first, then from the
idle shared ones, the least recently released first (a prompt's last blocks before its first).
"""

from __future__ import annotations

import collections
import hashlib

import numpy as np


def blocks_per_shard(blocks: int, shards: int) -> int:
    """A pool of `blocks` (one of them scratch) split over `shards`: each shard's share, and its scratch."""
    return -(-(blocks - 1) // shards) + 1


def prefix_keys(ids: list[int], block: int) -> list[bytes]:
    """A key per full block of `ids`: the digest of the previous block's key and this block's tokens."""
    keys, key = [], b""
    for start in range(0, len(ids) - block + 1, block):
        key = hashlib.blake2b(key + np.asarray(ids[start : start + block], np.int32).tobytes(), digest_size=16).digest()
        keys.append(key)
    return keys


class BlockPool:
    """The blocks of the pool, per batch shard: shard j holds blocks [j P, (j + 1) P) (P = per_shard),
    its first the scratch block, never handed out; a request's blocks all come from the shard that holds
    its row (model/kv_pages.py), and it shares prefixes with requests of that shard only."""

    def __init__(self, per_shard: int, shards: int = 1):
        self.per_shard, self.capacity = per_shard, per_shard - 1  # capacity: the most one request can hold
        self.total = shards * self.capacity
        self._free = [list(range((j + 1) * per_shard - 1, j * per_shard, -1)) for j in range(shards)]
        self._holders: collections.Counter[int] = collections.Counter()  # block -> requests holding it
        self._shared: dict[tuple[int, bytes], int] = {}  # (shard, prefix key) -> its block
        self._key: dict[int, tuple[int, bytes]] = {}  # shared block -> (shard, key)
        self._idle = [collections.OrderedDict() for _ in range(shards)]  # shared, unheld; first out first

    @property
    def free(self) -> int:
        """Blocks a request can take: never shared, or shared and held by nobody."""
        return sum(map(len, self._free)) + self.idle

    @property
    def idle(self) -> int:
        """Shared blocks that nobody holds, kept for a prompt that starts alike."""
        return sum(map(len, self._idle))

    def take(self, n: int, shard: int = 0, keys: list[bytes] = ()) -> tuple[list[int], int] | None:
        """n blocks of `shard` for a request, the first ones the shared blocks of its prompt's leading
        `keys` as far as they match -> (the blocks, how many of them were shared), or None (too few free)."""
        shared = []
        for key in keys:
            if (block := self._shared.get((shard, key))) is None:
                break
            shared.append(block)
        taken_idle = sum(block in self._idle[shard] for block in shared)
        if n - len(shared) > len(self._free[shard]) + len(self._idle[shard]) - taken_idle:
            return None
        for block in shared:
            self._idle[shard].pop(block, None)
        blocks = shared + [self._fresh(shard) for _ in range(n - len(shared))]
        self._holders.update(blocks)
        return blocks, len(shared)

    def _fresh(self, shard: int) -> int:
        if self._free[shard]:
            return self._free[shard].pop()
        block, _ = self._idle[shard].popitem(last=False)
        del self._shared[self._key.pop(block)]
        return block

    def share(self, blocks: list[int], keys: list[bytes]) -> None:
        """A request's prompt is written: its leading blocks become readable under their prefix keys (a
        prefix already shared keeps its block)."""
        for block, key in zip(blocks, keys):
            entry = (block // self.per_shard, key)
            if entry not in self._shared and block not in self._key:
                self._shared[entry], self._key[block] = block, entry

    def give(self, blocks: list[int]) -> None:
        """A request lets go of its blocks."""
        for block in reversed(blocks):
            self._holders[block] -= 1
            if self._holders[block]:
                continue
            del self._holders[block]
            if block in self._key:
                self._idle[block // self.per_shard][block] = None
            else:
                self._free[block // self.per_shard].append(block)
