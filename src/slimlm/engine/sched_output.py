"""The scheduler -> runner contract: plain data, no tensors."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ScheduledChunk:
    seq_id: int
    token_ids: list[int]
    """Tokens whose KV this step computes (a prefill chunk, one decode token, or a decode token
    followed by draft tokens to verify)."""
    start: int
    """Position of token_ids[0]; the sequence's earlier tokens are in the cache."""
    block_table: list[int]
    """Physical block per logical block (-1 = evicted by the KV policy)."""
    num_logits: int = 0
    """Logits wanted for the last ``num_logits`` tokens: 0 for a prefill chunk that does not
    finish the prompt, 1 to sample, 1 + drafts when verifying, all of them for prompt logprobs."""
    sample: bool = False
    """Whether the last token's logits draw the next token (the chunk completes the sequence)."""
    num_drafts: int = 0
    """Draft tokens at the end of ``token_ids`` to verify (speculative decoding)."""
    num_samples: int = 1
    """Samples drawn from the last logits: n > 1 for the first token of an n-sample request."""
    kv_start: int = -1
    """Storage index of token_ids[0] in the sequence's blocks: ``start`` unless a token-level
    KV policy compacted the sequence (then fewer tokens are stored than were seen). -1 on
    construction means ``start``."""
    prompt_len: int = 0
    """The sequence's prompt length: rows at positions >= it hold generated tokens."""
    tree_parents: list[int] | None = None
    """For a speculative tree: the index of each token's parent within ``token_ids`` (-1 for
    token 0, the last accepted token). Tokens then sit at their depth's position and attend to
    their ancestors only. None for a chain."""
    tree_rows: object | None = None
    """``batch_invariant``: the tree's key views (``engine/spec/tree_rows.py``: a ``TreeRows``,
    set by the engine before the step): each node is verified as its own decode row over its
    ancestors. None: a tree goes through the prefill path under its ancestor mask."""
    layout: object | None = None
    """The request's ``PromptLayout`` (``engine/segments.py``) when its prompt has a set: RoPE
    positions and the set mask come from it. None: position = index, causal mask."""

    def __post_init__(self) -> None:
        if self.kv_start < 0:
            self.kv_start = self.start


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    """Single-token chunks (decodes) first, then multi-token chunks (prefill, verification)."""
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    """(src, dst) blocks to copy before the step (copy-on-write of forked sequences)."""
    preempted: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks)

    @property
    def empty(self) -> bool:
        return not self.chunks
