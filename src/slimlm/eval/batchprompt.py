"""``batchprompt``: N data items answered in one prompt (BatchPrompt, Lin et al. 2023), with batch
permutation and ensembling (BPE) and self-weighted early stopping (SEAS), against one item per
prompt, on a classification-style BIG-bench task (every example has the same labels).

A batch prompt is the task's instruction, then the items ``Q[1]: ...`` .. ``Q[N]: ...``, then the
answers ``A[1]: <label>`` .. ``A[N]: <label>``, one line each. The model answers in order, each
answer seeing the ones before it; an answer is the label whose first token is most likely next
(constrained greedy decoding: the engine's next-token logprobs, top 20, of the first token where
the labels differ; a label outside them scores as the 20th token, so the choice is exact and the
confidence a lower bound; when no label is in the top 20 the labels are scored exactly). Its
confidence is the label's probability renormalized over the labels. ``off_label``: answers
where the most likely next token was not a label (a free generation would have gone astray). Tokens spent by a batch are
those of its final sequence (prompt + answer lines), what one generation call would process.

- **BPE**: ``rounds`` votes per item, each round with the items in a new seeded order (so every
  item sits at other positions among other neighbours); majority vote.
- **SEAS**: the vote of a confident answer (confidence >= ``confident``) weighs 1, of an
  unconfident one ``alpha``; an item answered confidently with the same label in two consecutive
  rounds stops (the paper asks the model to say "confident"; a 135M model cannot, so its own
  label probability stands in). Later rounds batch only the items still running: fewer tokens.

Rounds 1 and 2 see all items in both BPE and SEAS, so SEAS reuses them.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slimlm.errors import SlimLMError
from slimlm.eval.base import TASKS, Task, float_list
from slimlm.eval.lm import EngineLM, ScoringLM
from slimlm.eval.mc import load_examples

TOP = 20  # the engine's largest logprobs count


def task_labels(path: Path, examples: list[dict]) -> list[str]:
    labels = list(examples[0]["target_scores"])
    if any(list(ex["target_scores"]) != labels for ex in examples):
        raise SlimLMError(f"batchprompt needs a classification task (the same labels for every example); "
                          f"{path} has examples with other choices")
    return labels


@dataclass
class Answer:
    label: int | None  # index into the labels
    confidence: float
    off: bool = False
    """The most likely next token was not a label's."""


class BatchRunner:
    """Answers batches of items through the engine (prefix caching shares each batch's prompt
    between its answer steps)."""

    def __init__(self, lm: EngineLM, task: dict[str, Any], examples: list[dict], labels: list[str]):
        self.lm, self.labels = lm, labels
        enc = lambda t: lm.tokenizer.encode(t, add_special_tokens=False)  # noqa: E731
        self.enc = enc
        self.head = enc(task.get("task_prefix", "").strip() + " Answer every question, one line each.")
        self.items = [ex["input"].strip().replace("\n", " ") for ex in examples]
        ids = [enc(" " + label) for label in labels]
        k = 0  # the labels' common leading tokens are part of the answer prefix
        while all(len(x) > k + 1 for x in ids) and len({x[k] for x in ids}) == 1:
            k += 1
        self.common, self.rest = ids[0][:k], [x[k:] for x in ids]
        self.firsts = [x[0] for x in self.rest]
        if len(set(self.firsts)) != len(labels):
            raise SlimLMError(f"batchprompt: the labels {labels} cannot be told apart by one token")

    def run(self, order: list[int], n: int) -> tuple[dict[int, Answer], int, int]:
        """Answer ``order`` in batches of ``n``: ({item: answer}, tokens spent, calls)."""
        from slimlm import SamplingParams

        batches = [order[i : i + n] for i in range(0, len(order), n)]
        seqs = []
        for b in batches:
            ids = list(self.head)
            for j, item in enumerate(b):
                ids += self.enc(f"\nQ[{j + 1}]: {self.items[item]}")
            seqs.append(ids + self.enc("\nA[1]:") + self.common)
        sp = SamplingParams(temperature=0, max_tokens=1, logprobs=TOP)
        answers: dict[int, Answer] = {}
        for j in range(max(len(b) for b in batches)):
            live = [bi for bi, b in enumerate(batches) if j < len(b)]
            outs = self.lm.llm.generate([seqs[bi] for bi in live], sp, use_tqdm=False)
            scores, off = {}, {}
            for bi, o in zip(live, outs):
                top = o.outputs[0].logprobs[0]
                off[bi] = o.outputs[0].token_ids[0] not in self.firsts
                floor = min(top.values())  # a label outside the top is at most this likely
                scores[bi] = [top.get(t, floor) for t in self.firsts]
                if not any(t in top for t in self.firsts):
                    scores[bi] = None
            missing = [bi for bi in live if scores[bi] is None]
            if missing:  # no label in the top: score the labels exactly (rare with a real model)
                exact = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
                outs = self.lm.llm.generate([seqs[bi] + [t] for bi in missing for t in self.firsts], exact,
                                            use_tqdm=False)
                k = len(self.firsts)
                for m, bi in enumerate(missing):
                    scores[bi] = [o.prompt_logprobs[-1][t] for o, t in zip(outs[m * k : (m + 1) * k], self.firsts)]
            for bi in live:
                lps = scores[bi]
                chosen = max(range(len(lps)), key=lambda i: lps[i])
                z = sum(math.exp(x - lps[chosen]) for x in lps)
                answers[batches[bi][j]] = Answer(chosen, 1.0 / z, off[bi])
                seqs[bi] = seqs[bi] + self.rest[chosen]
                if j + 1 < len(batches[bi]):
                    seqs[bi] += self.enc(f"\nA[{j + 2}]:") + self.common
        return answers, sum(len(s) for s in seqs), len(batches)


def vote(answers: list[Answer], weights: list[float]) -> int | None:
    score: dict[int, float] = {}
    for a, w in zip(answers, weights):
        if a.label is not None:
            score[a.label] = score.get(a.label, 0.0) + w + 1e-6 * a.confidence  # ties: the surer answers
    return max(score, key=score.get) if score else None


@TASKS.register("batchprompt")
@dataclass
class BatchPrompt(Task):
    help = ("BatchPrompt: N items per prompt with BPE voting and SEAS early stopping vs one item per prompt "
            "(a classification BIG-bench task; takes --bigbench-task, --task-json, --limit, --batch-sizes, --rounds)")
    cli = {"task": "--bigbench-task", "task_file": "--task-json", "limit": "--limit", "batch_sizes": "--batch-sizes",
           "rounds": "--rounds"}

    task: str = "misconceptions"
    """A BIG-bench task whose examples all share one label set (misconceptions: T / F)."""
    task_file: str | None = None
    limit: int = 100
    batch_sizes: list[int] = field(default_factory=lambda: [4, 8, 16])
    """N for the batch prompts (one item per prompt is always run as the baseline)."""
    rounds: int = 5
    """BPE voting rounds (the paper's best trade-off uses 5 for small batches)."""
    confident: float = 0.8
    """SEAS: an answer whose label probability (over the labels) reaches this is confident."""
    alpha: float = 0.2
    """SEAS: the weight of an unconfident vote (confident votes weigh 1)."""

    @classmethod
    def add_args(cls, g) -> None:
        g.add_argument("--batch-sizes", help="batchprompt: items per prompt, comma-separated (default 4,8,16)")
        g.add_argument("--rounds", type=int, help="batchprompt: BPE voting rounds (default 5)")

    @classmethod
    def from_args(cls, a) -> BatchPrompt:
        t = super().from_args(a)
        if isinstance(t.task, list):
            if len(t.task) != 1:
                raise SlimLMError("batchprompt takes one --bigbench-task")
            t.task = t.task[0]
        if isinstance(t.task_file, list):
            t.task_file = t.task_file[0] if t.task_file else None
        return t

    def __post_init__(self) -> None:
        if isinstance(self.batch_sizes, str):
            self.batch_sizes = float_list(self.batch_sizes)
        if not self.batch_sizes or any(int(n) != n or n < 2 for n in self.batch_sizes):
            raise SlimLMError(f"batchprompt: batch sizes must be integers >= 2 (one item per prompt always runs), "
                              f"got {self.batch_sizes}")
        self.batch_sizes = [int(n) for n in self.batch_sizes]
        if self.rounds < 1:
            raise SlimLMError(f"batchprompt: rounds must be at least 1, got {self.rounds}")
        if not 0 < self.confident <= 1 or not 0 <= self.alpha <= 1:
            raise SlimLMError("batchprompt: confident must be in (0, 1] and alpha in [0, 1]")

    def order(self, items: list[int], r: int) -> list[int]:
        """Round r's order: the items as sampled in round 0, a seeded shuffle after."""
        out = list(items)
        if r:
            random.Random(f"{self.seed}-bpe-{r}").shuffle(out)
        return out

    def run(self, lm: ScoringLM, log=print) -> dict[str, Any]:
        from slimlm.eval.data import bigbench_task

        if not isinstance(lm, EngineLM):
            raise SlimLMError("batchprompt needs the slimlm engine; use --system slimlm")
        path = Path(self.task_file) if self.task_file else bigbench_task(self.task)
        task, examples = load_examples(path, self.limit, self.seed)
        labels = task_labels(path, examples)
        runner = BatchRunner(lm, task, examples, labels)
        gold = [max(range(len(labels)), key=lambda i: ex["target_scores"][labels[i]]) for ex in examples]
        items = list(range(len(examples)))
        log(f"batchprompt: {path.parent.name}: {len(items)} examples, labels {labels}")

        def scored(pred: dict[int, int | None], tokens: int, calls: int, runs: list[dict[int, Answer]],
                   extra=None) -> dict[str, Any]:
            given = [a for r in runs for a in r.values()]
            r = {"acc": sum(pred[i] == gold[i] for i in items) / len(items),
                 "tokens_per_item": tokens / len(items), "calls_per_item": calls / len(items),
                 "off_label": sum(a.off for a in given) / len(given)}
            return {**r, **(extra or {})}

        one, tok1, calls1 = runner.run(items, 1)
        rows = {"1": scored({i: one[i].label for i in items}, tok1, calls1, [one])}
        log(f"batchprompt: N=1 acc {rows['1']['acc']:.3f}, {rows['1']['tokens_per_item']:.1f} tokens per item")
        for n in self.batch_sizes:
            votes: list[dict[int, Answer]] = []
            spent: list[tuple[int, int]] = []
            for r in range(self.rounds):
                a, t, c = runner.run(self.order(items, r), n)
                votes.append(a)
                spent.append((t, c))
            plain = scored({i: votes[0][i].label for i in items}, *spent[0], votes[:1])
            bpe = scored({i: vote([v[i] for v in votes], [1.0] * self.rounds) for i in items},
                         sum(t for t, _ in spent), sum(c for _, c in spent), votes)
            seas = self.seas(runner, items, votes[:2], spent[:2], n)
            rows[str(n)] = {"single_round": plain, "bpe": bpe,
                            "seas": scored(seas["pred"], seas["tokens"], seas["calls"], seas["runs"],
                                           {"rounds_per_item": seas["rounds_per_item"]})}
            log(f"batchprompt: N={n} acc {plain['acc']:.3f} / BPE {bpe['acc']:.3f} / "
                f"SEAS {rows[str(n)]['seas']['acc']:.3f}")
        majority = max(gold.count(i) for i in set(gold)) / len(gold)
        return {"task": path.parent.name if path.name == "task.json" else path.stem, "labels": labels,
                "n": len(items), "chance": 1 / len(labels), "majority": majority, "rows": rows}

    def seas(self, runner: BatchRunner, items: list[int], first: list[dict[int, Answer]],
             spent: list[tuple[int, int]], n: int) -> dict[str, Any]:
        history: dict[int, list[Answer]] = {i: [] for i in items}
        tokens = calls = 0
        active, runs = list(items), []
        for r in range(self.rounds):
            if not active:
                break
            if r < len(first):  # every item still runs in the first two rounds: BPE's answers
                a, (t, c) = first[r], spent[r]
            else:
                a, t, c = runner.run(self.order(active, r), n)
            tokens, calls = tokens + t, calls + c
            runs.append({i: a[i] for i in active})
            for i in active:
                history[i].append(a[i])

            def settled(i: int) -> bool:
                h = history[i][-2:]
                return len(h) == 2 and all(x.label is not None and x.confidence >= self.confident for x in h) \
                    and h[0].label == h[1].label

            active = [i for i in active if not settled(i)]
        pred = {i: vote(h, [1.0 if x.confidence >= self.confident else self.alpha for x in h])
                for i, h in history.items()}
        return {"pred": pred, "tokens": tokens, "calls": calls, "runs": runs,
                "rounds_per_item": sum(len(h) for h in history.values()) / len(items)}

    def table(self, report: dict[str, Any]) -> str:
        res, st = report["results"], report["settings"]
        one = res["rows"]["1"]
        rows = [f"{res['task']} ({res['n']} examples, labels {'/'.join(res['labels'])}, chance {res['chance']:.2f}, "
                f"majority label {res['majority']:.2f}); {st['rounds']} voting rounds",
                "",
                "| items per prompt | method | accuracy | tokens per item | calls per item | off-label |",
                "|---|---|---|---|---|---|",
                f"| 1 | one item per prompt | {one['acc']:.3f} | {one['tokens_per_item']:.1f} | "
                f"{one['calls_per_item']:.2f} | {one['off_label']:.2f} |"]
        for n, r in res["rows"].items():
            if n == "1":
                continue
            for key, name in (("single_round", "BatchPrompt"), ("bpe", "BPE"), ("seas", "BPE + SEAS")):
                x = r[key]
                extra = f" ({x['rounds_per_item']:.1f} rounds per item)" if key == "seas" else ""
                rows.append(f"| {n} | {name}{extra} | {x['acc']:.3f} | {x['tokens_per_item']:.1f} | "
                            f"{x['calls_per_item']:.2f} | {x['off_label']:.2f} |")
        return "\n".join(rows)

    def headline(self, results: dict[str, Any]) -> list[tuple[str, float, bool]]:
        rows = results["rows"]
        best = max((r["seas"]["acc"] for n, r in rows.items() if n != "1"), default=rows["1"]["acc"])
        return [("batchprompt seas acc", best, True)]
