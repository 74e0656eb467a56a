"""Where int4 KV loses perplexity (issue 11): a dense fake-quantization study.

Every key and value of every layer is quantized and de-quantized before attention (what the
paged engine does when prompts come in chunks that read the cache back), then perplexity on the
first NTOK tokens of the prose corpus (windows of 1,024, stride 512, as `slimlm eval perplexity`).
Deterministic. Variants: which of K / V is quantized, rotated or not (the codec's Hadamard
rotation), group size, KIVI's per-channel keys (groups of 16 tokens per channel; ``-open``: the
query's own, still open block of 16 tokens read in full precision, as a paged KIVI cache would
hold it), and static per-channel key smoothing (``sm``): a scale s per (layer, KV head, RoPE
channel pair), keys stored as k / s per token and s folded back exactly (into the query).
The scales come from calibration keys (``cal``: the RMS of each channel over CAL tokens of the
essays corpus, a text the prose corpus does not contain) or data-free from the weights (``w``:
the norms of k_proj's rows with the input RMSNorm's gain folded in); ``mu`` also subtracts each
channel's calibration mean (a constant q . mu per query: softmax-invariant, so exact).

    PYTHONPATH=src NTOK=2048 python docs/results/raw/kv_int4_study.py [variant ...]
"""

import math
from functools import lru_cache
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


NF4 = torch.tensor([-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0, 0.0796, 0.1609, 0.2461,
                    0.3379, 0.4407, 0.5626, 0.7230, 1.0])
"""QLoRA's NormalFloat levels (quantiles of a normal distribution, extremes at +-1): rotated keys are
close to Gaussian, so non-uniform levels spend the 16 codes where the values are."""


def per_token_nf(x, group, rot, sym=True):
    """Non-uniform 4-bit levels per group of ``group`` channels: ``sym`` NF4 levels times the
    group's max |x| (one fp16 scale: d / 2 + 2 * d / group bytes), else the levels mapped onto
    [min, max] (fp16 scale + minimum, as the uniform codec)."""
    if rot:
        x = x @ R
    g = x.reshape(*x.shape[:-1], d // group, group)
    if sym:
        s = g.abs().amax(-1, keepdim=True).clamp(min=1e-8).half().float()
        lev, lo = NF4, 0.0
    else:
        lo = g.amin(-1, keepdim=True).half().float()
        s = ((g.amax(-1, keepdim=True) - lo) / 2).clamp(min=1e-8).half().float()
        lev = NF4 + 1.0  # [0, 2]: the levels from the minimum in units of s
    u = (g - lo) / s
    c = (u[..., None] - lev).abs().argmin(-1)
    y = (lev[c] * s + lo).reshape(x.shape)
    return y @ R.T if rot else y


def per_token_clip(x, group, rot, ratios=(1.0, 0.9, 0.8, 0.7)):
    """per_token with the range shrunk around its centre by the ratio of least squared error per group."""
    if rot:
        x = x @ R
    g = x.reshape(*x.shape[:-1], d // group, group)
    lo0, hi0 = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    best, err = None, None
    for r in ratios:
        c, h = (hi0 + lo0) / 2, (hi0 - lo0) / 2 * r
        lo, hi = c - h, c + h
        s = ((hi - lo) / 15).clamp(min=1e-8).half().float()
        lo = lo.half().float()
        y = ((g - lo) / s).round().clamp(0, 15) * s + lo
        e = (y - g).pow(2).sum(-1, keepdim=True)
        best = y if best is None else torch.where(e < err, y, best)
        err = e if err is None else torch.minimum(e, err)
    y = best.reshape(x.shape)
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


def pair_rms(ms):
    """(.., d) mean squares -> per-channel scales shared by RoPE pairs (i, i + d/2)."""
    h = d // 2
    p = ((ms[..., :h] + ms[..., h:]) / 2).sqrt()
    return torch.cat([p, p], -1).clamp(min=1e-6)


@lru_cache(maxsize=None)
def scales_from_weights():
    out = []
    for L in m.model.layers:
        w = L.self_attn.k_proj.weight.float() * L.input_layernorm.weight.float()[None, :]
        out.append(pair_rms(w.pow(2).sum(-1).view(-1, d)))  # (Hkv, d)
    return out


class Record:
    def __init__(self):
        self.sq, self.sm, self.qq, self.n = {}, {}, {}, 0

    def attend(self, layer, q, k, v, q_rows=None):
        kk = k[0].double()[:, int(os.environ.get("SKIP", 0)):]  # (H, T, d)
        if os.environ.get("MUSTAT") == "median":
            self.med = getattr(self, "med", {})
            self.med[layer] = kk.median(1).values
        self.sq[layer] = self.sq.get(layer, 0) + kk.pow(2).sum(1)
        self.sm[layer] = self.sm.get(layer, 0) + kk.sum(1)
        qq = q[0].double().pow(2).sum(1)  # (Hq, d)
        self.qq[layer] = self.qq.get(layer, 0) + qq.view(k.shape[1], -1, d).sum(1)  # per KV head
        if layer == 0:
            self.n += kk.shape[1]
        T = k.shape[2]
        mask = torch.ones(T, T, dtype=torch.bool).tril()[None, None]
        return attention(q, k, v, mask, m.attn_scale)


_cal = None


def calibration():
    """Per layer: (scales (Hkv, d), means (Hkv, d)) from CAL tokens of the essays corpus."""
    global _cal
    if _cal is None:
        n = int(os.environ.get("CAL", 512))
        if os.environ.get("CALTEXT") == "builtin":  # what the engine calibrates on (codec/offsets.py)
            from slimlm.kvcache.codec.offsets import CALIBRATION_TEXT

            cids = lm.tokenizer.encode(CALIBRATION_TEXT, add_special_tokens=False)
        elif os.environ.get("CALTEXT", "essays") == "random":  # data-free: seeded random token ids
            cids = torch.randint(0, m.cfg.vocab_size, (n,), generator=torch.Generator().manual_seed(0)).tolist()
        else:
            cids, _, _ = corpus_ids(os.environ.get("CALTEXT", "essays"), lm.tokenizer, n)
        rec = Record()
        with torch.no_grad():
            m(torch.tensor([cids]), torch.arange(len(cids))[None], rec)
        _cal = [(pair_rms((rec.sq[i] / rec.n).float()), (rec.sm[i] / rec.n).float(),
                 pair_rms((rec.qq[i] / rec.n).float())) for i in range(len(m.model.layers))]
        if os.environ.get("MUSTAT") == "median":
            _cal = [(a, rec.med[i].float(), c) for i, (a, b, c) in enumerate(_cal)]
    return _cal


def smooth(group, rot, source, mu=False, alpha=1.0, clip=False, quant=None):
    """Keys (1, H, T, d) of layer ``layer``: ((k - mu) / s) per token quantized, then * s + mu."""
    def f(x, layer):
        if source == "w":
            s, mean = scales_from_weights()[layer], None
        else:
            s, mean, qs = calibration()[layer]
            if source == "calq":  # SmoothQuant's balance: s = (|k| / |q|) ** alpha
                s = s / qs
            if source == "calstd":  # the spread around the mean (pairs share it)
                s = pair_rms((s.pow(2) - mean.pow(2)).clamp(min=1e-12))
        s = s ** alpha
        s = s[None, :, None, :]
        mean = mean[None, :, None, :] if mu else 0.0
        return (quant or (per_token_clip if clip else per_token))((x - mean) / s, group, rot) * s + mean
    f.layered = True
    return f


class FakeQuant:
    def __init__(self, fk, fv):
        self.fk, self.fv = fk, fv

    def attend(self, layer, q, k, v, q_rows=None):
        T = k.shape[2]
        mask = torch.ones(T, T, dtype=torch.bool).tril()[None, None]
        kq = self.fk(k, layer) if getattr(self.fk, "layered", False) else self.fk(k)
        vq = self.fv(v)
        if not getattr(self.fk, "open_block", False):
            return attention(q, kq, vq, mask, m.attn_scale)
        # KIVI with the open block in full precision: query i reads the keys of its own block
        # (tokens 16 * (i // 16) .. i) unquantized, every earlier block quantized
        rep = q.shape[1] // k.shape[1]
        kf, kq = k.repeat_interleave(rep, 1), kq.repeat_interleave(rep, 1)
        blk = torch.arange(T) // 16
        same = (blk[:, None] == blk[None, :])[None, None]
        sc = torch.where(same, q @ kf.transpose(-1, -2), q @ kq.transpose(-1, -2)) * m.attn_scale
        p = sc.masked_fill(~mask, float("-inf")).softmax(-1)
        return p @ vq.repeat_interleave(rep, 1)


def ppl(fk, fv):
    nll = []
    with torch.no_grad():
        for b, e, first in wins:
            logits = m(torch.tensor([ids[b:e]]), torch.arange(e - b)[None], FakeQuant(fk, fv))[0].log_softmax(-1)
            nll += [-float(logits[t - b - 1, ids[t]]) for t in range(first, e)]
    return math.exp(sum(nll) / len(nll))


def I(x):
    return x


def kivi_open(x):
    return per_channel(x, 16)


kivi_open.open_block = True


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
    "kv-g32-krot": (lambda x: per_token(x, 32, True), lambda x: per_token(x, 32, False)),  # the shipped codec
    "k-g16-rot-v-g32": (lambda x: per_token(x, 16, True), lambda x: per_token(x, 32, False)),
    "k-kivi16-open-v-g32": (kivi_open, lambda x: per_token(x, 32, False)),
    "k-sm-w-v-g32": (smooth(32, False, "w"), lambda x: per_token(x, 32, False)),
    "k-sm-w-rot-v-g32": (smooth(32, True, "w"), lambda x: per_token(x, 32, False)),
    "k-sm-cal-v-g32": (smooth(32, False, "cal"), lambda x: per_token(x, 32, False)),
    "k-sm-cal-rot-v-g32": (smooth(32, True, "cal"), lambda x: per_token(x, 32, False)),
    "k-sm-calmu-v-g32": (smooth(32, False, "cal", True), lambda x: per_token(x, 32, False)),
    "k-sm-calmu-rot-v-g32": (smooth(32, True, "cal", True), lambda x: per_token(x, 32, False)),
    "k-mu-v-g32": (smooth(32, False, "cal", True, alpha=0.0), lambda x: per_token(x, 32, False)),
    "k-mu-rot-v-g32": (smooth(32, True, "cal", True, alpha=0.0), lambda x: per_token(x, 32, False)),
    "k-mu-g16-rot-v-g32": (smooth(16, True, "cal", True, alpha=0.0), lambda x: per_token(x, 32, False)),
    "k-mu-nf32-rot-v-g32": (smooth(32, True, "cal", True, alpha=0.0, quant=per_token_nf), lambda x: per_token(x, 32, False)),
    "k-mu-nf16-rot-v-g32": (smooth(16, True, "cal", True, alpha=0.0, quant=per_token_nf), lambda x: per_token(x, 32, False)),
    "k-mu-nfa32-rot-v-g32": (smooth(32, True, "cal", True, alpha=0.0,
                                    quant=lambda x, g, r: per_token_nf(x, g, r, sym=False)), lambda x: per_token(x, 32, False)),
    "k-mu-g16-rot-v-g16": (smooth(16, True, "cal", True, alpha=0.0), lambda x: per_token(x, 16, False)),
    "k-mu-rot-clip-v-g32": (smooth(32, True, "cal", True, alpha=0.0, clip=True), lambda x: per_token(x, 32, False)),
    "k-mu-rot-clip-v-clip": (smooth(32, True, "cal", True, alpha=0.0, clip=True), lambda x: per_token_clip(x, 32, False)),
    "k-rot-clip-v-g32": (lambda x: per_token_clip(x, 32, True), lambda x: per_token(x, 32, False)),
    "k-mustd05-rot-v-g32": (smooth(32, True, "calstd", True, alpha=0.5), lambda x: per_token(x, 32, False)),
    "k-mustd1-rot-v-g32": (smooth(32, True, "calstd", True, alpha=1.0), lambda x: per_token(x, 32, False)),
    "k-sm-cal05-v-g32": (smooth(32, False, "cal", alpha=0.5), lambda x: per_token(x, 32, False)),
    "k-sm-cal05-rot-v-g32": (smooth(32, True, "cal", alpha=0.5), lambda x: per_token(x, 32, False)),
    "k-sm-calq05-v-g32": (smooth(32, False, "calq", alpha=0.5), lambda x: per_token(x, 32, False)),
    "k-sm-calq05-rot-v-g32": (smooth(32, True, "calq", alpha=0.5), lambda x: per_token(x, 32, False)),
    "k-sm-calqmu05-rot-v-g32": (smooth(32, True, "calq", True, alpha=0.5), lambda x: per_token(x, 32, False)),
}

if __name__ == "__main__":
    base = None
    for name in sys.argv[1:] or list(VARIANTS):
        t = time.time()
        p = ppl(*VARIANTS[name])
        base = base if base is not None else p
        print(f"{name:16s} {p:.3f}  ({(p / base - 1) * 100:+.1f} % vs the first variant)  {time.time() - t:.0f}s",
              flush=True)
