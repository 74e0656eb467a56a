"""The key-range entry of the native prefill kernel (``slimlm_paged_prefill_range``, Dual Chunk
Attention's three ranges): each row's output and log-sum-exp equal PyTorch attention over the keys
[k_lo, k_hi) of the paged context (causal or not; float32 to 1e-5, bfloat16 up to its products'
and probabilities' rounding), for unaligned ranges, odd sizes, GQA heads, scattered blocks and an
int8 pool; rows with no key get a zero output and -inf; ranges that split the context merge
exactly into causal attention; bad arguments are ValueErrors before the kernel runs."""

from __future__ import annotations


import pytest
import torch

from slimlm.kernels.ops import native_prefill_range

from tests.kernels.test_paged_prefill import DTYPES, lib, need  # noqa: F401  (lib: the module fixture)



def make_case(T, q_start, hq, hkv, d, bs, seed, dtype, extra=0):
    g = torch.Generator().manual_seed(seed)
    n = q_start + T + extra
    nb = -(-n // bs)
    k_pool = torch.randn(nb + 7, bs, hkv, d, generator=g).to(dtype)
    v_pool = torch.randn(nb + 7, bs, hkv, d, generator=g).to(dtype)
    table = torch.randperm(nb + 7, generator=g)[:nb].contiguous()
    q = (2 * torch.randn(hq, T, d, generator=g)).to(dtype)
    return q.transpose(0, 1), k_pool, v_pool, table  # q rows: a (T, Hq, d) strided view


def reference(q_rows, keys, vals, q_start, lo, hi, causal, scale):
    """float32 attention over keys [lo, hi) (keys, vals (n, Hkv, d)) and each row's log-sum-exp."""
    T, hq, d = q_rows.shape
    G = hq // keys.shape[1]
    kx = keys.float().transpose(0, 1).repeat_interleave(G, 0)  # (Hq, n, d)
    vx = vals.float().transpose(0, 1).repeat_interleave(G, 0)
    j = torch.arange(keys.shape[0])[None]
    allow = (j >= lo) & (j < hi)
    if causal:
        allow = allow & (j <= torch.arange(q_start, q_start + T)[:, None])
    s = (q_rows.float().transpose(0, 1) @ kx.transpose(-1, -2) * scale).masked_fill(~allow, float("-inf"))
    lse = s.logsumexp(-1)  # (Hq, T)
    out = (s - lse[..., None]).exp().nan_to_num(0.0) @ vx
    return out.transpose(0, 1), lse.transpose(0, 1)


def check(got, lse, want, want_lse, v_pool, dtype):
    if dtype == torch.float32:
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
        tol_lse = 1e-5
    else:  # bf16 products exact in fp32; probabilities rounded to bf16 for P V
        assert bool(((got - want).abs() <= 2**-8 * (want.abs() + v_pool.float().abs().max())).all())
        tol_lse = 1e-4
    fin = torch.isfinite(want_lse)
    assert torch.equal(fin, torch.isfinite(lse)) and bool((lse[~fin] == float("-inf")).all())
    assert torch.allclose(lse[fin], want_lse[fin], atol=tol_lse, rtol=tol_lse)
    assert bool((got[~fin] == 0).all())  # a row with no key: zero output


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T, q_start, lo, hi, causal, bs", [
    (7, 40, 0, 24, False, 8),     # an older range, aligned
    (13, 57, 5, 37, False, 8),    # unaligned both ends
    (11, 50, 50, 61, True, 16),   # the own range: causal, rows see 1..11 keys
    (9, 29, 33, 38, True, 8),     # causal range starting inside the rows: the first 4 rows have no key
    (1, 300, 3, 301, True, 16),   # one row, a long range
    (100, 7, 0, 107, True, 8),    # the whole causal context (== paged_prefill)
])
def test_range_equals_attention_over_the_range(lib, dtype, T, q_start, lo, hi, causal, bs):
    need(lib, dtype)
    q, kp, vp, table = make_case(T, q_start, 9, 3, 64, bs, seed=T * 7 + lo, dtype=dtype)
    n = q_start + T
    out = torch.full((T, 9, 64), float("nan"))
    lse = torch.full((T, 9), float("nan"))
    native_prefill_range(lib, q, [kp], [vp], DTYPES[dtype], table, q_start, lo, hi, causal, out, lse, 0.125)
    want, want_lse = reference(q, kp[table].flatten(0, 1)[:n], vp[table].flatten(0, 1)[:n], q_start, lo, hi,
                               causal, 0.125)
    check(out, lse, want, want_lse, vp, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T, q_start", [(37, 0), (50, 91)])
def test_whole_causal_range_is_the_causal_entry_bit_for_bit(lib, dtype, T, q_start):
    """Both entries run one tile function: the range [0, q_start + T), causal, gives the causal
    entry's output exactly (its float32 output rounded as the causal entry rounds to q's dtype)."""
    need(lib, dtype)
    from slimlm.kernels.ops import native_prefill

    q, kp, vp, table = make_case(T, q_start, 9, 3, 64, 16, seed=T + q_start, dtype=dtype)
    out, lse = torch.empty(T, 9, 64), torch.empty(T, 9)
    native_prefill_range(lib, q, [kp], [vp], DTYPES[dtype], table, q_start, 0, q_start + T, True, out, lse, 0.125)
    dense = torch.empty(T, 9, 64, dtype=dtype)
    native_prefill(lib, q, kp, vp, table, q_start, dense, 0.125)
    assert torch.equal(out.to(dtype), dense)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ranges_merge_into_causal_attention(lib, dtype):
    """Three ranges that split the context (as DCA's older / previous / own chunk, each attended
    with the same query here) merge by their log-sum-exps into plain causal attention."""
    need(lib, dtype)
    from slimlm.model.rope_extension import _merge

    T, q_start = 21, 83
    q, kp, vp, table = make_case(T, q_start, 4, 2, 128, 16, seed=3, dtype=dtype)
    n = q_start + T
    parts = []
    for lo, hi, causal in ((0, 45, False), (45, 83, False), (83, n, True)):
        o, lse = torch.empty(T, 4, 128), torch.empty(T, 4)
        native_prefill_range(lib, q, [kp], [vp], DTYPES[dtype], table, q_start, lo, hi, causal, o, lse, 0.1)
        parts.append((o, lse))
    want, _ = reference(q, kp[table].flatten(0, 1)[:n], vp[table].flatten(0, 1)[:n], q_start, 0, n, True, 0.1)
    check(_merge(parts), torch.zeros(T, 4), want, torch.zeros(T, 4), vp, dtype)


def test_strided_output_and_int8_pool(lib):
    need(lib, torch.float32)
    from slimlm.kvcache.codec import KV_CODECS

    T, q_start, lo, hi, d = 10, 30, 3, 35, 64
    q, kp, vp, table = make_case(T, q_start, 4, 2, d, 8, seed=11, dtype=torch.float32)
    n = q_start + T
    codec = KV_CODECS.get("int8")(torch.float32, d)
    parts = [codec.allocate(kp.shape[0], 8, 2, "cpu") for _ in range(2)]
    slots = (table[:, None] * 8 + torch.arange(8)).flatten()[:n]
    codec.write(parts[0], slots, kp[table].flatten(0, 1)[:n])
    codec.write(parts[1], slots, vp[table].flatten(0, 1)[:n])
    big = torch.zeros(T + 4, 4, d)
    lse = torch.empty(T, 4)
    native_prefill_range(lib, q, parts[0], parts[1], codec.native_code, table, q_start, lo, hi, True, big[2 : 2 + T],
                         lse, 0.125)
    want, want_lse = reference(q, codec.read(parts[0], table).flatten(0, 1)[:n],
                               codec.read(parts[1], table).flatten(0, 1)[:n], q_start, lo, hi, True, 0.125)
    check(big[2 : 2 + T], lse, want, want_lse, vp, torch.float32)
    assert big[:2].abs().sum() == 0 and big[2 + T :].abs().sum() == 0  # nothing written outside the rows


def test_bad_arguments_are_value_errors(lib):
    need(lib, torch.float32)
    q, kp, vp, table = make_case(4, 8, 2, 1, 64, 8, seed=0, dtype=torch.float32)
    out, lse = torch.empty(4, 2, 64), torch.empty(4, 2)
    with pytest.raises(ValueError, match="k_lo <= k_hi"):
        native_prefill_range(lib, q, [kp], [vp], 0, table, 8, 5, 3, False, out, lse, 1.0)
    with pytest.raises(ValueError, match="cover the key range"):
        native_prefill_range(lib, q, [kp], [vp], 0, table, 8, 0, table.numel() * 8 + 1, False, out, lse, 1.0)
    with pytest.raises(ValueError, match="out must be float32"):
        native_prefill_range(lib, q, [kp], [vp], 0, table, 8, 0, 8, False, out.bfloat16(), lse, 1.0)
    with pytest.raises(ValueError, match="lse must be"):
        native_prefill_range(lib, q, [kp], [vp], 0, table, 8, 0, 8, False, out, torch.empty(4, 3), 1.0)


def test_opcheck(lib):
    need(lib, torch.float32)
    q, kp, vp, table = make_case(9, 12, 4, 2, 64, 8, seed=1, dtype=torch.float32)
    torch.library.opcheck(torch.ops.slimlm.paged_prefill_range.default,
                          (q.contiguous(), [kp], [vp], 0, table, 12, 3, 21, True, torch.empty(9, 4, 64),
                           torch.empty(9, 4), 0.25), test_utils=("test_schema", "test_faketensor"))
