"""Prefill vs decode CPU time of full / int8 / int4 KV on ab_kv_speed.py's prompts (8 mixed prompts up to
600 tokens, bf16, 1 thread): generate with max_tokens=1 (prefill) and 33 (prefill + 32 decode
steps); medians of 2 after a warm-up round. Loaded machine: read the ratios.

    CFG=full,int4 PYTHONPATH=src python docs/results/raw/ab_kv_split.py
"""
import os, time, statistics, torch
from slimlm import LLM, SamplingParams
from slimlm.bench.workloads import mixed_prompts
torch.set_num_threads(1)
names = os.environ.get("CFG", "full,int4").split(",")
llms = {n: LLM("smollm2-135m-instruct", dtype="bfloat16", **({} if n == "full" else {"kv_cache_dtype": n})) for n in names}
prompts = mixed_prompts(next(iter(llms.values())).engine.tokenizer, n=8, hi=600, seed=0)
res = {n: {1: [], 33: []} for n in names}
for r in range(3):
    for mt in (1, 33):
        for n, llm in llms.items():
            llm.engine.pool.reset_prefix_cache()
            t = time.process_time()
            llm.generate(prompts, SamplingParams(temperature=0, max_tokens=mt, ignore_eos=True), use_tqdm=False)
            if r: res[n][mt].append(time.process_time() - t)
for n in names:
    p, a = statistics.median(res[n][1]), statistics.median(res[n][33])
    print(n, f"prefill {p:.2f}s  decode(32 steps x8) {a - p:.2f}s")
