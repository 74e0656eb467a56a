"""Same-process A/B of switches that act on the engine's prefill steps: `slimlm bench throughput`'s
mixed prompts (prefix caching on, 1 generated token: prefill only) through one engine, the
variants' rounds interleaved (ABBA...). Per variant: CPU time of the run, of its F.linear calls,
of PagedAttention.attend and of its KV writes (PagedKVCache.write), and the process's minor page
faults (first touches of fresh memory). At THREADS=1 (the default) times are this thread's CPU
time (time.thread_time: user + system, so page faults count), medians of the rounds.

  THREADS=1 python docs/results/raw/ab_prefill_steps.py VARIANT [--dtype bfloat16] [--prompts 16] [--rounds 3]

VARIANT:
  trim      glibc's heap trimmed at 128 KiB (what a process that set M_MMAP_THRESHOLD has: the
            dynamic rule is off, the trim threshold stays at its default) vs at 64 MiB
            (mallopt(M_TRIM_THRESHOLD)): are the prefill's activations page-faulted anew each step?
  kvwrite   the plain codec's KV write by the native scatter vs index_copy_ (SLIMLM_KV_WRITE=0)
"""
import argparse, ctypes, os, resource, statistics, sys, time
from collections import defaultdict

ap = argparse.ArgumentParser()
ap.add_argument("variant", choices=["trim", "kvwrite"])
ap.add_argument("--dtype", default="bfloat16")
ap.add_argument("--prompts", type=int, default=16)
ap.add_argument("--rounds", type=int, default=3)
a = ap.parse_args()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

torch.set_num_threads(int(os.environ.get("THREADS", "1")))
clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
from slimlm import LLM, SamplingParams  # noqa: E402
from slimlm.bench.workloads import mixed_prompts  # noqa: E402
from slimlm.engine.paged_attention import PagedAttention  # noqa: E402
from slimlm.kvcache.storage import PagedKVCache  # noqa: E402
from slimlm.model.hub import load  # noqa: E402

T = defaultdict(float)


def timed(fn, name):
    def run(*args, **kw):
        t = clock()
        r = fn(*args, **kw)
        T[name] += clock() - t
        return r
    return run


torch.nn.modules.linear.F.linear = timed(F.linear, "linear")
PagedAttention.attend = timed(PagedAttention.attend, "attend")
PagedKVCache.write = timed(PagedKVCache.write, "kv write")
libc = ctypes.CDLL(None)
M_TRIM_THRESHOLD = -1


def set_trim(nbytes):
    return lambda: libc.mallopt(M_TRIM_THRESHOLD, nbytes)


def set_env(name, value):
    return lambda: os.environ.__setitem__(name, value)


VARIANTS = {
    "trim": {"trim 128 KiB": set_trim(128 << 10), "trim 64 MiB": set_trim(64 << 20)},
    "kvwrite": {"index_copy_": set_env("SLIMLM_KV_WRITE", "0"), "native": set_env("SLIMLM_KV_WRITE", "1")},
}[a.variant]

lm = load("smollm2-135m-instruct", dtype=a.dtype)
prompts = mixed_prompts(lm.tokenizer, n=a.prompts, seed=0)
llm = LLM(lm, dtype=a.dtype)
eng = llm.engine
sp = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
res = {name: defaultdict(list) for name in VARIANTS}
toks = {}
names = list(VARIANTS)
for r in range(a.rounds + 1):  # round 0 warms up
    for name in (names if r % 2 else names[::-1]):
        VARIANTS[name]()
        eng.pool.reset_prefix_cache()
        libc.malloc_trim(0)  # every round starts from a trimmed heap
        T.clear()
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t = clock()
        toks[name] = [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]
        if r:
            res[name]["total"].append(clock() - t)
            res[name]["faults"].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
            for k, v in T.items():
                res[name][k].append(v)
print(f"{a.dtype}, {a.prompts} mixed prompts ({sum(map(len, prompts))} tokens), prefill only, threads="
      f"{torch.get_num_threads()} ({'CPU' if torch.get_num_threads() == 1 else 'wall'} s), medians of {a.rounds} "
      f"interleaved rounds; same first tokens: {len(set(map(str, toks.values()))) == 1}")
keys = ["total", "linear", "attend", "kv write", "faults"]
med = {n: {k: statistics.median(v) for k, v in d.items()} for n, d in res.items()}
for n, m in med.items():
    print(f"  {n:>14}: " + "  ".join(f"{k} {m.get(k, 0):.3f}" if k != "faults" else f"{k} {m.get(k, 0):.0f}"
                                     for k in keys)
          + "   totals: " + ", ".join(f"{v:.2f}" for v in res[n]["total"]))
x, y = med.values()
print(f"  {names[0]} / {names[1]}: " + "  ".join(f"{k} {x.get(k, 0) / y[k]:.3f}" for k in keys if y.get(k)))
