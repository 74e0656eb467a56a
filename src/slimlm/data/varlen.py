"""Variable-sequence-length batches: every sequence from a single document, bucketed by length.

Dataset Decomposition (Pouransari et al., 2024, Sec. 2): a document of n tokens gives n - 1
(input, target) pairs, cut into chunks whose lengths are the powers of two of the binary
expansion of n - 1 (e.g. 1000 -> 512 + 256 + 128 + 64 + 32 + 8), longest first; chunks go to the
bucket of their length. Each batch comes from one bucket and holds ``batch_tokens`` tokens, i.e.
batch_tokens / L sequences of length L, so attention cost follows the real document lengths and
no sequence mixes documents or needs a mask. Chunks shorter than ``min_len`` and each bucket's
remainder that does not fill a batch are left out (reported by ``kept_fraction``).

The batch order of an epoch is seeded by (seed, epoch) and chosen by name from
``slimlm.data.curriculum.CURRICULA``: 'uniform' (a permutation: buckets sampled in proportion to
their tokens) or 'grow' (the paper's short-to-long curriculum, in cycles).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from slimlm.data.curriculum import CURRICULA
from slimlm.data.packing import Batch, collate
from slimlm.data.tokens import TokenDataset
from slimlm.errors import SlimLMError


def decompose(n_pairs: int, max_len: int, min_len: int) -> list[int]:
    """Chunk lengths for a document with ``n_pairs`` targets: max_len pieces, then binary expansion."""
    out = [max_len] * (n_pairs // max_len)
    rest = n_pairs % max_len
    bit = max_len >> 1
    while bit >= min_len:
        if rest & bit:
            out.append(bit)
        bit >>= 1
    return out


class VariableLengthSampler:
    def __init__(
        self,
        dataset: TokenDataset,
        batch_tokens: int,
        max_len: int,
        min_len: int = 32,
        rank: int = 0,
        world: int = 1,
        seed: int = 0,
        curriculum: str = "uniform",
        cycles: int = 1,
    ):
        self.curriculum, self.cycles = CURRICULA.get(curriculum), cycles
        if cycles < 1:
            raise SlimLMError(f"data.curriculum_cycles must be >= 1; got {cycles}")
        for name, v in (("max_len", max_len), ("min_len", min_len)):
            if v <= 0 or v & (v - 1):
                raise SlimLMError(f"{name} must be a power of two, got {v}")
        if max_len * world > batch_tokens or batch_tokens % (max_len * world):
            raise SlimLMError(
                f"batch_tokens ({batch_tokens}) must be a multiple of max_len x world ({max_len} x {world})"
            )
        self.ds, self.batch_tokens, self.rank, self.world, self.seed = dataset, batch_tokens, rank, world, seed
        self.max_len = max_len
        buckets: dict[int, list[int]] = {}
        for d, n in enumerate(dataset.lengths):
            start = int(dataset.offsets[d])
            for length in decompose(int(n) - 1, max_len, min_len):
                buckets.setdefault(length, []).append(start)
                start += length
        self.buckets = {k: np.asarray(v, dtype=np.int64) for k, v in sorted(buckets.items())}
        self.batches_per_epoch = {k: len(v) // (batch_tokens // k) for k, v in self.buckets.items()}
        if not sum(self.batches_per_epoch.values()):
            raise SlimLMError(f"{dataset.path}: no bucket holds {batch_tokens} tokens; lower batch_tokens")
        self.index = 0
        self._order: tuple[int, list[tuple[int, np.ndarray]]] | None = None

    @property
    def kept_fraction(self) -> float:
        """Targets used per epoch / all targets of the split."""
        used = sum(n * self.batch_tokens for n in self.batches_per_epoch.values())
        return used / max(1, int((self.ds.lengths - 1).sum()))

    @property
    def attention_cost(self) -> float:
        """Attention score work per epoch (sum of L^2 over sequences) / the same tokens in max_len rows."""
        used = {k: n * self.batch_tokens for k, n in self.batches_per_epoch.items()}  # tokens per length
        return sum(t * k for k, t in used.items()) / max(1, sum(used.values()) * self.max_len)

    def batch_order(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        """The epoch's batches as (length, chunk starts), in the curriculum's order."""
        rng = np.random.default_rng([self.seed, epoch])
        by_length = {}
        for length, starts in self.buckets.items():
            per = self.batch_tokens // length
            perm = rng.permutation(starts)
            by_length[length] = [(length, perm[i * per : (i + 1) * per]) for i in range(self.batches_per_epoch[length])]
        return self.curriculum(by_length, rng, self.cycles)

    def next_batch(self) -> Batch:
        n = sum(self.batches_per_epoch.values())
        epoch, i = divmod(self.index, n)
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, self.batch_order(epoch))
        length, starts = self._order[1][i]
        self.index += 1
        per_rank = len(starts) // self.world
        rows = []
        for s in starts[self.rank * per_rank : (self.rank + 1) * per_rank]:
            toks = np.asarray(self.ds.tokens[s : s + length + 1]).astype(np.int64)  # (L + 1,)
            rows.append((toks[:-1], toks[1:], np.arange(length), None))
        return collate(rows)

    def state_dict(self) -> dict[str, Any]:
        return {"index": self.index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.index = int(state["index"])
