"""PELA low-rank factors: exact at full rank, best rank-r error, energy rule, recovery keeps factors."""

from __future__ import annotations

import json

import pytest
import torch

from slimlm.cli import main
from slimlm.compress.lowrank import LowRankConfig, LowRankLinear, factor, lowrank, refactor
from slimlm.errors import SlimLMError
from slimlm.model.hub import load
from tests.conftest import make_hf_model
from tests.train.helpers import tiny_args

from tests.train.conftest import one_thread, prepared, tokenizer_dir  # noqa: F401,E402  (shared fixtures)


@pytest.fixture(scope="module")
def src_dir(tmp_path_factory, tokenizer_dir):
    path = tmp_path_factory.mktemp("lr-src")
    make_hf_model(path, "llama")
    return path


def test_factor_is_the_best_rank_r_approximation():
    W = torch.randn(12, 20, dtype=torch.float64)
    down, up = factor(W, 12)
    torch.testing.assert_close(up @ down, W)  # full rank: exact
    down, up = factor(W, 4)
    S = torch.linalg.svdvals(W)
    torch.testing.assert_close(torch.linalg.norm(W - up @ down), S[4:].norm())  # Eckart-Young
    s = torch.rand(20, dtype=torch.float64) + 0.5
    down, up = factor(W, 20 // 2, s)  # activation-aware: best in the diag(s)-weighted norm
    torch.testing.assert_close(torch.linalg.norm((W - up @ down) * s), torch.linalg.svdvals(W * s)[10:].norm())


def test_energy_picks_the_smallest_rank(src_dir):
    model = load(src_dir).model
    ranks = lowrank(model, LowRankConfig(energy=0.5, targets=["gate_proj"]))
    W = load(src_dir).model.model.layers[0].mlp.gate_proj.weight
    e = torch.cumsum(torch.linalg.svdvals(W) ** 2, 0) / (torch.linalg.svdvals(W) ** 2).sum()
    r = ranks["model.layers.0.mlp.gate_proj"]
    assert e[r - 1] >= 0.5 > e[r - 2]
    assert isinstance(model.model.layers[0].mlp.gate_proj, LowRankLinear)


def test_cli_then_recovery_trains_the_factors(src_dir, prepared, tmp_path, capsys):
    dst = tmp_path / "lr"
    assert main(["lowrank", str(src_dir), str(dst), "--rank", "8", "--calib", str(prepared), "--calib-tokens", "256",
                 "--seq-len", "32", "--activation-aware", "--threads", "1"]) == 0
    err = capsys.readouterr().err
    assert "layers factored (rank 8..8)" in err and "calibration perplexity" in err
    model = load(dst).model  # slimlm loads the factors; the folder's weights are the dense products
    assert isinstance(model.model.layers[0].mlp.up_proj, LowRankLinear)
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in load(src_dir).model.parameters())
    cfg = tmp_path / "d.toml"
    cfg.write_text(f'[model]\ninit_from = "{dst}"\n[distill]\nteacher = "{src_dir}"\nlowrank = true\n')
    assert main(["distill", str(cfg), *tiny_args(prepared, tmp_path / "run")]) == 0
    assert "wrote" in capsys.readouterr().err
    final = tmp_path / "run" / "final"
    assert json.loads((final / "lowrank.json").read_text())["ranks"]["model.layers.0.mlp.up_proj"] == 8
    lin = load(final).model.model.layers[1].mlp.up_proj
    W = (lin.up @ lin.down).detach()
    assert lin.down.shape[0] == 8 and torch.linalg.matrix_rank(W.double(), rtol=1e-6) == 8  # recovery kept rank 8
    before = load(dst).model.model.layers[1].mlp.up_proj
    before = (before.up @ before.down).detach()
    assert not torch.allclose(W, before)  # and did train


@pytest.mark.parametrize("args, msg", [
    (["--rank", "200"], "--rank 200 is larger than model.layers.0.self_attn.q_proj's 64x64 matrix"),
    (["--energy", "1.5"], "--energy must be in (0, 1]"),
    (["--rank", "4", "--targets", "attn"], "lowrank target 'attn' matches no module"),
])
def test_bad_lowrank_input(src_dir, tmp_path, capsys, args, msg):
    assert main(["lowrank", str(src_dir), str(tmp_path / "o"), "--calib-tokens", "64", "--seq-len", "32",
                 "--calib", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert msg in err and not (tmp_path / "o").exists()


def test_config_needs_rank_or_energy():
    with pytest.raises(SlimLMError, match="exactly one of --rank or --energy"):
        LowRankConfig()


def test_engine_serves_the_factors_with_equal_logits(src_dir, tmp_path):
    """A `slimlm lowrank` folder loads factored (x -> down -> up): logits equal to the low-rank model
    in memory, the engine's greedy tokens equal its greedy tokens, and transformers loads the same
    function from the dense products."""
    import copy

    import transformers

    from slimlm.compress.lowrank import save_lowrank
    from slimlm.engine.llm import LLM
    from slimlm.engine.params import SamplingParams

    lm = load(src_dir)
    model = lm.model
    ranks = lowrank(model, LowRankConfig(rank=8))
    factored = copy.deepcopy(model)
    save_lowrank(model, ranks, tmp_path / "lr", lm.tokenizer)
    served = load(tmp_path / "lr").model
    n = sum(isinstance(m, LowRankLinear) for m in served.modules())
    assert n == len(ranks) == 2 * 7
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = factored(ids)
        torch.testing.assert_close(served(ids), ref, rtol=1e-5, atol=1e-5)  # same factors (layouts may differ)
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "lr", attn_implementation="eager")
        torch.testing.assert_close(hf(ids).logits, ref, rtol=1e-4, atol=1e-4)
    prompt = ids[0].tolist()
    out = LLM(str(tmp_path / "lr")).generate([prompt], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True),
                                             use_tqdm=False)[0].outputs[0].token_ids
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(6):
            seq.append(int(factored(torch.tensor([seq]))[0, -1].argmax()))
    assert list(out) == seq[len(prompt):]
