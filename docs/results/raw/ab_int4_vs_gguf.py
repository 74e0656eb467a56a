"""int4 vs gguf (SmolLM2-135M: int4 quantized on load vs the model's own Q4_1 file, both packed) in one
process: interleaved rounds of 32 batch-1 greedy steps after a 64-token prompt, ms/step wall and
main-thread CPU time, and per part (native decode layers, LM head, embedding: wall, thread time).
The layers are the same kernel on the same layout in both (int4 g32, fp16 scales and minimums); the
head is int8 per channel (fp32 scales) for int4 and the file's Q8_0 (g32, fp16) for gguf.
Usage: THREADS=1 ROUNDS=5 python docs/results/raw/ab_int4_vs_gguf.py int4,gguf"""
import os, sys, time, statistics, torch
from slimlm import LLM, SamplingParams
from slimlm.model.quant import native_layers as nl
torch.set_num_threads(int(os.environ.get("THREADS", "1")))
kinds = sys.argv[1].split(",")
engs = {k: LLM("smollm2-135m-instruct", dtype="float32", weights=k, kv_cache_bytes="64M").engine for k in kinds}
parts = {}
def wrap(obj, name, tag):
    f = getattr(obj, name)
    def g(*a, **kw):
        t = time.perf_counter(); c = time.thread_time()
        r = f(*a, **kw)
        parts.setdefault(tag, [0.0, 0.0])
        parts[tag][0] += time.perf_counter() - t; parts[tag][1] += time.thread_time() - c
        return r
    setattr(obj, name, g)
for k, e in engs.items():
    wrap(e.runner.native_layers, "run", (k, "layers"))
    m = e.runner.model
    wrap(m.lm_head, "forward", (k, "head"))
    wrap(m.model.embed_tokens, "forward", (k, "embed"))
def run(eng, n=32):
    eng.add_request(list(range(100, 164)), SamplingParams(temperature=0, max_tokens=n + 4, ignore_eos=True))
    for _ in range(4): eng.step()
    parts.clear()
    t = time.perf_counter(); c = time.thread_time()
    for _ in range(n): eng.step()
    dt = (time.perf_counter() - t) / n; dc = (time.thread_time() - c) / n
    p = {kk[1]: (v[0] / n * 1000, v[1] / n * 1000) for kk, v in parts.items()}
    while eng.has_unfinished(): eng.step()
    return dt * 1000, dc * 1000, p
res = {k: [] for k in kinds}
for r in range(int(os.environ.get("ROUNDS", "5"))):
    for k in kinds:
        res[k].append(run(engs[k]))
for k in kinds:
    w = statistics.median(x[0] for x in res[k]); c = statistics.median(x[1] for x in res[k])
    pp = {p: (round(statistics.median(x[2][p][0] for x in res[k]), 2), round(statistics.median(x[2][p][1] for x in res[k]), 2)) for p in res[k][0][2]}
    print(f"{k}: wall {w:.2f} ms/step {[round(x[0],1) for x in res[k]]} cpu(main thread) {c:.2f}; parts (wall, thread) {pp}")
