"""CacheBlend on SmolLM2-135M, per RAG query (the first N of `slimlm eval rag`'s queries, seed 0):
the log-probability of the right access code (teacher-forced, and whether greedy decoding gets it)
after a full prefill and after blending at ratios 0 / 0.15 / 0.5 with chunk KV computed alone
("none") or after the prompt's prefix ("prefix"), and the relative squared deviation of the
blended keys from the full prefill's at layers 1, 5, 15, 29. Usage (from the repo root):
PYTHONPATH=src python docs/results/raw/cacheblend_kv_deviation.py 8"""
import torch, random, sys
torch.set_num_threads(1)
from slimlm import LLM
from slimlm.engine.segments import build_segments
from slimlm.engine.cacheblend import CacheBlend, _Capture
from slimlm.kvcache.chunk_store import ChunkStore
from slimlm.eval.rag import INTRO, FACT, QUESTION, NAMES
from slimlm.eval.needle import filler_ids
llm = LLM("smollm2-135m-instruct")
m = llm.engine.model; tok = llm.engine.tokenizer; rot = llm.engine.runner.rotary
text = tok.decode(filler_ids("essays", tok)); words = text.split()
rng = random.Random(0)
passages, facts = [], []
for i in range(8):
    name, code = NAMES[i], str(rng.randint(10000, 99999))
    start = rng.randrange(len(words) - 400)
    ids = tok.encode(" ".join(words[start:start+400]), add_special_tokens=False)[:150]
    half = tok.decode(ids[:len(ids)//2]), tok.decode(ids[len(ids)//2:])
    passages.append(half[0] + FACT.format(name=name, code=code) + half[1] + "\n\n"); facts.append((name, code))
enc = lambda t: tok.encode(t, add_special_tokens=False)
for q in range(int(sys.argv[1])):
    picked = rng.sample(range(8), 4); target = rng.choice(picked); name, code = facts[target]
    ids, lay = build_segments([INTRO] + [{"chunk": passages[i]} for i in picked] + [QUESTION.format(name=name)], enc)
    spans = list(lay.chunks); T = len(ids)
    ans = enc(" " + code)
    with torch.inference_mode():
        full = _Capture(T, m.attn_scale, m.device)
        x = torch.tensor([ids]); h = m.embed(x); cos, sin = rot(torch.arange(T)[None], h.dtype)
        for layer in m.model.layers: h = layer(h, cos, sin, full)
        res = [f"q{q} target={picked.index(target)}"]
        def score(kvs):
            tail = [ids[-1]] + ans[:-1]; n = len(tail)
            from slimlm.model.attention import attention
            P0 = kvs[0][0].shape[2]
            mask = torch.cat([torch.ones(n, P0, dtype=torch.bool), torch.ones(n, n, dtype=torch.bool).tril()], 1)[None, None]
            class A:
                def attend(s, layer, q_, k, v, q_rows=None):
                    K = torch.cat([kvs[layer][0], k], 2); V = torch.cat([kvs[layer][1], v], 2)
                    return attention(q_, K, V, mask, m.attn_scale)
            h = m.embed(torch.tensor([tail])); cos, sin = rot(torch.arange(T-1, T-1+n)[None], h.dtype)
            for layer in m.model.layers: h = layer(h, cos, sin, A())
            lp = m.head(h)[0].log_softmax(-1)
            tot = float(sum(lp[i, ans[i]] for i in range(n)))
            ok = all(int(lp[i].argmax()) == ans[i] for i in range(n))
            return tot, ok
        fkv = [(full.kv[l][0][:, :, :T-1], full.kv[l][1][:, :, :T-1]) for l in range(len(full.kv))]
        t, ok = score(fkv); res[0] += f" full lp(code)={t:.2f} greedy_ok={ok}"
        for ctx in ("none", "prefix"):
            for r in (0.0, 0.15, 0.5):
                cb = CacheBlend(m, rot, ChunkStore(1 << 30), r, 1, ctx)
                kv = cb.prefill(ids[:-1], spans)
                # last token over blended kv
                t, ok = score(kv)
                dev = [float(((kv[l][0] - full.kv[l][0][:, :, :T-1])**2).sum() / (full.kv[l][0]**2).sum()) for l in (1, 5, 15, 29)]
                res.append(f"  {ctx} r={r}: lp(code)={t:.2f} ok={ok} relKdev L1,5,15,29={['%.3f'%d for d in dev]}")
        print("\n".join(res), flush=True)
