"""Same-process A/B of qlinear.c's VNNI loops in whole decode steps: slimlm_qlinear_fast(0) (the original
loops) vs (2) (restructured, software prefetch: the default), set in both libraries that hold them
(qlinear, decode_layer), one engine per weights kind, interleaved rounds of 32 batch-1 greedy steps
after a 64-token prompt; ms/step wall and thread time (the main thread: all of it at THREADS=1).
Usage: THREADS=1 ROUNDS=7 python docs/results/raw/ab_qlinear_step.py int4,gguf,int8"""
import os, sys, time, statistics, torch
from slimlm import LLM, SamplingParams, kernels
torch.set_num_threads(int(os.environ.get("THREADS", "1")))
kinds = sys.argv[1].split(",")
engs = {k: LLM("smollm2-135m-instruct", dtype="float32", weights=k, kv_cache_bytes="64M").engine for k in kinds}
libs = [kernels.load("qlinear"), kernels.load("decode_layer")]
def run(eng, n=32):
    eng.add_request(list(range(100, 164)), SamplingParams(temperature=0, max_tokens=n + 4, ignore_eos=True))
    for _ in range(4): eng.step()
    t = time.perf_counter(); c = time.thread_time()
    for _ in range(n): eng.step()
    dt = (time.perf_counter() - t) / n; dc = (time.thread_time() - c) / n
    while eng.has_unfinished(): eng.step()
    return dt * 1000, dc * 1000
res = {(k, f): [] for k in kinds for f in (0, 1)}
for r in range(int(os.environ.get("ROUNDS", "7"))):
    for k in kinds:
        for f in ((0, 1) if r % 2 == 0 else (1, 0)):
            for l in libs: l.slimlm_qlinear_fast(2 * f)
            res[(k, f)].append(run(engs[k]))
for k in kinds:
    o, n = res[(k, 0)], res[(k, 1)]
    ow, nw = statistics.median(x[0] for x in o), statistics.median(x[0] for x in n)
    oc, nc = statistics.median(x[1] for x in o), statistics.median(x[1] for x in n)
    pr = statistics.median(a[1] / b[1] for a, b in zip(o, n))
    print(f"{k} threads {torch.get_num_threads()}: old {ow:.1f} ms/step wall, {oc:.2f} thread; new {nw:.1f} wall, {nc:.2f} thread; "
          f"thread-time ratio {oc/nc:.3f}x (median of paired {pr:.3f}x) wall ratio {ow/nw:.3f}x")
