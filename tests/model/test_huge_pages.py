"""model/quant/huge_pages.py: the storages behind the streamed weights move to one 2 MiB-aligned,
MADV_HUGEPAGE arena with their values, views and ties intact, and an engine on the moved weights
decodes as the layer-by-layer path."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from slimlm.model.quant import huge_pages

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")


def test_storages_move_with_views_ties_and_values(monkeypatch):
    monkeypatch.delenv(huge_pages.ENV, raising=False)
    m = nn.Module()
    m.a = nn.Linear(512, 1024, bias=False)  # 2 MiB of fp32
    m.b = nn.Linear(512, 1024, bias=False)
    m.b.weight = m.a.weight  # tied
    m.c = nn.Linear(768, 1000, bias=True).to(torch.bfloat16)
    m.c.view = nn.Parameter(m.c.weight[10:20], requires_grad=False)  # a view of c's storage (as fused q/k/v)
    m.register_buffer("q", torch.randint(0, 255, (3001,), dtype=torch.uint8))
    before = {k: v.clone() for k, v in m.state_dict(keep_vars=False).items()}
    moved = huge_pages.to_huge_pages(m, [m.a.weight, m.c.weight, m.q])
    assert moved >= 2 * 2 ** 20 + 768 * 1000 * 2 + 3001
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
        assert huge_pages._in_arena(v.untyped_storage().data_ptr()) == (not k.startswith("c.bias")), k
    assert m.b.weight is m.a.weight and m.a.weight.data_ptr() % huge_pages.ALIGN == 0
    assert m.c.view.untyped_storage().data_ptr() == m.c.weight.untyped_storage().data_ptr()  # still one storage
    assert m.c.view.data_ptr() == m.c.weight[10].data_ptr()
    assert isinstance(m.a.weight, nn.Parameter) and m.a.weight.requires_grad
    m.a.weight.data.mul_(2)  # writable
    assert torch.equal(m.a.weight, 2 * before["a.weight"])
    assert huge_pages.to_huge_pages(m, [m.a.weight]) == 0  # already moved


def test_off_and_small(monkeypatch):
    m = nn.Linear(1024, 1024, bias=False)
    monkeypatch.setenv(huge_pages.ENV, "0")
    assert huge_pages.to_huge_pages(m, [m.weight]) == 0
    monkeypatch.delenv(huge_pages.ENV)
    s = nn.Linear(8, 8)
    assert huge_pages.to_huge_pages(s, [s.weight]) == 0  # under MIN_BYTES: left where it is
    assert not huge_pages._in_arena(s.weight.untyped_storage().data_ptr())


@pytest.mark.parametrize("dtype,weights", [("float32", None), ("float32", "int4")])
def test_engine_on_moved_weights_equals_the_layer_path(dtype, weights, tiny_llama_dir, monkeypatch):
    """Every dense streamed weight moved (MIN_BYTES 0 on the tiny model), packed ones left; the native
    path's greedy tokens and logits equal the layer-by-layer path's."""
    from slimlm import LLM
    from slimlm.model.hub import load
    from slimlm.model.quant.native_layers import ENV
    from tests.model.test_native_layers import _compare

    monkeypatch.setattr(huge_pages, "MIN_BYTES", 0)
    monkeypatch.setenv("SLIMLM_QLINEAR", "fp32")  # the packed kernels with fp32 activations: exact parity
    kw = {} if weights is None else {"weights": weights}
    lm = load(tiny_llama_dir, dtype)
    a = LLM(lm, **kw)
    nl = a.engine.runner.native_layers
    assert nl is not None and (nl.huge_bytes > 0) == (weights is None)
    for layer in a.engine.model.model.layers:
        for mod in (layer.self_attn.qkv, layer.mlp.down_proj):
            t = mod.weight if weights is None else mod.qweight
            assert huge_pages._in_arena(t.untyped_storage().data_ptr()) == (weights is None)
    monkeypatch.setenv(ENV, "0")
    b = LLM(load(tiny_llama_dir, dtype), **kw)
    _compare(a, b, [[5, 9, 33, 71], [100, 3, 17]])


def test_arena_goes_with_its_tensors():
    import gc

    m = nn.Linear(1024, 1024, bias=False)
    assert huge_pages.to_huge_pages(m, [m.weight]) > 0
    ptr = m.weight.data_ptr()
    assert huge_pages._in_arena(ptr)
    del m
    gc.collect()
    assert not huge_pages._in_arena(ptr)  # unmapped with its last tensor; the address may be reused
