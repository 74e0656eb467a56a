"""Attention over the paged KV cache for one engine step.

The step's tokens arrive flattened in one row (decodes first, then prefill chunks, each with
its own positions). For every layer, :meth:`PagedAttention.attend` writes the new keys and
values into their slots, then computes attention:

- decode tokens: on the CPU, when every block is kept and no window applies, by the native
  kernel :mod:`slimlm.kernels` ``paged_decode``, which reads keys and values in place from the
  pool (one pass over the KV, no padding); otherwise in a few groups of similar context length:
  each sequence's kept blocks are gathered (block-wise, into a reused workspace) into a padded
  (B, Hkv, S, d) batch with a validity mask, one SDPA call per group;
- each prefill chunk alone: on a CPU with AVX-512 (AVX512-BF16 for a bfloat16 cache), when
  every block is kept and no window applies, by the native kernel ``paged_prefill`` (causal,
  keys and values read from the pool, fp32 accumulation); otherwise over its own new keys
  when it has no earlier context, or over its gathered blocks, with a causal mask from explicit
  positions, in blocks of ``Q_BLOCK`` query rows that each see only the keys up to their last
  position.

Every call goes through :func:`slimlm.model.attention.attention` or, when a KV policy caps
relative distances (LM-Infinite), :func:`capped_attention`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimlm.kvcache.manager import EVICTED
from slimlm.kvcache.policy.base import AttentionSpan
from slimlm.model.attention import attention
from slimlm.model.config import ModelConfig
from slimlm.model.rope import RotaryEmbedding, apply_rope


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """Zeroed KV storage. On CPU it comes from calloc (via numpy), whose large allocations are
    fresh zero pages the OS commits only when written: resident memory follows the blocks in
    use, not the pool size. Masked attention needs finite values everywhere, hence zeros."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    import numpy as np

    nbytes = torch.empty((), dtype=dtype).element_size()
    raw = np.zeros((*shape[:-1], shape[-1] * nbytes), dtype=np.uint8)
    return torch.from_numpy(raw).view(dtype)


class PagedKVCache:
    """The KV tensors: per layer, (num_blocks, block_size, Hkv, d) for keys and for values."""

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device):
        shape = (num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        self.k = [_zeros(shape, dtype, device) for _ in range(cfg.num_layers)]
        self.v = [_zeros(shape, dtype, device) for _ in range(cfg.num_layers)]
        self.block_size, self.num_blocks = block_size, num_blocks
        self._ws: dict[str, torch.Tensor] = {}

    @staticmethod
    def bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * cfg.num_layers * block_size * cfg.num_kv_heads * cfg.head_dim * elem

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        if not pairs:
            return
        src = torch.tensor([s for s, _ in pairs], device=self.k[0].device)
        dst = torch.tensor([d for _, d in pairs], device=self.k[0].device)
        for t in self.k + self.v:
            t[dst] = t[src]

    def gather(self, which: str, layer: int, blocks: torch.Tensor) -> torch.Tensor:
        """Copy ``blocks`` (n,) of one layer into a reused workspace: (n, block_size, Hkv, d)."""
        pool = (self.k if which == "k" else self.v)[layer]
        n = blocks.numel()
        numel = n * pool[0].numel()
        ws = self._ws.get(which)
        if ws is None or ws.numel() < numel:
            ws = self._ws[which] = torch.empty(max(numel, 1 << 20), dtype=pool.dtype, device=pool.device)
        out = ws[:numel].view(n, *pool.shape[1:])
        torch.index_select(pool, 0, blocks, out=out)
        return out


def kept_blocks(table: list[int], num_tokens: int, block_size: int) -> tuple[list[int], list[int]]:
    """Physical blocks covering the first ``num_tokens`` tokens, skipping evicted ones, and the
    logical index of each."""
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


Q_BLOCK = 128
"""Prefill queries are attended in blocks of this many rows, each against only the keys up to
its last position: causality then costs about half of the full (T, S) score matrix, as PyTorch's
CPU kernel computes every key block it is given (measured: 1500-token prompt, 38 -> 20 ms a layer)."""


@dataclass
class PrefillSegment:
    rows: slice
    """This chunk's rows in the flattened step."""
    q_pos: torch.Tensor  # (1, T)
    blocks: torch.Tensor | None
    """Kept blocks covering context + chunk, or None when the chunk is all the context."""
    k_pos: torch.Tensor  # (1, S), ascending
    parts: list[tuple[int, int, int]] = None  # type: ignore[assignment]
    """(first, end) query rows of each block and how many keys it needs (a prefix of the keys)."""
    table: torch.Tensor | None = None
    """Every block of the context + chunk (int64), when all are kept: the native kernel's input."""

    def __post_init__(self) -> None:
        if self.parts is None:
            T = self.q_pos.shape[1]
            ends = list(range(Q_BLOCK, T, Q_BLOCK)) + [T]
            last = self.q_pos[0, [e - 1 for e in ends]]
            needed = torch.searchsorted(self.k_pos[0], last, right=True).tolist()
            self.parts = [(a, e, n) for a, e, n in zip([0] + ends[:-1], ends, needed)]


@dataclass
class DecodeTable:
    """All of a step's decode tokens for the native kernel (every block kept, no window)."""

    rows: torch.Tensor
    """(B,) rows of the step holding these single-token queries."""
    table: torch.Tensor  # (B, max_blocks) int64, padded with block 0
    lens: torch.Tensor  # (B,) int64: tokens each query attends, its own included


NATIVE_DTYPES = {torch.float32: 0, torch.bfloat16: 1}


def native_decode(lib, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, dt: DecodeTable,
                  scale: float) -> torch.Tensor:
    """q (B, Hq, d) -> attention output (B, Hq, d) in float32, read straight from the pools."""
    q = q.float().contiguous()
    out = torch.empty_like(q)
    B, Hq, d = q.shape
    _, bs, hkv, _ = k_pool.shape
    rc = lib.slimlm_paged_decode(q.data_ptr(), k_pool.data_ptr(), v_pool.data_ptr(), NATIVE_DTYPES[k_pool.dtype],
                                 dt.table.data_ptr(), dt.lens.data_ptr(), out.data_ptr(), B, Hq, hkv, d, bs,
                                 dt.table.shape[1], scale, torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"paged_decode kernel failed (code {rc})")
    return out


def native_prefill(lib, q_rows: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, table: torch.Tensor,
                   q_start: int, out: torch.Tensor, scale: float) -> None:
    """Causal attention of one chunk, q_rows (T, Hq, d) at positions q_start.., written into
    ``out`` (T, Hq, d); keys and values come from the pools through ``table``. q, out and the
    pools share one dtype (float32 or bfloat16)."""
    T, Hq, d = q_rows.shape
    _, bs, hkv, _ = k_pool.shape
    if not (q_rows.dtype == out.dtype == k_pool.dtype == v_pool.dtype) or q_rows.stride(2) != 1 or out.stride(2) != 1:
        raise ValueError("native_prefill: q, out and the pools need one dtype and a contiguous head dimension")
    if not (k_pool.is_contiguous() and v_pool.is_contiguous() and table.dtype == torch.int64 and table.is_contiguous()
            and table.numel() * bs >= q_start + T):
        raise ValueError("native_prefill: contiguous pools and an int64 table covering every key are needed")
    rc = lib.slimlm_paged_prefill(q_rows.data_ptr(), q_rows.stride(0), q_rows.stride(1), k_pool.data_ptr(),
                                  v_pool.data_ptr(), NATIVE_DTYPES[k_pool.dtype], table.data_ptr(), q_start,
                                  out.data_ptr(), out.stride(0),
                                  out.stride(1), T, Hq, hkv, d, bs, scale, torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"paged_prefill kernel failed (code {rc})")


@dataclass
class DecodeGroup:
    rows: torch.Tensor
    """(B,) rows of the step holding these single-token queries."""
    q_pos: torch.Tensor  # (B, 1)
    blocks: torch.Tensor  # (B * nb,) padded with block 0
    k_pos: torch.Tensor  # (B, nb * block_size), -1 = padding
    nb: int


class PagedAttention:
    """The AttentionBackend for one engine step (see the module docstring)."""

    def __init__(
        self, cache: PagedKVCache, slots: torch.Tensor, decodes: list[DecodeGroup],
        prefills: list[PrefillSegment], span: AttentionSpan, windows: dict[int, int | None],
        scale: float, rotary: RotaryEmbedding, decode_table: DecodeTable | None = None, native=None,
        native_prefill=None,
    ):
        """``decode_table`` and ``native`` (the loaded kernel library) enable the native decode
        path for layers without a window; ``decodes`` serve the other layers. ``native_prefill``
        (the ``paged_prefill`` library) serves prefill chunks that carry a ``table``."""
        self.cache, self.slots, self.decodes, self.prefills = cache, slots, decodes, prefills
        self.decode_table, self.native, self.native_prefill = decode_table, native, native_prefill
        self.span, self.windows, self.scale, self.rotary = span, windows, scale, rotary
        self._masks: dict[tuple, torch.Tensor] = {}

    def _mask(self, key, q_pos, k_pos, window) -> torch.Tensor:
        if (key, window) not in self._masks:
            self._masks[key, window] = span_mask(q_pos, k_pos, self.span, window)
        return self._masks[key, window]

    def _attend(self, q, k, v, mask, q_pos, k_pos):
        if self.span.distance_cap is not None and self.span.sink > 0:
            return capped_attention(q, k, v, mask, q_pos, k_pos, self.span.distance_cap, self.rotary, self.scale)
        return attention(q, k, v, mask, self.scale)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q (1, Hq, T, d); k, v (1, Hkv, T, d)
        cache, bs = self.cache, self.cache.block_size
        T, hkv, d = k.shape[2], k.shape[1], k.shape[3]
        # write the new keys/values into their slots (index_copy_: one cheap op, no advanced indexing)
        cache.k[layer].view(-1, hkv * d).index_copy_(0, self.slots, k[0].transpose(0, 1).reshape(T, hkv * d))
        cache.v[layer].view(-1, hkv * d).index_copy_(0, self.slots, v[0].transpose(0, 1).reshape(T, hkv * d))
        out = torch.empty(T, q.shape[1], d, dtype=q.dtype, device=q.device)  # (T, Hq, d)
        window = self.windows.get(layer)
        q_rows = q[0].transpose(0, 1)  # (T, Hq, d) view
        if self.native is not None and self.decode_table is not None and window is None:
            dt = self.decode_table
            o = native_decode(self.native, q_rows.index_select(0, dt.rows), cache.k[layer], cache.v[layer], dt,
                              self.scale)
            out.index_copy_(0, dt.rows, o.to(out.dtype))
            decodes = []
        else:
            decodes = self.decodes
        for gi, g in enumerate(decodes):
            B = g.q_pos.shape[0]
            qd = q_rows.index_select(0, g.rows)[:, :, None]  # (B, Hq, 1, d)
            kd = cache.gather("k", layer, g.blocks).view(B, g.nb * bs, hkv, d).transpose(1, 2)  # (B, Hkv, S, d)
            vd = cache.gather("v", layer, g.blocks).view(B, g.nb * bs, hkv, d).transpose(1, 2)
            mask = self._mask(-1 - gi, g.q_pos, g.k_pos, window)
            o = self._attend(qd, kd, vd, mask, g.q_pos, g.k_pos)  # (B, Hq, 1, d)
            out.index_copy_(0, g.rows, o[:, :, 0])
        for i, p in enumerate(self.prefills):
            if self.native_prefill is not None and p.table is not None and window is None:
                native_prefill(self.native_prefill, q_rows[p.rows], cache.k[layer], cache.v[layer], p.table,
                               int(p.q_pos[0, 0]), out[p.rows], self.scale)
                continue
            qs = q[:, :, p.rows]
            if p.blocks is None:
                ks, vs = k[:, :, p.rows], v[:, :, p.rows]
            else:
                n = p.blocks.numel()
                ks = cache.gather("k", layer, p.blocks).view(1, n * bs, hkv, d).transpose(1, 2)
                vs = cache.gather("v", layer, p.blocks).view(1, n * bs, hkv, d).transpose(1, 2)
            if len(p.parts) > 1 and qs.device.type == "cpu" and qs.dtype in (torch.bfloat16, torch.float16):
                qs, ks, vs = qs.float(), ks.float(), vs.float()  # widen once, not once per query block
            r0 = p.rows.start
            for j, (a, e, n) in enumerate(p.parts):
                qp, kp = p.q_pos[:, a:e], p.k_pos[:, :n]
                mask = self._mask((i, j), qp, kp, window)
                out[r0 + a : r0 + e] = self._attend(qs[:, :, a:e], ks[:, :, :n], vs[:, :, :n], mask, qp, kp)[0].transpose(0, 1)
        return out.transpose(0, 1)[None]  # (1, Hq, T, d)
