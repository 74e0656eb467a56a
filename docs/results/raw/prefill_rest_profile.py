"""Per-operator split of the prefill steps' non-matmul work ("rest" in throughput_split.py):
the `slimlm bench throughput` prompts through one engine with max_tokens=1 (prompt chunks only),
under the PyTorch profiler at 1 thread; prints the operators by self CPU time, those that are not
matmul (aten::mm / addmm / linear) or attention kernels being the "rest". The native elementwise
kernels (kernels/elementwise.py, ctypes calls the profiler cannot see) are recorded as
"native::<name>" when the tree has them. (The profiler's times are wall times: compare shares.)

  THREADS=1 python docs/results/raw/prefill_rest_profile.py float32|bfloat16 [num_prompts] [rows]
"""
import os, sys

import torch
from torch.profiler import ProfilerActivity, profile

torch.set_num_threads(int(os.environ.get("THREADS", "1")))
from slimlm import LLM, SamplingParams  # noqa: E402
from slimlm.bench.workloads import mixed_prompts  # noqa: E402
from slimlm.model.hub import load  # noqa: E402

try:
    from slimlm.kernels import elementwise  # noqa: E402

    def recorded(fn, name):
        def run(*a, **k):
            with torch.profiler.record_function(name):
                return fn(*a, **k)
        return run

    for fn in ("rms_norm", "silu_mul", "rope"):
        setattr(elementwise, fn, recorded(getattr(elementwise, fn), f"native::{fn}"))
except ImportError:  # a tree without the kernels
    pass

dtype = sys.argv[1]
n = int(sys.argv[2]) if len(sys.argv) > 2 else 8
rows = int(sys.argv[3]) if len(sys.argv) > 3 else 30
lm = load("smollm2-135m-instruct", dtype=dtype)
prompts = mixed_prompts(lm.tokenizer, n=64, seed=0)[:n]
llm = LLM(lm, dtype=dtype)
params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
llm.generate(prompts[:1], params, use_tqdm=False)  # warm-up (kernel builds, first allocations)
llm.engine.pool.reset_prefix_cache()
with profile(activities=[ProfilerActivity.CPU]) as prof:
    llm.generate(prompts, params, use_tqdm=False)
print(f"{dtype} threads={torch.get_num_threads()} prompts={n} prompt rows={sum(map(len, prompts))}")
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))
