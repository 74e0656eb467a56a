"""The native vertical-slash prefill kernel attends exactly its pattern: it equals explicit masked
attention over the same keys (float32 to 1e-5; bfloat16 up to its output rounding) for GQA heads,
chunks with context, scattered blocks and int8 pools; the full pattern is causal dense attention;
bad pattern lists are ValueErrors before the kernel runs."""

from __future__ import annotations

import shutil

import pytest
import torch

from slimlm import kernels
from slimlm.kernels.ops import native_sparse_prefill

HAS_CC = shutil.which("cc") is not None or shutil.which("gcc") is not None


@pytest.fixture(scope="module")
def lib():
    if not HAS_CC:
        pytest.skip("no C compiler: the engine uses the PyTorch path")
    lib = kernels.load("sparse_prefill")
    assert lib is not None  # a compiler is present, so the kernel must build
    if not lib.slimlm_sparse_prefill_supported(16):
        pytest.skip("this CPU lacks AVX-512: the engine uses the PyTorch sparse prefill path")
    return lib


def make_case(T, q_start, hq, hkv, d, bs, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    n = q_start + T
    nb = -(-n // bs)
    k_pool = torch.randn(nb + 5, bs, hkv, d, generator=g).to(dtype)
    v_pool = torch.randn(nb + 5, bs, hkv, d, generator=g).to(dtype)
    table = torch.randperm(nb + 5, generator=g)[:nb].contiguous()
    q = (2 * torch.randn(hq, T, d, generator=g)).to(dtype)
    return q.transpose(0, 1), k_pool, v_pool, table, g  # q rows: a (T, Hq, d) strided view


def pattern(hq, n, nv, ns, local, g):
    cols = torch.stack([torch.randperm(n, generator=g)[:nv].sort().values for _ in range(hq)]).to(torch.int32)
    offs = torch.stack([torch.cat([torch.arange(local), local + torch.randperm(n - local, generator=g)[:ns - local]])
                        .sort().values for _ in range(hq)]).to(torch.int32)
    return cols.contiguous(), offs.contiguous()


def reference(q_rows, keys, vals, q_start, cols, offs, scale):
    """float32 attention with the pattern as an explicit mask. keys, vals (n, Hkv, d) float32."""
    T, hq, d = q_rows.shape
    n, hkv = keys.shape[0], keys.shape[1]
    kx = keys.float().transpose(0, 1).repeat_interleave(hq // hkv, 0)  # (Hq, n, d)
    vx = vals.float().transpose(0, 1).repeat_interleave(hq // hkv, 0)
    i = torch.arange(q_start, q_start + T)[:, None]
    j = torch.arange(n)[None]
    dist = i - j  # (T, n)
    is_v = torch.zeros(hq, n, dtype=torch.bool).scatter_(1, cols.long(), True)
    is_s = torch.zeros(hq, n, dtype=torch.bool).scatter_(1, offs.long(), True)
    allow = (dist >= 0)[None] & (is_v[:, None, :] | is_s[:, dist.clamp(min=0)])  # (Hq, T, n)
    s = (q_rows.float().transpose(0, 1) @ kx.transpose(-1, -2) * scale).masked_fill(~allow, float("-inf"))
    return (s.softmax(-1) @ vx).transpose(0, 1), int(allow.sum())


def tolerance(want, v_pool, dtype):
    """float32: 1e-5 relative. bf16: the output's rounding (2^-9 |out|) plus, where the build takes
    P V in bf16 (AVX512-BF16, as paged_prefill.c), the probabilities' (2^-9 sum p |v| <= 2^-9 max |v|)."""
    if dtype == torch.float32:
        return 1e-5 * (1 + want.abs())
    return 2**-8 * (want.abs() + v_pool.float().abs().max())


def gathered(pool, table, n):
    return pool[table].flatten(0, 1)[:n]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T, q_start, d, block", [(70, 0, 16, 16), (50, 130, 64, 64), (33, 47, 32, 8)])
def test_kernel_equals_masked_attention(lib, dtype, T, q_start, d, block):
    q, kp, vp, table, g = make_case(T, q_start, 6, 2, d, 16, T + d, dtype)
    n = q_start + T
    cols, offs = pattern(6, n, 9, 11, 3, g)
    out = torch.empty(T, 6, d, dtype=dtype)
    stats = torch.zeros(2, dtype=torch.int64)
    native_sparse_prefill(lib, q, [kp], [vp], {torch.float32: 0, torch.bfloat16: 1}[dtype], table, q_start, cols,
                          offs, block, out, 0.3, stats)
    want, pairs = reference(q, gathered(kp, table, n), gathered(vp, table, n), q_start, cols, offs, 0.3)
    err = (out.float() - want).abs()
    assert bool((err <= tolerance(want, vp, dtype)).all()), float(err.max())
    assert int(stats[0]) == pairs  # every allowed pair, once
    assert pairs <= int(stats[1]) <= T * 6 * n  # the candidates scored cover them


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_full_pattern_is_dense(lib, dtype):
    """Every key a vertical: causal dense attention (every row takes the 64-key tile path; in bf16
    the vdpbf16ps dots where the build has them)."""
    T, q_start, d = 40, 60, 64
    q, kp, vp, table, g = make_case(T, q_start, 4, 2, d, 8, 3, dtype)
    n = q_start + T
    full = torch.arange(n, dtype=torch.int32).expand(4, n).contiguous()
    out = torch.empty(T, 4, d, dtype=dtype)
    native_sparse_prefill(lib, q, [kp], [vp], int(dtype == torch.bfloat16), table, q_start, full,
                          full[:, :1].contiguous(), 16, out, 0.2)
    keys, vals = gathered(kp, table, n).float(), gathered(vp, table, n).float()
    kx, vx = keys.transpose(0, 1).repeat_interleave(2, 0), vals.transpose(0, 1).repeat_interleave(2, 0)
    causal = torch.arange(q_start, n)[:, None] >= torch.arange(n)[None]
    dense = (q.float().transpose(0, 1) @ kx.transpose(-1, -2) * 0.2).masked_fill(~causal, float("-inf")).softmax(-1) @ vx
    err = (out.float() - dense.transpose(0, 1)).abs()
    want = dense.transpose(0, 1)
    assert bool((err <= tolerance(want, vp, dtype)).all()), float(err.max())


def test_int8_pools(lib):
    """int8 pools: the kernel decodes c * s per row, as the codec reads it."""
    T, q_start, d = 40, 60, 32
    q, kp, vp, table, g = make_case(T, q_start, 4, 2, d, 8, 3, torch.float32)
    n = q_start + T
    out = torch.empty(T, 4, d)
    keys, vals = gathered(kp, table, n), gathered(vp, table, n)
    from slimlm.kvcache.codec import KV_CODECS

    codec = KV_CODECS.get("int8")(torch.float32, d)
    parts = [codec.allocate(kp.shape[0], 8, 2, "cpu") for _ in range(2)]
    slots = (table[:, None] * 8 + torch.arange(8)).flatten()[:n]
    codec.write(parts[0], slots, keys)
    codec.write(parts[1], slots, vals)
    cols, offs = pattern(4, n, 5, 7, 2, g)
    native_sparse_prefill(lib, q, parts[0], parts[1], codec.native_code, table, q_start, cols, offs, 16, out, 0.2)
    want, _ = reference(q, codec.read(parts[0], table).flatten(0, 1)[:n], codec.read(parts[1], table).flatten(0, 1)[:n],
                        q_start, cols, offs, 0.2)
    assert torch.allclose(out, want, atol=1e-5)


def test_bad_lists_are_value_errors(lib):
    q, kp, vp, table, g = make_case(8, 0, 2, 1, 16, 8, 0, torch.float32)
    cols = torch.tensor([[0, 1], [1, 0]], dtype=torch.int32)  # head 1 not ascending
    offs = torch.tensor([[0], [0]], dtype=torch.int32)
    out = torch.empty(8, 2, 16)
    with pytest.raises(ValueError, match="strictly ascending"):
        native_sparse_prefill(lib, q, [kp], [vp], 0, table, 0, cols, offs, 4, out, 1.0)
    with pytest.raises(ValueError, match="int32"):
        native_sparse_prefill(lib, q, [kp], [vp], 0, table, 0, cols.long(), offs, 4, out, 1.0)
    with pytest.raises(ValueError, match="table covering"):
        native_sparse_prefill(lib, q, [kp], [vp], 0, table[:0], 0, cols.sort().values, offs, 4, out, 1.0)


def test_opcheck(lib):
    q, kp, vp, table, g = make_case(20, 12, 4, 2, 16, 8, 1, torch.float32)
    cols, offs = pattern(4, 32, 3, 4, 2, g)
    torch.library.opcheck(torch.ops.slimlm.sparse_prefill.default,
                          (q.contiguous(), [kp], [vp], 0, table, 12, cols, offs, 8, torch.empty(20, 4, 16), 0.25,
                           torch.zeros(2, dtype=torch.int64)), test_utils=("test_schema", "test_faketensor"))


def test_without_avx512_the_engine_takes_the_pytorch_path(monkeypatch, tiny_llama_dir):
    """A build for a CPU without AVX-512 serves no head size: sparse prefill stays on PyTorch."""
    import platform

    from slimlm import LLM
    from slimlm.kernels import ops

    if platform.machine() != "x86_64" or not HAS_CC:
        pytest.skip("x86-64 with a compiler only")
    monkeypatch.setenv(kernels.MARCH_ENV, "x86-64-v3")
    monkeypatch.setattr(kernels, "_loaded", {})
    monkeypatch.setattr(ops, "_LIBS", {})
    portable = kernels.load("sparse_prefill")
    assert portable is not None and not portable.slimlm_sparse_prefill_supported(16)
    llm = LLM(str(tiny_llama_dir), kv_cache_bytes="8M", sparse_prefill="vertical-slash",
              sparse_prefill_args={"min_keys": 8})
    assert llm.engine.runner.paths.sparse_prefill_native is None
