"""μP (model/mup.py): multipliers equal the formula, μP at the base width is the standard
parameterization, the forward is the SP forward with the multipliers folded into the weights,
the trainer applies the per-layer lr multipliers, resume is step-exact, bad values are one-line
errors."""

from __future__ import annotations

import math

import pytest
import torch

from slimlm.model import mup
from slimlm.model.config import ModelConfig
from slimlm.model.transformer import CausalLM
from slimlm.train.config import OptimConfig
from slimlm.train.optimizers import build_optimizer
from slimlm.train.presets import model_config, new_model
from tests.train.helpers import losses_after_kill_and_resume, tiny_args, tiny_config
from tests.train.test_cli import one_line_error

MUP = dict(parameterization="mup", mup_base_width=32, mup_input_multiplier=3.0, mup_output_multiplier=2.0)


def wide(hidden: int = 128, heads: int = 8, **kw) -> ModelConfig:
    """micro shape at another width (head_dim 16 kept, heads added)."""
    return model_config("micro", 96).replace(hidden_size=hidden, num_heads=heads, num_kv_heads=heads // 2,
                                              head_dim=0, intermediate_size=2 * hidden, **kw)


def test_multipliers_match_the_formula():
    cfg = wide(128, 8, **MUP, mup_base_head_dim=8)  # m = 128 / 32 = 4, head_dim 16
    m = 4.0
    assert mup.width_multiplier(cfg) == m
    assert mup.embedding_multiplier(cfg) == 3.0
    assert mup.logit_multiplier(cfg) == 2.0 / m
    assert mup.attention_scale(cfg) == pytest.approx(math.sqrt(8) / 16)
    assert mup.attention_scale(cfg.replace(mup_base_head_dim=0)) == pytest.approx(16**-0.5)  # heads scale: 1/sqrt(d)
    assert mup.lr_multiplier(cfg, "model.layers.0.self_attn.q_proj.weight", 2) == 1 / m
    assert mup.lr_multiplier(cfg, "model.layers.1.mlp.down_proj.weight", 2) == 1 / m
    for name, nd in (("model.embed_tokens.weight", 2), ("lm_head.weight", 2), ("model.layers.0.input_layernorm.weight", 1)):
        assert mup.lr_multiplier(cfg, name, nd) == 1.0 and mup.init_scale(cfg, name, nd) == 1.0
    assert mup.init_scale(cfg, "model.layers.0.mlp.up_proj.weight", 2) == m**-0.5
    sp = wide(128, 8)
    assert (mup.width_multiplier(sp), mup.logit_multiplier(sp), mup.embedding_multiplier(sp)) == (1.0, 1.0, 1.0)
    assert mup.attention_scale(sp) == 16**-0.5


def test_init_std_and_lr_groups_follow_the_width():
    cfg = wide(256, 16, parameterization="mup", mup_base_width=32)  # m = 8
    model = new_model(cfg, init_std=0.02, seed=0)
    layer = model.model.layers[0]
    L = cfg.num_layers
    assert layer.mlp.up_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(8), rel=0.03)
    assert layer.mlp.down_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(2 * L) / math.sqrt(8), rel=0.03)
    assert model.model.embed_tokens.weight.std().item() == pytest.approx(0.02, rel=0.03)
    opt = build_optimizer(model, OptimConfig(), cfg)
    mults = {id(p): g["lr_mult"] for g in opt.param_groups for p in g["params"]}
    for n, p in model.named_parameters():
        want = 1 / 8 if (p.dim() == 2 and "layers." in n) else 1.0
        assert mults[id(p)] == want, n
    # weight decay groups are kept: norms have none, matrices do
    assert all(g["weight_decay"] == (0.1 if g["params"][0].dim() == 2 else 0.0) for g in opt.param_groups)


def test_mup_at_the_base_width_is_the_standard_parameterization():
    sp = wide(64, 4)
    mp = sp.replace(parameterization="mup", mup_base_width=64)
    a, b = new_model(sp, seed=3), new_model(mp, seed=3)
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), n
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    assert torch.equal(a(ids), b(ids))
    assert all(g.get("lr_mult", 1.0) == 1.0 for g in build_optimizer(b, OptimConfig(), mp).param_groups)


def test_mup_forward_is_sp_with_the_multipliers_folded_into_the_weights():
    cfg = wide(128, 8, **MUP, mup_base_head_dim=8, tie_word_embeddings=False)
    model = new_model(cfg, seed=1)
    sp = CausalLM(cfg.replace(parameterization="standard"))
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["model.embed_tokens.weight"] *= 3.0                      # input multiplier
    sd["lm_head.weight"] *= 2.0 / 4.0                           # output multiplier / m
    for i in range(cfg.num_layers):                             # 1/d attention: fold the ratio into q
        sd[f"model.layers.{i}.self_attn.q_proj.weight"] *= mup.attention_scale(cfg) / 16**-0.5
    sp.load_state_dict(sd)
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), sp(ids), atol=1e-5, rtol=1e-5)


def test_config_json_round_trip_keeps_mup(tmp_path):
    from slimlm.model.hub import load
    from slimlm.model.weights import save_model_dir

    cfg = wide(128, 8, **MUP)
    model = new_model(cfg, seed=0)
    hf = cfg.to_hf()
    assert hf["parameterization"] == "mup" and hf["mup_base_width"] == 32
    assert mup.logit_multiplier(ModelConfig.from_hf(hf)) == 2.0 / 4.0
    assert "parameterization" not in wide(128, 8).to_hf()  # SP checkpoints keep transformers' keys only
    save_model_dir(model, tmp_path / "m")
    back = load(str(tmp_path / "m")).model.float()
    ids = torch.randint(0, 96, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(back(ids), model(ids))


def test_trainer_applies_the_lr_multipliers(prepared, tmp_path):
    from slimlm.train.trainer import Trainer

    cfg = tiny_config(prepared, tmp_path / "r", "--model.parameterization", "mup", "--model.mup.base_width", "16",
                      "--train.steps", "2", "--schedule.warmup_steps", "0", "--schedule.name", "constant")
    t = Trainer(cfg)
    try:
        assert t.model.cfg.parameterization == "mup" and mup.width_multiplier(t.model.cfg) == 4.0  # micro: 64 / 16
        t.update()
        lrs = {g["lr_mult"]: g["lr"] for g in t.optimizer.param_groups}
        assert lrs == {1.0: pytest.approx(3e-3), 0.25: pytest.approx(3e-3 / 4)}
    finally:
        t.close()


def test_width_overrides_shape_the_model(prepared, tmp_path):
    from slimlm.train.build import build_model, train_datasets

    cfg = tiny_config(prepared, tmp_path / "w", "--model.hidden_size", "96", "--model.num_heads", "6",
                      "--model.num_kv_heads", "3", "--model.intermediate_size", "160")
    model, _ = build_model(cfg, train_datasets(cfg)[0])
    c = model.cfg
    assert (c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size) == (96, 6, 3, 16, 160)


def test_resume_is_step_exact_with_mup(prepared, tmp_path):
    got = losses_after_kill_and_resume(prepared, tmp_path, "--model.parameterization", "mup",
                                       "--model.mup.base_width", "32", "--model.mup.input_multiplier", "2")
    assert got["ref"] == got["cut"] and len(got["ref"]) == 6


def test_bad_values_are_one_line_errors(prepared, tmp_path, capsys):
    with pytest.raises(ValueError, match="mup_base_width"):
        wide(parameterization="mup", mup_base_width=0)
    with pytest.raises(ValueError, match="mup_output_multiplier"):
        wide(parameterization="mup", mup_base_width=32, mup_output_multiplier=-1.0)
    with pytest.raises(ValueError, match="parameterization"):
        wide(parameterization="ntk")
    cfg = tmp_path / "c.toml"
    cfg.write_text('[train]\nsteps = 2\n')
    base = ["train", str(cfg), *tiny_args(prepared, tmp_path / "b")]
    one_line_error(capsys, [*base, "--model.parameterization", "mu"], "model.parameterization", "standard or mup")
    one_line_error(capsys, [*base, "--model.parameterization", "mup", "--model.mup.base_width", "0"],
                   "model.mup.base_width")
    one_line_error(capsys, [*base, "--model.parameterization", "mup", "--model.mup.output_multiplier", "0"],
                   "model.mup.output_multiplier")
    one_line_error(capsys, [*base, "--model.hidden_size", "90"], "model.hidden_size 90", "model.num_heads 4")
    one_line_error(capsys, [*base, "--model.hidden_size", "100"], "odd head width 25")
    one_line_error(capsys, [*base, "--model.num_kv_heads", "3"], "num_kv_heads")


def test_runs_lr_sweep_groups_by_width_and_parameterization(prepared, tmp_path, capsys):
    from slimlm.cli import main

    cfg = tmp_path / "c.toml"
    cfg.write_text('[train]\nsteps = 2\n')
    runs = []
    for par, lr in (("standard", "1e-3"), ("standard", "1e-2"), ("mup", "1e-3")):
        run = tmp_path / f"{par}-{lr}"
        assert main(["train", str(cfg), *tiny_args(prepared, run, "--train.steps", "2", "--schedule.lr", lr,
                                                   "--model.parameterization", par, "--model.mup.base_width", "32")]) == 0
        runs.append(str(run))
    capsys.readouterr()
    assert main(["runs", "lr-sweep", *runs, "--out", str(tmp_path / "s.png")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[2:] == ["1.00e-03", "1.00e-02", "best", "lr"]
    std = next(r for r in out if r.startswith("standard")).split()
    mp = next(r for r in out if r.startswith("mup")).split()
    assert std[1] == "64" and mp[1] == "64" and mp[3] == "-"
    from slimlm.train.compare import summarize

    finals = [summarize(r).final_val for r in runs]
    assert float(std[2]) == pytest.approx(finals[0], abs=1e-4) and float(std[3]) == pytest.approx(finals[1], abs=1e-4)
    assert std[4] == ("1.00e-03" if finals[0] < finals[1] else "1.00e-02")
    assert (tmp_path / "s.png").stat().st_size > 1000
    one_line_error(capsys, ["runs", "lr-sweep", str(tmp_path)], "no good checkpoint")
    assert main(["runs", "lr-sweep", *runs[:2], "--shared-width", "64"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert [r.split()[2:4] for r in rows[1:]] == [std[2:4], std[2:4]] and rows[1].startswith("mup")
