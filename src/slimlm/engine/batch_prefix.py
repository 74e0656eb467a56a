"""BatchLLM-style global prefix ordering for offline batches.

Zheng et al., "BatchLLM: Optimizing Large Batched LLM Inference with Global Prefix Sharing and
Throughput-oriented Token Batching" (2024): look at the whole batch before running it, put
requests that share a prefix next to each other so the shared KV is computed once and freed as
soon as its group is done, and start the decode-heavy groups first so their long decodes overlap
with the prefills of the rest. The scheduler's in-flight prefix dedup keeps sharers from
computing the same blocks in the same step.
"""

from __future__ import annotations

from slimlm.kvcache.block_pool import block_hashes


def prefix_order(prompts: list[list[int]], max_tokens: list[int], block_size: int) -> list[int]:
    """A permutation of request indices: groups of prompts sharing their first block, the
    most decode-heavy group first; inside a group, prompts sorted by their block-hash chain so
    deeper shared prefixes are adjacent."""
    chains = [tuple(block_hashes(p, block_size)) for p in prompts]
    groups: dict[object, list[int]] = {}
    for i, chain in enumerate(chains):
        groups.setdefault(chain[0] if chain else ("single", i), []).append(i)

    def heaviness(members: list[int]) -> float:
        return max(max_tokens[i] / len(prompts[i]) for i in members)

    order: list[int] = []
    for members in sorted(groups.values(), key=lambda m: (-heaviness(m), m[0])):
        order += sorted(members, key=lambda i: (chains[i], -max_tokens[i] / len(prompts[i]), i))
    return order


def shared_prefix_tokens(prompts: list[list[int]], block_size: int) -> int:
    """Prompt tokens that a perfect prefix cache would not compute (full shared blocks)."""
    seen: set[int] = set()
    saved = 0
    for p in prompts:
        for h in block_hashes(p, block_size):
            if h in seen:
                saved += block_size
            seen.add(h)
    return saved
