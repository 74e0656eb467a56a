"""Dense float32 / bfloat16 linear layers for many rows by a native GEMM (``kernels/gemm.c``).
Opt-in (``SLIMLM_GEMM=1``): on the 2-core Zen 4 machine it does not beat PyTorch's GEMMs by the
1.15x the issue asked for (docs/benchmarks.md, "session 10, this machine"), so the engine does not
use it by default.

:func:`linear` is ``F.linear`` for a float32 or bfloat16 input on the CPU, computed by the AVX-512
(fp32) / AVX512-BF16 (bf16) kernel; None when it does not apply (the caller then uses PyTorch). The
weights are read in place (no packed copy); the activations are repacked per call into a per-thread
scratch buffer kept between calls (no page faults per call).

:func:`install` is what the engine calls at start-up (after ``model/fuse.py``): with
``SLIMLM_GEMM=1`` every dense ``nn.Linear`` of the decoder layers (the fused q/k/v and gate/up
included) gets an instance ``forward`` that takes the kernel for calls of at least ``min_rows`` rows
and ``F.linear`` otherwise; without it (or with ``native_kernels=False``) such forwards are removed.
The modules stay ``nn.Linear`` (``type(m) is nn.Linear`` checks elsewhere still hold; ``state_dict``
is unchanged). It applies to the layer-by-layer path (prefill chunks, mixed steps, decode steps the
native decode layers do not take); all-decode steps of up to 64 rows run ``kernels/decode_layer.c``.

Numerics: each output element is one fp32 accumulator in k order whatever the batch and the tile it
falls in, so a row's output is bitwise the same alone or among others; with ``min_rows=1`` (the
engine's choice under ``EngineConfig.batch_invariant``) every call of the layer path takes the
kernel, so prefill rows round the same at any batch size. Against ``F.linear`` it differs by
summation order only (fp32), or by that and the final bf16 rounding (bf16). Autograd is not
supported: calls that need a gradient take ``F.linear``.

``SLIMLM_GEMM=0`` (or ``SLIMLM_NATIVE=0``) turns :func:`linear` off too.
"""
from __future__ import annotations

import os
import threading

import torch
import torch.nn.functional as F
from torch import nn

ENV = "SLIMLM_GEMM"
CODES = {torch.float32: 0, torch.bfloat16: 1}
MIN_ROWS = 16
"""Rows below which :func:`install`'s forwards use ``F.linear`` when batch invariance is not asked
for (the kernel's 16-row lane groups are mostly padding there)."""

_scratch = threading.local()


def _lib():
    if os.environ.get(ENV, "1") == "0":
        return None
    from slimlm import kernels

    return kernels.load("gemm")


def supported(dtype: torch.dtype) -> bool:
    """The kernel is built for this dtype on this machine (and not turned off)."""
    lib = _lib()
    return lib is not None and dtype in CODES and bool(lib.slimlm_gemm_supported(CODES[dtype]))


def _scratch_for(nbytes: int) -> torch.Tensor:
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < nbytes:
        buf = torch.empty(max(nbytes, 1 << 20), dtype=torch.uint8)
        _scratch.buf = buf
    return buf


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           threads: int | None = None) -> torch.Tensor | None:
    """``F.linear(x, weight, bias)`` by the native GEMM, or None where it does not apply (dtype,
    device, layout, autograd, kernel not built)."""
    code = CODES.get(weight.dtype)
    if (code is None or x.dtype != weight.dtype or x.device.type != "cpu" or weight.device.type != "cpu"
            or weight.dim() != 2 or x.dim() < 1 or x.shape[-1] != weight.shape[1]
            or (bias is not None and (bias.dtype != weight.dtype or bias.shape != (weight.shape[0],)))):
        return None
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return None
    lib = _lib()
    if lib is None or not lib.slimlm_gemm_supported(code):
        return None
    N, K = weight.shape
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    if M == 0 or N == 0 or K == 0:
        return None
    if x2.stride(1) != 1 or x2.stride(0) < K:
        x2 = x2.contiguous()
    w = weight if weight.is_contiguous() else weight.contiguous()
    b = None if bias is None else bias.contiguous()
    need = int(lib.slimlm_gemm_scratch_bytes(code, M, K))
    buf = _scratch_for(need)
    y = torch.empty(M, N, dtype=weight.dtype)
    rc = lib.slimlm_gemm(x2.data_ptr(), x2.stride(0), w.data_ptr(), None if b is None else b.data_ptr(),
                         y.data_ptr(), N, code, M, N, K, buf.data_ptr(), buf.numel(),
                         threads or torch.get_num_threads())
    if rc:
        raise RuntimeError(f"gemm kernel failed (code {rc})")
    return y.view(*x.shape[:-1], N)


class GemmForward:
    """The instance ``forward`` :func:`install` gives an ``nn.Linear``."""

    def __init__(self, mod: nn.Linear, min_rows: int):
        self.mod, self.min_rows = mod, min_rows

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m = self.mod
        if x.numel() >= self.min_rows * m.in_features:
            y = linear(x, m.weight, m.bias)
            if y is not None:
                return y
        return F.linear(x, m.weight, m.bias)


def _linears(model) -> list[nn.Linear]:
    out = []
    for layer in getattr(getattr(model, "model", None), "layers", []):
        for parent in (getattr(layer, "self_attn", None), getattr(layer, "mlp", None)):
            if parent is None:
                continue
            mods = list(parent.children()) + [getattr(parent, n, None) for n in ("qkv", "gate_up")]
            out += [m for m in mods if type(m) is nn.Linear]
    return out


def install(model, enabled: bool = True, min_rows: int = MIN_ROWS) -> int:
    """Give the decoder layers' dense linear layers the kernel's forward when ``enabled`` and
    ``SLIMLM_GEMM=1`` (and the kernel is built for the model's dtype); otherwise take such forwards
    away. Returns the number of layers that take it."""
    mods = _linears(model)
    on = enabled and os.environ.get(ENV) == "1" and model.device.type == "cpu" and supported(model.dtype)
    n = 0
    for m in mods:
        if on and m.weight.dtype == model.dtype:
            m.forward = GemmForward(m, max(1, int(min_rows)))
            n += 1
        elif isinstance(m.__dict__.get("forward"), GemmForward):
            del m.forward
    return n
