"""Calibration data: fixed-length token windows for importance estimation and scoring.

A calibration spec is a prepared token folder (``slimlm data prepare``; its train split is read),
or anything ``slimlm.data.sources.resolve`` knows (a corpus name, a file, a folder), tokenized
with the model's tokenizer. The windows are contiguous slices of the concatenated documents, in
the source's fixed order, so the same spec and token count always give the same windows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from slimlm.data.tokens import META, TokenDataset
from slimlm.errors import SlimLMError
from slimlm.tokenizer import Tokenizer


def calibration_windows(spec: str, tokenizer: Tokenizer | None, n_tokens: int, seq_len: int) -> torch.Tensor:
    """(N, seq_len) int64 token windows, N = ceil(n_tokens / seq_len) (fewer if the data is short)."""
    if n_tokens < 1 or seq_len < 2:
        raise SlimLMError(f"calibration needs tokens >= 1 and seq_len >= 2; got {n_tokens} and {seq_len}")
    n_windows = -(-n_tokens // seq_len)
    need = n_windows * seq_len
    path = Path(spec).expanduser()
    if (path / META).is_file():
        ds = TokenDataset(path, "train")
        ids = np.asarray(ds.tokens[: min(need, ds.n_tokens)], dtype=np.int64)
    else:
        from slimlm.data.sources import resolve

        if tokenizer is None:
            raise SlimLMError(f"calibration from '{spec}' needs the model's tokenizer; the model has none")
        chunks, have = [], 0
        for doc in resolve(spec).documents():
            chunks.extend(tokenizer.encode(doc.text))
            have = len(chunks)
            if have >= need:
                break
        ids = np.asarray(chunks[:need], dtype=np.int64)
    n = len(ids) // seq_len
    if n == 0:
        raise SlimLMError(f"calibration data '{spec}' has fewer than {seq_len} tokens")
    return torch.from_numpy(ids[: n * seq_len].copy()).view(n, seq_len)  # (N, T)


@torch.no_grad()
def window_perplexity(model, windows: torch.Tensor, batch_size: int = 4) -> float:
    """exp(mean next-token cross-entropy) of ``model`` over the windows (N, T): a quick before/after
    figure on the calibration data itself (held-out quality comes from `slimlm eval`)."""
    import math

    import torch.nn.functional as F

    total, n = 0.0, 0
    for i in range(0, len(windows), batch_size):
        ids = windows[i : i + batch_size].to(model.device)  # (b, T)
        logits = model(ids)[:, :-1].float()  # (b, T-1, V)
        total += F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").item()
        n += ids[:, 1:].numel()
    return math.exp(total / max(n, 1))
