"""Attention over the paged KV cache for one engine step.

The step's tokens arrive flattened in one row (decodes first, then multi-token chunks, each
with its own positions). The runner builds the step's metadata once (:class:`StepAttention`:
decode table / groups, prefill segments, slots); for every layer, :meth:`PagedAttention.attend`
writes the new keys and values into their slots through the KV codec, then computes attention
with the paths the :class:`AttentionPaths` chosen at start-up allow:

- decode tokens: the native ``paged_decode`` kernel, reading the stored format in place
  (plain or quantized pools; it also accumulates attention mass for score-based policies; a
  codec that stores rows rotated gets the query rotated before and the output after; a layer of
  a merged storage, MiniCache, reads the step's blocks rebuilt into a workspace);
  otherwise in groups of similar context length over gathered, decoded blocks;
- each multi-token chunk alone: the native ``paged_prefill`` kernel (causal, no tree), which
  reads plain and quantized pools in place (a rotating codec's query rotated as for decode) and
  accumulates attention mass when a policy asks (a merged layer's context is rebuilt into a
  workspace); otherwise over its gathered context with an
  explicit mask, in blocks of ``Q_BLOCK`` query rows that each see only the keys up to their
  last storage index.

Masks are built in *storage* indices (a sequence's stored rows 0..n-1): a token policy may
have compacted the context, and since keys carry their RoPE rotation they need no position.
Where positions matter (sliding windows, LM-Infinite's span and distance cap) no compaction
happens, and storage index equals position. A speculative tree chunk replaces causality
inside the chunk by its ancestor mask.

Only some rows may query a layer (a per-layer plan: LazyLLM's pruned tokens, early exits):
``attend(..., q_rows)`` then serves those rows only, and every row still writes its KV.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from slimlm.kernels.ops import NATIVE_DTYPES, native_decode, native_prefill, native_prefill_ex
from slimlm.kvcache.manager import EVICTED
from slimlm.kvcache.policy.base import AttentionSpan
from slimlm.kvcache.storage import PagedKVCache
from slimlm.model.attention import attention
from slimlm.model.rope import RotaryEmbedding, apply_rope

__all__ = ["NATIVE_DTYPES", "AttentionPaths", "DecodeGroup", "DecodeTable", "PagedAttention", "PrefillSegment",
           "capped_attention", "kept_blocks", "native_decode", "native_prefill", "span_mask"]


def kept_blocks(table: list[int], num_tokens: int, block_size: int) -> tuple[list[int], list[int]]:
    """Physical blocks covering the first ``num_tokens`` stored tokens, skipping evicted ones,
    and the logical index of each."""
    n = -(-num_tokens // block_size)
    phys, logical = [], []
    for i, b in enumerate(table[:n]):
        if b != EVICTED:
            phys.append(b)
            logical.append(i)
    return phys, logical


def span_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, span: AttentionSpan, window: int | None) -> torch.Tensor:
    """q_pos (B, T), k_pos (B, S) with -1 for padding -> bool (B, 1, T, S)."""
    qp, kp = q_pos[:, :, None], k_pos[:, None, :]
    mask = (kp <= qp) & (kp >= 0)
    if window is not None:
        mask &= qp - kp < window
    if span.window is not None:
        mask &= (qp - kp < span.window) | (kp < span.sink)
    return mask[:, None]


def capped_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
    q_pos: torch.Tensor, k_pos: torch.Tensor, cap: int, rotary: RotaryEmbedding, scale: float,
) -> torch.Tensor:
    """Attention where a key farther than ``cap`` from its query scores as if exactly ``cap``
    away (LM-Infinite's distance ceiling). With RoPE the score of query q_u at p and key k_u at s
    is <R(p) q_u, R(s) k_u> = <R(p - s) q_u, k_u>; for far keys we use <R(cap) q_u, k_u>, computed
    as <R(cap - p) q_p, R(-s) k_s> from the cached (rotated) tensors.

    q (B, Hq, T, d); k, v (B, Hkv, S, d); mask (B, 1, T, S); q_pos (B, T); k_pos (B, S).
    """
    G = q.shape[1] // k.shape[1]
    kx, vx = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)  # (B, Hq, S, d)
    scores = (q @ kx.transpose(-1, -2)) * scale  # (B, Hq, T, S)
    far = (q_pos[:, :, None] - k_pos[:, None, :] > cap) & (k_pos[:, None, :] >= 0)  # (B, T, S)
    if bool(far.any()):
        cols = int(far.any(0).any(0).nonzero().max()) + 1  # far keys are the leading (sink) columns
        cq, sq = rotary(cap - q_pos, q.dtype)
        ck, sk = rotary(-k_pos[:, :cols].clamp(min=0), q.dtype)
        qc = apply_rope(q, cq, sq)  # R(cap - p) q_p
        ku = apply_rope(kx[:, :, :cols], ck, sk)  # R(-s) k_s
        capped = (qc @ ku.transpose(-1, -2)) * scale  # (B, Hq, T, cols)
        scores[..., :cols] = torch.where(far[:, None, :, :cols], capped, scores[..., :cols])
    scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1).to(vx.dtype) @ vx


def attention_with_mass(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                        scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Explicit softmax attention that also returns each key's attention mass, summed over
    the queries and over the query heads of its KV head.

    q (B, Hq, T, d); k, v (B, Hkv, S, d); mask (B, 1, T, S). Returns (B, Hq, T, d), (B, Hkv, S).
    """
    B, Hq, T, d = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    qf = q.float().reshape(B, Hkv, G * T, d)
    scores = (qf @ k.float().transpose(-1, -2)).view(B, Hkv, G, T, -1) * scale  # (B, Hkv, G, T, S)
    scores = scores.masked_fill(~mask[:, :, None], float("-inf"))
    p = scores.softmax(-1)
    out = (p.view(B, Hkv, G * T, -1) @ v.float()).view(B, Hq, T, d)
    return out.to(q.dtype), p.sum((2, 3))


Q_BLOCK = 128
"""Prefill queries are attended in blocks of this many rows, each against only the keys up to
its last storage index: causality then costs about half of the full (T, S) score matrix, as
PyTorch's CPU kernel computes every key block it is given (1500-token prompt: 38 -> 20 ms a layer)."""


@dataclass
class PrefillSegment:
    """One multi-token chunk (a prefill chunk or a speculative verification chunk)."""

    rows: slice | torch.Tensor
    """This chunk's rows in the flattened step (a tensor of rows once a layer plan drops some)."""
    q_pos: torch.Tensor  # (1, T) storage indices of the queries
    blocks: torch.Tensor | None
    """Kept blocks covering context + chunk, or None when the chunk is all the context."""
    k_pos: torch.Tensor  # (1, S) storage indices of the keys, ascending (-1 = padding)
    table: torch.Tensor | None = None
    """Every block of the context + chunk (int64), when all are kept: the native kernel's input."""
    tree: torch.Tensor | None = None
    """(T, T) bool ancestor mask among the chunk's own tokens (speculative tree), or None."""
    kv_start: int = 0
    """Storage index of the chunk's first token (the keys before it are its context)."""
    key_rows: slice | None = None
    """The whole chunk's rows, whose new keys it attends when ``blocks`` is None (``rows``
    unless a layer plan dropped queries)."""
    parts: list[tuple[int, int, int]] = field(default=None)  # type: ignore[assignment]
    """(first, end) query rows of each block and how many keys it needs (a prefix of the keys)."""
    allow: torch.Tensor | None = None
    """(T, S) bool: pairs a set-based prompt allows (``engine/segments.py``), ANDed with causality."""
    observe: bool = False
    """The chunk completes its prompt and the token policy observes a window of its last queries
    (``AttentionPaths.observe_window``)."""

    def __post_init__(self) -> None:
        if self.parts is None:
            T = self.q_pos.shape[1]
            ends = list(range(Q_BLOCK, T, Q_BLOCK)) + [T]
            last = self.q_pos[0, [e - 1 for e in ends]]
            needed = torch.searchsorted(self.k_pos[0], last, right=True).tolist()
            self.parts = [(a, e, n) for a, e, n in zip([0] + ends[:-1], ends, needed)]

    def restrict(self, local: torch.Tensor) -> PrefillSegment:
        """The same chunk with only the queries at local indices ``local`` (ascending)."""
        rows = self.rows
        base = torch.arange(rows.start, rows.stop, device=local.device) if isinstance(rows, slice) else rows
        tree = self.tree[local] if self.tree is not None else None
        allow = self.allow[local] if self.allow is not None else None
        return PrefillSegment(base[local], self.q_pos[:, local], self.blocks, self.k_pos, None, tree, self.kv_start,
                              self.key_rows or self.rows, allow=allow)


@dataclass
class DecodeTable:
    """All of a step's decode tokens for the native kernel (every block kept, no window)."""

    rows: torch.Tensor
    """(B,) rows of the step holding these single-token queries."""
    table: torch.Tensor  # (B, max_blocks) int64, padded with block 0
    lens: torch.Tensor  # (B,) int64: tokens each query attends, its own included


@dataclass
class DecodeGroup:
    rows: torch.Tensor
    """(B,) rows of the step holding these single-token queries."""
    q_pos: torch.Tensor  # (B, 1)
    blocks: torch.Tensor  # (B * nb,) padded with block 0
    k_pos: torch.Tensor  # (B, nb * block_size), -1 = padding
    nb: int


@dataclass(frozen=True)
class AttentionPaths:
    """Which attention paths serve this engine, chosen once at start-up from the model, the
    device, the KV spec and the policy (see :meth:`choose`)."""

    native_decode: object | None = None
    """The loaded ``paged_decode`` library, or None."""
    native_prefill: object | None = None
    """The loaded ``paged_prefill`` library, or None."""
    span: AttentionSpan = AttentionSpan()
    track_mass: bool = False
    prefill_decodes: bool = False
    """The pool is not in the compute dtype and the prefill kernel cannot read its format
    (``native_code`` None, e.g. float16): it reads the chunk's context decoded into a workspace."""
    prefill_in_place: bool = False
    """The prefill kernel reads the pool's stored format itself (quantized or another float
    format) or accumulates attention mass: :func:`native_prefill_ex`."""
    sparse: object | None = None
    """A query KV policy (Squeezed Attention, ShadowKV): decode keys chosen per query."""
    dual_chunk: object | None = None
    """Dual Chunk Attention (``model/rope_extension.py``): every path goes through
    ``dca_attention`` with true positions (storage index == position: no compaction)."""
    sparse_prefill: object | None = None
    """Sparse prefill (``engine/sparse_prefill.py``): long prefill chunks attend its pattern."""
    sparse_native: object | None = None
    """The loaded ``sparse_decode`` library when a query policy decodes natively, or None."""
    sparse_prefill_native: object | None = None
    """The loaded ``sparse_prefill`` library when sparse prefill runs natively
    (``sparse_prefill.native_library``), or None: the PyTorch pattern path."""
    dca_native: object | None = None
    """The loaded ``paged_prefill`` library when DCA's prefill chunks run on its key-range entry
    (``rope_extension.dca_native_library``), or None: ``dca_attention``'s PyTorch ranges."""
    observe_window: int = 0
    """A token policy's observation window (H2O's ``window``): the attention a prompt's last this
    many queries give each stored key replaces its mass when the prompt completes (0: off)."""

    @classmethod
    def choose(cls, cache: PagedKVCache, head_dim: int, span: AttentionSpan, track_mass: bool,
               native_kernels: bool, sparse: object | None = None) -> AttentionPaths:
        decode = prefill = sparse_lib = None
        codec = cache.codec
        compute = NATIVE_DTYPES.get(cache.spec.compute_dtype)  # the kernels read q's dtype
        if native_kernels and cache.device.type == "cpu" and span == AttentionSpan():
            # merged storages (MiniCache) are served too: their layers' rows rebuilt into a workspace
            from slimlm import kernels

            if codec.native_code is not None and sparse is None:
                decode = kernels.load("paged_decode")
            elif codec.native_code is not None:  # a query policy: the sparse kernel reads its picks
                sparse_lib = kernels.load("sparse_decode")
            if compute is not None:
                lib = kernels.load("paged_prefill")
                if lib is not None and lib.slimlm_prefill_supported(head_dim, compute):
                    prefill = lib
        keys_apart = cache.tier is not None  # keys are read through the key tier (rebuilt if factored)
        in_place = prefill is not None and codec.native_code is not None and not keys_apart \
            and (codec.native_code != compute or track_mass)
        decodes = (codec.native_code != compute or keys_apart) and not in_place
        return cls(decode, prefill, span, track_mass, decodes, sparse=sparse,
                   prefill_in_place=in_place, sparse_native=sparse_lib)


class PagedAttention:
    """The AttentionBackend for one engine step (see the module docstring)."""

    def __init__(self, cache: PagedKVCache, paths: AttentionPaths, slots: torch.Tensor,
                 decodes: list[DecodeGroup], prefills: list[PrefillSegment], windows: dict[int, int | None],
                 scale: float, rotary: RotaryEmbedding, decode_table: DecodeTable | None = None):
        """``decode_table`` enables the native decode path for layers without a window;
        ``decodes`` serve the other layers (and every layer without the native kernel)."""
        self.cache, self.paths, self.slots, self.decodes, self.prefills = cache, paths, slots, decodes, prefills
        self.decode_table = decode_table
        self.windows, self.scale, self.rotary = windows, scale, rotary
        self._masks: dict[tuple, torch.Tensor] = {}
        self._restricted: dict[int, tuple] = {}
        self._sparse_meta: dict[int, dict] = {}
        if paths.sparse is not None:  # a query policy keeps a summary per decoding row's prefix
            paths.sparse.begin_step(sum(int(g.rows.numel()) for g in decodes))

    # ------------------------------------------------------------------ helpers
    def _mask(self, key, q_pos, k_pos, window, tree=None, kv_start=0, allow=None) -> torch.Tensor:
        if (key, window) not in self._masks:
            m = span_mask(q_pos, k_pos, self.paths.span, window)
            if allow is not None:
                m = m & allow[None, None]
            if tree is not None:  # inside the chunk: ancestors only
                inner = k_pos[0] >= kv_start  # (S,)
                cols = inner.nonzero()[:, 0]
                m = m.clone()
                m[0, 0][:, cols] = tree[:, (k_pos[0, cols] - kv_start)]
            self._masks[key, window] = m
        return self._masks[key, window]

    def _attend(self, layer, q, k, v, mask, q_pos, k_pos, key_slots):
        span = self.paths.span
        if self.paths.dual_chunk is not None:
            from slimlm.model.rope_extension import dca_attention

            return dca_attention(q, k, v, mask, q_pos, k_pos, self.paths.dual_chunk, self.rotary.inv_freq, self.scale)
        if span.distance_cap is not None and span.sink > 0:
            return capped_attention(q, k, v, mask, q_pos, k_pos, span.distance_cap, self.rotary, self.scale)
        if self.paths.track_mass:
            out, m = attention_with_mass(q, k, v, mask, self.scale)  # m (B, Hkv, S)
            valid = key_slots >= 0
            mass = self.cache.mass[layer].view(-1, m.shape[1])
            mass.index_add_(0, key_slots[valid], m.transpose(1, 2)[valid])
            return out
        return attention(q, k, v, mask, self.scale)

    def _key_slots(self, blocks: torch.Tensor, k_pos: torch.Tensor, B: int) -> torch.Tensor | None:
        """Flat slots (B, S) of gathered keys (-1 for padding), only when mass is tracked."""
        if not self.paths.track_mass:
            return None
        bs = self.cache.block_size
        s = (blocks.view(B, -1, 1) * bs + torch.arange(bs, device=blocks.device)).view(B, -1)
        return s.masked_fill(k_pos < 0, -1)

    def _restrict(self, q_rows: torch.Tensor):
        """Decode groups / table / prefill segments serving only ``q_rows`` (cached per set)."""
        key = id(q_rows)
        if key in self._restricted and self._restricted[key][0] is q_rows:
            return self._restricted[key][1:]
        keep = torch.zeros(int(self.slots.numel()), dtype=torch.bool, device=q_rows.device)
        keep[q_rows] = True
        table = None
        if self.decode_table is not None:
            dt = self.decode_table
            sel = keep[dt.rows]
            table = DecodeTable(dt.rows[sel], dt.table[sel], dt.lens[sel]) if bool(sel.any()) else None
        groups = []
        for g in self.decodes:
            sel = keep[g.rows]
            if bool(sel.any()):
                blocks = g.blocks.view(-1, g.nb)[sel].flatten()
                groups.append(DecodeGroup(g.rows[sel], g.q_pos[sel], blocks, g.k_pos[sel], g.nb))
        prefills = []
        for p in self.prefills:
            rows = torch.arange(p.rows.start, p.rows.stop, device=q_rows.device) if isinstance(p.rows, slice) else p.rows
            local = keep[rows].nonzero()[:, 0]
            if local.numel() == rows.numel():
                prefills.append(p)
            elif local.numel():
                prefills.append(p.restrict(local))
        self._restricted[key] = (q_rows, table, groups, prefills)
        return table, groups, prefills

    # ------------------------------------------------------------------ attend
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               q_rows: torch.Tensor | None = None) -> torch.Tensor:
        """q (1, Hq, R, d) for the step's rows ``q_rows`` (all T rows when None); k, v
        (1, Hkv, T, d) for every row. Returns (1, Hq, R, d)."""
        cache, bs = self.cache, self.cache.block_size
        T, hkv, d = k.shape[2], k.shape[1], k.shape[3]
        cache.write(layer, self.slots, k[0].transpose(0, 1), v[0].transpose(0, 1))
        if cache.mass is not None:
            cache.mass[layer].view(-1, hkv).index_fill_(0, self.slots, 0.0)  # fresh keys start at zero
        if q_rows is None:
            table, decodes, prefills = self.decode_table, self.decodes, self.prefills
        else:
            table, decodes, prefills = self._restrict(q_rows)
        # queries are indexed by step row; with q_rows we scatter them into a (T, Hq, d) buffer
        q_full = q[0].transpose(0, 1)  # (R, Hq, d) view
        if q_rows is not None:
            buf = q.new_zeros(T, q.shape[1], d)
            buf.index_copy_(0, q_rows, q_full)
            q_full = buf
        out = torch.empty(T, q.shape[1], d, dtype=q.dtype, device=q.device)  # (T, Hq, d)
        window = self.windows.get(layer)
        lib = self.paths.native_decode
        if lib is not None and table is not None and window is None and cache.merged(layer):
            out.index_copy_(0, table.rows, self._merged_decode(lib, layer, table, q_full).to(out.dtype))
            decodes = []
        elif lib is not None and table is not None and window is None:
            kp, vp = cache.pools(layer)
            mass = cache.mass[layer] if cache.mass is not None else None
            # a rotating codec stores rows @ R: the query goes into the keys' space, the output
            # comes out of the values'
            qn = q_full.index_select(0, table.rows)
            qn = cache.codec.to_storage(qn)  # float32 when rotated: the kernel takes float32 (no bf16 rounding)
            o = native_decode(lib, qn, kp, vp, cache.codec.native_code, table.table, table.lens, self.scale, mass)
            out.index_copy_(0, table.rows, cache.vcodec.from_storage(o).to(out.dtype))
            decodes = []
        sparse_lib = self.paths.sparse_native if window is None else None
        if self.paths.sparse_native is not None:
            self.paths.sparse.written(layer, self.slots, bs)  # drops summaries over rewritten blocks
        for gi, g in enumerate(decodes):
            if sparse_lib is not None:  # a query policy: only its chosen keys are read
                out.index_copy_(0, g.rows, self._sparse_group(layer, g, q_full).to(out.dtype))
                continue
            B = g.q_pos.shape[0]
            qd = q_full.index_select(0, g.rows)[:, :, None]  # (B, Hq, 1, d)
            kd = cache.gather("k", layer, g.blocks).view(B, g.nb * bs, hkv, d).transpose(1, 2)  # (B, Hkv, S, d)
            vd = cache.gather("v", layer, g.blocks).view(B, g.nb * bs, hkv, d).transpose(1, 2)
            mask = self._mask(("d", id(g)), g.q_pos, g.k_pos, window)
            if self.paths.sparse is not None:
                kd, vd, mask = self.paths.sparse.decode_attention(layer, qd, kd, vd, mask, g.q_pos, g.k_pos,
                                                                  self.rotary)
            o = self._attend(layer, qd, kd, vd, mask, g.q_pos, g.k_pos, self._key_slots(g.blocks, g.k_pos, B))
            out.index_copy_(0, g.rows, o[:, :, 0])
        for p in prefills:
            self._prefill(layer, p, q_full, k, v, out, window)
            if p.observe and q_rows is None:
                self._observe(layer, p, q_full, k)
        if q_rows is not None:
            out = out.index_select(0, q_rows)
        return out.transpose(0, 1)[None]  # (1, Hq, R, d)

    def _observe(self, layer: int, p: PrefillSegment, q_full: torch.Tensor, k: torch.Tensor) -> None:
        """The chunk completes its prompt: the attention its last ``observe_window`` queries give
        each stored key (summed over those queries and the query heads of its KV head, float32)
        replaces the key's accumulated mass; later queries add to it as before."""
        bs, W = self.cache.block_size, min(self.paths.observe_window, p.q_pos.shape[1])
        qw = q_full[p.rows][-W:].float()  # (W, Hq, d)
        if p.blocks is None:  # the chunk is all its context: its own new keys
            kr = p.key_rows or p.rows
            ks, slots = k[0, :, kr].float(), self.slots[kr]  # (Hkv, S, d), (S,)
        else:
            n, hkv, d = p.blocks.numel(), k.shape[1], k.shape[3]
            ks = self.cache.gather("k", layer, p.blocks).view(n * bs, hkv, d).transpose(0, 1).float()
            slots = (p.blocks[:, None] * bs + torch.arange(bs, device=p.blocks.device)).flatten()
        Hkv, S, d = ks.shape
        G = qw.shape[1] // Hkv
        kpos, qpos = p.k_pos[0], p.q_pos[0, -W:]
        s = (qw.transpose(0, 1).reshape(Hkv, G * W, d) @ ks.transpose(1, 2)).view(Hkv, G, W, S) * self.scale
        seen = (kpos[None] <= qpos[:, None]) & (kpos[None] >= 0)  # (W, S)
        m = s.masked_fill(~seen, float("-inf")).softmax(-1).sum((1, 2))  # (Hkv, S)
        valid = kpos >= 0
        self.cache.mass[layer].view(-1, Hkv).index_copy_(0, slots[valid], m.T[valid].contiguous())

    def _merged_decode(self, lib, layer: int, table: DecodeTable, q_full: torch.Tensor) -> torch.Tensor:
        """The native decode kernel for a layer of a merged storage (MiniCache): the step's blocks
        rebuilt once per layer (``PagedKVCache.gather``) into a workspace the kernel reads through
        the step's table mapped onto it. (B, Hq, d) float32."""
        have = self._sparse_meta.get("merged")
        if have is None or have[0] is not table:  # the step's distinct blocks, and its table into them
            ub, inv = torch.unique(table.table, return_inverse=True)
            have = self._sparse_meta["merged"] = (table, ub, inv.contiguous())
        _, ub, inv = have
        kd, vd = self.cache.gather("k", layer, ub), self.cache.gather("v", layer, ub)  # (n, bs, Hkv, d)
        qn = q_full.index_select(0, table.rows).to(kd.dtype)
        return native_decode(lib, qn, [kd], [vd], NATIVE_DTYPES[kd.dtype], inv, table.lens, self.scale)

    def _sparse_group(self, layer: int, g: DecodeGroup, q_full: torch.Tensor) -> torch.Tensor:
        return self.paths.sparse.attend_native(self.paths.sparse_native, layer, q_full.index_select(0, g.rows),
                                               self.cache, g, self.rotary, self.scale,
                                               self._sparse_meta.setdefault(id(g), {}))

    def sparse_decode(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """An all-decode step's attention by its query policy's native path, the step's keys and
        values already stored (the native decode layers' halves): q (T, Hq, d) -> (T, Hq, d) float32."""
        self.paths.sparse.written(layer, self.slots, self.cache.block_size)
        if len(self.decodes) == 1 and self.decodes[0].rows.numel() == q.shape[0]:
            g = self.decodes[0]
            if "order" not in self._sparse_meta:  # rows sorted by length -> step order (None: the same)
                same = bool((g.rows == torch.arange(g.rows.numel(), device=g.rows.device)).all())
                self._sparse_meta["order"] = None if same else g.rows.argsort()
            if self._sparse_meta["order"] is None:  # the group's rows are the step's, in order
                return self.paths.sparse.attend_native(self.paths.sparse_native, layer, q, self.cache, g, self.rotary,
                                                       self.scale, self._sparse_meta.setdefault(id(g), {}))
            return self._sparse_group(layer, g, q).index_select(0, self._sparse_meta["order"])
        out = torch.empty(q.shape, dtype=torch.float32)
        for g in self.decodes:
            out.index_copy_(0, g.rows, self._sparse_group(layer, g, q).float())
        return out

    def _prefill(self, layer, p: PrefillSegment, q_full, k, v, out, window) -> None:
        cache, bs = self.cache, self.cache.block_size
        hkv, d = k.shape[1], k.shape[3]
        sparse = self.paths.sparse_prefill
        if sparse is not None and not (p.tree is None and p.allow is None and window is None
                                       and sparse.applies(p.k_pos.shape[1], layer)):
            sparse = None
        if sparse is None and self.paths.dca_native is not None and p.table is not None and window is None \
                and p.tree is None and p.allow is None and isinstance(p.rows, slice):  # DCA's key ranges
            from slimlm.model.rope_extension import dca_prefill_native

            kp, vp = cache.pools(layer)
            dca_prefill_native(self.paths.dca_native, q_full[p.rows], kp, vp, cache.codec.native_code, p.table,
                               int(p.q_pos[0, 0]), out[p.rows], self.paths.dual_chunk, self.rotary.inv_freq,
                               self.scale)
            return
        if sparse is None and self.paths.native_prefill is not None and p.table is not None and window is None \
                and p.tree is None and isinstance(p.rows, slice):
            merged = cache.merged(layer)  # MiniCache's rows are rebuilt: read through a workspace
            if self.paths.prefill_in_place and not merged:  # the kernel decodes the stored format (and adds mass)
                q = q_full[p.rows]
                apart = cache.vcodec.rotates or (cache.codec.attend_fp32 and q.dtype != torch.float32)
                # a rotating codec stores keys @ R; a codec that attends in float32 keeps the query there
                q = cache.codec.to_storage(q).to(torch.float32 if cache.codec.attend_fp32 else q.dtype)
                o = out[p.rows] if not apart else torch.empty_like(q)
                kp, vp = cache.pools(layer)
                native_prefill_ex(self.paths.native_prefill, q, kp, vp, cache.codec.native_code, p.table,
                                  int(p.q_pos[0, 0]), o, self.scale,
                                  cache.mass[layer] if cache.mass is not None else None)
                if apart:
                    out[p.rows] = cache.vcodec.from_storage(o).to(out.dtype)
                return
            if self.paths.prefill_decodes or merged:  # decode the context once into a dense workspace
                kp, vp = cache.gather("k", layer, p.table).contiguous(), cache.gather("v", layer, p.table).contiguous()
                table = torch.arange(p.table.numel(), device=p.table.device)
            else:
                (kp, *_), (vp, *_) = cache.pools(layer)
                table = p.table
            native_prefill(self.paths.native_prefill, q_full[p.rows], kp, vp, table, int(p.q_pos[0, 0]),
                           out[p.rows], self.scale)
            return
        if sparse is not None and self.paths.sparse_prefill_native is not None and p.table is not None \
                and isinstance(p.rows, slice):  # the native kernel reads the pattern's keys in place
            n = int(p.q_pos[0, -1]) + 1
            keys = cache.gather("k", layer, p.table).view(-1, hkv, d)[:n].transpose(0, 1)  # (Hkv, n, d): the probe's
            kp, vp = cache.pools(layer)
            dca = (self.paths.dual_chunk, self.rotary.inv_freq) if self.paths.dual_chunk is not None else None
            sparse.attend_paged(self.paths.sparse_prefill_native, q_full[p.rows], keys, kp, vp,
                                cache.codec.native_code, p.table, int(p.q_pos[0, 0]), out[p.rows], self.scale, dca)
            return
        rows = p.rows
        qs = (q_full[rows] if isinstance(rows, slice) else q_full.index_select(0, rows)).transpose(0, 1)[None]
        key_slots = None
        if p.blocks is None:  # the chunk is all its context: its own new keys
            kr = p.key_rows or rows
            ks, vs = k[:, :, kr], v[:, :, kr]
            if self.paths.track_mass:
                key_slots = self.slots[kr][None]
        else:
            n = p.blocks.numel()
            ks = cache.gather("k", layer, p.blocks).view(1, n * bs, hkv, d).transpose(1, 2)
            vs = cache.gather("v", layer, p.blocks).view(1, n * bs, hkv, d).transpose(1, 2)
            key_slots = self._key_slots(p.blocks, p.k_pos, 1)
        if sparse is not None:
            dca = (self.paths.dual_chunk, self.rotary.inv_freq) if self.paths.dual_chunk is not None else None
            dst = sparse.attend(qs, ks, vs, p.q_pos, p.k_pos, self.scale, dca)[0].transpose(0, 1).to(out.dtype)
            if isinstance(rows, slice):
                out[rows] = dst
            else:
                out.index_copy_(0, rows, dst)
            return
        if len(p.parts) > 1 and qs.device.type == "cpu" and qs.dtype in (torch.bfloat16, torch.float16):
            qs, ks, vs = qs.float(), ks.float(), vs.float()  # widen once, not once per query block
        for j, (a, e, n) in enumerate(p.parts):
            qp, kp = p.q_pos[:, a:e], p.k_pos[:, :n]
            tree = p.tree[a:e] if p.tree is not None else None
            allow = p.allow[a:e, :n] if p.allow is not None else None
            mask = self._mask(("p", id(p), j), qp, kp, window, tree, p.kv_start, allow)
            o = self._attend(layer, qs[:, :, a:e], ks[:, :, :n], vs[:, :, :n], mask, qp, kp,
                             key_slots[:, :n] if key_slots is not None else None)
            dst = o[0].transpose(0, 1).to(out.dtype)  # (e - a, Hq, d)
            if isinstance(rows, slice):
                out[rows.start + a : rows.start + e] = dst
            else:
                out.index_copy_(0, rows[a:e], dst)
