"""The native paged decode kernel equals dense attention over the same keys, for every path it
has (AVX-512 with head size 64, other multiples of 16, the portable loop; float32 and bfloat16
pools; partial last blocks), and slimlm falls back cleanly when it cannot be built."""

from __future__ import annotations

import shutil

import pytest
import torch

from slimlm import kernels
from slimlm.kernels.ops import native_decode
from slimlm.model.attention import attention

HAS_CC = shutil.which("cc") is not None or shutil.which("gcc") is not None


@pytest.fixture(scope="module")
def lib():
    if not HAS_CC:
        pytest.skip("no C compiler: the engine uses the PyTorch path (the fallback tests below still run)")
    lib = kernels.load("paged_decode")
    assert lib is not None  # a compiler is present, so the kernel must build
    return lib


def reference(q, k_pool, v_pool, table, lens, scale):
    """Gather each sequence's keys into a dense tensor and run the model's attention function."""
    outs = []
    _, bs, hkv, d = k_pool.shape
    for b in range(q.shape[0]):
        L = int(lens[b])
        blocks = table[b, : -(-L // bs)]
        k = k_pool[blocks].reshape(-1, hkv, d)[:L].float().transpose(0, 1)[None]
        v = v_pool[blocks].reshape(-1, hkv, d)[:L].float().transpose(0, 1)[None]
        outs.append(attention(q[b][None, :, None].float(), k, v, None, scale)[0, :, 0])
    return torch.stack(outs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d,hq,hkv", [(64, 9, 3), (32, 4, 4), (20, 6, 2), (128, 8, 1)])
@pytest.mark.parametrize("block_size", [8, 16])
def test_matches_dense_attention(lib, dtype, d, hq, hkv, block_size):
    g = torch.Generator().manual_seed(d * block_size + hq)
    lens = torch.tensor([1, block_size, block_size + 1, 5 * block_size - 3, 77])
    B, nb = len(lens), int(-(-lens.max() // block_size)) + 1
    n_blocks = B * nb + 7
    k_pool = torch.randn(n_blocks, block_size, hkv, d, generator=g).to(dtype)
    v_pool = torch.randn(n_blocks, block_size, hkv, d, generator=g).to(dtype)
    table = torch.randperm(n_blocks, generator=g)[: B * nb].view(B, nb).contiguous()
    q = torch.randn(B, hq, d, generator=g)
    scale = d**-0.5
    got = native_decode(lib, q, [k_pool], [v_pool], {torch.float32: 0, torch.bfloat16: 1}[dtype], table, lens, scale)
    want = reference(q, k_pool, v_pool, table, lens, scale)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_bf16_queries_are_widened(lib):
    k = torch.randn(4, 16, 2, 64).bfloat16()
    table, lens = torch.arange(4).view(1, 4), torch.tensor([50])
    q = torch.randn(1, 4, 64).bfloat16()
    got = native_decode(lib, q, [k], [k], 1, table, lens, 0.125)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, reference(q, k, k, table, lens, 0.125), rtol=1e-5, atol=1e-5)


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setattr(kernels, "_loaded", {})
    monkeypatch.setenv("SLIMLM_NATIVE", "0")
    assert kernels.load("paged_decode") is None


def test_a_failed_build_falls_back_with_a_warning(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(kernels, "_loaded", {})
    monkeypatch.setenv("SLIMLM_HOME", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    with caplog.at_level("WARNING"):
        assert kernels.load("paged_decode") is None
    assert "using the PyTorch path" in caplog.text
    assert not list((tmp_path / "kernels").glob("*.so"))  # nothing half-written left behind
