"""Does a draft pay off? Batch-1 greedy decode of the target with and without the draft.

Same prompts as ``slimlm bench decode`` (real stdlib text), greedy, so the speculative output must
be identical to the plain one (checked, and reported if not). Repeats are interleaved (plain,
speculative, plain, ...) in one process; the figures are medians and the speed-up is the ratio
of the medians of this run. Acceptance comes from the engine's counters:

    acceptance rate          accepted draft tokens / proposed draft tokens
    tokens per target step   (accepted drafts + one target token) per verification step
                             (1 = no gain, k + 1 = all accepted)

When does a draft pay off? A speculative step runs the draft k times and the target once over
k + 1 tokens; batch-1 decode on a CPU is bound by reading the weights, so the verification costs
about one target step and a draft step ``c`` target steps, c = the draft's weight-matmul
multiply-adds per token over the target's (:func:`cost_ratio`). The FLOPs model's speed-up is then
tokens per step / (k c + 1): a draft breaks even at k c + 1 tokens per step, i.e. an acceptance
rate (accepted / proposed) of c whatever k, and reaches a speed-up s at s (k c + 1) tokens
per step (:func:`needed`). These are deterministic; the measured tok/s say how far the machine
departs from the model.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

from slimlm.engine.llm import LLM
from slimlm.engine.params import SamplingParams


def matmul_params(model) -> int:
    """Multiply-adds per generated token of the weight matmuls: every 2-D weight in the layers + the LM head."""
    layers = sum(p.numel() for p in model.model.layers.parameters() if p.dim() == 2)
    return layers + model.lm_head.weight.numel()


def cost_ratio(draft, target) -> float:
    """A draft step's cost in target steps (weight-matmul multiply-adds per token)."""
    return matmul_params(draft) / matmul_params(target)


def needed(c: float, k: int, speedup: float = 1.0) -> tuple[float, float | None]:
    """(tokens per target step, acceptance rate) a k-token draft of cost ratio ``c`` needs for ``speedup``
    under the FLOPs model; acceptance None when it would take more than all k drafts accepted."""
    if c < 0 or k < 1 or speedup <= 0:
        raise ValueError(f"need c >= 0, k >= 1, speedup > 0 (got {c}, {k}, {speedup})")
    tokens = speedup * (k * c + 1)
    return tokens, ((tokens - 1) / k if tokens <= k + 1 else None)


@dataclass
class DraftReport:
    plain_tok_s: float
    spec_tok_s: float
    acceptance: float
    tokens_per_step: float
    identical: bool
    repeats: int
    k: int = 4
    cost: float | None = None
    """:func:`cost_ratio` of the draft."""

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
        ] + (self.model_lines() if self.cost is not None else [])

    def model_lines(self) -> list[str]:
        c, k = self.cost, self.k
        even, even_acc = needed(c, k)
        fast, fast_acc = needed(c, k, 1.5)
        return [
            f"  FLOPs model: draft cost {c:.3f} target steps per token; break-even at k={k}: {even:.2f} tokens per "
            f"step (acceptance {even_acc:.3f})" if even_acc is not None else
            f"  FLOPs model: draft cost {c:.3f} target steps per token; cannot break even at k={k}",
            f"  1.5x needs {fast:.2f} tokens per step " + (f"(acceptance {fast_acc:.3f})" if fast_acc is not None else
                                                          f"(more than k + 1 = {k + 1}: unreachable)")
            + f"; this draft's {self.tokens_per_step:.2f} predict {self.tokens_per_step / (k * c + 1):.2f}x",
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
        outs["plain"] == outs["spec"], repeats, k, cost_ratio(load(draft, dtype=dtype).model, lm.model),
    )
