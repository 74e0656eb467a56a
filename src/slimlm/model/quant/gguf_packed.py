"""GGUF quantized tensors as packed weights, bit for bit (never de-quantized to fp32).

ggml block layouts (one block = the row's next 32 or 256 values). Q8_0 / Q4_0 / Q4_1 keep their
fp16 scales (and minimums) as they are, and Q4_0's min -8 d, exact in fp16 too (a power of two
times d; fp32 in the rare tensor where it would overflow). Q4_K / Q6_K hold d * sc in fp32:
products of an fp16 and a 6-bit (or int8) integer are exact in fp32, not in fp16.

- Q8_0 (34 bytes / 32): d, q[32] int8               -> int8, group 32: scale d
- Q4_0 (18 bytes / 32): d, qs[16]                   -> int4, group 32: scale d, min -8 d
- Q4_1 (20 bytes / 32): d, m, qs[16]                -> int4, group 32: scale d, min m
- Q4_K (144 bytes / 256): d, dmin, 12 bytes of 6-bit (scale, min) for 8 sub-blocks of 32,
  qs[128] (sub-block 2i in the low nibbles of bytes 32i..32i+31, 2i+1 in the high ones)
                                                    -> int4, group 32: scale d sc, min -dmin m
- Q6_K (210 bytes / 256): ql[128], qh[64], int8 scales[16], d; q = 6 bits - 32
                                                    -> int8, group 16: scale d sc
Q4_0 / Q4_1 nibbles are already in :class:`Int4Weight`'s order; Q4_K's are re-packed.
"""

from __future__ import annotations

import numpy as np
import torch

from slimlm.model.quant.formats import Int4Weight, Int8Weight, PackedWeight, pack_nibbles

PACKED_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K")
"""GGUF types served packed; other quantized types are de-quantized on load (with a warning)."""


def _h(b: np.ndarray) -> np.ndarray:
    """(..., 2) uint8 -> (...) float16."""
    return np.ascontiguousarray(b).view(np.float16)[..., 0]


def _f16(b: np.ndarray) -> np.ndarray:
    """(..., 2) uint8 -> (...) float32 (exact)."""
    return _h(b).astype(np.float32)


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


def pack_gguf(raw: np.ndarray, type_name: str, n: int, k: int) -> PackedWeight | None:
    """``raw`` (n, bytes per row) uint8 of a GGUF tensor of ``n`` rows by ``k`` values -> packed
    weight, or None when ``type_name`` has no packed form."""
    raw = np.asarray(raw, dtype=np.uint8).reshape(n, -1)
    if type_name == "Q8_0":
        b = raw.reshape(n, k // 32, 34)
        q = b[..., 2:].view(np.int8).reshape(n, k)
        return Int8Weight(_t(q), _t(_h(b[..., 0:2])), 32)
    if type_name in ("Q4_0", "Q4_1"):
        size = 18 if type_name == "Q4_0" else 20
        b = raw.reshape(n, k // 32, size)
        d = _h(b[..., 0:2])
        if type_name == "Q4_1":
            mn = _h(b[..., 2:4])
        else:  # -8 d: exact in fp16 unless |d| > 8188 (then fp32, exact too)
            mn = -8.0 * d.astype(np.float32)
            if np.abs(mn).max(initial=0.0) <= 65504.0:
                mn = mn.astype(np.float16)
        return Int4Weight(_t(b[..., size - 16:].reshape(n, k // 2)), _t(d), _t(mn), 32)
    if type_name == "Q4_K":
        return _q4_k(raw, n, k)
    if type_name == "Q6_K":
        return _q6_k(raw, n, k)
    return None


def _q4_k(raw: np.ndarray, n: int, k: int) -> Int4Weight:
    nb = k // 256
    b = raw.reshape(n, nb, 144)
    d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])  # (n, nb)
    s = b[..., 4:16].astype(np.int32)  # (n, nb, 12)
    sc = np.empty((n, nb, 8), np.int32)
    m = np.empty((n, nb, 8), np.int32)
    sc[..., :4] = s[..., 0:4] & 63
    m[..., :4] = s[..., 4:8] & 63
    sc[..., 4:] = (s[..., 8:12] & 0xF) | ((s[..., 0:4] >> 6) << 4)
    m[..., 4:] = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    qs = b[..., 16:].reshape(n, nb, 4, 32)  # 4 chunks of 64 values in 32 bytes
    codes = np.stack([qs & 15, qs >> 4], axis=3).reshape(n, nb * 8, 32)  # sub-block order 2i, 2i+1
    scale = (d[..., None] * sc).reshape(n, nb * 8).astype(np.float32)
    mins = (-(dmin[..., None] * m)).reshape(n, nb * 8).astype(np.float32)
    q = pack_nibbles(torch.from_numpy(np.ascontiguousarray(codes)), 32)
    return Int4Weight(q, _t(scale), _t(mins), 32)


def _q6_k(raw: np.ndarray, n: int, k: int) -> Int8Weight:
    nb = k // 256
    b = raw.reshape(n, nb, 210)
    ql = b[..., 0:128].reshape(n, nb, 2, 64).astype(np.int16)
    qh = b[..., 128:192].reshape(n, nb, 2, 32).astype(np.int16)
    sc = b[..., 192:208].view(np.int8).astype(np.float32)  # (n, nb, 16)
    d = _f16(b[..., 208:210])  # (n, nb)
    lo, hi = ql[..., :32], ql[..., 32:]  # each half: (n, nb, 2, 32)
    q1 = (lo & 15) | (((qh >> 0) & 3) << 4)
    q2 = (hi & 15) | (((qh >> 2) & 3) << 4)
    q3 = (lo >> 4) | (((qh >> 4) & 3) << 4)
    q4 = (hi >> 4) | (((qh >> 6) & 3) << 4)
    q = (np.stack([q1, q2, q3, q4], axis=3) - 32).astype(np.int8).reshape(n, k)  # (n, nb, 2, 4, 32)
    scale = (d[..., None] * sc).reshape(n, nb * 16).astype(np.float32)
    return Int8Weight(_t(q), _t(scale), 16)


def permute_rows(p: PackedWeight, perm) -> PackedWeight:
    """Apply a row reordering ``perm`` (a function of a tensor with rows first) to every part."""
    if isinstance(p, Int8Weight):
        return Int8Weight(perm(p.q).contiguous(), perm(p.scale).contiguous(), p.group_size)
    return Int4Weight(perm(p.q).contiguous(), perm(p.scale).contiguous(), perm(p.min).contiguous(), p.group_size)
