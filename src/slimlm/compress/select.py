"""Offline data selection with a teacher: MiniPLM difference sampling and SALT's learnable examples.

    miniplm (Gu et al., 2024): score(x) = (log p_teacher(x) - log p_reference(x)) / |x|
        keep the documents with the largest gap: what the large teacher knows that a small
        reference model does not (the reference shares the tokenizer; usually a small model)
    salt (Rawat et al., 2024, SALT_DS): score(x) = -loss_small_teacher(x)
        keep the documents the small teacher finds learnable (lowest loss), after skipping the
        ``skip_easiest`` share (too easy to teach anything)

Scores use each document's first ``max_tokens`` tokens. Documents are ranked by score, ties by
index, so a selection is deterministic. The selection is written as an ordinary prepared folder
(train split: the kept documents in their original order; val split and tokenizer copied), so
the student trains on it with `slimlm train` / `slimlm distill` and no teacher online.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from slimlm.data.tokens import TokenDataset, TokenMeta, TokenWriter
from slimlm.errors import SlimLMError
from slimlm.model.transformer import CausalLM

SCORERS = ("miniplm", "salt", "random")


@dataclass
class SelectConfig:
    method: str = "miniplm"
    """'miniplm' (teacher-vs-reference gap), 'salt' (small teacher's learnable examples) or 'random'
    (a seeded uniform sample: the baseline a selection must beat at equal tokens)."""
    keep: float = 0.5
    """Share of the train documents kept."""
    max_tokens: int = 512
    """Tokens of each document scored (its start)."""
    seed: int = 0
    """'random': the sample's seed."""
    skip_easiest: float = 0.0
    """'salt': share of the lowest-loss documents dropped before keeping."""

    def __post_init__(self) -> None:
        if self.method not in SCORERS:
            raise SlimLMError(f"unknown selection method '{self.method}'; known: {', '.join(SCORERS)}")
        if not 0 < self.keep <= 1:
            raise SlimLMError(f"--keep must be in (0, 1], got {self.keep}")
        if not 0 <= self.skip_easiest < 1 or self.skip_easiest + self.keep > 1:
            raise SlimLMError(f"--skip-easiest {self.skip_easiest} + --keep {self.keep} must be <= 1")
        if self.max_tokens < 2:
            raise SlimLMError(f"--max-tokens must be >= 2, got {self.max_tokens}")


@torch.no_grad()
def doc_logprob(model: CausalLM, ds: TokenDataset, max_tokens: int) -> np.ndarray:
    """Mean next-token log-probability of each document's first ``max_tokens`` tokens, (n_docs,)."""
    out = np.zeros(ds.n_docs)
    for i in range(ds.n_docs):
        ids = torch.from_numpy(ds.doc(i)[:max_tokens].astype(np.int64))[None].to(model.device)  # (1, T)
        if ids.shape[1] < 2:
            out[i] = 0.0
            continue
        logits = model(ids)[0, :-1].float()  # (T-1, V)
        out[i] = -F.cross_entropy(logits, ids[0, 1:]).item()
    return out


def choose(scores: np.ndarray, keep: float, skip_highest: float = 0.0) -> np.ndarray:
    """Indices (ascending) of the ``keep`` share with the highest scores, after skipping the
    ``skip_highest`` share at the very top; ties by lower index."""
    n = len(scores)
    order = sorted(range(n), key=lambda i: (-scores[i], i))
    start = int(round(skip_highest * n))
    k = max(1, int(round(keep * n)))
    return np.sort(np.asarray(order[start : start + k], dtype=np.int64))


def write_selection(src: TokenDataset, kept: np.ndarray, out: Path, info: dict) -> TokenMeta:
    if out.exists():
        raise SlimLMError(f"{out} exists; choose a new output folder (selection never overwrites data)")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    w = TokenWriter(tmp, "train", np.dtype(src.meta.dtype))
    for i in kept.tolist():
        w.add(src.doc(int(i)).tolist())
    w.close()
    for f in ("val.bin", "val.idx.npy"):
        if (src.path / f).is_file():
            shutil.copy2(src.path / f, tmp / f)
    if (src.path / "tokenizer").is_dir():
        shutil.copytree(src.path / "tokenizer", tmp / "tokenizer")
    meta = TokenMeta(**{**asdict(src.meta), "sources": [f"select:{src.path}"],
                        "docs": {**src.meta.docs, "train": len(kept)},
                        "tokens": {**src.meta.tokens, "train": int(w.offsets[-1])}})
    meta.save(tmp)
    (tmp / "selection.json").write_text(json.dumps({**info, "kept": kept.tolist()}))
    tmp.replace(out)
    return meta
