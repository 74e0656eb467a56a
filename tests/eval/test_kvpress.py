"""kvpress as an optional eval system (skipped when kvpress is not installed): the decode loop on a
pressed cache equals transformers' greedy when the press removes nothing, a press keeps the share
of the KV its ratio says, and tasks a press cannot score refuse with one line."""

from __future__ import annotations

import pytest

from slimlm.cli import main
from slimlm.eval.kvpress_lm import unavailable

pytestmark = pytest.mark.skipif(unavailable() is not None, reason="kvpress is not installed (optional baseline)")

PROMPT = [5 + (7 * i) % 90 for i in range(100)]


def test_press_that_removes_nothing_matches_transformers_greedy(tiny_llama_dir):
    from slimlm.eval.kvpress_lm import KVPressLM
    from slimlm.eval.lm import TransformersLM

    ref = TransformersLM(tiny_llama_dir).greedy([PROMPT], 12)
    lm = KVPressLM(tiny_llama_dir, press="knorm", ratio=1e-17)  # 1 - 1e-17 == 1.0: kvpress keeps all 99 tokens
    assert lm.greedy([PROMPT], 12) == ref
    assert lm.kept == [len(PROMPT) - 1]


@pytest.mark.parametrize("press", ["streamingllm", "snapkv", "knorm", "observed"])
def test_press_keeps_its_share_and_changes_the_answer_context(tiny_llama_dir, press):
    from slimlm.eval.kvpress_lm import KVPressLM

    lm = KVPressLM(tiny_llama_dir, press=press, ratio=0.5)
    out = lm.greedy([PROMPT], 4)
    assert len(out[0]) <= 4
    assert lm.kept == [int((len(PROMPT) - 1) * 0.5)]


def test_bad_press_and_unscorable_task_are_one_line(tiny_llama_dir, tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text("some prose to score. " * 40)
    args = ["eval", "perplexity", "--model", str(tiny_llama_dir), "--corpus", str(corpus), "--window", "128", "--stride",
            "64", "--system", "kvpress", "--threads", "1"]
    assert main(args) == 2
    assert "prompt log-probabilities" in capsys.readouterr().err
    assert main([*args, "--press", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown press 'nope'") and len(err.splitlines()) == 1
    assert main([*args, "--press-ratio", "1.5"]) == 2


def test_frontier_kvpress_points(tiny_llama_dir, tmp_path):
    from types import SimpleNamespace

    from slimlm.bench.base import BenchSettings
    from slimlm.bench.frontier import Frontier
    from slimlm.errors import SlimLMError
    from slimlm.eval.needle import Needle
    from slimlm.eval.perplexity import Perplexity

    filler = tmp_path / "f.txt"
    filler.write_text("The quick brown fox jumps over the lazy dog. Small models are fast to serve. " * 40)
    corpus = tmp_path / "c.txt"
    corpus.write_text("some prose to score. " * 80)
    tasks = {"needle": Needle(lengths=[200], depths=[0.5], trials=2, filler=str(filler)),
             "perplexity": Perplexity(corpora=[str(corpus)], window=64, stride=32)}
    s = BenchSettings(str(tiny_llama_dir), "float32", 1, {}, 1, log=lambda m: None)
    quality, busy = {}, []
    notes, presses = Frontier.kvpress_quality(SimpleNamespace(kvpress=["snapkv:0.5"]), s, tasks, quality, busy)
    assert set(quality["kvpress-snapkv-0.5"]) == {"needle"}  # perplexity is refused with a note
    assert any("perplexity not scored" in n for n in notes)
    assert presses["kvpress-snapkv-0.5"]["ratio"] == 0.5 and len(presses["kvpress-snapkv-0.5"]["kv_tokens_kept"]) == 2
    quality["baseline"] = {"needle": quality["kvpress-snapkv-0.5"]["needle"]}
    pts = Frontier().points({"summary": {}, "quality": quality, "kvpress": presses})
    assert [p["memory_saved_pct"] for p in pts if p["config"] != "baseline"] == [50.0]
    with pytest.raises(SlimLMError, match="PRESS:RATIO"):
        Frontier.kvpress_quality(SimpleNamespace(kvpress=["snapkv"]), s, tasks, {}, [])
