"""The key-range entry of the vertical-slash kernel (``slimlm_sparse_prefill_range``, sparse
prefill under Dual Chunk Attention): each row's float32 output and log-sum-exp equal masked
attention under the pattern restricted to the keys [k_lo, k_hi); ranges that split the context
merge into the whole pattern's output; the pairs it counts add up to the whole pattern's."""

from __future__ import annotations


import pytest
import torch

from slimlm.kernels.ops import native_sparse_prefill, native_sparse_prefill_range
from slimlm.model.rope_extension import _merge

from tests.kernels.test_sparse_prefill import lib  # noqa: F401  (the module fixture)


def case(T, q_start, hq, hkv, d, bs, seed, dtype, nv, ns, local):
    g = torch.Generator().manual_seed(seed)
    n = q_start + T
    nb = -(-n // bs)
    kp = torch.randn(nb + 5, bs, hkv, d, generator=g).to(dtype)
    vp = torch.randn(nb + 5, bs, hkv, d, generator=g).to(dtype)
    table = torch.randperm(nb + 5, generator=g)[:nb].contiguous()
    q = (2 * torch.randn(hq, T, d, generator=g)).to(dtype).transpose(0, 1)
    cols = torch.stack([torch.randperm(n, generator=g)[:nv].sort().values for _ in range(hq)]).to(torch.int32)
    offs = torch.stack([torch.cat([torch.arange(local), local + torch.randperm(n - local, generator=g)[:ns - local]])
                        .sort().values for _ in range(hq)]).to(torch.int32)
    return q, kp, vp, table, cols.contiguous(), offs.contiguous()


def reference(q, keys, vals, q_start, cols, offs, lo, hi, scale):
    T, hq, d = q.shape
    n, hkv = keys.shape[0], keys.shape[1]
    kx = keys.float().transpose(0, 1).repeat_interleave(hq // hkv, 0)
    vx = vals.float().transpose(0, 1).repeat_interleave(hq // hkv, 0)
    dist = torch.arange(q_start, q_start + T)[:, None] - torch.arange(n)[None]
    is_v = torch.zeros(hq, n, dtype=torch.bool).scatter_(1, cols.long(), True)
    is_s = torch.zeros(hq, n, dtype=torch.bool).scatter_(1, offs.long(), True)
    j = torch.arange(n)
    allow = (dist >= 0)[None] & (is_v[:, None, :] | is_s[:, dist.clamp(min=0)]) & ((j >= lo) & (j < hi))[None, None]
    s = (q.float().transpose(0, 1) @ kx.transpose(-1, -2) * scale).masked_fill(~allow, float("-inf"))
    lse = s.logsumexp(-1)
    return ((s - lse[..., None]).exp().nan_to_num(0.0) @ vx).transpose(0, 1), lse.transpose(0, 1), int(allow.sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ranges_follow_the_pattern_and_merge(lib, dtype):
    T, q_start, d = 45, 70, 32
    q, kp, vp, table, cols, offs = case(T, q_start, 4, 2, d, 8, 5, dtype, nv=9, ns=13, local=3)
    n = q_start + T
    keys, vals = kp[table].flatten(0, 1)[:n], vp[table].flatten(0, 1)[:n]
    code = int(dtype == torch.bfloat16)
    parts, pairs = [], 0
    stats = torch.zeros(2, dtype=torch.int64)
    for lo, hi in ((0, 33), (33, 74), (74, n)):  # the last range starts inside the rows
        out, lse = torch.full((T, 4, d), float("nan")), torch.full((T, 4), float("nan"))
        native_sparse_prefill_range(lib, q, [kp], [vp], code, table, q_start, cols, offs, 16, lo, hi, out, lse, 0.2,
                                    stats)
        want, want_lse, k = reference(q, keys, vals, q_start, cols, offs, lo, hi, 0.2)
        pairs += k
        fin = torch.isfinite(want_lse)
        assert torch.equal(fin, torch.isfinite(lse)) and bool((lse[~fin] == float("-inf")).all())
        assert bool((out[~fin] == 0).all())
        tol = 1e-5 if dtype == torch.float32 else 2**-8
        assert torch.allclose(lse[fin], want_lse[fin], atol=tol * 10, rtol=tol)
        assert bool(((out - want).abs() <= tol * (want.abs() + vp.float().abs().max())).all())
        parts.append((out, lse))
    assert int(stats[0]) == pairs  # every attended pair counted once
    whole = torch.empty(T, 4, d, dtype=dtype)
    total = torch.zeros(2, dtype=torch.int64)
    native_sparse_prefill(lib, q, [kp], [vp], code, table, q_start, cols, offs, 16, whole, 0.2, total)
    assert int(total[0]) == pairs
    err = (_merge(parts) - whole.float()).abs()
    if dtype == torch.float32:
        assert bool((err <= 1e-5 * (1 + whole.abs())).all())
    else:  # the whole output is rounded to bf16 and each call rounds its own probabilities
        assert bool((err <= 2**-7 * (whole.float().abs() + vp.float().abs().max())).all())


def test_bad_range_is_a_value_error(lib):
    q, kp, vp, table, cols, offs = case(8, 0, 2, 1, 16, 8, 0, torch.float32, nv=3, ns=3, local=1)
    with pytest.raises(ValueError, match="k_lo <= k_hi"):
        native_sparse_prefill_range(lib, q, [kp], [vp], 0, table, 0, cols, offs, 4, 5, 2, torch.empty(8, 2, 16),
                                    torch.empty(8, 2), 1.0)
    with pytest.raises(ValueError, match="out must be float32"):
        native_sparse_prefill_range(lib, q, [kp], [vp], 0, table, 0, cols, offs, 4, 0, 8,
                                    torch.empty(8, 2, 16, dtype=torch.bfloat16), torch.empty(8, 2), 1.0)
