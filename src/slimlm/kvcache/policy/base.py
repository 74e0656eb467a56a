"""The KV-cache policy extension point.

A policy decides, per sequence, which logical KV blocks to keep as the sequence grows; the
engine frees the blocks it drops, so memory stays bounded. It also states the attention span
the kept tokens imply (sink tokens, a local window, a distance ceiling), which the runner turns
into the attention mask, so that chunked prefill and decode see exactly what the policy keeps.

How to add one: see "Adding a KV-cache policy" in docs/architecture.md.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

from slimlm.registry import Registry


@dataclass(frozen=True)
class AttentionSpan:
    """Which keys a query at position p may see (besides causality): positions < ``sink``,
    and positions > p - ``window``; distances above ``distance_cap`` count as the cap."""

    sink: int = 0
    window: int | None = None
    distance_cap: int | None = None


class KVPolicy(ABC):
    name: ClassVar[str]

    @abstractmethod
    def blocks_to_evict(self, num_computed: int, table: list[int], block_size: int) -> list[int]:
        """Logical block indices to drop once ``num_computed`` tokens of the sequence are in
        the cache and the next query position is ``num_computed``. ``table`` holds the physical
        block per logical block (-1 where already evicted)."""

    def span(self) -> AttentionSpan:
        """The attention span the kept tokens imply; the default is full causal attention."""
        return AttentionSpan()

    def max_blocks(self, chunk_tokens: int, block_size: int) -> int | None:
        """Most blocks one sequence holds under this policy while computing up to
        ``chunk_tokens`` new tokens at once (None: unbounded). Lets the scheduler admit inputs
        longer than the pool or the model's context."""
        return None


KV_POLICIES: Registry[KVPolicy] = Registry("KV-cache policy")
