"""Held-out perplexity of several models on the same val windows of a prepared folder (8 x 256 tokens).

    python recipes/heldout_ppl.py DATA_FOLDER MODEL [MODEL ...]
"""
import sys
import numpy as np
import torch
from slimlm.compress.calib import window_perplexity
from slimlm.data.tokens import TokenDataset
from slimlm.model.hub import load

torch.set_num_threads(1)
ds = TokenDataset(sys.argv[1], "val")
n, T = 8, 256
step = ds.n_tokens // n
win = torch.stack([torch.from_numpy(np.asarray(ds.tokens[i * step : i * step + T], dtype=np.int64)) for i in range(n)])
for m in sys.argv[2:]:
    model = load(m).model.float()
    print(f"{m}: held-out perplexity {window_perplexity(model, win):.2f} ({win.numel()} tokens, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params)", flush=True)
