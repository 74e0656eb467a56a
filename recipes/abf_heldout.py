"""Held-out loss of models by position range, for long-context continual pre-training (ABF).

    python recipes/abf_heldout.py DATA_FOLDER LONG SHORT MODEL [MODEL ...]

Scores the same N val windows of LONG tokens (a prepared folder's val split) with each model and
prints the mean next-token loss on positions 1..SHORT-1 ("short": inside the base model's trained
context) and SHORT..LONG-1 ("long": past it). A model that cannot use positions past SHORT loses
on the long range; ABF + long continued pre-training should close that gap while the short range
stays where it was. Deterministic (evenly spaced windows, no sampling).
"""
import sys

import numpy as np
import torch
import torch.nn.functional as F

from slimlm.data.tokens import TokenDataset
from slimlm.model.hub import load

torch.set_num_threads(1)
data, long_len, short_len, models = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
ds = TokenDataset(data, "val")
n = 16
step = (ds.n_tokens - long_len) // n
win = torch.stack([torch.from_numpy(np.asarray(ds.tokens[i * step : i * step + long_len], dtype=np.int64))
                   for i in range(n)])  # (n, LONG)
for m in models:
    model = load(m).model.float().eval()
    with torch.inference_mode():
        losses = []
        for i in range(0, n, 4):
            ids = win[i : i + 4]
            logits = model(ids)[:, :-1].float()  # (b, LONG-1, V)
            losses.append(F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none"))  # (b, LONG-1)
        loss = torch.cat(losses)  # position p predicts token p + 1
    short, far = loss[:, : short_len - 1].mean().item(), loss[:, short_len - 1 :].mean().item()
    print(f"{m}: rope_theta {model.cfg.rope_theta:g}: held-out loss positions 1-{short_len - 1}: {short:.3f}, "
          f"positions {short_len}-{long_len - 1}: {far:.3f} ({n} windows of {long_len})", flush=True)
