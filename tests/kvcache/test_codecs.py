"""KV codecs: every registered codec round-trips within its stated error, stores the bytes it
claims, is read alike by the native decode kernel and the PyTorch path, and inside the engine
gives exactly what a dense, unbatched decoder with the same quantization gives."""

from __future__ import annotations

import shutil

import pytest
import torch

from slimlm import LLM, SamplingParams
from slimlm.errors import SlimLMError
from slimlm.kvcache.codec import KV_CODECS
from slimlm.model.attention import attention
from slimlm.model.hub import load
from tests.engine.test_engine import make_prompts
from tests.kvcache.int4_groups import INT4_VARIANTS, use_codec


def roundtrip(codec, x: torch.Tensor, block_size: int = 8, offset: torch.Tensor | None = None) -> torch.Tensor:
    """x (T, H, d) through the codec's storage (with the key offset (H, d) where given) and back."""
    T, H, d = x.shape
    nb = -(-T // block_size)
    parts = codec.allocate(nb, block_size, H, "cpu")
    if offset is not None:
        codec.set_offset(parts, offset)
    codec.write(parts, torch.arange(T), x)
    return codec.read(parts, torch.arange(nb)).reshape(-1, H, d)[:T]


@pytest.mark.parametrize("name", KV_CODECS.names() + INT4_VARIANTS)
@pytest.mark.parametrize("role", ["k", "v"])
def test_round_trip_error_and_bytes(name, role, monkeypatch):
    torch.manual_seed(0)
    name, variant = use_codec(name, monkeypatch), name
    codec = KV_CODECS.get(name)(torch.float32, 64, role)
    x = torch.randn(37, 3, 64) * torch.rand(37, 3, 1) * 4  # rows of different scales
    y = roundtrip(codec, x)
    err = (y - x).abs()
    if name in ("auto", "float32"):
        assert torch.equal(y, x) and codec.lossless
    elif name in ("bfloat16", "float16"):
        assert err.max() <= x.abs().max() * 2**-7
    elif name == "int8":  # half a step of max|row| / 127, plus fp16 rounding of the scale
        bound = x.abs().amax(-1, keepdim=True) / 127 * (0.5 + 64 * 2**-11)
        assert (err <= bound + 1e-6).all()
    elif name == "int4":  # half a step of (max - min) / 15 per group, plus fp16 rounding,
        # in the stored (rotated keys) space; the rotation is orthogonal, so row errors keep their norm
        assert codec.rotates == (role == "k")
        gs = {"k": 16, "v": 32}[role] if variant == "int4" else int(variant[6:8] if role == "k" else variant[-2:])
        assert codec.group == gs
        xr, yr = codec.to_storage(x), codec.to_storage(y)
        g = xr.view(37, 3, 64 // gs, gs)
        step = (g.amax(-1, keepdim=True) - g.amin(-1, keepdim=True)) / 15
        bound = (step * 0.5 + (g.abs().amax(-1, keepdim=True) + step * 15) * 2**-10).expand_as(g).reshape(37, 3, 64)
        assert ((yr - xr).abs() <= bound + 1e-5).all()
        torch.testing.assert_close(err.norm(dim=-1), (yr - xr).norm(dim=-1), rtol=1e-4, atol=1e-5)
    elif name in ("int3", "int4s"):  # the error bounds are in tests/kvcache/test_lowbit.py
        assert err.norm() < 0.3 * x.norm()
    want = {"auto": 256, "float32": 256, "bfloat16": 128, "float16": 128, "int8": 66,
            "int3": {"k": 26, "v": 25}[role], "int4s": {"k": 34, "v": 33}[role]}.get(name)
    if name == "int4":  # 32 code bytes + an fp16 scale and minimum per group
        want = 32 + 4 * 64 // codec.group
    assert codec.bytes_per_row(1) == want
    assert sum(t[0, 0].numel() * t.element_size() for t in codec.allocate(1, 1, 3, "cpu")) == 3 * want


def test_int4_groups_name_the_native_layout(monkeypatch):
    """Keys and values of one int4 cache carry one kv code (kernels/kv_pool.h) naming both groups."""
    from slimlm.kvcache.codec import int4

    for (kg, vg), code in {(32, 32): 3, (16, 32): 4, (32, 16): 5, (16, 16): 6}.items():
        monkeypatch.setattr(int4, "GROUPS", {"k": kg, "v": vg})
        k, v = int4.Int4Codec(torch.float32, 64, "k"), int4.Int4Codec(torch.float32, 64, "v")
        assert (k.group, v.group, k.native_code, v.native_code) == (kg, vg, code, code)
        assert (k.pool_code, v.pool_code) == (3 if kg == 32 else 6, 3 if vg == 32 else 6)
    monkeypatch.setattr(int4, "GROUPS", {"k": 16, "v": 32})
    assert int4.Int4Codec(torch.float32, 48, "v").group == 16  # not a multiple of 32: groups of 16
    monkeypatch.setattr(int4, "GROUPS", {"k": 8, "v": 32})
    with pytest.raises(ValueError, match="groups of 16 or 32"):
        int4.Int4Codec(torch.float32, 64, "k")


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler")
@pytest.mark.parametrize("name", ["int8", "int4", "bfloat16"] + INT4_VARIANTS)
@pytest.mark.parametrize("heads", [(2, 6), (1, 9)])  # 9 query heads of one KV head: served 4 + 4 + 1
@pytest.mark.parametrize("d", [64, 32])
@pytest.mark.parametrize("bs", [8, 5])  # 5: blocks that end inside a group of 4 scored keys
def test_native_decode_reads_quantized_pools(name, heads, d, bs, monkeypatch):
    """Every kv code's own kernel instance (kernels/paged_decode.c: int4's group sizes are
    constants per code, d = 64 and any other head size apart) reads what the codec reads."""
    from slimlm import kernels
    from slimlm.kernels.ops import native_decode

    lib = kernels.load("paged_decode")
    torch.manual_seed(1)
    name = use_codec(name, monkeypatch)
    codec, vcodec = KV_CODECS.get(name)(torch.float32, d), KV_CODECS.get(name)(torch.float32, d, "v")
    (H, Hq), nb = heads, 6 * 8 // bs
    k, v = codec.allocate(nb, bs, H, "cpu"), vcodec.allocate(nb, bs, H, "cpu")
    xk, xv = torch.randn(nb * bs, H, d), torch.randn(nb * bs, H, d)
    xk[:, :, 1] += 6.0  # a large channel: groups of one row get different ranges
    codec.write(k, torch.arange(nb * bs), xk)
    vcodec.write(v, torch.arange(nb * bs), xv)
    table = torch.tensor([[4, 1, 3, 0], [5, 2, 0, 0]] if bs == 8 else [[4, 1, 3, 0, 7, 8], [5, 2, 6, 0, 0, 0]])
    lens = torch.tensor([29, 11])
    q = torch.randn(2, Hq, d)
    mass = torch.zeros(nb * bs, H)
    # a rotating codec's stored rows are x @ R: the caller rotates q in and the output out
    got = vcodec.from_storage(native_decode(lib, codec.to_storage(q).contiguous(), k, v, codec.native_code, table,
                                            lens, 0.125, mass))
    for b in range(2):
        kk = codec.read(k, table[b]).reshape(-1, H, d)[: lens[b]].transpose(0, 1)[None]
        vv = vcodec.read(v, table[b]).reshape(-1, H, d)[: lens[b]].transpose(0, 1)[None]
        want = attention(q[b][None, :, None], kk, vv, None, 0.125)[0, :, 0]
        torch.testing.assert_close(got[b], want, rtol=1e-4, atol=1e-4)
    # the mass of each sequence's keys: every query head's probabilities, summed per KV head
    assert torch.allclose(mass.sum(), torch.tensor(2.0 * Hq), atol=1e-4)
    last, filled = table[0, 28 // bs], 29 - 28 // bs * bs  # the block holding token 28, its tokens
    assert mass.view(nb, bs, H)[[1, 2]].sum() > 0 and mass.view(nb, bs, H)[last, filled:].sum() == 0
    assert mass.view(nb, bs, H)[last, :filled].sum() > 0


def test_native_decode_refuses_bad_inputs():
    from slimlm import kernels
    from slimlm.kernels.ops import native_decode

    lib = kernels.load("paged_decode")
    if lib is None:
        pytest.skip("no native kernel here")
    k = torch.zeros(4, 8, 1, 16)
    q = torch.zeros(1, 2, 16)
    with pytest.raises(ValueError, match="outside the pool"):
        native_decode(lib, q, [k], [k], 0, torch.tensor([[0, 9]]), torch.tensor([10]), 1.0)
    with pytest.raises(ValueError, match="capacity"):
        native_decode(lib, q, [k], [k], 0, torch.tensor([[0, 1]]), torch.tensor([17]), 1.0)
    with pytest.raises(ValueError, match="do not match dtype code"):
        native_decode(lib, q, [k], [k], 1, torch.tensor([[0, 1]]), torch.tensor([10]), 1.0)
    with pytest.raises(ValueError, match="contiguous"):
        native_decode(lib, q, [k.transpose(0, 1)], [k], 0, torch.tensor([[0, 1]]), torch.tensor([10]), 1.0)


class QuantDense:
    """Dense, unbatched reference: every key and value passes through the codec, then causal
    attention over all of them."""

    def __init__(self, codecs, scale, offsets=None):
        self.codecs, self.scale, self.offsets = codecs, scale, offsets  # keys', values'; keys' offset per layer

    def attend(self, layer, q, k, v, q_rows=None):
        rt = lambda c, x, mu=None: roundtrip(c, x[0].transpose(0, 1), offset=mu).transpose(0, 1)[None]  # noqa: E731
        T = k.shape[2]
        mask = torch.ones(T, T, dtype=torch.bool).tril()[None, None]
        mu = self.offsets[layer] if self.offsets is not None else None
        return attention(q, rt(self.codecs[0], k, mu), rt(self.codecs[1], v), mask, self.scale)


def engine_offsets(lm) -> list[torch.Tensor]:
    """The key offsets per layer the engine gives a codec that asks for them (codec/offsets.py)."""
    from slimlm.kvcache.codec.offsets import calibration_ids, key_means

    return key_means(lm.model, calibration_ids(lm.tokenizer, lm.model.cfg.vocab_size))


def dense_greedy(lm, codec_name, prompt, n):
    codecs = [KV_CODECS.get(codec_name)(lm.model.dtype, lm.model.cfg.head_dim, role) for role in ("k", "v")]
    offsets = engine_offsets(lm) if codecs[0].wants_key_offsets else None
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            pos = torch.arange(len(ids))[None]
            logits = lm.model(torch.tensor([ids]), pos, QuantDense(codecs, lm.model.attn_scale, offsets))
            ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]


ENGINE_SETTINGS = [dict(max_num_batched_tokens=16, block_size=8), dict(max_num_batched_tokens=64, block_size=16),
                   dict(max_num_batched_tokens=512, block_size=8, enable_prefix_caching=False),
                   dict(max_num_batched_tokens=64, block_size=8, native_kernels=False)]
"""Chunk sizes, block sizes, prefix caching off and the PyTorch path: the engine settings every codec is run under."""


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return load(tiny_llama_dir)


@pytest.mark.parametrize("name", ["int8", "int4"])
@pytest.mark.parametrize("settings", ENGINE_SETTINGS)
def test_quantized_engine_equals_dense_reference(tiny, name, settings):
    prompts = make_prompts(6, seed=7)
    p = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    llm = LLM(tiny, kv_cache_dtype=name, **settings)
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, p, use_tqdm=False)]
    want = [dense_greedy(tiny, name, pr, 8) for pr in prompts]
    assert got == want
    assert llm.engine.pool.num_free() == llm.engine.pool.num_blocks


@pytest.mark.parametrize("name", ["int8", "int4", "bfloat16", "int4-k32v32", "int4-k16v16"])
def test_quantized_engine_with_native_kernels_at_head_size_64(tmp_path, name, monkeypatch):
    """Head size 64: the native decode kernel reads the quantized pool in place and the native
    prefill kernel reads the decoded context; still exactly the dense reference."""
    from tests.conftest import make_hf_model

    name = use_codec(name, monkeypatch)
    make_hf_model(tmp_path, "llama", hidden_size=128, num_attention_heads=2, num_key_value_heads=1)
    lm = load(tmp_path)
    prompts = make_prompts(4, seed=8)
    p = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    llm = LLM(lm, kv_cache_dtype=name, block_size=8, max_num_batched_tokens=64)
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, p, use_tqdm=False)]
    assert got == [dense_greedy(lm, name, pr, 6) for pr in prompts]


@pytest.mark.parametrize("fp32", [True, False])
def test_int4_prefill_attends_in_float32_in_a_bf16_engine(tmp_path, fp32, monkeypatch):
    """bf16 model, int4 KV: the native prefill kernel gets the rotated query in float32 (no bf16
    rounding of it or of the decoded rows; ``int4.FP32_ATTENTION``); with the knob off, the query in bf16."""
    from slimlm import kernels
    from slimlm.engine import paged_attention
    from slimlm.kvcache.codec import int4
    from tests.conftest import make_hf_model

    if kernels.load("paged_prefill") is None:
        pytest.skip("no native prefill kernel here")
    monkeypatch.setattr(int4, "FP32_ATTENTION", fp32)
    make_hf_model(tmp_path, "llama", hidden_size=128, num_attention_heads=2, num_key_value_heads=1)
    lm = load(tmp_path, dtype=torch.bfloat16)
    calls = []

    def spy(lib, q, kp, vp, code, table, q_start, out, scale, mass=None):
        paged_attention_ex(lib, q, kp, vp, code, table, q_start, out, scale, mass)
        calls.append((q.dtype, out.dtype))

    paged_attention_ex = paged_attention.native_prefill_ex
    monkeypatch.setattr(paged_attention, "native_prefill_ex", spy)
    llm = LLM(lm, kv_cache_dtype="int4", block_size=8, max_num_batched_tokens=32)
    out = llm.generate([make_prompts(1, seed=3)[0][:90]], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True),
                       use_tqdm=False)
    if not calls:
        pytest.skip("the native prefill kernel does not read int4 pools in place on this CPU")
    assert len(out[0].outputs[0].token_ids) == 2
    want = torch.float32 if fp32 else torch.bfloat16
    assert all(c == (want, want) for c in calls), calls


def test_kv_bytes_follow_the_codec(tiny):
    c = tiny.model.cfg
    d, H, L = c.head_dim, c.num_kv_heads, c.num_layers
    assert d % 32  # keys and values both in groups of 16 here: see the d = 64 case below
    for name, per_head in [("auto", 4 * d), ("bfloat16", 2 * d), ("int8", d + 2), ("int4", d // 2 + 4 * d // 16)]:
        eng = LLM(tiny, kv_cache_dtype=name, block_size=8).engine
        assert eng.bytes_per_block == 2 * L * 8 * H * per_head, name


def test_int4_kv_bytes_count_keys_and_values_apart(tmp_path):
    """Head size 64: keys in groups of 16 (48 bytes a head), values in 32 (40 bytes)."""
    from tests.conftest import make_hf_model

    make_hf_model(tmp_path, "llama", hidden_size=128, num_attention_heads=2, num_key_value_heads=1)
    lm = load(tmp_path)
    c = lm.model.cfg
    eng = LLM(lm, kv_cache_dtype="int4", block_size=8).engine
    assert eng.bytes_per_block == c.num_layers * 8 * c.num_kv_heads * (48 + 40)
    cache = eng.runner.cache
    held = sum(t[0].numel() * t.element_size() for parts in (cache.k[0], cache.v[0]) for t in parts)
    assert held * c.num_layers == eng.bytes_per_block


def test_unknown_codec_lists_the_valid_ones(tiny):
    with pytest.raises(SlimLMError, match="known: auto, bfloat16, float16, float32, int3, int4, int4s, int8"):
        LLM(tiny, kv_cache_dtype="int2")


@pytest.mark.parametrize("name", ["int8", "int4", "int4-k32v16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_quantize_stores_the_same_bytes(name, dtype, monkeypatch):
    """The native quantizer (``slimlm_kv_quantize``) writes exactly the bytes of the codec's
    PyTorch code: ordinary rows, all-zero rows (a zero fp16 scale), constant groups, tiny and
    huge rows; keys rotated and values not."""
    import importlib

    from slimlm import kernels

    if kernels.load("paged_decode") is None:
        pytest.skip("no native kernels here: the codecs quantize with PyTorch")
    name = use_codec(name, monkeypatch)
    mod = importlib.import_module(f"slimlm.kvcache.codec.{name}")
    g = torch.Generator().manual_seed(5)
    T, H, d, nb, bs = 29, 3, 64, 8, 8
    x = torch.randn(T, H, d, generator=g) * torch.rand(T, H, 1, generator=g) * 5
    x[3], x[4, 1], x[5, 0, :32] = 0.0, 2.5, -1.0
    x[6] *= 1e-9
    x[7] *= 1e4
    slots = torch.randperm(nb * bs, generator=g)[:T]
    for role in ("k", "v"):
        codec = KV_CODECS.get(name)(dtype, d, role)
        want, got = codec.allocate(nb, bs, H, "cpu"), codec.allocate(nb, bs, H, "cpu")
        monkeypatch.setattr(mod, "NATIVE", False)
        codec.write(want, slots, x.to(dtype))
        monkeypatch.setattr(mod, "NATIVE", True)
        codec.write(got, slots, x.to(dtype))
        for a, b in zip(want, got):
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    with pytest.raises(ValueError, match="outside the pool"):
        codec.write(got, torch.full((T,), nb * bs), x.to(dtype))
