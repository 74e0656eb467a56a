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
never serve a stale summary. The cache holds ``cache_entries`` summaries per layer (least
recently used dropped first).

The seam in the engine: ``AttentionPaths.sparse`` (the policy) is called by the PyTorch decode
path with the gathered keys/values and the mask (the native decode kernel is not used).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch

from slimlm.kvcache.policy.base import KVPolicy


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
        self._cache: dict[int, OrderedDict] = {}
        self.stats: dict[str, int] = {"decode_rows": 0, "summaries_built": 0, "summary_hits": 0,
                                      "keys_stored": 0, "keys_attended": 0, "bytes_full": 0, "bytes_read": 0}
        """Deterministic counters: per decoded (row, layer), keys stored vs attended and the KV
        bytes a full read and this method read (elements x the compute dtype's size)."""
        self.elem_bytes = 2

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
        while len(entries) > self.cache_entries:
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

    def select(self, summary: Any, q: torch.Tensor, k_prefix: torch.Tensor, rotary, P: int):
        """q (Hq, d) -> (keep (Hq, P) bool, rebuilt prefix keys (Hkv, P, d) or None, bytes read
        for the prefix)."""
        raise NotImplementedError

    def reset(self, seq_id: int) -> None:
        pass
