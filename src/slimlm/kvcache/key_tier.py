"""ShadowKV's second tier on a CPU: key blocks held apart from value blocks, given back once a
prefix's keys live as low-rank factors.

On a GPU, ShadowKV moves values to CPU memory; on a CPU there is one memory, and what bounds
batch and context is the KV *held*. So here the pool's keys and values are two allocations: every
block id owns a value block, and a key block from a smaller key pool (``key_share`` of the block
count) while its keys are stored. Once ShadowKV has summarized a prefix at every layer, the
prefix's full blocks give their key blocks back: their keys live only in a :class:`Factored`
record (per layer: A (Hkv, P, r), B (Hkv, r, d), the chunk landmarks, and the outlier chunks'
exact keys). Any later reader of those keys (a prefill over the shared prefix, a dense decode
row, a summary of a shorter prefix) reads them rebuilt from the record (RoPE_t(A[t] B), the
outliers exact): :meth:`PagedKVCache.gather <slimlm.kvcache.storage.PagedKVCache.gather>`.

Bookkeeping only (the tensors are the cache's): which key block each block holds (``kmap``,
mirrored in the tensor ``map`` for the kernels), the free key blocks, and the factored blocks.
A record lives while any of its blocks is still held (referenced or cached by the pool): the
pool calls :meth:`reset` when a block is recycled or freed uncached. Memory held (the engine's
``kv_bytes_in_use``, :meth:`KeyTier.bytes_held`): value blocks + key blocks held (each at its own
codec's bytes) + the live records' tensors (``record_bytes``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(eq=False)
class Factored:
    """A factored prefix: per layer ShadowKV's summary (A, B, landmarks, outlier mask, positions,
    outlier rows, their keys), and the outlier rows' exact keys (rows (Hkv, o) token indices,
    keys (Hkv, o, d)) apart, for :meth:`KeyTier.rebuild`."""

    key: tuple
    blocks: tuple[int, ...]
    summaries: list
    outlier_rows: list[torch.Tensor]
    outlier_keys: list[torch.Tensor]
    rotary: object
    refs: int = 0
    nbytes: int = field(default=0)

    def __post_init__(self):
        ts = [t for s in self.summaries for t in s[:3]] + self.outlier_keys
        self.nbytes = sum(t.numel() * t.element_size() for t in ts)


class KeyTier:
    def __init__(self, num_blocks: int, num_key_blocks: int, key_block_bytes: int = 0, value_block_bytes: int = 0):
        """``key_block_bytes`` / ``value_block_bytes``: what one block's keys / the rest of it hold
        (all layers; they differ where the codec stores keys apart, e.g. int4's smaller key groups)."""
        if num_key_blocks < 1:
            raise ValueError(f"the key tier needs at least one key block, got {num_key_blocks}")
        self.num_blocks, self.num_key_blocks = num_blocks, num_key_blocks
        self.key_block_bytes, self.value_block_bytes = key_block_bytes, value_block_bytes
        self.kmap = [-1] * num_blocks
        self.map = torch.full((num_blocks,), -1, dtype=torch.int64)
        self._free: list[int] = list(range(num_key_blocks - 1, -1, -1))
        self.factored: dict[int, tuple[Factored, int]] = {}  # block -> (record, index in its prefix)
        self.records: dict[tuple, Factored] = {}  # prefix key -> its record, all its blocks factored
        self.users: dict[int, set[tuple]] = {}  # block -> prefix keys in ``records`` covering it
        self._by_blocks: dict[tuple, tuple] = {}  # a record's block ids -> its prefix key
        self.record_bytes = 0
        self.ref_count: list[int] | None = None  # the pool's reference counts (set by the engine)
        self.stats = {"blocks_factored": 0, "key_blocks_given_back": 0}

    def bytes_held(self, blocks: int, key_blocks: int) -> int:
        """KV bytes held by ``blocks`` referenced blocks (their values) of which ``key_blocks`` hold
        their keys, plus the live factored records."""
        return blocks * self.value_block_bytes + key_blocks * self.key_block_bytes + self.record_bytes

    # ------------------------------------------------------------------ key blocks
    def num_free(self) -> int:
        return len(self._free)

    def num_used(self) -> int:
        return self.num_key_blocks - len(self._free)

    def has_key(self, b: int) -> bool:
        return self.kmap[b] >= 0

    def give(self, b: int, kb: int | None = None) -> None:
        """Block ``b`` holds a key block again (``kb``, else a free one)."""
        kb = self._free.pop() if kb is None else kb
        self.kmap[b] = kb
        self.map[b] = kb

    def take_back(self, b: int) -> int:
        """Detach ``b``'s key block and return it (not freed: the caller moves it)."""
        kb = self.kmap[b]
        self.kmap[b] = -1
        self.map[b] = -1
        return kb

    def release(self, b: int) -> None:
        if self.kmap[b] >= 0:
            self._free.append(self.take_back(b))

    def reset(self, b: int) -> None:
        """Block ``b``'s content is gone (recycled or freed uncached): drop its factored keys and
        the records that covered it."""
        hit = self.factored.pop(b, None)
        if hit is not None:
            self._unref(hit[0])
        for key in self.users.pop(b, ()):
            rec = self.records.pop(key, None)
            if rec is not None:
                self._by_blocks.pop(key[2], None)
                self._unref(rec)

    def _unref(self, rec: Factored) -> None:
        rec.refs -= 1
        if rec.refs == 0:
            self.record_bytes -= rec.nbytes

    # ------------------------------------------------------------------ factoring
    def factor(self, rec: Factored) -> int:
        """The blocks of ``rec`` still holding keys give them back (their keys now live in
        ``rec``); blocks an earlier prefix factored keep theirs. Once all its blocks are factored,
        ``rec`` serves lookups by its prefix key (:meth:`record`) until one of them is reset.
        Returns how many key blocks were given back."""
        n = 0
        for i, b in enumerate(rec.blocks):
            if b in self.factored or not self.has_key(b) or (self.ref_count is not None and not self.ref_count[b]):
                continue  # already factored by an earlier prefix, or no longer held by a request
            self.release(b)
            self.factored[b] = (rec, i)
            n += 1
        rec.refs = n
        if all(b in self.factored for b in rec.blocks) and rec.key not in self.records:
            self.records[rec.key] = rec
            self._by_blocks[rec.key[2]] = rec.key
            rec.refs += 1
            for b in rec.blocks:
                self.users.setdefault(b, set()).add(rec.key)
        if rec.refs:
            self.record_bytes += rec.nbytes
        self.stats["blocks_factored"] += n
        self.stats["key_blocks_given_back"] += n
        return n

    def record(self, key: tuple) -> Factored | None:
        """The record of prefix ``key`` while all its blocks are factored (their content fixed)."""
        return self.records.get(key)

    def factored_prefix(self, table: list[int], P: int) -> int | None:
        """The longest factored prefix (its length, <= ``P``) that the block list ``table``
        starts with, or None."""
        best = None
        for blocks, key in self._by_blocks.items():
            if key[1] <= P and (best is None or key[1] > best) and tuple(table[: len(blocks)]) == blocks:
                best = key[1]
        return best

    def rebuild(self, layer: int, b: int, block_size: int) -> torch.Tensor:
        """The keys (block_size, Hkv, d) float32 of factored block ``b`` at ``layer``."""
        from slimlm.model.rope import apply_rope

        rec, i = self.factored[b]
        A, B = rec.summaries[layer][0], rec.summaries[layer][1]  # (Hkv, P, r), (Hkv, r, d)
        lo = i * block_size
        pos = torch.arange(lo, lo + block_size)
        pre = torch.bmm(A[:, lo : lo + block_size], B)  # (Hkv, bs, d)
        cos, sin = rec.rotary(pos[None], torch.float32)
        k = apply_rope(pre[None], cos, sin)[0]  # (Hkv, bs, d)
        rows, keys = rec.outlier_rows[layer], rec.outlier_keys[layer]  # (Hkv, o), (Hkv, o, d)
        inside = (rows >= lo) & (rows < lo + block_size)
        if bool(inside.any()):
            h, j = inside.nonzero(as_tuple=True)
            k[h, rows[h, j] - lo] = keys[h, j]
        return k.transpose(0, 1)


def build_tier(kv_bytes: int, spec, block_size: int, key_share: float) -> tuple[int, KeyTier]:
    """(blocks, their key tier) that ``kv_bytes`` holds when ``key_share`` of the blocks hold
    keys. A block's keys are its storages' key rows (the key codec's bytes, which int4 makes
    larger than the values'); the rest of the block (values, any per-block extras) stays with it."""
    block_bytes = spec.bytes_per_block(block_size)
    key_bytes = spec.num_storages * block_size * spec.codec("k").bytes_per_row(spec.num_kv_heads)
    value_bytes = block_bytes - key_bytes
    n = int(kv_bytes // (value_bytes + key_share * key_bytes))
    if n < 1:
        raise ValueError(f"kv_cache_bytes={kv_bytes} holds no KV block ({block_bytes} bytes each)")
    return n, KeyTier(n, max(1, int(n * key_share)), key_bytes, value_bytes)
