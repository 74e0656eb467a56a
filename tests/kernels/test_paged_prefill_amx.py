"""The prefill kernel's AMX tiles (bf16 pools and queries, kernels/paged_prefill.c) against float32
PyTorch attention and against the kernel's own AVX-512 tiles (``SLIMLM_AMX=0``, same build): causal
chunks at several query starts, partial tiles and lengths that are not multiples of 16 / 32 (the
tiles stack 32 rows and read keys 32 at a time, in online-softmax blocks of 256), GQA groups of 1,
3, 16 and 40 heads (40 > 32: a group split over tiles), head sizes 64 / 128 / 256, the key-range
entry (Dual Chunk Attention) and the attention mass (H2O).

Tolerance: |err| <= 2^-7 |want| + 4e-3 against float32 attention over the same bf16 inputs (bf16
output rounding and bf16 probabilities for P V; test_paged_prefill.close_enough's 2e-3 is exceeded
by 1.07x at two of these seeds, on both paths alike), and the AMX path's mean error within 1.25x the
AVX-512 path's (+1e-4). Measured at the throughput workload's shapes
(docs/results/raw/ab_amx_prefill.py): the largest |out - float32 reference| is the same on both
paths (0.008, the bf16 output's rounding), the paths differ from each other by at most 1-2 bf16
ulps of the output (the order of the fp32 sums, and probabilities rounded to bf16 against each
block's running maximum instead of the row's maximum). Skipped where the CPU or the build has no
AMX."""

from __future__ import annotations

import pytest
import torch

from slimlm.model.dtype_auto import cpu_flags
from slimlm.kernels.ops import native_prefill, native_prefill_ex, native_prefill_range

from tests.kernels.test_paged_prefill import lib, make_case, reference  # noqa: F401  (lib: fixture)
from tests.kernels.test_paged_prefill_range import check, make_case as make_range_case
from tests.kernels.test_paged_prefill_range import reference as range_reference


def _cpu_has_amx() -> bool:
    return {"amx_tile", "amx_bf16"} <= cpu_flags()


@pytest.fixture()
def amx(lib, monkeypatch):  # noqa: F811
    """The loaded kernel with its AMX tiles on; skips where the CPU or the build has none."""
    if not _cpu_has_amx():
        pytest.skip("this CPU has no AMX: bf16 prefill runs on the AVX-512 tiles (tested elsewhere)")
    monkeypatch.setenv("SLIMLM_AMX", "1")
    if not lib.slimlm_prefill_supported(64, 1) or not lib.slimlm_prefill_amx():
        pytest.skip("the kernel was built without AMX (SLIMLM_KERNEL_MARCH) or the OS refuses tile state")
    return lib


def both_paths(lib, monkeypatch, fn):  # noqa: F811
    """fn() run on the AMX tiles and on the AVX-512 tiles (SLIMLM_AMX=0), checking which ran."""
    monkeypatch.setenv("SLIMLM_AMX", "1")
    assert lib.slimlm_prefill_amx() == 1
    a = fn()
    monkeypatch.setenv("SLIMLM_AMX", "0")
    assert lib.slimlm_prefill_amx() == 0
    b = fn()
    monkeypatch.setenv("SLIMLM_AMX", "1")
    return a, b


def close_enough(got, want, dtype=torch.bfloat16):
    return bool(((got.float() - want).abs() <= want.abs() * 2**-7 + 4e-3).all())


def no_worse(amx_out, avx_out, want):
    ea, eb = (amx_out.float() - want).abs().mean(), (avx_out.float() - want).abs().mean()
    assert ea <= 1.25 * eb + 1e-4, (float(ea), float(eb))


@pytest.mark.parametrize("T,q_start", [(1, 0), (3, 0), (10, 0), (31, 0), (32, 0), (33, 5), (45, 17), (100, 0),
                                       (129, 64), (257, 0), (300, 211), (77, 500), (513, 0), (40, 1000)])
def test_amx_matches_reference_causal_gqa(amx, monkeypatch, T, q_start):
    q, kp, vp, table = make_case(T, q_start, 9, 3, 64, 16, seed=T * 13 + q_start)
    want = reference(q, kp, vp, table, q_start, 0.125)

    def run():
        out = torch.full((T, 9, 64), float("nan"), dtype=torch.bfloat16)
        native_prefill(amx, q, kp, vp, table, q_start, out, 0.125)
        return out

    got, avx = both_paths(amx, monkeypatch, run)
    assert close_enough(got, want, torch.bfloat16)
    assert close_enough(avx, want, torch.bfloat16)
    no_worse(got, avx, want)


@pytest.mark.parametrize("hq,hkv,d,T,q_start,bs", [
    (4, 4, 64, 37, 20, 8),     # no GQA: 32 positions of one head per tile
    (16, 1, 64, 23, 9, 8),     # G = 16: two positions per tile
    (40, 1, 64, 7, 30, 16),    # G = 40 > 32: each position's heads over two tiles (32 + 8)
    (4, 2, 128, 70, 45, 8),
    (2, 1, 256, 51, 300, 16),
])
def test_amx_other_groups_head_sizes_and_strided_output(amx, monkeypatch, hq, hkv, d, T, q_start, bs):
    q, kp, vp, table = make_case(T, q_start, hq, hkv, d, bs, seed=hq * d + T)
    want = reference(q, kp, vp, table, q_start, d**-0.5)

    def run():
        big = torch.zeros(T + 5, hq, d, dtype=torch.bfloat16)
        native_prefill(amx, q, kp, vp, table, q_start, big[3 : 3 + T], d**-0.5)
        assert big[:3].abs().sum() == 0 and big[3 + T :].abs().sum() == 0  # nothing written outside the rows
        return big[3 : 3 + T]

    got, avx = both_paths(amx, monkeypatch, run)
    assert close_enough(got, want, torch.bfloat16)
    no_worse(got, avx, want)


@pytest.mark.parametrize("T, q_start, lo, hi, causal, bs", [
    (13, 57, 5, 37, False, 8),     # unaligned both ends (the first 32-key chunk partly masked)
    (11, 50, 50, 61, True, 16),    # the own range, causal
    (9, 29, 33, 38, True, 8),      # the first 4 rows have no key
    (40, 300, 17, 333, True, 16),  # several 256-key blocks, unaligned start
    (100, 7, 0, 107, True, 8),     # the whole causal context
])
def test_amx_range_entry(amx, monkeypatch, T, q_start, lo, hi, causal, bs):
    q, kp, vp, table = make_range_case(T, q_start, 9, 3, 64, bs, seed=T * 7 + lo, dtype=torch.bfloat16)
    n = q_start + T
    want, want_lse = range_reference(q, kp[table].flatten(0, 1)[:n], vp[table].flatten(0, 1)[:n], q_start, lo, hi,
                                     causal, 0.125)

    def run():
        out, lse = torch.full((T, 9, 64), float("nan")), torch.full((T, 9), float("nan"))
        native_prefill_range(amx, q, [kp], [vp], 1, table, q_start, lo, hi, causal, out, lse, 0.125)
        return out, lse

    (got, lse), (avx, _) = both_paths(amx, monkeypatch, run)
    check(got, lse, want, want_lse, vp, torch.bfloat16)
    no_worse(got, avx, want)


@pytest.mark.parametrize("T,q_start", [(21, 13), (300, 40)])
def test_amx_mass(amx, monkeypatch, T, q_start):
    """The attention mass (one softmax block per row on this path) sums each key's final
    probabilities as explicit attention does, and deterministically (two runs, equal bits)."""
    g = torch.Generator().manual_seed(T)
    hq, hkv, d, bs = 9, 3, 64, 16
    n, G = q_start + T, hq // hkv
    nb = -(-n // bs) + 3
    kp = torch.randn(nb, bs, hkv, d, generator=g).bfloat16()
    vp = torch.randn(nb, bs, hkv, d, generator=g).bfloat16()
    table = torch.randperm(nb, generator=g)[: -(-n // bs)]
    slots = table[torch.arange(n) // bs] * bs + torch.arange(n) % bs
    q = torch.randn(T, hq, d, generator=g).bfloat16()
    k = kp.flatten(0, 1)[slots].float()
    v = vp.flatten(0, 1)[slots].float()
    s = torch.einsum("thd,shd->hts", q.float(), k.repeat_interleave(G, 1)) * 0.125
    causal = torch.arange(n)[None] <= torch.arange(q_start, n)[:, None]
    p = s.masked_fill(~causal, float("-inf")).softmax(-1)
    want = torch.einsum("hts,shd->thd", p, v.repeat_interleave(G, 1))

    def run():
        out, mass = torch.empty_like(q), torch.zeros(nb * bs, hkv)
        native_prefill_ex(amx, q, [kp], [vp], 1, table, q_start, out, 0.125, mass)
        return out, mass

    (out, mass), (avx_out, _) = both_paths(amx, monkeypatch, run)
    assert close_enough(out, want, torch.bfloat16)
    no_worse(out, avx_out, want)
    torch.testing.assert_close(mass[slots], p.view(hkv, G, T, n).sum((1, 2)).T, rtol=1e-2, atol=1e-2)
    assert mass.sum().item() == pytest.approx(hkv * G * T, rel=1e-5)
    assert torch.equal(run()[1], mass)


def test_quantized_and_fp32_pools_keep_the_avx512_tiles(amx, monkeypatch):
    """AMX serves bf16 pools with bf16 queries only: an int8 pool read with a bf16 query gives
    the same bits with SLIMLM_AMX on or off (both on the AVX-512 tiles)."""
    from slimlm.kvcache.codec import KV_CODECS

    T, q_start, d, bs, nb = 19, 30, 64, 8, 10
    codec = KV_CODECS.get("int8")(torch.bfloat16, d)
    g = torch.Generator().manual_seed(5)
    parts = [codec.allocate(nb, bs, 3, "cpu") for _ in range(2)]
    table = torch.randperm(nb, generator=g)[: -(-(q_start + T) // bs)]
    slots = table[torch.arange(q_start + T) // bs] * bs + torch.arange(q_start + T) % bs
    for pt in parts:
        codec.write(pt, slots, torch.randn(q_start + T, 3, d, generator=g).bfloat16())
    q = torch.randn(T, 9, d, generator=g).bfloat16()
    outs = []
    for env in ("1", "0"):
        monkeypatch.setenv("SLIMLM_AMX", env)
        out = torch.empty_like(q)
        native_prefill_ex(amx, q, parts[0], parts[1], codec.native_code, table, q_start, out, 0.125)
        outs.append(out)
    assert torch.equal(*outs)
