"""The layer-effect measure (angular distance, loss when a layer is dropped) used for Mix-LN."""

from __future__ import annotations

import pytest
import torch

from slimlm.cli import main
from slimlm.data.loader import PackedLoader
from slimlm.data.tokens import TokenDataset
from slimlm.model.weights import save_model_dir
from slimlm.train.layer_effect import layer_effects
from slimlm.train.presets import model_config, new_model


def test_a_layer_that_does_nothing_has_zero_effect(prepared, tmp_path, capsys):
    vocab = TokenDataset(prepared, "val").meta.vocab_size
    model = new_model(model_config("micro", vocab).replace(num_layers=3), init_std=0.1)
    with torch.no_grad():  # a Pre-LN layer with zero output projections is the identity
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    loader = PackedLoader([TokenDataset(prepared, "val")], 32, 2, None, "document", 0, 1, 0, shuffle=False)
    base, eff = layer_effects(model, [loader.next_batch() for _ in range(2)])
    assert eff[2].angular_distance == pytest.approx(0, abs=1e-3) and eff[2].drop_delta == pytest.approx(0, abs=1e-6)
    assert all(e.angular_distance > 0.01 and abs(e.drop_delta) > 1e-4 for e in eff[:2]), eff
    save_model_dir(model, tmp_path / "m")
    assert main(["layer-effect", str(tmp_path / "m"), "--data", str(prepared), "--batches", "2", "--seq-len", "32",
                 "--micro-batch", "2"]) == 0
    out = capsys.readouterr().out
    assert f"held-out loss {base:.4f} (pre-LN)" in out and len(out.strip().splitlines()) == 5
