"""Per-sequence block tables over a :class:`BlockPool`.

The scheduler talks to this class in token counts and gets block ids back; it never sees KV
tensors. A block table maps logical block i (tokens i*B .. i*B+B-1) to a physical block, or
to ``EVICTED`` once a KV policy dropped it.
"""

from __future__ import annotations

from slimlm.kvcache.block_pool import BlockPool, block_contents, block_hashes, salt_key

EVICTED = -1


class KVCacheManager:
    def __init__(self, pool: BlockPool):
        self.pool = pool
        self.block_size = pool.block_size
        self.tables: dict[int, list[int]] = {}
        self._hashes: dict[int, list[int]] = {}
        self._registered: dict[int, int] = {}  # seq -> number of leading blocks already published
        self._lossy: set[int] = set()  # seqs whose later KV depends on evicted context
        self.salts: dict[int, str] = {}  # seq -> prefix-cache salt (set by the engine per request)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def table(self, seq_id: int) -> list[int]:
        return self.tables.setdefault(seq_id, [])

    # ------------------------------------------------------------------ prefix cache
    def match_prefix(self, seq_id: int, token_ids: list[int]) -> int:
        """Attach cached blocks for the longest cached prefix of ``token_ids``; returns how many
        tokens need no compute. At least one token is always left to compute (for its logits).
        A sequence whose table holds only blocks matched earlier extends its match from there
        (a waiting sequence picks up what another one published meanwhile)."""
        table = self.table(seq_id)
        salt = self.salts.get(seq_id)
        hashes = block_hashes(token_ids, self.block_size, salt=salt)
        if len(hashes) * self.block_size == len(token_ids):
            hashes = hashes[:-1]  # a fully cached prompt recomputes its last block
        contents = block_contents(token_ids, self.block_size, hashes, salt=salt)
        for h, content in list(zip(hashes, contents))[len(table):]:
            b = self.pool.lookup(h, content)
            if b is None:
                break
            table.append(b)
        self._registered[seq_id] = len(table)
        return len(table) * self.block_size

    def cached_prefix_tokens(self, token_ids: list[int], salt: str | None = None) -> int:
        """Tokens of ``token_ids`` already in the prefix cache (no references taken)."""
        n = 0
        hashes = block_hashes(token_ids, self.block_size, salt=salt)
        for h, content in zip(hashes, block_contents(token_ids, self.block_size, hashes, salt=salt)):
            if not self.pool.is_cached(h, content):
                break
            n += self.block_size
        return n

    def commit(self, seq_id: int, token_ids: list[int], num_computed: int) -> None:
        """Publish the full blocks among the first ``num_computed`` tokens for prefix sharing."""
        if seq_id in self._lossy or not self.pool.enable_prefix_caching:
            return
        table = self.tables.get(seq_id, [])
        done = self._registered.get(seq_id, 0)
        full = min(num_computed // self.block_size, len(table))
        if full <= done:
            return
        hashes = self._hashes.setdefault(seq_id, [])
        salt = self.salts.get(seq_id)
        if len(hashes) < full:
            parent = hashes[-1] if hashes else None
            hashes += block_hashes(token_ids[len(hashes) * self.block_size : full * self.block_size],
                                   self.block_size, parent, salt)
        root = salt_key(salt)
        for i in range(done, full):
            content = (hashes[i - 1] if i else root, tuple(token_ids[i * self.block_size : (i + 1) * self.block_size]))
            self.pool.register(table[i], hashes[i], content)
        self._registered[seq_id] = full

    # ------------------------------------------------------------------ allocation
    def num_new_blocks(self, seq_id: int, num_tokens: int) -> int:
        return max(0, self.blocks_for(num_tokens) - len(self.tables.get(seq_id, [])))

    def allocate(self, seq_id: int, num_tokens: int) -> bool:
        """Grow the table to hold ``num_tokens`` tokens; False (and no change) if the pool is short."""
        need = self.num_new_blocks(seq_id, num_tokens)
        if need > self.pool.num_free():
            return False
        table = self.table(seq_id)
        for _ in range(need):
            table.append(self.pool.allocate())
        return True

    def free(self, seq_id: int) -> None:
        for b in self.tables.pop(seq_id, []):
            if b != EVICTED:
                self.pool.free(b)
        self._hashes.pop(seq_id, None)
        self._registered.pop(seq_id, None)
        self._lossy.discard(seq_id)

    def fork(self, parent: int, child: int, num_tokens: int, share: bool = True) -> list[tuple[int, int]] | None:
        """Share ``parent``'s full blocks with ``child``; copy the partly filled last block
        (copy-on-write at the point where they diverge). ``share=False`` copies every block
        (a token policy rewrites a sequence's blocks in place and scores them per sequence).
        Returns (src, dst) copies for the runner, or None if the pool is short."""
        src = self.tables[parent][: self.blocks_for(num_tokens)]
        if not share:
            if self.pool.num_free() < len(src):
                return None
            copies = [(b, self.pool.allocate()) for b in src]
            self.tables[child] = [d for _, d in copies]
            self._registered[child] = self._registered.get(parent, 0)
            if parent in self._lossy:
                self._lossy.add(child)
            return copies
        partial = num_tokens % self.block_size != 0
        if partial and self.pool.num_free() < 1:
            return None
        table = []
        for b in src[: len(src) - partial]:
            if b != EVICTED:
                self.pool.incref(b)
            table.append(b)
        copies = []
        if partial:
            nb = self.pool.allocate()
            copies.append((src[-1], nb))
            table.append(nb)
        self.tables[child] = table
        self._registered[child] = self._registered.get(parent, 0)
        if parent in self._lossy:
            self._lossy.add(child)
        return copies

    def truncate(self, seq_id: int, num_tokens: int) -> list[int]:
        """Keep only the blocks covering the first ``num_tokens`` stored tokens (after a
        compaction moved the kept tokens to the front); returns the blocks freed."""
        table = self.tables[seq_id]
        keep = self.blocks_for(num_tokens)
        freed = [b for b in table[keep:] if b != EVICTED]
        for b in freed:
            self.pool.free(b)
        del table[keep:]
        self._lossy.add(seq_id)
        self._registered[seq_id] = min(self._registered.get(seq_id, 0), keep)
        return freed

    def held_blocks(self, seq_id: int) -> list[int]:
        return [b for b in self.tables.get(seq_id, []) if b != EVICTED]

    def evict(self, seq_id: int, logical_blocks: list[int]) -> int:
        """Drop blocks chosen by a KV policy; their KV is gone for this sequence. Returns count."""
        table = self.tables[seq_id]
        n = 0
        for i in logical_blocks:
            if table[i] != EVICTED:
                self.pool.free(table[i])
                table[i] = EVICTED
                n += 1
        if n:
            self._lossy.add(seq_id)
        return n
