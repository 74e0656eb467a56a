"""Does a LazyLLM selection rule keep the passkey? A diagnostic, not an eval: for the needle task's
prompts (same seeds as `slimlm eval needle --trials 3`), full-prefill hidden states entering each
candidate layer, each variant's scores (window x heads x pool x sinks, the hook's own scorer), and
for keep ratios 0.5 / 0.3 / 0.2 / 0.1 whether one copy of the passkey's digits is among the kept
tokens. Counts per (variant, layer, ratio) over the prompts; bf16, 1 thread.
Usage: python lazyllm_signal.py [SEED] [FILLER] [LENGTHS]   e.g. python lazyllm_signal.py 0 essays 4096"""
import itertools, json, random, sys, time
import torch
import torch.nn.functional as F
from slimlm.model.hub import load
from slimlm.model.rope import apply_rope
from slimlm.eval.needle import filler_ids, build_prompt, INTRO, NEEDLE
from slimlm.engine.hooks.lazyllm import LazyLLM

torch.set_num_threads(1)
seed = int(sys.argv[1]) if len(sys.argv) > 1 else 0
filler_spec = sys.argv[2] if len(sys.argv) > 2 else "essays"
lengths = [int(x) for x in (sys.argv[3] if len(sys.argv) > 3 else "2048,4096").split(",")]
lm = load("smollm2-135m-instruct")
m = lm.model.to(torch.bfloat16).eval()
cfg = m.cfg
tok = lm.tokenizer
filler = filler_ids(filler_spec, tok)
CAND = [3, 5, 6, 8, 10, 12, 15]
RATIOS = [0.5, 0.3, 0.2, 0.1]
VARIANTS = [dict(window=w, heads=hd, pool=pl, sinks=sk) for w, hd, pl, sk in
            itertools.product([1, 8, 16, 32], ["mean", "max"], [1, 7], [0, 4])]
res = {}
intro = tok.encode(INTRO, add_special_tokens=False)
t0 = time.time()


def probs(L, h, P, W=32):
    blk = m.model.layers[L]
    att, d = blk.self_attn, cfg.head_dim
    pos = torch.arange(P)
    x = blk.input_layernorm(h[0])
    cos, sin = m.rotary(pos[None], h.dtype)
    k = apply_rope(att.k_proj(x).view(1, -1, cfg.num_kv_heads, d).transpose(1, 2), cos, sin)
    q = apply_rope(att.q_proj(x[-W:]).view(1, -1, cfg.num_heads, d).transpose(1, 2), cos[:, -W:], sin[:, -W:])
    k = k.repeat_interleave(cfg.num_heads // cfg.num_kv_heads, 1)
    s = (q @ k.transpose(-1, -2)).float() * m.attn_scale
    s = s.masked_fill(pos[None, :] > pos[-W:][:, None], float("-inf"))
    return s.softmax(-1)[0]  # (Hq, W, P)


for length in lengths:
    for di, depth in enumerate([0.1, 0.5, 0.9]):
        for t in range(3):
            rng = random.Random(f"{seed}-{length}-{di}-{t}")
            key = str(rng.randint(10000, 99999))
            ids, at = build_prompt(tok, filler, length, depth, key, rng.randrange(1 << 30))
            nd = tok.encode(NEEDLE.format(key=key), add_special_tokens=False)
            s0 = len(intro) + at
            digits = [s0 + i for i, x in enumerate(nd) if tok.decode([x]).strip().isdigit()]
            occ = [digits[: len(digits) // 2], digits[len(digits) // 2 :]]
            assert ids[s0 : s0 + len(nd)] == nd
            hs = {}
            P = len(ids)
            with torch.no_grad():
                pp = torch.arange(P)[None]
                h = m.embed(torch.tensor([ids]))
                cos, sin = m.rotary(pp, h.dtype)
                attn = m.dense_attention(pp)
                for i in range(max(CAND) + 1):
                    if i in CAND:
                        hs[i] = h.clone()
                    h = m.model.layers[i](h, cos, sin, attn)
            pos = torch.arange(P)
            with torch.no_grad():
                for L in CAND:
                    pr = probs(L, hs[L], P)
                    for vi, v in enumerate(VARIANTS):
                        p = pr[:, -v["window"]:].mean(1)
                        sc = p.mean(0) if v["heads"] == "mean" else p.amax(0)
                        if v["pool"] > 1:
                            sc = F.max_pool1d(sc[None, None], v["pool"], 1, v["pool"] // 2)[0, 0]
                        if vi == 14 and L == 8:  # the hook's own scorer agrees (window 8, max, pool 7)
                            hook = LazyLLM(**v); hook.bind(m)
                            ref = hook._importance(L, hs[L], pos, pos, P)
                            assert torch.allclose(ref, sc, atol=1e-5), (ref - sc).abs().max()
                        forced = (pos >= P - v["window"]) | (pos < v["sinks"])
                        sc = sc.clone(); sc[forced] = float("inf")
                        order = sc.argsort(stable=True)
                        for r in RATIOS:
                            n = P - max(1, int(P * r))
                            dropped = set(order[:n].tolist())
                            ok = any(all(q not in dropped for q in o) for o in occ)
                            res.setdefault((vi, L, r), []).append(ok)
            print(f"{length} {depth} {t} done {time.time() - t0:.0f}s", flush=True)
rows = [(VARIANTS[vi], L, r, sum(oks), len(oks)) for (vi, L, r), oks in res.items()]
for L in CAND:
    for r in RATIOS:
        best = sorted([x for x in rows if x[1] == L and x[2] == r], key=lambda x: -x[3])
        names = [f"w{v['window']}{v['heads'][:2]}p{v['pool']}s{v['sinks']}:{k}" for v, _, _, k, _ in best]
        print(L, r, " | ".join(names))
