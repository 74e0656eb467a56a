"""The native sparse decode kernel equals dense attention restricted to the same keys (per query
head masks, explicit key buffers, a dense tail), equals the full paged decode kernel when every
key is selected, for every pool format, and refuses indices outside a sequence's table."""

from __future__ import annotations

import shutil

import pytest
import torch

from slimlm import kernels
from slimlm.kernels.ops import native_decode, native_sparse_decode
from slimlm.kvcache.codec import KV_CODECS

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler")


@pytest.fixture(scope="module")
def lib():
    lib = kernels.load("sparse_decode")
    assert lib is not None  # a compiler is present, so the kernel must build
    return lib


def _pools(name, nb, bs, hkv, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    codec, vcodec = KV_CODECS.get(name)(torch.float32, d), KV_CODECS.get(name)(torch.float32, d, "v")
    k, v = codec.allocate(nb, bs, hkv, "cpu"), vcodec.allocate(nb, bs, hkv, "cpu")
    codec.write(k, torch.arange(nb * bs), torch.randn(nb * bs, hkv, d, generator=g))
    vcodec.write(v, torch.arange(nb * bs), torch.randn(nb * bs, hkv, d, generator=g))
    return codec, vcodec, k, v


def reference(q, kd, vd, idx, cnt, tail, qmask, kbuf, nbuf, scale):
    """kd, vd (B, S, Hkv, d): each sequence's decoded keys / values in logical order."""
    B, Hq, d = q.shape
    Hkv = kd.shape[2]
    G = Hq // Hkv
    out = torch.zeros(B, Hq, d)
    for b in range(B):
        for h in range(Hkv):
            n = int(cnt[b, h])
            toks = torch.cat([idx[b, h, :n].long(), torch.arange(int(tail[b, 0]), int(tail[b, 1]))])
            k = kd[b, toks, h].clone()
            if kbuf is not None:
                m = int(nbuf[b, h])
                k[:m] = kbuf[b, h, :m]
            for gq in range(G):
                s = (k @ q[b, h * G + gq]) * scale
                if qmask is not None:
                    s[:n] = s[:n].masked_fill(~qmask[b, h, gq, :n], float("-inf"))
                out[b, h * G + gq] = s.softmax(-1) @ vd[b, toks, h]
    return out


@pytest.mark.parametrize("name", ["float32", "bfloat16", "int8"])
def test_matches_masked_dense_attention(lib, name):
    torch.manual_seed(0)
    B, Hq, Hkv, d, bs, nbs = 2, 6, 2, 64, 8, 10
    codec, vcodec, k, v = _pools(name, B * nbs + 3, bs, Hkv, d)
    table = torch.randperm(B * nbs + 3)[: B * nbs].view(B, nbs).contiguous()
    kd = torch.stack([codec.read(k, table[b]).reshape(-1, Hkv, d) for b in range(B)]).float()
    vd = torch.stack([vcodec.read(v, table[b]).reshape(-1, Hkv, d) for b in range(B)]).float()
    N = 30
    idx = torch.stack([torch.stack([torch.randperm(60)[:N].sort().values for _ in range(Hkv)]) for _ in range(B)])
    idx = idx.to(torch.int32).contiguous()
    cnt = torch.tensor([[30, 17], [0, 25]])
    tail = torch.tensor([[60, 71], [60, 62]])
    qmask = torch.rand(B, Hkv, Hq // Hkv, N) < 0.6
    kbuf = torch.randn(B, Hkv, N, d)
    nbuf = torch.tensor([[10, 0], [0, 25]])
    q = torch.randn(B, Hq, d)
    for qm, kb in ((None, None), (qmask, None), (qmask, kbuf)):
        got = native_sparse_decode(lib, q, k, v, codec.native_code, table, idx, cnt, tail, 0.125, qm, kb,
                                   nbuf if kb is not None else None)
        want = reference(q, kd, vd, idx, cnt, tail, qm, kb, nbuf, 0.125)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["float32", "bfloat16", "int8", "int4"])
def test_everything_selected_equals_the_full_kernel(lib, name):
    torch.manual_seed(1)
    B, Hq, Hkv, d, bs, nbs = 2, 6, 2, 64, 8, 6
    codec, vcodec, k, v = _pools(name, B * nbs, bs, Hkv, d, seed=1)
    table = torch.arange(B * nbs).flip(0).view(B, nbs).contiguous()
    lens = torch.tensor([45, 13])
    q = torch.randn(B, Hq, d)
    qs = codec.to_storage(q).float().contiguous()  # a rotating codec's keys live in x @ R
    full = native_decode(kernels.load("paged_decode"), qs, k, v, codec.native_code, table, lens, 0.125)
    # the first 20 tokens (or all) as the selected list, the rest as the tail
    n = lens.clamp(max=20)
    idx = torch.arange(20, dtype=torch.int32).expand(B, Hkv, 20).contiguous()
    cnt = n[:, None].expand(B, Hkv).contiguous()
    tail = torch.stack([n, lens], 1).contiguous()
    got = native_sparse_decode(lib, qs, k, v, codec.native_code, table, idx, cnt, tail, 0.125)
    torch.testing.assert_close(vcodec.from_storage(got), vcodec.from_storage(full), rtol=1e-5, atol=1e-5)


def test_bad_indices_are_refused(lib):
    codec, vcodec, k, v = _pools("float32", 4, 8, 1, 32)
    table = torch.tensor([[0, 1]])
    q = torch.randn(1, 2, 32)
    idx = torch.tensor([[[3, 16]]], dtype=torch.int32)  # 16 is past the table's 2 blocks of 8
    with pytest.raises(ValueError, match="outside its block table"):
        native_sparse_decode(lib, q, k, v, 0, table, idx, torch.tensor([[2]]), torch.tensor([[0, 0]]), 1.0)
    with pytest.raises(ValueError, match="tail"):
        native_sparse_decode(lib, q, k, v, 0, table, idx[..., :1], torch.tensor([[1]]), torch.tensor([[0, 17]]), 1.0)


@pytest.mark.parametrize("name", ["float32", "int8"])
def test_keys_rebuilt_from_factors_equal_an_explicit_key_buffer(lib, name):
    """ShadowKV's keys rebuilt inside the kernel (RoPE_t(A[t] B)) equal the same keys passed in."""
    from slimlm.model.rope import apply_rope, rotation

    torch.manual_seed(2)
    B, Hq, Hkv, d, bs, nbs, P, r = 2, 6, 2, 64, 8, 10, 64, 8
    codec, vcodec, k, v = _pools(name, B * nbs, bs, Hkv, d, seed=2)
    table = torch.arange(B * nbs).view(B, nbs).contiguous()
    A, Bm = torch.randn(Hkv, P, r), torch.randn(Hkv, r, d) / 4
    cos, sin = rotation(1.0 / 10000 ** (torch.arange(0, d, 2).float() / d), torch.arange(P)[None], torch.float32)
    cos, sin = cos[0].contiguous(), sin[0].contiguous()
    N = 20
    idx = torch.stack([torch.stack([torch.randperm(P)[:N] for _ in range(Hkv)]) for _ in range(B)]).to(torch.int32)
    cnt, nbuf = torch.tensor([[20, 12], [16, 20]]), torch.tensor([[8, 12], [0, 5]])
    tail = torch.tensor([[70, 75], [64, 80]])
    rows = idx.long()
    kbuf = apply_rope((A[torch.arange(Hkv)[:, None], rows] @ Bm)[:, :, None].flatten(0, 1), cos[rows].flatten(0, 1),
                      sin[rows].flatten(0, 1))[:, 0].view(B, Hkv, N, d).contiguous()
    q = torch.randn(B, Hq, d)
    want = native_sparse_decode(lib, q, k, v, codec.native_code, table, idx, cnt, tail, 0.125, None, kbuf, nbuf)
    got = native_sparse_decode(lib, q, k, v, codec.native_code, table, idx, cnt, tail, 0.125, None, None, nbuf,
                               factors=[(A, Bm, cos, sin), (A, Bm, cos, sin)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["float32", "int8"])
def test_a_key_table_reads_keys_from_their_own_blocks(lib, name):
    """ShadowKV's second tier: keys in a separate pool with their own block ids (``ktable``) give
    the result of keys stored with the values; a read from a block without keys is refused."""
    B, Hq, Hkv, d, bs, nbs = 2, 4, 2, 64, 8, 3
    codec, vcodec, k, v = _pools(name, B * nbs, bs, Hkv, d, seed=3)
    table = torch.arange(B * nbs).view(B, nbs).contiguous()
    perm = torch.randperm(B * nbs, generator=torch.Generator().manual_seed(0))
    k2 = [torch.empty_like(t) for t in k]
    for t, t2 in zip(k, k2):
        t2[perm] = t  # block b's keys at key block perm[b]
    q = codec.to_storage(torch.randn(B, Hq, d)).float().contiguous()
    idx = torch.tensor([0, 3, 9, 17], dtype=torch.int32).expand(B, Hkv, 4).contiguous()
    cnt = torch.full((B, Hkv), 4, dtype=torch.int64)
    tail = torch.tensor([[18, 24], [20, 22]])
    want = native_sparse_decode(lib, q, k, v, codec.native_code, table, idx, cnt, tail, 0.125)
    got = native_sparse_decode(lib, q, k2, v, codec.native_code, table, idx, cnt, tail, 0.125, ktable=perm[table])
    torch.testing.assert_close(got, want)
    gone = perm[table].clone()
    gone[0, 1] = -1  # block 1 of sequence 0 holds no keys (token 9 is read from it)
    with pytest.raises(ValueError, match="no block in the key pool"):
        native_sparse_decode(lib, q, k2, v, codec.native_code, table, idx, cnt, tail, 0.125, ktable=gone)
