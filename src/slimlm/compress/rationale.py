"""Distilling step-by-step (Hsieh et al., 2023): teacher rationales as a second training target.

For each labelled example of a BIG-bench multiple-choice task the teacher, given the question and
its gold answer, writes an explanation (greedy, batched through slimlm's engine). Two documents
per example come out, each marked with its task prefix as in the paper:

    label/NNNNN.txt       "[label] <question> <answer>"
    rationale/NNNNN.txt   "[rationale] <question> <teacher's explanation>"

Prepared as two folders (`slimlm data prepare`) and mixed with ``data.weights`` in a training or
distillation run, the mixture weight plays the paper's lambda in L = L_label + lambda L_rationale.
(The loss covers every token of each document, question included, not only the outputs.)
"""

from __future__ import annotations

from pathlib import Path

from slimlm.errors import SlimLMError


def rationale_prompts(task_path: Path, n: int, seed: int = 0) -> list[tuple[str, str]]:
    """(question, gold answer) of up to ``n`` examples, in BIG-bench's zero-shot layout."""
    from slimlm.eval.mc import format_example, load_examples

    task, examples = load_examples(task_path, n, seed)
    out = []
    for ex in examples:
        context, choices = format_example(task, ex)
        scores = list(ex["target_scores"].values())
        out.append((context, choices[scores.index(max(scores))]))
    return out


def write_rationales(pairs: list[tuple[str, str]], rationales: list[str], out: Path) -> tuple[Path, Path]:
    if out.exists() and any(out.iterdir()):
        raise SlimLMError(f"{out} exists and is not empty; choose a new folder")
    label_dir, rat_dir = out / "label", out / "rationale"
    label_dir.mkdir(parents=True)
    rat_dir.mkdir(parents=True)
    for i, ((q, a), r) in enumerate(zip(pairs, rationales)):
        (label_dir / f"{i:05d}.txt").write_text(f"[label] {q}{a}\n")
        (rat_dir / f"{i:05d}.txt").write_text(f"[rationale] {q} {r.strip()}\n")
    return label_dir, rat_dir


def generate_rationales(llm, pairs: list[tuple[str, str]], max_tokens: int) -> list[str]:
    """The teacher explains each gold answer (greedy, one batched generate call)."""
    from slimlm.engine.params import SamplingParams

    prompts = [f"{q}{a}\nExplanation:" for q, a in pairs]
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=["\n\n"])
    return [" " + o.outputs[0].text.strip() for o in llm.generate(prompts, params, use_tqdm=False)]
