"""Quality tasks on tiny models: scoring through the engine equals transformers, a broken engine
configuration shows up as a quality drop, results are deterministic, bad input is one line."""

from __future__ import annotations

import json

import pytest

from slimlm.cli import main
from slimlm.eval.mc import format_example, load_examples
from slimlm.eval.needle import answer_correct, build_prompt
from slimlm.eval.perplexity import windows

BROKEN = ["--kv-policy", "sink", "--kv-policy-arg", "window=1", "--kv-policy-arg", "sink=0"]
"""A KV policy that keeps no context at all: every token sees only itself."""


def run_eval(args, tmp_path, name="out.json"):
    out = tmp_path / name
    assert main(["eval", *args, "--threads", "1", "--json", str(out)]) == 0
    return json.loads(out.read_text())


def ppl_args(model, corpus):
    return ["perplexity", "--model", str(model), "--corpus", str(corpus), "--window", "128", "--stride", "64"]


@pytest.mark.parametrize("n,window,stride", [(2, 8, 4), (10, 4, 2), (100, 32, 16), (97, 32, 32), (33, 64, 16)])
def test_windows_score_every_position_once_with_context(n, window, stride):
    scored = []
    for b, e, first in windows(n, window, stride):
        assert e - b <= window and b < first <= e
        scored += range(first, e)
        if b > 0:
            assert first - b >= window - stride  # every scored token keeps at least window - stride context
    assert scored == list(range(1, n))


def test_engine_perplexity_equals_transformers(tiny_llama_dir, tiny_data, tmp_path):
    eng = run_eval(ppl_args(tiny_llama_dir, tiny_data["corpus"]), tmp_path, "eng.json")
    hf = run_eval([*ppl_args(tiny_llama_dir, tiny_data["corpus"]), "--system", "transformers"], tmp_path, "hf.json")
    (e,), (h,) = eng["results"]["corpora"].values(), hf["results"]["corpora"].values()
    assert e["tokens_scored"] == h["tokens_scored"] > 1000
    assert e["ppl"] == pytest.approx(h["ppl"], rel=1e-4)
    assert eng["kind"] == "eval" and eng["task"] == "perplexity" and eng["command"].startswith("slimlm eval perplexity")
    assert {"cpu", "cores", "threads", "torch"} <= set(eng["machine"])


def test_broken_configuration_shows_as_a_quality_drop(trained_dir, tiny_data, tmp_path):
    good = run_eval(ppl_args(trained_dir, tiny_data["corpus"]), tmp_path, "good.json")
    again = run_eval(ppl_args(trained_dir, tiny_data["corpus"]), tmp_path, "again.json")
    bad = run_eval([*ppl_args(trained_dir, tiny_data["corpus"]), *BROKEN], tmp_path, "bad.json")
    g, a, b = (next(iter(r["results"]["corpora"].values()))["ppl"] for r in (good, again, bad))
    assert g == a  # deterministic: the same settings give the same number
    assert g < 1.5  # the trained model knows its corpus
    assert b > 1.3 * g, (g, b)
    assert bad["settings"]["engine"]["kv_policy"] == "sink"


def test_needle_prompt_has_the_length_and_the_needle_at_its_depth(tiny_llama_dir, tiny_data):
    from slimlm.model.hub import load

    tok = load(tiny_llama_dir).tokenizer
    filler = tok.encode(tiny_data["filler"].read_text(), add_special_tokens=False)
    for depth in (0.0, 0.5, 1.0):
        ids, at = build_prompt(tok, filler, 200, depth, "12345", offset=7)
        assert len(ids) == 200
        text = tok.decode(ids)
        assert "The secret passkey is 12345." in text and text.endswith("The secret passkey is")
        assert at <= round(depth * 200)  # the needle moves back to a sentence end, never forward
    before = tok.decode(build_prompt(tok, filler, 200, 0.9, "12345", 7)[0])
    assert before.index("12345") > len(before) // 2
    assert answer_correct(" 12345. Remember", "12345") and not answer_correct(" 1234 5", "12345")


def test_needle_grid_is_deterministic_and_skips_what_does_not_fit(tiny_llama_dir, tiny_data, tmp_path):
    args = ["needle", "--model", str(tiny_llama_dir), "--filler", str(tiny_data["filler"]),
            "--lengths", "150,200,400", "--depths", "0.2,0.8", "--trials", "2"]
    r1, r2 = run_eval(args, tmp_path, "n1.json"), run_eval(args, tmp_path, "n2.json")
    grid = r1["results"]["grid"]
    assert list(grid) == ["150", "200", "400"] and list(grid["150"]) == ["0.2", "0.8"]
    assert grid["400"] == {"0.2": None, "0.8": None}
    assert any("400 skipped" in n for n in r1["notes"])
    assert all(0 <= v <= 1 for row in list(grid.values())[:2] for v in row.values())
    assert [t["key"] for t in r1["results"]["trials"]] == [t["key"] for t in r2["results"]["trials"]]
    assert r1["results"] == r2["results"]
    assert len(r1["results"]["trials"]) == 2 * 2 * 2


def test_needle_runs_past_the_trained_context_with_a_rope_extension(tiny_llama_dir, tiny_data, tmp_path):
    args = ["needle", "--model", str(tiny_llama_dir), "--filler", str(tiny_data["filler"]),
            "--lengths", "200,400", "--depths", "0.5", "--trials", "1", "--rope-extension", "dca",
            "--rope-extension-arg", "chunk_size=128", "--rope-extension-arg", "context=512"]
    r = run_eval(args, tmp_path, "dca.json")
    grid = r["results"]["grid"]
    assert grid["400"]["0.5"] is not None and not any("skipped" in n for n in r["notes"])
    assert any("length 400 is past the model's trained context (256)" in n for n in r["notes"])
    assert not any("length 200 " in n for n in r["notes"])


def test_needle_reports_the_share_of_attention_sparse_prefill_computed(tiny_llama_dir, tiny_data, tmp_path):
    args = ["needle", "--model", str(tiny_llama_dir), "--filler", str(tiny_data["filler"]), "--lengths", "200",
            "--depths", "0.5", "--trials", "1", "--sparse-prefill", "vertical-slash", "--max-num-batched-tokens", "64"]
    sparse = ["--sparse-prefill-arg", "min_keys=100", "--sparse-prefill-arg", "vertical=8",
              "--sparse-prefill-arg", "slash=8", "--sparse-prefill-arg", "local=4", "--sparse-prefill-arg", "dense_layers=0"]
    r = run_eval([*args, *sparse], tmp_path, "sparse.json")["results"]
    # chunk 0-63 stays dense (64 keys < 100); queries 64-199 attend the 4 local keys and at most 16 in all
    dense, causal = 64 * 65 / 2, 200 * 201 / 2
    assert (dense + 136 * 4) / causal < r["attention_computed"] <= (dense + 136 * 16) / causal
    from slimlm.engine.sparse_prefill import VerticalSlash

    bound = VerticalSlash(vertical=8, slash=8, local=4, min_keys=100, dense_layers=0).share_bound(200, 64, 2)
    assert bound == (dense + 136 * 16) / causal and r["attention_computed"] <= bound
    full = run_eval([*args, "--sparse-prefill-arg", "vertical=4096"], tmp_path, "full.json")["results"]
    assert full["attention_computed"] == 1.0


def test_mc_follows_bigbench_layout_and_chance(tmp_path):
    task = {"examples": [{"input": "2+2?", "target_scores": {"4": 1, "5": 0, "6": 0}},
                         {"input": "Sky?", "target_scores": {"blue": 1, "green": 1, "red": 0, "x": 0}},
                         {"input": "gen only", "target": "no choices"}]}
    (tmp_path / "t.json").write_text(json.dumps(task))
    t, ex = load_examples(tmp_path / "t.json", None, 0)
    assert len(ex) == 2
    ctx, conts = format_example(t, ex[0])
    assert ctx == "\nQ: 2+2?\n  choice: 4\n  choice: 5\n  choice: 6\nA:" and conts == [" 4", " 5", " 6"]
    from slimlm.eval.mc import score_task

    class Oracle:  # prefers the first choice, whatever it is
        tokenizer = None

        def prompt_logprobs(self, prompts):
            return [[-float(i % 3)] for i in range(len(prompts))]

    class Tok:
        def encode(self, text, add_special_tokens=False):
            return [1] * max(1, len(text) // 4)

    o = Oracle()
    o.tokenizer = Tok()
    res = score_task(o, t, ex)
    assert res["chance"] == pytest.approx((1 / 3 + 2 / 4) / 2)
    assert res["acc"] == 1.0  # "4" and "blue" come first and both are right


def test_mc_trained_model_beats_chance(trained_dir, tiny_data, tmp_path):
    good = run_eval(["mc", "--model", str(trained_dir), "--task-json", str(tiny_data["task"])], tmp_path, "g.json")
    (res,) = good["results"]["tasks"].values()
    assert res["n"] == 4 and res["acc"] == 1.0 and res["chance"] < 0.5


def test_bigbench_task_is_read_from_the_cache(tmp_path, monkeypatch):
    from slimlm.eval.data import bigbench_task

    monkeypatch.setenv("SLIMLM_HOME", str(tmp_path))
    f = tmp_path / "eval" / "bigbench-1.0.0" / "some_task" / "task.json"
    f.parent.mkdir(parents=True)
    f.write_text("{}")
    assert bigbench_task("some_task") == f  # no download when cached


@pytest.mark.parametrize("argv,needle", [
    (["eval", "nosuch"], "unknown task 'nosuch'; known: batchprompt, mc, mc-set, needle, perplexity, rag"),
    (["eval", "perplexity", "--corpus", "nosuchcorpus"], "unknown corpus 'nosuchcorpus'"),
    (["eval", "perplexity", "--system", "vllm"], "unknown system 'vllm'"),
    (["report", "/nonexistent/results"], "does not exist"),
])
def test_user_mistakes_are_one_line_exit_2(argv, needle, tiny_llama_dir, capsys):
    if argv[1] == "perplexity":
        argv = [*argv, "--model", str(tiny_llama_dir), "--window", "128", "--stride", "64"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and needle in err[-1]
    assert not any("Traceback" in line for line in err)


def test_mc_corrupt_task_json_is_one_line(tiny_llama_dir, tmp_path, capsys):
    (tmp_path / "task.json").write_text("{not json")
    assert main(["eval", "mc", "--model", str(tiny_llama_dir), "--task-json", str(tmp_path / "task.json")]) == 2
    assert "cannot read BIG-bench task" in capsys.readouterr().err


@pytest.mark.integration
def test_smollm2_perplexity_and_needle(smollm2_dir, tmp_path):
    r = run_eval(["perplexity", "--model", str(smollm2_dir), "--corpus", "prose", "--max-corpus-tokens", "1024",
                  "--window", "512", "--stride", "256"], tmp_path, "p.json")
    assert 3 < r["results"]["corpora"]["prose"]["ppl"] < 40
    n = run_eval(["needle", "--model", str(smollm2_dir), "--lengths", "512", "--depths", "0.5", "--trials", "2"],
                 tmp_path, "n.json")
    assert n["results"]["accuracy"] == 1.0
