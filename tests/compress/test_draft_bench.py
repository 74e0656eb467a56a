"""The draft loop on tiny models: a pruned draft serves the target losslessly; a draft equal to the
target is always accepted."""

from __future__ import annotations

import pytest

from slimlm.cli import main
from slimlm.compress.draft_bench import draft_bench
from tests.conftest import make_hf_model


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("target")
    make_hf_model(path, "llama", num_hidden_layers=3)
    return path


def test_a_draft_equal_to_the_target_is_always_accepted(target_dir, monkeypatch):
    monkeypatch.setattr("slimlm.bench.workloads.text_prompt", lambda tok, n: list(range(3, 3 + n)))
    r = draft_bench(str(target_dir), str(target_dir), k=3, prompt_tokens=8, max_tokens=12, repeats=1)
    assert r.identical and r.acceptance == 1.0 and r.tokens_per_step > 2.5


def test_pruned_draft_is_lossless_through_the_cli(target_dir, tmp_path, capsys, monkeypatch):
    from tests.data.conftest import make_corpus

    monkeypatch.setattr("slimlm.bench.workloads.text_prompt", lambda tok, n: list(range(3, 3 + n)))
    draft = tmp_path / "draft"
    assert main(["prune", str(target_dir), str(draft), "--calib", str(make_corpus(tmp_path / "c", 4)),
                 "--calib-tokens", "128", "--seq-len", "32", "--layers", "1", "--threads", "1"]) == 0
    assert main(["draft-bench", str(draft), "--target", str(target_dir), "--k", "2", "--prompt-tokens", "8",
                 "--max-tokens", "10", "--repeats", "1", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "outputs identical: True" in out and "acceptance rate" in out and "FLOPs model: draft cost" in out


def test_break_even_of_the_flops_model(target_dir):
    from slimlm.compress.draft_bench import cost_ratio, matmul_params, needed
    from slimlm.model.hub import load

    m = load(str(target_dir)).model
    per_layer = sum(p.numel() for p in m.model.layers[0].parameters() if p.dim() == 2)
    assert matmul_params(m) == 3 * per_layer + m.lm_head.weight.numel()
    assert cost_ratio(m, m) == 1.0
    # c = 0.42, k = 4: a step costs 2.68 target steps; break-even = 2.68 tokens per step = acceptance 0.42
    assert needed(0.42, 4) == pytest.approx((2.68, 0.42))
    assert needed(0.42, 4, 1.5) == pytest.approx((4.02, 0.755))
    assert needed(0.42, 1, 1.5) == (pytest.approx(2.13), None)  # more than k + 1 = 2 tokens: unreachable
    with pytest.raises(ValueError):
        needed(0.4, 0)
