"""Same-process A/B of the native prefill kernel inside the engine: `slimlm bench throughput`'s mixed
prompts (bf16 or fp32, prefix caching on, 1 generated token: prefill only) through one engine whose
prefill library is swapped between a baseline build from a git revision and this tree's build,
rounds interleaved. Times are CPU time of this thread at 1 thread (time.thread_time) in
PagedAttention.attend (KV write and all attention of the layer path) and in the kernel calls.

  python docs/results/raw/ab_paged_prefill_engine.py [--base REV] [--dtype bfloat16] [--prompts 16]
                                                     [--rounds 2]"""
import argparse, ctypes, statistics, tempfile, time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import torch

from slimlm import LLM, SamplingParams, kernels
from slimlm.bench.workloads import mixed_prompts
from slimlm.engine import paged_attention as pa
from slimlm.model.hub import load
import kernel_rev  # docs/results/raw/kernel_rev.py

REPO = Path(__file__).resolve().parents[3]
ap = argparse.ArgumentParser()
ap.add_argument("--base", default="HEAD")
ap.add_argument("--dtype", default="bfloat16")
ap.add_argument("--prompts", type=int, default=16)
ap.add_argument("--rounds", type=int, default=2)
a = ap.parse_args()
torch.set_num_threads(1)


def build(rev: str | None, tmp: Path) -> ctypes.CDLL:
    """paged_prefill compiled from revision ``rev`` (None: the working tree), as kernels.load builds it."""
    return kernel_rev.build("paged_prefill", rev, tmp)


T = defaultdict(float)


def timed(fn, name):
    def run(*args, **kw):
        t = time.thread_time()
        r = fn(*args, **kw)
        T[name] += time.thread_time() - t
        return r
    return run


pa.PagedAttention.attend = timed(pa.PagedAttention.attend, "attend")
pa.native_prefill = timed(pa.native_prefill, "kernel")
lm = load("smollm2-135m-instruct", dtype=a.dtype)
prompts = mixed_prompts(lm.tokenizer, n=a.prompts, seed=0)
llm = LLM(lm, dtype=a.dtype)
eng = llm.engine
sp = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
with tempfile.TemporaryDirectory() as tmp:
    libs = {f"base {a.base}": build(a.base, Path(tmp)), "tree": build(None, Path(tmp))}
    paths = {name: replace(eng.runner.paths, native_prefill=lib) for name, lib in libs.items()}
    res = {name: defaultdict(list) for name in libs}
    toks = {}
    for r in range(a.rounds + 1):  # round 0 warms up
        for name, p in paths.items():
            eng.runner.paths = p
            eng.pool.reset_prefix_cache()
            T.clear()
            t = time.thread_time()
            toks[name] = [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]
            if r:
                res[name]["total"].append(time.thread_time() - t)
                for k, v in T.items():
                    res[name][k].append(v)
print(f"{a.dtype}, {a.prompts} mixed prompts, prefill only, CPU s at 1 thread, median of {a.rounds} interleaved "
      f"rounds; same first tokens: {len(set(map(str, toks.values()))) == 1}")
med = {n: {k: statistics.median(v) for k, v in d.items()} for n, d in res.items()}
for n, m in med.items():
    print(f"  {n:>14}: total {m['total']:.2f}  attend {m['attend']:.2f}  kernel {m['kernel']:.2f}")
b, t = med.values()
print(f"  tree vs base: kernel {b['kernel'] / t['kernel']:.3f}x, attend {b['attend'] / t['attend']:.3f}x, "
      f"total {b['total'] / t['total']:.3f}x")
