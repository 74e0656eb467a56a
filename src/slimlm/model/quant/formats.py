"""Packed weight formats: a linear layer's (N, K) weight held in low-bit groups, never as fp32.

Two layouts cover every format slimlm serves (GGUF's included), each in groups of ``G`` input
channels per output row:

- :class:`Int8Weight`: ``q`` int8 (N, K), ``scale`` (N, K/G); ``w = scale * q`` (symmetric).
  int8 per channel is G = K; GGUF Q8_0 is G = 32; GGUF Q6_K is G = 16 (``q - 32`` fits int8).
- :class:`Int4Weight`: ``q`` uint8 (N, K/2), ``scale`` and ``min`` (N, K/G);
  ``w = scale * q + min`` with q in 0..15 (asymmetric). Byte j of a group holds element j in its
  low nibble and element j + G/2 in its high one (llama.cpp's Q4_0 / Q4_1 block layout).
  GGUF Q4_0 is min = -8 * scale, Q4_1 is its own min, Q4_K is min = -dmin * m per 32-group.

Scales and minimums are float16 or float32 (``SCALE_DTYPES``), each tensor its own: float16 where
the values are exact in it (GGUF Q8_0 / Q4_0 / Q4_1 store them so) or were rounded to it when
quantized (int4 on load: ``quantize_int4``), half the bytes (SmolLM2-135M gguf: 12 MiB);
float32 where fp16 would round (Q4_K's and Q6_K's ``d * sc`` products, per-channel int8) or
overflow. Every path widens them to float32 exactly before use.

``matmul(x)`` runs the native kernel (``kernels/qlinear.c``) for few rows on the CPU (decode): by
default x rounded to int8 per block of 32 and AVX512-VNNI integer dot products where the build has
them (``SLIMLM_QLINEAR=fp32``: fp32 activations, the reference), and
otherwise de-quantizes the weight to ``x.dtype`` for one ``F.linear`` (prefill, other devices, no
compiler). The PyTorch de-quantization (``dequantize(native=False)``) is always available and is
the reference; on the CPU with the kernels built, ``slimlm_q4_dequant`` / ``slimlm_q8_dequant``
compute the same values bit for bit with no temporaries, and prefill writes them into one buffer
per thread kept for the process (``_scratch``): the freed per-layer temporaries of the PyTorch
path left ~14 MiB of heap resident after a 64-token prefill.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F

NATIVE_MAX_ROWS = 16
"""Rows of x up to which the native kernel beats de-quantize + dense matmul (decode batches)."""

SCALE_DTYPES = (torch.float16, torch.float32)
"""dtypes of scales and minimums the kernels read (anything else is widened to float32 on load)."""

FP16_MAX = 65504.0


def scale_flags(t: dict[str, torch.Tensor]) -> int | None:
    """The kernels' ``sh`` flags for a packed weight's tensors (1: scales fp16, 2: minimums fp16),
    or None when one is neither float16 nor float32."""
    s, m = t["scales"].dtype, t["mins"].dtype if "mins" in t else torch.float32
    if s not in SCALE_DTYPES or m not in SCALE_DTYPES:
        return None
    return int(s == torch.float16) | (2 if m == torch.float16 else 0)


def _lib():
    if os.environ.get("SLIMLM_NATIVE", "1") == "0":
        return None
    from slimlm import kernels

    return kernels.load("qlinear")


LANES = 16
"""The kernel's lanes: int8 groups must be a multiple of 16 channels, int4 groups of 32."""

KERNEL_ENV = "SLIMLM_QLINEAR"
"""``vnni`` (the default where the kernels were built with AVX512-VNNI): activations quantized to
int8 per block of 32 channels and integer dot products, as llama.cpp does; ``fp32``: the
fp32-activation kernel (the de-quantized matmul up to summation order; the reference). Read at
each call, so one process can A/B the two."""


def _want() -> str:
    want = os.environ.get(KERNEL_ENV, "vnni")
    if want not in ("vnni", "fp32"):
        raise ValueError(f"{KERNEL_ENV}={want!r}: valid values are vnni, fp32")
    return want


def kernel_mode() -> str:
    """The decode kernel a call takes now: ``"vnni"`` or ``"fp32"``."""
    want, lib = _want(), _lib()
    return "vnni" if want == "vnni" and lib is not None and lib.slimlm_qlinear_has_vnni() else "fp32"


def _vnni_group_ok(kind: str, group: int) -> bool:
    return group % 32 == 0 if kind == "int8" else (group == 32 or group % 64 == 0)


_fns: dict[tuple, tuple] = {}


def _native_fn(kind: str, group: int):
    """The kernel entry point for this layout and the current switches, or None (PyTorch path).
    Cached per (layout, switches) and per loaded library: a decode step makes ~120 calls, and
    the Python around a kernel call of tens of microseconds is what costs at batch 1."""
    from slimlm import kernels

    key = (kind, group, os.environ.get(KERNEL_ENV, "vnni"), os.environ.get("SLIMLM_NATIVE", "1"))
    hit = _fns.get(key)
    if hit is not None and hit[0] is kernels._loaded.get("qlinear"):
        return hit[1]
    want = _want()
    lib = _lib()
    fn = None
    if lib is not None and group % (LANES if kind == "int8" else 2 * LANES) == 0:
        vnni = want == "vnni" and lib.slimlm_qlinear_has_vnni() and _vnni_group_ok(kind, group)
        fn = getattr(lib, f"slimlm_{'q8' if kind == 'int8' else 'q4'}_linear{'_vnni' if vnni else ''}")
    _fns[key] = (kernels._loaded.get("qlinear"), fn)
    return fn


def native_linear(kind: str, group: int, x: torch.Tensor, t: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """``x @ W^T`` by the native kernel for a packed weight given as its tensors ``t`` (``qweight``,
    ``scales``, ``mins``), or None where the kernel does not apply (too many rows, not the CPU,
    no compiler, a group it does not take): the caller then takes the PyTorch path."""
    K = x.shape[-1]
    n = x.numel()
    if not x.is_cpu or n == 0 or n > NATIVE_MAX_ROWS * K:
        return None
    fn = _native_fn(kind, group)
    if fn is None:
        return None
    sh = scale_flags(t)
    if sh is None:
        return None
    f32 = x.dtype == torch.float32
    xf = x if f32 and x.is_contiguous() else x.float().contiguous()
    q = t["qweight"]
    N, M = q.shape[0], n // K
    y = torch.empty(x.shape[:-1] + (N,))
    if kind == "int8":
        rc = fn(xf.data_ptr(), q.data_ptr(), t["scales"].data_ptr(), y.data_ptr(), M, N, K, group, sh,
                torch.get_num_threads())
    else:
        rc = fn(xf.data_ptr(), q.data_ptr(), t["scales"].data_ptr(), t["mins"].data_ptr(), y.data_ptr(), M, N, K,
                group, sh, torch.get_num_threads())
    if rc:
        raise ValueError(f"qlinear kernel refused shapes (rows {M}, {N}x{K}, group {group})")
    return y if f32 else y.to(x.dtype)


def native_dequantize(p: PackedWeight, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor | None:
    """``p``'s (N, K) values in ``dtype`` (float32 / bfloat16) by the native kernel, into ``out``
    (contiguous, (N, K), ``dtype``) or a new tensor; None where it does not apply (not the CPU,
    another dtype, no compiler): the caller takes the PyTorch path. Bit-identical to it."""
    t = p.tensors()
    if dtype not in (torch.float32, torch.bfloat16) or not p.q.is_cpu or not all(x.is_contiguous() for x in t.values()):
        return None
    sh = scale_flags(t)
    lib = _lib()
    if sh is None or lib is None:
        return None
    N, K = p.shape
    if out is None:
        out = torch.empty(N, K, dtype=dtype)
    ob, nt = int(dtype == torch.bfloat16), torch.get_num_threads()
    if p.kind == "int8":
        rc = lib.slimlm_q8_dequant(p.q.data_ptr(), p.scale.data_ptr(), sh, out.data_ptr(), ob, N, K, p.group_size, nt)
    else:
        rc = lib.slimlm_q4_dequant(p.q.data_ptr(), p.scale.data_ptr(), p.min.data_ptr(), sh, out.data_ptr(), ob, N, K,
                                   p.group_size, nt)
    if rc:
        raise ValueError(f"qlinear de-quantize kernel refused {p.kind} {N}x{K}, group {p.group_size} (code {rc})")
    return out


SCRATCH_MAX_BYTES = 32 << 20
"""Largest de-quantized weight prefill writes into the kept per-thread buffer; larger ones (a
vocabulary head when every row's logits are asked for) get their own tensor, which glibc maps
and unmaps (its mmap threshold is 32 MiB after loading: ``weights.mmap_large_blocks``)."""

_tls = threading.local()


def _scratch(shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """A (N, K) tensor of ``dtype`` on this thread's kept de-quantization buffer (grown to the
    largest layer seen, SmolLM2-135M: the fused gate/up, 6.75 MiB in float32). Valid until the next
    call on this thread: only for a weight consumed at once (one ``F.linear``)."""
    n = shape[0] * shape[1] * (torch.finfo(dtype).bits // 8)
    buf = getattr(_tls, "buf", None)
    if buf is None or buf.numel() < n:
        _tls.buf = None  # the smaller buffer goes before the larger one is made
        buf = _tls.buf = torch.empty(n, dtype=torch.uint8)
    return buf[:n].view(dtype).view(shape)


def dequantized_matmul(p: PackedWeight, x: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, W)`` with W de-quantized for this call (more rows than the decode kernels
    take): into the kept buffer where the native kernel applies and no gradient can keep W."""
    N, K = p.shape
    if x.is_cpu and x.dtype in (torch.float32, torch.bfloat16) and not (torch.is_grad_enabled() and x.requires_grad) \
            and N * K * x.element_size() <= SCRATCH_MAX_BYTES:
        w = native_dequantize(p, x.dtype, _scratch((N, K), x.dtype))
        if w is not None:
            return F.linear(x, w)
    return F.linear(x, p.dequantize(x.dtype))


_trim = None


def release_prefill_heap() -> None:
    """After a prefill step of a packed model (the runner calls it): give glibc's freed heap back
    to the OS (``malloc_trim(0)``). What a prefill frees below glibc's mmap threshold (activations,
    attention buffers) otherwise stays resident: SmolLM2-135M int4, a 16-token warm-up then a
    64-token prompt: about 5 MiB off the peak, 9 off the steady RSS (``rss_phases.py``). A no-op
    off glibc."""
    global _trim
    if _trim is None:
        import ctypes
        import platform

        _trim = False
        if platform.libc_ver()[0] == "glibc":
            try:
                _trim = ctypes.CDLL(None).malloc_trim
                _trim.argtypes, _trim.restype = [ctypes.c_size_t], ctypes.c_int
            except (OSError, AttributeError):
                _trim = False
    if _trim:
        _trim(0)


@dataclass
class Int8Weight:
    q: torch.Tensor
    """(N, K) int8."""
    scale: torch.Tensor
    """(N, K/G) float32 or float16."""
    group_size: int

    kind = "int8"

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)  # type: ignore[return-value]

    def nbytes(self) -> int:
        return self.q.numel() * self.q.element_size() + self.scale.numel() * self.scale.element_size()

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"qweight": self.q, "scales": self.scale}

    def dequantize(self, dtype: torch.dtype = torch.float32, native: bool = True) -> torch.Tensor:
        """(N, K) values in ``dtype``: the native kernel where it applies, else PyTorch
        (``native=False``: always PyTorch, the reference; both give the same bits)."""
        w = native_dequantize(self, dtype) if native else None
        if w is not None:
            return w
        N, K = self.q.shape
        G = self.group_size
        w = self.q.view(N, K // G, G).float().mul_(self.scale.float()[..., None])  # (N, K/G, G), one fp32 buffer
        return w.view(N, K).to(dtype)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """De-quantized rows ``ids`` (an embedding lookup): (*ids.shape, K)."""
        G, K = self.group_size, self.q.shape[1]
        q = self.q[ids.reshape(-1)].view(-1, K // G, G).float()  # (R, K/G, G)
        w = q * self.scale[ids.reshape(-1)].float()[..., None]
        return w.view(*ids.shape, K).to(dtype)

    def matmul(self, x: torch.Tensor, native: bool = True) -> torch.Tensor:
        y = native_linear("int8", self.group_size, x, self.tensors()) if native else None
        return dequantized_matmul(self, x) if y is None else y

    def to(self, device: torch.device | str) -> Int8Weight:
        return Int8Weight(self.q.to(device), self.scale.to(device), self.group_size)


@dataclass
class Int4Weight:
    q: torch.Tensor
    """(N, K/2) uint8, two 4-bit values a byte (see the module docstring for the order)."""
    scale: torch.Tensor
    """(N, K/G) float16 or float32."""
    min: torch.Tensor
    """(N, K/G) float16 or float32."""
    group_size: int

    kind = "int4"

    @property
    def shape(self) -> tuple[int, int]:
        return (self.q.shape[0], self.q.shape[1] * 2)

    def nbytes(self) -> int:
        return self.q.numel() + self.scale.numel() * self.scale.element_size() + self.min.numel() * self.min.element_size()

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"qweight": self.q, "scales": self.scale, "mins": self.min}

    def codes(self) -> torch.Tensor:
        """(N, K) the 4-bit values as uint8, in natural channel order."""
        N, K = self.shape
        G = self.group_size
        b = self.q.view(N, K // G, G // 2)
        return torch.cat([b & 15, b >> 4], dim=-1).view(N, K)  # (N, K/G, G) -> (N, K)

    def dequantize(self, dtype: torch.dtype = torch.float32, native: bool = True) -> torch.Tensor:
        """(N, K) values in ``dtype``: the native kernel where it applies, else PyTorch
        (``native=False``: always PyTorch, the reference; both give the same bits)."""
        w = native_dequantize(self, dtype) if native else None
        if w is not None:
            return w
        N, K = self.shape
        G = self.group_size
        w = self.codes().view(N, K // G, G).float()  # (N, K/G, G); scaled in place: one fp32 buffer
        w.mul_(self.scale.float()[..., None]).add_(self.min.float()[..., None])
        return w.view(N, K).to(dtype)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        flat = ids.reshape(-1)
        sub = Int4Weight(self.q[flat], self.scale[flat], self.min[flat], self.group_size)
        return sub.dequantize(dtype).view(*ids.shape, self.shape[1])

    def matmul(self, x: torch.Tensor, native: bool = True) -> torch.Tensor:
        y = native_linear("int4", self.group_size, x, self.tensors()) if native else None
        return dequantized_matmul(self, x) if y is None else y

    def to(self, device: torch.device | str) -> Int4Weight:
        return Int4Weight(self.q.to(device), self.scale.to(device), self.min.to(device), self.group_size)


PackedWeight = Int8Weight | Int4Weight


def check_group(K: int, group_size: int, kind: str, name: str = "layer") -> None:
    """A group size must divide the layer's input size (and be even for int4)."""
    if group_size < 1 or K % group_size or (kind == "int4" and group_size % 2):
        valid = [g for g in (16, 32, 64, 128, 256) if K % g == 0]
        raise ValueError(f"group size {group_size} does not divide {name}'s {K} input channels"
                         f"{' evenly into even groups' if kind == 'int4' else ''}; "
                         f"valid here: {', '.join(map(str, valid)) or 'none (use int8 per channel)'}")


def quantize_int8(w: torch.Tensor, group_size: int | None = None) -> Int8Weight:
    """Symmetric int8, one scale per row (``group_size`` None) or per group: round(w / s),
    s = max|w| / 127."""
    w = w.detach().float()
    N, K = w.shape
    G = group_size or K
    check_group(K, G, "int8")
    wg = w.view(N, K // G, G)
    scale = wg.abs().amax(-1) / 127.0  # (N, K/G)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = (wg / scale[..., None]).round_().clamp_(-127, 127).to(torch.int8)
    return Int8Weight(q.view(N, K).contiguous(), scale.contiguous(), G)


def quantize_int4(w: torch.Tensor, group_size: int = 32, scale_dtype: torch.dtype = torch.float16) -> Int4Weight:
    """Asymmetric int4 per group: w ~ scale * q + min, q = round((w - min) / scale) in 0..15,
    min = the group's minimum, scale = (max - min) / 15; both stored in ``scale_dtype`` (float16
    by default, as GGUF's Q4_1; float32 for a weight beyond float16's range): rounded first, then
    the codes are computed against the stored values (a code rounded past 0..15 is clamped)."""
    w = w.detach().float()
    N, K = w.shape
    G = group_size
    check_group(K, G, "int4")
    wg = w.view(N, K // G, G)
    lo, hi = wg.amin(-1), wg.amax(-1)  # (N, K/G)
    half = scale_dtype == torch.float16 and max(float(lo.abs().max()), float(hi.abs().max())) <= FP16_MAX
    if half:
        lo = lo.half().float()  # the stored minimum
        scale = ((hi - lo) / 15.0).clamp_min_(2**-24).half().float()  # >= the smallest fp16 step: never 0
    else:
        scale = (hi - lo) / 15.0
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    x = wg - lo[..., None]  # one fp32 temporary, the rest in place: a load's transient stays small
    q = x.div_(scale[..., None]).round_().clamp_(0, 15).to(torch.uint8)  # (N, K/G, G)
    del x
    dt = torch.float16 if half else torch.float32
    return Int4Weight(pack_nibbles(q, G), scale.to(dt).contiguous(), lo.to(dt).contiguous(), G)


def pack_nibbles(q: torch.Tensor, G: int) -> torch.Tensor:
    """(N, K/G, G) 4-bit codes -> (N, K/2) bytes: element j low, element j + G/2 high."""
    N = q.shape[0]
    h = G // 2
    return (q[..., :h] | (q[..., h:] << 4)).reshape(N, -1).contiguous()
