"""MiniCache: KV cache compression in the depth dimension (Liu et al., 2024).

Adjacent layers from the middle of the network on have similar KV states. MiniCache pairs
them (l, l + 1) from a start layer on; each pair stores one direction per token (SLERP of the
two layers' directions), the magnitudes of both, and keeps the tokens whose pair disagrees
most unmerged (retention). The maths is in :mod:`slimlm.kvcache.merge`.

Here it is a *layer* policy: it evicts nothing, it shapes the KV spec at start-up. The pair
shares one storage of the paged cache (the spec's cross-layer seam), so the memory saved is
real: the pool holds fewer rows per block and admits more tokens in the same bytes. It
composes with every ``kv_cache_dtype`` (the merged direction is stored through the codec, as
the paper's 4-bit MiniCache does) and with prefix caching and preemption (retention decisions
are block-local and in token order); it is refused with speculative decoding (a rejected
draft's rows would have to be unmerged).
"""

from __future__ import annotations

import math

from slimlm.kvcache.merge import MergeSpec
from slimlm.kvcache.policy.base import KV_POLICIES, KVPolicy


@KV_POLICIES.register("minicache")
class MiniCachePolicy(KVPolicy):
    granularity = "layer"

    def __init__(self, start: float | int = 0.5, t: float = 0.5, threshold: float = 0.05, retain: float = 0.125,
                 end: float | int | None = None):
        """``start``: first merged layer, an index or a fraction of the depth (the paper merges
        from the middle, 0.5); ``end``: layers at and after it stay unmerged (None: the last);
        ``t``: SLERP weight of the deeper layer; ``threshold``: angular distance (Ω / π) above
        which a token is retained unmerged; ``retain``: share of each block's tokens that may be
        retained (retention rows per block = ceil(retain x block_size))."""
        for name, x in (("start", start), ("end", end)):
            if x is not None and (isinstance(x, bool) or not isinstance(x, (int, float)) or x < 0):
                raise ValueError(f"minicache {name} must be a layer index or a fraction of the depth, got {x!r}")
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"minicache t must be in [0, 1], got {t}")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"minicache threshold (angular distance) must be in [0, 1], got {threshold}")
        if not 0.0 <= retain <= 1.0:
            raise ValueError(f"minicache retain must be a fraction in [0, 1], got {retain}")
        self.start, self.end, self.t, self.threshold, self.retain = start, end, t, threshold, retain

    def __repr__(self) -> str:
        return f"MiniCachePolicy(start={self.start}, t={self.t}, threshold={self.threshold}, retain={self.retain})"

    @staticmethod
    def _layer(x: float | int, depth: int) -> int:
        return int(x * depth) if isinstance(x, float) else x

    def pairs(self, depth: int) -> list[tuple[int, int]]:
        start = self._layer(self.start, depth)
        end = depth if self.end is None else min(depth, self._layer(self.end, depth))
        if start >= depth - 1 or start >= end - 1:
            raise ValueError(f"minicache start layer {start} leaves no pair of layers to merge "
                             f"(the model has {depth} layers{'' if self.end is None else f', end {end}'})")
        return [(i, i + 1) for i in range(start, end - 1, 2)]

    def layer_sharing(self, depth: int, block_size: int) -> tuple[dict[int, int], MergeSpec]:
        rows = math.ceil(self.retain * block_size - 1e-9)
        return {b: a for a, b in self.pairs(depth)}, MergeSpec(self.t, self.threshold, rows)
