"""Sequence-level distillation data for a draft (Kim & Rush 2016; DistillSpec, Zhou et al. 2024).

A draft is accepted when it predicts what the *target* would say, so the best text to distil it
on is the target's own greedy output. ``generate_continuations`` cuts ``n`` prompts of
``prompt_tokens`` from real text (the stdlib's .py files in sorted order, as ``slimlm bench decode``
and ``slimlm spec-bench`` use, but starting ``skip_tokens`` in, past the benchmark's prompts) and
lets the teacher continue each one greedily for ``max_tokens`` tokens, ``batch`` prompts per
engine call. ``write_documents`` writes one text file per prompt (prompt + continuation), a folder
that ``slimlm data prepare`` turns into a training set for ``slimlm distill`` (logit KD on top).
"""

from __future__ import annotations

from pathlib import Path

from slimlm.errors import SlimLMError

# spec-bench / draft-bench read prompts from the first ``prompts * 5000 + prompt_tokens`` tokens of
# the stdlib text; prompts for distillation data must start after them.
BENCH_REGION = 40_000


def continuation_prompts(tokenizer, n: int, prompt_tokens: int, skip_tokens: int = BENCH_REGION,
                         spacing: int | None = None) -> list[list[int]]:
    """``n`` disjoint windows of ``prompt_tokens`` ids, ``spacing`` apart, from token ``skip_tokens`` on."""
    from slimlm.bench.workloads import text_prompt

    if n < 1 or prompt_tokens < 1:
        raise SlimLMError(f"--prompts and --prompt-tokens must be positive (got {n}, {prompt_tokens})")
    if skip_tokens < BENCH_REGION:
        raise SlimLMError(f"--skip-tokens {skip_tokens} overlaps the benchmark prompts (first {BENCH_REGION} "
                          "tokens of the stdlib text); use at least that")
    spacing = spacing or prompt_tokens
    if spacing < prompt_tokens:
        raise SlimLMError(f"--spacing {spacing} is shorter than --prompt-tokens {prompt_tokens}")
    ids = text_prompt(tokenizer, spacing * (n - 1) + prompt_tokens, offset=skip_tokens)
    return [ids[i * spacing : i * spacing + prompt_tokens] for i in range(n)]


def generate_continuations(llm, prompts: list[list[int]], max_tokens: int, batch: int = 32) -> list[list[int]]:
    """The teacher's greedy continuation of every prompt (``batch`` prompts per generate call)."""
    from slimlm.engine.params import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    out: list[list[int]] = []
    for i in range(0, len(prompts), batch):
        out += [list(o.outputs[0].token_ids) for o in llm.generate(prompts[i : i + batch], params, use_tqdm=False)]
    return out


def write_documents(tokenizer, prompts: list[list[int]], continuations: list[list[int]], out: Path) -> int:
    """One ``NNNNN.txt`` per prompt: the decoded prompt followed by the teacher's continuation."""
    if out.exists() and any(out.iterdir()):
        raise SlimLMError(f"{out} exists and is not empty; choose a new folder")
    out.mkdir(parents=True, exist_ok=True)
    for i, (p, c) in enumerate(zip(prompts, continuations)):
        (out / f"{i:05d}.txt").write_text(tokenizer.decode(p + c))
    return len(prompts)
