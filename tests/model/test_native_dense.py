"""Dense float32 / bfloat16 weights through the native decode layers (kernels/dense_linear.c via
kernels/decode_layer.c) equal the layer-by-layer PyTorch path.

float32: greedy tokens identical and logits within 1e-4 (the paths differ in summation order),
batched, with prefix caching, captured hidden states and under preemption; also with the portable
kernels (an x86-64-v3 build, no AVX-512). bfloat16: the native path keeps activations in float32
between ops where PyTorch rounds every op's output to bfloat16, and its matmul either widens the
bf16 weights (``SLIMLM_QLINEAR=fp32``) or rounds x to bf16 for ``vdpbf16ps`` (the default where
built); so one decode step from the same state is compared, logits within 3 % relative L2
(measured on this tiny model: 0.7 % with either kernel,
PyTorch's bf16 step itself 0.8 % off the fp32 model); a bf16 model with int4 weights alike."""

from __future__ import annotations

import shutil

import pytest
import torch

from slimlm import LLM, SamplingParams
from slimlm.model.hub import load
from slimlm.model.quant.native_layers import ENV, unsupported
from tests.engine.test_engine import make_prompts
from slimlm.model.quant.native_head import ENV as HEAD_ENV
from slimlm.model.quant.native_head import NativeHead
from tests.model.test_native_layers import _compare, _record

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                reason="no C compiler: the layer-by-layer path serves")
BF16_REL = 0.03


def _pair(lm_fn, monkeypatch, **kw):
    """(native layers + native head, layer-by-layer + PyTorch head) engines on the same weights."""
    a = LLM(lm_fn(), **kw)
    monkeypatch.setenv(ENV, "0")
    monkeypatch.setenv(HEAD_ENV, "0")
    b = LLM(lm_fn(), **kw)
    monkeypatch.delenv(ENV)
    monkeypatch.delenv(HEAD_ENV)
    ra, rb = a.engine.runner, b.engine.runner
    assert ra.native_layers is not None and rb.native_layers is None
    assert isinstance(ra.head, NativeHead) == (kw.get("weights") is None) and not isinstance(rb.head, NativeHead)
    return a, b


def test_dense_fp32_equals_the_layer_path_batched_with_prefix_caching(tiny_llama_dir, monkeypatch):
    a, b = _pair(lambda: load(tiny_llama_dir), monkeypatch)
    prompts = make_prompts(6, seed=1)
    eng = _compare(a, b, prompts, capture={1})
    assert eng.stats["computed_prompt_tokens"] < sum(map(len, prompts))  # the shared prefix was reused


def test_dense_fp32_under_preemption(tiny_llama_dir, monkeypatch):
    c = load(tiny_llama_dir).model.cfg
    bpb = 2 * c.num_layers * 8 * c.num_kv_heads * c.head_dim * 4
    kw = dict(block_size=8, max_num_batched_tokens=64, kv_cache_bytes=9 * bpb)
    a, b = _pair(lambda: load(tiny_llama_dir), monkeypatch, **kw)
    eng = _compare(a, b, [p[:30] for p in make_prompts(5, seed=2)])  # 5 blocks each, 9 in the pool
    assert eng.scheduler.num_preemptions > 0


def _step_logits(llm, prompts):
    """Each sequence's logits at its first decode step (after the same prefill)."""
    seen = _record(llm)
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)
    return torch.cat([x.logits[s].float() for x in seen[1:2] for s in sorted(x.logits)])


@pytest.mark.parametrize("weights,kernel", [(None, "vnni"), (None, "fp32"), ("int4", "fp32")])
def test_bf16_model_near_the_layer_path(weights, kernel, tiny_llama_dir, monkeypatch):
    """Dense bf16 weights by vdpbf16ps ("vnni") or widened ("fp32"); a bf16 model with packed
    weights (``dtype="auto"`` on this CPU with ``weights="int4"``) takes the native layers too."""
    prompts = [[5, 9, 33, 71, 8], [100, 3, 17]]
    kw = {} if weights is None else {"weights": weights}
    a, b = _pair(lambda: load(tiny_llama_dir, "bfloat16"), monkeypatch, **kw)
    monkeypatch.setenv("SLIMLM_QLINEAR", kernel)
    assert a.engine.runner.native_layers is not None and a.engine.model.dtype == torch.bfloat16
    la, lb = _step_logits(a, prompts), _step_logits(b, prompts)
    ref = _step_logits(LLM(load(tiny_llama_dir, "float32"), **kw), prompts)
    rel = float((la - lb).norm() / lb.norm())
    assert rel < BF16_REL, rel
    # the native bf16 step is no further from the fp32 model than PyTorch's bf16 step is
    assert float((la - ref).norm()) <= 1.5 * float((lb - ref).norm())


def test_dense_on_a_cpu_without_avx512(tiny_llama_dir, monkeypatch):
    """The portable dense loops (an x86-64-v3 build): fp32 tokens and logits as the layer path."""
    import platform

    from slimlm import kernels
    from slimlm.kernels import ops

    if platform.machine() != "x86_64":
        pytest.skip("x86-64 only")
    monkeypatch.setenv(kernels.MARCH_ENV, "x86-64-v3")
    monkeypatch.setattr(kernels, "_loaded", {})
    monkeypatch.setattr(ops, "_LIBS", {})
    a, b = _pair(lambda: load(tiny_llama_dir), monkeypatch)
    _compare(a, b, [[5, 9, 33, 71], [100, 3]])
    assert not kernels.load("decode_layer").slimlm_dense_has_dpbf16()


def test_dense_selection(tiny_llama_dir, monkeypatch):
    def runner(dtype="float32", **kw):
        return LLM(load(tiny_llama_dir, dtype), **kw).engine.runner

    for dtype in ("float32", "bfloat16"):
        r = runner(dtype)
        assert r.native_layers is not None, unsupported(r.model, r.cache, r.paths, r.hooks, r.rope_ext)
    for kw, needle in [({"kv_cache_dtype": "float16"}, "decode attention"),
                       ({"hooks": ["ffn_skip"], "hook_args": {"ffn_skip": {"layers": [1]}}}, "hooks"),
                       ({"kv_policy": "sink"}, "decode attention")]:
        assert runner(**kw).native_layers is None
    r = runner()
    a = r.model.model.layers[1].self_attn
    a.o_proj = torch.nn.Sequential(a.o_proj)  # e.g. an adapter wrapping the projection
    assert "neither packed nor" in unsupported(r.model, r.cache, r.paths, r.hooks, r.rope_ext)
    monkeypatch.setenv(ENV, "0")
    assert runner().native_layers is None


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_native_head_equals_the_model_head(dtype, tiny_llama_dir):
    """Exact up to summation order: the normed rows are in the weight's dtype, so bf16 products
    are exact in fp32 either way; bf16 logits may differ by one rounding of the sum."""
    from slimlm.model.quant.native_head import native_head

    lm = load(tiny_llama_dir, dtype)
    m = lm.model
    head = native_head(m)
    assert head is not None
    h = torch.randn(3, m.cfg.hidden_size).to(m.dtype)
    got, want = head(h), m.head(h)
    assert got.dtype == want.dtype == m.dtype
    tol = dict(rtol=0, atol=1e-5) if dtype == "float32" else dict(rtol=2 ** -8, atol=1e-3)
    torch.testing.assert_close(got, want, **tol)
    many = torch.randn(65, m.cfg.hidden_size).to(m.dtype)  # more rows than the native limit: PyTorch's
    assert torch.equal(head(many), m.head(many))
    m.lm_head = torch.nn.Sequential(m.lm_head)  # a replaced head is used as it is
    m.head = lambda x: m.lm_head(m.model.norm(x))
    assert torch.equal(head(h), m.head(h))


@pytest.mark.parametrize("kind", [0, 1, 2])
def test_dense_linear_kernel_any_shape(kind):
    """``slimlm_dense_linear`` against a float64 matmul: K tails (below, at and past the 16 / 32 /
    64-wide steps), N not a multiple of the row block, several x rows (kind 2 rounds x to bf16);
    every x row's output bitwise the same as alone (rows after the first are summed in tiles of 3 x
    rows x 4 W rows, 1 or 2 x rows in the last tile, with a four-at-once final reduction)."""
    from slimlm import kernels

    lib = kernels.load("decode_layer")
    if kind == 2 and not lib.slimlm_dense_has_dpbf16():
        pytest.skip("no AVX512-BF16 build")
    g = torch.Generator().manual_seed(kind)
    for M, N, K in [(1, 1, 1), (1, 5, 15), (3, 7, 17), (1, 9, 33), (2, 6, 64), (1, 37, 100), (4, 13, 576),
                    (5, 8, 100), (6, 8, 70), (7, 12, 64), (8, 4, 129), (64, 20, 576)]:  # x-row tiles of 3: 1 / 2 left
        x = torch.randn(M, K, generator=g)
        w = torch.randn(N, K, generator=g).to(torch.float32 if kind == 0 else torch.bfloat16)
        y = torch.full((M, N), float("nan"))
        assert lib.slimlm_dense_linear(x.data_ptr(), w.data_ptr(), kind, y.data_ptr(), M, N, K, 2) == 0
        xr = x.bfloat16() if kind == 2 else x
        want = xr.double() @ w.double().T
        torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5 * K ** 0.5, msg=f"{M}x{N}x{K}")
        for m in range(M):  # batch invariance: each x row's y bitwise as alone (the first row streams W)
            alone = torch.empty(1, N)
            lib.slimlm_dense_linear(x[m].data_ptr(), w.data_ptr(), kind, alone.data_ptr(), 1, N, K, 1)
            assert torch.equal(alone[0], y[m]), (M, N, K, m)
        was = lib.slimlm_dense_prefetch(0)  # the one-row loop's software prefetch off: the same bits
        try:
            y0 = torch.full((M, N), float("nan"))
            assert lib.slimlm_dense_linear(x.data_ptr(), w.data_ptr(), kind, y0.data_ptr(), M, N, K, 2) == 0
        finally:
            lib.slimlm_dense_prefetch(was)
        assert was == 4096 and torch.equal(y0, y), (M, N, K)


def test_dense_linear_rounds_x_to_bf16_as_torch():
    """Kind 2 rounds x to bf16 (vectorized, 16 at a time, then a scalar tail) exactly as
    ``.bfloat16()``: ties to even, up and down, both signs; read back through an identity W (finite
    values only: an infinity times W's zeros would turn the whole row into NaN)."""
    from slimlm import kernels

    lib = kernels.load("decode_layer")
    if not lib.slimlm_dense_has_dpbf16():
        pytest.skip("no AVX512-BF16 build")
    K = 37  # two vectors of 16 and a tail of 5
    ulp = 2.0 ** -7  # bf16's step in [1, 2)
    x = torch.tensor([1 + ulp / 2, 1 + 3 * ulp / 2, -(1 + ulp / 2), 1 + ulp / 2 + 2 ** -20, 3.0e38, -1e-30,
                      0.1, -7.25] * 5, dtype=torch.float32)[:K].reshape(1, K)
    x[0, 33:] = x[0, :4]  # ties in the scalar tail too
    w = torch.eye(K, dtype=torch.bfloat16)
    y = torch.empty(1, K)
    assert lib.slimlm_dense_linear(x.data_ptr(), w.data_ptr(), 2, y.data_ptr(), 1, K, K, 1) == 0
    assert torch.equal(y, x.bfloat16().float())


def _amx_lib():
    from slimlm import kernels

    lib = kernels.load("decode_layer")
    if lib is None or not lib.slimlm_dense_has_amx():  # the kernel's own answer: built with AMX and granted tiles
        pytest.skip("no AMX here (CPU, compiler or SLIMLM_AMX=0): kind 2 runs the AVX-512 loops")
    return lib


def _linear(lib, x, w, nthreads=2):
    y = torch.full((x.shape[0], w.shape[0]), float("nan"))
    assert lib.slimlm_dense_linear(x.data_ptr(), w.data_ptr(), 2, y.data_ptr(), x.shape[0], w.shape[0], x.shape[1],
                                   nthreads) == 0
    return y


@pytest.mark.parametrize("N,K", [(32, 32), (40, 64), (100, 576), (960, 576), (576, 1536)])
def test_dense_linear_amx_matches_the_avx512_path(N, K, monkeypatch):
    """Kind 2 on AMX tiles (K a multiple of 32, N >= 32; the last block of 32 W rows overlaps the one
    before where N is not a multiple of 32) against float64 and against the AVX-512 loops
    (``SLIMLM_AMX=0``). Both sum the same products of bf16 values, exact in fp32, in different
    orders (tiles: one accumulator per output in k-pair order; AVX-512: two 16-lane accumulators and
    a tree), so they agree to summation-order rounding: rtol 1e-5, atol 1e-5 sqrt(K) (measured
    ~1e-5 absolute at K = 576, unit-normal x and W); and they are not the same kernel (some output
    differs in its last bits: the tiles did run)."""
    lib = _amx_lib()
    g = torch.Generator().manual_seed(N + K)
    x = torch.randn(64, K, generator=g)
    w = torch.randn(N, K, generator=g).bfloat16()
    for M in (1, 2, 17, 64):
        y = _linear(lib, x[:M], w)
        want = x[:M].bfloat16().double() @ w.double().T
        torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5 * K ** 0.5, msg=f"{M}x{N}x{K}")
        monkeypatch.setenv("SLIMLM_AMX", "0")
        y0 = _linear(lib, x[:M], w)
        monkeypatch.delenv("SLIMLM_AMX")
        torch.testing.assert_close(y, y0, rtol=1e-5, atol=1e-5 * K ** 0.5, msg=f"{M}x{N}x{K}")
        if M == 64 and K >= 576:
            assert not torch.equal(y, y0)


def test_dense_linear_amx_rows_are_batch_invariant():
    """Under AMX every x row's y is bitwise the same at M = 1, 2, 17 and 57, wherever the row sits in
    the step (another 16-row chunk, another tile of the 2 x 2 C tiles, zero-padded columns), and
    at 1 or 2 threads."""
    lib = _amx_lib()
    g = torch.Generator().manual_seed(13)
    for N, K in [(960, 576), (576, 1536), (72, 96)]:
        w = torch.randn(N, K, generator=g).bfloat16()
        rows = torch.randn(57, K, generator=g)
        alone = torch.cat([_linear(lib, rows[m: m + 1], w, 1) for m in range(57)])
        for M in (1, 2, 17, 57):
            for start in sorted({0, 57 - M, (57 - M) // 2}):
                x = torch.roll(rows, -start, 0)[:M].contiguous()  # rows start.. at positions 0..
                y = _linear(lib, x, w)
                assert torch.equal(y, torch.roll(alone, -start, 0)[:M]), (N, K, M, start)


def test_bf16_model_amx_near_avx512(tiny_llama_dir, monkeypatch):
    """A bf16 model's native decode step with its projections on AMX tiles and on the AVX-512 loops
    (``SLIMLM_AMX=0``, read at every call: one engine) differs only by the projections' summation
    order: one decode step's logits within 1e-3 relative L2, and greedy tokens the same."""
    _amx_lib()
    prompts = [[5, 9, 33, 71, 8], [100, 3, 17]]
    llm = LLM(load(tiny_llama_dir, "bfloat16"))
    assert llm.engine.runner.native_layers is not None
    la = _step_logits(llm, prompts)
    monkeypatch.setenv("SLIMLM_AMX", "0")
    lb = _step_logits(llm, prompts)
    rel = float((la - lb).norm() / lb.norm())
    assert rel < 1e-3, rel
    p = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    off = [o.outputs[0].token_ids for o in llm.generate(prompts, p, use_tqdm=False)]
    monkeypatch.delenv("SLIMLM_AMX")
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, p, use_tqdm=False)] == off
