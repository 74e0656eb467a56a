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

import torch

from slimlm.kvcache.merge import MergeSpec, slerp
from slimlm.model.attention import attention
from slimlm.kvcache.policy.base import KV_POLICIES, KVPolicy


def parse_pairs(pairs: str | list | tuple) -> list[tuple[int, int]]:
    """``"a-b,c-d"`` or ``[[a, b], ...]`` -> sorted [(a, b), ...]; a < b, no layer twice."""
    try:
        items = [p.split("-") for p in pairs.split(",") if p.strip()] if isinstance(pairs, str) else list(pairs)
        out = sorted((int(a), int(b)) for a, b in items)
    except (TypeError, ValueError):
        raise ValueError(f"minicache pairs must be 'a-b,c-d' or [[a, b], ...], got {pairs!r}") from None
    seen = [x for p in out for x in p]
    if not out or any(a < 0 or a >= b for a, b in out) or len(set(seen)) != len(seen):
        raise ValueError(f"minicache pairs must be layer pairs a < b, each layer in one pair at most, got {pairs!r}")
    return out


@KV_POLICIES.register("minicache")
class MiniCachePolicy(KVPolicy):
    granularity = "layer"

    def __init__(self, start: float | int | None = None, t: float = 0.5, threshold: float = 0.05,
                 retain: float = 0.125, end: float | int | None = None,
                 pairs: str | list | tuple | None = None):
        """``start``: first merged layer, an index or a fraction of the depth (the paper merges
        from the middle, 0.5, the default); ``end``: layers at and after it stay unmerged (None:
        the last); ``pairs``: instead of ``start`` / ``end``, the pairs of layers to merge, as
        ``"a-b,c-d"`` or ``[[a, b], [c, d]]`` (a < b, each layer in one pair at most; e.g. the
        pairs :func:`calibrate_pairs` ranks best for a model); ``t``: SLERP weight of the
        deeper layer; ``threshold``: angular distance (Omega / pi) above which a token is
        retained unmerged; ``retain``: share of each block's tokens that may be retained
        (retention rows per block = ceil(retain x block_size))."""
        for name, x in (("start", start), ("end", end)):
            if x is not None and (isinstance(x, bool) or not isinstance(x, (int, float)) or x < 0):
                raise ValueError(f"minicache {name} must be a layer index or a fraction of the depth, got {x!r}")
        if pairs is not None and (start is not None or end is not None):
            raise ValueError("minicache takes either pairs or start / end, not both")
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"minicache t must be in [0, 1], got {t}")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"minicache threshold (angular distance) must be in [0, 1], got {threshold}")
        if not 0.0 <= retain <= 1.0:
            raise ValueError(f"minicache retain must be a fraction in [0, 1], got {retain}")
        self.explicit = None if pairs is None else parse_pairs(pairs)
        self.start = 0.5 if start is None and pairs is None else start
        self.end, self.t, self.threshold, self.retain = end, t, threshold, retain

    def __repr__(self) -> str:
        where = f"pairs={self.explicit}" if self.explicit is not None else f"start={self.start}"
        return f"MiniCachePolicy({where}, t={self.t}, threshold={self.threshold}, retain={self.retain})"

    @staticmethod
    def _layer(x: float | int, depth: int) -> int:
        return int(x * depth) if isinstance(x, float) else x

    def pairs(self, depth: int) -> list[tuple[int, int]]:
        if self.explicit is not None:
            bad = [p for p in self.explicit if p[1] >= depth]
            if bad:
                raise ValueError(f"minicache pair {bad[0][0]}-{bad[0][1]} is beyond the model's {depth} layers")
            return list(self.explicit)
        start = self._layer(self.start, depth)
        end = depth if self.end is None else min(depth, self._layer(self.end, depth))
        if start >= depth - 1 or start >= end - 1:
            raise ValueError(f"minicache start layer {start} leaves no pair of layers to merge "
                             f"(the model has {depth} layers{'' if self.end is None else f', end {end}'})")
        return [(i, i + 1) for i in range(start, end - 1, 2)]

    def layer_sharing(self, depth: int, block_size: int) -> tuple[dict[int, int], MergeSpec]:
        rows = math.ceil(self.retain * block_size - 1e-9)
        return {b: a for a, b in self.pairs(depth)}, MergeSpec(self.t, self.threshold, rows)


# ---------------------------------------------------------------------------------------------- calibration
class _Recorder:
    """A dense causal attention backend that keeps every layer's keys, values and last queries."""

    def __init__(self, scale: float, queries: int):
        self.scale, self.queries = scale, queries
        self.q: dict[int, torch.Tensor] = {}
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}

    def attend(self, layer, q, k, v, q_rows=None):
        self.q[layer], self.k[layer], self.v[layer] = q[:, :, -self.queries:].float(), k.float(), v.float()
        T = k.shape[2]
        mask = torch.ones(T, T, dtype=torch.bool, device=k.device).tril()[None, None]
        return attention(q, k, v, mask, self.scale)


def _merged(x0: torch.Tensor, x1: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, S, d) states of two layers -> what each reads once merged (no retention)."""
    e, n0, n1, _ = slerp(x0.transpose(1, 2), x1.transpose(1, 2), t)  # (B, S, H, d), (B, S, H)
    return (e * n0[..., None]).transpose(1, 2), (e * n1[..., None]).transpose(1, 2)


@torch.no_grad()
def pair_errors(model, ids: list[int], max_gap: int = 1, queries: int = 256, t: float = 0.5) -> dict[tuple[int, int], float]:
    """For every candidate pair (l, l + g), 1 <= g <= ``max_gap``: the mean over its two layers of
    the relative error ||o' - o|| / ||o|| of the attention output of the last ``queries`` queries
    of one dense forward over ``ids`` when the pair's keys and values are merged (SLERP ``t``, no
    retention). What merging a pair costs the layers that read it, measured directly."""
    rec = _Recorder(model.attn_scale, queries)
    dev = next(model.parameters()).device
    n = len(ids)
    model(torch.tensor([ids], device=dev), torch.arange(n, device=dev)[None], rec,
          logits_index=torch.tensor([[n - 1]], device=dev))
    Q = rec.q[0].shape[2]
    mask = torch.ones(Q, n, dtype=torch.bool, device=dev)
    mask[:, n - Q:] = torch.ones(Q, Q, dtype=torch.bool, device=dev).tril()
    mask = mask[None, None]

    def err(layer, k, v):
        ref = attention(rec.q[layer], rec.k[layer], rec.v[layer], mask, model.attn_scale)
        got = attention(rec.q[layer], k, v, mask, model.attn_scale)
        return float((got - ref).norm() / ref.norm().clamp(min=1e-12))

    depth = len(rec.k)
    out = {}
    for g in range(1, max_gap + 1):
        for a in range(depth - g):
            b = a + g
            ka, kb = _merged(rec.k[a], rec.k[b], t)
            va, vb = _merged(rec.v[a], rec.v[b], t)
            out[(a, b)] = (err(a, ka, va) + err(b, kb, vb)) / 2
    return out


def calibrate_pairs(model, tokenizer=None, n: int | None = None, max_gap: int = 1, ids: list[int] | None = None,
                    t: float = 0.5) -> list[tuple[int, int, float]]:
    """The ``n`` disjoint pairs of layers whose merging costs least on a calibration text (the
    engine's key-offset paragraph unless ``ids``), cheapest first, by :func:`pair_errors`:
    [(a, b, error), ...]. Give them to the policy as ``pairs="a-b,c-d"``."""
    from slimlm.kvcache.codec.offsets import calibration_ids

    if ids is None:
        ids = calibration_ids(tokenizer, model.cfg.vocab_size)
    cost = pair_errors(model, ids, max_gap, t=t)
    used: set[int] = set()
    chosen = []
    for (a, b), e in sorted(cost.items(), key=lambda kv: kv[1]):
        if a in used or b in used:
            continue
        chosen.append((a, b, e))
        used |= {a, b}
        if n is not None and len(chosen) == n:
            break
    return chosen

