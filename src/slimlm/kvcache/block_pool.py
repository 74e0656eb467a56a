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
        self.tier = None
        """A :class:`~slimlm.kvcache.key_tier.KeyTier` when keys are held apart (ShadowKV's second
        tier): a block then also needs a key block; blocks in ``_free`` hold none, cached ones
        keep theirs until recycled."""
        self._keyed_evictable = 0  # cached, unreferenced blocks holding a key block

    # ------------------------------------------------------------------ counts
    def num_free(self) -> int:
        """Blocks that can be handed out now (free + cached-but-unreferenced; with a key tier,
        no more than the key blocks free or held by cached-but-unreferenced blocks)."""
        n = len(self._free) + len(self._evictable)
        return n if self.tier is None else min(n, self.tier.num_free() + self._keyed_evictable)

    def num_used(self) -> int:
        """Blocks referenced or cached-and-unreferenced excluded: what requests hold now."""
        return self.num_blocks - len(self._free) - len(self._evictable)

    @property
    def capacity(self) -> int:
        """Blocks one sequence can hold at once (with a key tier, every unfactored block needs a
        key block, and a prompt is prefilled before its prefix is factored)."""
        return self.num_blocks if self.tier is None else min(self.num_blocks, self.tier.num_key_blocks)

    def key_blocks_in_use(self) -> int:
        """Key blocks the referenced blocks hold (key tier only)."""
        return self.tier.num_used() - self._keyed_evictable

    # ------------------------------------------------------------------ allocate / free
    def allocate(self) -> int:
        if self._free:
            b = self._free.pop()
        elif self._evictable:
            b, _ = self._evictable.popitem(last=False)
            self._drop_cached(b)
        else:
            raise RuntimeError("KV block pool exhausted")  # callers check num_free() first
        self.ref_count[b] = 1
        if self.tier is not None:
            self._give_key(b)
        return b

    def _drop_cached(self, b: int) -> None:
        del self._hash_to_block[self._block_hash.pop(b)]
        self._block_content.pop(b, None)

    def _give_key(self, b: int) -> None:
        """``b`` was just handed out: its old content is gone; it needs a key block."""
        tier = self.tier
        tier.reset(b)
        if tier.has_key(b):
            self._keyed_evictable -= 1  # it came from the cached blocks with its key
            return
        if tier.num_free():
            tier.give(b)
            return
        for e in self._evictable:  # recycle the least recently freed cached block holding a key
            if tier.has_key(e):
                del self._evictable[e]
                self._drop_cached(e)
                tier.reset(e)
                tier.give(b, tier.take_back(e))
                self._free.append(e)
                self._keyed_evictable -= 1
                return
        raise RuntimeError("KV key pool exhausted")  # num_free() counts key blocks

    def incref(self, b: int) -> None:
        if self.ref_count[b] == 0:
            self._evictable.pop(b, None)
            if self.tier is not None and self.tier.has_key(b):
                self._keyed_evictable -= 1
        self.ref_count[b] += 1

    def free(self, b: int) -> None:
        self.ref_count[b] -= 1
        assert self.ref_count[b] >= 0, f"block {b} freed twice"
        if self.ref_count[b] == 0:
            if b in self._block_hash:
                self._evictable[b] = None
                if self.tier is not None and self.tier.has_key(b):
                    self._keyed_evictable += 1
            else:
                self._free.append(b)
                if self.tier is not None:
                    self.tier.reset(b)
                    self.tier.release(b)

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
            if self.tier is not None:
                self.tier.reset(b)
                self.tier.release(b)
        self._evictable.clear()
        self._keyed_evictable = 0
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
