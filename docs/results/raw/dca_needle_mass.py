"""Where the passkey question's attention goes under Dual Chunk Attention, and what the model answers.

Builds the needle eval's prompt (same seeding as ``slimlm eval needle --depths D --seed S``: the
prompt of depth index ``--di`` of ``--depths``), runs it greedily through the engine with DCA (the
native key ranges), and for the prompt's last token (the one that predicts the passkey) records per
layer the share of the softmax mass (mean over query heads, and the needle's max over heads) on:
the first 4 tokens (sink), the older chunks ("inter", sink excluded), the previous chunk ("succ"),
the question's own chunk ("intra", needle excluded) and the needle's tokens (wherever they sit).
Masses come from the native range kernel's log-sum-exps (the same scores the prefill uses).

Usage: PYTHONPATH=src python docs/results/raw/dca_needle_mass.py --seed 300 --di 2
       [--length 16384] [--depths 0.1,0.5,0.9] [--arg chunk_size=4096 --arg logit_scale=1.14] [--layers]
"""
import argparse, json, random, sys, time

import torch

from slimlm.eval import needle as N
from slimlm.eval.cli import scoring_lm
from slimlm.model import rope_extension as R

ap = argparse.ArgumentParser()
ap.add_argument("--seed", type=int, required=True)
ap.add_argument("--di", type=int, required=True)
ap.add_argument("--length", type=int, default=16384)
ap.add_argument("--depths", default="0.1,0.5,0.9")
ap.add_argument("--arg", action="append", default=[])
ap.add_argument("--ext", default="dca")
ap.add_argument("--layers", action="store_true", help="print every layer's shares")
a = ap.parse_args()
torch.set_num_threads(1)
args = {"context": 40000}
for kv in a.arg:
    k, v = kv.split("=")
    args[k] = v if v in ("auto", "yarn") else float(v) if "." in v else int(v)
lm = scoring_lm("smollm2-135m-instruct", "slimlm", "auto", 1, {"rope_extension": a.ext, "rope_extension_args": args})
tok = lm.tokenizer
depths = [float(x) for x in a.depths.split(",")]
rng = random.Random(f"{a.seed}-{a.length}-{a.di}-0")
key = str(rng.randint(10000, 99999))
ids, at = N.build_prompt(tok, N.filler_ids("essays", tok), a.length, depths[a.di], key, rng.randrange(1 << 30))
L = len(ids)
n_lo = len(tok.encode(N.INTRO, add_special_tokens=False)) + at
n_hi = n_lo + len(tok.encode(N.NEEDLE.format(key=key), add_special_tokens=False))
rows = []
orig = R.dca_prefill_native


def spy(lib, q_rows, k_parts, v_parts, code, table, q_start, out, dc, inv_freq, scale):
    orig(lib, q_rows, k_parts, v_parts, code, table, q_start, out, dc, inv_freq, scale)
    T = q_rows.shape[0]
    if q_start + T != L:
        return
    from slimlm.kernels.ops import native_prefill_range
    c, i = dc.chunk_len, L - 1
    Q = i // c
    q = q_rows[-1:]
    intra, succ, inter = R.dca_queries(q.transpose(0, 1)[None], torch.tensor([[i]]), dc, inv_freq)
    rot = {"intra": intra[0].transpose(0, 1).to(q.dtype) if dc.length_base else q, "succ": succ[0].transpose(0, 1).to(q.dtype), "inter": inter[0].transpose(0, 1).to(q.dtype)}
    cuts = sorted({0, 4, max(Q - 1, 0) * c, Q * c, n_lo, n_hi, L})
    lses, labels = [], []
    for lo, hi in zip(cuts, cuts[1:]):
        if hi <= lo:
            continue
        kind = "intra" if lo >= Q * c else "succ" if lo >= (Q - 1) * c else "inter"
        lab = "sink" if hi <= 4 else "needle" if n_lo <= lo and hi <= n_hi else kind
        o = torch.empty(1, q.shape[1], q.shape[2], dtype=torch.float32)
        lse = torch.empty(1, q.shape[1], dtype=torch.float32)
        native_prefill_range(lib, rot[kind], k_parts, v_parts, code, table, i, lo, hi, True, o, lse,
                             scale * dc.logit_scale)
        lses.append(lse[0]); labels.append(lab)
    lse = torch.stack(lses)  # (ranges, heads)
    share = (lse - lse.logsumexp(0)).exp()
    row = {}
    for lab in ("sink", "inter", "succ", "intra", "needle"):
        m = torch.tensor([lb == lab for lb in labels])
        s = share[m].sum(0) if m.any() else torch.zeros(share.shape[1])
        row[lab] = float(s.mean())
        if lab == "needle":
            row["needle_max"] = float(s.max())
    rows.append(row)


R.dca_prefill_native = spy
t = time.process_time()
out = lm.greedy([ids], 8)[0]
ans = tok.decode(out)
res = {"seed": a.seed, "depth": depths[a.di], "key": key, "answer": ans, "correct": N.answer_correct(ans, key),
       "needle": [n_lo, n_hi], "L": L, "args": args, "cpu_s": round(time.process_time() - t, 1)}
# the answer teacher-forced (" " + the digits): each token's log-probability and rank among the top 20, one
# short request per token after the cached prompt (prefix caching: only the last block is recomputed)
from slimlm import SamplingParams

want = tok.encode(" " + key, add_special_tokens=False)
lps, ranks = [], []
for m in range(len(want)):
    o = lm.llm.generate([ids + want[:m]], SamplingParams(temperature=0, max_tokens=1, logprobs=20),
                        use_tqdm=False)[0].outputs[0]
    top = o.logprobs[0]
    order = sorted(top, key=top.get, reverse=True)
    lps.append(round(top[want[m]], 3) if want[m] in top else None)
    ranks.append(order.index(want[m]) + 1 if want[m] in top else ">20")
res["key_logprobs"], res["key_ranks"] = lps, ranks
res["key_logprob_sum"] = round(sum(x for x in lps if x is not None), 3) if None not in lps else None
if rows:
    res["mean_over_layers"] = {k: round(sum(r[k] for r in rows) / len(rows), 4) for k in rows[0]}
    if a.layers:
        res["layers"] = [{k: round(v, 4) for k, v in r.items()} for r in rows]
print(json.dumps(res), flush=True)
