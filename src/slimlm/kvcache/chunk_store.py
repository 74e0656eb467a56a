"""ChunkStore: KV of text chunks (RAG passages) kept for reuse anywhere in later prompts
(CacheBlend, Yao et al. 2024). Keyed by the chunk's token ids; each entry is the chunk's KV
computed once (``engine/cacheblend.py``), keys and values of every layer stacked:
(layers, n, Hkv, d) each, so a chunk is moved and copied with one operation, not one per layer.

Bounded in bytes, least-recently-used first out. It never fails a request: a chunk larger than
the whole store is simply not kept, and a full store evicts until the new entry fits.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch

ChunkKV = tuple[torch.Tensor, torch.Tensor]
"""Keys and values, (layers, n, Hkv, d) each."""


def chunk_key(ids: list[int]) -> str:
    return hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()


def kv_bytes(kv: ChunkKV) -> int:
    return sum(t.numel() * t.element_size() for t in kv)


class ChunkStore:
    def __init__(self, capacity_bytes: int):
        self.capacity = int(capacity_bytes)
        self._items: OrderedDict[str, tuple[ChunkKV, int]] = OrderedDict()
        self.bytes = 0
        self.stats = {"hits": 0, "misses": 0, "evictions": 0}

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, ids: list[int]) -> bool:
        return chunk_key(ids) in self._items

    def get(self, ids: list[int]) -> ChunkKV | None:
        key = chunk_key(ids)
        item = self._items.get(key)
        if item is None:
            self.stats["misses"] += 1
            return None
        self._items.move_to_end(key)
        self.stats["hits"] += 1
        return item[0]

    def put(self, ids: list[int], kv: ChunkKV) -> bool:
        """Keep ``kv`` for ``ids``; evicts least-recently-used entries to make room. False when
        the entry alone is larger than the store (nothing is evicted then)."""
        key, size = chunk_key(ids), kv_bytes(kv)
        if size > self.capacity:
            return False
        if key in self._items:
            self.bytes -= self._items.pop(key)[1]
        while self.bytes + size > self.capacity:
            _, (_, freed) = self._items.popitem(last=False)
            self.bytes -= freed
            self.stats["evictions"] += 1
        self._items[key] = (kv, size)
        self.bytes += size
        return True
