"""batchprompt: one-item answers equal direct scoring of the same prompt; batches spend fewer
tokens per item; BPE and SEAS votes follow their rules; bad input is one line."""

from __future__ import annotations

import json
import math

import pytest

from slimlm import LLM, SamplingParams
from slimlm.cli import main
from slimlm.eval.batchprompt import Answer, BatchPrompt, BatchRunner, vote
from slimlm.eval.lm import EngineLM

EXAMPLES = [{"input": f"Item number {i} is {'good' if i % 3 else 'bad'} today.",
             "target_scores": {"yes": int(i % 3 != 0), "no": int(i % 3 == 0)}} for i in range(9)]
TASK = {"task_prefix": "Is the item good? Answer yes or no.", "examples": EXAMPLES}


@pytest.fixture(scope="module")
def runner(tiny_llama_dir):
    lm = EngineLM(LLM(str(tiny_llama_dir), kv_cache_bytes="16M"))
    return BatchRunner(lm, TASK, EXAMPLES, ["yes", "no"])


def test_one_item_answers_are_the_most_likely_label(runner):
    answers, tokens, calls = runner.run(list(range(4)), 1)
    assert calls == 4
    llm = runner.lm.llm
    sp = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    for i in range(4):
        ctx = runner.head + runner.enc(f"\nQ[1]: {runner.items[i]}") + runner.enc("\nA[1]:") + runner.common
        lps = [llm.generate([ctx + [t]], sp, use_tqdm=False)[0].prompt_logprobs[-1][t] for t in runner.firsts]
        best = max(range(2), key=lambda k: lps[k])
        assert answers[i].label == best
        assert answers[i].confidence <= 1 / sum(math.exp(x - lps[best]) for x in lps) + 1e-4  # exact or a bound


def test_batches_spend_fewer_tokens_per_item(runner):
    one, t1, c1 = runner.run(list(range(9)), 1)
    three, t3, c3 = runner.run(list(range(9)), 3)
    assert (c1, c3) == (9, 3)
    assert t3 < t1  # the instruction is paid once per batch
    assert set(three) == set(range(9)) and all(a.label in (0, 1) for a in three.values())
    again, t3b, _ = runner.run(list(range(9)), 3)
    assert t3b == t3 and [again[i].label for i in range(9)] == [three[i].label for i in range(9)]


def test_votes():
    a, b = Answer(0, 0.9), Answer(1, 0.6)
    assert vote([a, b, b], [1, 1, 1]) == 1  # majority
    assert vote([a, b, b], [1, 0.2, 0.2]) == 0  # SEAS: one confident vote outweighs two unsure ones
    assert vote([], []) is None


def test_task_end_to_end(tiny_llama_dir, tmp_path):
    f = tmp_path / "t.json"
    f.write_text(json.dumps(TASK))
    out = tmp_path / "out.json"
    assert main(["eval", "batchprompt", "--model", str(tiny_llama_dir), "--task-json", str(f), "--batch-sizes", "3",
                 "--rounds", "3", "--threads", "1", "--json", str(out)]) == 0
    res = json.loads(out.read_text())["results"]
    one, r = res["rows"]["1"], res["rows"]["3"]
    assert res["n"] == 9 and one["calls_per_item"] == 1 and r["single_round"]["calls_per_item"] == pytest.approx(1 / 3)
    assert r["bpe"]["tokens_per_item"] == pytest.approx(3 * r["single_round"]["tokens_per_item"], rel=0.05)
    assert r["single_round"]["tokens_per_item"] * 2 <= r["seas"]["tokens_per_item"] <= r["bpe"]["tokens_per_item"]
    assert 2 <= r["seas"]["rounds_per_item"] <= 3
    assert "BPE + SEAS" in BatchPrompt().table({"results": res, "settings": {"rounds": 3}})


@pytest.mark.parametrize("extra, examples, msg", [
    (["--batch-sizes", "1"], EXAMPLES, "integers >= 2"),
    (["--rounds", "0"], EXAMPLES, "rounds must be at least 1"),
    ([], EXAMPLES[:2] + [{"input": "x", "target_scores": {"a": 1, "b": 0}}], "classification task"),
])
def test_bad_input_is_one_line(tiny_llama_dir, tmp_path, capsys, extra, examples, msg):
    f = tmp_path / "t.json"
    f.write_text(json.dumps({"examples": examples}))
    assert main(["eval", "batchprompt", "--model", str(tiny_llama_dir), "--task-json", str(f), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and "\n" not in err
