"""The native elementwise kernels (``kernels/elementwise.c`` through ``slimlm.kernels.elementwise``)
against PyTorch: RMSNorm (with and without the residual add) and RoPE bitwise, SiLU * up within its
exp's error; the model with them equal to the model without; the fallbacks.

Tolerance (SiLU * up only): the kernel's exp and PyTorch's (SLEEF) are each within a few 1e-7 of
exp, so fp32 outputs agree to 8 * 2^-24 relative (plus 1e-30 absolute); bf16 outputs are rounded
from such values, so where they differ it is by one bf16 ulp (2^-7 relative), in at most 1% of
the elements."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from slimlm import kernels
from slimlm.kernels import elementwise
from slimlm.model.hub import load
from slimlm.model.rope import rotate_half

HAS_CC = shutil.which("cc") is not None or shutil.which("gcc") is not None
DTYPES = [torch.float32, torch.bfloat16]
pytestmark = pytest.mark.skipif(not HAS_CC, reason="no C compiler: the PyTorch path serves")


def _ref_norm(x, w, eps):
    """transformers' LlamaRMSNorm: normalise in fp32, round to the dtype, then scale."""
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _strided(rows, n, dtype, g, scale=1.0):
    """(1, rows, n) with a row stride > n (a column slice of a wider tensor)."""
    return (torch.randn(1, rows, n + 5, generator=g) * scale)[..., 2 : n + 2].to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [1, 7, 8, 17, 64, 576, 1000, 2048, 4120])
def test_rms_norm_is_bitwise_pytorchs(dtype, D):
    g = torch.Generator().manual_seed(D)
    x, r = _strided(33, D, dtype, g, 4.0), _strided(33, D, dtype, g)
    w = (torch.rand(D, generator=g) + 0.5).to(dtype)
    with torch.no_grad():
        y = elementwise.rms_norm(x, w, 1e-5)
        h, y2 = elementwise.rms_norm(x, w, 1e-5, r)
    assert torch.equal(y, _ref_norm(x, w, 1e-5))
    assert torch.equal(h, x + r) and torch.equal(y2, _ref_norm(x + r, w, 1e-5))
    if dtype == torch.float32:  # the fp32 model path's fused op rounds the same
        assert torch.equal(y, F.rms_norm(x, w.shape, w, 1e-5))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [2, 32, 64, 128])
def test_rope_is_bitwise_pytorchs(dtype, d):
    g = torch.Generator().manual_seed(d)
    B, T, H = 2, 19, 5
    x = torch.randn(B, T, H * d + 7, generator=g)[..., : H * d].to(dtype)  # a q/k slice of a qkv output
    pos = torch.arange(T).expand(B, T) + torch.tensor([[0], [100]])
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    emb = (pos[..., None].float() * inv).repeat(1, 1, 2)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    y = elementwise.rope(x, cos, sin, d)
    xh = x.view(B, T, H, d).transpose(1, 2)
    ref = xh * cos[:, None] + rotate_half(xh) * sin[:, None]
    assert y.shape == (B, T, H, d) and torch.equal(y.transpose(1, 2), ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 15, 16, 100, 1536])
def test_silu_mul_matches_pytorch_within_its_exp(dtype, n):
    g = torch.Generator().manual_seed(n)
    gu = (torch.randn(1, 41, 2 * n, generator=g) * 6).to(dtype)
    gate, up = gu.chunk(2, -1)  # the fused gate/up output's halves (row stride 2n)
    y = elementwise.silu_mul(gate, up)
    ref = F.silu(gate) * up
    if dtype == torch.float32:
        tol = 8 * 2.0 ** -24 * ref.abs() + 1e-30
        assert bool(((y - ref).abs() <= tol).all())
    else:
        diff = y != ref
        ulp = 2.0 ** -7 * ref.float().abs()
        assert bool(((y.float() - ref.float()).abs()[diff] <= ulp[diff] * 1.01).all())
        assert diff.float().mean().item() <= 0.01
    assert torch.equal(elementwise.silu_mul(gate[:, 3:4], up[:, 3:4]), y[:, 3:4])  # a row alone rounds the same


def test_it_stands_aside_for_autograd_other_dtypes_and_when_turned_off(monkeypatch):
    x, w = torch.randn(3, 8), torch.ones(8, requires_grad=True)
    assert elementwise.rms_norm(x, w, 1e-6) is None  # a gradient is needed: PyTorch's ops
    with torch.no_grad():
        assert elementwise.rms_norm(x, w, 1e-6) is not None
        assert elementwise.rms_norm(x.half(), w.half(), 1e-6) is None
        assert elementwise.silu_mul(x.t(), x.t()) is None  # last dimension not contiguous
        assert elementwise.silu_mul(x, x.double()) is None
        big = torch.ones(1, elementwise.ROW_MAX + 1)
        assert elementwise.rms_norm(big, big[0], 1e-6) is None  # longer than the kernel's row buffer
        assert elementwise.rope(torch.ones(1, 2, 2 * 1024), torch.ones(1, 2, 1024), torch.ones(1, 2, 1024), 1024) is None
    monkeypatch.setattr(kernels, "_loaded", {})
    monkeypatch.setenv("SLIMLM_NATIVE", "0")
    with torch.no_grad():
        assert elementwise.rms_norm(x, w, 1e-6) is None and elementwise.silu_mul(x, x) is None


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_model_with_the_kernels_equals_the_model_without(tiny_llama_dir, dtype, monkeypatch):
    """Norms, residual adds and RoPE through the kernels leave the logits bitwise unchanged; with
    SiLU * up too, they stay within its rounding."""
    lm = load(str(tiny_llama_dir), dtype)
    ids = torch.randint(3, 100, (2, 23))
    with torch.inference_mode():
        native = lm.model(ids)
    monkeypatch.setattr(elementwise, "silu_mul", lambda g, u: None)
    with torch.inference_mode():
        no_silu = lm.model(ids)
    monkeypatch.setattr(elementwise, "_lib", lambda *t: None)
    with torch.inference_mode():
        ref = lm.model(ids)
    assert torch.equal(no_silu, ref)
    tol = 1e-4 if dtype == "float32" else 0.1
    torch.testing.assert_close(native.float(), ref.float(), rtol=0, atol=tol)


def test_norm_hooks_still_fire_and_training_keeps_pytorch(tiny_llama_dir):
    lm = load(str(tiny_llama_dir), "float32")
    seen = []
    layer = lm.model.model.layers[0]
    handle = layer.post_attention_layernorm.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with torch.inference_mode():
        lm.model(torch.randint(3, 100, (1, 5)))
    handle.remove()
    assert seen == [(1, 5, lm.model.cfg.hidden_size)]
    loss = lm.model(torch.randint(3, 100, (1, 6))).float().logsumexp(-1).mean()
    loss.backward()  # the layer's in-place residual add is skipped when autograd needs its input
    assert layer.post_attention_layernorm.weight.grad is not None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 7, 3000])  # 3000 rows of 2 x 192 values: the multi-threaded branch
def test_kv_write_stores_what_index_copy_stores(dtype, T):
    g = torch.Generator().manual_seed(T)
    nb, bs, H, d = 400, 16, 3, 64
    qkv = torch.randn(T, 15, d, generator=g).to(dtype)  # k and v as the model passes them: head slices of a row
    k, v = qkv[:, 9:12], qkv[:, 12:]
    slots = torch.randperm(nb * bs, generator=g)[:T]
    kp, vp = torch.randn(nb, bs, H, d, generator=g).to(dtype), torch.randn(nb, bs, H, d, generator=g).to(dtype)
    rk, rv = kp.clone(), vp.clone()
    rk.view(-1, H * d).index_copy_(0, slots, k.reshape(T, H * d))
    rv.view(-1, H * d).index_copy_(0, slots, v.reshape(T, H * d))
    assert elementwise.kv_write(k, v, slots, kp, vp)
    assert torch.equal(kp, rk) and torch.equal(vp, rv)


def test_kv_write_stands_aside_without_writing(monkeypatch):
    kp, vp = torch.zeros(4, 2, 3, 8), torch.zeros(4, 2, 3, 8)
    k = torch.ones(2, 3, 8)
    assert not elementwise.kv_write(k, k, torch.tensor([1, 8]), kp, vp)  # slot 8 is past the pool's 8 slots
    assert not elementwise.kv_write(k, k, torch.tensor([1, -1]), kp, vp)
    assert not kp.any() and not vp.any()  # nothing written: index_copy_ then raises its own error
    assert not elementwise.kv_write(k, k, torch.tensor([1, 2], dtype=torch.int32), kp, vp)
    assert not elementwise.kv_write(k.transpose(1, 2).contiguous().transpose(1, 2), k, torch.tensor([1, 2]), kp, vp)
    assert not elementwise.kv_write(k.half(), k.half(), torch.tensor([1, 2]), kp.half(), vp.half())
    assert not elementwise.kv_write(k, k, torch.tensor([1, 2]), kp, vp.bfloat16())
    monkeypatch.setenv("SLIMLM_KV_WRITE", "0")
    assert not elementwise.kv_write(k, k, torch.tensor([1, 2]), kp, vp)
    monkeypatch.delenv("SLIMLM_KV_WRITE")
    assert elementwise.kv_write(k, k, torch.tensor([1, 2]), kp, vp) and kp.view(8, 24)[[1, 2]].eq(1).all()
