"""Memory-mapped token files with document boundaries.

A prepared folder holds, per split (``train``, ``val``):

    {split}.bin       every token of the split back to back: uint16 when the vocab fits, else uint32
    {split}.idx.npy   int64 offsets, n_docs + 1 of them: document i is tokens[idx[i]:idx[i + 1]]

and ``meta.json`` (dtype, vocab size, end-of-document id, tokenizer hash, sources, counts),
written last, so a folder without it is an unfinished preparation. Every document ends with the
end-of-document token.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from slimlm.errors import SlimLMError

META = "meta.json"
SPLITS = ("train", "val")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


@dataclass
class TokenMeta:
    vocab_size: int
    dtype: str
    eos_id: int
    tokenizer_sha256: str
    """Hash of the tokenizer's JSON: a model trained on this data must use the same tokenizer."""
    sources: list[str]
    val_fraction: float
    docs: dict[str, int] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)

    def save(self, path: Path) -> None:
        tmp = path / (META + ".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.replace(path / META)

    @classmethod
    def load(cls, path: Path) -> TokenMeta:
        f = path / META
        if not f.is_file():
            raise SlimLMError(
                f"{path} is not prepared token data (no {META}); run `slimlm data prepare ... --out {path}`"
            )
        try:
            return cls(**json.loads(f.read_text()))
        except (ValueError, TypeError) as e:
            raise SlimLMError(f"cannot read {f}: {e}") from None


class TokenDataset:
    """One split of a prepared folder, memory-mapped: documents by index, tokens by range."""

    def __init__(self, path: str | Path, split: str = "train"):
        self.path = Path(path)
        self.split = split
        self.meta = TokenMeta.load(self.path)
        bin_file, idx_file = self.path / f"{split}.bin", self.path / f"{split}.idx.npy"
        if not bin_file.is_file() or not idx_file.is_file():
            raise SlimLMError(f"{self.path} has no '{split}' split")
        self.offsets = np.load(idx_file, allow_pickle=False)  # (n_docs + 1,)
        dtype = np.dtype(self.meta.dtype)
        n = bin_file.stat().st_size // dtype.itemsize
        if len(self.offsets) < 1 or int(self.offsets[-1]) != n:
            raise SlimLMError(f"{bin_file} holds {n} tokens but its index says {int(self.offsets[-1])}: corrupt")
        self.tokens = np.memmap(bin_file, dtype=dtype, mode="r") if n else np.zeros(0, dtype)  # (N,)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def n_docs(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)  # (n_docs,)

    def doc(self, i: int) -> np.ndarray:
        return np.asarray(self.tokens[self.offsets[i] : self.offsets[i + 1]])


class TokenWriter:
    """Appends documents to one split; ``flush`` makes what was written durable (resumable)."""

    def __init__(self, path: Path, split: str, dtype: np.dtype, keep_docs: int = 0):
        """Open for appending after the first ``keep_docs`` documents already written."""
        self.bin_file, self.idx_file = path / f"{split}.bin", path / f"{split}.idx.npy"
        self.dtype = dtype
        offsets = [0]
        if keep_docs and self.idx_file.is_file():
            offsets = np.load(self.idx_file, allow_pickle=False).tolist()[: keep_docs + 1]
        if len(offsets) != keep_docs + 1:
            raise SlimLMError(f"{self.idx_file} lacks documents its progress file counts; delete the folder")
        self.offsets: list[int] = offsets
        with open(self.bin_file, "ab") as f:  # drop tokens written after the last flush
            f.truncate(self.offsets[-1] * dtype.itemsize)
        self._f = open(self.bin_file, "ab")

    def add(self, ids: list[int]) -> None:
        self._f.write(np.asarray(ids, dtype=self.dtype).tobytes())
        self.offsets.append(self.offsets[-1] + len(ids))

    def flush(self) -> None:
        self._f.flush()
        tmp = self.idx_file.with_suffix(".tmp.npy")
        np.save(tmp, np.asarray(self.offsets, dtype=np.int64))
        tmp.replace(self.idx_file)

    def close(self) -> None:
        self.flush()
        self._f.close()
