"""Same-process interleaved A/B of int4 KV layouts (issue 11): full KV vs int4 with keys / values
in groups of 32 / 32 (the layout before), 16 / 32 (the default) and 16 / 16, on the mixed
workload of ab_kv_speed.py. Prints per config: generated tok/s (median of rounds), ratio to the
first config, KV peak MB. Noisy on a loaded machine: read the ratios.

CPU=1 THREADS=1 N=8 HI=600 MAXTOK=32 PYTHONPATH=src python docs/results/raw/ab_kv_int4_groups.py [rounds] [configs...]
configs: full int8 int4-k32v32 int4-k16v32 int4-k16v16 (default: full int4-k32v32 int4-k16v32).
env THREADS, N, HI, MAXTOK, DTYPE (bfloat16); CPU=1 times by process CPU time.
"""
import os, statistics, sys, time

import torch

from slimlm import LLM, SamplingParams
from slimlm.bench.workloads import mixed_prompts
from slimlm.kvcache.codec import int4

torch.set_num_threads(int(os.environ.get("THREADS", "1")))
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
names = sys.argv[2:] or ["full", "int4-k32v32", "int4-k16v32"]
dtype = os.environ.get("DTYPE", "bfloat16")


def build(n):
    if n == "full":
        return LLM("smollm2-135m-instruct", dtype=dtype)
    if n == "int8":
        return LLM("smollm2-135m-instruct", dtype=dtype, kv_cache_dtype="int8")
    k, v = n.removeprefix("int4-k").split("v")
    saved, int4.GROUPS = int4.GROUPS, {"k": int(k), "v": int(v)}
    try:  # the codecs read the groups when the engine builds them
        return LLM("smollm2-135m-instruct", dtype=dtype, kv_cache_dtype="int4")
    finally:
        int4.GROUPS = saved


llms = {n: build(n) for n in names}
clock = time.process_time if os.environ.get("CPU") == "1" else time.perf_counter
prompts = mixed_prompts(next(iter(llms.values())).engine.tokenizer, n=int(os.environ.get("N", "16")),
                        hi=int(os.environ.get("HI", "1000")), seed=0)
params = SamplingParams(temperature=0, max_tokens=int(os.environ.get("MAXTOK", "48")), ignore_eos=True)
res = {n: [] for n in names}
peak = {}
for r in range(rounds + 1):
    for n, llm in llms.items():
        eng = llm.engine
        eng.pool.reset_prefix_cache()
        for key in ("generated_tokens", "kv_peak_bytes"):
            eng.stats[key] = 0
        t = clock()
        llm.generate(prompts, params, use_tqdm=False)
        dt = clock() - t
        if r:  # round 0 warms up
            res[n].append(eng.stats["generated_tokens"] / dt)
        peak[n] = eng.stats["kv_peak_bytes"] / 1e6
base = statistics.median(res[names[0]])
for n in names:
    m = statistics.median(res[n])
    print(f"{n:12s} {m:7.1f} tok/s  x{m / base:.3f}  rounds {[round(x, 1) for x in res[n]]}  KV peak {peak[n]:.1f} MB")
