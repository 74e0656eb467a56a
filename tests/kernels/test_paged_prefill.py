"""The native prefill kernel equals causal dense attention over the same keys (float32 to 1e-5;
bfloat16 up to the rounding of its output) for chunks with and without earlier context, every
tail shape, head sizes 64/128/256 and scattered blocks. Inside the engine it is used: float32
greedy outputs stay identical to transformers, and bfloat16 loses no quality against the
PyTorch bf16 path (both measured against float32)."""

from __future__ import annotations

import shutil

import pytest
import torch

from slimlm import LLM, SamplingParams, kernels
from slimlm.engine import paged_attention
from slimlm.kernels.ops import native_prefill
from slimlm.model.attention import attention

HAS_CC = shutil.which("cc") is not None or shutil.which("gcc") is not None


DTYPES = {torch.float32: 0, torch.bfloat16: 1}


@pytest.fixture(scope="module")
def lib():
    if not HAS_CC:
        pytest.skip("no C compiler: the engine uses the PyTorch path")
    lib = kernels.load("paged_prefill")
    assert lib is not None  # a compiler is present, so the kernel must build
    return lib


def need(lib, dtype):
    if not lib.slimlm_prefill_supported(64, DTYPES[dtype]):
        pytest.skip(f"this CPU lacks the AVX-512 features for {dtype}: the engine uses the PyTorch prefill path")


def close_enough(got, want, dtype):
    """float32: 1e-5; bf16: output rounding (2^-9 relative) plus bf16 probabilities, as flash kernels use."""
    err = (got.float() - want).abs()
    if dtype == torch.float32:
        return bool((err <= 1e-5 * (1 + want.abs())).all())
    return bool((err <= want.abs() * 2**-7 + 2e-3).all())


def make_case(T, q_start, hq, hkv, d, block_size, seed, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    n = q_start + T
    nb = -(-n // block_size)
    n_blocks = nb + 9
    k_pool = torch.randn(n_blocks, block_size, hkv, d, generator=g).to(dtype)
    v_pool = torch.randn(n_blocks, block_size, hkv, d, generator=g).to(dtype)
    table = torch.randperm(n_blocks, generator=g)[:nb].contiguous()
    q = (2 * torch.randn(hq, T, d, generator=g)).to(dtype)  # head-major, as the model makes it
    return q.transpose(0, 1), k_pool, v_pool, table  # q rows: a (T, Hq, d) strided view


def reference(q_rows, k_pool, v_pool, table, q_start, scale):
    """float32 causal attention over the gathered keys (the PyTorch path, without rounding)."""
    T, _, d = q_rows.shape
    n, hkv = q_start + T, k_pool.shape[2]
    k = k_pool[table].reshape(-1, hkv, d)[:n].float().transpose(0, 1)[None]
    v = v_pool[table].reshape(-1, hkv, d)[:n].float().transpose(0, 1)[None]
    mask = torch.arange(n)[None, :] <= torch.arange(q_start, n)[:, None]
    return attention(q_rows.float().transpose(0, 1)[None], k, v, mask[None, None], scale)[0].transpose(0, 1)


@pytest.mark.parametrize("T,q_start", [(1, 0), (2, 0), (5, 0), (6, 0), (7, 3), (13, 64), (100, 0), (128, 17),
                                       (65, 511), (300, 7000)])
@pytest.mark.parametrize("block_size", [8, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_causal_dense_attention(lib, T, q_start, block_size, dtype):
    need(lib, dtype)
    q, k_pool, v_pool, table = make_case(T, q_start, 9, 3, 64, block_size, seed=T * 31 + q_start, dtype=dtype)
    out = torch.full((T, 9, 64), float("nan"), dtype=dtype)
    native_prefill(lib, q, k_pool, v_pool, table, q_start, out, 0.125)
    assert close_enough(out, reference(q, k_pool, v_pool, table, q_start, 0.125), dtype)


@pytest.mark.parametrize("d,hq,hkv", [(128, 4, 2), (256, 2, 1), (64, 4, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_other_head_sizes_and_strided_output(lib, d, hq, hkv, dtype):
    need(lib, dtype)
    T, q_start = 37, 20
    q, k_pool, v_pool, table = make_case(T, q_start, hq, hkv, d, 8, seed=d, dtype=dtype)
    big = torch.zeros(T + 5, hq, d, dtype=dtype)
    native_prefill(lib, q, k_pool, v_pool, table, q_start, big[3 : 3 + T], d**-0.5)
    assert close_enough(big[3 : 3 + T], reference(q, k_pool, v_pool, table, q_start, d**-0.5), dtype)
    assert big[:3].abs().sum() == 0 and big[3 + T :].abs().sum() == 0  # nothing written outside the rows


def test_unsupported_inputs_are_refused(lib):
    need(lib, torch.float32)
    assert lib.slimlm_prefill_supported(64, 0) and lib.slimlm_prefill_supported(128, 0)
    assert not lib.slimlm_prefill_supported(20, 0) and not lib.slimlm_prefill_supported(32, 0)
    assert not lib.slimlm_prefill_supported(64, 7)
    q, k_pool, v_pool, table = make_case(4, 0, 2, 1, 32, 8, seed=0, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="paged_prefill kernel failed"):
        native_prefill(lib, q, k_pool, v_pool, table, 0, torch.empty(4, 2, 32), 1.0)
    q, k_pool, v_pool, table = make_case(4, 0, 2, 1, 64, 8, seed=0, dtype=torch.float32)
    with pytest.raises(ValueError, match="one dtype"):
        native_prefill(lib, q, k_pool, v_pool, table, 0, torch.empty(4, 2, 64, dtype=torch.bfloat16), 1.0)
    with pytest.raises(ValueError, match="cover every key"):  # 4 queries after 9 keys need 2 blocks of 8
        native_prefill(lib, q, k_pool, v_pool, table[:1], 9, torch.empty(4, 2, 64), 1.0)


def d64_model(path):
    from tests.conftest import make_hf_model

    return make_hf_model(path, "llama", hidden_size=128, num_attention_heads=2, num_key_value_heads=1)  # d = 64


def counting(monkeypatch) -> list:
    calls: list = []
    real = paged_attention.native_prefill
    monkeypatch.setattr(paged_attention, "native_prefill", lambda *a: calls.append(1) or real(*a))
    return calls


def mixed_prompts(seed=0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    shared = torch.randint(3, 380, (70,), generator=g).tolist()
    prompts = [shared + torch.randint(3, 380, (int(n),), generator=g).tolist() for n in (5, 40, 90, 150)]
    return prompts + [torch.randint(3, 380, (int(n),), generator=g).tolist() for n in (2, 60, 200)]


def test_engine_float32_greedy_identical_to_transformers(lib, tmp_path, monkeypatch):
    need(lib, torch.float32)
    from slimlm.model.hub import load

    ref = d64_model(tmp_path)
    calls = counting(monkeypatch)
    prompts = mixed_prompts()
    llm = LLM(load(tmp_path), max_num_batched_tokens=64, block_size=8)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)
    assert calls  # the kernel served the prefill chunks
    for o, p in zip(outs, prompts):
        ids = torch.tensor([p])
        want = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                            eos_token_id=2, pad_token_id=0)[0, len(p):].tolist()
        assert o.outputs[0].token_ids == want


def test_engine_bf16_loses_no_quality(lib, tmp_path, monkeypatch):
    """Prompt log-probabilities through chunked prefill with shared prefixes: the native bf16
    path is as close to float32 as the PyTorch bf16 path is."""
    need(lib, torch.bfloat16)
    from slimlm.model.hub import load

    d64_model(tmp_path)
    calls = counting(monkeypatch)
    prompts = mixed_prompts()
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=0)

    def prompt_logprobs(dtype, **kw):
        llm = LLM(load(tmp_path, dtype=dtype), max_num_batched_tokens=64, block_size=8, **kw)
        outs = llm.generate(prompts, params, use_tqdm=False)
        return torch.tensor([lp[t] for o, p in zip(outs, prompts) for lp, t in zip(o.prompt_logprobs[1:], p[1:])])

    exact = prompt_logprobs("float32", native_kernels=False)
    pytorch_bf16 = prompt_logprobs("bfloat16", native_kernels=False)
    assert not calls
    native_bf16 = prompt_logprobs("bfloat16")
    assert calls  # the kernel served the prefill chunks
    err_native, err_pytorch = (native_bf16 - exact).abs().mean(), (pytorch_bf16 - exact).abs().mean()
    print(f"mean |logprob - fp32|: native bf16 {err_native:.5f}, PyTorch bf16 {err_pytorch:.5f}")
    assert err_native <= 1.25 * err_pytorch + 1e-3, (err_native, err_pytorch)


@pytest.mark.parametrize("codec_name", ["int8", "int4", "float32", "bfloat16", "int4-k32v32", "int4-k32v16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 128])  # kv_pool.h's int4 row decode: d = 64 and other sizes are apart
def test_reads_every_pool_format_in_place_and_adds_mass(lib, codec_name, dtype, d, monkeypatch):
    """``native_prefill_ex``: int8 / int4 / other-format float pools decoded while repacking
    (a rotating codec's query rotated in), and each key's attention mass added to its slot,
    both as explicit attention over the codec's decoded rows computes them."""
    from slimlm.kernels.ops import native_prefill_ex
    from slimlm.kvcache.codec import KV_CODECS

    from tests.kvcache.int4_groups import use_codec

    need(lib, dtype)
    codec_name = use_codec(codec_name, monkeypatch)  # int4's default: keys in groups of 16, values in 32
    g = torch.Generator().manual_seed(3)
    hq, hkv, bs, nb, T, q_start = 4, 2, 8, 12, 21, 13
    n, G = q_start + T, hq // hkv
    kc, vc = KV_CODECS.get(codec_name)(dtype, d, "k"), KV_CODECS.get(codec_name)(dtype, d, "v")
    kp, vp = kc.allocate(nb, bs, hkv, "cpu"), vc.allocate(nb, bs, hkv, "cpu")
    table = torch.randperm(nb, generator=g)[: -(-n // bs)]
    slots = table[torch.arange(n) // bs] * bs + torch.arange(n) % bs
    kc.write(kp, slots, torch.randn(n, hkv, d, generator=g).to(dtype))
    vc.write(vp, slots, torch.randn(n, hkv, d, generator=g).to(dtype))
    k = kc.read(kp, table).flatten(0, 1)[:n].float()  # (n, Hkv, d), the model's space
    v = vc.read(vp, table).flatten(0, 1)[:n].float()
    q = torch.randn(T, hq, d, generator=g).to(dtype)
    s = torch.einsum("thd,shd->hts", q.float(), k.repeat_interleave(G, 1)) * 0.125
    causal = torch.arange(n)[None] <= torch.arange(q_start, n)[:, None]
    p = s.masked_fill(~causal, float("-inf")).softmax(-1)  # (Hq, T, n)
    want = torch.einsum("hts,shd->thd", p, v.repeat_interleave(G, 1))
    out, mass = torch.empty_like(q), torch.zeros(nb * bs, hkv)
    native_prefill_ex(lib, kc.to_storage(q).to(dtype), kp, vp, kc.native_code, table, q_start, out, 0.125, mass)
    assert close_enough(vc.from_storage(out), want, dtype) if dtype == torch.float32 else \
        (out.float() - want).abs().max() < 2e-2
    tol = 1e-5 if dtype == torch.float32 and not kc.rotates else 1e-2
    torch.testing.assert_close(mass[slots], p.view(hkv, G, T, n).sum((1, 2)).T, rtol=tol, atol=tol)
    assert mass.sum().item() == pytest.approx(hkv * G * T, rel=1e-5)  # every query's probabilities, once
    with pytest.raises(ValueError, match="mass"):
        native_prefill_ex(lib, q, kp, vp, kc.native_code, table, q_start, out, 0.125, torch.zeros(3))
