"""The native kernels as ``torch.library`` ops (``torch.ops.slimlm.*``): equal to the PyTorch path,
checked like the wrappers, accepted by ``opcheck`` and traced by ``torch.compile`` without a graph
break; the prefill kernel's scratch can be given back; and what a CPU without AVX-512 runs (the
kernels built for ``x86-64-v3``: the portable decode loop, no prefill kernel)."""

from __future__ import annotations

import shutil

import pytest
import torch

from slimlm import kernels
from slimlm.kernels import ops
from slimlm.model.attention import attention
from tests.kernels.test_paged_decode import reference

HAS_CC = shutil.which("cc") is not None or shutil.which("gcc") is not None
pytestmark = pytest.mark.skipif(not HAS_CC, reason="no C compiler: the engine uses the PyTorch path")


def decode_case(dtype=torch.float32, d=64, hq=6, hkv=2, bs=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    lens = torch.tensor([1, bs, bs + 3, 3 * bs - 1])
    B, nb = len(lens), 4
    k = torch.randn(B * nb + 3, bs, hkv, d, generator=g).to(dtype)
    v = torch.randn(B * nb + 3, bs, hkv, d, generator=g).to(dtype)
    table = torch.randperm(B * nb + 3, generator=g)[: B * nb].view(B, nb).contiguous()
    q = torch.randn(B, hq, d, generator=g)
    return q, k, v, table, lens


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_op_equals_the_pytorch_path_and_fills_mass(dtype):
    assert kernels.load("paged_decode") is not None
    q, k, v, table, lens = decode_case(dtype)
    code = ops.NATIVE_DTYPES[dtype]
    mass_op = torch.zeros(k.shape[0] * k.shape[1], k.shape[2])
    got = torch.ops.slimlm.paged_decode(q, [k], [v], code, table, lens, 0.125, mass_op)
    torch.testing.assert_close(got, reference(q, k, v, table, lens, 0.125), rtol=1e-5, atol=1e-5)
    mass_eager = torch.zeros_like(mass_op)
    torch.testing.assert_close(ops.native_decode(None, q, [k], [v], code, table, lens, 0.125, mass_eager), got)
    assert torch.equal(mass_op, mass_eager)
    # each query head's probabilities sum to 1 over its keys: Hq / Hkv per KV head, per sequence
    assert torch.allclose(mass_op.sum(), torch.tensor(float(len(lens) * q.shape[1])), atol=1e-3)


def test_decode_op_checks_its_inputs():
    q, k, v, table, lens = decode_case()
    bad = table.clone()
    bad[0, 0] = k.shape[0]  # a block id past the pool
    with pytest.raises(ValueError, match="outside the pool"):
        torch.ops.slimlm.paged_decode(q, [k], [v], 0, bad, lens, 0.125, None)
    with pytest.raises(ValueError, match="capacity"):
        torch.ops.slimlm.paged_decode(q, [k], [v], 0, table, lens + 100, 0.125, None)
    with pytest.raises(ValueError, match="do not match dtype code"):
        torch.ops.slimlm.paged_decode(q, [k], [v], 1, table, lens, 0.125, None)


def prefill_case(dtype, T=20, q_start=11, bs=8, hq=4, hkv=2, d=64):
    g = torch.Generator().manual_seed(T + q_start)
    n = q_start + T
    nb = -(-n // bs)
    k = torch.randn(nb + 2, bs, hkv, d, generator=g).to(dtype)
    v = torch.randn(nb + 2, bs, hkv, d, generator=g).to(dtype)
    table = torch.randperm(nb + 2, generator=g)[:nb].contiguous()
    q = torch.randn(T, hq, d, generator=g).to(dtype)
    return q, k, v, table, q_start


def prefill_reference(q, k, v, table, q_start):
    T, hq, d = q.shape
    n = q_start + T
    ks = k[table].reshape(-1, k.shape[2], d)[:n].float().transpose(0, 1)[None]
    vs = v[table].reshape(-1, k.shape[2], d)[:n].float().transpose(0, 1)[None]
    mask = torch.arange(n)[None, :] <= torch.arange(q_start, n)[:, None]
    return attention(q.float().transpose(0, 1)[None], ks, vs, mask[None, None], 0.125)[0].transpose(0, 1)


def _prefill_lib(dtype):
    lib = kernels.load("paged_prefill")
    if lib is None or not lib.slimlm_prefill_supported(64, ops.NATIVE_DTYPES[dtype]):
        pytest.skip(f"this CPU has no prefill kernel for {dtype}: the engine uses the PyTorch prefill path")
    return lib


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_op_equals_the_pytorch_path(dtype):
    _prefill_lib(dtype)
    q, k, v, table, q_start = prefill_case(dtype)
    out = torch.empty_like(q)
    torch.ops.slimlm.paged_prefill(q, k, v, table, q_start, out, 0.125)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), prefill_reference(q, k, v, table, q_start), rtol=tol, atol=tol)
    with pytest.raises(ValueError, match="outside the pool"):
        torch.ops.slimlm.paged_prefill(q, k, v, table + 100, q_start, out, 0.125)


def test_opcheck():
    q, k, v, table, lens = decode_case()
    mass = torch.zeros(k.shape[0] * k.shape[1], k.shape[2])
    torch.library.opcheck(torch.ops.slimlm.paged_decode.default, (q, [k], [v], 0, table, lens, 0.125, mass))
    torch.library.opcheck(torch.ops.slimlm.paged_decode.default, (q, [k], [v], 0, table, lens, 0.125, None))
    _prefill_lib(torch.float32)
    q, k, v, table, q_start = prefill_case(torch.float32)
    torch.library.opcheck(torch.ops.slimlm.paged_prefill.default, (q, k, v, table, q_start, torch.empty_like(q),
                                                                   0.125))
    mass = torch.zeros(k.shape[0] * k.shape[1], k.shape[2])
    torch.library.opcheck(torch.ops.slimlm.paged_prefill_ex.default, (q, [k], [v], 0, table, q_start,
                                                                      torch.empty_like(q), 0.125, mass))


def test_torch_compile_traces_the_wrappers_as_ops():
    """fullgraph=True: a ctypes call would break the graph; the ops do not (fake shapes checked)."""
    lib = kernels.load("paged_decode")
    q, k, v, table, lens = decode_case()

    def layer(q, k, v, table, lens):
        return ops.native_decode(lib, q * 2, [k], [v], 0, table, lens, 0.125) + 1

    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, table, lens), layer(q, k, v, table, lens))


def test_prefill_scratch_is_given_back():
    lib = _prefill_lib(torch.float32)
    q, k, v, table, q_start = prefill_case(torch.float32)
    first = torch.empty_like(q)
    ops.native_prefill(lib, q, k, v, table, q_start, first, 0.125)
    ops.release_prefill_scratch()
    again = torch.empty_like(q)
    ops.native_prefill(lib, q, k, v, table, q_start, again, 0.125)  # allocates afresh after the release
    assert torch.equal(first, again)


@pytest.fixture
def portable(monkeypatch):
    """The kernels as a CPU without AVX-512 gets them (built for x86-64-v3, AVX2)."""
    import platform

    if platform.machine() != "x86_64":
        pytest.skip("x86-64 only")
    monkeypatch.setenv(kernels.MARCH_ENV, "x86-64-v3")
    monkeypatch.setattr(kernels, "_loaded", {})
    monkeypatch.setattr(ops, "_LIBS", {})
    return kernels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_without_avx512_decode_runs_the_portable_loop_and_prefill_falls_back(portable, dtype):
    decode, prefill = portable.load("paged_decode"), portable.load("paged_prefill")
    assert decode is not None and prefill is not None
    assert not prefill.slimlm_prefill_supported(64, ops.NATIVE_DTYPES[dtype])  # the engine takes the PyTorch prefill
    q, k, v, table, lens = decode_case(dtype, d=64)
    got = ops.native_decode(decode, q, [k], [v], ops.NATIVE_DTYPES[dtype], table, lens, 0.125)
    torch.testing.assert_close(got, reference(q, k, v, table, lens, 0.125), rtol=1e-5, atol=1e-5)


def test_without_avx512_the_engine_is_greedy_identical(portable, tiny_llama_dir, monkeypatch):
    from slimlm import LLM, SamplingParams

    prompts = ["The quick brown fox", "def add(a, b):"]
    sp = SamplingParams(temperature=0, max_tokens=12)
    llm = LLM(str(tiny_llama_dir), block_size=8)
    paths = llm.engine.runner.paths
    assert paths.native_decode is not None and paths.native_prefill is None  # portable decode, PyTorch prefill
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]
    monkeypatch.setenv("SLIMLM_NATIVE", "0")
    monkeypatch.setattr(kernels, "_loaded", {})
    ref = LLM(str(tiny_llama_dir), block_size=8)
    assert ref.engine.runner.paths.native_decode is None
    assert [o.outputs[0].token_ids for o in ref.generate(prompts, sp, use_tqdm=False)] == got
