"""Same-process A/B of the native elementwise kernels (kernels/elementwise.py) on the prefill steps of
the `slimlm bench throughput` workload: its first prompts through one engine with max_tokens=1
(prompt chunks of up to 2,048 rows), rounds alternating kernels on / off (off = their PyTorch path,
as before the kernels), every step's CPU time split as in throughput_split.py: dense linear layers,
attention (PagedAttention.attend), and the rest (norms, RoPE, SwiGLU, residual adds, embedding,
Python). Medians over rounds; THREADS=1 times are the thread's CPU time (time.thread_time).

  THREADS=1 python docs/results/raw/ab_elementwise.py float32|bfloat16 [num_prompts] [rounds]
"""
import os, statistics, sys, time
from collections import defaultdict

import torch
import torch.nn.functional as F

torch.set_num_threads(int(os.environ.get("THREADS", "1")))
clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
from slimlm import LLM, SamplingParams  # noqa: E402
from slimlm.bench.workloads import mixed_prompts  # noqa: E402
from slimlm.engine.paged_attention import PagedAttention  # noqa: E402
from slimlm.engine.runner import ModelRunner  # noqa: E402
from slimlm.kernels import elementwise  # noqa: E402
from slimlm.model.hub import load  # noqa: E402

dtype = sys.argv[1]
n = int(sys.argv[2]) if len(sys.argv) > 2 else 8
rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 3
lm = load("smollm2-135m-instruct", dtype=dtype)
prompts = mixed_prompts(lm.tokenizer, n=64, seed=0)[:n]
llm = LLM(lm, dtype=dtype)
T = defaultdict(float)


def timed(fn, part):
    def run(*a, **k):
        t = clock()
        try:
            return fn(*a, **k)
        finally:
            T[part] += clock() - t
    return run


torch.nn.modules.linear.F.linear = timed(F.linear, "linear")
PagedAttention.attend = timed(PagedAttention.attend, "attention")
ModelRunner.execute = timed(ModelRunner.execute, "step")
native_lib = elementwise._lib
params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
results = {"native": defaultdict(list), "pytorch": defaultdict(list)}
outs = {}
llm.generate(prompts[:1], params, use_tqdm=False)  # warm-up: kernel builds, first allocations
for r in range(rounds):
    for mode in ("native", "pytorch") if r % 2 == 0 else ("pytorch", "native"):
        elementwise._lib = native_lib if mode == "native" else (lambda *t: None)
        llm.engine.pool.reset_prefix_cache()
        T.clear()
        outs[mode] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        for part in ("step", "linear", "attention"):
            results[mode][part].append(T[part])
        results[mode]["rest"].append(T["step"] - T["linear"] - T["attention"])
elementwise._lib = native_lib
med = {m: {p: statistics.median(v) for p, v in d.items()} for m, d in results.items()}
print(f"{dtype} threads={torch.get_num_threads()} prompts={n} rows={sum(map(len, prompts))} rounds={rounds} "
      f"(medians, {'CPU' if clock is time.thread_time else 'wall'} s); first tokens equal: {outs['native'] == outs['pytorch']}")
print("| path | step | linear | attention | rest |")
print("|---|---|---|---|---|")
for m in ("pytorch", "native"):
    print(f"| {m} | " + " | ".join(f"{med[m][p]:.2f}" for p in ("step", "linear", "attention", "rest")) + " |")
print(f"rest: pytorch / native = {med['pytorch']['rest'] / med['native']['rest']:.2f}x; "
      f"step: {med['pytorch']['step'] / med['native']['step']:.3f}x")
