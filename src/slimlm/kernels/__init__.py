"""Native CPU kernels for the few hot loops where PyTorch has no fused op, or none as fast.

Each kernel is one small C file in this folder, compiled on first use with the machine's C
compiler (``cc -O3 -march=native -fopenmp``) into ``$SLIMLM_HOME/kernels`` and called through
ctypes on tensors' data pointers. Everything works without them: when no compiler is found,
the build fails, or ``SLIMLM_NATIVE=0`` is set, :func:`load` returns None and callers use their
pure-PyTorch path (tests cover both and check they agree).

To add one: put ``name.c`` here with a plain C entry point, declare its argument types in
``SIGNATURES`` below, and call ``load("name")`` where it is needed, keeping a PyTorch fallback.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

_I64, _PTR, _INT, _F32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_float

SIGNATURES: dict[str, dict[str, tuple]] = {
    "paged_decode": {
        # q, k_pool, v_pool, k_aux, k_aux2, v_aux, v_aux2, dtype, table, lens, out, mass,
        # B, Hq, Hkv, d, block_size, max_blocks, scale, nthreads
        "slimlm_paged_decode": (_INT, (_PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _INT, _PTR, _PTR, _PTR, _PTR,
                                       _I64, _I64, _I64, _I64, _I64, _I64, _F32, _INT)),
        # x, slots, T, H, d, code, data, aux, aux2 (int8 / int4 codecs' write)
        "slimlm_kv_quantize": (_INT, (_PTR, _PTR, _I64, _I64, _I64, _INT, _PTR, _PTR, _PTR)),
        # x, mu, rot, slots, T, H, d, code, data, aux, aux2: offset, Hadamard and quantize in one call
        "slimlm_kv_fwht": (_INT, (_PTR, _I64, _I64)),  # x (n, d) float32 rotated in place
        "slimlm_decode_amx": (_INT, ()),  # 1: bf16 pools run on AMX tiles now (SLIMLM_AMX=0: 0)
        "slimlm_kv_encode": (_INT, (_PTR, _PTR, _INT, _PTR, _I64, _I64, _I64, _INT, _PTR, _PTR, _PTR)),
    },
    "paged_prefill": {
        "slimlm_prefill_supported": (_INT, (_I64, _INT)),  # head size, dtype
        "slimlm_prefill_release": (None, (_INT,)),  # nthreads
        "slimlm_prefill_amx": (_INT, ()),  # 1: bf16 calls run on AMX tiles now
        # q, qs_t, qs_h, k_pool, v_pool, dtype, table, q_start, out, os_t, os_h, T, Hq, Hkv, d, block_size,
        # scale, nthreads
        "slimlm_paged_prefill": (_INT, (_PTR, _I64, _I64, _PTR, _PTR, _INT, _PTR, _I64, _PTR, _I64, _I64,
                                        _I64, _I64, _I64, _I64, _I64, _F32, _INT)),
        # q, qs_t, qs_h, k_pool, k_aux, k_aux2, v_pool, v_aux, v_aux2, kv_code, dtype, table, q_start, out,
        # os_t, os_h, T, Hq, Hkv, d, block_size, scale, mass, nthreads
        "slimlm_paged_prefill_ex": (_INT, (_PTR, _I64, _I64, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _INT, _INT, _PTR,
                                           _I64, _PTR, _I64, _I64, _I64, _I64, _I64, _I64, _I64, _F32, _PTR, _INT)),
        # q, qs_t, qs_h, k_pool, k_aux, k_aux2, v_pool, v_aux, v_aux2, kv_code, dtype, table, q_start, k_lo, k_hi,
        # causal, out (float32), os_t, os_h, lse, T, Hq, Hkv, d, block_size, scale, nthreads (DCA's key ranges)
        "slimlm_paged_prefill_range": (_INT, (_PTR, _I64, _I64, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _INT, _INT, _PTR,
                                              _I64, _I64, _I64, _INT, _PTR, _I64, _I64, _PTR, _I64, _I64, _I64, _I64,
                                              _I64, _F32, _INT)),
    },
    "sparse_decode": {
        # q, k_pool, v_pool, k_aux, k_aux2, v_aux, v_aux2, dtype, table, ktable, max_blocks, idx, cnt, N,
        # qmask, kbuf, nbuf, fA, fB, fcos, fsin, fP, rank, tail, out, B, Hq, Hkv, d, block_size, scale, nthreads
        "slimlm_sparse_decode": (_INT, (_PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _INT, _PTR, _PTR, _I64, _PTR, _PTR,
                                        _I64, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _I64, _PTR, _PTR,
                                        _I64, _I64, _I64, _I64, _I64, _F32, _INT)),
        # q, sp, si, sf, idx, cnt, qmask, nbuf, counters, B, Hq, Hkv, d, N, nthreads (sparse_select.h)
        "slimlm_sparse_select": (_INT, (_PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _I64, _I64, _I64, _I64,
                                        _I64, _INT)),
        # q, k_pool, v_pool, k_aux, k_aux2, v_aux, v_aux2, dtype, table, max_blocks, sp, si, sf, fA, fB, fcos,
        # fsin, rank, tail, out, counters, B, Hq, Hkv, d, block_size, scale, nthreads
        "slimlm_sparse_select_decode": (_INT, (_PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _INT, _PTR, _I64, _PTR, _PTR,
                                               _PTR, _PTR, _PTR, _PTR, _PTR, _I64, _PTR, _PTR, _PTR, _I64, _I64, _I64,
                                               _I64, _I64, _F32, _INT)),
    },
    "qlinear": {
        # x, q, scale, y, M, N, K, G, sh (1: scales fp16, 2: minimums fp16), nthreads
        "slimlm_q8_linear": (_INT, (_PTR, _PTR, _PTR, _PTR, _I64, _I64, _I64, _I64, _INT, _INT)),
        # x, q, scale, min, y, M, N, K, G, sh, nthreads
        "slimlm_q4_linear": (_INT, (_PTR, _PTR, _PTR, _PTR, _PTR, _I64, _I64, _I64, _I64, _INT, _INT)),
        # the same two on int8-quantized activations (AVX512-VNNI builds; 3 = not built here)
        "slimlm_q8_linear_vnni": (_INT, (_PTR, _PTR, _PTR, _PTR, _I64, _I64, _I64, _I64, _INT, _INT)),
        "slimlm_q4_linear_vnni": (_INT, (_PTR, _PTR, _PTR, _PTR, _PTR, _I64, _I64, _I64, _I64, _INT, _INT)),
        # de-quantize: q, scale, [min,] sh, out, out bf16 (0 float32, 1 bfloat16), N, K, G, nthreads
        "slimlm_q8_dequant": (_INT, (_PTR, _PTR, _INT, _PTR, _INT, _I64, _I64, _I64, _INT)),
        "slimlm_q4_dequant": (_INT, (_PTR, _PTR, _PTR, _INT, _PTR, _INT, _I64, _I64, _I64, _INT)),
        "slimlm_qlinear_has_vnni": (_INT, ()),
        "slimlm_qlinear_fast": (_INT, (_INT,)),  # 1 / 0: the restructured int4 G=32 loop on / off (-1: ask)
    },
    "sparse_prefill": {
        "slimlm_sparse_prefill_supported": (_INT, (_I64,)),  # head size
        # q, qs_t, qs_h, qdtype, k_pool, k_aux, k_aux2, v_pool, v_aux, v_aux2, kv_code, table, q_start, T, Hq,
        # Hkv, d, block_size, cols, nv, offs, ns, qb, out, os_t, os_h, scale, stats, nthreads
        "slimlm_sparse_prefill": (_INT, (_PTR, _I64, _I64, _INT, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _INT, _PTR,
                                         _I64, _I64, _I64, _I64, _I64, _I64, _PTR, _I64, _PTR, _I64, _I64, _PTR,
                                         _I64, _I64, _F32, _PTR, _INT)),
        # the same restricted to keys [k_lo, k_hi) with a float32 out and each row's lse (DCA's key ranges):
        # q, qs_t, qs_h, qdtype, k_pool, k_aux, k_aux2, v_pool, v_aux, v_aux2, kv_code, table, q_start, T, Hq,
        # Hkv, d, block_size, cols, nv, offs, ns, qb, k_lo, k_hi, out, os_t, os_h, lse, scale, stats, nthreads
        "slimlm_sparse_prefill_range": (_INT, (_PTR, _I64, _I64, _INT, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _INT, _PTR,
                                               _I64, _I64, _I64, _I64, _I64, _I64, _PTR, _I64, _PTR, _I64, _I64, _I64,
                                               _I64, _PTR, _I64, _I64, _PTR, _F32, _PTR, _INT)),
    },
    "decode_layer": {
        # h, M, first, last, dims, ptrs, desc, cos, sin, slots, table, lens, eps, scale, nthreads
        "slimlm_decode_layers": (_INT, (_PTR, _I64, _I64, _I64, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR,
                                        _F32, _F32, _INT)),
        "slimlm_decode_layer_sizes": (_INT, (_PTR, _PTR, _PTR)),
        # the halves around attention: h, M, layer, dims, ptrs, desc, cos, sin, slots, q, eps, nthreads /
        # h, M, layer, dims, ptrs, desc, att, eps, nthreads
        "slimlm_decode_layer_in": (_INT, (_PTR, _I64, _I64, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _F32, _INT)),
        "slimlm_decode_layer_out": (_INT, (_PTR, _I64, _I64, _PTR, _PTR, _PTR, _PTR, _F32, _INT)),
        # k, v, slots, M, Hkv, d, dtype, krot, one layer's pointer row (the layers' KV write alone)
        "slimlm_decode_layer_store": (_INT, (_PTR, _PTR, _PTR, _I64, _I64, _I64, _INT, _INT, _PTR)),
        "slimlm_qlinear_has_vnni": (_INT, ()),
        "slimlm_qlinear_fast": (_INT, (_INT,)),
        # x, w, kind (0 fp32, 1 bf16 widened, 2 bf16 vdpbf16ps), y, M, N, K, nthreads (dense_linear.c)
        "slimlm_dense_linear": (_INT, (_PTR, _PTR, _INT, _PTR, _I64, _I64, _I64, _INT)),
        "slimlm_dense_has_dpbf16": (_INT, ()),
        "slimlm_dense_prefetch": (_INT, (_INT,)),  # bytes ahead the one-row loop prefetches W (0 off; -1 ask)
        "slimlm_dense_has_amx": (_INT, ()),  # 1: bf16 kind 2 runs on AMX tiles here (SLIMLM_AMX=0: 0)
    },
    "gemm": {
        # a, lda, w, bias, c, ldc, dtype (0 fp32, 1 bf16), M, N, K, scratch, scratch_bytes, nthreads
        "slimlm_gemm": (_INT, (_PTR, _I64, _PTR, _PTR, _PTR, _I64, _INT, _I64, _I64, _I64, _PTR, _I64, _INT)),
        "slimlm_gemm_scratch_bytes": (_I64, (_INT, _I64, _I64)),  # dtype, M, K
        "slimlm_gemm_supported": (_INT, (_INT,)),  # dtype
    },
    "elementwise": {
        # x, xs, r, rs, h, hs, y, ys, w, rows, D, eps, dtype (0 fp32, 1 bf16), nthreads (strides in elements)
        "slimlm_rms_norm": (_INT, (_PTR, _I64, _PTR, _I64, _PTR, _I64, _PTR, _I64, _PTR, _I64, _I64, _F32, _INT, _INT)),
        # g, gs, u, us, y, ys, rows, n, dtype, nthreads
        "slimlm_silu_mul": (_INT, (_PTR, _I64, _PTR, _I64, _PTR, _I64, _I64, _I64, _INT, _INT)),
        # x, xs, y, ys, cos, sin, cs, rows, heads, d, dtype, nthreads
        "slimlm_rope": (_INT, (_PTR, _I64, _PTR, _I64, _PTR, _PTR, _I64, _I64, _I64, _I64, _INT, _INT)),
        # k, ks, v, vs, slots, kpool, vpool, nslots, rows, kb, vb, nthreads (strides and row sizes in bytes)
        "slimlm_kv_write": (_INT, (_PTR, _I64, _PTR, _I64, _PTR, _PTR, _PTR, _I64, _I64, _I64, _I64, _INT)),
    },
}

INCLUDES: dict[str, list[str]] = {"decode_layer": ["qlinear.c", "paged_decode.c", "kv_pool.h", "dense_linear.c",
                                                   "simd_math.h", "amx.h"],
                                  "paged_decode": ["kv_pool.h", "simd_math.h", "amx.h"], "paged_prefill": ["kv_pool.h", "simd_math.h", "amx.h"],
                                  "sparse_decode": ["kv_pool.h", "sparse_select.h"], "sparse_prefill": ["kv_pool.h", "simd_math.h"],
                                  "gemm": ["kv_pool.h"], "elementwise": ["kv_pool.h", "simd_math.h"]}
"""Kernel files another one ``#include``s (part of its build key, so editing them rebuilds it)."""

_loaded: dict[str, ctypes.CDLL | None] = {}
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
MARCH_ENV = "SLIMLM_KERNEL_MARCH"
"""Set to a ``-march`` value (e.g. ``x86-64-v3``: AVX2, no AVX-512) to build the kernels for
another CPU level than this one's; the portable code paths are then what runs (tests and
benchmarks of a CPU without AVX-512 on this machine)."""


def _flags() -> list[str]:
    march = os.environ.get(MARCH_ENV)
    return [f"-march={march}" if f == "-march=native" and march else f for f in FLAGS]


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def _build(name: str) -> Path:
    from slimlm.model.hub import slimlm_home

    src = Path(__file__).with_name(f"{name}.c")
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler (cc/gcc) on PATH")
    flags = _flags()
    text = src.read_bytes() + b"".join(src.with_name(f).read_bytes() for f in INCLUDES.get(name, []))
    key = hashlib.sha256(text + " ".join([cc, *flags, os.uname().machine, _cpu_flags()]).encode())
    key = key.hexdigest()[:16]  # -march=native: a build is only valid on a CPU with the same features
    out = slimlm_home() / "kernels" / f"{name}-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp_so = Path(tmp) / out.name
        res = subprocess.run([cc, *flags, str(src), "-o", str(tmp_so), "-lm"], capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"{cc} failed: {res.stderr.strip().splitlines()[-1] if res.stderr.strip() else res.returncode}")
        os.replace(tmp_so, out)  # atomic: concurrent builders never see a partial file
    return out


def load(name: str) -> ctypes.CDLL | None:
    """The compiled kernel library ``name`` with its signatures set, or None (use the fallback)."""
    if name in _loaded:
        return _loaded[name]
    lib = None
    if os.environ.get("SLIMLM_NATIVE", "1") != "0" and sys.platform.startswith("linux"):
        try:
            import torch  # noqa: F401  (torch's libgomp must be loaded first so both share one OpenMP pool)

            lib = ctypes.CDLL(str(_build(name)))
            for fn, (res, args) in SIGNATURES[name].items():
                f = getattr(lib, fn)
                f.restype, f.argtypes = res, args
        except (OSError, RuntimeError, AttributeError) as e:
            log.warning("slimlm: native kernel %r unavailable (%s); using the PyTorch path", name, e)
            lib = None
    _loaded[name] = lib
    return lib
