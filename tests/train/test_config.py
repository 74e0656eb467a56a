"""Typed config: files, overrides and clear errors."""

from __future__ import annotations

import pytest

from slimlm.errors import SlimLMError
from slimlm.train.config import load_config, parse_overrides
from slimlm.train.schedules import WSD, Cosine


def test_file_and_overrides(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('out_dir = "x"\n[data]\ntrain = ["a", "b"]\nweights = [3, 1]\n[schedule]\nname = "wsd"\nlr = 1e-3\n')
    cfg = load_config(f, ["--train.steps", "7", "--data.seq_len=64", "--log.tensorboard", "false",
                          "--schedule.decay-shape", "cosine", "--checkpoint.resume_from", "none"])
    assert cfg.out_dir == "x" and cfg.data.train == ["a", "b"] and cfg.data.weights == [3.0, 1.0]
    assert cfg.train.steps == 7 and cfg.data.seq_len == 64 and cfg.log.tensorboard is False
    assert isinstance(cfg.schedule, WSD) and cfg.schedule.lr == 1e-3 and cfg.schedule.decay_shape == "cosine"
    assert cfg.checkpoint.resume_from is None
    cos = load_config(f, ["--schedule.name", "cosine", "--schedule.min_lr_ratio", "0.05"])
    assert isinstance(cos.schedule, Cosine) and cos.schedule.min_lr_ratio == 0.05
    assert cos.to_dict()["schedule"]["name"] == "cosine"


def test_unknown_keys_list_the_valid_ones(tmp_path):
    with pytest.raises(SlimLMError, match=r"unknown config key 'train.stepz'.*grad_accum.*steps"):
        load_config(None, ["--train.stepz", "3"])
    with pytest.raises(SlimLMError, match=r"unknown config key 'schedule.decay_fraction'.*min_lr_ratio"):
        load_config(None, ["--schedule.name", "cosine", "--schedule.decay_fraction", "0.1"])
    with pytest.raises(SlimLMError, match="unknown config key 'modle'.*model"):
        load_config(None, ["--modle.preset", "micro"])
    with pytest.raises(SlimLMError, match="unknown schedule 'cosnie'; known: constant, cosine"):
        load_config(None, ["--schedule.name", "cosnie"])


def test_bad_values():
    with pytest.raises(SlimLMError, match="train.steps.*int"):
        load_config(None, ["--train.steps", "ten"])
    with pytest.raises(SlimLMError, match="packing"):
        load_config(None, ["--data.packing", "zip"])
    with pytest.raises(SlimLMError, match="precision"):
        load_config(None, ["--train.precision", "fp8"])
    with pytest.raises(SlimLMError, match="needs a value"):
        parse_overrides(["--train.steps"])
    with pytest.raises(SlimLMError, match="not found"):
        load_config("/nonexistent.toml")
