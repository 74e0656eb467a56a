"""Shared machinery of the *query* policies (``granularity = "query"``: Squeezed Attention,
ShadowKV): they evict nothing; at decode, each query attends to a subset of the stored keys that
it picks by comparing itself with a compact summary of a long fixed prefix (cluster centroids,
chunk landmarks). The summary is built once per prefix and layer and reused by every request
whose prefix is the same (prefix caching shares its blocks).

The prefix of a sequence at a decode step: the keys at positions < P, with P = ``prefix`` if
given, else the largest multiple of ``granule`` that leaves at least ``recent`` keys after it
(so a long prompt's document is the prefix and its question, plus the generated tokens, stay
dense). Rows whose prefix is shorter than ``min_prefix`` attend densely.

A summary is cached under (layer, P, a fingerprint of the prefix keys: their sums per block of
16 positions, exact), so two sequences with the same prefix share it and a reused block can
never serve a stale summary. The cache holds ``cache_entries`` summaries per layer plus one per
decode row of the current step (least recently used dropped first): inside continuous batching
every running sequence has its own prefix, and a cache smaller than the batch rebuilt every
row's summary at every step (session 12: 30 SVDs per summary read, ShadowKV at < 0.12x full KV).

Two seams in the engine. With the native kernels (CPU, a pool format the kernels read), the
decode path calls :meth:`QueryPolicy.attend_native`: the policy picks each KV head's tokens from
the summary (``select_native``) and ``kernels/sparse_decode.c`` attends only those, read in place
from the pool, plus the tail after the prefix — nothing else of the prefix is read. Its summaries
are cached under the prefix's physical blocks (and checked against each block's last stored
row, its first KV head); a write into one of those blocks (a freed block reused) drops the summary
(:meth:`QueryPolicy.written`). Otherwise the PyTorch decode path calls ``decode_attention`` with
the gathered keys/values and the mask (the fingerprint above identifies the prefix).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, NamedTuple

import torch

from slimlm.kvcache.policy.base import KVPolicy


class Rebuild(NamedTuple):
    """Keys a query policy has the sparse kernel rebuild: for the first ``m`` entries of each KV
    head's list, key(t) = RoPE_t(A[h, t] B[h]) (``cos`` / ``sin`` (P, d): the prefix's positions)."""

    A: torch.Tensor  # (Hkv, P, r) float32
    B: torch.Tensor  # (Hkv, r, d) float32
    cos: torch.Tensor
    sin: torch.Tensor
    m: int

    def keys(self, idx: torch.Tensor) -> torch.Tensor:
        """The rebuilt keys (Hkv, m, d) of the first m entries of ``idx`` (Hkv, n), in PyTorch."""
        from slimlm.model.rope import apply_rope

        rows = idx[:, : self.m]
        pre = torch.bmm(self.A.gather(1, rows[..., None].expand(-1, -1, self.A.shape[2])), self.B)
        return apply_rope(pre[:, None], self.cos[rows], self.sin[rows])[:, 0]


class QueryPolicy(KVPolicy):
    granularity = "query"
    sparse_decode = True

    def __init__(self, prefix: int | None = None, granule: int = 64, recent: int = 32, min_prefix: int = 64,
                 cache_entries: int = 8):
        for name, x in (("granule", granule), ("min_prefix", min_prefix), ("cache_entries", cache_entries)):
            if isinstance(x, bool) or not isinstance(x, int) or x < 1:
                raise ValueError(f"{self.name} {name} must be a positive integer, got {x!r}")
        if isinstance(recent, bool) or not isinstance(recent, int) or recent < 0:
            raise ValueError(f"{self.name} recent must be >= 0, got {recent!r}")
        if prefix is not None and (isinstance(prefix, bool) or not isinstance(prefix, int) or prefix < 1):
            raise ValueError(f"{self.name} prefix must be a positive token count, got {prefix!r}")
        self.prefix, self.granule, self.recent, self.min_prefix = prefix, granule, recent, min_prefix
        self.cache_entries = cache_entries
        self._capacity = cache_entries
        """Summaries kept per layer: ``cache_entries`` plus the decode rows of the current step
        (:meth:`begin_step`), so a batch of more distinct prefixes than ``cache_entries`` never
        evicts a summary it is about to read again (each row would rebuild it every step)."""
        self._cache: dict[int, OrderedDict] = {}
        self._sel_memo: dict[int, tuple] = {}  # layer -> (summaries, their native selections, C arrays)
        self._stale: tuple | None = None  # (slots, block_size, their blocks): one step's writes
        self.stats: dict[str, int] = {"decode_rows": 0, "summaries_built": 0, "summary_hits": 0,
                                      "keys_stored": 0, "keys_attended": 0, "bytes_full": 0, "bytes_read": 0}
        """Deterministic counters: per decoded (row, layer), keys stored vs attended and the KV
        bytes a full read and this method read (elements x the compute dtype's size)."""
        self.elem_bytes = 2

    def begin_step(self, decode_rows: int) -> None:
        """A step with ``decode_rows`` single-token decodes starts (``PagedAttention``)."""
        self._capacity = self.cache_entries + decode_rows

    def prefix_len(self, q_pos: int) -> int:
        if self.prefix is not None:
            return min(self.prefix, q_pos)
        return max(0, (q_pos - self.recent) // self.granule * self.granule)

    def summary(self, layer: int, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
                rotary) -> Any:
        """keys, values (Hkv, P, d) of one prefix (post-RoPE, as stored), positions (P,)."""
        raise NotImplementedError

    def _cached(self, layer: int, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, rotary) -> Any:
        P = k.shape[1]
        fp = k.float().view(k.shape[0], -1, 16, k.shape[2]).sum(2) if P % 16 == 0 else k.float().sum(1)
        entries = self._cache.setdefault(layer, OrderedDict())
        key = (P, float(fp.double().sum()))  # a hash; equality of the fingerprints is checked
        hit = entries.get(key)
        if hit is not None and hit[0].shape == fp.shape and torch.equal(hit[0], fp):
            entries.move_to_end(key)
            self.stats["summary_hits"] += 1
            return hit[1]
        s = self.summary(layer, k.clone(), v.clone(), pos.clone(), rotary)
        self.stats["summaries_built"] += 1
        entries[key] = (fp, s)
        while len(entries) > self._capacity:
            entries.popitem(last=False)
        return s

    def decode_attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                         q_pos: torch.Tensor, k_pos: torch.Tensor, rotary):
        """q (B, Hq, 1, d); k, v (B, Hkv, S, d) in storage order; mask (B, 1, 1, S); q_pos (B, 1);
        k_pos (B, S) (-1: padding). Returns (k, v, mask) with mask (B, Hq, 1, S)."""
        B, Hq = q.shape[:2]
        Hkv, S, d = k.shape[1:]
        self.elem_bytes = k.element_size()  # the compute dtype the pool is read in
        out_mask = mask.expand(B, Hq, 1, S).clone()
        cloned = False
        for b in range(B):
            qp = int(q_pos[b, 0])
            P = self.prefix_len(qp)
            kp = k_pos[b]
            valid = mask[b, 0, 0]
            n_valid = int(valid.sum())
            self.stats["decode_rows"] += 1
            self.stats["keys_stored"] += n_valid
            self.stats["bytes_full"] += 2 * n_valid * Hkv * d * self.elem_bytes
            # the prefix must be stored in order, uncompacted: positions 0 .. P-1 in rows 0 .. P-1
            if P < self.min_prefix or P > S or not torch.equal(kp[:P], torch.arange(P, device=kp.device)):
                self.stats["keys_attended"] += n_valid
                self.stats["bytes_read"] += 2 * n_valid * Hkv * d * self.elem_bytes
                continue
            s = self._cached(layer, k[b, :, :P], v[b, :, :P], kp[:P], rotary)
            keep, k_new, read = self.select(s, q[b, :, 0], k[b, :, :P], rotary, P)  # keep (Hq, P) bool
            if k_new is not None:
                if not cloned:  # k may be the cache's gather workspace
                    k, cloned = k.clone(), True
                k[b, :, :P] = k_new.to(k.dtype)
            out_mask[b, :, 0, :P] &= keep
            tail = int(valid[P:].sum())
            self.stats["keys_attended"] += int(keep.sum()) // Hq + tail
            self.stats["bytes_read"] += read + 2 * tail * Hkv * d * self.elem_bytes
        return k, v, out_mask

    # ------------------------------------------------------------------ native path
    def written(self, layer: int, slots: torch.Tensor, block_size: int) -> None:
        """Slots of ``layer`` were just written: drop the native summaries over those blocks."""
        entries = self._cache.get(layer)
        if not entries or slots.numel() == 0:
            return
        stale = None
        for key, (blocks, _, _) in entries.items():
            if key[0] == "blocks":
                if stale is None:  # every layer of a step writes the same slots
                    if self._stale is None or self._stale[0] is not slots or self._stale[1] != block_size:
                        self._stale = (slots, block_size, set(torch.unique(slots // block_size).tolist()))
                    stale = self._stale[2]
                if not stale.isdisjoint(blocks):
                    entries[key] = None  # marked; removed below
        for key in [k for k, e in entries.items() if e is None]:
            del entries[key]

    def _plan(self, g, block_size: int, cache=None) -> list[tuple[int, int, int]]:
        """Per row of a decode group (q_pos, keys L, prefix P or 0 for a dense row); the same for
        every layer of the step."""
        rows = []
        for b in range(g.q_pos.shape[0]):
            qp = int(g.q_pos[b, 0])
            L, P = qp + 1, self.prefix_len(qp)
            kp = g.k_pos[b]
            in_order = L <= kp.numel() and torch.equal(kp[:L], torch.arange(L, device=kp.device))
            rows.append((qp, L, P if in_order and self.min_prefix <= P <= L else 0))
        return rows

    def _native_summary(self, layer: int, cache, blocks: torch.Tensor, key: tuple, P: int, rotary) -> Any:
        """The summary of the prefix held in ``blocks``; ``key`` = ("blocks", P, the block ids)."""
        raw = cache.pools(layer)[0][0]  # (num_blocks, block_size, Hkv, ...): the stored key rows
        if cache.tier is None:  # each block's last stored row, first KV head (index_select: the cheap gather)
            check = raw[:, -1, 0].index_select(0, blocks)
        else:  # at the key blocks; a factored block (no key block, read-only) checks as zeros
            kb = cache.tier.map[blocks]
            check = raw[kb.clamp(min=0), -1] * (kb >= 0).view(-1, *[1] * (raw.dim() - 2)).to(raw.dtype)
        entries = self._cache.setdefault(layer, OrderedDict())
        hit = entries.get(key)
        if hit is not None and torch.equal(hit[1], check):
            entries.move_to_end(key)
            self.stats["summary_hits"] += 1
            return hit[2]
        k = cache.gather("k", layer, blocks).flatten(0, 1)[:P].transpose(0, 1).clone()  # (Hkv, P, d)
        v = cache.gather("v", layer, blocks).flatten(0, 1)[:P].transpose(0, 1).clone()
        s = self.summary(layer, k, v, torch.arange(P, device=k.device), rotary)
        self.stats["summaries_built"] += 1
        entries[key] = (set(key[2]), check.clone(), s)
        while len(entries) > self._capacity:
            entries.popitem(last=False)
        return s

    def attend_native(self, lib, layer: int, q: torch.Tensor, cache, g, rotary, scale: float,
                      meta: dict) -> torch.Tensor:
        """The decode group ``g``'s attention with the native sparse kernel: q (B, Hq, d) in the
        model's space -> (B, Hq, d) float32. ``meta``: a dict kept for this step and group."""
        from slimlm.kernels.sparse_select import native_sparse_select_decode

        B, Hq, d = q.shape
        bs = cache.block_size
        if "plan" not in meta:
            meta["plan"], meta["table"] = self._plan(g, bs, cache), g.blocks.view(B, g.nb)
            meta["keys"] = [("blocks", P, tuple(meta["table"][b, : -(-P // bs)].tolist())) if P else None
                            for b, (_, _, P) in enumerate(meta["plan"])]
            meta["tail"] = torch.tensor([[P, L] for _, L, P in meta["plan"]], dtype=torch.int64).view(B, 2)
        plan, table = meta["plan"], meta["table"]
        Hkv = cache.spec.num_kv_heads
        self.elem_bytes = torch.empty((), dtype=cache.spec.compute_dtype).element_size()
        kp, vp = cache.pools(layer)
        if cache.tier is not None or cache.codec.rotates or cache.codec.offset(kp) is not None:
            return self._attend_lists(lib, layer, q, cache, rotary, scale, meta)
        summaries = []  # one pass: the kernel selects (sparse_select.h) and attends each (row, KV head)
        for b, (qp, L, P) in enumerate(plan):
            self._count_row(L, P, Hkv, d)
            summaries.append(self._native_summary(layer, cache, table[b, : -(-P // bs)], meta["keys"][b], P, rotary)
                             if P else None)
        memo = self._sel_memo.get(layer)  # the same summaries as this layer's last call: its selections too
        if memo is None or len(memo[0]) != len(summaries) or any(x is not y for x, y in zip(memo[0], summaries)):
            sels = [self.native_selection(s, P, rotary) if s is not None else None
                    for s, (_, _, P) in zip(summaries, plan)]
            memo = self._sel_memo[layer] = (summaries, sels, {})
        sels = memo[1]
        o, counters = native_sparse_select_decode(lib, q, kp, vp, cache.codec.native_code, table, sels, meta["tail"],
                                                  scale, memo[2], check_table=layer == meta.setdefault("first", layer))
        for sel, c in zip(sels, counters.sum(1).tolist()):
            if sel is not None:
                read, attended = self.selection_stats(sel, c, Hq, d)
                self.stats["keys_attended"] += attended
                self.stats["bytes_read"] += read
        return cache.vcodec.from_storage(o)

    def _count_row(self, L: int, P: int, Hkv: int, d: int) -> None:
        """A decoded (row, layer)'s counters, all but the prefix's selected part."""
        full = 2 * L * Hkv * d * self.elem_bytes
        self.stats["decode_rows"] += 1
        self.stats["keys_stored"] += L
        self.stats["bytes_full"] += full
        self.stats["keys_attended"] += L - P
        self.stats["bytes_read"] += full if not P else 2 * (L - P) * Hkv * d * self.elem_bytes

    def _attend_lists(self, lib, layer: int, q: torch.Tensor, cache, rotary, scale: float, meta: dict) -> torch.Tensor:
        """attend_native through per-row entry lists: a key tier, or keys stored rotated / offset
        (rebuilt keys are mapped into the stored space here)."""
        from slimlm.kernels.ops import native_sparse_decode

        B, Hq, d = q.shape
        bs = cache.block_size
        plan, table = meta["plan"], meta["table"]
        Hkv = cache.spec.num_kv_heads
        picks = []
        for b, (qp, L, P) in enumerate(plan):
            self._count_row(L, P, Hkv, d)
            if not P:
                picks.append(None)
                continue
            s = self._native_summary(layer, cache, table[b, : -(-P // bs)], meta["keys"][b], P, rotary)
            idx, qmask, kbuf, read, attended = self.select_native(s, q[b], rotary, P)
            picks.append((idx, qmask, kbuf))
            self.stats["keys_attended"] += attended
            self.stats["bytes_read"] += read
        tail = meta["tail"].clone()
        if cache.tier is not None:  # keys of factored blocks after a row's own prefix: rebuilt
            picks = self._factored_tail(layer, cache, table, plan, picks, tail)
        N = max([int(i.numel()) for p in picks if p is not None for i in p[0]], default=0)
        G = Hq // Hkv
        idx = torch.zeros(B, Hkv, N, dtype=torch.int32)
        cnt = torch.zeros(B, Hkv, dtype=torch.int64)
        has_mask = any(p is not None and p[1] is not None for p in picks)
        kp, vp = cache.pools(layer)
        if cache.codec.rotates or cache.codec.offset(kp) is not None:  # keys stored as (x - mu) @ R: rebuild here
            picks = [p if p is None or not isinstance(p[2], Rebuild) else (p[0], p[1], p[2].keys(torch.stack(p[0])))
                     for p in picks]
        factors = [p[2] if p is not None and isinstance(p[2], Rebuild) else None for p in picks]
        if not any(f is not None for f in factors):
            factors = None
        has_k = any(p is not None and p[2] is not None for p in picks) and factors is None
        qmask = torch.zeros(B, Hkv, G, N, dtype=torch.bool) if has_mask else None
        kbuf = torch.zeros(B, Hkv, N, d, dtype=torch.float32) if has_k else None
        nbuf = torch.zeros(B, Hkv, dtype=torch.int64) if has_k or factors is not None else None
        for b, p in enumerate(picks):
            if p is None:
                if qmask is not None:
                    qmask[b] = True
                continue
            for h, i in enumerate(p[0]):
                n = int(i.numel())
                idx[b, h, :n] = i
                cnt[b, h] = n
                if qmask is not None:
                    qmask[b, h, :, :n] = p[1][h] if p[1] is not None else True
            if isinstance(p[2], Rebuild):
                nbuf[b] = p[2].m
            elif p[2] is not None:
                m = p[2].shape[1]
                kbuf[b, :, :m] = cache.codec.keys_to_storage(p[2], kp)  # stored keys are (k - mu) @ R
                nbuf[b] = m
        qs = cache.codec.to_storage(q).float().contiguous()
        ktable = cache.tier.map[table] if cache.tier is not None else None
        o = native_sparse_decode(lib, qs, kp, vp, cache.codec.native_code, table, idx, cnt, tail, scale, qmask, kbuf,
                                 nbuf, [f[:4] if f is not None else None for f in factors] if factors else None, ktable)
        return cache.vcodec.from_storage(o)

    @staticmethod
    def _factored_tail(layer, cache, table, plan, picks, tail):
        """With a key tier, a row's dense part may start inside blocks another sequence's prefix
        factored (shared through prefix caching): those tokens join the row's list with their
        keys rebuilt, and its dense tail starts after them (``tail`` updated in place)."""
        bs, kmap = cache.block_size, cache.tier.map
        out = []
        for b, ((qp, L, P), p) in enumerate(zip(plan, picks)):
            gone = kmap[table[b, : -(-L // bs)]] < 0
            f = int(gone.long().cumprod(0).sum())  # leading factored blocks (a prefix is shared from 0)
            if f * bs <= P:
                out.append(p)
                continue
            lo, hi = P, min(f * bs, L)
            keys = cache.gather("k", layer, table[b, P // bs : f]).flatten(0, 1)[: hi - lo].transpose(0, 1)
            toks = torch.arange(lo, hi)
            if p is None:
                p = ([toks] * keys.shape[0], None, keys.float())
            else:
                idx, qmask, kb = p
                if qmask is not None:
                    qmask = [torch.cat([m, m.new_ones(m.shape[0], hi - lo)], 1) for m in qmask]
                p = ([torch.cat([i, toks.to(i.dtype)]) for i in idx], qmask, torch.cat([kb, keys.float()], 1))
            tail[b, 0] = hi
            out.append(p)
        return out

    def native_selection(self, summary: Any, P: int, rotary):
        """The summary as the native selection reads it (a ``kernels.sparse_select.Selection``)."""
        raise NotImplementedError

    def selection_stats(self, sel, counters: list[int], Hq: int, d: int) -> tuple[int, int]:
        """(bytes read for the prefix, prefix keys attended per query head) of one row from its
        items' counters (per KV head: entries, entries taken summed over the group, fine clusters
        scored); updates the policy's own counters."""
        raise NotImplementedError

    def native_keys(self, summary: Any, sel, idx: list[torch.Tensor], m: int):
        """The keys the kernel takes for the first ``m`` entries: a :class:`Rebuild`, (Hkv, m', d)
        float32 keys, or None (every key read from the pool)."""
        return None

    def select_native(self, summary: Any, q: torch.Tensor, rotary, P: int):
        """q (Hq, d) -> (idx: per KV head the prefix tokens it reads (n_h,), qmask: per KV head
        (G, n_h) bool of the query heads that take each (None: all), rebuilt keys (Hkv, m, d) of
        every head's first m entries, or a :class:`Rebuild` the kernel applies, or None, bytes read
        for the prefix, prefix keys attended per query head). Selected in C
        (``kernels/sparse_select.h``), as :meth:`select` picks."""
        from slimlm.kernels.sparse_select import native_sparse_select

        sel = self.native_selection(summary, P, rotary)
        Hkv = sel.tensors[0].shape[0]
        idx, cnt, qmask, nbuf, counters = native_sparse_select(None, q[None], [sel], Hkv)
        n = cnt[0].tolist()
        ids = [idx[0, h, : n[h]].long() for h in range(Hkv)]
        qm = [qmask[0, h, :, : n[h]] for h in range(Hkv)] if qmask is not None else None
        read, attended = self.selection_stats(sel, counters.view(-1, counters.shape[-1]).sum(0).tolist(), q.shape[0],
                                              q.shape[1])
        return ids, qm, self.native_keys(summary, sel, ids, int(nbuf[0, 0])), read, attended

    def select(self, summary: Any, q: torch.Tensor, k_prefix: torch.Tensor, rotary, P: int):
        """q (Hq, d) -> (keep (Hq, P) bool, rebuilt prefix keys (Hkv, P, d) or None, bytes read
        for the prefix)."""
        raise NotImplementedError

    def reset(self, seq_id: int) -> None:
        pass
