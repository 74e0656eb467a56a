"""Packed fixed-length batches from one or more prepared splits, sharded by rank, resumable.

Every rank walks the same global sequence of rows: global row g comes from source k chosen by a
low-discrepancy sequence over the mixture weights (replay of an old corpus is a second source
with a small weight), and is the next unread row of that source's :class:`DocStream`. A
micro-step takes ``world * micro_batch`` global rows and rank r keeps rows
[r * micro_batch, (r + 1) * micro_batch). The position is the global row count plus one cursor
per source: saved in checkpoints, it makes a resumed run read exactly the rows it would have.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import numpy as np

from slimlm.data.packing import PACKINGS, Batch, collate, pack_row
from slimlm.data.stream import DocStream
from slimlm.data.tokens import TokenDataset
from slimlm.errors import SlimLMError

GOLDEN = (math.sqrt(5) - 1) / 2


class BatchSource(Protocol):
    """What the trainer reads batches from (packed loader, variable-length sampler, ...)."""

    def next_batch(self) -> Batch: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def mixture_source(g: int, cum_weights: np.ndarray) -> int:
    """Source of global row g: the golden-ratio sequence frac(g * phi) falls in source k's share."""
    return int(np.searchsorted(cum_weights, (g * GOLDEN) % 1.0, side="right"))


class PackedLoader:
    def __init__(
        self,
        datasets: list[TokenDataset],
        seq_len: int,
        micro_batch: int,
        weights: list[float] | None = None,
        packing: str = "document",
        rank: int = 0,
        world: int = 1,
        seed: int = 0,
        shuffle: bool = True,
    ):
        if packing not in PACKINGS:
            raise SlimLMError(f"unknown packing '{packing}'; known: {', '.join(PACKINGS)}")
        if not datasets:
            raise SlimLMError("no training data given")
        weights = list(weights or [1.0] * len(datasets))
        if len(weights) != len(datasets) or min(weights) < 0 or sum(weights) <= 0:
            raise SlimLMError(f"need one non-negative weight per dataset ({len(datasets)}), got {weights}")
        w = np.asarray(weights, dtype=np.float64) / sum(weights)
        self.cum_weights = np.cumsum(w)[:-1]  # (K - 1,) boundaries in [0, 1)
        self.streams = [DocStream(d, seq_len, seed + 1000 * i, shuffle) for i, d in enumerate(datasets)]
        self.seq_len, self.micro_batch, self.packing = seq_len, micro_batch, packing
        self.rank, self.world = rank, world
        self.rows = 0
        self.cursors = [0] * len(datasets)

    def next_batch(self) -> Batch:
        rows = []
        for i in range(self.world * self.micro_batch):
            k = mixture_source(self.rows, self.cum_weights)
            mine = self.rank * self.micro_batch <= i < (self.rank + 1) * self.micro_batch
            if mine:
                tokens, places = self.streams[k].row(self.cursors[k])
                rows.append(pack_row(tokens, places, self.packing))
            self.cursors[k] += 1
            self.rows += 1
        return collate(rows)

    def state_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "cursors": list(self.cursors)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["cursors"]) != len(self.streams):
            raise SlimLMError(
                f"checkpoint's data position has {len(state['cursors'])} sources, this config {len(self.streams)}"
            )
        self.rows, self.cursors = int(state["rows"]), [int(c) for c in state["cursors"]]
