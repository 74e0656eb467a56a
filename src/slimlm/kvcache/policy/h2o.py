"""H2O: Heavy-Hitter Oracle (Zhang et al., 2023).

A small set of tokens ("heavy hitters") receives most of the attention mass; keeping them plus
the most recent tokens preserves quality at a fraction of the KV. H2O keeps, per layer and
per head, a recent window and the tokens with the largest accumulated attention scores (the
sum of the softmax probabilities every later query gave them), evicting the rest greedily.

Here, inside continuous batching: the attention mass is accumulated by the attention paths as
the sequence is prefilled (chunk by chunk) and decoded; when a sequence stores more than its
budget plus ``slack`` tokens, each (layer, KV head) keeps its own ``recent`` newest tokens and
its heaviest hitters among the rest (``per_head=False``: one choice per layer from the mass
summed over heads), and the engine compacts and frees blocks. The budget is a fraction of the
tokens the sequence has seen (a float in (0, 1]) or a token count (an int), at least
``min_tokens``.
"""

from __future__ import annotations

import torch

from slimlm.kvcache.policy.base import KV_POLICIES, KVPolicy


@KV_POLICIES.register("h2o")
class H2OPolicy(KVPolicy):
    granularity = "token"
    observe_attention = True

    def __init__(self, budget: float | int = 0.2, recent_ratio: float = 0.5, per_head: bool = True,
                 min_tokens: int = 32, block_slack: int = 1):
        """``budget``: tokens kept, a fraction (0, 1] of the sequence's tokens or a count (H2O's
        headline setting is 20 %); ``recent_ratio``: share of the budget given to the newest
        tokens (H2O splits half/half); ``per_head``: heavy hitters per KV head (H2O) or once per
        layer; ``min_tokens``: never compact below this; ``block_slack``: blocks stored beyond the
        budget before compacting (amortizes the compaction)."""
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
        self.budget_, self.recent_ratio, self.per_head = budget, recent_ratio, per_head
        self.min_tokens, self.block_slack = min_tokens, block_slack

    def __repr__(self) -> str:
        return f"H2OPolicy(budget={self.budget_}, recent_ratio={self.recent_ratio}, per_head={self.per_head})"

    def budget(self, num_tokens: int) -> int:
        b = self.budget_
        keep = int(-(-b * num_tokens // 1)) if isinstance(b, float) else b
        return min(num_tokens, max(keep, self.min_tokens))

    def slack(self, block_size: int) -> int:
        return self.block_slack * block_size

    def max_blocks(self, chunk_tokens: int, block_size: int) -> int | None:
        if isinstance(self.budget_, float):
            return None
        return -(-(self.budget_ + self.slack(block_size) + chunk_tokens) // block_size) + 1

    def select(self, mass: torch.Tensor | None, num_stored: int, keep: int) -> torch.Tensor:
        assert mass is not None  # (L, H, S)
        L, H, S = mass.shape
        recent = min(keep, int(round(keep * self.recent_ratio)))
        heavy = keep - recent
        old = mass[..., : S - recent]  # candidates for heavy hitters
        if not self.per_head:
            old = old.sum(1, keepdim=True).expand(L, H, -1)
        top = old.topk(heavy, dim=-1).indices if heavy else old.new_empty(L, H, 0, dtype=torch.long)
        tail = torch.arange(S - recent, S, device=mass.device).expand(L, H, recent)
        return torch.cat([top.sort(-1).values, tail], dim=-1)
