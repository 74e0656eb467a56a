"""GaLore and GradNormLoRP: the projected step against galore-torch, weight-norm gradients against
autograd, bad ranks, resume step-exactly, state memory."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import pytest
import torch

from slimlm.errors import SlimLMError
from slimlm.train.config import LowRankConfig, OptimConfig
from slimlm.train.galore import state_bytes
from slimlm.train.gradnorm_lorp import weight_norm_grads
from slimlm.train.optimizers import build_optimizer, lowrank_groups
from slimlm.train.presets import model_config, new_model
from tests.train.helpers import losses_after_kill_and_resume

LOWRANK = LowRankConfig(rank=8, update_proj_gap=2, scale=0.25)


@pytest.fixture
def galore_torch_adamw(monkeypatch):
    """galore-torch's AdamW (optional test extra `galore`). Its package __init__ imports the 8-bit
    optimizer and with it bitsandbytes, which we do not need: load the submodules alone."""
    spec = importlib.util.find_spec("galore_torch")
    if spec is None:
        pytest.skip("galore-torch is not installed (pip install 'slimlm[galore]')")
    pkg = types.ModuleType("galore_torch")
    pkg.__path__ = list(spec.submodule_search_locations)
    monkeypatch.setitem(sys.modules, "galore_torch", pkg)
    mod = importlib.import_module("galore_torch.adamw")
    yield mod.AdamW
    for name in ("galore_torch.adamw", "galore_torch.galore_projector"):
        sys.modules.pop(name, None)


def batches(n: int, vocab: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (2, 16), generator=g) for _ in range(n)]


def loss(model, ids: torch.Tensor) -> torch.Tensor:
    logits = model(ids[:, :-1])
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())


def test_galore_step_equals_galore_torch(galore_torch_adamw):
    cfg = model_config("micro", 128)
    ours, ref = new_model(cfg, seed=0), new_model(cfg, seed=0)
    opt = build_optimizer(ours, OptimConfig(name="galore", betas=[0.9, 0.95], weight_decay=0.1, galore=LOWRANK))
    groups = lowrank_groups(ref, 0.1)
    groups[0].update(rank=8, update_proj_gap=2, scale=0.25, proj_type="std")
    ref_opt = galore_torch_adamw(groups, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, no_deprecation_warning=True)
    for g in opt.param_groups:
        g["lr"] = 1e-2
    shapes = set()
    for ids in batches(5, 128):  # projector refreshed at updates 0, 2, 4
        for model, o in ((ours, opt), (ref, ref_opt)):
            o.zero_grad()
            loss(model, ids).backward()
            o.step()
        for (name, a), b in zip(ours.named_parameters(), ref.parameters()):
            assert torch.equal(a, b), name  # same arithmetic in the same order: bit for bit
    for p in opt.param_groups[0]["params"]:
        st = opt.state[p]
        shapes.add(tuple(st["exp_avg"].shape))
        assert min(st["exp_avg"].shape) == 8  # the moments live in the rank-8 subspace
    assert (128, 8) in shapes and (8, 128) in shapes  # both sides (m >= n: right; m < n: left) were used


def test_galore_state_is_smaller_than_adamw():
    cfg = model_config("micro", 128)
    sizes = {}
    for name in ("adamw", "galore", "gradnorm_lorp"):
        model = new_model(cfg, seed=0)
        opt = build_optimizer(model, OptimConfig(name=name, galore=LOWRANK))
        for g in opt.param_groups:
            g["lr"] = 1e-3
        loss(model, batches(1, 128)[0]).backward()
        opt.step()
        sizes[name] = state_bytes(opt)
    assert sizes["galore"] < 0.6 * sizes["adamw"] and sizes["gradnorm_lorp"] < 0.6 * sizes["adamw"], sizes


def test_weight_norm_gradients_equal_autograd():
    torch.manual_seed(0)
    w, c = torch.randn(6, 5), torch.randn(6, 5)
    g0, d, grad_g, grad_v = weight_norm_grads(w, c)  # L = sum(W * C): dL/dW = C
    g = g0.clone().requires_grad_(True)
    v = d.clone().requires_grad_(True)
    ((g * v / v.norm(dim=1, keepdim=True)) * c).sum().backward()
    torch.testing.assert_close(grad_g, g.grad)
    torch.testing.assert_close(grad_v, v.grad)
    torch.testing.assert_close(g0 * d, w)


def test_a_rank_above_a_matrix_dimension_is_refused_before_any_step():
    model = new_model(model_config("micro", 128))
    with pytest.raises(SlimLMError, match=r"optim.galore.rank 65 is larger than a dimension of "
                                          r"model.layers.0.self_attn.q_proj.weight \(64 x 64\); valid: 1 to 32"):
        build_optimizer(model, OptimConfig(name="galore", galore=LowRankConfig(rank=65)))
    with pytest.raises(SlimLMError, match="optim.galore.proj_type must be std, left or right"):
        LowRankConfig(proj_type="both")


@pytest.mark.parametrize("name", ["galore", "gradnorm_lorp"])
def test_kill_and_resume_is_step_exact(prepared, tmp_path, name):
    extra = ("--optim.name", name, "--optim.galore.rank", "4", "--optim.galore.update_proj_gap", "2")

    curve = losses_after_kill_and_resume(prepared, tmp_path, *extra)
    assert curve["cut"] == curve["ref"] and len(curve["ref"]) == 6
    assert curve["ref"][6] < curve["ref"][1]


def test_runs_compare_reports_memory_loss_and_tokens_to_reach(tmp_path, capsys):
    import json

    from slimlm.cli import main
    from slimlm.train.compare import tokens_to_reach

    assert tokens_to_reach([(100, 5.0), (200, 4.0), (300, 3.0)], 3.5) == 250.0
    assert tokens_to_reach([(100, 5.0)], 4.0) is None
    for name, mem, vals in (("base", 1000, [5.0, 4.0]), ("low", 400, [4.5, 3.5])):
        (tmp_path / name).mkdir()
        recs = [{"step": 1, "optim_state_bytes": mem}, {"step": 1, "loss": 6.0, "tokens": 100, "tok_per_s": 50.0},
                {"step": 1, "val_loss/x": vals[0]}, {"step": 2, "loss": 5.0, "tokens": 200, "tok_per_s": 70.0},
                {"step": 2, "val_loss/x": vals[1]}]
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert main(["runs", "compare", str(tmp_path / "base"), str(tmp_path / "low")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[2].split() == ["low", "3.5000", "-12.50%", "0.0", "-60.0%", "60", "200", "150"]
