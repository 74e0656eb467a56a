"""Squeezed Attention (Hooper et al., 2024): accelerating long-context inference with a fixed
context shared by many requests (a system prompt, a document).

Offline, once per shared prefix: the prefix's keys are clustered per layer and KV head (k-means;
``clusters`` centroids, ``iters`` Lloyd iterations from evenly spaced keys, deterministic). At
decode, each query head scores the centroids of its KV head (q · c) and attends only to the keys
of its best clusters, taken in score order until they hold ``budget`` of the prefix's keys; the
keys after the prefix (the question, the generated tokens) are always attended.

Hierarchical lookup (``levels=2``, the paper's two levels): the fine centroids are themselves
clustered into ``coarse`` centroids per KV head; at decode a query head scores the coarse
centroids first, keeps the best coarse clusters until they hold ``coarse_budget`` of the prefix's
keys, and scores only the fine centroids inside them. The centroid bytes a decode step reads
(``stats["centroid_bytes"]``, against ``stats["centroid_bytes_flat"]`` for one level) is the
selection cost it cuts.

Here it is a query policy (:mod:`slimlm.kvcache.policy.sparse`): the clustering is cached per
(layer, prefix) and shared by every request whose prefix is the same (with prefix caching the
blocks themselves are shared too), so it is done once per shared prefix. The KV pool still holds
every key (Squeezed Attention saves reads, not storage); the bytes it reads per decoded token
(centroids + the selected keys and values + the tail) are counted in ``stats``. Decode is native
where the sparse kernel reads the pool (each KV head reads the union of its query heads'
clusters in place), else the PyTorch path masks the gathered keys.
"""

from __future__ import annotations

import torch

from slimlm.kvcache.policy.base import KV_POLICIES
from slimlm.kvcache.policy.sparse import QueryPolicy


def kmeans(x: torch.Tensor, k: int, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x (N, d) or (H, N, d): one clustering per leading index -> centroids (k, d) / (H, k, d),
    assignment (N,) / (H, N). Deterministic: initial centroids are the points at evenly spaced
    indices; an empty cluster keeps its centroid. The heads run batched (one summary per prefix,
    layer and sequence inside continuous batching: the per-head loop was most of a batch's time)."""
    if x.dim() == 2:
        c, a = kmeans(x[None], k, iters)
        return c[0], a[0]
    x = x.float()
    H, N, d = x.shape
    c = x[:, torch.linspace(0, N - 1, k).round().long()].clone()  # (H, k, d)
    a = torch.zeros(H, N, dtype=torch.long, device=x.device)
    base = (torch.arange(H, device=x.device) * k)[:, None]  # each head's clusters in one flat index
    for _ in range(iters):
        # ||x - c||^2 without the ||x||^2 term (the same for every centroid of a point)
        a = torch.baddbmm((c * c).sum(-1)[:, None, :], x, c.transpose(1, 2), alpha=-2).min(-1).indices  # (H, N): argmin
        flat = (a + base).view(-1)
        sums = torch.zeros(H * k, d, dtype=x.dtype, device=x.device).index_add_(0, flat, x.reshape(-1, d))
        counts = torch.bincount(flat, minlength=H * k).to(x.dtype)
        nz = counts > 0
        c = c.view(-1, d)
        c[nz] = sums[nz] / counts[nz, None]
        c = c.view(H, k, d)
    return c, a


@KV_POLICIES.register("squeezed")
class SqueezedPolicy(QueryPolicy):
    def __init__(self, budget: float = 0.25, clusters: int | float = 1 / 16, iters: int = 8, levels: int = 1,
                 coarse: float = 1 / 8, coarse_budget: float | None = None, **kw):
        """``budget``: share of the prefix's keys each query head attends (0, 1]; ``clusters``:
        centroids per layer and KV head, a count or a share of the prefix's tokens (default 1/16);
        ``iters``: k-means iterations; ``levels``: 1, or 2 for the hierarchical lookup with
        ``coarse`` x the fine centroids as coarse ones (at least 1), whose best clusters are kept
        until they hold ``coarse_budget`` of the keys (default: min(1, 2 x budget)). ``prefix`` (tokens of the shared context; default: all but
        the recent tail, in multiples of ``granule``), ``granule``, ``recent``, ``min_prefix``: see
        :mod:`slimlm.kvcache.policy.sparse`."""
        super().__init__(**kw)
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1:
            raise ValueError(f"squeezed budget must be a fraction in (0, 1], got {budget!r}")
        if isinstance(clusters, bool) or not isinstance(clusters, (int, float)) or clusters <= 0 \
                or (isinstance(clusters, float) and clusters > 1):
            raise ValueError(f"squeezed clusters must be a count >= 1 or a share in (0, 1], got {clusters!r}")
        if isinstance(clusters, int) and self.prefix is not None and clusters > self.prefix:
            raise ValueError(f"squeezed clusters ({clusters}) exceed the prefix's {self.prefix} keys")
        if isinstance(clusters, int) and clusters > max(self.min_prefix, self.prefix or 0):
            raise ValueError(f"squeezed clusters ({clusters}) exceed the keys of the shortest prefix clustered "
                             f"(min_prefix {self.min_prefix}); raise min_prefix or lower clusters")
        if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
            raise ValueError(f"squeezed iters must be >= 1, got {iters!r}")
        if levels not in (1, 2) or isinstance(levels, bool):
            raise ValueError(f"squeezed levels must be 1 or 2, got {levels!r}")
        if isinstance(coarse, bool) or not isinstance(coarse, (int, float)) or not 0 < coarse <= 1:
            raise ValueError(f"squeezed coarse must be a share of the fine centroids in (0, 1], got {coarse!r}")
        if coarse_budget is None:
            coarse_budget = min(1.0, 2 * float(budget))
        if isinstance(coarse_budget, bool) or not isinstance(coarse_budget, (int, float)) \
                or not budget <= coarse_budget <= 1:
            raise ValueError(f"squeezed coarse_budget must be in [budget, 1], got {coarse_budget!r}")
        self.budget_, self.clusters, self.iters = float(budget), clusters, iters
        self.levels, self.coarse, self.coarse_budget = levels, float(coarse), float(coarse_budget)
        self.stats.update(centroid_bytes=0, centroid_bytes_flat=0)

    def __repr__(self) -> str:
        return (f"SqueezedPolicy(budget={self.budget_}, clusters={self.clusters}, prefix={self.prefix}, "
                f"levels={self.levels})")

    def n_clusters(self, P: int) -> int:
        c = self.clusters if isinstance(self.clusters, int) else max(1, round(self.clusters * P))
        return min(c, P)

    def summary(self, layer, keys, values, positions, rotary):
        Hkv = keys.shape[0]
        C = self.n_clusters(keys.shape[1])
        cents, assign = kmeans(keys, C, self.iters)  # (Hkv, C, d), (Hkv, P)
        sizes = torch.zeros(Hkv, C, dtype=torch.long).scatter_add_(1, assign, torch.ones_like(assign))  # (Hkv, C)
        if self.levels == 1:
            return cents, assign, sizes, None
        C1 = max(1, round(self.coarse * C))
        top, up = kmeans(cents, C1, self.iters)  # over the centroids; up (Hkv, C): each fine cluster's coarse one
        csizes = torch.zeros(Hkv, C1, dtype=sizes.dtype).scatter_add_(1, up, sizes)  # keys per coarse
        return cents, assign, sizes, (top, up, csizes)

    @staticmethod
    def _take(scores, sizes, need) -> torch.Tensor:
        """(Hq, C) bool: clusters in score order (ties to the lower index, as the native
        selection) until they hold ``need`` keys."""
        order = scores.argsort(dim=-1, descending=True, stable=True)
        srt = sizes.gather(-1, order)
        take_sorted = (srt.cumsum(-1) - srt) < need
        return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, order, take_sorted)

    def _chosen(self, summary, q, P) -> torch.Tensor:
        """(Hq, C) bool: the clusters each query head attends (and the centroid bytes read)."""
        cents, assign, sizes, coarse = summary
        Hkv, C, d = cents.shape
        Hq = q.shape[0]
        G = Hq // Hkv
        kv_of = torch.arange(Hq, device=q.device) // G
        scores = torch.bmm(q.float().view(Hkv, G, d), cents.transpose(1, 2)).view(Hq, C)  # (Hq, C)
        flat = Hkv * C * d * self.elem_bytes
        self.stats["centroid_bytes_flat"] += flat
        if coarse is None:
            self.stats["centroid_bytes"] += flat
            return self._take(scores, sizes[kv_of], self.budget_ * P)
        top, up, csizes = coarse
        cs = torch.bmm(q.float().view(Hkv, G, d), top.transpose(1, 2)).view(Hq, -1)  # (Hq, C1)
        allowed = self._take(cs, csizes[kv_of], self.coarse_budget * P).gather(-1, up[kv_of])  # (Hq, C)
        # only the allowed fine centroids are scored (read once per KV head for its query group)
        fine_read = int(allowed.view(Hkv, G, C).any(1).sum())
        self.stats["centroid_bytes"] += (Hkv * top.shape[1] + fine_read) * d * self.elem_bytes
        return self._take(scores.masked_fill(~allowed, float("-inf")), sizes[kv_of] * allowed, self.budget_ * P) & allowed

    def native_selection(self, summary, P, rotary):
        from slimlm.kernels.sparse_select import SQUEEZED, Selection

        cents, assign, sizes, coarse = summary
        C1 = coarse[0].shape[1] if coarse is not None else 0
        return Selection(SQUEEZED, P, (cents, assign, sizes, *(coarse or ())), (cents.shape[1], C1, 0, 0),
                         self.budget_ * P, self.coarse_budget * P)

    def selection_stats(self, sel, counters, Hq, d):
        n_read, taken, fine = counters
        Hkv, C = sel.tensors[0].shape[:2]
        flat = Hkv * C * d * self.elem_bytes
        cbytes = flat if not sel.ints[1] else (Hkv * sel.ints[1] + fine) * d * self.elem_bytes
        self.stats["centroid_bytes_flat"] += flat
        self.stats["centroid_bytes"] += cbytes
        return cbytes + 2 * n_read * d * self.elem_bytes, taken // Hq

    def select(self, summary, q, k_prefix, rotary, P):
        cents, assign = summary[:2]
        Hkv, C, d = cents.shape
        Hq = q.shape[0]
        g = Hq // Hkv
        kv_of = torch.arange(Hq, device=q.device) // g
        c0 = self.stats["centroid_bytes"]
        chosen = self._chosen(summary, q, P)
        cbytes = self.stats["centroid_bytes"] - c0
        keep = chosen.gather(-1, assign[kv_of])  # (Hq, P)
        union = keep.view(Hkv, g, P).any(1).sum()  # keys read per KV head (shared by its query heads)
        read = cbytes + 2 * int(union) * d * self.elem_bytes
        return keep, None, read
