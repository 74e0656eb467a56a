"""A speculative method or layer hook against plain decoding, on the same prompts.

Greedy decode of ``prompts`` stretches of real text (the stdlib, as ``slimlm bench decode``),
``batch`` of them at a time, with and without the engine options. Repeats are interleaved;
tok/s are medians (speed figures: quote them only from a quiet machine). Acceptance comes from
the engine's counters and is deterministic:

    acceptance rate          accepted draft tokens / proposed draft tokens
    tokens per verify step   (accepted drafts + one target token) per verification step
    token agreement          fraction of generated tokens equal to plain greedy decoding (1.0
                             for a lossless method; below for lossy ones, up to the first change)
    reference match          task quality, a code-completion task: fraction of generated tokens
                             equal to the source file's real continuation, up to the first
                             difference (plain decoding's and the method's, side by side)
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

from slimlm.engine.llm import LLM
from slimlm.engine.params import SamplingParams


@dataclass
class SpecReport:
    method: str
    batch: int
    plain_tok_s: float
    spec_tok_s: float
    acceptance: float
    tokens_per_step: float
    identical: bool
    agreement: float
    tokens: int
    repeats: int
    hook_counts: dict | None = None
    """The hooks' own counters summed over the timed runs (e.g. MLP / layer evaluations of
    generated rows run and skipped), for FLOPs saved."""
    flops_saved: float | None = None
    """Fraction of the per-generated-token matmul FLOPs (layers + LM head) the hooks skipped."""
    plain_reference: float | None = None
    """Plain decoding's reference match (see the module docstring)."""
    spec_reference: float | None = None
    """The method's reference match."""

    def lines(self) -> list[str]:
        return [
            f"{self.method}: greedy decode, batch {self.batch}, {self.tokens} tokens, median of {self.repeats}:",
            f"  plain        {self.plain_tok_s:7.1f} tok/s",
            f"  method       {self.spec_tok_s:7.1f} tok/s  ({self.spec_tok_s / self.plain_tok_s:.2f}x)",
            f"  acceptance rate {self.acceptance:.3f}, tokens per verify step {self.tokens_per_step:.2f}, "
            f"outputs identical: {self.identical} (token agreement {self.agreement:.3f})",
            f"  reference match (code completion, the text's real continuation): plain {self.plain_reference:.3f}, "
            f"method {self.spec_reference:.3f}",
        ] + ([f"  hooks: {self.hook_counts}, matmul FLOPs per generated token saved {self.flops_saved:.3f}"]
             if self.hook_counts else [])


def _run(llm: LLM, prompts: list[list[int]], batch: int, max_tokens: int) -> tuple[list[list[int]], float]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    outs: list[list[int]] = []
    t0 = time.perf_counter()
    for i in range(0, len(prompts), batch):
        outs += [list(o.outputs[0].token_ids) for o in llm.generate(prompts[i : i + batch], params, use_tqdm=False)]
    return outs, time.perf_counter() - t0


def _agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Tokens up to the first difference, over all tokens."""
    same = total = 0
    for x, y in zip(a, b):
        total += len(x)
        for s, t in zip(x, y):
            if s != t:
                break
            same += 1
    return same / max(total, 1)


def spec_bench(model: str, engine: dict[str, Any], n_prompts: int = 4, prompt_tokens: int = 128,
               max_tokens: int = 64, repeats: int = 1, batch: int = 1) -> SpecReport:
    from slimlm.bench.workloads import text_prompt
    from slimlm.model.hub import load

    dtype = engine.get("dtype", "float32")
    lm = load(model, dtype=dtype)
    texts = [text_prompt(lm.tokenizer, prompt_tokens + max_tokens, offset=i * 5000) for i in range(n_prompts)]
    prompts = [t[:prompt_tokens] for t in texts]
    refs = [t[prompt_tokens:] for t in texts]
    plain = LLM(lm, dtype=dtype)
    spec = LLM(lm, **engine)
    _run(plain, prompts[:1], 1, 4), _run(spec, prompts[:1], 1, 4)  # warm-up
    s0 = dict(spec.engine.stats)
    h0 = [dict(getattr(h, "counts", {})) for h in spec.engine.hooks]
    times: dict[str, list[float]] = {"plain": [], "spec": []}
    outs: dict[str, list[list[int]]] = {}
    for _ in range(repeats):
        for name, llm in (("plain", plain), ("spec", spec)):
            ids, dt = _run(llm, prompts, batch, max_tokens)
            times[name].append(sum(map(len, ids)) / dt)
            outs.setdefault(name, ids)
    st = {key: spec.engine.stats[key] - s0[key] for key in s0}
    counts, saved = _hook_counts(spec, h0, lm.model)
    method = engine.get("speculative") or "+".join(engine.get("hooks", []))
    return SpecReport(
        method, batch, statistics.median(times["plain"]), statistics.median(times["spec"]),
        st["accepted_draft_tokens"] / max(st["draft_tokens"], 1),
        (st["accepted_draft_tokens"] + st["verify_steps"]) / max(st["verify_steps"], 1),
        outs["plain"] == outs["spec"], _agreement(outs["spec"], outs["plain"]), sum(map(len, outs["plain"])), repeats,
        counts, saved, _agreement(outs["plain"], refs), _agreement(outs["spec"], refs),
    )


def _hook_counts(llm: LLM, before: list[dict], model) -> tuple[dict | None, float | None]:
    """The hooks' counters since ``before`` and the matmul FLOPs they saved per generated token:
    a skipped MLP saves its three projections; a skipped layer its attention and MLP projections."""
    counts: dict[str, int] = {}
    for h, b in zip(llm.engine.hooks, before):
        for k, v in getattr(h, "counts", {}).items():
            counts[k] = counts.get(k, 0) + v - b.get(k, 0)
    if not counts:
        return None, None
    layer = model.model.layers[0]
    mlp = sum(p.numel() for p in layer.mlp.parameters() if p.dim() == 2)
    att = sum(p.numel() for p in layer.self_attn.parameters() if p.dim() == 2)
    L = model.cfg.num_layers
    per_token = L * (mlp + att) + model.lm_head.weight.numel()
    if "mlp_run" in counts:
        tokens = (counts["mlp_run"] + counts["mlp_skipped"]) / L
        return counts, counts["mlp_skipped"] * mlp / max(tokens * per_token, 1)
    tokens = (counts["layers_run"] + counts["layers_skipped"]) / L
    return counts, counts["layers_skipped"] * (mlp + att) / max(tokens * per_token, 1)
