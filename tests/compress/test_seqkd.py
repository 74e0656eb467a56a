"""Sequence-level KD data for a draft: the teacher's greedy continuations, batched, of stdlib prompts
past the decode benchmark's."""

from __future__ import annotations

from slimlm.bench.workloads import text_prompt
from slimlm.cli import main
from slimlm.compress.seqkd import BENCH_REGION, continuation_prompts
from slimlm.engine.llm import LLM
from slimlm.engine.params import SamplingParams
from slimlm.model.hub import load
from tests.conftest import make_hf_model


def test_seqkd_documents_are_the_teachers_greedy_continuations(tmp_path, capsys):
    teacher = tmp_path / "teacher"
    make_hf_model(teacher, "llama")
    out = tmp_path / "out"
    args = ["seqkd", str(out), "--teacher", str(teacher), "--prompts", "3", "--prompt-tokens", "12",
            "--max-tokens", "5", "--batch", "2", "--threads", "1"]
    assert main(args) == 0
    assert "wrote 3 documents" in capsys.readouterr().err
    tok = load(str(teacher)).tokenizer
    prompts = continuation_prompts(tok, 3, 12)
    assert prompts[1] == text_prompt(tok, 12, offset=BENCH_REGION + 12)  # disjoint windows past the benchmark's
    llm, params = LLM(str(teacher)), SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(prompts):  # each prompt decoded alone = its continuation in the batched run
        alone = list(llm.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids)
        assert len(alone) == 5
        assert (out / f"{i:05d}.txt").read_text() == tok.decode(p + alone)
    assert main(args) == 2  # never overwrites
    assert main(["seqkd", str(tmp_path / "o2"), "--teacher", str(teacher), "--skip-tokens", "100"]) == 2
