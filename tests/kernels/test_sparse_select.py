"""The query policies' selection in C (``kernels/sparse_select.h``) picks what their PyTorch code
picks: ShadowKV's chunks by landmark score, Squeezed Attention's clusters per query head (one and
two levels), ties to the lower index in both (exact ties: equal landmarks / centroids, and scores
whose softmax underflows to zero); its counters give the PyTorch path's bytes; selecting and
attending in one pass equals the selection followed by the sparse kernel; bad summaries are refused."""

from __future__ import annotations

import shutil

import pytest
import torch

from slimlm import kernels
from slimlm.kernels.ops import native_sparse_decode
from slimlm.kernels.sparse_select import native_sparse_select, native_sparse_select_decode
from slimlm.kvcache.policy import KV_POLICIES
from slimlm.model.config import ModelConfig
from slimlm.model.rope import RotaryEmbedding

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler")
Hq, Hkv, d = 9, 3, 64


@pytest.fixture(scope="module")
def lib():
    lib = kernels.load("sparse_decode")
    assert lib is not None
    return lib


@pytest.fixture(scope="module")
def rot():
    return RotaryEmbedding(ModelConfig(vocab_size=8, hidden_size=Hq * d, intermediate_size=8, num_layers=1,
                                       num_heads=Hq, num_kv_heads=Hkv, head_dim=d, max_position_embeddings=4096))


def _keys(P, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(Hkv, P, d, generator=g) + torch.randn(Hkv, 1, d, generator=g)  # (Hkv, P, d)


def _shadowkv_rows(pol, s, q):
    """The PyTorch selection's rows per KV head: chosen chunks' rows ascending, then the outliers'."""
    sel, _ = pol._chunks(s, q)
    offs = torch.arange(pol.chunk)
    return torch.cat([(sel.sort(-1).values[..., None] * pol.chunk + offs).flatten(1), s[5]], 1)


@pytest.mark.parametrize("case", ["random", "equal-landmarks", "underflow"])
def test_shadowkv_picks_the_pytorch_chunks(lib, rot, case):
    pol = KV_POLICIES.get("shadowkv")(rank=8, chunk=4, budget=0.2, outliers=0.05)
    P = 256  # (an SVD of 3 x 512 x 64 takes seconds here, of 256 rows milliseconds)
    keys = _keys(P, 0)
    s = pol.summary(0, keys, keys, torch.arange(P), rot)
    if case == "equal-landmarks":  # every landmark alike: every score ties
        s = (*s[:2], s[2][:, :1].expand_as(s[2]).contiguous(), *s[3:])
    for seed in range(3):
        q = torch.randn(Hq, d, generator=torch.Generator().manual_seed(seed)) * (200.0 if case == "underflow" else 1.0)
        ids, qm, k_new, read, attended = pol.select_native(s, q, rot, P)
        assert qm is None and k_new.m == pol.chunk * pol._n_sel(s[2].shape[1], s[5].shape[1] // pol.chunk)
        want = _shadowkv_rows(pol, s, q)
        assert torch.equal(torch.stack(ids), want)
        keep, _, want_read = pol.select(s, q, keys, rot, P)
        assert read == want_read and attended == int(keep.sum()) // Hq
    if case == "underflow":  # most chunks' scores are exactly 0: the ties decide, the lower chunk wins
        tot = torch.bmm(q.view(Hkv, 3, d), s[2].transpose(1, 2)).div(d**0.5).softmax(-1).sum(1)
        assert int((tot == 0).sum(-1).min()) > s[2].shape[1] // 2


@pytest.mark.parametrize("levels", [1, 2])
@pytest.mark.parametrize("case", ["random", "equal-centroids"])
def test_squeezed_picks_the_pytorch_clusters(lib, rot, levels, case):
    pol = KV_POLICIES.get("squeezed")(budget=0.25, clusters=32, levels=levels, iters=4, min_prefix=64)
    P = 480
    keys = _keys(P, 1)
    s = pol.summary(0, keys, keys, torch.arange(P), rot)
    if case == "equal-centroids":
        cents = s[0][:, :1].expand_as(s[0]).contiguous()
        s = (cents, *s[1:3], None if s[3] is None else (s[3][0][:, :1].expand_as(s[3][0]).contiguous(), *s[3][1:]))
    pol.elem_bytes = 4
    for seed in range(3):
        q = torch.randn(Hq, d, generator=torch.Generator().manual_seed(seed))
        before = dict(pol.stats)
        keep, _, want_read = pol.select(s, q, keys, rot, P)  # (Hq, P)
        want_cb = pol.stats["centroid_bytes"] - before["centroid_bytes"]
        mid = dict(pol.stats)
        ids, qm, k_new, read, attended = pol.select_native(s, q, rot, P)
        assert k_new is None and read == want_read and attended == int(keep.sum()) // Hq
        assert pol.stats["centroid_bytes"] - mid["centroid_bytes"] == want_cb
        for h in range(Hkv):
            grp = keep[3 * h: 3 * h + 3]  # (G, P)
            assert torch.equal(ids[h], grp.any(0).nonzero()[:, 0])
            assert torch.equal(qm[h], grp[:, ids[h]])


def test_one_pass_equals_selection_then_the_sparse_kernel(lib, rot):
    """Rows of a batch: ShadowKV / Squeezed summaries and a dense row, keys read from a pool."""
    from slimlm.kvcache.codec import KV_CODECS

    bs, nbs, P = 16, 20, 256
    codec = KV_CODECS.get("float32")(torch.float32, d)
    k, v = codec.allocate(3 * nbs, bs, Hkv, "cpu"), codec.allocate(3 * nbs, bs, Hkv, "cpu")
    g = torch.Generator().manual_seed(3)
    table = torch.randperm(3 * nbs, generator=g).view(3, nbs).contiguous()
    for b in range(3):
        slots = (table[b, :, None] * bs + torch.arange(bs)).flatten()
        codec.write(k, slots, _keys(nbs * bs, 10 + b).transpose(0, 1).contiguous())
        codec.write(v, slots, torch.randn(nbs * bs, Hkv, d, generator=g))
    q = torch.randn(3, Hq, d, generator=g)
    tail = torch.tensor([[P, P + 40], [0, 300], [P, P + 7]])
    for name, args in (("shadowkv", {"rank": 8, "chunk": 4, "budget": 0.2, "outliers": 0.05}),
                       ("squeezed", {"budget": 0.25, "clusters": 32, "iters": 4, "min_prefix": 64})):
        pol = KV_POLICIES.get(name)(**args)
        sels = []
        for b in (0, 2):
            kb = k[0][table[b]].flatten(0, 1)[:P].transpose(0, 1).contiguous()
            sels.append(pol.native_selection(pol.summary(0, kb, kb, torch.arange(P), rot), P, rot))
        rows = [sels[0], None, sels[1]]  # the middle row attends densely
        got, counters = native_sparse_select_decode(lib, q, k, v, 0, table, rows, tail, 0.125)
        idx, cnt, qmask, nbuf, want_counters = native_sparse_select(lib, q, rows, Hkv)
        factors = [r.factors if r is not None and r.factors else None for r in rows]
        want = native_sparse_decode(lib, q, k, v, 0, table, idx, cnt, tail, 0.125, qmask, None,
                                    nbuf if name == "shadowkv" else None, factors if name == "shadowkv" else None)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        assert torch.equal(counters, want_counters) and int(cnt[1].sum()) == 0 and int(cnt[0].min()) > 0


def test_bad_summaries_are_refused(lib, rot):
    from slimlm.kvcache.codec import KV_CODECS

    pol = KV_POLICIES.get("squeezed")(budget=0.25, clusters=8, iters=2, min_prefix=32)
    P = 64
    keys = _keys(P, 4)
    s = pol.summary(0, keys, keys, torch.arange(P), rot)
    q = torch.randn(1, Hq, d)
    bad = pol.native_selection((s[0], s[1].clone().fill_(8), s[2], None), P, rot)  # cluster 8 of 8
    with pytest.raises(ValueError, match="outside its prefix"):
        native_sparse_select(lib, q, [bad], Hkv)
    with pytest.raises(ValueError, match="summary tensor 1"):
        native_sparse_select(lib, q, [pol.native_selection((s[0], s[1][:, :10], s[2], None), P, rot)], Hkv)
    codec = KV_CODECS.get("float32")(torch.float32, d)
    k, v = codec.allocate(4, 8, Hkv, "cpu"), codec.allocate(4, 8, Hkv, "cpu")
    with pytest.raises(ValueError, match="outside its table"):  # P = 64 tokens, the table holds 32
        native_sparse_select_decode(lib, q, k, v, 0, torch.arange(4)[None], [pol.native_selection(s, P, rot)],
                                    torch.tensor([[64, 64]]), 1.0)
