"""Low-bit KV (``codec/lowbit.py``: "int3", "int4s"): packing, the clipped symmetric quantizer's
error bound, the bytes it claims, exact value offsets, and inside the engine the same tokens as a
dense, unbatched decoder whose keys and values pass through the same codec (with the engine's
offsets), under small chunks, prefix caching, preemption, a token policy and a cross-layer one,
the pool given back."""

from __future__ import annotations

import pytest
import torch

from slimlm import LLM, SamplingParams
from slimlm.kvcache.codec import KV_CODECS
from slimlm.kvcache.codec import lowbit as int3
from slimlm.model.attention import attention
from slimlm.model.hub import load
from tests.engine.test_engine import make_prompts
from tests.kvcache.test_codecs import ENGINE_SETTINGS, roundtrip


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_pack_round_trips_every_code(bits):
    g = torch.Generator().manual_seed(bits)
    c = torch.randint(0, 2**bits, (5, 3, 64), generator=g, dtype=torch.uint8)
    p = int3.pack(c, bits)
    assert p.shape == (5, 3, 64 * bits // 8) and p.dtype == torch.uint8
    assert torch.equal(int3.unpack(p, bits, 64), c.long())


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("search", [1, 6])
def test_quantizer_error_is_at_most_the_unclipped_half_step(bits, search):
    """Each group's squared error is at most n (s0 / 2)^2, s0 the smallest scale byte that covers
    max |x| (the unclipped candidate, always among those tried); clipping only ever lowers it."""
    torch.manual_seed(bits)
    g = torch.randn(300, 4, 16) * torch.rand(300, 4, 1) * 8
    g[0] = 0.0
    c, e = int3.quantize(g, bits, search)
    y = int3.dequantize(c, e, bits)
    half = (2**bits - 1) / 2
    s0 = torch.exp2(torch.ceil(16 * torch.log2(g.abs().amax(-1).clamp(min=1e-30) / half)).clamp(-int3.BIAS) / 16)
    err = (y - g).pow(2).sum(-1)
    assert (err <= 16 * (s0 / 2) ** 2 * (1 + 1e-5) + 1e-12).all()
    if search > 1:  # the MSE choice beats the unclipped one on average
        c1, e1 = int3.quantize(g, bits, 1)
        assert err.mean() < (int3.dequantize(c1, e1, bits) - g).pow(2).sum(-1).mean()


@pytest.mark.parametrize("name,want,rel_range", [("int3", {"k": 26, "v": 25}, (0.01, 0.06)),
                                                  ("int4s", {"k": 34, "v": 33}, (0.002, 0.015))])
@pytest.mark.parametrize("role", ["k", "v"])
def test_round_trip_bytes_and_rotation(name, want, rel_range, role):
    """int3: 51 bytes per token-head at head size 64 for K + V (24 code bytes + 2 or 1 scale
    bytes): 5.02x less than bf16's 256; int4s: 67. Rows come back in the model's space: error
    within the quantizer's bound in the rotated space, and of the same norm in the model's (the
    rotation is orthogonal)."""
    torch.manual_seed(1)
    codec = KV_CODECS.get(name)(torch.float32, 64, role)
    assert codec.rotates and codec.bytes_per_row(1) == want[role] and codec.native_code is None
    assert sum(t[0, 0].numel() * t.element_size() for t in codec.allocate(1, 1, 3, "cpu")) == 3 * want[role]
    assert (codec.wants_key_offsets, codec.wants_value_offsets) == (role == "k", False)
    x = torch.randn(37, 3, 64) * torch.rand(37, 3, 1) * 4
    y = roundtrip(codec, x)
    xr, yr = codec.to_storage(x), codec.to_storage(y)
    half, n = (2**codec.bits - 1) / 2, codec.group
    g = xr.view(37, 3, -1, n)
    s0 = torch.exp2(torch.ceil(16 * torch.log2(g.abs().amax(-1) / half)) / 16)
    assert ((yr - xr).view(37, 3, -1, n).pow(2).sum(-1) <= n * (s0 / 2) ** 2 * 1.0001).all()
    torch.testing.assert_close((y - x).norm(dim=-1), (yr - xr).norm(dim=-1), rtol=1e-4, atol=1e-5)
    rel = ((y - x).pow(2).sum() / x.pow(2).sum()).item()
    assert rel_range[0] < rel < rel_range[1]  # 3 bits: a few % of a row's energy; 4 bits: under 1 %


@pytest.mark.parametrize("vmu", [False, True])
def test_offsets_are_exact_shifts(vmu, monkeypatch):
    """A storage's offset mu is subtracted before quantizing and added back on read: rows
    x + mu come back as x's round trip + mu (the codec then spends its levels on x only); values
    take one only with ``OFFSETS`` naming them."""
    monkeypatch.setattr(int3, "OFFSETS", ("k", "v") if vmu else ("k",))
    torch.manual_seed(2)
    for role in ("k", "v"):
        codec = KV_CODECS.get("int3")(torch.float32, 64, role)
        assert codec.wants_value_offsets == (vmu and role == "v")
        x = torch.randn(20, 2, 64)
        mu = torch.randn(2, 64) * 30
        torch.testing.assert_close(roundtrip(codec, x + mu, offset=mu), roundtrip(codec, x) + mu,
                                   rtol=0, atol=1e-4)


def test_bad_layouts_are_refused(monkeypatch):
    monkeypatch.setattr(int3, "LAYOUTS", {**int3.LAYOUTS, "int3": ({"k": 5, "v": 3}, {"k": 32, "v": 64})})
    with pytest.raises(ValueError, match="2-4 bits"):
        int3.Int3Codec(torch.float32, 64, "k")
    monkeypatch.setattr(int3, "LAYOUTS", {**int3.LAYOUTS, "int3": ({"k": 3, "v": 3}, {"k": 12, "v": 64})})
    with pytest.raises(ValueError, match="groups of a multiple of 8"):
        int3.Int3Codec(torch.float32, 48, "k")


class LowBitDense:
    """Dense, unbatched reference: keys and values through the codec with the engine's offsets."""

    def __init__(self, lm, name):
        from slimlm.kvcache.codec.offsets import calibration_ids, kv_means

        d = lm.model.cfg.head_dim
        self.codecs = [KV_CODECS.get(name)(lm.model.dtype, d, r) for r in ("k", "v")]
        self.mu = kv_means(lm.model, calibration_ids(lm.tokenizer, lm.model.cfg.vocab_size))
        if not self.codecs[1].wants_value_offsets:
            self.mu = (self.mu[0], [None] * len(self.mu[1]))
        self.scale = lm.model.attn_scale

    def attend(self, layer, q, k, v, q_rows=None):
        rt = lambda c, x, mu: roundtrip(c, x[0].transpose(0, 1), offset=mu).transpose(0, 1)[None]  # noqa: E731
        T = k.shape[2]
        mask = torch.ones(T, T, dtype=torch.bool).tril()[None, None]
        return attention(q, rt(self.codecs[0], k, self.mu[0][layer]), rt(self.codecs[1], v, self.mu[1][layer]),
                         mask, self.scale)


def dense_greedy(lm, name, prompt, n):
    ref, ids = LowBitDense(lm, name), list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = lm.model(torch.tensor([ids]), torch.arange(len(ids))[None], ref)
            ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.fixture(scope="module")
def lm64(tmp_path_factory):
    """A tiny llama with head size 64 (one group a row, the served layout)."""
    from tests.conftest import make_hf_model

    path = tmp_path_factory.mktemp("tiny-d64")
    make_hf_model(path, "llama", hidden_size=128, num_attention_heads=2, num_key_value_heads=1)
    return load(path)


@pytest.mark.parametrize("name", ["int3", "int4s"])
@pytest.mark.parametrize("settings", ENGINE_SETTINGS)
def test_engine_equals_dense_reference(lm64, name, settings):
    prompts = make_prompts(5, seed=7)
    p = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    llm = LLM(lm64, kv_cache_dtype=name, **settings)
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, p, use_tqdm=False)]
    assert got == [dense_greedy(lm64, name, pr, 6) for pr in prompts]
    eng = llm.engine
    assert eng.pool.num_free() == eng.pool.num_blocks
    per_head = {"int3": 51, "int4s": 67}[name]
    assert eng.bytes_per_block == lm64.model.cfg.num_layers * settings["block_size"] * 1 * per_head


def test_engine_under_preemption_and_prefix_caching(lm64):
    """A pool too small for the batch preempts and recomputes; shared prefixes are reused; the
    tokens are those of an engine with room for everything, and every block comes back."""
    prompts = [p[:30] for p in make_prompts(5, seed=2)]
    p = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    roomy = LLM(lm64, kv_cache_dtype="int3", block_size=8, max_num_batched_tokens=64)
    want = [o.outputs[0].token_ids for o in roomy.generate(prompts, p, use_tqdm=False)]
    bpb = roomy.engine.bytes_per_block
    tight = LLM(lm64, kv_cache_dtype="int3", block_size=8, max_num_batched_tokens=64, kv_cache_bytes=9 * bpb)
    got = [o.outputs[0].token_ids for o in tight.generate(prompts, p, use_tqdm=False)]
    eng = tight.engine
    assert got == want
    assert eng.scheduler.num_preemptions > 0
    assert roomy.engine.stats["computed_prompt_tokens"] < roomy.engine.stats["prompt_tokens"]  # a prefix reused
    assert eng.pool.num_free() == eng.pool.num_blocks


@pytest.mark.parametrize("name", ["int3", "int4s"])
@pytest.mark.parametrize("policy,args", [("h2o", {"budget": 0.5, "min_tokens": 16}),
                                         ("minicache", {"start": 0})])
def test_composes_with_policies(lm64, name, policy, args):
    """int3 under a token policy (H2O's compaction moves its rows and scale bytes) and under
    MiniCache (merged storages and retention rows take their layers' offsets): runs, returns
    tokens, gives every block back."""
    prompts = [(q * 3)[:120] for q in make_prompts(3, seed=10)]
    llm = LLM(lm64, kv_cache_dtype=name, kv_policy=policy, kv_policy_args=args, block_size=8,
              max_num_batched_tokens=64)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 10 for o in outs)
    assert llm.engine.pool.num_free() == llm.engine.pool.num_blocks
    cache = llm.engine.cache
    assert all(cache.codec.offset(cache.k[st]) is not None for st in range(cache.spec.num_storages))
