"""H2O: Heavy-Hitter Oracle (Zhang et al., 2023).

A small set of tokens ("heavy hitters") receives most of the attention mass; keeping them plus
the most recent tokens preserves quality at a fraction of the KV. H2O keeps, per layer and
per head, a recent window and the tokens with the largest accumulated attention scores (the
sum of the softmax probabilities every later query gave them), evicting the rest greedily.

Here, inside continuous batching: the attention paths accumulate each stored key's attention
mass as the sequence is prefilled (chunk by chunk) and decoded. When a sequence stores more
than its budget plus ``slack`` tokens, each (layer, KV head) keeps its own ``recent`` newest
tokens and its heaviest hitters among the rest (``per_head=False``: one choice per layer from
the mass summed over heads), and the engine compacts and frees blocks. The budget is a
fraction of the tokens the sequence has seen (a float in (0, 1]) or a token count (an int), at
least ``min_tokens``.

When it decides (``schedule``):

- ``"prompt"`` (default): nothing is evicted while the prompt is being read; the first
  compaction runs once the prompt's last chunk is computed, on the mass every prompt query
  gave (the question at the end of a prompt included, as kvpress scores a whole prompt), and
  from then on H2O evicts online at every step of decode. Peak memory: a sequence holds its
  whole prompt's KV until its prompt completes, then ``budget + slack``; across a batch the
  transient is the prompts in prefill at once, which the scheduler's token budget
  (``max_num_batched_tokens``) bounds for prompts shorter than it (a prompt completed in a
  step is compacted in that step). A longer prompt is held whole while its chunks run.
- ``"online"``: compact after every chunk, prefill included (the memory bound of
  ``max_blocks`` holds for count budgets at every moment, so prompts longer than the pool can
  run), but early chunks are scored before the rest of the prompt is seen.

What a key's score is (``score``):

- ``"sum"``: its accumulated mass (H2O's accumulated attention): keys seen by more queries
  score higher, which favours old tokens.
- ``"mean"``: its mass divided by the number of queries that could see it (positions seen
  minus its own position), the average attention it received, as kvpress's
  ObservedAttentionPress scores; the policy keeps each stored key's position per sequence
  to know that count after compactions.

Which queries score a prompt key (``window``, SnapKV's observation window; Li et al., 2024):

- ``0`` (default): every query since the key was written (H2O), the whole prompt included.
- ``W > 0``: once the chunk that completes the prompt is computed, each stored key's score
  becomes the attention the prompt's last ``W`` queries gave it (the question at the end of a
  prompt is in that window; all of the chunk's queries if the chunk is shorter), summed over the
  query heads of its KV head; every later (decode) query adds its attention as in H2O. The
  attention paths compute the window's scores (``PagedAttention``'s observation step) and they
  replace the accumulated mass in the cache, so compaction, forks and preemption carry them as
  they carry H2O's mass. Only with ``score="sum"`` (a mean over "observing queries" has no
  meaning once most of them are dropped from the score).

``pool`` (odd, 1 = off): before choosing, each key's score becomes the largest score of the
``pool`` stored keys centred on it (SnapKV's pooling: a chosen token keeps its neighbours, so a
kept fact keeps the tokens that spell it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slimlm.kvcache.policy.base import KV_POLICIES, KVPolicy

SCHEDULES = ("prompt", "online")
SCORES = ("sum", "mean")


@KV_POLICIES.register("h2o")
class H2OPolicy(KVPolicy):
    granularity = "token"
    observe_attention = True

    def __init__(self, budget: float | int = 0.2, recent_ratio: float = 0.5, per_head: bool = True,
                 min_tokens: int = 32, block_slack: int = 1, schedule: str = "prompt", score: str = "sum",
                 window: int = 0, pool: int = 1):
        """``budget``: tokens kept, a fraction (0, 1] of the sequence's tokens or a count (H2O's
        headline setting is 20 %); ``recent_ratio``: share of the budget given to the newest
        tokens (H2O splits half/half); ``per_head``: heavy hitters per KV head (H2O) or once per
        layer; ``min_tokens``: never compact below this; ``block_slack``: blocks stored beyond the
        budget before compacting (amortizes the compaction); ``schedule``: "prompt" (first
        eviction once the prompt is read) or "online" (after every chunk); ``score``: "sum"
        (accumulated mass) or "mean" (mass per observing query); ``window``: score prompt keys by
        the prompt's last ``window`` queries (0: by all of them); ``pool``: max-pool scores over
        this many neighbouring keys (1: off)."""
        if isinstance(budget, bool) or not isinstance(budget, (int, float)):
            raise ValueError(f"h2o budget must be a fraction in (0, 1] or a token count, got {budget!r}")
        if isinstance(budget, float) and not 0.0 < budget <= 1.0:
            raise ValueError(f"h2o budget as a fraction must be in (0, 1], got {budget}")
        if isinstance(budget, int) and budget < 1:
            raise ValueError(f"h2o budget as a token count must be >= 1, got {budget}")
        if not 0.0 <= recent_ratio <= 1.0:
            raise ValueError(f"h2o recent_ratio must be in [0, 1], got {recent_ratio}")
        if min_tokens < 1 or block_slack < 1:
            raise ValueError("h2o min_tokens and block_slack must be >= 1")
        if isinstance(budget, int) and budget < min_tokens:
            raise ValueError(f"h2o budget ({budget} tokens) is below min_tokens ({min_tokens}); "
                             f"raise the budget or lower min_tokens")
        if schedule not in SCHEDULES:
            raise ValueError(f"h2o schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
        if score not in SCORES:
            raise ValueError(f"h2o score must be one of {', '.join(SCORES)}, got {score!r}")
        if isinstance(window, bool) or not isinstance(window, int) or window < 0:
            raise ValueError(f"h2o window must be a query count >= 0 (0: off), got {window!r}")
        if isinstance(pool, bool) or not isinstance(pool, int) or pool < 1 or pool % 2 == 0:
            raise ValueError(f"h2o pool must be an odd key count >= 1 (1: off), got {pool!r}")
        if window and score != "sum":
            raise ValueError("h2o window scores keys by the window's summed attention: use it with score=sum")
        self.budget_, self.recent_ratio, self.per_head = budget, recent_ratio, per_head
        self.min_tokens, self.block_slack = min_tokens, block_slack
        self.schedule, self.score = schedule, score
        self.window, self.pool = window, pool
        self._pos: dict[int, tuple[torch.Tensor, int]] = {}  # seq -> (kept keys' positions (L, H, K), seen then)

    def __repr__(self) -> str:
        return (f"H2OPolicy(budget={self.budget_}, recent_ratio={self.recent_ratio}, per_head={self.per_head}, "
                f"schedule={self.schedule!r}, score={self.score!r}, window={self.window}, pool={self.pool})")

    @property
    def observe_window(self) -> int:
        """Queries at the end of a prompt whose attention replaces its keys' mass (0: none)."""
        return self.window

    def budget(self, num_tokens: int) -> int:
        b = self.budget_
        keep = int(-(-b * num_tokens // 1)) if isinstance(b, float) else b
        return min(num_tokens, max(keep, self.min_tokens))

    def slack(self, block_size: int) -> int:
        return self.block_slack * block_size

    def defer(self, num_computed: int, prompt_len: int) -> bool:
        return self.schedule == "prompt" and num_computed < prompt_len

    def max_blocks(self, chunk_tokens: int, block_size: int) -> int | None:
        if isinstance(self.budget_, float) or self.schedule == "prompt":
            return None  # a fraction grows with the sequence; "prompt" holds the whole prompt
        return -(-(self.budget_ + self.slack(block_size) + chunk_tokens) // block_size) + 1

    def select_seq(self, seq_id: int, mass: torch.Tensor | None, num_stored: int, num_seen: int,
                   keep: int) -> torch.Tensor:
        if self.score == "sum":
            return self.select(mass, num_stored, keep)
        assert mass is not None
        L, H, S = mass.shape
        prev = self._pos.get(seq_id)
        fresh = torch.arange(prev[1] if prev else 0, num_seen, device=mass.device).expand(L, H, -1)
        pos = fresh if prev is None else torch.cat([prev[0], fresh], -1)
        if pos.shape[-1] != S:  # storage and positions disagree (cannot happen: compaction is ours)
            raise RuntimeError(f"h2o: {S} stored keys but {pos.shape[-1]} known positions for sequence {seq_id}")
        idx = self.select(mass / (num_seen - pos).clamp(min=1).to(mass.dtype), num_stored, keep)
        self._pos[seq_id] = (torch.gather(pos, -1, idx), num_seen)
        return idx

    def fork(self, parent: int, child: int) -> None:
        if parent in self._pos:
            self._pos[child] = self._pos[parent]  # never modified in place: sharing is safe

    def reset(self, seq_id: int) -> None:
        self._pos.pop(seq_id, None)

    def select(self, mass: torch.Tensor | None, num_stored: int, keep: int) -> torch.Tensor:
        assert mass is not None  # (L, H, S)
        L, H, S = mass.shape
        if self.pool > 1:  # (L, H, S): each key scores the largest score around it
            mass = F.max_pool1d(mass.reshape(L * H, 1, S), self.pool, 1, self.pool // 2).view(L, H, S)
        recent = min(keep, int(round(keep * self.recent_ratio)))
        heavy = keep - recent
        old = mass[..., : S - recent]  # candidates for heavy hitters
        if not self.per_head:
            old = old.sum(1, keepdim=True).expand(L, H, -1)
        top = old.topk(heavy, dim=-1).indices if heavy else old.new_empty(L, H, 0, dtype=torch.long)
        tail = torch.arange(S - recent, S, device=mass.device).expand(L, H, recent)
        return torch.cat([top.sort(-1).values, tail], dim=-1)
