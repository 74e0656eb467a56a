"""Same-process A/B of the native GEMM in the engine: one engine on SmolLM2-135M, rounds alternating
the layer path's dense linears between kernels/gemm.c (gemm.install on) and F.linear (off), each
round the throughput workload's prompt mix (n prompts, m new tokens, prefix cache reset). Medians
of the round times; with THREADS=1 the thread's CPU time (the work runs on it), else wall clock.
Also how many requests' greedy tokens agree between the two paths.

  THREADS=1 python docs/results/raw/ab_gemm_engine.py float32|bfloat16 [rounds] [prompts] [tokens]"""
import os, statistics, sys, time

import torch

torch.set_num_threads(int(os.environ.get("THREADS", "1")))
os.environ["SLIMLM_GEMM"] = "1"
from slimlm import LLM, SamplingParams  # noqa: E402
from slimlm.bench.workloads import mixed_prompts  # noqa: E402
from slimlm.kernels import gemm  # noqa: E402
from slimlm.model.hub import load  # noqa: E402

dtype = sys.argv[1]
rounds, n, m = [int(a) for a in sys.argv[2:5]] + [4, 8, 16][len(sys.argv[2:5]):]
clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
lm = load("smollm2-135m-instruct", dtype=dtype)
llm = LLM(lm, dtype=dtype)
model = llm.engine.model
prompts = mixed_prompts(lm.tokenizer, n=n, seed=1)
params = SamplingParams(temperature=0, max_tokens=m, ignore_eos=True)
res, toks = {"gemm.c": [], "F.linear": []}, {}
for r in range(rounds):
    for name in (("gemm.c", "F.linear") if r % 2 == 0 else ("F.linear", "gemm.c")):
        assert gemm.install(model, name == "gemm.c", min_rows=1) == (len(gemm._linears(model)) if name == "gemm.c" else 0)
        llm.engine.pool.reset_prefix_cache()
        t = clock()
        outs = llm.generate(prompts, params, use_tqdm=False)
        res[name].append(clock() - t)
        toks[name] = [o.outputs[0].token_ids for o in outs]
med = {k: statistics.median(v) for k, v in res.items()}
agree = sum(a == b for a, b in zip(toks["gemm.c"], toks["F.linear"]))
print(f"{dtype} threads={torch.get_num_threads()} {n} prompts x {m} tokens, {rounds} rounds "
      f"({'thread CPU' if clock is time.thread_time else 'wall'} s): " +
      ", ".join(f"{k} {v:.2f} s {[round(x, 2) for x in res[k]]}" for k, v in med.items()) +
      f"; F.linear / gemm.c = {med['F.linear'] / med['gemm.c']:.3f}x; greedy agreement {agree}/{n}")
