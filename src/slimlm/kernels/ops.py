"""Checked entry points of the native kernels, also registered as ``torch.library`` ops.

The C code trusts its pointers, so every call goes through these wrappers, which check what
the kernel would otherwise read out of bounds or misinterpret: dtypes and contiguity of every
tensor, block ids inside the pool, lengths inside the table's capacity. A failed check raises
ValueError before the kernel runs. The checks are a few reductions over small index tensors
(microseconds a step).

Ops: ``torch.ops.slimlm.paged_decode`` and ``torch.ops.slimlm.paged_prefill`` (schemas below,
mutated arguments declared, a CPU implementation = the checked call, and a fake implementation
that checks shapes and dtypes and allocates the output), so ``torch.compile`` traces a model
that uses them as one opaque op each instead of breaking the graph at a ctypes call, and
``torch.library.opcheck`` accepts them. The wrappers :func:`native_decode` / :func:`native_prefill`
call the op while ``torch.compile`` traces and the implementation directly in eager mode: the
dispatcher costs about 10 us a call (measured here: 15 us vs 3.6 us for a plain Python call that
allocates the output; ``torch.library.custom_op`` about 90 us), and the engine makes two calls
per layer per step. Both paths run the same checks and the same kernel.
"""

from __future__ import annotations

import ctypes

import torch

NATIVE_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
"""Plain pool dtypes and their codes (quantized codecs carry their own ``native_code``)."""


def _check_pool(parts: list[torch.Tensor], code: int, role: int | None = None) -> None:
    """``code``: the kernels' kv code (kv_pool.h: 0 float32, 1 bfloat16, 2 int8, 3 .. 6 int4 with
    keys / values in groups of 32 or 16); ``role`` 0 keys, 1 values: int4's scales must hold one
    entry per group of that pool."""
    if not all(t.is_contiguous() for t in parts):
        raise ValueError("native kernels need contiguous KV pools")
    i4 = [torch.uint8, torch.float16, torch.float16]
    expect = {0: [torch.float32], 1: [torch.bfloat16], 2: [torch.int8, torch.float16],
              3: i4, 4: i4, 5: i4, 6: i4}.get(code)
    if expect is None or [t.dtype for t in parts] != expect:
        raise ValueError(f"native kernels: pool parts {[t.dtype for t in parts]} do not match dtype code {code}")
    if code >= 3 and role is not None:
        group = 16 if (code - 3) >> role & 1 else 32
        if parts[1].shape[-1] * group != parts[0].shape[-1] * 2 or parts[2].shape != parts[1].shape:
            raise ValueError(f"native kernels: int4 scales {tuple(parts[1].shape)} are not one per {group} channels "
                             f"(dtype code {code})")


def _aux(parts: list[torch.Tensor]) -> list[int | None]:
    """The kernels' two auxiliary pointers of a pool (scales, int4 minima; None where absent)."""
    return [t.data_ptr() for t in parts[1:]] + [None] * (3 - len(parts))


def decode_threads(num_seqs: int) -> int:
    """Threads for a decode call: never more than its work items (sequences). A thread with no
    work still joins the parallel region's closing barrier, and on a busy machine that barrier
    waits for a descheduled thread's next time slice: batch-1 decode steps measured 2.5-5x
    slower with 2 threads than with 1 while other processes used the cores."""
    return max(1, min(torch.get_num_threads(), num_seqs))


def _check_table(table: torch.Tensor, num_blocks: int) -> None:
    if table.dtype != torch.int64 or not table.is_contiguous():
        raise ValueError("native kernels need a contiguous int64 block table")
    if table.numel() and (int(table.min()) < 0 or int(table.max()) >= num_blocks):
        raise ValueError(f"native kernels: block table holds ids outside the pool [0, {num_blocks})")


def _check_key_table(ktable, table, num_key_blocks, bs, idx, cnt, nbuf, tail) -> None:
    """Every key the sparse kernel reads from the key pool lies in a held key block."""
    if ktable.dtype != torch.int64 or not ktable.is_contiguous() or ktable.shape != table.shape:
        raise ValueError("native_sparse_decode: ktable must be a contiguous int64 tensor shaped like table")
    if ktable.numel() and int(ktable.max()) >= num_key_blocks:
        raise ValueError(f"native_sparse_decode: ktable holds ids outside the key pool [0, {num_key_blocks})")
    need = []
    for b in range(idx.shape[0]):
        lo, hi = int(tail[b, 0]), int(tail[b, 1])
        if hi > lo:
            need.append(ktable[b, lo // bs : -(-hi // bs)])
        for h in range(idx.shape[1]):
            first = int(nbuf[b, h]) if nbuf is not None else 0
            need.append(ktable[b, idx[b, h, first : int(cnt[b, h])].long() // bs])
    need = torch.cat(need) if need else ktable.new_zeros(0)
    if need.numel() and int(need.min()) < 0:
        raise ValueError("native_sparse_decode: a key the kernel would read has no block in the key pool")


_LIBS: dict[str, object] = {}
"""The libraries the wrappers were handed (the ops' implementations call the same ones)."""


def _lib(name: str):
    lib = _LIBS.get(name)
    if lib is None:
        from slimlm import kernels

        lib = kernels.load(name)
        if lib is None:
            raise RuntimeError(f"the native {name} kernel is unavailable (no compiler, a failed build or "
                               "SLIMLM_NATIVE=0); use the PyTorch path")
        _LIBS[name] = lib
    return lib


def _decode_shapes(q, k_parts, v_parts, code, table, lens, mass) -> None:
    """The checks that need no tensor data (the fake implementation runs these too)."""
    k0 = k_parts[0]
    num_blocks, bs, hkv = k0.shape[0], k0.shape[1], k0.shape[2]
    B, Hq, d = q.shape
    _check_pool(k_parts, code, 0)
    _check_pool(v_parts, code, 1)
    if table.dtype != torch.int64 or table.dim() != 2 or table.shape[0] != B or lens.shape != (B,) \
            or lens.dtype != torch.int64:
        raise ValueError("native_decode: table (B, max_blocks) and lens (B,) int64 are needed")
    if Hq % hkv or (code < 3 and k0.shape[3] != d) or (code >= 3 and k0.shape[3] * 2 != d):
        raise ValueError("native_decode: head counts or head size do not match the pool")
    if mass is not None and (mass.dtype != torch.float32 or mass.numel() != num_blocks * bs * hkv):
        raise ValueError("native_decode: mass must be a contiguous float32 (slots, Hkv) tensor")


def _decode_impl(q: torch.Tensor, k_parts: list[torch.Tensor], v_parts: list[torch.Tensor], code: int,
                 table: torch.Tensor, lens: torch.Tensor, scale: float, mass: torch.Tensor | None) -> torch.Tensor:
    k0 = k_parts[0]
    num_blocks, bs, hkv = k0.shape[0], k0.shape[1], k0.shape[2]
    q = q.float().contiguous()
    B, Hq, d = q.shape
    _decode_shapes(q, k_parts, v_parts, code, table, lens, mass)
    _check_table(table, num_blocks)
    if not lens.is_contiguous():
        raise ValueError("native_decode: lens must be contiguous")
    if B and (int(lens.min()) < 0 or int(lens.max()) > table.shape[1] * bs):
        raise ValueError("native_decode: a length exceeds its block table's capacity")
    if mass is not None and not mass.is_contiguous():
        raise ValueError("native_decode: mass must be a contiguous float32 (slots, Hkv) tensor")
    out = torch.empty_like(q)
    aux, vaux = _aux(k_parts), _aux(v_parts)
    rc = _lib("paged_decode").slimlm_paged_decode(
        q.data_ptr(), k0.data_ptr(), v_parts[0].data_ptr(), aux[0], aux[1], vaux[0], vaux[1], code,
        table.data_ptr(), lens.data_ptr(), out.data_ptr(), mass.data_ptr() if mass is not None else None, B, Hq,
        hkv, d, bs, table.shape[1], scale, decode_threads(B))
    if rc != 0:
        raise RuntimeError(f"paged_decode kernel failed (code {rc})")
    return out


def native_decode(lib, q: torch.Tensor, k_parts: list[torch.Tensor], v_parts: list[torch.Tensor], code: int,
                  table: torch.Tensor, lens: torch.Tensor, scale: float,
                  mass: torch.Tensor | None = None) -> torch.Tensor:
    """q (B, Hq, d) -> attention output (B, Hq, d) in float32, keys and values read in place
    from the pools (``k_parts``: the codec's tensors, data first). ``table`` (B, max_blocks)
    int64, ``lens`` (B,) int64 tokens each query attends. ``mass`` (slots, Hkv) float32, if
    given, receives the attention probabilities per key. ``lib``: the loaded ``paged_decode``."""
    if lib is not None:
        _LIBS["paged_decode"] = lib
    if torch.compiler.is_compiling():
        return torch.ops.slimlm.paged_decode(q, list(k_parts), list(v_parts), code, table, lens, scale, mass)
    return _decode_impl(q, k_parts, v_parts, code, table, lens, scale, mass)


def _prefill_shapes(q_rows, k_pool, v_pool, table, q_start, out) -> None:
    T, Hq, d = q_rows.shape
    num_blocks, bs, hkv, _ = k_pool.shape
    if not (q_rows.dtype == out.dtype == k_pool.dtype == v_pool.dtype) or q_rows.stride(2) != 1 or out.stride(2) != 1:
        raise ValueError("native_prefill: q, out and the pools need one dtype and a contiguous head dimension")
    if out.shape != q_rows.shape:
        raise ValueError("native_prefill: out must have q's shape (T, Hq, d)")
    if k_pool.dtype not in NATIVE_DTYPES or v_pool.shape != k_pool.shape:
        raise ValueError("native_prefill: contiguous float32 or bfloat16 pools are needed")
    if table.dtype != torch.int64:
        raise ValueError("native kernels need a contiguous int64 block table")
    if table.numel() * bs < q_start + T or Hq % hkv or k_pool.shape[3] != d:
        raise ValueError("native_prefill: the table must cover every key and head sizes must match the pool")


def _prefill_impl(q_rows: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, table: torch.Tensor,
                  q_start: int, out: torch.Tensor, scale: float) -> None:
    T, Hq, d = q_rows.shape
    num_blocks, bs, hkv, _ = k_pool.shape
    _prefill_shapes(q_rows, k_pool, v_pool, table, q_start, out)
    if not (k_pool.is_contiguous() and v_pool.is_contiguous()):
        raise ValueError("native_prefill: contiguous float32 or bfloat16 pools are needed")
    _check_table(table, num_blocks)
    rc = _lib("paged_prefill").slimlm_paged_prefill(
        q_rows.data_ptr(), q_rows.stride(0), q_rows.stride(1), k_pool.data_ptr(), v_pool.data_ptr(),
        NATIVE_DTYPES[k_pool.dtype], table.data_ptr(), q_start, out.data_ptr(), out.stride(0), out.stride(1), T, Hq,
        hkv, d, bs, scale, torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"paged_prefill kernel failed (code {rc})")


def native_prefill(lib, q_rows: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, table: torch.Tensor,
                   q_start: int, out: torch.Tensor, scale: float) -> None:
    """Causal attention of one chunk, q_rows (T, Hq, d) at storage indices q_start.., written
    into ``out`` (T, Hq, d); keys and values come from the pools through ``table``. q, out and
    the pools share one dtype (float32 or bfloat16). ``lib``: the loaded ``paged_prefill``."""
    if lib is not None:
        _LIBS["paged_prefill"] = lib
    if torch.compiler.is_compiling():
        torch.ops.slimlm.paged_prefill(q_rows, k_pool, v_pool, table, q_start, out, scale)
        return
    _prefill_impl(q_rows, k_pool, v_pool, table, q_start, out, scale)


def _check_q_pools(op: str, q_rows, k_parts, v_parts, code, out, out_f32: bool = False) -> None:
    """What the pool-reading prefill kernels check alike: both pools in the stored format ``code``
    and of one shape, q of a native dtype and out of q's shape, both with a contiguous head
    dimension; out in q's dtype, or float32 whatever q's when ``out_f32`` (the key-range entries)."""
    _check_pool(k_parts, code, 0)
    _check_pool(v_parts, code, 1)
    if v_parts[0].shape != k_parts[0].shape or len(v_parts) != len(k_parts):
        raise ValueError(f"{op}: key and value pools differ in shape")
    if q_rows.dtype not in NATIVE_DTYPES or q_rows.stride(2) != 1:
        raise ValueError(f"{op}: q must be float32 / bfloat16 with a contiguous head dimension")
    if out_f32 and (out.dtype != torch.float32 or out.shape != q_rows.shape or out.stride(2) != 1):
        raise ValueError(f"{op}: out must be float32 of q's shape (T, Hq, d), head dimension contiguous")
    if not out_f32 and (q_rows.dtype != out.dtype or out.stride(2) != 1 or out.shape != q_rows.shape):
        raise ValueError(f"{op}: q and out need one float32 / bfloat16 dtype, q's shape and a contiguous head "
                         "dimension")


def _check_range(op: str, lse, T: int, Hq: int, k_lo: int, k_hi: int) -> None:
    """The key-range entries' own arguments: lse a contiguous float32 (T, Hq), 0 <= k_lo <= k_hi."""
    if lse.dtype != torch.float32 or lse.shape != (T, Hq):
        raise ValueError(f"{op}: lse must be a contiguous float32 (T, Hq) tensor")
    if not 0 <= k_lo <= k_hi:
        raise ValueError(f"{op}: need 0 <= k_lo <= k_hi, got {k_lo}, {k_hi}")


def _prefill_ex_shapes(q_rows, k_parts, v_parts, code, table, q_start, out, mass) -> None:
    T, Hq, d = q_rows.shape
    k0 = k_parts[0]
    num_blocks, bs, hkv = k0.shape[0], k0.shape[1], k0.shape[2]
    _check_q_pools("native_prefill", q_rows, k_parts, v_parts, code, out)
    if table.dtype != torch.int64:
        raise ValueError("native kernels need a contiguous int64 block table")
    if table.numel() * bs < q_start + T or Hq % hkv or k0.shape[3] * (2 if code >= 3 else 1) != d:
        raise ValueError("native_prefill: the table must cover every key and head sizes must match the pool")
    if mass is not None and (mass.dtype != torch.float32 or mass.numel() != num_blocks * bs * hkv):
        raise ValueError("native_prefill: mass must be a contiguous float32 (slots, Hkv) tensor")


def _prefill_ex_impl(q_rows: torch.Tensor, k_parts: list[torch.Tensor], v_parts: list[torch.Tensor], code: int,
                     table: torch.Tensor, q_start: int, out: torch.Tensor, scale: float,
                     mass: torch.Tensor | None) -> None:
    T, Hq, d = q_rows.shape
    k0 = k_parts[0]
    _prefill_ex_shapes(q_rows, k_parts, v_parts, code, table, q_start, out, mass)
    _check_table(table, k0.shape[0])
    if mass is not None and not mass.is_contiguous():
        raise ValueError("native_prefill: mass must be a contiguous float32 (slots, Hkv) tensor")
    aux, vaux = _aux(k_parts), _aux(v_parts)
    rc = _lib("paged_prefill").slimlm_paged_prefill_ex(
        q_rows.data_ptr(), q_rows.stride(0), q_rows.stride(1), k0.data_ptr(), aux[0], aux[1], v_parts[0].data_ptr(),
        vaux[0], vaux[1], code, NATIVE_DTYPES[q_rows.dtype], table.data_ptr(), q_start, out.data_ptr(), out.stride(0),
        out.stride(1), T, Hq, k0.shape[2], d, k0.shape[1], scale, mass.data_ptr() if mass is not None else None,
        torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"paged_prefill kernel failed (code {rc})")


def native_prefill_ex(lib, q_rows: torch.Tensor, k_parts: list[torch.Tensor], v_parts: list[torch.Tensor], code: int,
                      table: torch.Tensor, q_start: int, out: torch.Tensor, scale: float,
                      mass: torch.Tensor | None = None) -> None:
    """:func:`native_prefill` over pools in any stored format the native kernels read (``code``:
    0 float32, 1 bfloat16, 2 int8, 3 .. 6 int4 (kernels/kv_pool.h); ``k_parts`` / ``v_parts``: the codec's tensors, data
    first), decoded in place while the kernel repacks them (a rotating codec's keys stay in the
    stored space: the caller rotates the query). ``mass`` (slots, Hkv) float32, if given,
    receives each key's attention probabilities (summed over queries and query heads)."""
    if lib is not None:
        _LIBS["paged_prefill"] = lib
    if torch.compiler.is_compiling():
        torch.ops.slimlm.paged_prefill_ex(q_rows, list(k_parts), list(v_parts), code, table, q_start, out, scale, mass)
        return
    _prefill_ex_impl(q_rows, k_parts, v_parts, code, table, q_start, out, scale, mass)


def release_prefill_scratch() -> None:
    """Give back the prefill kernel's scratch (its per-thread tile buffers and the calling thread's
    repacked K/V); the next call allocates what it needs again. A no-op when it is not loaded."""
    from slimlm import kernels

    lib = _LIBS.get("paged_prefill") or kernels._loaded.get("paged_prefill")
    if lib is not None:
        lib.slimlm_prefill_release(torch.get_num_threads())


# ---------------------------------------------------------------------- torch.library registration
_DEF = torch.library.Library("slimlm", "DEF")
_DEF.define("paged_decode(Tensor q, Tensor[] k_parts, Tensor[] v_parts, int code, Tensor table, Tensor lens, "
            "float scale, Tensor(a!)? mass) -> Tensor")
_DEF.define("paged_prefill(Tensor q_rows, Tensor k_pool, Tensor v_pool, Tensor table, int q_start, Tensor(a!) out, "
            "float scale) -> ()")
_DEF.define("paged_prefill_ex(Tensor q_rows, Tensor[] k_parts, Tensor[] v_parts, int code, Tensor table, "
            "int q_start, Tensor(a!) out, float scale, Tensor(b!)? mass) -> ()")
_DEF.impl("paged_prefill_ex", _prefill_ex_impl, "CPU")
_DEF.impl("paged_decode", _decode_impl, "CPU")
_DEF.impl("paged_prefill", _prefill_impl, "CPU")


@torch.library.register_fake("slimlm::paged_decode", lib=_DEF)
def _decode_fake(q, k_parts, v_parts, code, table, lens, scale, mass):
    _decode_shapes(q, k_parts, v_parts, code, table, lens, mass)
    return q.new_empty(q.shape, dtype=torch.float32)


@torch.library.register_fake("slimlm::paged_prefill", lib=_DEF)
def _prefill_fake(q_rows, k_pool, v_pool, table, q_start, out, scale):
    _prefill_shapes(q_rows, k_pool, v_pool, table, q_start, out)


# ---------------------------------------------------------------------- sparse decode (query KV policies)
def native_sparse_decode(lib, q: torch.Tensor, k_parts: list[torch.Tensor], v_parts: list[torch.Tensor], code: int,
                         table: torch.Tensor, idx: torch.Tensor, cnt: torch.Tensor, tail: torch.Tensor, scale: float,
                         qmask: torch.Tensor | None = None, kbuf: torch.Tensor | None = None,
                         nbuf: torch.Tensor | None = None, factors: list | None = None,
                         ktable: torch.Tensor | None = None) -> torch.Tensor:
    """q (B, Hq, d) -> attention output (B, Hq, d) float32 over a subset of each sequence's keys
    (``sparse_decode.c``): per (sequence, KV head) the logical tokens ``idx`` (B, Hkv, N) int32,
    the first ``cnt`` (B, Hkv) int64 of them, plus the dense ``tail`` (B, 2) int64 range
    [lo, hi). ``qmask`` (B, Hkv, G, N) bool/uint8: which query heads of the group take each entry
    (None: all). ``kbuf`` (B, Hkv, N, d) float32: the keys of the first ``nbuf`` (B, Hkv) entries,
    used instead of the pool's (None: every key from the pool). Every index is checked against
    the table's capacity before the kernel runs. ``factors``: per sequence None or (A (Hkv, P, r),
    B (Hkv, r, d), cos (P, d), sin (P, d)) float32 contiguous: the first ``nbuf`` entries' keys
    are rebuilt in the kernel as RoPE_t(A[h, t] B[h]) (ShadowKV), instead of taken from ``kbuf``.
    ``ktable`` (B, max_blocks) int64: each logical block's block in the key pool when keys live
    apart from values (ShadowKV's second tier; -1: no keys held, then every key the kernel would
    read there must come from ``kbuf``). ``lib``: the loaded ``sparse_decode``."""
    if lib is not None:
        _LIBS["sparse_decode"] = lib
    k0 = k_parts[0]
    num_blocks, bs, hkv = v_parts[0].shape[0], k0.shape[1], k0.shape[2]
    q = q.float().contiguous()
    B, Hq, d = q.shape
    _check_pool(k_parts, code, 0)
    _check_pool(v_parts, code, 1)
    _check_table(table, num_blocks)
    if table.dim() != 2 or table.shape[0] != B or Hq % hkv or (code < 3 and k0.shape[3] != d) \
            or (code >= 3 and k0.shape[3] * 2 != d):
        raise ValueError("native_sparse_decode: table (B, max_blocks) and head counts / size matching the pool needed")
    cap = table.shape[1] * bs
    if idx.dtype != torch.int32 or idx.dim() != 3 or idx.shape[:2] != (B, hkv) or not idx.is_contiguous():
        raise ValueError("native_sparse_decode: idx must be a contiguous int32 (B, Hkv, N) tensor")
    N = idx.shape[2]
    if cnt.dtype != torch.int64 or cnt.shape != (B, hkv) or not cnt.is_contiguous() or \
            (cnt.numel() and (int(cnt.min()) < 0 or int(cnt.max()) > N)):
        raise ValueError("native_sparse_decode: cnt must be a contiguous int64 (B, Hkv) tensor of counts <= N")
    if N and B and (int(idx.min()) < 0 or int(idx.max()) >= cap):
        raise ValueError("native_sparse_decode: a token index lies outside its block table")
    if tail.dtype != torch.int64 or tail.shape != (B, 2) or not tail.is_contiguous() or \
            (B and (int(tail.min()) < 0 or int(tail.max()) > cap)):
        raise ValueError("native_sparse_decode: tail must be a contiguous int64 (B, 2) range inside the table")
    if ktable is not None:
        _check_key_table(ktable, table, k0.shape[0], bs, idx, cnt, nbuf if (kbuf is not None or factors) else None, tail)
    if qmask is not None:
        qmask = qmask.to(torch.uint8).contiguous()
        if qmask.shape != (B, hkv, Hq // hkv, N):
            raise ValueError("native_sparse_decode: qmask must be (B, Hkv, G, N)")
    if kbuf is not None:
        if kbuf.dtype != torch.float32 or kbuf.shape != (B, hkv, N, d) or not kbuf.is_contiguous() or nbuf is None \
                or nbuf.dtype != torch.int64 or nbuf.shape != (B, hkv) or not nbuf.is_contiguous() \
                or (nbuf.numel() and int((nbuf - cnt).max()) > 0):
            raise ValueError("native_sparse_decode: kbuf (B, Hkv, N, d) float32 needs nbuf (B, Hkv) int64 <= cnt")
    ptrs, rank = None, 0
    if factors is not None:
        if kbuf is not None or nbuf is None or nbuf.dtype != torch.int64 or nbuf.shape != (B, hkv) \
                or len(factors) != B or (nbuf.numel() and int((nbuf - cnt).max()) > 0):
            raise ValueError("native_sparse_decode: factors (one per sequence) need nbuf (B, Hkv) int64 <= cnt, "
                             "and no kbuf")
        ranks = {f[0].shape[2] for f in factors if f is not None}
        rank = ranks.pop() if len(ranks) == 1 else 0
        arr = [(ctypes.c_void_p * B)() for _ in range(4)]
        plen = torch.zeros(B, dtype=torch.int64)
        for b, f in enumerate(factors):
            if f is None:
                continue
            A, Bm, cos, sin = f
            P = A.shape[1]
            if rank == 0 or not all(t.dtype == torch.float32 and t.is_contiguous() for t in f) \
                    or A.shape != (hkv, P, rank) or Bm.shape != (hkv, rank, d) or cos.shape != (P, d) \
                    or sin.shape != (P, d):
                raise ValueError("native_sparse_decode: factors must be contiguous float32 A (Hkv, P, r), "
                                 "B (Hkv, r, d), cos / sin (P, d) of one rank")
            m = int(nbuf[b].max()) if hkv else 0
            if m and int(idx[b, :, :m].max()) >= P:
                raise ValueError("native_sparse_decode: a rebuilt token lies outside its factors")
            plen[b] = P
            for a, t in zip(arr, f):
                a[b] = t.data_ptr()
        ptrs = (*arr, plen)
    fptrs = [ctypes.cast(a, ctypes.c_void_p).value for a in ptrs[:4]] if ptrs else [None] * 4
    out = torch.empty_like(q)
    aux, vaux = _aux(k_parts), _aux(v_parts)
    rc = _lib("sparse_decode").slimlm_sparse_decode(
        q.data_ptr(), k0.data_ptr(), v_parts[0].data_ptr(), aux[0], aux[1], vaux[0], vaux[1], code,
        table.data_ptr(), ktable.data_ptr() if ktable is not None else None, table.shape[1], idx.data_ptr(),
        cnt.data_ptr(), N,
        qmask.data_ptr() if qmask is not None else None, kbuf.data_ptr() if kbuf is not None else None,
        nbuf.data_ptr() if (kbuf is not None or ptrs) else None,
        *fptrs, ptrs[4].data_ptr() if ptrs else None, rank,
        tail.data_ptr(), out.data_ptr(), B, Hq, hkv, d, bs, scale, decode_threads(B * hkv))
    if rc != 0:
        raise RuntimeError(f"sparse_decode kernel failed (code {rc})")
    return out


@torch.library.register_fake("slimlm::paged_prefill_ex", lib=_DEF)
def _prefill_ex_fake(q_rows, k_parts, v_parts, code, table, q_start, out, scale, mass):
    _prefill_ex_shapes(q_rows, k_parts, v_parts, code, table, q_start, out, mass)


# ---------------------------------------------------------------------- sparse prefill (vertical-slash)
def _sparse_prefill_shapes(q_rows, k_parts, v_parts, code, table, q_start, cols, offs, block, out, stats,
                           op: str = "native_sparse_prefill", out_f32: bool = False) -> None:
    T, Hq, d = q_rows.shape
    k0 = k_parts[0]
    hkv = k0.shape[2]
    _check_q_pools(op, q_rows, k_parts, v_parts, code, out, out_f32)
    if table.dtype != torch.int64 or table.numel() * k0.shape[1] < q_start + T or Hq % hkv \
            or k0.shape[3] * (2 if code >= 3 else 1) != d:
        raise ValueError("native_sparse_prefill: an int64 table covering every key and head sizes matching the pool "
                         "are needed")
    for name, t in (("cols", cols), ("offs", offs)):
        if t.dtype != torch.int32 or t.dim() != 2 or t.shape[0] != Hq:
            raise ValueError(f"native_sparse_prefill: {name} must be an int32 (Hq, n) tensor")
    if block < 1:
        raise ValueError("native_sparse_prefill: block must be >= 1")
    if stats is not None and (stats.dtype != torch.int64 or stats.numel() != 2):
        raise ValueError("native_sparse_prefill: stats must be a contiguous int64 tensor of 2")


def _check_sorted(cols: torch.Tensor, offs: torch.Tensor) -> None:
    """The kernel merges the lists as sorted runs: anything else could emit a key twice."""
    for name, t in (("cols", cols), ("offs", offs)):
        if not t.is_contiguous() or (t.shape[1] > 1 and not bool((t[:, 1:] > t[:, :-1]).all())):
            raise ValueError(f"native_sparse_prefill: {name} must be contiguous and strictly ascending per head")


def _sparse_prefill_impl(q_rows: torch.Tensor, k_parts: list[torch.Tensor], v_parts: list[torch.Tensor], code: int,
                         table: torch.Tensor, q_start: int, cols: torch.Tensor, offs: torch.Tensor, block: int,
                         out: torch.Tensor, scale: float, stats: torch.Tensor | None) -> None:
    T, Hq, d = q_rows.shape
    k0 = k_parts[0]
    _sparse_prefill_shapes(q_rows, k_parts, v_parts, code, table, q_start, cols, offs, block, out, stats)
    _check_table(table, k0.shape[0])
    _check_sorted(cols, offs)
    if stats is not None and not stats.is_contiguous():
        raise ValueError("native_sparse_prefill: stats must be a contiguous int64 tensor of 2")
    aux, vaux = _aux(k_parts), _aux(v_parts)
    rc = _lib("sparse_prefill").slimlm_sparse_prefill(
        q_rows.data_ptr(), q_rows.stride(0), q_rows.stride(1), NATIVE_DTYPES[q_rows.dtype], k0.data_ptr(), aux[0],
        aux[1], v_parts[0].data_ptr(), vaux[0], vaux[1], code, table.data_ptr(), q_start, T, Hq, k0.shape[2], d,
        k0.shape[1], cols.data_ptr(), cols.shape[1], offs.data_ptr(), offs.shape[1], block, out.data_ptr(),
        out.stride(0), out.stride(1), scale, stats.data_ptr() if stats is not None else None,
        torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"sparse_prefill kernel failed (code {rc})")


def native_sparse_prefill(lib, q_rows: torch.Tensor, k_parts: list[torch.Tensor], v_parts: list[torch.Tensor],
                          code: int, table: torch.Tensor, q_start: int, cols: torch.Tensor, offs: torch.Tensor,
                          block: int, out: torch.Tensor, scale: float, stats: torch.Tensor | None = None) -> None:
    """Vertical-slash sparse attention of one chunk (``sparse_prefill.c``): q_rows (T, Hq, d) at
    positions q_start.. (storage index == position) written into ``out`` (T, Hq, d); query head h
    at i attends key j <= i iff j is in ``cols[h]`` or i - j in ``offs[h]`` (int32 (Hq, nv) /
    (Hq, ns), strictly ascending per head), keys and values read in place from pools in any
    stored format (``code`` 0-3, ``k_parts`` / ``v_parts`` the codec's tensors, data first; not a
    rotating codec). ``block``: queries per work item (they share one candidate key list).
    ``stats`` int64 (2,), if given, += (pairs attended, query-candidate pairs scored).
    ``lib``: the loaded ``sparse_prefill``."""
    if lib is not None:
        _LIBS["sparse_prefill"] = lib
    if torch.compiler.is_compiling():
        torch.ops.slimlm.sparse_prefill(q_rows, list(k_parts), list(v_parts), code, table, q_start, cols, offs, block,
                                        out, scale, stats)
        return
    _sparse_prefill_impl(q_rows, k_parts, v_parts, code, table, q_start, cols, offs, block, out, scale, stats)


_DEF.define("sparse_prefill(Tensor q_rows, Tensor[] k_parts, Tensor[] v_parts, int code, Tensor table, int q_start, "
            "Tensor cols, Tensor offs, int block, Tensor(a!) out, float scale, Tensor(b!)? stats) -> ()")
_DEF.impl("sparse_prefill", _sparse_prefill_impl, "CPU")


@torch.library.register_fake("slimlm::sparse_prefill", lib=_DEF)
def _sparse_prefill_fake(q_rows, k_parts, v_parts, code, table, q_start, cols, offs, block, out, scale, stats):
    _sparse_prefill_shapes(q_rows, k_parts, v_parts, code, table, q_start, cols, offs, block, out, stats)


# ---------------------------------------------------------------------- key-range prefill (DCA)
def _prefill_range_shapes(q_rows, k_parts, v_parts, code, table, q_start, k_lo, k_hi, out, lse) -> None:
    T, Hq, d = q_rows.shape
    k0 = k_parts[0]
    bs, hkv = k0.shape[1], k0.shape[2]
    _check_q_pools("native_prefill_range", q_rows, k_parts, v_parts, code, out, out_f32=True)
    _check_range("native_prefill_range", lse, T, Hq, k_lo, k_hi)
    if q_start < 0:
        raise ValueError(f"native_prefill_range: need q_start >= 0, got {q_start}")
    if table.dtype != torch.int64:
        raise ValueError("native kernels need a contiguous int64 block table")
    if table.numel() * bs < k_hi or Hq % hkv or k0.shape[3] * (2 if code >= 3 else 1) != d:
        raise ValueError("native_prefill_range: the table must cover the key range and head sizes must match the pool")


def _prefill_range_impl(q_rows: torch.Tensor, k_parts: list[torch.Tensor], v_parts: list[torch.Tensor], code: int,
                        table: torch.Tensor, q_start: int, k_lo: int, k_hi: int, causal: bool, out: torch.Tensor,
                        lse: torch.Tensor, scale: float) -> None:
    T, Hq, d = q_rows.shape
    k0 = k_parts[0]
    _prefill_range_shapes(q_rows, k_parts, v_parts, code, table, q_start, k_lo, k_hi, out, lse)
    _check_table(table, k0.shape[0])
    if not lse.is_contiguous():
        raise ValueError("native_prefill_range: lse must be a contiguous float32 (T, Hq) tensor")
    aux, vaux = _aux(k_parts), _aux(v_parts)
    rc = _lib("paged_prefill").slimlm_paged_prefill_range(
        q_rows.data_ptr(), q_rows.stride(0), q_rows.stride(1), k0.data_ptr(), aux[0], aux[1], v_parts[0].data_ptr(),
        vaux[0], vaux[1], code, NATIVE_DTYPES[q_rows.dtype], table.data_ptr(), q_start, k_lo, k_hi, int(bool(causal)),
        out.data_ptr(), out.stride(0), out.stride(1), lse.data_ptr(), T, Hq, k0.shape[2], d, k0.shape[1], scale,
        torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"paged_prefill_range kernel failed (code {rc})")


def native_prefill_range(lib, q_rows: torch.Tensor, k_parts: list[torch.Tensor], v_parts: list[torch.Tensor],
                         code: int, table: torch.Tensor, q_start: int, k_lo: int, k_hi: int, causal: bool,
                         out: torch.Tensor, lse: torch.Tensor, scale: float) -> None:
    """Attention of q_rows (T, Hq, d) at positions q_start.. (storage index == position) over the
    keys [k_lo, k_hi) only (and, when ``causal``, those at or before each row's position), read in
    place from pools in any stored format the native kernels read (``code`` 0-6; ``k_parts`` /
    ``v_parts`` the codec's tensors, data first). Writes ``out`` (T, Hq, d) float32 (any q dtype)
    and ``lse`` (T, Hq) float32, each row's log-sum-exp of its scaled scores (-inf and a zero
    output for a row with no key in the range), so disjoint ranges merge exactly: Dual Chunk
    Attention's three ranges (``model/rope_extension.py``). ``lib``: the loaded ``paged_prefill``."""
    if lib is not None:
        _LIBS["paged_prefill"] = lib
    if torch.compiler.is_compiling():
        torch.ops.slimlm.paged_prefill_range(q_rows, list(k_parts), list(v_parts), code, table, q_start, k_lo, k_hi,
                                             causal, out, lse, scale)
        return
    _prefill_range_impl(q_rows, k_parts, v_parts, code, table, q_start, k_lo, k_hi, causal, out, lse, scale)


_DEF.define("paged_prefill_range(Tensor q_rows, Tensor[] k_parts, Tensor[] v_parts, int code, Tensor table, "
            "int q_start, int k_lo, int k_hi, bool causal, Tensor(a!) out, Tensor(b!) lse, float scale) -> ()")
_DEF.impl("paged_prefill_range", _prefill_range_impl, "CPU")


@torch.library.register_fake("slimlm::paged_prefill_range", lib=_DEF)
def _prefill_range_fake(q_rows, k_parts, v_parts, code, table, q_start, k_lo, k_hi, causal, out, lse, scale):
    _prefill_range_shapes(q_rows, k_parts, v_parts, code, table, q_start, k_lo, k_hi, out, lse)


def native_sparse_prefill_range(lib, q_rows: torch.Tensor, k_parts: list[torch.Tensor], v_parts: list[torch.Tensor],
                                code: int, table: torch.Tensor, q_start: int, cols: torch.Tensor, offs: torch.Tensor,
                                block: int, k_lo: int, k_hi: int, out: torch.Tensor, lse: torch.Tensor, scale: float,
                                stats: torch.Tensor | None = None) -> None:
    """:func:`native_sparse_prefill` restricted to the keys [k_lo, k_hi): ``out`` (T, Hq, d) is
    float32 whatever q's dtype and ``lse`` (T, Hq) float32 receives each row's log-sum-exp over the
    pairs it attends in the range (-inf and a zero output for a row with none), so DCA's three key
    ranges, each attended with its own query rotation, merge exactly. ``lib``: the loaded
    ``sparse_prefill``."""
    if lib is not None:
        _LIBS["sparse_prefill"] = lib
    T, Hq, d = q_rows.shape
    k0 = k_parts[0]
    _sparse_prefill_shapes(q_rows, k_parts, v_parts, code, table, q_start, cols, offs, block, out, stats,
                           "native_sparse_prefill_range", out_f32=True)
    _check_range("native_sparse_prefill_range", lse, T, Hq, k_lo, k_hi)
    _check_table(table, k0.shape[0])
    _check_sorted(cols, offs)
    if not lse.is_contiguous():
        raise ValueError("native_sparse_prefill_range: lse must be a contiguous float32 (T, Hq) tensor")
    if stats is not None and not stats.is_contiguous():
        raise ValueError("native_sparse_prefill: stats must be a contiguous int64 tensor of 2")
    aux, vaux = _aux(k_parts), _aux(v_parts)
    rc = _lib("sparse_prefill").slimlm_sparse_prefill_range(
        q_rows.data_ptr(), q_rows.stride(0), q_rows.stride(1), NATIVE_DTYPES[q_rows.dtype], k0.data_ptr(), aux[0],
        aux[1], v_parts[0].data_ptr(), vaux[0], vaux[1], code, table.data_ptr(), q_start, T, Hq, k0.shape[2], d,
        k0.shape[1], cols.data_ptr(), cols.shape[1], offs.data_ptr(), offs.shape[1], block, k_lo, k_hi,
        out.data_ptr(), out.stride(0), out.stride(1), lse.data_ptr(), scale,
        stats.data_ptr() if stats is not None else None, torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"sparse_prefill kernel failed (code {rc})")
