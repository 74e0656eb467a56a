"""Distilling step-by-step: label and rationale documents, the rationales being the teacher's own
greedy output."""

from __future__ import annotations

import json

from slimlm.cli import main
from slimlm.engine.llm import LLM
from slimlm.engine.params import SamplingParams
from tests.conftest import make_hf_model


def test_rationale_corpus(tmp_path, capsys):
    teacher = tmp_path / "teacher"
    make_hf_model(teacher, "llama")
    task = tmp_path / "task.json"
    task.write_text(json.dumps({"examples": [
        {"input": "Is the fox quick?", "target_scores": {"yes": 1, "no": 0}},
        {"input": "Is the dog lazy?", "target_scores": {"yes": 0, "no": 1}},
    ]}))
    out = tmp_path / "out"
    assert main(["rationales", str(task), str(out), "--teacher", str(teacher), "--n", "2", "--max-tokens", "6"]) == 0
    assert "wrote 2 examples" in capsys.readouterr().err
    label = (out / "label" / "00001.txt").read_text()
    assert label == "[label] \nQ: Is the dog lazy?\n  choice: yes\n  choice: no\nA: no\n"
    want = LLM(str(teacher)).generate(["\nQ: Is the fox quick?\n  choice: yes\n  choice: no\nA: yes\nExplanation:"],
                                      SamplingParams(max_tokens=6, temperature=0.0, stop=["\n\n"]), use_tqdm=False)
    rat = (out / "rationale" / "00000.txt").read_text()
    assert rat == f"[rationale] \nQ: Is the fox quick?\n  choice: yes\n  choice: no\nA: {want[0].outputs[0].text.strip()}\n"
    assert main(["rationales", str(task), str(out), "--teacher", str(teacher)]) == 2  # never overwrites
