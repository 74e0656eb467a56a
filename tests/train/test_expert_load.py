"""Per-domain expert load (train/expert_load.py): the router's choices counted exactly, the
specialization measure's bounds, and `slimlm expert-load` end to end with its bad input."""

from __future__ import annotations

import math

import pytest
import torch

from slimlm.data.packing import collate
from slimlm.model.moe import MoEMLP
from slimlm.train.expert_load import LayerLoad, expert_load
from tests.train.test_cli import one_line_error
from tests.train.test_moe import moe_model


def batch(seed, B=2, T=12):
    from slimlm.data.loader import PackedLoader  # noqa: F401  (Batch built directly below)
    from slimlm.data.packing import Batch

    ids = torch.randint(0, 128, (B, T), generator=torch.Generator().manual_seed(seed))
    pos = torch.arange(T).expand(B, T)
    return Batch(ids, ids, pos, None, ids.numel())


def test_counts_equal_the_routers_choices_in_training_mode():
    model = moe_model()
    doms = {"a": [batch(0), batch(1)], "b": [batch(2)]}
    loads = expert_load(model, doms)
    model.train()
    for name, bs in doms.items():
        want = [torch.zeros(4, dtype=torch.float64) for _ in loads]
        for b in bs:
            model(b.input_ids, b.position_ids)
            for i, m in enumerate(m for m in model.modules() if isinstance(m, MoEMLP)):
                want[i] += torch.bincount(m.router_choice.flatten(), minlength=4).double()
        for i, ld in enumerate(loads):
            assert ld.shares[name] == pytest.approx((want[i] / want[i].sum()).tolist(), abs=1e-12)


def test_specialization_bounds():
    same = LayerLoad(0, {"code": [0.25] * 4, "prose": [0.25] * 4})
    assert same.js_divergence() == pytest.approx(0.0, abs=1e-12) and same.entropy("code") == pytest.approx(1.0)
    apart = LayerLoad(0, {"code": [0.5, 0.5, 0, 0], "prose": [0, 0, 0.5, 0.5]})
    assert apart.js_divergence() == pytest.approx(1.0) and apart.entropy("code") == pytest.approx(0.5)


def test_cli_expert_load(prepared, tmp_path, capsys):
    from slimlm.cli import main
    from slimlm.model.weights import save_model_dir
    from slimlm.train.presets import model_config, new_model

    from slimlm.data.tokens import TokenDataset

    vocab = -(-TokenDataset(prepared, "val").meta.vocab_size // 64) * 64
    model = new_model(model_config("micro", vocab).replace(num_experts=4, num_experts_per_tok=2,
                                                           moe_intermediate_size=32), seed=0)
    save_model_dir(model, tmp_path / "moe")
    capsys.readouterr()
    assert main(["expert-load", str(tmp_path / "moe"), "--data", f"a={prepared}", "--data", f"b={prepared}",
                 "--batches", "1", "--micro-batch", "2", "--seq-len", "32"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].split()[:4] == ["layer", "entropy[a]", "entropy[b]", "specialization(JS"]
    assert "mean specialization over layers: 0.0000 bits" in out[-1]  # the same data twice
    one_line_error(capsys, ["expert-load", str(tmp_path / "moe"), "--data", str(prepared)], "NAME=FOLDER")
    save_model_dir(new_model(model_config("micro", 64).replace(num_experts=4, moe_intermediate_size=32)), tmp_path / "small")
    one_line_error(capsys, ["expert-load", str(tmp_path / "small"), "--data", f"a={prepared}"], "vocabulary")
    save_model_dir(new_model(model_config("micro", vocab)), tmp_path / "dense")
    one_line_error(capsys, ["expert-load", str(tmp_path / "dense"), "--data", f"a={prepared}"],
                   "no mixture-of-experts layers")
