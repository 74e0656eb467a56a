"""Turn windows of the token stream into training rows.

Two layouts of the same stream (documents back to back, each ending with its separator):

* ``document`` packing: a row holds pieces of several documents; ``segment_ids`` keep each
  token's attention inside its own document and ``position_ids`` restart at 0 per document, so a
  packed row trains exactly as its documents would alone; the target that would cross into the
  next document is ignored. No padding: every computed token is a real one.
* ``concat`` (classic concat-and-chunk, GPT-2/3): positions 0..T-1 and attention across documents.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

IGNORE = -100
PACKINGS = ("document", "concat")


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) long
    labels: torch.Tensor  # (B, T) long, IGNORE where no target
    position_ids: torch.Tensor  # (B, T) long
    segment_ids: torch.Tensor | None  # (B, T) long, None = one causal sequence per row
    real_tokens: int
    """Input tokens that are data, not padding (packed-token efficiency = real / B*T)."""

    @property
    def computed_tokens(self) -> int:
        return self.input_ids.numel()

    @property
    def target_tokens(self) -> int:
        return int((self.labels != IGNORE).sum())

    def to(self, device: torch.device | str) -> Batch:
        seg = None if self.segment_ids is None else self.segment_ids.to(device, non_blocking=True)
        return Batch(
            self.input_ids.to(device, non_blocking=True), self.labels.to(device, non_blocking=True),
            self.position_ids.to(device, non_blocking=True), seg, self.real_tokens,
        )


def positions_from_segments(seg: np.ndarray) -> np.ndarray:
    """(T,) segment ids -> (T,) positions restarting at 0 where the segment changes."""
    idx = np.arange(len(seg))
    starts = np.ones(len(seg), dtype=bool)
    starts[1:] = seg[1:] != seg[:-1]
    return idx - np.maximum.accumulate(np.where(starts, idx, 0))


def pack_row(tokens: np.ndarray, doc_ids: np.ndarray, packing: str) -> tuple[np.ndarray, ...]:
    """A window of T + 1 tokens (and the document of each) -> input, labels, positions, segments (T,)."""
    inp, lab = tokens[:-1].astype(np.int64), tokens[1:].astype(np.int64)
    if packing == "concat":
        return inp, lab, np.arange(len(inp)), None
    seg = doc_ids[:-1]
    lab = np.where(doc_ids[1:] == seg, lab, IGNORE)  # no target across a document boundary
    return inp, lab, positions_from_segments(seg), seg - seg[0]


def collate(rows: list[tuple[np.ndarray, ...]], real_tokens: int | None = None) -> Batch:
    inp, lab, pos, seg = (list(x) for x in zip(*rows))
    segment = None if seg[0] is None else torch.from_numpy(np.stack(seg).astype(np.int64))
    input_ids = torch.from_numpy(np.stack(inp))
    return Batch(
        input_ids, torch.from_numpy(np.stack(lab)), torch.from_numpy(np.stack(pos).astype(np.int64)),
        segment, input_ids.numel() if real_tokens is None else real_tokens,
    )
