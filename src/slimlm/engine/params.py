"""SamplingParams, in vLLM's shape, validated on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1
"""OpenAI's ``seed`` is a 64-bit signed integer."""
MAX_TEMPERATURE = 2.0
"""OpenAI's limit on ``temperature``."""
GREEDY_BELOW = 1e-5
"""Temperatures below this are greedy (as vLLM): dividing logits by 1e-300 overflows to inf."""
MAX_REPETITION_PENALTY = 100.0
"""Repetition penalties are bounded so that penalised logits stay finite."""


@dataclass
class SamplingParams:
    n: int = 1
    """Number of samples for the prompt; they share the prompt's KV cache."""
    max_tokens: int = 16
    temperature: float = 1.0
    """0 means greedy."""
    top_p: float = 1.0
    top_k: int = 0
    """0 or -1 disables top-k."""
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    """Divides positive / multiplies negative logits of tokens seen in prompt or output (CTRL)."""
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    """Return this many top log-probabilities per generated token (plus the chosen one)."""
    prompt_logprobs: int | None = None
    """Return log-probabilities of the prompt tokens (and this many alternatives); used to score
    text (perplexity, multiple choice). Such requests do not read the prefix cache."""
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    cache_salt: str | None = None
    """Prefix-cache isolation (as vLLM's ``cache_salt``): requests only share cached KV blocks with
    requests that carry the same salt. The server sets it per API key and/or from the request."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in self.stop if s]
        if self.top_k == -1:
            self.top_k = 0
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                     "frequency_penalty"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
        for name in ("n", "max_tokens", "top_k", "seed", "logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
                raise ValueError(f"{name} must be an integer, got {v!r}")
        checks = [
            ("n", self.n >= 1, "must be at least 1"),
            ("max_tokens", self.max_tokens >= 1, "must be at least 1"),
            ("temperature", 0 <= self.temperature <= MAX_TEMPERATURE, f"must be in [0, {MAX_TEMPERATURE:g}]"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("top_k", self.top_k >= 0, "must be -1, 0 or positive"),
            ("min_p", 0 <= self.min_p <= 1, "must be in [0, 1]"),
            ("repetition_penalty", 1 / MAX_REPETITION_PENALTY <= self.repetition_penalty <= MAX_REPETITION_PENALTY,
             f"must be in [{1 / MAX_REPETITION_PENALTY:g}, {MAX_REPETITION_PENALTY:g}]"),
            ("seed", self.seed is None or SEED_MIN <= self.seed <= SEED_MAX,
             f"must fit a 64-bit signed integer [{SEED_MIN}, {SEED_MAX}]"),
            ("presence_penalty", -2 <= self.presence_penalty <= 2, "must be in [-2, 2]"),
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "must be in [-2, 2]"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= 20, "must be in [0, 20]"),
            ("prompt_logprobs", self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20,
             "must be in [0, 20]"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise ValueError(f"{name} {why}, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW
