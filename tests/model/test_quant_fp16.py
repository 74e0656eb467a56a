"""fp16 scales and minimums in packed weights, and the native de-quantization prefill uses.

GGUF Q8_0 / Q4_0 / Q4_1 keep the file's fp16 scales (and minimums); int4 quantized on load rounds
them to fp16. Widening an fp16 value to fp32 is exact, so a layer holding fp16 scales must compute
exactly what the same layer with those scales widened to fp32 computes, on every kernel; and the
native de-quantization (``slimlm_q4_dequant`` / ``slimlm_q8_dequant``) must give the PyTorch
reference's bits.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from slimlm.model.quant import Int4Weight, Int8Weight, QuantLinear, quantize_int4, quantize_int8
from slimlm.model.quant.formats import native_dequantize, scale_flags
from slimlm.model.quant.gguf_packed import pack_gguf

from .test_quant import assert_matmul_close


def _lib():
    from slimlm import kernels

    lib = kernels.load("qlinear")
    if lib is None:
        pytest.skip("no C compiler")
    return lib


def _widened(p):
    """The same weight with its scales / minimums in float32 (exact)."""
    if isinstance(p, Int8Weight):
        return Int8Weight(p.q, p.scale.float(), p.group_size)
    return Int4Weight(p.q, p.scale.float(), p.min.float(), p.group_size)


def _gguf(qtype, n=40, k=256, seed=0):
    import gguf

    w = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32) * 0.05
    return gguf.quants.quantize(w, gguf.GGMLQuantizationType[qtype]), n, k


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
@pytest.mark.parametrize("kernel", ["fp32", "vnni"])
def test_gguf_layer_holds_fp16_scales_and_computes_the_reference(qtype, kernel, monkeypatch):
    import gguf

    _lib()
    raw, n, k = _gguf(qtype)
    p = pack_gguf(raw, qtype, n, k)
    assert p.scale.dtype == torch.float16
    if isinstance(p, Int4Weight):
        assert p.min.dtype == torch.float16
        assert p.nbytes() == n * k // 2 + 2 * n * (k // 32) * 2
    ref_w = torch.from_numpy(np.array(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype]),
                                      dtype=np.float32).reshape(n, k))
    assert torch.equal(p.dequantize(), ref_w)  # the file's values, bit for bit
    assert torch.equal(p.dequantize(native=False), ref_w)
    monkeypatch.setenv("SLIMLM_QLINEAR", kernel)
    for rows in (1, 5, 20):  # decode kernel, and the de-quantized prefill path (> 16 rows)
        x = torch.randn(rows, k)
        got = assert_matmul_close(p, x, True, kernel=kernel)  # within the stated tolerance of F.linear(x, W)
        assert torch.equal(got, _widened(p).matmul(x))  # fp16 read exactly: the fp32-scale layer's bits
    lin = QuantLinear(p)
    assert lin.scales.dtype == torch.float16
    x = torch.randn(1, k)
    assert torch.equal(lin(x), _widened(p).matmul(x))


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("kernel", ["fp32", "vnni"])
def test_int4_on_load_rounds_scales_to_fp16(group, kernel, monkeypatch):
    _lib()
    torch.manual_seed(group)
    w = torch.randn(33, 640) * 0.05
    p = quantize_int4(w, group)
    assert p.scale.dtype == p.min.dtype == torch.float16
    p32 = quantize_int4(w, group, torch.float32)
    step = p32.scale.repeat_interleave(group, dim=1)
    assert ((p.dequantize() - w).abs() <= step * 0.51 + 1e-6).all()  # still within half a step (+ fp16 rounding)
    monkeypatch.setenv("SLIMLM_QLINEAR", kernel)
    for rows in (1, 3, 17):
        x = torch.randn(rows, 640)
        got = assert_matmul_close(p, x, True, kernel=kernel)
        assert torch.equal(got, _widened(p).matmul(x))


def test_scale_and_minimum_dtypes_are_read_independently():
    """Q4_0's minimum -8 d stays fp32 where it would overflow fp16: mixed flags, same bits."""
    _lib()
    torch.manual_seed(0)
    p = quantize_int4(torch.randn(24, 256), 32)
    mixed = Int4Weight(p.q, p.scale, p.min.float(), 32)
    assert scale_flags(mixed.tensors()) == 1 and scale_flags(p.tensors()) == 3
    assert scale_flags(_widened(p).tensors()) == 0
    x = torch.randn(2, 256)
    assert torch.equal(mixed.matmul(x), _widened(p).matmul(x))
    assert torch.equal(mixed.dequantize(), p.dequantize(native=False))
    big = np.zeros((2, 8, 18), np.uint8)  # Q4_0 with d = 16384: -8 d overflows fp16
    big[..., 0:2] = np.full((2, 8, 1), 16384, np.float16).view(np.uint8)
    q = pack_gguf(big.reshape(2, -1), "Q4_0", 2, 256)
    assert q.scale.dtype == torch.float16 and q.min.dtype == torch.float32
    assert torch.equal(q.dequantize(), torch.full((2, 256), -8 * 16384.0))


FORMATS = {
    "int8-channel": lambda w: quantize_int8(w),
    "int8-g32": lambda w: quantize_int8(w, 32),
    "int8-g16 fp16": lambda w: Int8Weight(quantize_int8(w, 16).q, quantize_int8(w, 16).scale.half(), 16),
    "int4-g32 fp16": lambda w: quantize_int4(w, 32),
    "int4-g16 fp16": lambda w: quantize_int4(w, 16),
    "int4-g64 fp32": lambda w: quantize_int4(w, 64, torch.float32),
    "int4-g6 fp16": lambda w: quantize_int4(w, 6),
}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_dequantize_is_bit_identical_to_pytorch(fmt, dtype):
    _lib()
    torch.manual_seed(1)
    p = FORMATS[fmt](torch.randn(37, 192))
    got = native_dequantize(p, dtype)
    assert got is not None and got.dtype == dtype
    assert torch.equal(got, p.dequantize(dtype, native=False))


def test_prefill_buffer_is_reused_and_never_stale():
    """Prefill (> 16 rows) de-quantizes into one kept buffer: consecutive layers of different sizes
    each get their own values, and the results equal F.linear on the PyTorch de-quantization."""
    from slimlm.model.quant import formats

    _lib()
    formats._tls.buf = None  # earlier tests in this process may have grown it
    torch.manual_seed(2)
    layers = [quantize_int4(torch.randn(n, k), 32) for n, k in ((64, 128), (200, 96), (32, 64))]
    layers.append(quantize_int8(torch.randn(48, 160), 32))
    x = {k: torch.randn(24, k) for k in (64, 96, 128, 160)}
    for _ in range(2):
        for p in layers:
            xx = x[p.shape[1]]
            assert torch.equal(p.matmul(xx), F.linear(xx, p.dequantize(native=False)))
    buf = formats._tls.buf
    assert buf.numel() == 200 * 96 * 4  # grown to the largest layer, then kept
    p = layers[0]
    assert torch.equal(p.matmul(x[128]), F.linear(x[128], p.dequantize(native=False)))
    assert formats._tls.buf is buf
    xg = x[128].clone().requires_grad_(True)  # a gradient could keep W: its own tensor, not the buffer
    y = p.matmul(xg)
    layers[1].matmul(x[96])  # overwrites the buffer
    y.sum().backward()
    torch.testing.assert_close(xg.grad, torch.ones(24, p.shape[0]) @ p.dequantize())


def test_checkpoint_keeps_fp16_scales(tmp_path, tiny_llama_dir):
    from slimlm.model.hub import load
    from slimlm.model.weights import save_model_dir

    lm = load(tiny_llama_dir, weights="int4")
    proj = lm.model.model.layers[0].mlp.up_proj
    assert proj.scales.dtype == proj.mins.dtype == torch.float16
    save_model_dir(lm.model, tmp_path / "q", lm.tokenizer)
    back = load(tmp_path / "q")
    assert back.model.model.layers[0].mlp.up_proj.scales.dtype == torch.float16
    ids = torch.randint(0, 300, (1, 20))
    with torch.no_grad():
        assert torch.equal(lm.model(ids), back.model(ids))


@pytest.mark.parametrize("weights", ["int4", "auto"])
def test_runner_trims_the_heap_after_a_packed_models_prefill(tiny_llama_dir, weights, monkeypatch):
    """Packed weights: every step with a prefill chunk is followed by one malloc_trim; decode-only
    steps and dense models never call it."""
    from slimlm.engine import runner
    from slimlm.engine.llm import LLM
    from slimlm.engine.params import SamplingParams
    from slimlm.model.hub import load

    calls = []
    monkeypatch.setattr(runner, "release_prefill_heap", lambda: calls.append(1))
    llm = LLM(load(tiny_llama_dir, weights=weights))
    llm.generate([[5, 9, 33, 71, 8, 2] * 4], SamplingParams(max_tokens=6, temperature=0.0), use_tqdm=False)
    assert len(calls) == (1 if weights == "int4" else 0)  # one prefill step, then 5 decode steps
