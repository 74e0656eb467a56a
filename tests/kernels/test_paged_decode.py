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


def _case(seed, dtype, d, hq, hkv, block_size, lens):
    g = torch.Generator().manual_seed(seed)
    lens = torch.tensor(lens)
    B, nb = len(lens), int(-(-lens.max() // block_size)) + 1
    n_blocks = B * nb + 5
    k_pool = torch.randn(n_blocks, block_size, hkv, d, generator=g).to(dtype)
    v_pool = torch.randn(n_blocks, block_size, hkv, d, generator=g).to(dtype)
    table = torch.randperm(n_blocks, generator=g)[: B * nb].view(B, nb).contiguous()
    return torch.randn(B, hq, d, generator=g), k_pool, v_pool, table, lens


def reference_mass(q, k_pool, table, lens, scale):
    """Each key's softmax probabilities summed over its KV head's query heads, per pool slot."""
    nblk, bs, hkv, d = k_pool.shape
    mass = torch.zeros(nblk * bs, hkv, dtype=torch.float64)
    G = q.shape[1] // hkv
    for b in range(q.shape[0]):
        L = int(lens[b])
        slots = torch.stack([table[b, t // bs] * bs + t % bs for t in range(L)])
        k = k_pool.reshape(-1, hkv, d)[slots].double()  # (L, hkv, d)
        s = torch.einsum("hd,lhd->hl", q[b].double(), k.repeat_interleave(G, dim=1)) * scale
        p = s.softmax(-1).view(hkv, G, L).sum(1)  # (hkv, L)
        mass.index_add_(0, slots, p.T)
    return mass.float()


# The GQA grouping of decode_rows_avx512: query heads of a KV head served together, up to 4 (2 above
# head size 64) at a time, so ratios 1, 3, 4 are one group and 5, 8 several; lengths that are not
# multiples of 16 end in a partial 16-key reduction; fp32 queries on a bf16 pool take the hi + lo
# split, bf16-exact queries the hi part only.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d,hq,hkv", [(64, 3, 3), (64, 9, 3), (64, 8, 2), (64, 10, 2), (128, 8, 1), (96, 6, 2),
                                      (48, 4, 1)])
@pytest.mark.parametrize("bf16_queries", [False, True])
def test_grouped_heads_and_mass(lib, dtype, d, hq, hkv, bf16_queries):
    q, k_pool, v_pool, table, lens = _case(d + hq, dtype, d, hq, hkv, 16, [1, 3, 15, 16, 17, 31, 33, 50, 100])
    if bf16_queries:
        q = q.bfloat16().float()
    scale = d**-0.5
    code = {torch.float32: 0, torch.bfloat16: 1}[dtype]
    mass = torch.zeros(k_pool.shape[0] * k_pool.shape[1], hkv)
    got = native_decode(lib, q, [k_pool], [v_pool], code, table, lens, scale, mass)
    torch.testing.assert_close(got, reference(q, k_pool, v_pool, table, lens, scale), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mass, reference_mass(q, k_pool, table, lens, scale), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d,hq,hkv", [(64, 9, 3), (64, 4, 4), (128, 8, 2)])
def test_a_row_is_the_same_alone_or_among_others(lib, dtype, d, hq, hkv):
    """Batch invariance: each row's arithmetic is its own, so its output is bitwise the same alone,
    first, last or in the middle of a batch, with any thread count."""
    q, k_pool, v_pool, table, lens = _case(7, dtype, d, hq, hkv, 16, [40, 97, 1, 300, 16, 63])
    code = {torch.float32: 0, torch.bfloat16: 1}[dtype]
    together = native_decode(lib, q, [k_pool], [v_pool], code, table, lens, 0.125)
    for b in range(len(lens)):
        alone = native_decode(lib, q[b : b + 1], [k_pool], [v_pool], code, table[b : b + 1], lens[b : b + 1], 0.125)
        assert torch.equal(alone[0], together[b])
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    shuffled = native_decode(lib, q[perm], [k_pool], [v_pool], code, table[perm], lens[perm], 0.125)
    assert torch.equal(shuffled, together[perm])
