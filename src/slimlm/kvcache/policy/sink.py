"""LM-Infinite / attention sinks: keep the first tokens and a recent window.

Han et al., "LM-Infinite: Zero-Shot Extreme Length Generalization for LLMs" (2023): a
Λ-shaped mask (the first ``sink`` tokens plus the last ``window`` tokens) and a distance
ceiling, so relative distances never exceed what the model saw in training. Xiao et al.
(StreamingLLM, 2023) show the same sinks keep a model stable over unbounded streams. Blocks
between the sinks and the window are freed, so memory stays bounded whatever the length.
"""

from __future__ import annotations

from dataclasses import dataclass

from slimlm.kvcache.policy.base import KV_POLICIES, AttentionSpan, KVPolicy


@KV_POLICIES.register("sink")
@dataclass
class SinkPolicy(KVPolicy):
    sink: int = 4
    """Leading tokens always kept (the attention sink); LM-Infinite's n_global."""
    window: int = 1024
    """Recent tokens each query sees; LM-Infinite's L_local."""
    distance_cap: int | None = None
    """Distance ceiling for the sink tokens; None = ``window`` (LM-Infinite sets both to the
    pre-training length)."""

    def __post_init__(self) -> None:
        if self.sink < 0 or self.window < 1:
            raise ValueError(f"sink policy needs sink >= 0 and window >= 1, got {self.sink}, {self.window}")

    def span(self) -> AttentionSpan:
        return AttentionSpan(self.sink, self.window, self.distance_cap or self.window)

    def blocks_to_evict(self, num_computed: int, table: list[int], block_size: int) -> list[int]:
        # the next query is at position num_computed and sees keys > num_computed - window
        first_needed = num_computed - self.window + 1
        sink_blocks = -(-self.sink // block_size)
        last_droppable = first_needed // block_size  # blocks [sink_blocks, last_droppable) are unseen
        return [i for i in range(sink_blocks, min(last_droppable, len(table))) if table[i] != -1]

    def max_blocks(self, chunk_tokens: int, block_size: int) -> int:
        return -(-self.sink // block_size) + (self.window + chunk_tokens) // block_size + 2
