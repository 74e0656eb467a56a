"""The decode kernel's AMX path (bfloat16 pools, kernels/paged_decode.c: decode_rows_amx, the
scores as tile products) against float64 attention over the same bf16 keys and values, and against
the kernel's own AVX-512 path (``SLIMLM_AMX=0``, same build): GQA groups of 1 to 8 query heads per
KV head, head sizes 32 / 64 / 96 / 128 (two and four tile products per 16 keys), blocks of 16 and
32 keys, lengths that are not multiples of 16 (the tiles read 16 key rows, the rows past the length
dropped), fp32 queries (their bf16 hi and lo parts in separate columns) and bf16-exact ones, the
attention mass (H2O); batch invariance on the tiles (a row's output bitwise the same alone, among
others, in another order, at 1 or 2 threads); more than 8 heads per KV head keep the AVX-512 path.
Skipped where the CPU or the build has no AMX.

Tolerance: the same products as the AVX-512 path summed in the tiles' order, so the float64
reference's to |err| <= 1e-5 (1 + |want|), as test_paged_decode's, and within 1e-6 of the AVX-512
path."""

from __future__ import annotations

import pytest
import torch

from slimlm.model.dtype_auto import cpu_flags
from slimlm.kernels.ops import native_decode

from tests.kernels.test_paged_decode import _case, lib, reference_mass  # noqa: F401  (lib: fixture)


def _cpu_has_amx() -> bool:
    return {"amx_tile", "amx_bf16"} <= cpu_flags()


@pytest.fixture()
def amx(lib, monkeypatch):  # noqa: F811
    if not _cpu_has_amx():
        pytest.skip("this CPU has no AMX: bf16 decode runs on the AVX-512 path (tested elsewhere)")
    monkeypatch.setenv("SLIMLM_AMX", "1")
    if not lib.slimlm_decode_amx():
        pytest.skip("the kernel was built without AMX (SLIMLM_KERNEL_MARCH) or the OS refuses tile state")
    return lib


def reference64(q, k_pool, v_pool, table, lens, scale):
    """float64 attention over each row's keys (the pools' bf16 values exactly)."""
    _, bs, hkv, d = k_pool.shape
    G = q.shape[1] // hkv
    outs = []
    for b in range(q.shape[0]):
        L = int(lens[b])
        blocks = table[b, : -(-L // bs)]
        k = k_pool[blocks].reshape(-1, hkv, d)[:L].double().repeat_interleave(G, dim=1)  # (L, Hq, d)
        v = v_pool[blocks].reshape(-1, hkv, d)[:L].double().repeat_interleave(G, dim=1)
        p = (torch.einsum("hd,lhd->hl", q[b].double(), k) * scale).softmax(-1)
        outs.append(torch.einsum("hl,lhd->hd", p, v))
    return torch.stack(outs).float()


def run(lib, monkeypatch, on, q, kp, vp, table, lens, scale, mass=None):  # noqa: F811
    monkeypatch.setenv("SLIMLM_AMX", "1" if on else "0")
    assert lib.slimlm_decode_amx() == int(on)
    return native_decode(lib, q, [kp], [vp], 1, table, lens, scale, mass)


LENS = [1, 3, 15, 16, 17, 31, 32, 33, 50, 100, 257]


@pytest.mark.parametrize("d,hq,hkv", [(64, 9, 3), (64, 3, 3), (64, 16, 2), (32, 4, 4), (96, 6, 2), (128, 8, 1),
                                      (128, 12, 4)])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("bf16_queries", [False, True])
def test_matches_float64_and_the_avx512_path(amx, monkeypatch, d, hq, hkv, block_size, bf16_queries):
    q, kp, vp, table, lens = _case(d + hq + block_size, torch.bfloat16, d, hq, hkv, block_size, LENS)
    if bf16_queries:
        q = q.bfloat16().float()
    scale = d**-0.5
    mass = torch.zeros(kp.shape[0] * kp.shape[1], hkv)
    got = run(amx, monkeypatch, True, q, kp, vp, table, lens, scale, mass)
    avx = run(amx, monkeypatch, False, q, kp, vp, table, lens, scale)
    want = reference64(q, kp, vp, table, lens, scale)
    err = (got - want).abs()
    assert (err <= 1e-5 * (1 + want.abs())).all(), f"max |err| {err.max():.3g}"
    assert (got - avx).abs().max() <= 1e-6, f"max |amx - avx512| {(got - avx).abs().max():.3g}"
    torch.testing.assert_close(mass, reference_mass(q, kp, table, lens, scale), rtol=1e-4, atol=1e-5)


def test_more_than_8_heads_per_kv_head_keep_the_avx512_path(amx, monkeypatch):
    """G = 9 query heads per KV head exceeds the tiles' 16 columns (hi + lo): the AVX-512 path
    serves, so SLIMLM_AMX changes nothing."""
    q, kp, vp, table, lens = _case(5, torch.bfloat16, 64, 9, 1, 16, [40, 97])
    a = run(amx, monkeypatch, True, q, kp, vp, table, lens, 0.125)
    b = run(amx, monkeypatch, False, q, kp, vp, table, lens, 0.125)
    assert torch.equal(a, b)


@pytest.mark.parametrize("d,hq,hkv", [(64, 9, 3), (64, 4, 4), (128, 8, 2)])
def test_a_row_is_the_same_alone_or_among_others(amx, monkeypatch, d, hq, hkv):
    q, kp, vp, table, lens = _case(7, torch.bfloat16, d, hq, hkv, 16, [40, 97, 1, 300, 16, 63])
    together = run(amx, monkeypatch, True, q, kp, vp, table, lens, 0.125)
    for b in range(len(lens)):
        alone = run(amx, monkeypatch, True, q[b : b + 1], kp, vp, table[b : b + 1], lens[b : b + 1], 0.125)
        assert torch.equal(alone[0], together[b])
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    shuffled = run(amx, monkeypatch, True, q[perm], kp, vp, table[perm], lens[perm], 0.125)
    assert torch.equal(shuffled, together[perm])
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(2 if n == 1 else 1)
        other = run(amx, monkeypatch, True, q, kp, vp, table, lens, 0.125)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(other, together)
