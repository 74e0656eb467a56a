"""Same-process interleaved A/B of KV plug-ins inside continuous batching (issue 11 speed):
full KV vs H2O / int8 / int4 on a smaller mixed workload (the throughput scenario's prompts,
fewer and shorter). Prints per config: generated tok/s (median of rounds), ratio to full,
KV peak MB, prompt tokens computed. Noisy on a loaded machine: read the ratios.

PYTHONPATH=src python docs/results/raw/ab_kv_speed.py [rounds] [configs...]
configs: full h2o int8 int4 h2o-nopc (h2o without prefix caching) ...; a name ending in "-layer0"
builds that config with SLIMLM_DECODE_LAYER=0 (decode steps layer by layer in PyTorch, not the
native decode layers: e.g. int4 vs int4-layer0). env THREADS, N, HI, MAXTOK, DTYPE; CPU=1 times
by process CPU time instead of wall time (steadier on a loaded machine at THREADS=1).
"""
import os, statistics, sys, time

import torch

from slimlm import LLM, SamplingParams
from slimlm.bench.workloads import mixed_prompts

torch.set_num_threads(int(os.environ.get("THREADS", "1")))
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
names = sys.argv[2:] or ["full", "h2o", "int8", "int4"]
CONFIGS = {
    "full": {},
    "h2o": {"kv_policy": "h2o", "kv_policy_args": {"budget": 0.2}},
    "h2o-nopc": {"kv_policy": "h2o", "kv_policy_args": {"budget": 0.2}, "enable_prefix_caching": False},
    "full-nopc": {"enable_prefix_caching": False},
    "int8": {"kv_cache_dtype": "int8"},
    "int4": {"kv_cache_dtype": "int4"},
}
dtype = os.environ.get("DTYPE", "bfloat16")


def build(n):
    base = n.removesuffix("-layer0")
    if base != n:
        os.environ["SLIMLM_DECODE_LAYER"] = "0"
    try:
        return LLM("smollm2-135m-instruct", dtype=dtype, **CONFIGS[base])
    finally:
        os.environ.pop("SLIMLM_DECODE_LAYER", None)


llms = {n: build(n) for n in names}
clock = time.process_time if os.environ.get("CPU") == "1" else time.perf_counter
prompts = mixed_prompts(next(iter(llms.values())).engine.tokenizer, n=int(os.environ.get("N", "16")),
                        hi=int(os.environ.get("HI", "1000")), seed=0)
params = SamplingParams(temperature=0, max_tokens=int(os.environ.get("MAXTOK", "48")), ignore_eos=True)
res = {n: [] for n in names}
info = {}
for r in range(rounds + 1):
    for n, llm in llms.items():
        eng = llm.engine
        eng.pool.reset_prefix_cache()
        for k in ("computed_prompt_tokens", "generated_tokens", "kv_peak_bytes"):
            eng.stats[k] = 0
        t = clock()
        outs = llm.generate(prompts, params, use_tqdm=False)
        dt = clock() - t
        if r:  # round 0 warms up
            res[n].append(eng.stats["generated_tokens"] / dt)
        info[n] = (eng.stats["kv_peak_bytes"] / 1e6, eng.stats["computed_prompt_tokens"], eng.pool.num_used())
base = statistics.median(res[names[0]])
for n in names:
    m = statistics.median(res[n])
    print(f"{n:10s} {m:7.1f} tok/s  x{m / base:.3f}  rounds {[round(x, 1) for x in res[n]]}  "
          f"KV peak {info[n][0]:.1f} MB  prompt tokens computed {info[n][1]}  blocks held after {info[n][2]}")
