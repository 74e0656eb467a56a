"""Where int4 KV loses perplexity (issue 11): a dense fake-quantization study.

Every key and value of every layer is quantized and de-quantized before attention (what the
paged engine does when prompts come in chunks that read the cache back), then perplexity on the
first NTOK tokens of the prose corpus (windows of 1,024, stride 512, as `slimlm eval perplexity`).
Deterministic. Variants: which of K / V is quantized, rotated or not (the codec's Hadamard
rotation), group size, and KIVI's per-channel keys (groups of TOK tokens per channel, which the
paged codec does not build).

    PYTHONPATH=src NTOK=2048 python docs/results/raw/kv_int4_study.py [variant ...]
"""

import math
import os
import sys
import time

import torch

from slimlm.eval.perplexity import corpus_ids, windows
from slimlm.kvcache.codec.rotation import rotation
from slimlm.model.attention import attention
from slimlm.model.hub import load

torch.set_num_threads(1)
lm = load("smollm2-135m-instruct")
m = lm.model.float()
ids, _, _ = corpus_ids("prose", lm.tokenizer, int(os.environ.get("NTOK", 4096)))
wins = windows(len(ids), 1024, 512)
d = m.cfg.head_dim
R = rotation(d, "cpu")


def per_token(x, group, rot):
    """Asymmetric 4-bit, groups of ``group`` channels per token and head (fp16 scale + minimum)."""
    if rot:
        x = x @ R
    g = x.reshape(*x.shape[:-1], d // group, group)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    s = ((hi - lo) / 15).clamp(min=1e-8).half().float()
    lo = lo.half().float()
    y = (((g - lo) / s).round().clamp(0, 15) * s + lo).reshape(x.shape)
    return y @ R.T if rot else y


def per_channel(x, tokens):
    """KIVI keys: asymmetric 4-bit per channel over groups of ``tokens`` tokens. x (1, H, T, d)."""
    B, H, T, dd = x.shape
    n = -(-T // tokens) * tokens
    xp = torch.cat([x, x[:, :, -1:].expand(B, H, n - T, dd)], 2).view(B, H, n // tokens, tokens, dd)
    lo, hi = xp.amin(3, keepdim=True), xp.amax(3, keepdim=True)
    s = ((hi - lo) / 15).clamp(min=1e-8).half().float()
    lo = lo.half().float()
    return (((xp - lo) / s).round().clamp(0, 15) * s + lo).view(B, H, n, dd)[:, :, :T]


class FakeQuant:
    def __init__(self, fk, fv):
        self.fk, self.fv = fk, fv

    def attend(self, layer, q, k, v, q_rows=None):
        T = k.shape[2]
        mask = torch.ones(T, T, dtype=torch.bool).tril()[None, None]
        return attention(q, self.fk(k), self.fv(v), mask, m.attn_scale)


def ppl(fk, fv):
    nll = []
    with torch.no_grad():
        for b, e, first in wins:
            logits = m(torch.tensor([ids[b:e]]), torch.arange(e - b)[None], FakeQuant(fk, fv))[0].log_softmax(-1)
            nll += [-float(logits[t - b - 1, ids[t]]) for t in range(first, e)]
    return math.exp(sum(nll) / len(nll))


def I(x):
    return x


VARIANTS = {
    "full": (I, I),
    "kv-g32": (lambda x: per_token(x, 32, False),) * 2,
    "kv-g32-rot": (lambda x: per_token(x, 32, True),) * 2,
    "kv-g16-rot": (lambda x: per_token(x, 16, True),) * 2,
    "k-g32": (lambda x: per_token(x, 32, False), I),
    "k-g32-rot": (lambda x: per_token(x, 32, True), I),
    "v-g32": (I, lambda x: per_token(x, 32, False)),
    "v-g32-rot": (I, lambda x: per_token(x, 32, True)),
    "k-kivi16": (lambda x: per_channel(x, 16), I),
    "k-kivi16-v-g32": (lambda x: per_channel(x, 16), lambda x: per_token(x, 32, False)),
}

if __name__ == "__main__":
    base = None
    for name in sys.argv[1:] or list(VARIANTS):
        t = time.time()
        p = ppl(*VARIANTS[name])
        base = base if base is not None else p
        print(f"{name:16s} {p:.3f}  ({(p / base - 1) * 100:+.1f} % vs the first variant)  {time.time() - t:.0f}s",
              flush=True)
