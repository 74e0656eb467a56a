"""Shared chunks in the native decode kernel (kernels/paged_decode.c, "Chunked decode and shared
chunks"): rows whose block tables start with the same physical blocks (a prompt prefix shared
through prefix caching) have those chunks' keys and values read once for all of them (cascade
attention), on float32 and bfloat16 pools on the AVX-512 path.

Checked on random block tables with and without shared prefixes (several groups, prefixes that end
inside a chunk, identical tables of different lengths, rows shorter than a chunk), GQA ratios 1 to 8,
head sizes 32 / 64 / 128 and block sizes 8 / 16 / 32 / 48 (chunks of 96 keys): the output matches dense attention (float32:
1e-5), each row's output is bitwise the same as the row alone (batch invariance: a shared chunk's
sums are the same floats as the row's own) and as with ``SLIMLM_DECODE_CASCADE=0`` (every chunk per
row), and ``slimlm_decode_shared_chunks`` reports that chunks were shared (the test fails if the
cascade never ran). Pools the cascade does not serve (quantized codecs, ``mass``, AMX) keep their
paths and report 0."""

from __future__ import annotations

import pytest
import torch

from slimlm.kernels.ops import native_decode
from tests.kernels.test_paged_decode import lib, reference  # noqa: F401

CODES = {torch.float32: 0, torch.bfloat16: 1}
CHUNK_KEYS = 128  # paged_decode.c's CHUNK_KEYS


def avx512() -> bool:
    try:
        return "avx512f" in open("/proc/cpuinfo").read()
    except OSError:
        return False


needs_avx512 = pytest.mark.skipif(not avx512(), reason="the chunked path is the AVX-512 one")


def shared_case(seed, hq, hkv, d, bs, dtype, groups=((5, 25), (3, 9), (2, 8), (1, 0), (2, 16))):
    """Rows in groups (rows, shared leading blocks): a group's rows take its first blocks from one
    list, the rest of each table its own blocks; lengths cover the shared blocks and more (one row of
    the first group exactly as long as its prefix, one shorter than a chunk when no prefix)."""
    g = torch.Generator().manual_seed(seed)
    nb = max(p for _, p in groups) + 12
    B = sum(r for r, _ in groups)
    n_blocks = B * nb + 8
    perm = torch.randperm(n_blocks, generator=g)
    table = torch.empty(B, nb, dtype=torch.int64)
    lens = torch.empty(B, dtype=torch.int64)
    row, used = 0, 0
    for rows, p in groups:
        prefix = perm[used : used + p]
        used += p
        for i in range(rows):
            own = perm[used : used + nb - p]
            used += nb - p
            table[row] = torch.cat([prefix, own])
            extra = int(torch.randint(1, 10 * bs, (1,), generator=g))
            lens[row] = p * bs + (0 if (i == 1 and p) else extra)
            row += 1
    lens[B - 1] = min(int(lens[B - 1]), CHUNK_KEYS - 5) if groups[-1][1] == 0 else lens[B - 1]
    k_pool = torch.randn(n_blocks, bs, hkv, d, generator=g).to(dtype)
    v_pool = torch.randn(n_blocks, bs, hkv, d, generator=g).to(dtype)
    order = torch.randperm(B, generator=g)  # sharing rows scattered through the batch
    q = torch.randn(B, hq, d, generator=g)
    return q[order].contiguous(), k_pool, v_pool, table[order].contiguous(), lens[order].contiguous()


def decode(lib, q, k_pool, v_pool, table, lens, scale, code):  # noqa: F811
    out = native_decode(lib, q, [k_pool], [v_pool], code, table, lens, scale)
    return out, int(lib.slimlm_decode_shared_chunks())


@needs_avx512
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d,hq,hkv", [(64, 9, 3), (128, 8, 2), (64, 8, 1), (32, 4, 4)])
@pytest.mark.parametrize("bs", [8, 16, 32, 48])
def test_shared_chunks_exact(lib, monkeypatch, dtype, d, hq, hkv, bs):  # noqa: F811
    monkeypatch.setenv("SLIMLM_AMX", "0")  # bf16: the AVX-512 path (AMX keeps its own)
    q, kp, vp, table, lens = shared_case(d + hq + bs, hq, hkv, d, bs, dtype)
    if dtype == torch.bfloat16:
        q[::2] = q[::2].bfloat16().float()  # bf16-exact queries (hi part only) next to full fp32 ones
    scale = d**-0.5
    monkeypatch.setenv("SLIMLM_DECODE_CASCADE", "1")
    got, shared = decode(lib, q, kp, vp, table, lens, scale, CODES[dtype])
    assert shared > 0, "no chunk was shared: the cascade did not run"
    torch.testing.assert_close(got, reference(q, kp, vp, table, lens, scale), rtol=1e-5, atol=1e-5)
    for b in range(q.shape[0]):  # each row alone: the same floats
        alone, n = decode(lib, q[b : b + 1], kp, vp, table[b : b + 1], lens[b : b + 1], scale, CODES[dtype])
        assert n == 0
        assert torch.equal(alone[0], got[b]), f"row {b} differs alone"
    monkeypatch.setenv("SLIMLM_DECODE_CASCADE", "0")
    off, n = decode(lib, q, kp, vp, table, lens, scale, CODES[dtype])
    assert n == 0 and torch.equal(off, got)


@needs_avx512
def test_no_shared_prefix_shares_nothing(lib, monkeypatch):  # noqa: F811
    q, kp, vp, table, lens = shared_case(3, 9, 3, 64, 16, torch.float32, groups=((1, 0),) * 6)
    monkeypatch.setenv("SLIMLM_DECODE_CASCADE", "1")
    got, shared = decode(lib, q, kp, vp, table, lens, 0.125, 0)
    assert shared == 0
    torch.testing.assert_close(got, reference(q, kp, vp, table, lens, 0.125), rtol=1e-5, atol=1e-5)


@needs_avx512
def test_share_count(lib, monkeypatch):  # noqa: F811
    """Two rows sharing 3 whole chunks of 16-key blocks (24 blocks + part of a fourth chunk): 3 shared chunks."""
    q, kp, vp, table, lens = shared_case(5, 9, 3, 64, 16, torch.float32, groups=((2, 30),))
    monkeypatch.setenv("SLIMLM_DECODE_CASCADE", "1")
    _, shared = decode(lib, q, kp, vp, table, lens, 0.125, 0)
    assert shared == 30 * 16 // CHUNK_KEYS


@needs_avx512
def test_other_paths_keep_theirs(lib, monkeypatch):  # noqa: F811
    """int8 pools and the mass output (H2O) take the per-row walk: nothing shared, output as before."""
    from slimlm.kvcache.codec import KV_CODECS

    q, kp, vp, table, lens = shared_case(7, 9, 3, 64, 16, torch.float32, groups=((3, 12),))
    monkeypatch.setenv("SLIMLM_DECODE_CASCADE", "1")
    mass = torch.zeros(kp.shape[0] * 16, 3)
    out = native_decode(lib, q, [kp], [vp], 0, table, lens, 0.125, mass)
    assert int(lib.slimlm_decode_shared_chunks()) == 0
    torch.testing.assert_close(out, reference(q, kp, vp, table, lens, 0.125), rtol=1e-5, atol=1e-5)
    kc, vc = KV_CODECS.get("int8")(torch.float32, 64, "k"), KV_CODECS.get("int8")(torch.float32, 64, "v")
    if kc.native_code is None:
        return
    kparts, vparts = kc.allocate(kp.shape[0], 16, 3, "cpu"), vc.allocate(kp.shape[0], 16, 3, "cpu")
    slots = torch.arange(kp.shape[0] * 16)
    kc.write(kparts, slots, kp.view(-1, 3, 64))
    vc.write(vparts, slots, vp.view(-1, 3, 64))
    native_decode(lib, q, kparts, vparts, kc.native_code, table, lens, 0.125)
    assert int(lib.slimlm_decode_shared_chunks()) == 0
