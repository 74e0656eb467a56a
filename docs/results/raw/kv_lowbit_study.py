"""Below int4 KV (issue 16, session 14): which 2- and 3-bit layouts fit the >= 5x budget against
bf16 (<= 51.2 bytes per token and KV head for K + V, head size 64) with the least loss.

A dense fake-quantization study, as ``kv_int4_study.py``: every key and value of every layer is
quantized and de-quantized before attention, then perplexity on the first NTOK tokens of the prose
corpus (windows of 1,024, stride 512). Keys always take the engine's static per-channel offsets
(``codec/offsets.py``, the built-in calibration text) and the Hadamard rotation; values
optionally take both (``vmu``: a static value offset is exact too, attention weights sum to 1).

Quantizers (per token, KV head and group of channels):
- ``asym``: b-bit codes on [min, max], fp16 scale + minimum (int4's layout): d b / 8 + 4 d / g bytes.
- ``sym``: b-bit codes on 2^b symmetric levels (i - (2^b - 1) / 2) s, no zero level, with s one
  byte, a power 2^(e / 16), chosen per group as the least-squared-error one of SEARCH exponents
  from the absmax's downwards (clipping): d b / 8 + d / g bytes.

    PYTHONPATH=src NTOK=2048 python docs/results/raw/kv_lowbit_study.py [variant ...]

The shipped layouts (``codec/lowbit.py``): "int3" is ``X5-k3g32-v3g64``, "int4s" is ``X4-k4g32-v4g64``.
Variants A-E and those marked vmu in docs/techniques.md give values the offset too (``quant``'s
default ``mu=True``); the shipped codecs do not.
"""

import math
import os
import sys
import time

import torch

from slimlm.eval.perplexity import corpus_ids, windows
from slimlm.kvcache.codec.offsets import CALIBRATION_TEXT
from slimlm.kvcache.codec.rotation import rotation
from slimlm.model.attention import attention
from slimlm.model.hub import load

torch.set_num_threads(1)
lm = load("smollm2-135m-instruct")
m = lm.model.float()
ids, _, _ = corpus_ids("prose", lm.tokenizer, int(os.environ.get("NTOK", 2048)))
wins = windows(len(ids), 1024, 512)
d = m.cfg.head_dim
R = rotation(d, "cpu")
SEARCH = int(os.environ.get("SEARCH", 6))


class Record:
    def __init__(self):
        self.k, self.v, self.n = {}, {}, 0

    def attend(self, layer, q, k, v, q_rows=None):
        self.k[layer] = self.k.get(layer, 0) + k[0].double().sum(1)
        self.v[layer] = self.v.get(layer, 0) + v[0].double().sum(1)
        if layer == 0:
            self.n += k.shape[2]
        T = k.shape[2]
        return attention(q, k, v, torch.ones(T, T, dtype=torch.bool).tril()[None, None], m.attn_scale)


rec = Record()
with torch.no_grad():
    cids = lm.tokenizer.encode(CALIBRATION_TEXT, add_special_tokens=False)
    m(torch.tensor([cids]), torch.arange(len(cids))[None], rec)
MU = {"k": [(rec.k[i] / rec.n).float()[None, :, None, :] for i in range(len(rec.k))],
      "v": [(rec.v[i] / rec.n).float()[None, :, None, :] for i in range(len(rec.v))]}


def asym(g, bits):
    n = 2**bits - 1
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    s = ((hi - lo) / n).clamp(min=1e-8).half().float()
    lo = lo.half().float()
    return ((g - lo) / s).round().clamp(0, n) * s + lo


def sym(g, bits):
    half = (2**bits - 1) / 2
    a = g.abs().amax(-1, keepdim=True).clamp(min=1e-6)
    e0 = torch.ceil(16 * torch.log2(a / half))
    best, err = None, None
    for j in range(SEARCH):
        s = torch.exp2((e0 - j) / 16)
        y = ((g / s - 0.5).round().clamp(-half - 0.5, half - 0.5) + 0.5) * s
        e = (y - g).pow(2).sum(-1, keepdim=True)
        best = y if best is None else torch.where(e < err, y, best)
        err = e if err is None else torch.minimum(e, err)
    return best


def quant(kind, bits, group, mu=True, rot=True):
    def f(x, layer, role):
        mean = MU[role][layer] if mu else 0.0
        y = x - mean
        if rot:
            y = y @ R
        g = y.reshape(*y.shape[:-1], d // group, group)
        y = (asym if kind == "asym" else sym)(g, bits).reshape(y.shape)
        if rot:
            y = y @ R.T
        return y + mean
    f.bytes = d * bits // 8 + (4 if kind == "asym" else 1) * d // group
    return f


def ident(x, layer, role):
    return x


ident.bytes = 2 * d


class FakeQuant:
    def __init__(self, fk, fv):
        self.fk, self.fv = fk, fv

    def attend(self, layer, q, k, v, q_rows=None):
        T = k.shape[2]
        mask = torch.ones(T, T, dtype=torch.bool).tril()[None, None]
        return attention(q, self.fk(k, layer, "k"), self.fv(v, layer, "v"), mask, m.attn_scale)


def ppl(fk, fv):
    nll = []
    with torch.no_grad():
        for b, e, first in wins:
            logits = m(torch.tensor([ids[b:e]]), torch.arange(e - b)[None], FakeQuant(fk, fv))[0].log_softmax(-1)
            nll += [-float(logits[t - b - 1, ids[t]]) for t in range(first, e)]
    return math.exp(sum(nll) / len(nll))


K4 = quant("asym", 4, 16)  # the shipped int4 keys
V4 = quant("asym", 4, 32, mu=False, rot=False)  # the shipped int4 values
VARIANTS = {
    "full": (ident, ident),
    "int4": (K4, V4),
    # keys alone / values alone
    "k-sym3-g64": (quant("sym", 3, 64), ident),
    "k-sym3-g32": (quant("sym", 3, 32), ident),
    "k-asym3-g64": (quant("asym", 3, 64), ident),
    "k-sym4-g64": (quant("sym", 4, 64), ident),
    "v-sym3-g64": (ident, quant("sym", 3, 64)),
    "v-sym3-g64-nomu": (ident, quant("sym", 3, 64, mu=False)),
    "v-sym3-g64-norot": (ident, quant("sym", 3, 64, rot=False)),
    "v-sym2-g32": (ident, quant("sym", 2, 32)),
    "v-asym2-g64": (ident, quant("asym", 2, 64, mu=False, rot=False)),
    "v-asym3-g64-norot": (ident, quant("asym", 3, 64, mu=False, rot=False)),
    # both, in the budget
    "A-k3-v3-g64": (quant("sym", 3, 64), quant("sym", 3, 64)),  # 25 + 25 = 50
    "B-k4g64-v2g32": (quant("sym", 4, 64), quant("sym", 2, 32)),  # 33 + 18 = 51
    "C-k3g32-v2g32": (quant("sym", 3, 32), quant("sym", 2, 32)),  # 26 + 18 = 44
    "D-k3g32-v3g64": (quant("sym", 3, 32), quant("sym", 3, 64)),  # 26 + 25 = 51
    # near 4 bits with one-byte scales, for a composition with a token budget
    "k4g64-v4g64": (quant("sym", 4, 64), quant("sym", 4, 64)),  # 33 + 33 = 66
    "k4g32-v4g64": (quant("sym", 4, 32), quant("sym", 4, 64)),  # 34 + 33 = 67
    "k4g64-v3g64": (quant("sym", 4, 64), quant("sym", 3, 64)),  # 33 + 25 = 58
    "k3g64-v4g64": (quant("sym", 3, 64), quant("sym", 4, 64)),  # 25 + 33 = 58
    # values without the offset (it hurts them: see docs/techniques.md)
    "k-sym4-g32": (quant("sym", 4, 32), ident),
    "k-sym4-g16": (quant("sym", 4, 16), ident),
    "v-sym4-g64-nomu": (ident, quant("sym", 4, 64, mu=False)),
    "X1-k4g32-v3g64": (quant("sym", 4, 32), quant("sym", 3, 64, mu=False)),  # 34 + 25 = 59
    "X2-k4g16-v3g64": (quant("sym", 4, 16), quant("sym", 3, 64, mu=False)),  # 36 + 25 = 61
    "X3-int4k-v3g64": (K4, quant("sym", 3, 64, mu=False)),  # 48 + 25 = 73
    "X4-k4g32-v4g64": (quant("sym", 4, 32), quant("sym", 4, 64, mu=False)),  # 34 + 33 = 67
    "X5-k3g32-v3g64": (quant("sym", 3, 32), quant("sym", 3, 64, mu=False)),  # 26 + 25 = 51
    "E-asym-k3g64-v2g64": (quant("asym", 3, 64), quant("asym", 2, 64, mu=False, rot=False)),  # 28 + 20 = 48
}

if __name__ == "__main__":
    base = None
    for name in sys.argv[1:] or list(VARIANTS):
        t = time.time()
        fk, fv = VARIANTS[name]
        p = ppl(fk, fv)
        base = base if base is not None else p
        print(f"{name:22s} {fk.bytes + fv.bytes:4d} B/token-head ({256 / (fk.bytes + fv.bytes):.2f}x vs bf16)  "
              f"ppl {p:.3f}  ({(p / base - 1) * 100:+.1f} % vs the first variant)  {time.time() - t:.0f}s", flush=True)
