"""Teacher top-k logits cached offline to disk, so a distillation run need not run the teacher.

``slimlm distill-cache CONFIG`` replays the run's own data loader (same data, seq_len, seed,
packing) for the run's ``train.steps`` updates, runs the teacher once over every row and writes
its k largest logits (raw, before any temperature) and their token ids:

    values.npy    (rows, seq_len, k) float32
    indices.npy   (rows, seq_len, k) int32
    topk_cache.json   k, seq_len, teacher, vocab_size, tokenizer sha256, {row key: row}

A row's key is a hash of its tokens and document segments, so lookups do not depend on the
micro-batch a row lands in, the process that reads it (DDP), or where a resumed run restarts.
``slimlm distill`` with ``distill.topk_cache = DIR`` then computes the top-k KL from the cache
(exactly the loss it computes online with ``distill.top_k``; tested) and never loads the teacher
unless the hidden-state loss needs it. A row the cache lacks is refused in one line.

Size: rows * seq_len * k * 8 bytes (e.g. 300 updates x 4 rows x 256 tokens x k=32: 79 MB).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from slimlm.data.packing import Batch
from slimlm.errors import SlimLMError

META = "topk_cache.json"


def row_key(ids: torch.Tensor, segments: torch.Tensor | None) -> str:
    """Hash of one row's tokens (T,) and document segments (T,) (None: one sequence)."""
    h = hashlib.sha1(ids.to(torch.int64).cpu().numpy().tobytes())
    if segments is not None:
        h.update(segments.to(torch.int64).cpu().numpy().tobytes())
    return h.hexdigest()


class TopKCache:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        f = self.path / META
        if not f.is_file():
            raise SlimLMError(f"{self.path} is not a top-k cache (no {META}); write it with `slimlm distill-cache`")
        self.meta = json.loads(f.read_text())
        self.k, self.seq_len = int(self.meta["k"]), int(self.meta["seq_len"])
        self.rows: dict[str, int] = self.meta["rows"]
        self.values = np.load(self.path / "values.npy", mmap_mode="r")  # (N, T, k)
        self.indices = np.load(self.path / "indices.npy", mmap_mode="r")  # (N, T, k)

    def check(self, vocab_size: int, tokenizer_sha: str | None, seq_len: int) -> None:
        if int(self.meta["vocab_size"]) != vocab_size:
            raise SlimLMError(f"top-k cache {self.path} was written for a {self.meta['vocab_size']}-token vocabulary, "
                              f"the student has {vocab_size}")
        if tokenizer_sha and self.meta.get("tokenizer_sha256") and tokenizer_sha != self.meta["tokenizer_sha256"]:
            raise SlimLMError(f"top-k cache {self.path} was written with another tokenizer than the student's")
        if seq_len != self.seq_len:
            raise SlimLMError(f"top-k cache {self.path} holds {self.seq_len}-token rows, data.seq_len is {seq_len}")

    def lookup(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(values (B, T, k) float32, indices (B, T, k) int64) of the batch's rows."""
        rows = []
        for b in range(batch.input_ids.shape[0]):
            key = row_key(batch.input_ids[b], None if batch.segment_ids is None else batch.segment_ids[b])
            if key not in self.rows:
                raise SlimLMError(f"a training row is not in the top-k cache {self.path}: write the cache with the "
                                  "same data, seq_len, seed and at least as many train.steps as the run")
            rows.append(self.rows[key])
        dev = batch.input_ids.device
        vals = torch.from_numpy(np.stack([self.values[r] for r in rows])).to(dev)
        idx = torch.from_numpy(np.stack([self.indices[r] for r in rows]).astype(np.int64)).to(dev)
        return vals, idx


@torch.no_grad()
def write_cache(teacher, loader, n_batches: int, k: int, out: Path, info: dict) -> int:
    """Run ``teacher`` over ``n_batches`` batches of ``loader``; write the cache to ``out``; rows written."""
    if k < 1 or k > teacher.cfg.vocab_size:
        raise SlimLMError(f"distill.top_k must be in 1..{teacher.cfg.vocab_size} for a top-k cache, got {k}")
    batches = [loader.next_batch() for _ in range(n_batches)]
    B, T = batches[0].input_ids.shape
    out.mkdir(parents=True, exist_ok=True)
    values = np.lib.format.open_memmap(out / "values.npy", "w+", np.float32, (n_batches * B, T, k))
    indices = np.lib.format.open_memmap(out / "indices.npy", "w+", np.int32, (n_batches * B, T, k))
    rows: dict[str, int] = {}
    n = 0
    for batch in batches:
        dev = teacher.device
        logits = teacher(batch.input_ids.to(dev), batch.position_ids.to(dev),
                         segment_ids=None if batch.segment_ids is None else batch.segment_ids.to(dev))
        v, i = logits.float().topk(k, dim=-1)  # (B, T, k)
        for b in range(B):
            key = row_key(batch.input_ids[b], None if batch.segment_ids is None else batch.segment_ids[b])
            if key in rows:
                continue  # the same row seen again (a small data set repeats): stored once
            values[n], indices[n] = v[b].cpu().numpy(), i[b].cpu().numpy().astype(np.int32)
            rows[key] = n
            n += 1
    values.flush()
    indices.flush()
    (out / META).write_text(json.dumps({**info, "k": k, "seq_len": T, "rows": rows}))
    return n
