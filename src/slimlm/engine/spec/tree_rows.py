"""Tree drafts verified as decode rows (``EngineConfig.batch_invariant``).

A chain of drafts is verified row by row through the decode attention path: row i attends the
sequence's stored KV and rows 0..i, exactly what plain decode steps would attend, so greedy
output is bitwise that of plain decoding. A tree cannot be verified that way in place: two
children of one node both sit one position after it, and a decode row attends a contiguous run
of storage indices (its block table up to its length). So every root-to-leaf path of the tree
gets a *key view*: a block table in which its nodes sit at storage indices kv_start + depth.

- The first path (first children first: the draft's main chain) lives in the sequence's own
  blocks (view 0), as a chain would.
- Every later path starts where it leaves the nodes already placed (its divergence depth
  ``div``). Its view is its parent view's blocks before the block holding kv_start + div,
  then scratch blocks from the pool. The scratch block's slots before kv_start are copied
  from the sequence's block before the step; its slots from kv_start up to the divergence
  hold ancestors computed in this very step, so each such ancestor runs once more as a
  *twin row* (same token, position and keys: bitwise the same KV, written into the view; no
  logits). A divergence at a block boundary needs no copy and no twin.

Each node's row then attends its view up to its own storage index: the prefix, its ancestors
and itself, in order, as a plain decode row would. Rejected branches never enter the
sequence's KV: the accepted path's KV is moved to kv_start.. (``Engine._keep_path``) and the
scratch blocks go back to the pool after the step. For the top-2 tree at the first draft
(Chimera, Kangaroo, the draft model) that is one scratch block and at most one twin row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from slimlm.engine.paged_attention import kept_blocks
from slimlm.kvcache.manager import EVICTED


@dataclass
class TreeRows:
    """Where each node of one tree chunk is stored and which keys its row attends."""

    kv_start: int
    block_size: int
    depth: list[int]
    home: list[int]
    """Node -> index of the view its row (and KV) lives in."""
    views: list[list[int]]
    """Block tables; view 0 is the sequence's own."""
    twins: list[tuple[int, int]] = field(default_factory=list)
    """(node, view): an ancestor computed again into a later view (no logits)."""
    copies: list[tuple[int, int]] = field(default_factory=list)
    """(sequence block, scratch block) to copy before the step (the context part of the block)."""
    scratch: list[int] = field(default_factory=list)
    """Blocks taken from the pool for this step."""

    def slot(self, node: int, view: int | None = None) -> int:
        """Physical slot of ``node``'s KV in ``view`` (its home view by default)."""
        view = self.home[node] if view is None else view
        i = self.kv_start + self.depth[node]
        return self.views[view][i // self.block_size] * self.block_size + i % self.block_size

    def decode(self, node: int, view: int | None = None) -> tuple[int, list[int], list[int]]:
        """The runner's decode row metadata: (storage index, kept blocks, their logical indices)."""
        view = self.home[node] if view is None else view
        i = self.kv_start + self.depth[node]
        return (i, *kept_blocks(self.views[view], i + 1, self.block_size))


def leaf_paths(parents: list[int]) -> list[list[int]]:
    """Root-to-leaf node paths of a flattened tree (parents precede children), depth first with
    children in index order: the first path follows first children."""
    children: list[list[int]] = [[] for _ in parents]
    for i, p in enumerate(parents):
        if p >= 0:
            children[p].append(i)
    paths, stack = [], [[0]]
    while stack:
        path = stack.pop()
        kids = children[path[-1]]
        if not kids:
            paths.append(path)
        stack += [path + [k] for k in reversed(kids)]
    return paths


def plan_tree_rows(parents: list[int], kv_start: int, table: list[int], block_size: int,
                   alloc: Callable[[], int]) -> TreeRows | None:
    """Key views for a tree chunk whose root is stored at ``kv_start`` in ``table`` (see the
    module docstring); ``alloc`` hands out one scratch block per call. None when a view would
    need a context block the sequence no longer holds (an evicted block)."""
    bs = block_size
    depth = []
    for p in parents:
        depth.append(0 if p < 0 else depth[p] + 1)
    plan = TreeRows(kv_start, bs, depth, [-1] * len(parents), [list(table)])
    for path in leaf_paths(parents):
        div = next((d for d, n in enumerate(path) if plan.home[n] < 0), len(path))
        if div == len(path):
            continue
        if div == 0:  # the first path: the sequence's own blocks
            for n in path:
                plan.home[n] = 0
            continue
        c = (kv_start + div) // bs  # the first block this view replaces
        if c * bs < kv_start and table[c] == EVICTED:
            return None
        new = [alloc() for _ in range(c, (kv_start + len(path) - 1) // bs + 1)]
        plan.scratch += new
        if c * bs < kv_start:  # the block holds context: copy it before the step
            plan.copies.append((table[c], new[0]))
        v = len(plan.views)
        plan.views.append(plan.views[plan.home[path[div - 1]]][:c] + new)
        plan.twins += [(path[d], v) for d in range(max(0, c * bs - kv_start), div)]
        for n in path[div:]:
            plan.home[n] = v
    return plan


def scratch_needed(parents: list[int], kv_start: int, table: list[int], block_size: int) -> int | None:
    """Scratch blocks ``plan_tree_rows`` would take (None: it cannot plan this tree)."""
    n = [0]

    def count() -> int:
        n[0] += 1
        return 0

    return None if plan_tree_rows(parents, kv_start, table, block_size, count) is None else n[0]
