"""Sampling as pure functions over a batch of logits (one row per sequence).

Order (as vLLM): penalties -> temperature -> top-k / top-p / min-p -> draw. Each row draws
with its own ``torch.Generator``, so a seeded request samples the same tokens whatever else
shares its batch.
"""

from __future__ import annotations

import torch


class SamplingError(ValueError):
    """Rows whose sampling distribution is not a finite probability vector. Raised before any
    generator draws or any state changes, so the other rows can be sampled again unchanged."""

    def __init__(self, rows: list[int]):
        super().__init__(f"sampling distribution is not finite for rows {rows}")
        self.rows = rows


def apply_penalties(
    logits: torch.Tensor,
    seen: torch.Tensor,
    output_counts: torch.Tensor,
    repetition: torch.Tensor,
    presence: torch.Tensor,
    frequency: torch.Tensor,
) -> torch.Tensor:
    """logits, seen (bool: in prompt or output), output_counts: (B, V); penalties: (B,).

    Repetition (Keskar et al. 2019): seen logits > 0 are divided by r, < 0 multiplied by r.
    Presence / frequency (OpenAI): logit -= presence * [count > 0] + frequency * count.
    """
    r = repetition[:, None]
    penalised = torch.where(logits > 0, logits / r, logits * r)
    logits = torch.where(seen, penalised, logits)
    counts = output_counts.to(logits.dtype)
    return logits - presence[:, None] * (counts > 0) - frequency[:, None] * counts


def apply_top_k_top_p_min_p(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor
) -> torch.Tensor:
    """Mask (to -inf) tokens outside top-k (k=0: off), the top-p nucleus, or below min_p * p_max.
    logits: (B, V); top_k (int), top_p, min_p: (B,)."""
    V = logits.shape[-1]
    sorted_logits, idx = logits.sort(dim=-1, descending=True)  # (B, V)
    k = torch.where(top_k > 0, top_k, V).clamp(max=V)
    rank = torch.arange(V, device=logits.device)[None, :]
    remove = rank >= k[:, None]
    probs = sorted_logits.masked_fill(remove, float("-inf")).softmax(-1)
    cum_before = probs.cumsum(-1) - probs  # mass of strictly better tokens
    remove |= cum_before >= top_p[:, None]
    remove |= probs < min_p[:, None] * probs[:, :1]
    remove[:, 0] = False  # always keep the best token
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, idx, sorted_logits)


def draw(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """One token per row of probs (B, V), each row with its own generator."""
    out = torch.empty(probs.shape[0], dtype=torch.long, device=probs.device)
    for i, g in enumerate(generators):
        out[i] = torch.multinomial(probs[i], 1, generator=g)[0]
    return out


def top_logprobs(logprobs: torch.Tensor, tokens: torch.Tensor, k: int) -> list[dict[int, float]]:
    """For each row: {token: logprob} of the chosen token and the k most likely ones."""
    chosen = logprobs.gather(-1, tokens[:, None])[:, 0]
    res: list[dict[int, float]] = []
    if k:
        vals, ids = logprobs.topk(k, dim=-1)
    for i in range(logprobs.shape[0]):
        d = {int(tokens[i]): float(chosen[i])}
        if k:
            d.update({int(t): float(v) for t, v in zip(ids[i].tolist(), vals[i].tolist())})
        res.append(d)
    return res


class SequenceSampler:
    """Per-sequence sampling state: its params, its own generator, and the tokens it has seen."""

    def __init__(self, params, prompt_ids: list[int], sample_index: int = 0, device="cpu"):
        self.params = params
        self.prompt_ids = prompt_ids
        self.output_ids: list[int] = []
        self.generator: torch.Generator | None = None
        if not params.greedy:
            self.generator = torch.Generator(device=device)
            if params.seed is not None:
                self.generator.manual_seed(params.seed + sample_index)
            else:
                self.generator.seed()

    @property
    def needs_penalties(self) -> bool:
        p = self.params
        return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0

    @property
    def needs_filter(self) -> bool:
        p = self.params
        return not p.greedy and (p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0)


def sample_next(
    logits: torch.Tensor, samplers: list[SequenceSampler]
) -> tuple[list[int], list[dict[int, float] | None]]:
    """Pick the next token for each row of logits (B, V). Returns tokens and, where asked,
    {token: logprob} of the raw model distribution (chosen token + top-k)."""
    logits = logits.float()
    B, V = logits.shape
    dev = logits.device
    want_lp = [s.params.logprobs is not None for s in samplers]
    raw_logprobs = logits.log_softmax(-1) if any(want_lp) else None
    if any(s.needs_penalties for s in samplers):
        seen = torch.zeros(B, V, dtype=torch.bool, device=dev)
        counts = torch.zeros(B, V, dtype=torch.long, device=dev)
        for i, s in enumerate(samplers):
            if s.needs_penalties:
                ids = torch.tensor(s.prompt_ids + s.output_ids, dtype=torch.long, device=dev)
                seen[i, ids] = True
                if s.output_ids:
                    counts[i] = torch.bincount(torch.tensor(s.output_ids, device=dev), minlength=V)[:V]
        f = lambda name: torch.tensor([getattr(s.params, name) for s in samplers], device=dev)  # noqa: E731
        logits = apply_penalties(
            logits, seen, counts, f("repetition_penalty"), f("presence_penalty"), f("frequency_penalty")
        )
    tokens = logits.argmax(-1)  # greedy rows keep this
    sampled = [i for i, s in enumerate(samplers) if not s.params.greedy]
    if sampled:
        idx = torch.tensor(sampled, device=dev)
        sub = logits[idx] / torch.tensor([samplers[i].params.temperature for i in sampled], device=dev)[:, None]
        if any(samplers[i].needs_filter for i in sampled):
            sub = apply_top_k_top_p_min_p(
                sub,
                torch.tensor([samplers[i].params.top_k for i in sampled], device=dev),
                torch.tensor([samplers[i].params.top_p for i in sampled], device=dev),
                torch.tensor([samplers[i].params.min_p for i in sampled], device=dev),
            )
        probs = sub.softmax(-1)
        bad = ~torch.isfinite(probs).all(-1) | ~(probs.sum(-1) > 0)  # (len(sampled),)
        if bad.any():
            raise SamplingError([sampled[i] for i in bad.nonzero()[:, 0].tolist()])
        tokens[idx] = draw(probs, [samplers[i].generator for i in sampled])
    lps: list[dict[int, float] | None] = [None] * B
    if raw_logprobs is not None:
        for i, s in enumerate(samplers):
            if want_lp[i]:
                lps[i] = top_logprobs(raw_logprobs[i : i + 1], tokens[i : i + 1], s.params.logprobs)[0]
    out = tokens.tolist()
    for s, t in zip(samplers, out):
        s.output_ids.append(t)
    return out, lps
