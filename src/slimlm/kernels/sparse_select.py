"""Checked entry points of the query policies' native selection (``sparse_select.h``, built into
the ``sparse_decode`` library): :func:`native_sparse_select` writes the entries each (sequence,
KV head) attends (what the PyTorch selection of ShadowKV / Squeezed Attention picks, ties to the
lower index); :func:`native_sparse_select_decode` selects and attends in one pass over the
items, reading the pool in place (no key tier).

A row's summary reaches C as a :class:`Selection` (built by the policy's ``native_selection``);
the wrappers check every tensor's dtype, shape and contiguity; the C code checks the indices it
reads (cluster assignments, coarse parents, outlier rows) and that every entry lies inside the
row's table.
"""

from __future__ import annotations

import ctypes
from typing import NamedTuple

import torch

from slimlm.kernels.ops import _check_pool, _check_table, _lib, decode_threads

NSP, NSI, NSF, NCOUNT = 6, 6, 2, 3  # sparse_select.h
SHADOWKV, SQUEEZED = 1, 2


class Selection(NamedTuple):
    """One row's summary as the native selection reads it (see ``sparse_select.h``)."""

    kind: int
    """SHADOWKV or SQUEEZED."""
    P: int
    """Prefix tokens (selection over positions < P)."""
    tensors: tuple
    """ShadowKV: landmarks (Hkv, nc, d) float32, outlier chunks (Hkv, nc) uint8, outlier rows
    (Hkv, o) int64. Squeezed: centroids (Hkv, C, d) float32, assignment (Hkv, P) int64, sizes
    (Hkv, C) int64, and with two levels coarse centroids (Hkv, C1, d), each fine cluster's coarse
    one (Hkv, C) int64, coarse sizes (Hkv, C1) int64."""
    ints: tuple
    """ShadowKV: (nc, chunk, n_sel, o). Squeezed: (C, C1 or 0, 0, 0)."""
    need: float = 0.0
    """Squeezed: keys a query head's clusters must hold (budget x P)."""
    cneed: float = 0.0
    """Squeezed, two levels: keys its coarse clusters must hold."""
    factors: tuple | None = None
    """ShadowKV: (A (Hkv, P, r), B (Hkv, r, d), cos (P, d), sin (P, d)) float32: the first
    n_sel x chunk entries' keys are rebuilt from them."""


def _shapes(s: Selection, Hkv: int, d: int) -> list[tuple]:
    if s.kind == SHADOWKV:
        nc, _, _, o = s.ints
        return [(torch.float32, (Hkv, nc, d)), (torch.uint8, (Hkv, nc)), (torch.int64, (Hkv, o))]
    C, C1 = s.ints[:2]
    two = [(torch.float32, (Hkv, C1, d)), (torch.int64, (Hkv, C)), (torch.int64, (Hkv, C1))] if C1 else []
    return [(torch.float32, (Hkv, C, d)), (torch.int64, (Hkv, s.P)), (torch.int64, (Hkv, C))] + two


def _arrays(rows: list[Selection | None], Hkv: int, d: int):
    """([sp, si, sf, fA, fB, fcos, fsin] as pointers, the arrays they point at, rank) for the C
    call; checks each row's tensors."""
    B = len(rows)
    sp = (ctypes.c_void_p * (NSP * B))()
    si, sf = [0] * (NSI * B), [0.0] * (NSF * B)
    fptr = [(ctypes.c_void_p * B)() for _ in range(4)]
    ranks = set()
    for b, s in enumerate(rows):
        if s is None:
            continue
        if s.kind not in (SHADOWKV, SQUEEZED) or len(s.ints) != 4:
            raise ValueError("native selection: a row's kind must be ShadowKV or Squeezed, with 4 sizes")
        for i, (t, (dt, shape)) in enumerate(zip(s.tensors, _shapes(s, Hkv, d))):
            if t is None or t.dtype != dt or tuple(t.shape) != shape or not t.is_contiguous() or t.device.type != "cpu":
                raise ValueError(f"native selection: summary tensor {i} must be contiguous {dt} {shape}")
            sp[NSP * b + i] = t.data_ptr()
        si[NSI * b: NSI * b + NSI] = [s.kind, s.P, *s.ints]
        sf[NSF * b: NSF * b + NSF] = [s.need, s.cneed]
        if s.kind == SHADOWKV:
            if s.factors is None:
                raise ValueError("native selection: a ShadowKV row needs its factors")
            A, Bm, cos, sin = s.factors
            r = A.shape[-1]
            for t, shape in ((A, (Hkv, s.P, r)), (Bm, (Hkv, r, d)), (cos, (s.P, d)), (sin, (s.P, d))):
                if t.dtype != torch.float32 or tuple(t.shape) != shape or not t.is_contiguous():
                    raise ValueError("native selection: factors must be contiguous float32 A (Hkv, P, r), "
                                     "B (Hkv, r, d), cos / sin (P, d)")
            ranks.add(r)
            for a, t in zip(fptr, s.factors):
                a[b] = t.data_ptr()
    if len(ranks) > 1:
        raise ValueError("native selection: the rows' factors must share one rank")
    keep = (sp, (ctypes.c_int64 * len(si))(*si), (ctypes.c_float * len(sf))(*sf), *fptr)
    return [ctypes.cast(a, ctypes.c_void_p) for a in keep], keep, ranks.pop() if ranks else 0


def _q(q: torch.Tensor, B: int, Hkv: int) -> torch.Tensor:
    q = q.float().contiguous()
    if q.dim() != 3 or q.shape[0] != B or q.shape[1] % Hkv:
        raise ValueError("native selection: q must be (B, Hq, d) with Hq a multiple of the KV heads")
    return q


def native_sparse_select(lib, q: torch.Tensor, rows: list[Selection | None], Hkv: int, N: int | None = None):
    """q (B, Hq, d) -> (idx (B, Hkv, N) int32, cnt (B, Hkv) int64, qmask (B, Hkv, G, N) bool or None,
    nbuf (B, Hkv) int64 entries rebuilt from factors, counters (B, Hkv, 3) int64: entries, entries
    taken summed over the group's query heads, fine clusters scored). ``N``: at least every row's P."""
    B = len(rows)
    q = _q(q, B, Hkv)
    Hq, d = q.shape[1:]
    N = max([s.P for s in rows if s is not None], default=1) if N is None else N
    (sp, si, sf, *_), _keep, _ = _arrays(rows, Hkv, d)
    idx = torch.zeros(B, Hkv, N, dtype=torch.int32)
    cnt, nbuf = torch.zeros(B, Hkv, dtype=torch.int64), torch.zeros(B, Hkv, dtype=torch.int64)
    squeezed = any(s is not None and s.kind == SQUEEZED for s in rows)
    qmask = torch.zeros(B, Hkv, Hq // Hkv, N, dtype=torch.uint8) if squeezed else None
    counters = torch.zeros(B, Hkv, NCOUNT, dtype=torch.int64)
    rc = (lib or _lib("sparse_decode")).slimlm_sparse_select(
        q.data_ptr(), sp, si, sf, idx.data_ptr(), cnt.data_ptr(), qmask.data_ptr() if squeezed else None,
        nbuf.data_ptr(), counters.data_ptr(), B, Hq, Hkv, d, N, decode_threads(B * Hkv))
    if rc == 1:
        raise ValueError("native selection: a summary index or size lies outside its prefix")
    if rc:
        raise RuntimeError(f"sparse selection kernel failed (code {rc})")
    return idx, cnt, qmask.bool() if squeezed else None, nbuf, counters


def native_sparse_select_decode(lib, q: torch.Tensor, k_parts: list[torch.Tensor], v_parts: list[torch.Tensor],
                                code: int, table: torch.Tensor, rows: list[Selection | None], tail: torch.Tensor,
                                scale: float, memo: dict | None = None,
                                check_table: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Selection and sparse attention in one call: q (B, Hq, d) -> (out (B, Hq, d) float32,
    counters (B, Hkv, 3) int64 as :func:`native_sparse_select`). Row b attends its selected prefix
    entries (none for a row without a summary) and the dense ``tail`` (B, 2) int64 range, keys and
    values read in place from the pool (``code`` its format; keys in the pool, no key tier).
    ``memo``: a dict kept with these ``rows`` (the same Selection objects) to reuse their checked
    C arrays; ``check_table`` False: ``table`` was checked against this pool before (one step's
    table, its later layers)."""
    k0 = k_parts[0]
    num_blocks, bs, hkv = v_parts[0].shape[0], k0.shape[1], k0.shape[2]
    B = len(rows)
    q = _q(q, B, hkv)
    Hq, d = q.shape[1:]
    _check_pool(k_parts, code)
    _check_pool(v_parts, code)
    if check_table:
        _check_table(table, num_blocks)
    elif table.dtype != torch.int64 or not table.is_contiguous():
        raise ValueError("native kernels need a contiguous int64 block table")
    if table.dim() != 2 or table.shape[0] != B or (code < 3 and k0.shape[3] != d) or (code >= 3 and k0.shape[3] * 2 != d):
        raise ValueError("native selection: table (B, max_blocks) and a head size matching the pool needed")
    if tail.dtype != torch.int64 or tail.shape != (B, 2) or not tail.is_contiguous():
        raise ValueError("native selection: tail must be a contiguous int64 (B, 2) tensor")
    key = (hkv, d)
    if memo is None or memo.get("key") != key:
        arrays = _arrays(rows, hkv, d)
        if memo is not None:
            memo.update(key=key, arrays=arrays)
    else:
        arrays = memo["arrays"]
    (sp, si, sf, *fptr), _keep, rank = arrays
    out = torch.empty_like(q)
    counters = torch.zeros(B, hkv, NCOUNT, dtype=torch.int64)
    aux = [t.data_ptr() for t in k_parts[1:]] + [None] * (3 - len(k_parts))
    vaux = [t.data_ptr() for t in v_parts[1:]] + [None] * (3 - len(v_parts))
    rc = (lib or _lib("sparse_decode")).slimlm_sparse_select_decode(
        q.data_ptr(), k0.data_ptr(), v_parts[0].data_ptr(), aux[0], aux[1], vaux[0], vaux[1], code, table.data_ptr(),
        table.shape[1], sp, si, sf, *fptr, rank, tail.data_ptr(), out.data_ptr(), counters.data_ptr(), B, Hq, hkv, d,
        bs, scale, decode_threads(B * hkv))
    if rc == 1:
        raise ValueError("native selection: a summary index, prefix or tail lies outside its table")
    if rc:
        raise RuntimeError(f"sparse selection kernel failed (code {rc})")
    return out, counters
