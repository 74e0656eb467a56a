"""ShadowKV (Sun et al., 2024): low-rank pre-RoPE keys, chunk landmarks, sparse decode that
rebuilds only the keys it needs.

Per layer and KV head, the keys of a long prefix are un-rotated (pre-RoPE) and factored by SVD to
rank ``rank`` (A: P x r, B: r x d); the prefix is cut into chunks of ``chunk`` tokens, each with a
landmark (the mean of its post-RoPE keys); the ``outliers`` share of chunks whose keys agree
least with their landmark (lowest minimum cosine) are kept exact. At decode, each KV head scores
the landmarks (softmax of q · landmark per query head, summed over the head's query group), takes
its ``budget`` share of the best chunks, rebuilds their keys from the factors (A_sel B, then RoPE
at their positions), and attends to them, the outlier chunks and every key after the prefix (the
question and the generated tokens) with their values.

Here it is a query policy (:mod:`slimlm.kvcache.policy.sparse`): factors and landmarks are built
once per (layer, prefix) and shared by requests with the same prefix; decode is native (the sparse
kernel rebuilds the selected keys from the factors); the bytes it reads per decoded token
(landmarks, the B factors, the selected rows of A, the selected values, outliers and the tail)
are counted in ``stats``.

The second tier (``key_share`` > 0; :mod:`slimlm.kvcache.key_tier`): on a CPU there is no faster
memory to move values off, so what it saves is the KV *held*: the pool's keys live in a smaller
key pool, and once a prefix is summarized at every layer (the step after), its full blocks give
their key blocks back; the keys live only as the factors (A, B), the landmarks and the outlier
chunks' exact keys. Decode reads them as before (the selected chunks rebuilt, the outliers from
the record); any other reader reads them rebuilt. With the tier a row's prefix stops at the
longest factored prefix its blocks start with (later keys stay exact), so no summary is built
over rebuilt keys; the prompt is still prefilled densely, so a request's peak is its prefill's.
"""

from __future__ import annotations

import torch

from slimlm.kvcache.policy.base import KV_POLICIES
from slimlm.kvcache.policy.sparse import QueryPolicy, Rebuild
from slimlm.model.rope import apply_rope


@KV_POLICIES.register("shadowkv")
class ShadowKVPolicy(QueryPolicy):
    def __init__(self, rank: int = 16, chunk: int = 8, budget: float = 0.125, outliers: float = 0.02,
                 key_share: float = 0.0, **kw):
        """``rank``: of the pre-RoPE key factors per layer and KV head (< head size); ``chunk``:
        tokens per landmark; ``budget``: share of the prefix's chunks each KV head rebuilds and
        attends; ``outliers``: share of chunks kept exact. ``key_share``: the second tier
        (:mod:`slimlm.kvcache.key_tier`): only this share of the pool's blocks hold keys, a
        factored prefix gives its key blocks back (0: off, every block holds its keys).
        ``prefix``, ``granule``, ``recent``, ``min_prefix``: see :mod:`slimlm.kvcache.policy.sparse`."""
        super().__init__(**kw)
        if isinstance(key_share, bool) or not isinstance(key_share, (int, float)) or not 0 <= key_share <= 1:
            raise ValueError(f"shadowkv key_share must be a fraction in [0, 1], got {key_share!r}")
        self.key_share = float(key_share)
        self._pending: dict[tuple, dict[int, object]] = {}  # prefix key -> layer -> summary, until factored
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"shadowkv rank must be a positive integer, got {rank!r}")
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"shadowkv chunk must be a positive integer, got {chunk!r}")
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1:
            raise ValueError(f"shadowkv budget must be a fraction in (0, 1], got {budget!r}")
        if isinstance(outliers, bool) or not isinstance(outliers, (int, float)) or not 0 <= outliers < 1:
            raise ValueError(f"shadowkv outliers must be a fraction in [0, 1), got {outliers!r}")
        self.rank, self.chunk, self.budget_, self.outliers = rank, chunk, float(budget), float(outliers)

    def __repr__(self) -> str:
        return f"ShadowKVPolicy(rank={self.rank}, chunk={self.chunk}, budget={self.budget_}, key_share={self.key_share})"

    def validate(self, cfg) -> None:
        if self.rank >= cfg.head_dim:
            raise ValueError(f"shadowkv rank {self.rank} is not below the head size {cfg.head_dim} (no saving)")

    def prefix_len(self, q_pos: int) -> int:
        return super().prefix_len(q_pos) // self.chunk * self.chunk

    def summary(self, layer, keys, values, positions, rotary):
        Hkv, P, d = keys.shape
        if torch.equal(positions, torch.arange(P, device=positions.device)):  # the usual prefix: 0 .. P-1
            cos, sin = (t[None] for t in self._rope_table(rotary, P))
            sin = -sin  # rotation by -p undoes RoPE (cos is even, sin odd)
        else:
            cos, sin = rotary(-positions[None], torch.float32)
        pre = apply_rope(keys.float()[None], cos, sin)[0]  # (Hkv, P, d)
        r = min(self.rank, d)
        A, B = self._factor(pre, r)  # (Hkv, P, r), (Hkv, r, d)
        nc = P // self.chunk
        post = keys.float().view(Hkv, nc, self.chunk, d)
        land = post.mean(2)  # (Hkv, nc, d)
        cosim = torch.nn.functional.cosine_similarity(post, land[:, :, None], dim=-1).amin(-1)  # (Hkv, nc)
        n_out = int(self.outliers * nc)
        out = torch.zeros(Hkv, nc, dtype=torch.bool)
        if n_out:
            out.scatter_(1, cosim.topk(n_out, dim=-1, largest=False).indices, True)
        orows = self._outlier_rows(out)  # (Hkv, o): their exact keys, what the second tier keeps
        okeys = keys.float().gather(1, orows[..., None].expand(-1, -1, d)) if self.key_share else None
        return A, B, land, out, positions, orows, okeys

    @staticmethod
    def _factor(pre: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The best rank-``r`` factors A (Hkv, P, r), B (Hkv, r, d) of pre (Hkv, P, d), A B the
        projection of the rows onto their top-r right singular vectors (the truncated SVD's
        product). From the eigenvectors of the d x d Gram matrix (in float64), not an SVD of the
        P x d keys: a summary per sequence and layer is built inside continuous batching, and
        the SVD was 60 % of a batch's time (session 12's profile)."""
        g = pre.double()
        w, V = torch.linalg.eigh(g.transpose(1, 2) @ g)  # ascending eigenvalues, (Hkv, d, d)
        B = V.flip(-1)[..., :r].transpose(1, 2)  # (Hkv, r, d): the top-r right singular vectors
        A = g @ B.transpose(1, 2)  # (Hkv, P, r) = U_r S_r
        return A.float().contiguous(), B.float().contiguous()

    def _outlier_rows(self, out: torch.Tensor) -> torch.Tensor:
        Hkv = out.shape[0]
        offs = torch.arange(self.chunk)
        return (out.nonzero()[:, 1].view(Hkv, int(out[0].sum()))[..., None] * self.chunk + offs).flatten(1)

    def _chunks(self, summary, q) -> tuple[torch.Tensor, int]:
        """(Hkv, n_sel) the chunks each KV head rebuilds, by landmark score (outliers excluded)."""
        A, B, land, out, pos = summary[:5]
        Hkv, nc, d = land.shape
        g = q.shape[0] // Hkv
        s = torch.bmm(q.float().view(Hkv, g, d), land.transpose(1, 2)) / d**0.5  # (Hkv, g, nc)
        s = s.softmax(-1).sum(1).masked_fill(out, float("-inf"))  # outliers are always kept
        n_sel = self._n_sel(nc, int(out[0].sum()))
        # the best n_sel, ties to the lower chunk (as the native selection, kernels/sparse_select.h)
        return s.sort(dim=-1, descending=True, stable=True).indices[:, :n_sel], n_sel

    def _rope_table(self, rotary, P: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos / sin (P, d) of the prefix's positions 0 .. P-1, the same for every layer and row:
        slices of one table, grown in steps of 1024 positions (a batch's rows have different P;
        a table per P was rebuilt at every row). A dynamic RoPE (its frequencies depend on the
        longest position) gets a table of exactly P."""
        have = getattr(self, "_rope", None)
        if have is None or have[0] is not rotary or have[1] < P or (getattr(rotary, "dynamic", False) and have[1] != P):
            n = P if getattr(rotary, "dynamic", False) else -(-P // 1024) * 1024
            cos, sin = rotary(torch.arange(n)[None], torch.float32)
            self._rope = have = (rotary, n, cos[0], sin[0])
        return have[2][:P], have[3][:P]

    def _n_sel(self, nc: int, n_out: int) -> int:
        return min(nc - n_out, max(1, round(self.budget_ * nc)))

    def native_selection(self, summary, P, rotary):
        from slimlm.kernels.sparse_select import SHADOWKV, Selection

        A, B, land, out, pos, out_rows = summary[:6]
        nc = land.shape[1]
        cos, sin = self._rope_table(rotary, P)
        return Selection(SHADOWKV, P, (land, out.view(torch.uint8), out_rows),
                         (nc, self.chunk, self._n_sel(nc, out_rows.shape[1] // self.chunk), out_rows.shape[1]),
                         factors=(A, B, cos, sin))

    def selection_stats(self, sel, counters, Hq, d):
        Hkv, nc = sel.tensors[0].shape[:2]
        r = sel.factors[0].shape[-1]
        m, o = sel.ints[1] * sel.ints[2], sel.ints[3]
        return (Hkv * (nc * d + r * d + m * r + m * d + 2 * o * d)) * self.elem_bytes, m + o

    def native_keys(self, summary, sel, idx, m):
        """The kernel rebuilds RoPE_t(A[t] B) itself; with the second tier every prefix key is given
        (the pool's may be gone): the rebuilt ones and the outliers' exact keys."""
        k_new = Rebuild(*sel.factors, m)
        okeys = summary[6]
        return k_new if okeys is None else torch.cat([k_new.keys(torch.stack(idx)), okeys], 1)

    def select(self, summary, q, k_prefix, rotary, P):
        A, B, land, out, pos = summary[:5]
        Hkv, nc, d = land.shape
        Hq = q.shape[0]
        g = Hq // Hkv
        r = A.shape[-1]
        sel, n_sel = self._chunks(summary, q)
        chunks = torch.zeros(Hkv, nc, dtype=torch.bool)
        chunks.scatter_(1, sel, True)
        rows = chunks.repeat_interleave(self.chunk, 1)  # (Hkv, P) rebuilt rows
        k_new = k_prefix.float().clone()
        cos, sin = rotary(pos[None], torch.float32)  # (1, P, d)
        for h in range(Hkv):
            idx = rows[h].nonzero()[:, 0]
            pre = A[h, idx] @ B[h]  # (n, d)
            k_new[h, idx] = apply_rope(pre[None, None], cos[:, idx], sin[:, idx])[0, 0]
        keep = (rows | out.repeat_interleave(self.chunk, 1)).repeat_interleave(g, 0)  # (Hq, P)
        n_rows = n_sel * self.chunk
        n_out = int(out[0].sum()) * self.chunk
        read = (Hkv * (nc * d + r * d + n_rows * r + n_rows * d + 2 * n_out * d)) * self.elem_bytes
        return keep, k_new, read

    # ------------------------------------------------------------------ second tier
    def _plan(self, g, block_size, cache=None):
        """With the second tier a row's prefix stops at the longest factored prefix its blocks
        start with: the keys after it stay exact (dense), and no summary is ever built over
        rebuilt keys (a growing prefix would otherwise re-factor an approximation)."""
        rows = super()._plan(g, block_size)
        tier = cache.tier if cache is not None else None
        if tier is None or not tier.records:
            return rows
        table = g.blocks.view(len(rows), g.nb).tolist()
        out = []
        for (qp, L, P), tb in zip(rows, table):
            P0 = tier.factored_prefix(tb, P) if P else None
            out.append((qp, L, P0 if P0 is not None else P))
        return out

    def _native_summary(self, layer, cache, blocks, key, P, rotary):
        tier = cache.tier
        if tier is None:
            return super()._native_summary(layer, cache, blocks, key, P, rotary)
        self._rotary = rotary
        if layer == 0:
            self._flush(cache)
        rec = tier.record(key)
        if rec is not None:  # the prefix's keys live as these factors now
            self.stats["summary_hits"] += 1
            return rec.summaries[layer]
        s = super()._native_summary(layer, cache, blocks, key, P, rotary)
        if P // cache.block_size:
            self._pending.setdefault(key, {})[layer] = s
            while len(self._pending) > 4 * self._capacity:
                self._pending.pop(next(iter(self._pending)))
        return s

    def written(self, layer, slots, block_size):
        super().written(layer, slots, block_size)
        if self._pending and slots.numel():
            hit = set(torch.unique(slots // block_size).tolist())
            for key in [k for k in self._pending if not hit.isdisjoint(k[2])]:
                del self._pending[key]

    def _flush(self, cache) -> None:
        """At a step's first layer (nothing of this step read yet): the prefixes summarized at
        every layer give their full blocks' key blocks back to the tier."""
        from slimlm.kvcache.key_tier import Factored

        L, bs = len(cache.spec.layers), cache.block_size
        for key in [k for k, layers in self._pending.items() if len(layers) == L]:
            layers = self._pending.pop(key)
            P = key[1]
            summaries = [layers[i] for i in range(L)]
            rec = Factored(key, tuple(key[2][: P // bs]), summaries, [s[5] for s in summaries],
                           [s[6] for s in summaries], self._rotary)
            cache.tier.factor(rec)
