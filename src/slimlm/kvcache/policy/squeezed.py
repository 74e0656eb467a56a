"""Squeezed Attention (Hooper et al., 2024): accelerating long-context inference with a fixed
context shared by many requests (a system prompt, a document).

Offline, once per shared prefix: the prefix's keys are clustered per layer and KV head (k-means;
``clusters`` centroids, ``iters`` Lloyd iterations from evenly spaced keys, deterministic). At
decode, each query head scores the centroids of its KV head (q · c) and attends only to the keys
of its best clusters, taken in score order until they hold ``budget`` of the prefix's keys; the
keys after the prefix (the question, the generated tokens) are always attended. The paper's
hierarchical (two-level) centroid lookup is not built: one level.

Here it is a query policy (:mod:`slimlm.kvcache.policy.sparse`): the clustering is cached per
(layer, prefix) and shared by every request whose prefix is the same (with prefix caching the
blocks themselves are shared too), so it is done once per shared prefix. The KV pool still holds
every key (Squeezed Attention saves reads, not storage); the bytes it reads per decoded token
(centroids + the selected keys and values + the tail) are counted in ``stats``. The PyTorch
decode path applies it (the native decode kernel is not used), so the read saving is accounted,
not yet a speed-up on this path.
"""

from __future__ import annotations

import torch

from slimlm.kvcache.policy.base import KV_POLICIES
from slimlm.kvcache.policy.sparse import QueryPolicy


def kmeans(x: torch.Tensor, k: int, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x (N, d) -> centroids (k, d), assignment (N,). Deterministic: initial centroids are the
    points at evenly spaced indices; an empty cluster keeps its centroid."""
    x = x.float()
    N = x.shape[0]
    c = x[torch.linspace(0, N - 1, k).round().long()].clone()
    a = torch.zeros(N, dtype=torch.long, device=x.device)
    for _ in range(iters):
        d2 = (x * x).sum(-1, keepdim=True) - 2 * x @ c.T + (c * c).sum(-1)[None]  # (N, k)
        a = d2.argmin(-1)
        sums = torch.zeros_like(c).index_add_(0, a, x)
        counts = torch.bincount(a, minlength=k).to(x.dtype)
        nz = counts > 0
        c[nz] = sums[nz] / counts[nz, None]
    return c, a


@KV_POLICIES.register("squeezed")
class SqueezedPolicy(QueryPolicy):
    def __init__(self, budget: float = 0.25, clusters: int | float = 1 / 16, iters: int = 8, **kw):
        """``budget``: share of the prefix's keys each query head attends (0, 1]; ``clusters``:
        centroids per layer and KV head, a count or a share of the prefix's tokens (default 1/16);
        ``iters``: k-means iterations. ``prefix`` (tokens of the shared context; default: all but
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
        self.budget_, self.clusters, self.iters = float(budget), clusters, iters

    def __repr__(self) -> str:
        return f"SqueezedPolicy(budget={self.budget_}, clusters={self.clusters}, prefix={self.prefix})"

    def n_clusters(self, P: int) -> int:
        c = self.clusters if isinstance(self.clusters, int) else max(1, round(self.clusters * P))
        return min(c, P)

    def summary(self, layer, keys, values, positions, rotary):
        C = self.n_clusters(keys.shape[1])
        cents, assigns = zip(*(kmeans(keys[h], C, self.iters) for h in range(keys.shape[0])))
        assign = torch.stack(assigns)  # (Hkv, P)
        sizes = torch.stack([torch.bincount(a, minlength=C) for a in assigns])  # (Hkv, C)
        return torch.stack(cents), assign, sizes  # (Hkv, C, d), (Hkv, P), (Hkv, C)

    def _chosen(self, summary, q, P) -> torch.Tensor:
        """(Hq, C) bool: the clusters each query head attends."""
        cents, assign, sizes = summary
        Hkv, C, d = cents.shape
        Hq = q.shape[0]
        kv_of = torch.arange(Hq, device=q.device) // (Hq // Hkv)
        scores = torch.bmm(q.float().view(Hkv, Hq // Hkv, d), cents.transpose(1, 2)).view(Hq, C)  # (Hq, C)
        sizes = sizes[kv_of]  # (Hq, C)
        order = scores.argsort(-1, descending=True)
        cum = sizes.gather(-1, order).cumsum(-1)
        need = self.budget_ * P
        take_sorted = (cum - sizes.gather(-1, order)) < need  # clusters until the budget is covered
        chosen = torch.zeros(Hq, C, dtype=torch.bool, device=q.device)
        chosen.scatter_(-1, order, take_sorted)
        return chosen

    def select_native(self, summary, q, rotary, P):
        cents, assign, _ = summary
        Hkv, C, d = cents.shape
        Hq = q.shape[0]
        chosen = self._chosen(summary, q, P).view(Hkv, Hq // Hkv, C)
        union = chosen.any(1).gather(-1, assign)  # (Hkv, P): keys some query head of the group takes
        idx = [union[h].nonzero()[:, 0] for h in range(Hkv)]
        qmask = [chosen[h][:, assign[h, i]] for h, i in enumerate(idx)]  # (G, n_h)
        n_read = sum(int(i.numel()) for i in idx)
        read = (Hkv * C * d + 2 * n_read * d) * self.elem_bytes
        attended = sum(int(m.sum()) for m in qmask) // Hq
        return idx, qmask, None, read, attended

    def select(self, summary, q, k_prefix, rotary, P):
        cents, assign, _ = summary
        Hkv, C, d = cents.shape
        Hq = q.shape[0]
        g = Hq // Hkv
        kv_of = torch.arange(Hq, device=q.device) // g
        chosen = self._chosen(summary, q, P)
        keep = chosen.gather(-1, assign[kv_of])  # (Hq, P)
        union = keep.view(Hkv, g, P).any(1).sum()  # keys read per KV head (shared by its query heads)
        read = (Hkv * C * d + 2 * int(union) * d) * self.elem_bytes
        return keep, None, read
