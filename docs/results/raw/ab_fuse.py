"""Same-run A/B of this session's decode-step changes: fused q/k/v + gate/up projections and the
decode kernel's thread count clamped to its work items, vs neither (the code before). Two
engines in one process, alternating; batch-1 greedy decode ms/step after a 64-token prompt."""
import os, sys, time, statistics, torch
from slimlm import LLM, SamplingParams
import slimlm.kernels.ops as ops
torch.set_num_threads(int(os.environ.get("THREADS", "2")))
dtype, weights = sys.argv[1], sys.argv[2]
new = LLM("smollm2-135m-instruct", dtype=dtype, weights=weights, kv_cache_bytes="64M").engine
os.environ["SLIMLM_FUSE"] = "0"
old = LLM("smollm2-135m-instruct", dtype=dtype, weights=weights, kv_cache_bytes="64M").engine
del os.environ["SLIMLM_FUSE"]
def run(eng, n=48):
    eng.add_request(list(range(100, 164)), SamplingParams(temperature=0, max_tokens=n + 4, ignore_eos=True))
    for _ in range(4): eng.step()
    t = time.perf_counter()
    for _ in range(n): eng.step()
    dt = (time.perf_counter() - t) / n
    while eng.has_unfinished(): eng.step()
    return dt * 1000
dt0 = ops.decode_threads
res = {"before": [], "after": []}
for r in range(5):
    ops.decode_threads = lambda n: torch.get_num_threads()  # the old kernel call: every thread
    res["before"].append(run(old))
    ops.decode_threads = dt0
    res["after"].append(run(new))
b, a = statistics.median(res["before"]), statistics.median(res["after"])
print(f"{dtype}/{weights}: before {b:.1f} ms/step ({1000/b:.1f} tok/s) {[round(x,1) for x in res['before']]}; "
      f"after {a:.1f} ms/step ({1000/a:.1f} tok/s) {[round(x,1) for x in res['after']]}; speed-up {b/a:.3f}x")
