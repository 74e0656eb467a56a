"""``rag``: a RAG-style workload for chunk KV reuse (CacheBlend, ``engine/cacheblend.py``).

A pool of ``pool`` passages, each ``passage_tokens`` of essay text with one fact inserted
("The access code of the NAME office is NNNNN."). Each query takes ``k`` passages from the pool
(seeded; so passages recur across queries, in other orders and offsets), one of them holding the
fact asked for, and ends with the primed question "The access code of the NAME office is". A
query is correct when the first number of the greedy answer is the code.

``--rag-mode flat`` sends one text prompt (full prefill; prefix caching only helps the shared
instruction); ``chunks`` sends the passages as ``{"chunk": ...}`` segments, so their KV is reused
and blended with ``blend_recompute_ratio``; ``both`` sends each query both ways on one engine
(paired TTFTs under the same load: ``ttft_warm_speedup``). Queries run one after another (a server answering
them as they come), so each query's time to first token is its own. Reported: accuracy, prompt
tokens computed per query (deterministic) and the mean TTFT (noisy; for a quiet machine).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any

from slimlm.errors import SlimLMError
from slimlm.eval.base import TASKS, Task
from slimlm.eval.lm import EngineLM, ScoringLM

NAMES = ["Lisbon", "Oslo", "Denver", "Cairo", "Quito", "Perth", "Dublin", "Lagos", "Kyoto", "Tunis", "Bergen",
         "Austin", "Hanoi", "Porto", "Zurich", "Malmo"]
INTRO = "Read the passages below, then answer the question.\n\n"
FACT = " The access code of the {name} office is {code}. "
QUESTION = "\nQuestion: what is the access code of the {name} office?\nAnswer: The access code of the {name} office is"


@TASKS.register("rag")
@dataclass
class Rag(Task):
    help = "RAG workload: k passages per query from a reused pool, one holds the answer (CacheBlend)"
    cli = {"mode": "--rag-mode", "queries": "--queries", "filler": "--filler", "k": "--passages-per-query",
           "passage_tokens": "--passage-tokens"}

    mode: str = "chunks"
    """flat (one text prompt, full prefill), chunks (passages as reusable chunks) or both (each
    query as flat and as chunks on one engine: paired TTFTs under the same load)."""
    queries: int = 16
    pool: int = 8
    k: int = 4
    passage_tokens: int = 200
    filler: str = "essays"

    @classmethod
    def add_args(cls, g) -> None:
        g.add_argument("--rag-mode", help="rag: flat, chunks or both (paired on one engine; default chunks)")
        g.add_argument("--queries", type=int, help="rag: queries (default 16)")
        g.add_argument("--passages-per-query", type=int, help="rag: passages in each prompt (default 4)")
        g.add_argument("--passage-tokens", type=int, help="rag: essay tokens per passage (default 200)")

    def run(self, lm: ScoringLM, log=print) -> dict[str, Any]:
        from slimlm.eval.needle import filler_ids

        if self.mode not in ("flat", "chunks", "both"):
            raise SlimLMError(f"rag mode must be flat, chunks or both, got {self.mode!r}")
        if self.passage_tokens < 8:
            raise SlimLMError(f"rag needs --passage-tokens >= 8, got {self.passage_tokens}")
        if not isinstance(lm, EngineLM):
            raise SlimLMError("rag needs the slimlm engine; use --system slimlm")
        if not 1 <= self.k <= self.pool <= len(NAMES):
            raise SlimLMError(f"rag needs 1 <= k <= pool <= {len(NAMES)}")
        tok = lm.tokenizer
        text = tok.decode(filler_ids(self.filler, tok))
        rng = random.Random(self.seed)
        passages, facts = [], []
        words = text.split()
        span = max(400, 2 * self.passage_tokens)  # words; 400 (the first runs') cover 300 tokens
        if len(words) <= span:
            raise SlimLMError(f"rag: the filler text has {len(words)} words, passages need more than {span}")
        for i in range(self.pool):
            name, code = NAMES[i], str(rng.randint(10000, 99999))
            start = rng.randrange(len(words) - span)
            body = " ".join(words[start : start + span])
            ids = tok.encode(body, add_special_tokens=False)[: self.passage_tokens]
            half = tok.decode(ids[: len(ids) // 2]), tok.decode(ids[len(ids) // 2 :])
            passages.append(half[0] + FACT.format(name=name, code=code) + half[1] + "\n\n")
            facts.append((name, code))
        llm = lm.llm
        modes = ["flat", "chunks"] if self.mode == "both" else [self.mode]
        trials: dict[str, list] = {m: [] for m in modes}
        for q in range(self.queries):
            picked = rng.sample(range(self.pool), self.k)
            target = rng.choice(picked)
            name, code = facts[target]
            question = QUESTION.format(name=name)
            for mode in modes:
                if mode == "flat":
                    prompt: Any = INTRO + "".join(passages[i] for i in picked) + question
                else:
                    prompt = {"segments": [INTRO] + [{"chunk": passages[i]} for i in picked] + [question]}
                trials[mode].append({"passages": picked, "target": target, **_query(llm, prompt, code)})
        log(f"rag: {self.queries} queries, {self.k} of {self.pool} passages each, mode {self.mode}")
        if self.mode != "both":
            return _summary(trials[self.mode])
        flat, chunks = _summary(trials["flat"]), _summary(trials["chunks"])
        warm = [i for i, t in enumerate(trials["chunks"]) if t["store_misses"] == 0]
        speedup = (sum(trials["flat"][i]["ttft_s"] for i in warm) / sum(trials["chunks"][i]["ttft_s"] for i in warm)
                   if warm else None)
        return {"accuracy": chunks["accuracy"], "flat": flat, "chunks": chunks, "ttft_warm_speedup": speedup,
                "notes": ["both modes on one engine, each query flat then chunks (same load): ttft_warm_speedup = "
                          "flat TTFT / blend TTFT summed over the queries whose chunks were all in the store"]}

    def table(self, report: dict[str, Any]) -> str:
        r, mode = report["results"], report["settings"]["mode"]
        rows = [(m, r[m]) for m in ("flat", "chunks")] if mode == "both" else [(mode, r)]
        return "| mode | accuracy | prompt tokens / query | computed tokens / query |\n|---|---|---|---|\n" + "\n".join(
            f"| {m} | {x['accuracy']:.3f} | {x['prompt_tokens_per_query']:.0f} | {x['computed_tokens_per_query']:.0f} |"
            for m, x in rows)

    def headline(self, results: dict[str, Any]) -> list[tuple[str, float, bool]]:
        return [("rag acc", results["accuracy"], True)]


def _query(llm, prompt, code: str) -> dict[str, Any]:
    from slimlm import SamplingParams

    before = llm.engine.stats["computed_prompt_tokens"]
    blender = llm.engine.blender
    misses = blender.store.stats["misses"] if blender is not None else 0
    cpu = dict(blender.stats["cpu_s"]) if blender is not None else {}
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0]
    blender = llm.engine.blender
    m = re.search(r"\d+", out.outputs[0].text)
    chunks = isinstance(prompt, dict) and blender is not None
    return {"answer": out.outputs[0].text, "correct": m is not None and m.group() == code,
            "prompt_tokens": len(out.prompt_token_ids),
            "computed_tokens": llm.engine.stats["computed_prompt_tokens"] - before,
            "ttft_s": out.metrics.time_to_first_token,
            "store_misses": blender.store.stats["misses"] - misses if chunks else 0,
            "blend_cpu_s": {k: v - cpu.get(k, 0.0) for k, v in blender.stats["cpu_s"].items()} if chunks else {}}


def _summary(trials: list[dict]) -> dict[str, Any]:
    n = len(trials)
    warm = [t["ttft_s"] for t in trials if t["store_misses"] == 0]
    phases = {k: sum(t["blend_cpu_s"].get(k, 0.0) for t in trials) / n for k in trials[0]["blend_cpu_s"]}
    return {"accuracy": sum(t["correct"] for t in trials) / n,
            "prompt_tokens_per_query": sum(t["prompt_tokens"] for t in trials) / n,
            "computed_tokens_per_query": sum(t["computed_tokens"] for t in trials) / n,
            "ttft_mean_s": sum(t["ttft_s"] for t in trials) / n,
            "ttft_warm_mean_s": sum(warm) / len(warm) if warm else None, "warm_queries": len(warm),
            "blend_cpu_s_per_query": phases, "trials": trials,
            "notes": ["ttft_mean_s is wall time on this machine: compare runs only on a quiet machine",
                      "ttft_warm_mean_s: queries whose chunks were all in the store (the paper's setting: "
                      "chunk KV computed ahead of the query); ttft_mean_s includes the store misses"]}
