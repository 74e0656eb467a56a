"""Does a draft pay off? Batch-1 greedy decode of the target with and without the draft.

Same prompts as ``slimlm bench decode`` (real stdlib text), greedy, so the speculative output must
be identical to the plain one (checked, and reported if not). Repeats are interleaved (plain,
speculative, plain, ...) in one process; the figures are medians and the speed-up is the ratio
of the medians of this run. Acceptance comes from the engine's counters:

    acceptance rate          accepted draft tokens / proposed draft tokens
    tokens per target step   (accepted drafts + one target token) per verification step
                             (1 = no gain, k + 1 = all accepted)
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

from slimlm.engine.llm import LLM
from slimlm.engine.params import SamplingParams


@dataclass
class DraftReport:
    plain_tok_s: float
    spec_tok_s: float
    acceptance: float
    tokens_per_step: float
    identical: bool
    repeats: int

    @property
    def speedup(self) -> float:
        return self.spec_tok_s / self.plain_tok_s

    def lines(self) -> list[str]:
        return [
            f"batch-1 greedy decode, median of {self.repeats} interleaved repeats:",
            f"  plain        {self.plain_tok_s:7.1f} tok/s",
            f"  speculative  {self.spec_tok_s:7.1f} tok/s  ({self.speedup:.2f}x)",
            f"  acceptance rate {self.acceptance:.3f}, tokens per target step {self.tokens_per_step:.2f}, "
            f"outputs identical: {self.identical}",
        ]


def _decode(llm: LLM, prompt: list[int], max_tokens: int) -> tuple[list[int], float]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    out = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    return list(out), time.perf_counter() - t0


def draft_bench(target: str, draft: str, k: int = 4, prompt_tokens: int = 128, max_tokens: int = 64,
                repeats: int = 3, dtype: str = "float32", tree: bool = False) -> DraftReport:
    from slimlm.bench.workloads import text_prompt
    from slimlm.model.hub import load

    lm = load(target, dtype=dtype)
    prompt = text_prompt(lm.tokenizer, prompt_tokens)
    plain = LLM(lm, dtype=dtype)
    spec = LLM(lm, dtype=dtype, speculative="draft", speculative_args={"model": draft, "k": k, "tree": tree})
    _decode(plain, prompt, 8), _decode(spec, prompt, 8)  # warm-up
    s0 = dict(spec.engine.stats)
    times: dict[str, list[float]] = {"plain": [], "spec": []}
    outs: dict[str, list[int]] = {}
    for _ in range(repeats):
        for name, llm in (("plain", plain), ("spec", spec)):
            ids, dt = _decode(llm, prompt, max_tokens)
            times[name].append(len(ids) / dt)
            outs.setdefault(name, ids)
    st = {key: spec.engine.stats[key] - s0[key] for key in s0}
    return DraftReport(
        statistics.median(times["plain"]), statistics.median(times["spec"]),
        st["accepted_draft_tokens"] / max(st["draft_tokens"], 1),
        (st["accepted_draft_tokens"] + st["verify_steps"]) / max(st["verify_steps"], 1),
        outs["plain"] == outs["spec"], repeats,
    )
