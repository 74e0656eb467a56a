"""MiniPLM / SALT selection: deterministic, keeps the highest-gap documents, a normal prepared folder."""

from __future__ import annotations

import json

import numpy as np
import pytest

from slimlm.cli import main
from slimlm.compress.select import choose, doc_logprob
from slimlm.data.tokens import TokenDataset
from slimlm.model.hub import load
from tests.conftest import make_hf_model

from tests.train.conftest import one_thread, prepared, tokenizer_dir  # noqa: F401,E402  (shared fixtures)


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer_dir):
    t, r = tmp_path_factory.mktemp("teacher"), tmp_path_factory.mktemp("ref")
    make_hf_model(t, "llama", seed=1)
    make_hf_model(r, "llama", seed=2, num_hidden_layers=1)
    return t, r


def test_choose_keeps_the_top_scores_ties_by_index():
    s = np.array([0.1, 0.9, 0.5, 0.9, -1.0, 0.5])
    assert choose(s, 0.5).tolist() == [1, 2, 3]
    assert choose(s, 1 / 3, skip_highest=1 / 3).tolist() == [2, 5]


def test_miniplm_selection_is_deterministic_and_keeps_the_largest_gaps(prepared, models, tmp_path, capsys):
    teacher, ref = models
    args = ["select", str(prepared), None, "--teacher", str(teacher), "--reference", str(ref), "--keep", "0.25",
            "--max-tokens", "32", "--threads", "1"]
    for out in ("a", "b"):
        args[2] = str(tmp_path / out)
        assert main(args) == 0
    assert "kept 9 of 36 documents" in capsys.readouterr().err
    a, b = (tmp_path / "a"), (tmp_path / "b")
    assert (a / "train.bin").read_bytes() == (b / "train.bin").read_bytes()
    src = TokenDataset(prepared, "train")
    gap = doc_logprob(load(teacher).model, src, 32) - doc_logprob(load(ref).model, src, 32)
    kept = json.loads((a / "selection.json").read_text())["kept"]
    assert min(gap[kept]) >= max(np.delete(gap, kept))
    sel = TokenDataset(a, "train")  # a normal prepared folder: documents in their original order
    assert sel.n_docs == 9 and all(np.array_equal(sel.doc(j), src.doc(i)) for j, i in enumerate(kept))
    assert main(args) == 2 and "exists" in capsys.readouterr().err  # never overwrites


def test_salt_keeps_the_learnable_documents(prepared, models, tmp_path):
    teacher, _ = models
    assert main(["select", str(prepared), str(tmp_path / "s"), "--teacher", str(teacher), "--method", "salt",
                 "--keep", "0.5", "--skip-easiest", "0.25", "--max-tokens", "32", "--threads", "1"]) == 0
    info = json.loads((tmp_path / "s" / "selection.json").read_text())
    lp = np.array(info["scores"])
    order = sorted(range(len(lp)), key=lambda i: (-lp[i], i))
    assert info["kept"] == sorted(order[9:27])


def test_miniplm_needs_a_reference(prepared, models, tmp_path, capsys):
    assert main(["select", str(prepared), str(tmp_path / "x"), "--teacher", str(models[0])]) == 2
    assert "needs --reference" in capsys.readouterr().err


def test_random_baseline_is_seeded_and_needs_no_model(prepared, tmp_path, capsys):
    from slimlm.data.tokens import TokenDataset

    for name in ("a", "b"):
        assert main(["select", str(prepared), str(tmp_path / name), "--method", "random", "--keep", "0.5"]) == 0
    assert "at random (seed 0)" in capsys.readouterr().err
    assert (tmp_path / "a" / "train.bin").read_bytes() == (tmp_path / "b" / "train.bin").read_bytes()
    assert TokenDataset(tmp_path / "a", "train").n_docs == round(0.5 * TokenDataset(prepared, "train").n_docs)
    assert main(["select", str(prepared), str(tmp_path / "c"), "--method", "salt"]) == 2
    assert "--method salt needs --teacher" in capsys.readouterr().err
