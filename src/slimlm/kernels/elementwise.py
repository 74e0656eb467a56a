"""A decoder layer's elementwise work in one native pass each (``kernels/elementwise.c``): RMSNorm
(optionally after the residual add), SiLU(gate) * up and RoPE, for float32 and bfloat16 tensors on
the CPU. ``model/transformer.py`` calls these first and uses its PyTorch code when they return None.
:func:`kv_write` is a plain KV pool's write (``kvcache/storage.py``), a row copy per slot.

They return None (the caller's PyTorch path runs) when the kernel does not apply: another device or
dtype, a layout the kernel does not take (the last dimension must be contiguous and the leading ones
flatten to rows of one stride), ``SLIMLM_NATIVE=0``, no compiler, or a call that needs a gradient
(training keeps PyTorch: autograd never sees these). Numerics (elementwise.c's header): RMSNorm and
RoPE are bitwise PyTorch's; SiLU * up differs by its exp only (a few fp32 ulp; rarely one bf16 ulp).
"""
from __future__ import annotations

import os

import torch

CODES = {torch.float32: 0, torch.bfloat16: 1}
ROW_MAX, HEAD_MAX = 16384, 512
"""The longest RMSNorm row and RoPE head the kernel takes (elementwise.c's EW_ROW_MAX, EW_CHUNK)."""


def _lib(*tensors: torch.Tensor):
    """The kernel library when every tensor is a CPU tensor of one supported dtype that needs no
    gradient; else None."""
    dtype = tensors[0].dtype
    if dtype not in CODES or any(t.dtype != dtype or t.device.type != "cpu" for t in tensors):
        return None
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return None
    from slimlm import kernels

    return kernels.load("elementwise")


def _rows(t: torch.Tensor) -> torch.Tensor | None:
    """``t`` as a (rows, last) view with a contiguous last dimension, or None."""
    if t.dim() == 0 or t.stride(-1) != 1:
        return None
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError:
        return None


def _check(rc: int, name: str) -> None:
    if rc:
        raise RuntimeError(f"elementwise kernel {name} failed (code {rc})")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """``w * norm(x)``; with ``residual``, ``(h, w * norm(h))`` for ``h = x + residual``. None when
    the kernel does not apply."""
    extra = () if residual is None else (residual,)
    lib = _lib(x, weight, *extra)
    if (lib is None or weight.dim() != 1 or weight.shape[0] != x.shape[-1] or not weight.is_contiguous()
            or not 0 < x.shape[-1] <= ROW_MAX):
        return None
    if residual is not None and residual.shape != x.shape:
        return None
    x2, r2 = _rows(x), None if residual is None else _rows(residual)
    if x2 is None or (residual is not None and r2 is None):
        return None
    y = torch.empty(x.shape, dtype=x.dtype)
    h = None if residual is None else torch.empty(x.shape, dtype=x.dtype)
    D = x.shape[-1]
    rc = lib.slimlm_rms_norm(x2.data_ptr(), x2.stride(0), None if r2 is None else r2.data_ptr(),
                             0 if r2 is None else r2.stride(0), None if h is None else h.data_ptr(), D,
                             y.data_ptr(), D, weight.data_ptr(), x2.shape[0], D, eps, CODES[x.dtype],
                             torch.get_num_threads())
    _check(rc, "rms_norm")
    return y if h is None else (h, y)


def silu_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor | None:
    """``F.silu(g) * u`` (same shapes), or None."""
    lib = _lib(g, u)
    if lib is None or g.shape != u.shape or g.shape[-1] == 0:
        return None
    g2, u2 = _rows(g), _rows(u)
    if g2 is None or u2 is None:
        return None
    n = g.shape[-1]
    y = torch.empty(g.shape, dtype=g.dtype)
    rc = lib.slimlm_silu_mul(g2.data_ptr(), g2.stride(0), u2.data_ptr(), u2.stride(0), y.data_ptr(), n,
                             g2.shape[0], n, CODES[g.dtype], torch.get_num_threads())
    _check(rc, "silu_mul")
    return y


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, d: int) -> torch.Tensor | None:
    """x (B, T, H * d): its H heads rotated, as a new (B, T, H, d) tensor; cos, sin (B, T, d). The
    result's ``transpose(1, 2)`` is ``apply_rope`` of ``x.view(B, T, H, d).transpose(1, 2)``. None
    when the kernel does not apply."""
    lib = _lib(x, cos, sin)
    if (lib is None or x.dim() != 3 or d % 2 or not 0 < d <= HEAD_MAX or x.shape[-1] % d or x.shape[-1] == 0
            or cos.shape != (*x.shape[:2], d) or sin.shape != cos.shape):
        return None
    x2, c2, s2 = _rows(x), _rows(cos), _rows(sin)
    if x2 is None or c2 is None or s2 is None or c2.stride(0) != s2.stride(0):
        return None
    B, T, W = x.shape
    y = torch.empty(B, T, W // d, d, dtype=x.dtype)
    rc = lib.slimlm_rope(x2.data_ptr(), x2.stride(0), y.data_ptr(), W, c2.data_ptr(), s2.data_ptr(), c2.stride(0),
                         B * T, W // d, d, CODES[x.dtype], torch.get_num_threads())
    _check(rc, "rope")
    return y


def kv_write(k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor) -> bool:
    """A plain pool's KV write: rows k, v (T, Hkv, d) into ``k_pool`` / ``v_pool`` (n_blocks, block_size,
    Hkv, d), of their dtype, at flat ``slots`` (T,) int64, as ``pool.view(-1, Hkv * d).index_copy_(0, slots,
    rows)`` does for each. False (nothing written; the caller uses ``index_copy_``) when the kernel does
    not apply: dtypes or shapes differ, a row's (Hkv, d) is not contiguous, a pool is not contiguous, or a
    slot is out of range (``index_copy_`` then raises its error). ``SLIMLM_KV_WRITE=0`` turns it off."""
    if os.environ.get("SLIMLM_KV_WRITE") == "0":
        return False
    lib = _lib(k, v, k_pool, v_pool)
    if (lib is None or k.dim() != 3 or k.shape != v.shape or k_pool.dim() != 4 or k_pool.shape != v_pool.shape
            or k_pool.shape[2:] != k.shape[1:] or not (k_pool.is_contiguous() and v_pool.is_contiguous())
            or slots.dtype != torch.long or slots.device.type != "cpu" or slots.shape != (k.shape[0],)
            or not slots.is_contiguous()):
        return False
    H, d = k.shape[1:]
    if any(t.stride(2) != 1 or t.stride(1) != d for t in (k, v)):
        return False
    es = k.element_size()
    rc = lib.slimlm_kv_write(k.data_ptr(), k.stride(0) * es, v.data_ptr(), v.stride(0) * es, slots.data_ptr(),
                             k_pool.data_ptr(), v_pool.data_ptr(), k_pool.shape[0] * k_pool.shape[1], k.shape[0],
                             H * d * es, H * d * es, torch.get_num_threads())
    return rc == 0
