"""Fused q/k/v and gate/up projections (model/fuse.py): same function, same weights, no copy.

Tolerance: a fused matmul sums the same products as the separate ones, possibly blocked
differently, so outputs agree to fp32 rounding (1e-5 relative), not bit for bit.
"""

from __future__ import annotations

import pytest
import torch

from slimlm.model.fuse import fuse_projections
from slimlm.model.hub import load
from slimlm.model.quant import quantize_model


def _logits(model, ids):
    with torch.inference_mode():
        return model(ids)


@pytest.mark.parametrize("weights", ["dense", "int8", "int4"])
def test_fused_model_computes_the_same_logits_without_extra_memory(tiny_llama_dir, weights):
    lm = load(str(tiny_llama_dir), "float32")
    if weights != "dense":
        quantize_model(lm.model, weights, 32)
    ids = torch.randint(3, 100, (2, 12))
    ref = _logits(lm.model, ids)
    keys = list(lm.model.state_dict())
    nbytes = sum(t.untyped_storage().nbytes() for t in lm.model.state_dict().values())
    assert fuse_projections(lm.model) == 2 * lm.model.cfg.num_layers
    got = _logits(lm.model, ids)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert list(lm.model.state_dict()) == keys  # checkpoints and parameters() are unchanged
    # every projection now views the fused storage: storages shrink to one per group
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in lm.model.state_dict().values()}
    assert sum(storages.values()) <= nbytes
    a = lm.model.model.layers[0].self_attn
    assert a.q_proj.weight.data_ptr() == a.qkv.weight.data_ptr() if weights == "dense" else \
        a.q_proj.qweight.data_ptr() == a.qkv.qweight.data_ptr()


def test_a_replaced_or_moved_projection_is_never_served_stale(tiny_llama_dir):
    lm = load(str(tiny_llama_dir), "float32")
    fuse_projections(lm.model)
    ids = torch.randint(3, 100, (1, 9))
    layer = lm.model.model.layers[1]
    new = torch.nn.Linear(layer.self_attn.q_proj.in_features, layer.self_attn.q_proj.out_features, bias=False)
    layer.self_attn.q_proj = new  # e.g. an adapter swapped in after fusion
    unfused = load(str(tiny_llama_dir), "float32")
    unfused.model.model.layers[1].self_attn.q_proj.weight.data.copy_(new.weight.data)
    torch.testing.assert_close(_logits(lm.model, ids), _logits(unfused.model, ids), rtol=1e-5, atol=1e-5)
    lm.model.to(torch.bfloat16)  # new storage for every parameter: the fused path steps aside
    unfused.model.to(torch.bfloat16)
    torch.testing.assert_close(_logits(lm.model, ids), _logits(unfused.model, ids))


def test_fusion_can_be_switched_off(tiny_llama_dir, monkeypatch):
    monkeypatch.setenv("SLIMLM_FUSE", "0")
    lm = load(str(tiny_llama_dir), "float32")
    assert fuse_projections(lm.model) == 0
    assert lm.model.model.layers[0].self_attn.qkv is None
