"""int4 keys' static offsets (codec/offsets.py): the round trip gains from them, attention is
exactly unchanged by them (the fold: a constant score per query), the native decode kernel
reading the shifted pool equals the PyTorch path reading the keys back, and the engine gives
offsets to int4 keys only."""

from __future__ import annotations

import pytest
import torch

from slimlm import LLM
from slimlm.kvcache.codec import KV_CODECS
from slimlm.kvcache.codec.offsets import calibration_ids, key_means
from slimlm.model.attention import attention
from slimlm.model.hub import load
from tests.kvcache.test_codecs import roundtrip


def offset_keys(T=256, H=2, d=64, seed=3):
    """Keys with a large offset on a few channels (as real keys have), and that offset."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.zeros(H, d)
    mu[:, [5, 37, 20, 52]] = torch.tensor([12.0, -9.0, 7.0, 6.0])
    return torch.randn(T, H, d, generator=g) + mu, mu


def test_offset_round_trip_error_bound():
    x, mu = offset_keys()
    codec = KV_CODECS.get("int4")(torch.float32, 64)
    assert codec.wants_key_offsets and not KV_CODECS.get("int4")(torch.float32, 64, "v").wants_key_offsets
    y = roundtrip(codec, x, offset=mu)
    # each element within half a step of its group's range (the shifted, rotated row) + fp16 rounding
    shifted = codec.to_storage(x - mu).view(256, 2, 2, 32)
    step = (shifted.amax(-1) - shifted.amin(-1)) / 15  # (T, H, G)
    err = codec.to_storage(y - mu) - codec.to_storage(x - mu)
    assert (err.view(256, 2, 2, 32).abs() <= step[..., None] / 2 * 1.01 + 1e-2).all()
    e_off = (y - x).norm() / x.norm()
    e_none = (roundtrip(codec, x) - x).norm() / x.norm()
    assert e_off < 0.6 * e_none


def test_the_fold_leaves_attention_unchanged():
    """What the native readers compute (the rotated query against the stored keys, k - mu)
    equals attention over the keys read back (mu added): softmax ignores q . mu."""
    x, mu = offset_keys(T=40, H=1)
    codec = KV_CODECS.get("int4")(torch.float32, 64)
    parts = codec.allocate(5, 8, 1, "cpu")
    codec.set_offset(parts, mu)
    codec.write(parts, torch.arange(40), x)
    k = codec.read(parts, torch.arange(5)).view(40, 1, 64)  # the model's space
    stored = codec.keys_to_storage(k.transpose(0, 1), parts)  # (1, 40, d): (k - mu) @ R
    q, v = torch.randn(1, 3, 5, 64), torch.randn(1, 1, 40, 64)
    want = attention(q, k.transpose(0, 1)[None], v, None, 0.125)
    got = attention(codec.to_storage(q), stored[None], v, None, 0.125)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    scores = q @ k.transpose(0, 1)[None].transpose(-1, -2)
    assert (scores - codec.to_storage(q) @ stored[None].transpose(-1, -2)).std() > 1.0  # shifted, not equal


@pytest.mark.parametrize("heads", [(2, 6), (1, 9)])
def test_native_decode_reads_shifted_pools(heads):
    from slimlm import kernels
    from slimlm.kernels.ops import native_decode

    lib = kernels.load("paged_decode")
    if lib is None:
        pytest.skip("no native kernel here")
    (H, Hq), bs, nb = heads, 8, 6
    x, mu = offset_keys(T=nb * bs, H=H)
    codec, vcodec = KV_CODECS.get("int4")(torch.float32, 64), KV_CODECS.get("int4")(torch.float32, 64, "v")
    k, v = codec.allocate(nb, bs, H, "cpu"), vcodec.allocate(nb, bs, H, "cpu")
    codec.set_offset(k, mu)
    codec.write(k, torch.arange(nb * bs), x)
    vcodec.write(v, torch.arange(nb * bs), torch.randn(nb * bs, H, 64))
    table, lens = torch.tensor([[4, 1, 3, 0], [5, 2, 0, 0]]), torch.tensor([29, 11])
    q = torch.randn(2, Hq, 64)
    got = native_decode(lib, codec.to_storage(q).contiguous(), k, v, codec.native_code, table, lens, 0.125)
    for b in range(2):
        kk = codec.read(k, table[b]).reshape(-1, H, 64)[: lens[b]].transpose(0, 1)[None]
        vv = vcodec.read(v, table[b]).reshape(-1, H, 64)[: lens[b]].transpose(0, 1)[None]
        torch.testing.assert_close(got[b], attention(q[b][None, :, None], kk, vv, None, 0.125)[0, :, 0],
                                   rtol=1e-4, atol=1e-4)


def test_engine_gives_offsets_to_int4_keys_only(tiny_llama_dir):
    lm = load(tiny_llama_dir)
    mus = key_means(lm.model, calibration_ids(lm.tokenizer, lm.model.cfg.vocab_size))
    assert len(mus) == lm.model.cfg.num_layers
    cache = LLM(lm, kv_cache_dtype="int4", block_size=8).engine.cache
    for st, parts in enumerate(cache.k):
        torch.testing.assert_close(cache.codec.offset(parts), mus[st])
    assert cache.vcodec.offset(cache.v[0]) is None
    assert not any(KV_CODECS.get(n)(torch.float32, 64).wants_key_offsets for n in ("int8", "auto", "bfloat16"))


def test_sparse_decode_mixes_own_keys_with_shifted_pools():
    """ShadowKV's path: keys the policy passes itself (model space, through ``keys_to_storage``)
    and keys read from the shifted int4 pool in one softmax equal dense attention over the
    model's keys (the same offset on both, so the constant per query cancels)."""
    from slimlm import kernels
    from slimlm.kernels.ops import native_sparse_decode
    from tests.kernels.test_sparse_decode import reference

    lib = kernels.load("sparse_decode")
    if lib is None:
        pytest.skip("no native kernel here")
    B, Hq, Hkv, d, bs, nbs, N = 2, 6, 2, 64, 8, 6, 12
    x, mu = offset_keys(T=B * nbs * bs, H=Hkv)
    codec, vcodec = KV_CODECS.get("int4")(torch.float32, d), KV_CODECS.get("int4")(torch.float32, d, "v")
    k, v = codec.allocate(B * nbs, bs, Hkv, "cpu"), vcodec.allocate(B * nbs, bs, Hkv, "cpu")
    codec.set_offset(k, mu)
    codec.write(k, torch.arange(B * nbs * bs), x)
    vcodec.write(v, torch.arange(B * nbs * bs), torch.randn(B * nbs * bs, Hkv, d))
    table = torch.arange(B * nbs).view(B, nbs).contiguous()
    kd = torch.stack([codec.read(k, table[b]).reshape(-1, Hkv, d) for b in range(B)]).float()
    vd = torch.stack([vcodec.read(v, table[b]).reshape(-1, Hkv, d) for b in range(B)]).float()
    idx = torch.stack([torch.stack([torch.randperm(30)[:N].sort().values for _ in range(Hkv)])
                       for _ in range(B)]).to(torch.int32).contiguous()
    cnt, nbuf = torch.tensor([[12, 9], [12, 12]]), torch.tensor([[5, 0], [12, 3]])
    tail = torch.tensor([[30, 41], [30, 48]])
    own = torch.randn(B, Hkv, N, d) + mu[None, :, None]  # the policy's keys, model space
    kbuf = torch.stack([codec.keys_to_storage(own[b], k) for b in range(B)]).contiguous()
    q = torch.randn(B, Hq, d)
    got = native_sparse_decode(lib, codec.to_storage(q).float().contiguous(), k, v, codec.native_code, table, idx,
                               cnt, tail, 0.125, None, kbuf, nbuf)
    torch.testing.assert_close(got, reference(q, kd, vd, idx, cnt, tail, None, own, nbuf, 0.125),
                               rtol=1e-4, atol=1e-4)
