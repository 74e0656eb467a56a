"""``mc``: log-likelihood multiple choice on a fixed list of BIG-bench tasks.

Zero-shot, in BIG-bench's own JSON-task format: ``task_prefix``, then ``example_input_prefix``
("\\nQ: ") + input, the choices appended (``choice_prefix`` "\\n  choice: ") unless the task says
not to, then ``example_output_prefix`` ("\\nA: "). Each choice is scored as a continuation (the
prompt's trailing space moved onto the choice) by the sum of its token log-probabilities; the
prediction is the best-scoring choice (``acc``), or the best per byte of choice text
(``acc_norm``). An example is right when the prediction has the top target score. Chance is the
mean over examples of (top-scored choices / choices). ``limit`` examples per task, sampled with
the seed.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slimlm.errors import SlimLMError
from slimlm.eval.base import TASKS, Task
from slimlm.eval.lm import ScoringLM

BIGBENCH_TASKS = ("similarities_abstraction", "human_organs_senses", "misconceptions", "hindu_knowledge",
                  "date_understanding")
"""The fixed list: BIG-bench tasks where SmolLM2-135M-Instruct scored above chance in a zero-shot
screen of 12 tasks (40 examples each; docs/results.md shows the screen and each task's chance
level: 0.24, 0.25, 0.50, 0.25, 0.17). Chance is computed from the data, per example."""


def load_examples(path: Path, limit: int | None, seed: int) -> tuple[dict[str, Any], list[dict]]:
    try:
        task = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SlimLMError(f"cannot read BIG-bench task {path}: {e}") from None
    examples = [ex for ex in task.get("examples", []) if ex.get("target_scores") and len(ex["target_scores"]) > 1]
    if not examples:
        raise SlimLMError(f"{path} has no multiple-choice examples (target_scores)")
    if limit and len(examples) > limit:
        keep = sorted(random.Random(seed).sample(range(len(examples)), limit))
        examples = [examples[i] for i in keep]
    return task, examples


def format_example(task: dict[str, Any], ex: dict[str, Any]) -> tuple[str, list[str]]:
    """(context, continuations) in BIG-bench's zero-shot layout."""
    choices = list(ex["target_scores"])
    text = task.get("task_prefix", "") + task.get("example_input_prefix", "\nQ: ") + ex["input"]
    if task.get("append_choices_to_input", True):
        cp = task.get("choice_prefix", "\n  choice: ")
        text += "".join(cp + c for c in choices)
    text += task.get("example_output_prefix", "\nA: ")
    if text.endswith(" "):  # the space belongs to the answer's first token
        return text[:-1], [" " + c for c in choices]
    return text, choices


def score_task(lm: ScoringLM, task: dict[str, Any], examples: list[dict]) -> dict[str, Any]:
    tok = lm.tokenizer
    prompts, spans = [], []
    for ex in examples:
        ctx, conts = format_example(task, ex)
        c_ids = tok.encode(ctx, add_special_tokens=False)
        for cont in conts:
            x = tok.encode(cont, add_special_tokens=False)
            prompts.append(c_ids + x)
            spans.append(len(x))
    lps = lm.prompt_logprobs(prompts)
    sums = [sum(lp[-n:]) for lp, n in zip(lps, spans)]
    details, i = [], 0
    for ex in examples:
        scores = ex["target_scores"]
        choices = list(scores)
        s = sums[i : i + len(choices)]
        i += len(choices)
        best = max(scores.values())
        norm = [v / max(len(c.encode("utf-8")), 1) for v, c in zip(s, choices)]
        pred, pred_n = choices[s.index(max(s))], choices[norm.index(max(norm))]
        details.append({"pred": pred, "correct": scores[pred] == best, "correct_norm": scores[pred_n] == best,
                        "chance": sum(v == best for v in scores.values()) / len(choices)})
    n = len(details)
    return {"acc": sum(d["correct"] for d in details) / n, "acc_norm": sum(d["correct_norm"] for d in details) / n,
            "chance": sum(d["chance"] for d in details) / n, "n": n,
            "choices_mean": sum(len(ex["target_scores"]) for ex in examples) / n, "examples": details}


@TASKS.register("mc")
@dataclass
class MultipleChoice(Task):
    help = "log-likelihood multiple choice on a fixed list of BIG-bench tasks"
    cli = {"tasks": "--bigbench-task", "task_files": "--task-json", "limit": "--limit"}

    tasks: list[str] = field(default_factory=lambda: list(BIGBENCH_TASKS))
    """BIG-bench task names (fetched once from the bigbench==1.0.0 sdist)."""
    task_files: list[str] = field(default_factory=list)
    """Extra task.json files in BIG-bench's format (scored after ``tasks``)."""
    limit: int = 100
    """Examples per task (a seeded sample when the task has more)."""

    @classmethod
    def add_args(cls, g) -> None:
        g.add_argument("--bigbench-task", action="append", help="mc: BIG-bench task name (repeatable; default: the fixed list)")
        g.add_argument("--task-json", action="append", help="mc: a task.json file in BIG-bench's format (repeatable)")
        g.add_argument("--limit", type=int, help="mc: examples per task (default 100)")

    @classmethod
    def from_args(cls, a) -> MultipleChoice:
        t = super().from_args(a)
        if a.task_json and not a.bigbench_task:
            t.tasks = []  # only the files asked for
        return t

    def run(self, lm: ScoringLM, log=print) -> dict[str, Any]:
        from slimlm.eval.data import bigbench_task

        sources = [(n, bigbench_task(n, extract=tuple(self.tasks))) for n in self.tasks]
        sources += [(Path(f).parent.name if Path(f).name == "task.json" else Path(f).stem, Path(f)) for f in self.task_files]
        if not sources:
            raise SlimLMError("mc: no tasks to score")
        out = {}
        for name, path in sources:
            task, examples = load_examples(path, self.limit, self.seed)
            log(f"mc: {name}: {len(examples)} examples")
            out[name] = score_task(lm, task, examples)
        accs = [r["acc"] for r in out.values()]
        return {"tasks": out, "mean_acc": sum(accs) / len(accs),
                "mean_chance": sum(r["chance"] for r in out.values()) / len(out)}

    def table(self, report: dict[str, Any]) -> str:
        rows = ["| task | examples | choices (mean) | chance | acc | acc_norm |", "|---|---|---|---|---|---|"]
        for name, r in report["results"]["tasks"].items():
            rows.append(f"| {name} | {r['n']} | {r['choices_mean']:.1f} | {r['chance']:.3f} | **{r['acc']:.3f}** | "
                        f"{r['acc_norm']:.3f} |")
        res = report["results"]
        rows.append(f"| mean | | | {res['mean_chance']:.3f} | **{res['mean_acc']:.3f}** | |")
        return "\n".join(rows)

    def headline(self, results: dict[str, Any]) -> list[tuple[str, float, bool]]:
        return [("mc acc", results["mean_acc"], True)]

    def plot(self, report: dict[str, Any], out: Path) -> list[Path]:
        from slimlm.bench.plots import simple_bars

        t = report["results"]["tasks"]
        return [simple_bars(list(t), [r["acc"] for r in t.values()], "multiple-choice accuracy",
                            out.with_suffix(".png"), refs=[r["chance"] for r in t.values()], ref_label="chance")]
