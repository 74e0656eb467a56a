"""Orthogonal rotations of KV rows before quantizing (QuaRot, Ashkboos et al. 2024; SpinQuant).

A few channels of a head's keys carry most of the magnitude (RoPE pairs with low frequency),
and one scale per group of channels then spends its 15 steps on them. Rotating the row by an
orthogonal matrix R spreads every channel over all of them: the stored row is ``x @ R``, whose
values are close to Gaussian and about as large in every group, so the same bits lose far less.

Attention does not change: with both query and key rotated, ``(q R) . (k R) = q . k``; for
rotated values the output is rotated back, ``o = (sum_i p_i v_i R) R^T``. A codec that rotates
(``KVCodec.rotation``) reads rows back rotated back, so every PyTorch reader (the gather path,
the prefill workspace, the KV policies) sees the model's own space; the native decode kernel
reads the stored rows in place, and its caller rotates the query before and the output after
(``KVCodec.to_storage`` / ``from_storage``).

R is the normalized Walsh-Hadamard matrix when the head size is a power of two (entries
+-1/sqrt(d), the QuaRot choice), otherwise a fixed seeded random orthogonal matrix (QR of a
Gaussian matrix, signs fixed): deterministic, so a cache written by one engine is read alike
by another.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

SEED = 0
NATIVE = True
"""``fwht`` on the CPU by the native kernel (``slimlm_kv_fwht``: the same floats; False: PyTorch ops)."""


def hadamard(d: int) -> torch.Tensor:
    """The normalized Sylvester-Hadamard matrix (d, d), d a power of two: H H^T = I."""
    if d < 1 or d & (d - 1):
        raise ValueError(f"a Hadamard matrix needs a power-of-two size, got {d}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / d**0.5).float()


def random_orthogonal(d: int, seed: int = SEED) -> torch.Tensor:
    """A fixed random orthogonal matrix (d, d) (Haar-distributed: QR with the signs of R's diagonal)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    return (q * torch.sign(torch.diagonal(r))[None, :]).float()


def fwht(x: torch.Tensor) -> torch.Tensor:
    """x (..., d) @ hadamard(d) in float32, d a power of two, by the fast Walsh-Hadamard
    transform: butterflies (a + b, a - b) over pairs (i, i + h) for h = 1, 2, 4, ..., then one
    multiplication by float32(1 / sqrt(d)). Fixed operations in a fixed order, so the native
    decode layers (``fwht`` in kernels/decode_layer.c) compute the same floats to the bit; d log d
    additions instead of a d x d matmul. Hadamard is symmetric: the same call rotates back."""
    shape, d = x.shape, x.shape[-1]
    if d < 1 or d & (d - 1):
        raise ValueError(f"a Hadamard transform needs a power-of-two size, got {d}")
    if x.device.type == "cpu" and NATIVE:  # the same operations in C: one call, not 18 ops
        from slimlm import kernels

        lib = kernels.load("paged_decode")
        if lib is not None:
            out = x.float().contiguous().clone() if x.dtype == torch.float32 else x.float().contiguous()
            if lib.slimlm_kv_fwht(out.data_ptr(), out.numel() // d, d) == 0:
                return out
    y, h = x.float(), 1
    while h < d:
        y = y.reshape(-1, d // (2 * h), 2, h)
        y = torch.stack((y[:, :, 0] + y[:, :, 1], y[:, :, 0] - y[:, :, 1]), dim=2)
        h *= 2
    return y.reshape(shape) * torch.tensor(1.0 / math.sqrt(d), dtype=torch.float32, device=y.device)


@lru_cache(maxsize=None)
def _rotation(d: int, device: str) -> torch.Tensor:
    r = hadamard(d) if d & (d - 1) == 0 else random_orthogonal(d)
    return r.to(device)


def rotation(d: int, device) -> torch.Tensor:
    """The (d, d) float32 rotation every rotating codec uses for head size ``d``."""
    return _rotation(d, str(torch.device(device)))
