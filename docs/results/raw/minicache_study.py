"""Why MiniCache loses the passkeys on SmolLM2-135M (issue 16), and where it could work: a dense study.

Everything here is dense PyTorch on one sequence (no paging), fp32 model, so it isolates the
maths from the engine. Parts (pick with the first argument):

``similarity``  per adjacent pair of layers (l, l + 1), the angular distance Omega / pi of the two
                layers' keys and values per token and KV head (post-RoPE keys, as the cache stores
                them): mean, 10 / 50 / 90 % quantiles; on the 2k passkey prompts and on the
                engine's calibration paragraph (``kvcache/codec/offsets.py``). MiniCache's premise
                is that deep adjacent layers are close (small Omega).
``errors``      per pair merged alone (SLERP t = 0.5, no retention, exact prefill), the relative
                error ||o' - o|| / ||o|| of each layer's attention output (before o_proj) for the
                prompt's last 256 queries; keys only, values only, both. Also for the pair (l, l + 2).
``passkey``     the 9 passkey prompts of ``slimlm eval needle --lengths 2048 --trials 3`` (seed 0),
                greedy, under named configurations (below), two semantics:
                ``paper``  the prompt but its last token is prefilled exactly, the cache is then
                           merged, and the last prompt token and the answer are decoded from the
                           merged cache (kvpress's protocol; the paper's "merge after prefill");
                           decoded tokens are merged as they come.
                ``engine`` what the paged cache did before this study (commit aca990f): the
                           second layer of a pair merges its rows as it writes them and then
                           attends the merged rows, so the prompt's own prefill already reads
                           merged KV at every merged layer and each merged layer's error reaches
                           the hidden states of every prompt token, hence the keys of all deeper
                           layers. (The cache now lets a chunk read its own rows unmerged, which
                           for a prompt in one chunk is the ``paper`` semantics.)
``calibrate``   the pair ranking a calibration pass gives (``minicache.calibrate_pairs``: local
                attention-output error on the engine's calibration paragraph) and the
                ``--kv-policy-arg pairs=...`` for the best 1..N.

Outputs of the runs quoted in docs/techniques.md: ``minicache_study-similarity-errors.txt``,
``minicache_study-passkey.txt``, ``minicache_study-calibrate.txt`` next to this file.

    PYTHONPATH=src python docs/results/raw/minicache_study.py similarity
    PYTHONPATH=src python docs/results/raw/minicache_study.py errors
    PYTHONPATH=src python docs/results/raw/minicache_study.py calibrate [N]
    PYTHONPATH=src python docs/results/raw/minicache_study.py passkey CONFIG [CONFIG ...]
    (the run in minicache_study-passkey.txt:  passkey full: mid:from=15 mid-fcfs:from=15,fcfs=0.05/2
     mid-keep50:from=15,keep=0.5 mid-k:from=15,kv=k mid-v:from=15,kv=v late0.8:from=24 late0.9:from=27
     last:pairs=28-29 p26:pairs=26-27 cal1:pairs=0-1 cal2:pairs=0-1+11-12 cal3:pairs=0-1+11-12+26-27
     cal4:pairs=0-1+11-12+15-16+26-27 ; stopped by a 600 s limit during the 9th prompt on a loaded machine)

A CONFIG is ``name:key=value,...`` with keys ``pairs`` (``a-b+c-d``, or ``from=L`` for MiniCache's
adjacent pairs from layer L on), ``kv`` (``kv`` | ``k`` | ``v``: what is merged), ``keep``
(fraction of each pair's tokens kept unmerged, the most distant first, paper-style), ``mode``
(``paper`` | ``engine``), ``fcfs`` (``threshold/rows``: the shipped per-block first-come rule,
blocks of 16). Deterministic; 1 thread.
"""

from __future__ import annotations

import math
import random
import sys
import time

import torch

from slimlm.eval.needle import answer_correct, build_prompt, filler_ids
from slimlm.kvcache.codec.offsets import calibration_ids
from slimlm.kvcache.merge import slerp
from slimlm.model.attention import attention
from slimlm.model.hub import load

torch.set_num_threads(1)
lm = load("smollm2-135m-instruct")
m = lm.model.float().eval()
tok = lm.tokenizer
L = m.cfg.num_layers


def needle_prompts(length=2048, depths=(0.1, 0.5, 0.9), trials=3, seed=0):
    """The prompts and keys of ``slimlm eval needle`` (same seeds, same order)."""
    filler = filler_ids("essays", tok)
    out = []
    for di, depth in enumerate(depths):
        for t in range(trials):
            rng = random.Random(f"{seed}-{length}-{di}-{t}")
            key = str(rng.randint(10000, 99999))
            ids, _ = build_prompt(tok, filler, length, depth, key, rng.randrange(1 << 30))
            out.append((ids, key, depth))
    return out


class Dense:
    """Dense causal attention over a per-layer cache (1, Hkv, S, d) that grows with each call.
    ``second`` maps the second layer of a merged pair to its first (engine semantics: merged at
    write); ``keep_q`` keeps the last queries of each layer (for the error study)."""

    def __init__(self, second=None, merger=None, keep_q=0):
        self.K, self.V, self.Q = {}, {}, {}
        self.second, self.merger, self.keep_q = second or {}, merger, keep_q

    def attend(self, layer, q, k, v, q_rows=None):
        assert q_rows is None
        T = k.shape[2]
        if layer in self.second:  # engine semantics: merge this chunk now, then attend the merged rows
            a = self.second[layer]
            ka, va, k, v = self.merger(a, self.K[a][:, :, -T:], self.V[a][:, :, -T:], k, v,
                                       self.K[a].shape[2] - T)
            self.K[a][:, :, -T:], self.V[a][:, :, -T:] = ka, va
        K = k if layer not in self.K else torch.cat([self.K[layer], k], 2)
        V = v if layer not in self.V else torch.cat([self.V[layer], v], 2)
        self.K[layer], self.V[layer] = K, V
        if self.keep_q:
            self.Q[layer] = q[:, :, -self.keep_q:]
        S = K.shape[2]
        mask = torch.ones(T, S, dtype=torch.bool)
        mask[:, S - T:] = torch.ones(T, T, dtype=torch.bool).tril()
        return attention(q, K, V, mask[None, None], m.attn_scale)


@torch.no_grad()
def forward(ids, start, backend):
    pos = torch.arange(start, start + len(ids))[None]
    return m(torch.tensor([ids]), pos, backend, logits_index=torch.tensor([[len(ids) - 1]]))[0, -1]


def dist_per_token(k0, k1):
    """(1, H, S, d) pairs -> Omega / pi (S, H)."""
    return slerp(k0[0].transpose(0, 1), k1[0].transpose(0, 1), 0.5)[3]


# ---------------------------------------------------------------------------------------------- similarity
def similarity():
    prompts = needle_prompts()[:3]
    sets = {"passkey-2k": [p for p, _, _ in prompts], "calibration": [calibration_ids(tok, m.cfg.vocab_size)]}
    for name, texts in sets.items():
        ks = {l: [] for l in range(L - 1)}
        vs = {l: [] for l in range(L - 1)}
        for ids in texts:
            b = Dense()
            forward(ids, 0, b)
            for l in range(L - 1):
                ks[l].append(dist_per_token(b.K[l], b.K[l + 1]).flatten())
                vs[l].append(dist_per_token(b.V[l], b.V[l + 1]).flatten())
        print(f"\n{name}: angular distance Omega/pi of adjacent layers (per token and KV head; 0 = same "
              f"direction, 0.5 = orthogonal)")
        print(f"{'pair':>7} | {'K mean':>6} {'p10':>5} {'p50':>5} {'p90':>5} | {'V mean':>6} {'p10':>5} {'p50':>5} {'p90':>5}")
        for l in range(L - 1):
            k, v = torch.cat(ks[l]), torch.cat(vs[l])
            qk, qv = (torch.quantile(x, torch.tensor([0.1, 0.5, 0.9])) for x in (k, v))
            print(f"{l:>3}-{l + 1:<3} | {k.mean():6.3f} {qk[0]:5.3f} {qk[1]:5.3f} {qk[2]:5.3f} | "
                  f"{v.mean():6.3f} {qv[0]:5.3f} {qv[1]:5.3f} {qv[2]:5.3f}")


# ---------------------------------------------------------------------------------------------- errors
def merged_pair(k0, v0, k1, v1, what="kv", t=0.5):
    """(1, H, S, d) x 4 -> what each layer reads after merging (no retention)."""
    out = [k0, v0, k1, v1]
    for j, (x0, x1) in enumerate(((k0, k1), (v0, v1))):
        if "kv"[j] not in what:
            continue
        e, n0, n1, _ = slerp(x0[0].transpose(0, 1), x1[0].transpose(0, 1), t)  # (S, H, d), (S, H)
        out[j] = (e * n0[..., None]).transpose(0, 1)[None]
        out[j + 2] = (e * n1[..., None]).transpose(0, 1)[None]
    return out


def attn_err(b, layer, K, V):
    q = b.Q[layer]
    S, T = K.shape[2], q.shape[2]
    mask = torch.ones(T, S, dtype=torch.bool)
    mask[:, S - T:] = torch.ones(T, T, dtype=torch.bool).tril()
    ref = attention(q, b.K[layer], b.V[layer], mask[None, None], m.attn_scale)
    got = attention(q, K, V, mask[None, None], m.attn_scale)
    return float((got - ref).norm() / ref.norm())


def errors():
    ids = needle_prompts()[0][0]
    b = Dense(keep_q=256)
    forward(ids, 0, b)
    print("relative attention-output error of each layer of a merged pair (last 256 queries of a 2k passkey "
          "prompt, no retention)")
    print(f"{'pair':>7} | {'kv: l0':>7} {'l1':>6} | {'k: l0':>7} {'l1':>6} | {'v: l0':>7} {'l1':>6}")
    for gap in (1, 2):
        for l in range(L - gap):
            a, c = l, l + gap
            row = []
            for what in ("kv", "k", "v"):
                k0, v0, k1, v1 = merged_pair(b.K[a], b.V[a], b.K[c], b.V[c], what)
                row += [attn_err(b, a, k0, v0), attn_err(b, c, k1, v1)]
            print(f"{a:>3}-{c:<3} | {row[0]:7.3f} {row[1]:6.3f} | {row[2]:7.3f} {row[3]:6.3f} | {row[4]:7.3f} {row[5]:6.3f}")
        print()


# ---------------------------------------------------------------------------------------------- passkey
def parse_config(spec):
    name, _, body = spec.partition(":")
    c = {"name": name, "pairs": [], "kv": "kv", "keep": 0.0, "mode": "paper", "fcfs": None}
    for item in filter(None, body.split(",")):
        k, _, v = item.partition("=")
        if k == "pairs":
            c["pairs"] = [tuple(int(x) for x in p.split("-")) for p in v.split("+")]
        elif k == "from":
            c["pairs"] = [(i, i + 1) for i in range(int(v), L - 1, 2)]
        elif k == "keep":
            c["keep"] = float(v)
        elif k == "fcfs":
            th, rows = v.split("/")
            c["fcfs"] = (float(th), int(rows))
        else:
            c[k] = v
    return c


def make_merger(c):
    """Merge the rows of a pair: (layer a, K0, V0, K1, V1 (1, H, T, d), first position) -> the four
    tensors each layer reads. Retention: the ``keep`` share of tokens of largest distance per
    call (paper), or the shipped first-come rule per block of 16 (``fcfs``)."""
    used: dict[tuple[int, int], int] = {}

    def merge(a, k0, v0, k1, v1, pos0):
        out = merged_pair(k0, v0, k1, v1, c["kv"])
        dk = dist_per_token(k0, k1).amax(-1)
        dv = dist_per_token(v0, v1).amax(-1)
        dist = torch.maximum(dk if "k" in c["kv"] else dk * 0, dv if "v" in c["kv"] else dv * 0)
        T = dist.numel()
        keep = torch.zeros(T, dtype=torch.bool)
        if c["fcfs"] is not None:
            th, rows = c["fcfs"]
            for j in range(T):
                blk = (pos0 + j) // 16
                if float(dist[j]) > th and used.get((a, blk), 0) < rows:
                    used[(a, blk)] = used.get((a, blk), 0) + 1
                    keep[j] = True
        elif c["keep"] > 0:
            n = math.ceil(c["keep"] * T)
            keep[dist.topk(n).indices] = True
        raw = [k0, v0, k1, v1]
        return [torch.where(keep[None, None, :, None], r, o) for r, o in zip(raw, out)]

    return merge


def decode(b, c, merger, first, n, new=8):
    """Greedy tokens from ``first`` at position ``n`` on cache ``b`` (paper semantics: each new
    token's rows merged once it has been computed, as the cache would store them)."""
    out, nxt = [], first
    while len(out) < new:
        logits = forward([nxt], n, b)
        if c["mode"] != "engine":
            for a, s in c["pairs"]:
                got = merger(a, b.K[a][:, :, -1:], b.V[a][:, :, -1:], b.K[s][:, :, -1:], b.V[s][:, :, -1:], n)
                b.K[a][:, :, -1:], b.V[a][:, :, -1:], b.K[s][:, :, -1:], b.V[s][:, :, -1:] = got
        n += 1
        nxt = int(logits.argmax())
        out.append(nxt)
    return out


def passkey(specs, new=8):
    """Paper-semantics configurations share one exact prefill per prompt; engine-semantics ones
    prefill the whole prompt each."""
    prompts = needle_prompts()
    configs = [parse_config(s) for s in specs]
    right = {c["name"]: 0 for c in configs}
    t0 = time.time()
    for ids, key, depth in prompts:
        base = None
        for c in configs:
            merger = make_merger(c)
            if c["mode"] == "engine":
                b = Dense({p[1]: p[0] for p in c["pairs"]}, merger)
                first = int(forward(ids, 0, b).argmax())
                out = [first] + decode(b, c, merger, first, len(ids), new - 1)
            else:
                if base is None:
                    base = Dense()
                    forward(ids[:-1], 0, base)
                b = Dense()
                b.K, b.V = {l: x.clone() for l, x in base.K.items()}, {l: x.clone() for l, x in base.V.items()}
                for a, s in c["pairs"]:
                    b.K[a], b.V[a], b.K[s], b.V[s] = merger(a, b.K[a], b.V[a], b.K[s], b.V[s], 0)
                out = decode(b, c, merger, ids[-1], len(ids) - 1, new)
            ans = tok.decode(out)
            ok = answer_correct(ans, key)
            right[c["name"]] += ok
            print(f"  {c['name']}: depth {depth} key {key} -> {ans!r} {'ok' if ok else 'x'} [{time.time() - t0:.0f} s]",
                  flush=True)
    for c in configs:
        print(f"{c['name']}: {right[c['name']]} of {len(prompts)} ({c['mode']}, pairs {c['pairs']}, merged {c['kv']}, "
              f"keep {c['keep']}, fcfs {c['fcfs']})", flush=True)


def calibrate():
    from slimlm.kvcache.policy.minicache import calibrate_pairs

    chosen = calibrate_pairs(m, tok, int(sys.argv[2]) if len(sys.argv) > 2 else 8)
    for a, b, e in chosen:
        print(f"{a}-{b}: attention-output error {e:.3f} (calibration paragraph)")
    for n in range(1, len(chosen) + 1):
        print(f"{n} pairs: --kv-policy-arg pairs=" + ",".join(f"{a}-{b}" for a, b, _ in sorted(chosen[:n])))


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "similarity"
    {"similarity": similarity, "errors": errors, "calibrate": calibrate,
     "passkey": lambda: passkey(sys.argv[2:])}[what]()
