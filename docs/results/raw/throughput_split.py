"""Where the throughput workload's time goes (docs/benchmarks.md, "Where the throughput time goes"):
the `slimlm bench throughput` workload through one engine, every step timed and classed as
"prefill-ish" (a step with a prompt chunk) or "all-decode"; inside the steps, the dense linear
layers of the layer-by-layer path (F.linear, or the native GEMM of kernels/gemm.py: its calls and
FLOPs), attention (PagedAttention.attend), the native decode layers (one call per step, GEMMs,
attention and the rest inside), the LM head; "rest" = the step minus those (norms, RoPE, SwiGLU,
residuals, embedding, sampling, scheduler, Python).

  THREADS=1 python docs/results/raw/throughput_split.py float32|bfloat16 [num_prompts] [max_tokens]
  SLIMLM_GEMM=0 ...   the same with the PyTorch matmuls in the layer-by-layer path

Timers are around synchronous calls (~1 us each). With THREADS=1 every timer (and the total) is the
calling thread's CPU time (time.thread_time: all the work runs on that thread), so time spent
descheduled on a loaded machine does not count; with more threads, wall time (compare shares)."""
import os, sys, time
from collections import defaultdict

import torch
import torch.nn.functional as F

torch.set_num_threads(int(os.environ.get("THREADS", "1")))
clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
from slimlm import LLM, SamplingParams  # noqa: E402
from slimlm.bench.workloads import mixed_prompts  # noqa: E402
from slimlm.engine.paged_attention import PagedAttention  # noqa: E402
from slimlm.engine.runner import ModelRunner  # noqa: E402
from slimlm.kernels import gemm  # noqa: E402
from slimlm.model.hub import load  # noqa: E402
from slimlm.model.quant.native_head import NativeHead  # noqa: E402
from slimlm.model.quant.native_layers import NativeDecodeLayers  # noqa: E402

dtype = sys.argv[1]
n_prompts = int(sys.argv[2]) if len(sys.argv) > 2 else 64
max_tokens = int(sys.argv[3]) if len(sys.argv) > 3 else 128
lm = load("smollm2-135m-instruct", dtype=dtype)
prompts = mixed_prompts(lm.tokenizer, n=n_prompts, seed=0)
llm = LLM(lm, dtype=dtype)
eng = llm.engine

cls = ["-"]  # the current step's class
T = defaultdict(float)  # (class, part) -> seconds
C = defaultdict(float)  # (class, part) -> count / flops
stack = []  # nested timers: a part's time is taken out of its parent's


def timed(fn, part, flops=None):
    def run(*a, **k):
        t = clock()
        stack.append(0.0)
        y = fn(*a, **k)
        inner = stack.pop()
        dt = clock() - t
        T[cls[0], part] += dt - inner
        T[cls[0], part + " total"] += dt
        if stack:
            stack[-1] += dt
        C[cls[0], part + " calls"] += 1
        if flops is not None:
            C[cls[0], part + " flops"] += flops(*a, **k)
        return y
    return run


def lin_flops(x, w, b=None):
    return 2.0 * x.numel() * w.shape[0]


F_linear = F.linear
torch.nn.modules.linear.F.linear = timed(F_linear, "linear (PyTorch)", lin_flops)
gemm.linear = timed(gemm.linear, "linear (native GEMM)", lambda x, w, b=None, threads=None: lin_flops(x, w))
PagedAttention.attend = timed(PagedAttention.attend, "attention (layer path)")
NativeDecodeLayers.run = timed(NativeDecodeLayers.run, "native decode layers")
NativeHead.__call__ = timed(NativeHead.__call__, "native head")
execute = ModelRunner.execute


def step(self, out):
    cls[0] = "all-decode" if all(len(c.token_ids) == 1 for c in out.chunks) else "prefill-ish"
    C[cls[0], "steps"] += 1
    C[cls[0], "rows"] += sum(len(c.token_ids) for c in out.chunks)
    return timed(execute, "step (runner.execute)")(self, out)


ModelRunner.execute = step
params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
eng.pool.reset_prefix_cache()
T.clear(); C.clear()
t0 = clock()
llm.generate(prompts, params, use_tqdm=False)
wall = clock() - t0
print(f"{dtype} threads={torch.get_num_threads()} prompts={n_prompts} max_tokens={max_tokens} "
      f"SLIMLM_GEMM={os.environ.get('SLIMLM_GEMM', '1')} gemm layers={gemm.supported(lm.model.dtype)}: "
      f"wall {wall:.1f} s, {n_prompts * max_tokens / wall:.1f} tok/s")
parts = ["linear (PyTorch)", "linear (native GEMM)", "attention (layer path)", "native decode layers", "native head"]
print("| steps | n | rows | step s | " + " | ".join(parts) + " | rest |")
print("|---|---|---|---|" + "---|" * (len(parts) + 1))
for c in ("prefill-ish", "all-decode"):
    s = T[c, "step (runner.execute) total"]
    cells = []
    for p in parts:
        t = T[c, p]
        fl = C[c, p + " flops"]
        cells.append(f"{t:.1f} s" + (f" ({fl / t / 1e9:.0f} GFLOPS)" if fl and t else ""))
    print(f"| {c} | {C[c, 'steps']:.0f} | {C[c, 'rows']:.0f} | {s:.1f} | " + " | ".join(cells) + f" | {T[c, 'step (runner.execute)']:.1f} s |")
print(f"outside runner.execute (scheduler, sampling, detokenizer): {wall - sum(T[c, 'step (runner.execute) total'] for c in ('prefill-ish', 'all-decode')):.1f} s")
