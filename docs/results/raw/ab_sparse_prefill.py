"""Same-process A/B of prefill (TTFT) at a long prompt: dense (the native paged prefill kernel)
vs vertical-slash sparse prefill through the native kernel (kernels/sparse_prefill.c) and, with
--torch, through the PyTorch gathers. One engine: the configurations swap its attention paths,
prefix caching off so every run prefills the whole prompt; rounds interleave them. Times are this
process's CPU time (1 thread: the work done, much less disturbed by other processes than wall
time on a shared machine; use --wall on a quiet one). The probe (pattern selection) is timed
apart, and the pattern's statistics printed: the share of causal pairs it attends and the share
of query-candidate pairs the kernel scores.
Usage: python docs/results/raw/ab_sparse_prefill.py [--tokens 8000] [--rounds 1] [--threads 1]
       [--torch] [--wall] [--yarn 40000 | --dca 40000]   (rope_extension yarn / dca, context=N, past 8k;
       --dca takes DCA's defaults unless --dca-arg chunk_size=6144 --dca-arg local_window=512 ... pins them)"""
import argparse, statistics, sysconfig, time
from dataclasses import replace
from pathlib import Path

import torch

from slimlm import LLM, SamplingParams, kernels
from slimlm.engine.sparse_prefill import VerticalSlash

ap = argparse.ArgumentParser()
ap.add_argument("--tokens", type=int, default=8000)
ap.add_argument("--rounds", type=int, default=1)
ap.add_argument("--threads", type=int, default=1)
ap.add_argument("--torch", action="store_true")
ap.add_argument("--wall", action="store_true")
ap.add_argument("--yarn", type=int, default=None)
ap.add_argument("--dca", type=int, default=None)
ap.add_argument("--dca-arg", action="append", default=[], help="KEY=VALUE (repeatable)")
a = ap.parse_args()
clock = time.perf_counter if a.wall else time.process_time
torch.set_num_threads(a.threads)
ext = {"rope_extension": "yarn", "rope_extension_args": {"context": a.yarn}} if a.yarn else {}
if a.dca:
    ext = {"rope_extension": "dca", "rope_extension_args": {"context": a.dca, **{
        k: float(v) if "." in v else int(v) for k, v in (kv.split("=", 1) for kv in a.dca_arg)}}}
llm = LLM("smollm2-135m-instruct", enable_prefix_caching=False, **ext)
text = "".join(p.read_text() for p in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("[a-t]*.py"))[:120])
ids = llm.tokenizer.encode(text)[: a.tokens]
assert len(ids) == a.tokens
eng, dense = llm.engine, llm.engine.runner.paths
probe_s = {}
_pattern = VerticalSlash._pattern


def timed_pattern(self, *args):
    t = clock()
    r = _pattern(self, *args)
    probe_s[id(self)] = probe_s.get(id(self), 0.0) + clock() - t
    return r


VerticalSlash._pattern = timed_pattern
configs = {"dense": dense, "sparse-native": replace(dense, sparse_prefill=VerticalSlash(),
                                                    sparse_prefill_native=kernels.load("sparse_prefill"))}
if a.torch:
    configs["sparse-torch"] = replace(dense, sparse_prefill=VerticalSlash(), sparse_prefill_native=None)
print(f"dtype {eng.cache.spec.compute_dtype}, {a.tokens} tokens, {a.threads} thread(s), "
      f"{'wall' if a.wall else 'CPU'} time")
sp = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True, prompt_logprobs=0)
res, outs = {k: [] for k in configs}, {}
for r in range(a.rounds):
    for name, paths in configs.items():
        eng.runner.paths = paths
        t = clock()
        outs[name] = llm.generate([ids], sp, use_tqdm=False)[0]
        res[name].append(clock() - t)
        print(f"round {r} {name}: {res[name][-1]:.1f} s", flush=True)
base = statistics.median(res["dense"])
lp = {k: torch.tensor([next(iter(d.values())) for d in o.prompt_logprobs[1:]]) for k, o in outs.items()}
for name, s in res.items():
    m = statistics.median(s)
    line = f"{name:14s} TTFT median {m:7.1f} s  dense / this {base / m:.2f}x"
    sp_ = configs[name].sparse_prefill
    if sp_ is not None and sp_.stats:
        st, rounds = sp_.stats, len(s)
        line += (f"  probe {probe_s.get(id(sp_), 0) / rounds:.1f} s  attended {st['computed'] / st['causal']:.3f}"
                 f"  scored {st['scored'] / st['causal']:.3f} of the sparse chunks' causal pairs"
                 f"  prompt NLL vs dense {float(-lp[name].mean()):.4f} vs {float(-lp['dense'].mean()):.4f}"
                 f"  next token equal: {outs[name].outputs[0].token_ids == outs['dense'].outputs[0].token_ids}")
    print(line)
