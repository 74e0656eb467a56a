"""The KV-cache policy extension point: which tokens' KV each sequence keeps.

Two kinds, one base:

- **Block policies** (``granularity = "block"``; LM-Infinite's sink + window) decide per
  sequence which logical blocks to drop as it grows (``blocks_to_evict``); the engine frees
  them. They state the attention span the kept tokens imply (sink, window, distance ceiling),
  which the runner turns into the attention mask, so chunked prefill and decode see exactly
  what the policy keeps.
- **Token policies** (``granularity = "token"``; H2O) choose, per layer and per KV head, which
  stored tokens to keep once a sequence holds more than its budget (``select``). The engine
  then compacts the kept rows to the front of the sequence's blocks and frees the blocks left
  over: memory is really given back, and every attention path (native kernels included) keeps
  reading a dense run of keys. Keys carry their RoPE rotation from when they were computed, so
  they need no positions after compaction. A token policy that sets ``observe_attention``
  is shown the attention mass each stored key received (summed over the query heads of its
  KV head, accumulated over every query since the key was written) — kvpress's "press" idea,
  here inside continuous batching and kept per sequence.
- **Layer policies** (``granularity = "layer"``; MiniCache) evict nothing: they shape the KV
  spec at start-up (``layer_sharing``: which layers share a storage and how they merge).
- **Query policies** (``granularity = "query"``; Squeezed Attention, ShadowKV) evict nothing:
  at decode each query attends to a subset of the stored keys it picks from a summary of a long
  prefix (``decode_attention``; :mod:`slimlm.kvcache.policy.sparse`).

How to add one: see "How to add a KV-cache policy" in docs/architecture.md.
"""

from __future__ import annotations

from abc import ABC
from dataclasses import dataclass
from typing import ClassVar

import torch

from slimlm.kvcache.merge import MergeSpec
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
    granularity: ClassVar[str] = "block"
    """"block": ``blocks_to_evict``; "token": ``budget`` + ``select`` with compaction;
    "layer": ``layer_sharing``."""
    sparse_decode: ClassVar[bool] = False
    """Query policies: the decode path calls ``decode_attention`` (no native decode kernel)."""
    observe_attention: ClassVar[bool] = False
    """Token policies: accumulate the attention mass of every stored key (costs a scoring
    attention path: the native prefill kernel is not used)."""

    # ------------------------------------------------------------------ block policies
    def blocks_to_evict(self, num_computed: int, table: list[int], block_size: int) -> list[int]:
        """Logical block indices to drop once ``num_computed`` tokens of the sequence are in
        the cache and the next query position is ``num_computed``. ``table`` holds the physical
        block per logical block (-1 where already evicted)."""
        return []

    def span(self) -> AttentionSpan:
        """The attention span the kept tokens imply; the default is full causal attention."""
        return AttentionSpan()

    def max_blocks(self, chunk_tokens: int, block_size: int) -> int | None:
        """Most blocks one sequence holds under this policy while computing up to
        ``chunk_tokens`` new tokens at once (None: unbounded). Lets the scheduler admit inputs
        longer than the pool or the model's context."""
        return None

    # ------------------------------------------------------------------ token policies
    def budget(self, num_tokens: int) -> int:
        """Stored tokens a sequence of ``num_tokens`` (positions seen) keeps after compaction."""
        return num_tokens

    def slack(self, block_size: int) -> int:
        """Tokens stored beyond the budget before a compaction runs (amortizes its cost)."""
        return block_size

    def select(self, mass: torch.Tensor | None, num_stored: int, keep: int) -> torch.Tensor:
        """Indices (L, Hkv, keep) of the stored tokens to keep, ascending per row. ``mass``
        (L, Hkv, num_stored): accumulated attention per stored key (None unless
        ``observe_attention``)."""
        raise NotImplementedError

    def defer(self, num_computed: int, prompt_len: int) -> bool:
        """Hold off compaction for now (e.g. until the prompt has been read whole, so scores
        reflect all of it). Default: compact as soon as the budget is exceeded."""
        return False

    def select_seq(self, seq_id: int, mass: torch.Tensor | None, num_stored: int, num_seen: int,
                   keep: int) -> torch.Tensor:
        """``select`` with the sequence's id and the positions it has seen, for policies that
        keep per-sequence state (e.g. each stored key's position); the default is ``select``."""
        return self.select(mass, num_stored, keep)

    # ------------------------------------------------------------------ layer policies
    def layer_sharing(self, depth: int, block_size: int) -> tuple[dict[int, int], MergeSpec | None]:
        """Layers mapped to the layer whose storage they share, and how shared storages merge
        (ValueError when the model cannot take the setting)."""
        return {}, None

    def validate(self, cfg) -> None:
        """Checks against the model at engine start-up (ValueError, one line)."""

    def fork(self, parent: int, child: int) -> None:
        """``child`` (a parallel sample) starts from ``parent``'s stored KV: copy any state kept
        for it."""

    def reset(self, seq_id: int) -> None:
        """The sequence finished or was preempted: drop any state kept for it."""


KV_POLICIES: Registry[KVPolicy] = Registry("KV-cache policy")
