"""A pool of fixed-size KV blocks with reference counts and a prefix cache.

Pure bookkeeping (no tensors): block ids index the runner's KV tensors. A full block can be
registered under a chain key sha256(parent key, its tokens); later sequences with the same
prefix find it with ``lookup`` and share it. Cached blocks nobody references stay reusable
until the pool needs room, then the least recently freed one is recycled (LRU).

Safety (the prefix cache is shared by every request): keys are a cryptographic hash, so no
client can craft two prefixes with equal keys, and a hit is only used when the block's stored
parent key and tokens equal the new ones, so even a collision could not hand one request
another's KV. A salt (per API key or the request's ``cache_salt``) roots the chain, so requests
with different salts never share blocks (and cannot time each other's prefixes).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

BlockKey = bytes
"""sha256 digest of (parent key, the block's token ids)."""


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_count = [0] * num_blocks
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # a stack: reuse warm blocks first
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, ref 0, LRU first
        self._hash_to_block: dict[BlockKey, int] = {}
        self._block_hash: dict[int, BlockKey] = {}
        self._block_content: dict[int, tuple[BlockKey | None, tuple[int, ...]]] = {}  # (parent, tokens)
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
            self._block_content.pop(b, None)
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
    def _find(self, block_hash: BlockKey, content: tuple | None) -> int | None:
        b = self._hash_to_block.get(block_hash)
        if b is not None and content is not None and self._block_content.get(b) != content:
            return None  # equal keys, different tokens: never share
        return b

    def lookup(self, block_hash: BlockKey, content: tuple | None = None) -> int | None:
        """Find a cached block by key and take a reference to it. ``content`` = (parent key,
        tokens): the hit is used only if the stored block holds exactly these."""
        if not self.enable_prefix_caching:
            return None
        self.queries += 1
        b = self._find(block_hash, content)
        if b is not None:
            self.hits += 1
            self.incref(b)
        return b

    def is_cached(self, block_hash: BlockKey, content: tuple | None = None) -> bool:
        return self.enable_prefix_caching and self._find(block_hash, content) is not None

    def register(self, b: int, block_hash: BlockKey, content: tuple | None = None) -> None:
        """Publish a full block under its key (first writer wins), with its (parent, tokens)."""
        if not self.enable_prefix_caching or b in self._block_hash or block_hash in self._hash_to_block:
            return
        self._hash_to_block[block_hash] = b
        self._block_hash[b] = block_hash
        if content is not None:
            self._block_content[b] = content

    def reset_prefix_cache(self) -> None:
        for b in list(self._evictable):
            self._free.append(b)
        self._evictable.clear()
        self._hash_to_block.clear()
        self._block_hash.clear()
        self._block_content.clear()


def salt_key(salt: str | bytes | None) -> BlockKey | None:
    """The root of a salted chain (None: the shared, unsalted cache)."""
    if salt is None:
        return None
    raw = salt.encode("utf-8", "surrogatepass") if isinstance(salt, str) else salt
    return hashlib.sha256(b"slimlm-salt\0" + raw).digest()


def block_hashes(token_ids: list[int], block_size: int, parent: BlockKey | None = None,
                 salt: str | bytes | None = None) -> list[BlockKey]:
    """Chain keys of the full blocks of ``token_ids``: k_i = sha256(k_{i-1} || tokens of block i)
    (k_{-1} = ``parent``, else the salt's root, else empty)."""
    out: list[BlockKey] = []
    h = parent if parent is not None else (salt_key(salt) or b"")
    for i in range(len(token_ids) // block_size):
        toks = array("q", token_ids[i * block_size : (i + 1) * block_size]).tobytes()
        h = hashlib.sha256(len(h).to_bytes(1, "little") + h + toks).digest()
        out.append(h)
    return out


def block_contents(token_ids: list[int], block_size: int, keys: list[BlockKey], parent: BlockKey | None = None,
                   salt: str | bytes | None = None) -> list[tuple[BlockKey | None, tuple[int, ...]]]:
    """(parent key, tokens) of each full block, what ``lookup`` compares before sharing one."""
    root = parent if parent is not None else salt_key(salt)
    return [(keys[i - 1] if i else root, tuple(token_ids[i * block_size : (i + 1) * block_size]))
            for i in range(len(keys))]
