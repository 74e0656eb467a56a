"""The native dense GEMM (``kernels/gemm.c`` through ``slimlm.kernels.gemm``): against a float64
reference within the summation error bound at shapes that are not multiples of its blocks, the
same row bitwise alone or in any batch, and the fallbacks (kernel off, autograd, other dtypes).

Tolerances: fp32 output of a k-term sum accumulated in fp32 in some order: |y - ref| <= k * 2^-24
* sum_k |x w| (+ the bias's rounding). bf16 output: the same for the fp32 accumulator, plus the
final rounding to bf16 (half an ulp: 2^-9 |ref|; 2^-8 allowed)."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimlm.kernels import gemm

HAS_CC = shutil.which("cc") is not None or shutil.which("gcc") is not None
SHAPES = [(1, 1, 1), (5, 13, 7), (16, 12, 32), (17, 25, 33), (33, 37, 131), (70, 100, 577), (130, 24, 64)]


def _needs(dtype):
    if not HAS_CC or not gemm.supported(dtype):
        pytest.skip(f"native GEMM not built for {dtype} here (the PyTorch path serves)")


def _case(m, n, k, dtype, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k + 3, generator=g)[:, 1 : k + 1].to(dtype)  # a row stride > k
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    return x, w, b


def _bound(x, w, b, dtype):
    xd, wd = x.double(), w.double()
    ref = xd @ wd.T + (b.double() if b is not None else 0)
    k = x.shape[-1]
    tol = (k + 1) * 2.0 ** -24 * (xd.abs() @ wd.abs().T + (b.double().abs() if b is not None else 0)) + 1e-30
    if dtype == torch.bfloat16:
        tol = tol + 2.0 ** -8 * ref.abs()
    return ref, tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_gemm_matches_a_float64_reference(m, n, k, dtype, bias):
    _needs(dtype)
    x, w, b = _case(m, n, k, dtype, bias)
    y = gemm.linear(x, w, b)
    assert y is not None and y.dtype == dtype and y.shape == (m, n)
    ref, tol = _bound(x, w, b, dtype)
    err = (y.double() - ref).abs()
    assert bool((err <= tol).all()), f"max excess {(err - tol).max().item():.3g}"
    # and F.linear agrees within the same bound (both are sums of the same products)
    err_t = (F.linear(x, w, b).double() - ref).abs()
    assert bool((err_t <= 2 * tol + 1e-6).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 2])
def test_a_row_is_bitwise_the_same_alone_or_in_any_batch(dtype, threads):
    _needs(dtype)
    x, w, b = _case(70, 45, 97, dtype, True, seed=3)
    alone = torch.cat([gemm.linear(x[i : i + 1], w, b, threads=threads) for i in range(70)])
    for m in (2, 15, 16, 17, 33, 70):
        got = gemm.linear(x[:m], w, b, threads=threads)
        assert torch.equal(got, alone[:m]), m
    # a 3-D input keeps its leading dims
    assert torch.equal(gemm.linear(x[:12].reshape(3, 4, 97), w, b).reshape(12, 45), alone[:12])


def test_fallbacks_return_none(monkeypatch):
    x, w, _ = _case(20, 8, 16, torch.float32, False)
    assert gemm.linear(x.half(), w.half()) is None  # no fp16 kernel
    assert gemm.linear(x, w.double()) is None  # dtypes differ
    wg = w.clone().requires_grad_()
    assert gemm.linear(x, wg) is None  # autograd: F.linear's
    with torch.no_grad():
        if HAS_CC and gemm.supported(torch.float32):
            assert gemm.linear(x, wg) is not None
    monkeypatch.setenv(gemm.ENV, "0")
    assert gemm.linear(x, w) is None and not gemm.supported(torch.float32)


class _Tiny(nn.Module):
    """What install() walks: model.model.layers[i].self_attn / .mlp with nn.Linear children."""

    def __init__(self, dtype):
        super().__init__()
        layer = nn.Module()
        layer.self_attn, layer.mlp = nn.Module(), nn.Module()
        layer.self_attn.o_proj = nn.Linear(24, 24, bias=True, dtype=dtype)
        layer.mlp.down_proj = nn.Linear(40, 24, bias=False, dtype=dtype)
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([layer])
        self.norm = nn.Parameter(torch.ones(24, dtype=dtype))

    @property
    def device(self):
        return self.norm.device

    @property
    def dtype(self):
        return self.norm.dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_install_keeps_modules_plain_and_can_be_undone(dtype, monkeypatch):
    model = _Tiny(dtype)
    monkeypatch.delenv(gemm.ENV, raising=False)
    assert gemm.install(model, True) == 0  # opt-in: SLIMLM_GEMM=1
    monkeypatch.setenv(gemm.ENV, "1")
    o = model.model.layers[0].self_attn.o_proj
    x = torch.randn(20, 24, dtype=dtype)
    before = o(x)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    n = gemm.install(model, True, min_rows=1)
    assert type(o) is nn.Linear and model.state_dict().keys() == sd.keys()
    if HAS_CC and gemm.supported(dtype):
        assert n == 2 and isinstance(o.__dict__["forward"], gemm.GemmForward)
        with torch.inference_mode():
            torch.testing.assert_close(o(x), before, rtol=2e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-5)
            assert torch.equal(o(x), gemm.linear(x, o.weight, o.bias))
    else:
        assert n == 0
    assert gemm.install(model, False) == 0
    assert "forward" not in o.__dict__ and torch.equal(o(x), before)
