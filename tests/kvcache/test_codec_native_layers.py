"""int8 / int4 KV pools on the native decode layers (kernels/decode_layer.c): the layers' KV write
stores the codecs' bytes (keys minus the offsets, Hadamard-rotated by the same float operations as
``rotation.fwht``), and whole greedy runs equal the layer-by-layer path on the same quantized
cache (batched, prefix caching, preemption)."""

from __future__ import annotations

import ctypes
import shutil

import pytest
import torch

from slimlm import LLM, SamplingParams
from slimlm.kvcache.codec import KV_CODECS
from slimlm.kvcache.codec.rotation import fwht, hadamard
from slimlm.model.hub import load
from slimlm.model.quant.native_layers import _NPTR, ENV, unsupported
from tests.engine.test_engine import make_prompts
from tests.kvcache.int4_groups import use_codec

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                reason="no C compiler: the layer-by-layer path serves")


@pytest.mark.parametrize("d", [16, 32, 64])
def test_fwht_is_the_hadamard_rotation(d):
    x = torch.randn(7, 3, d)
    torch.testing.assert_close(fwht(x), x @ hadamard(d), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fwht(fwht(x)), x, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("d", [32, 64])
def test_native_fwht_equals_the_pytorch_ops(d, monkeypatch):
    from slimlm.kvcache.codec import rotation

    x = torch.randn(5, 3, d) * 7
    native = fwht(x)
    monkeypatch.setattr(rotation, "NATIVE", False)
    assert torch.equal(native, fwht(x))


def _store(lib, name, k, v, slots, mu=None):
    """(codec bytes, native bytes): the codecs' ``write`` and the layers' store on fresh pools."""
    M, H, d = k.shape
    kc, vc = (KV_CODECS.get(name)(torch.float32, d, role) for role in ("k", "v"))
    want_k, want_v = kc.allocate(4, 8, H, "cpu"), vc.allocate(4, 8, H, "cpu")
    got_k, got_v = kc.allocate(4, 8, H, "cpu"), vc.allocate(4, 8, H, "cpu")
    if mu is not None:
        for parts in (want_k, got_k):
            kc.set_offset(parts, mu)
    kc.write(want_k, slots, k)
    vc.write(want_v, slots, v)
    aux = lambda parts, j: parts[j].data_ptr() if len(parts) > j else None  # noqa: E731
    row = [None] * (_NPTR - 7) + [got_k[0].data_ptr(), got_v[0].data_ptr(), aux(got_k, 1), aux(got_k, 2),
                                   aux(got_v, 1), aux(got_v, 2), mu.data_ptr() if mu is not None else None]
    ptrs = (ctypes.c_void_p * _NPTR)(*row)
    rc = lib.slimlm_decode_layer_store(k.data_ptr(), v.data_ptr(), slots.data_ptr(), M, H, d, kc.native_code,
                                       int(kc.rotates), ptrs)
    assert rc == 0
    return want_k + want_v, got_k + got_v


@pytest.mark.parametrize("name,d", [("int8", 16), ("int8", 64), ("int4", 32), ("int4", 64), ("int4-k32v32", 64),
                                    ("int4-k32v16", 64), ("int4-k16v16", 32)])
def test_layer_store_writes_the_codecs_bytes(name, d, monkeypatch):
    from slimlm import kernels

    name = use_codec(name, monkeypatch)
    lib = kernels.load("decode_layer")
    if lib is None:
        pytest.skip("decode_layer kernel unavailable")
    g = torch.Generator().manual_seed(5)
    M, H = 12, 2
    k = torch.randn(M, H, d, generator=g) * torch.rand(M, H, 1, generator=g) * 4
    k[:, :, 3] += 9.0  # an offset channel, as real keys have
    k[0] = 0.0  # a zero row (zero scale)
    v = torch.randn(M, H, d, generator=g)
    v[1, :, :] = 0.5  # constant groups
    slots = torch.randperm(32, generator=g)[:M]
    mu = k[1:].mean(0).contiguous() if name == "int4" else None
    want, got = _store(lib, name, k, v, slots, mu)
    for a, b in zip(want, got):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.fixture(scope="module")
def d32_dir(tmp_path_factory):
    """Head size 32 (hidden 128, 4 query heads, 2 KV heads): the native int4 layouts (groups of 32 or 16)."""
    from tests.conftest import make_hf_model

    path = tmp_path_factory.mktemp("tiny-d32")
    make_hf_model(path, "llama", hidden_size=128, num_attention_heads=4, num_key_value_heads=2)
    return path


def _generate(llm, prompts, n=10):
    sp = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]


@pytest.mark.parametrize("name,weights", [("int8", None), ("int4", None), ("int4", "int4"), ("int4-k16v16", None),
                                          ("int4-k32v32", None)])
def test_quantized_kv_on_native_layers_equals_the_layer_path(name, weights, d32_dir, monkeypatch):
    monkeypatch.setenv("SLIMLM_QLINEAR", "fp32")
    name = use_codec(name, monkeypatch)
    kw = dict(kv_cache_dtype=name, block_size=8, max_num_batched_tokens=64)
    if weights:
        kw["weights"] = weights
    a = LLM(load(d32_dir), **kw)
    r = a.engine.runner
    assert r.native_layers is not None, unsupported(r.model, r.cache, r.paths, r.hooks, r.rope_ext)
    steps = []
    run = r.native_layers.run
    r.native_layers.run = lambda *x: steps.append(1) or run(*x)
    monkeypatch.setenv(ENV, "0")
    b = LLM(load(d32_dir), **kw)
    assert b.engine.runner.native_layers is None
    prompts = make_prompts(6, seed=1)
    assert _generate(a, prompts) == _generate(b, prompts)
    assert steps  # the decode steps took the native layers
    assert a.engine.stats["computed_prompt_tokens"] < sum(map(len, prompts))  # a shared prefix reused
    assert a.engine.pool.num_free() == a.engine.pool.num_blocks


def test_quantized_kv_on_native_layers_under_preemption(d32_dir, monkeypatch):
    lm = load(d32_dir)
    c = lm.model.cfg
    d = c.head_dim  # keys in groups of 16, values in 32
    bpb = c.num_layers * 8 * c.num_kv_heads * (d // 2 + 4 * d // 16 + d // 2 + 4 * d // 32)
    kw = dict(kv_cache_dtype="int4", block_size=8, max_num_batched_tokens=64, kv_cache_bytes=9 * bpb)
    a = LLM(lm, **kw)
    assert a.engine.runner.native_layers is not None
    monkeypatch.setenv(ENV, "0")
    b = LLM(load(d32_dir), **kw)
    prompts = [p[:30] for p in make_prompts(5, seed=2)]
    assert _generate(a, prompts) == _generate(b, prompts)
    assert a.engine.scheduler.num_preemptions > 0


def test_rotated_values_are_refused(d32_dir, monkeypatch):
    from slimlm.kvcache.codec import int4 as int4_mod

    monkeypatch.setattr(int4_mod, "ROTATE", ("k", "v"))
    r = LLM(load(d32_dir), kv_cache_dtype="int4").engine.runner
    assert r.native_layers is None
    assert "rotates values" in unsupported(r.model, r.cache, r.paths, r.hooks, r.rope_ext)
