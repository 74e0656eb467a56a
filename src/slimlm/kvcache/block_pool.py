"""A pool of fixed-size KV blocks with reference counts and a prefix cache.

Pure bookkeeping (no tensors): block ids index the runner's KV tensors. A full block can be
registered under a chain hash of (parent hash, its tokens); later sequences with the same
prefix find it with ``lookup`` and share it. Cached blocks nobody references stay reusable
until the pool needs room, then the least recently freed one is recycled (LRU).
"""

from __future__ import annotations

from collections import OrderedDict


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_count = [0] * num_blocks
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # a stack: reuse warm blocks first
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, ref 0, LRU first
        self._hash_to_block: dict[int, int] = {}
        self._block_hash: dict[int, int] = {}
        self.hits = self.queries = 0

    # ------------------------------------------------------------------ counts
    def num_free(self) -> int:
        """Blocks that can be handed out now (free + cached-but-unreferenced)."""
        return len(self._free) + len(self._evictable)

    def num_used(self) -> int:
        return self.num_blocks - self.num_free()

    # ------------------------------------------------------------------ allocate / free
    def allocate(self) -> int:
        if self._free:
            b = self._free.pop()
        elif self._evictable:
            b, _ = self._evictable.popitem(last=False)
            del self._hash_to_block[self._block_hash.pop(b)]
        else:
            raise RuntimeError("KV block pool exhausted")  # callers check num_free() first
        self.ref_count[b] = 1
        return b

    def incref(self, b: int) -> None:
        if self.ref_count[b] == 0:
            self._evictable.pop(b, None)
        self.ref_count[b] += 1

    def free(self, b: int) -> None:
        self.ref_count[b] -= 1
        assert self.ref_count[b] >= 0, f"block {b} freed twice"
        if self.ref_count[b] == 0:
            if b in self._block_hash:
                self._evictable[b] = None
            else:
                self._free.append(b)

    # ------------------------------------------------------------------ prefix cache
    def lookup(self, block_hash: int) -> int | None:
        """Find a cached block by hash and take a reference to it."""
        if not self.enable_prefix_caching:
            return None
        self.queries += 1
        b = self._hash_to_block.get(block_hash)
        if b is not None:
            self.hits += 1
            self.incref(b)
        return b

    def is_cached(self, block_hash: int) -> bool:
        return self.enable_prefix_caching and block_hash in self._hash_to_block

    def register(self, b: int, block_hash: int) -> None:
        """Publish a full block under its hash (first writer wins)."""
        if not self.enable_prefix_caching or b in self._block_hash or block_hash in self._hash_to_block:
            return
        self._hash_to_block[block_hash] = b
        self._block_hash[b] = block_hash

    def reset_prefix_cache(self) -> None:
        for b in list(self._evictable):
            self._free.append(b)
        self._evictable.clear()
        self._hash_to_block.clear()
        self._block_hash.clear()


def block_hashes(token_ids: list[int], block_size: int, parent: int | None = None) -> list[int]:
    """Chain hashes of the full blocks of ``token_ids``: h_i = hash((h_{i-1}, tokens of block i))."""
    out, h = [], parent if parent is not None else 0
    for i in range(len(token_ids) // block_size):
        h = hash((h, tuple(token_ids[i * block_size : (i + 1) * block_size])))
        out.append(h)
    return out
