"""A prepared split as an endless stream of windows: documents shuffled per epoch, back to back.

Epoch e lays the documents out in an order seeded by (seed, e) and cuts that stream into
windows of T + 1 tokens (consecutive windows share one token, so every token is an input once);
row r of the stream is window perm_e[r mod rows_per_epoch] of epoch e = r // rows_per_epoch, the
window order being shuffled too, so a batch's rows come from all over the corpus rather than from
consecutive windows of one long document. Any row is computed directly from its index: a
loader's whole position is one integer per source.
"""

from __future__ import annotations

import numpy as np

from slimlm.data.tokens import TokenDataset
from slimlm.errors import SlimLMError


class DocStream:
    def __init__(self, ds: TokenDataset, seq_len: int, seed: int = 0, shuffle: bool = True):
        if ds.n_tokens < seq_len + 1:
            raise SlimLMError(
                f"{ds.path} ({ds.split}) has {ds.n_tokens} tokens: fewer than one sequence of {seq_len} + 1"
            )
        self.ds, self.seq_len, self.seed, self.shuffle = ds, seq_len, seed, shuffle
        self.rows_per_epoch = (ds.n_tokens - 1) // seq_len
        self._epoch: int | None = None
        self._order = self._ends = self._rows = np.zeros(0, np.int64)

    def _layout(self, epoch: int) -> None:
        if epoch == self._epoch:
            return
        n = self.ds.n_docs
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        self._order = order  # (n_docs,) document at each place in the stream
        self._ends = np.cumsum(self.ds.lengths[order])  # (n_docs,) stream offset where each place ends
        rows = self.rows_per_epoch
        self._rows = rng.permutation(rows) if self.shuffle else np.arange(rows)  # (rows,) window of each row
        self._epoch = epoch

    def row(self, r: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens (T + 1,) of row r, and the stream place (document) of each token (T + 1,)."""
        epoch, within = divmod(r, self.rows_per_epoch)
        self._layout(epoch)
        within = int(self._rows[within])
        start, end = within * self.seq_len, within * self.seq_len + self.seq_len + 1
        first = int(np.searchsorted(self._ends, start, side="right"))
        last = int(np.searchsorted(self._ends, end - 1, side="right"))
        tokens, places = [], []
        for place in range(first, last + 1):
            doc_start = self._ends[place] - self.ds.lengths[self._order[place]]
            lo, hi = max(start, doc_start), min(end, self._ends[place])
            d = self._order[place]
            off = self.ds.offsets[d] - doc_start
            tokens.append(np.asarray(self.ds.tokens[off + lo : off + hi]))
            places.append(np.full(hi - lo, place, dtype=np.int64))
        return np.concatenate(tokens), np.concatenate(places)
