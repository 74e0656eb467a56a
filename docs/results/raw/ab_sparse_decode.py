"""Same-process A/B of decode at a long context: full KV (native paged decode) vs the query KV
policies through the native sparse kernel on the native decode layers (and, with --layers, on the
PyTorch layers with the native attention call, the path before session 9; with --torch, through
the PyTorch path that gathers every key). One engine and one prefill: the configurations swap the engine's attention
paths over the same cached prompt (prefix caching), interleaved over rounds; a round times
generate(max_tokens=1) and generate(max_tokens=1+N) and takes their difference per token, in
this process's CPU time (1 thread: the work done, much less disturbed by other processes than
wall time on a shared machine; use --wall on a quiet one).
Usage: python docs/results/raw/ab_sparse_decode.py [--tokens 8192] [--new 32] [--rounds 3]
       [--dtype float32] [--threads 1] [--layers] [--torch] [--wall]"""
import argparse, statistics, sysconfig, time
from dataclasses import replace
from pathlib import Path

import torch

from slimlm import LLM, SamplingParams, kernels
from slimlm.kvcache.policy import KV_POLICIES

ap = argparse.ArgumentParser()
ap.add_argument("--tokens", type=int, default=8192)
ap.add_argument("--new", type=int, default=32)
ap.add_argument("--rounds", type=int, default=3)
ap.add_argument("--dtype", default="float32")
ap.add_argument("--threads", type=int, default=1)
ap.add_argument("--torch", action="store_true")
ap.add_argument("--layers", action="store_true")
ap.add_argument("--wall", action="store_true")
a = ap.parse_args()
clock = time.perf_counter if a.wall else time.process_time
torch.set_num_threads(a.threads)
llm = LLM("smollm2-135m-instruct", dtype=a.dtype, max_num_batched_tokens=2048)
text = "".join(p.read_text() for p in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("[a-c]*.py"))[:40])
ids = llm.tokenizer.encode(text)[: a.tokens]
assert len(ids) == a.tokens
eng, full = llm.engine, llm.engine.runner.paths
eng.runner.batch_invariant = False  # no twin decode row (it doubles every configuration's attention alike)
lib = kernels.load("sparse_decode")
native_layers = eng.runner.native_layers
print("native decode layers:", native_layers is not None)
configs, layers = {"full": full}, {}  # name -> paths; names on the PyTorch layers
for name in ("squeezed", "shadowkv"):
    pol = KV_POLICIES.get(name)()
    configs[name] = replace(full, native_decode=None, sparse=pol, sparse_native=lib)
    if a.layers:  # the same policy object (one summary), its steps on the PyTorch layers
        configs[name + "-layers"] = configs[name]
        layers[name + "-layers"] = True
    if a.torch:
        configs[name + "-torch"] = replace(full, native_decode=None, sparse=KV_POLICIES.get(name)(), sparse_native=None)
one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
many = SamplingParams(temperature=0, max_tokens=1 + a.new, ignore_eos=True)
t = time.perf_counter()
llm.generate([ids], one, use_tqdm=False)
print(f"prefill {a.tokens} tokens: {time.perf_counter() - t:.1f} s")
res, toks = {k: [] for k in configs}, {}
def use(name):
    eng.runner.paths = configs[name]
    eng.runner.native_layers = None if name in layers else native_layers


for name in configs:  # warm-up: builds each policy's prefix summary once
    use(name)
    t = time.perf_counter()
    toks[name] = llm.generate([ids], many, use_tqdm=False)[0].outputs[0].token_ids
    print(f"warm-up {name}: {time.perf_counter() - t:.1f} s")
for r in range(a.rounds):
    for name in configs:
        use(name)
        t0 = clock(); llm.generate([ids], one, use_tqdm=False)
        t1 = clock(); llm.generate([ids], many, use_tqdm=False)
        t2 = clock()
        res[name].append(1000 * ((t2 - t1) - (t1 - t0)) / a.new)
base = statistics.median(res["full"])
for name, ms in res.items():
    m = statistics.median(ms)
    agree = sum(x == y for x, y in zip(toks[name], toks["full"]))
    same = "" if name not in layers else f", to {name[:-7]}'s: {toks[name] == toks[name[:-7]]}"
    print(f"{name:16s} decode {'wall' if a.wall else 'CPU'} ms/token median {m:7.1f} {[round(x, 1) for x in ms]}  speed vs full {base / m:.2f}x"
          f"  tokens equal to full: {agree}/{len(toks['full'])}{same}")
for name, paths in configs.items():
    if paths.sparse is not None and name not in layers:
        st = paths.sparse.stats
        print(f"{name}: bytes read / full {st['bytes_read'] / st['bytes_full']:.3f}, summaries built "
              f"{st['summaries_built']}, reused {st['summary_hits']}")
