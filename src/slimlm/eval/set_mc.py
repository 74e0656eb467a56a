"""``mc-set``: BIG-bench multiple choice with the choices as an unordered set (Set-Based
Prompting, ``engine/segments.py``) against the same choices listed in order.

Every example is scored three ways with the same token ids (each piece tokenized on its own):
the choices in the task's order, in reverse order, and as a set (shared start position, no
attention between choices). Scoring is ``mc``'s: the sum of each answer's token log-probabilities
after the prompt, best choice wins. Reported: accuracy of each, and how often the prediction
changes when the listed order is reversed (a set's prediction cannot change).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slimlm.errors import SlimLMError
from slimlm.eval.base import TASKS, Task
from slimlm.eval.lm import EngineLM, ScoringLM
from slimlm.eval.mc import load_examples


def example_segments(task: dict[str, Any], ex: dict[str, Any], encode) -> tuple[list[int], list[list[int]], str,
                                                                                 list[list[int]]]:
    """(question ids, one ids list per choice line, answer prefix, answer ids per choice)."""
    choices = list(ex["target_scores"])
    head = task.get("task_prefix", "") + task.get("example_input_prefix", "\nQ: ") + ex["input"]
    cp = task.get("choice_prefix", "\n  choice: ")
    out = task.get("example_output_prefix", "\nA: ")
    lead = ""
    if out.endswith(" "):
        out, lead = out[:-1], " "
    return encode(head), [encode(cp + c) for c in choices], encode(out), [encode(lead + c) for c in choices]


@TASKS.register("mc-set")
@dataclass
class SetMultipleChoice(Task):
    help = ("multiple choice with the choices as an unordered set (Set-Based Prompting) vs listed in order "
            "(takes mc's --bigbench-task, --task-json, --limit; default limit 50)")
    cli = {"tasks": "--bigbench-task", "task_files": "--task-json", "limit": "--limit"}

    tasks: list[str] = field(default_factory=lambda: ["hindu_knowledge", "date_understanding"])
    task_files: list[str] = field(default_factory=list)
    limit: int = 50

    @classmethod
    def from_args(cls, a) -> SetMultipleChoice:
        t = super().from_args(a)
        if a.task_json and not a.bigbench_task:
            t.tasks = []
        return t

    def run(self, lm: ScoringLM, log=print) -> dict[str, Any]:
        from slimlm import SamplingParams
        from slimlm.eval.data import bigbench_task

        if not isinstance(lm, EngineLM):
            raise SlimLMError("mc-set needs the slimlm engine (set-based prompts); use --system slimlm")
        sources = [(n, bigbench_task(n, extract=tuple(self.tasks))) for n in self.tasks]
        sources += [(Path(f).parent.name if Path(f).name == "task.json" else Path(f).stem, Path(f))
                    for f in self.task_files]
        if not sources:
            raise SlimLMError("mc-set: no tasks to score")
        enc = lambda t: lm.tokenizer.encode(t, add_special_tokens=False)  # noqa: E731
        sp = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
        res = {}
        for name, path in sources:
            task, examples = load_examples(path, self.limit, self.seed)
            log(f"mc-set: {name}: {len(examples)} examples")
            prompts, meta = [], []
            for ei, ex in enumerate(examples):
                head, lines, out, answers = example_segments(task, ex, enc)
                for ai, ans in enumerate(answers):
                    ordered = head + [t for x in lines for t in x] + out + ans
                    reverse = head + [t for x in reversed(lines) for t in x] + out + ans
                    as_set = {"segments": [{"ids": head}, {"set": [{"ids": x} for x in lines]}, {"ids": out},
                                           {"ids": ans}]}
                    for kind, p in (("ordered", ordered), ("reversed", reverse), ("set", as_set)):
                        prompts.append(p)
                        meta.append((ei, ai, kind, len(ans)))
            outs = lm.llm.generate(prompts, sp, use_tqdm=False)
            scores: dict[tuple[int, str], list[float]] = {}
            for (ei, ai, kind, n), o in zip(meta, outs):
                ids = o.prompt_token_ids
                lp = sum(o.prompt_logprobs[i][ids[i]] for i in range(len(ids) - n, len(ids)))
                scores.setdefault((ei, kind), []).append(lp)
            r: dict[str, Any] = {"n": len(examples)}
            preds: dict[str, list[str]] = {}
            for kind in ("ordered", "reversed", "set"):
                right = 0
                preds[kind] = []
                for ei, ex in enumerate(examples):
                    choices, s = list(ex["target_scores"]), scores[ei, kind]
                    pred = choices[s.index(max(s))]
                    preds[kind].append(pred)
                    right += ex["target_scores"][pred] == max(ex["target_scores"].values())
                r[f"acc_{kind}"] = right / len(examples)
            r["order_flips"] = sum(a != b for a, b in zip(preds["ordered"], preds["reversed"])) / len(examples)
            r["predictions"] = [dict(zip(preds, p)) for p in zip(*preds.values())]
            res[name] = r
        return {"tasks": res}

    def table(self, report: dict[str, Any]) -> str:
        rows = ["| task | examples | acc ordered | acc reversed | acc set | prediction flips when reversed |",
                "|---|---|---|---|---|---|"]
        for name, r in report["results"]["tasks"].items():
            rows.append(f"| {name} | {r['n']} | {r['acc_ordered']:.3f} | {r['acc_reversed']:.3f} | "
                        f"**{r['acc_set']:.3f}** | {r['order_flips']:.2f} |")
        return "\n".join(rows)

    def headline(self, results: dict[str, Any]) -> list[tuple[str, float, bool]]:
        t = results["tasks"].values()
        return [("mc-set acc", sum(r["acc_set"] for r in t) / len(t), True)]
