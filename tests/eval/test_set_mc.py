"""mc-set: set-based scoring is the same for every order of the choices; ordered scoring is not
bound to be."""

from __future__ import annotations

import json

import pytest

from slimlm.cli import main

EXAMPLES = [
    {"input": "Which word is a fruit?", "target_scores": {"apple": 1, "robot": 0, "table": 0, "code": 0}},
    {"input": "The quick brown fox jumps over the lazy", "target_scores": {"dog": 1, "cat": 0, "book": 0}},
    {"input": "def add(a, b): return a", "target_scores": {"+ b": 1, "- b": 0, "* b": 0}},
    {"input": "Small models are fast to", "target_scores": {"serve": 1, "read": 0, "jump": 0}},
]


def run(tmp_path, examples, name):
    task = tmp_path / f"{name}.json"
    task.write_text(json.dumps({"examples": examples}))
    return task


@pytest.mark.parametrize("shuffle", [lambda d: dict(reversed(list(d.items()))),
                                     lambda d: dict(list(d.items())[1:] + list(d.items())[:1])])
def test_set_accuracy_does_not_depend_on_the_choice_order(tiny_llama_dir, tmp_path, shuffle):
    a = run(tmp_path, EXAMPLES, "a")
    b = run(tmp_path, [{**ex, "target_scores": shuffle(ex["target_scores"])} for ex in EXAMPLES], "b")
    out = []
    for f in (a, b):
        res = tmp_path / (f.stem + "_out.json")
        assert main(["eval", "mc-set", "--model", str(tiny_llama_dir), "--task-json", str(f), "--threads", "1",
                     "--json", str(res)]) == 0
        out.append(json.loads(res.read_text())["results"]["tasks"][f.stem])
    assert [p["set"] for p in out[0]["predictions"]] == [p["set"] for p in out[1]["predictions"]]
    assert out[0]["acc_set"] == out[1]["acc_set"]
    assert out[0]["n"] == 4 and all(0 <= out[0][k] <= 1 for k in ("acc_ordered", "acc_reversed", "order_flips"))


def test_mc_set_refuses_transformers(tiny_llama_dir, tmp_path, capsys):
    f = run(tmp_path, EXAMPLES, "c")
    assert main(["eval", "mc-set", "--model", str(tiny_llama_dir), "--task-json", str(f), "--system",
                 "transformers"]) == 2
    assert "needs the slimlm engine" in capsys.readouterr().err


def test_rag_chunks_with_full_recompute_answer_as_flat_prompts(tiny_llama_dir, tiny_data, tmp_path):
    base = ["eval", "rag", "--model", str(tiny_llama_dir), "--filler", str(tiny_data["filler"]), "--queries", "3",
            "--passages-per-query", "2", "--passage-tokens", "12",
            "--threads", "1", "--kv-cache-bytes", "16M"]
    res = {}
    for name, extra in [("flat", ["--rag-mode", "flat"]), ("full", ["--blend-recompute-ratio", "1"]),
                        ("reuse", ["--blend-recompute-ratio", "0"])]:
        out = tmp_path / f"{name}.json"
        assert main([*base, *extra, "--json", str(out)]) == 0
        res[name] = json.loads(out.read_text())["results"]
    assert [t["answer"] for t in res["flat"]["trials"]] == [t["answer"] for t in res["full"]["trials"]]
    assert res["reuse"]["computed_tokens_per_query"] < res["full"]["computed_tokens_per_query"]
    assert res["flat"]["prompt_tokens_per_query"] == res["full"]["prompt_tokens_per_query"]
    reuse = res["reuse"]  # the store's misses per query and where the blend's CPU time went
    used = {p for t in reuse["trials"] for p in t["passages"]}
    assert sum(t["store_misses"] for t in reuse["trials"]) == len(used) and reuse["trials"][0]["store_misses"] == 2
    assert reuse["warm_queries"] == sum(t["store_misses"] == 0 for t in reuse["trials"])
    assert set(reuse["blend_cpu_s_per_query"]) == {"miss", "move", "select", "recompute"}
    assert reuse["blend_cpu_s_per_query"]["miss"] > 0 and res["flat"]["blend_cpu_s_per_query"] == {}


def test_rag_both_modes_pair_flat_and_chunks_on_one_engine(tiny_llama_dir, tiny_data, tmp_path):
    out = tmp_path / "both.json"
    base = ["eval", "rag", "--model", str(tiny_llama_dir), "--filler", str(tiny_data["filler"]), "--queries", "3",
            "--passages-per-query", "2", "--passage-tokens", "12", "--threads", "1", "--kv-cache-bytes", "16M"]
    assert main([*base, "--rag-mode", "both", "--blend-recompute-ratio", "1", "--json", str(out)]) == 0
    r = json.loads(out.read_text())["results"]
    assert [t["answer"] for t in r["flat"]["trials"]] == [t["answer"] for t in r["chunks"]["trials"]]
    assert r["accuracy"] == r["chunks"]["accuracy"]
    assert (r["ttft_warm_speedup"] is None) == (r["chunks"]["warm_queries"] == 0)
    assert r["flat"]["blend_cpu_s_per_query"] == {} and r["chunks"]["blend_cpu_s_per_query"]["recompute"] > 0
