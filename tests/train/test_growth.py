"""G_stack model growth: the grown model is the stacked function it claims; bad factors; training on."""

from __future__ import annotations

import pytest
import torch

from slimlm.errors import SlimLMError
from slimlm.train.config import GrowthConfig
from slimlm.train.growth import grow, grown_layers, interleave, stack
from slimlm.train.metrics import read_metrics
from slimlm.train.presets import model_config, new_model
from slimlm.train.trainer import Trainer
from tests.train.helpers import tiny_config


def test_stacked_model_equals_the_small_stack_applied_twice():
    small = new_model(model_config("micro", 128).replace(num_layers=3), init_std=0.1, seed=1)
    big = grow(small, "stack", 2)
    assert big.cfg.num_layers == 6
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(10).expand(2, 10)
    with torch.no_grad():
        attn = small.dense_attention(pos)
        h = small.embed(ids)
        cos, sin = small.rotary(pos, h.dtype)
        for _ in range(2):  # [1, 2, 3, 1, 2, 3]
            for layer in small.model.layers:
                h = layer(h, cos, sin, attn)
        torch.testing.assert_close(big(ids), small.head(h), atol=0, rtol=0)
    assert torch.equal(big.model.layers[4].mlp.up_proj.weight, small.model.layers[1].mlp.up_proj.weight)
    assert big.model.layers[4].mlp.up_proj.weight.data_ptr() != small.model.layers[1].mlp.up_proj.weight.data_ptr()


def test_operators_and_bad_factors():
    assert stack(3, 6) == [0, 1, 2, 0, 1, 2] and interleave(3, 6) == [0, 0, 1, 1, 2, 2]
    assert grown_layers(4, 1.5) == 6
    with pytest.raises(SlimLMError, match="model.growth.factor 1.5 gives 4.5 layers from 3"):
        grown_layers(3, 1.5)
    with pytest.raises(SlimLMError, match="model.growth.operator 'tile' is unknown; known: interleave, stack"):
        GrowthConfig(operator="tile")


def test_grow_a_trained_checkpoint_and_keep_training(prepared, tmp_path):
    small = Trainer(tiny_config(prepared, tmp_path / "small", "--model.num_layers", "1"))
    small.fit()
    small.close()
    t = Trainer(tiny_config(prepared, tmp_path / "grown", "--model.growth.source", str(tmp_path / "small"),
                            "--model.growth.factor", "3", "--log.eval_at_start", "true"))
    assert t.model.cfg.num_layers == 3
    t.fit()
    t.close()
    recs = read_metrics(tmp_path / "grown" / "metrics.jsonl")
    val = [r["val_loss/tokens"] for r in recs if "val_loss/tokens" in r]
    assert val[-1] < val[0]
    with pytest.raises(SlimLMError, match="model.growth.factor 2.5 gives 2.5 layers from 1"):
        Trainer(tiny_config(prepared, tmp_path / "bad", "--model.growth.source", str(tmp_path / "small"),
                            "--model.growth.factor", "2.5"))
