"""Same-process A/B of the native decode-layer path (model/quant/native_layers.py): two engines on
the same packed weights, one with SLIMLM_DECODE_LAYER=0 (the layer-by-layer path), alternating;
batch-1 greedy decode ms/step after a 64-token prompt, medians of ROUNDS rounds.
Usage: THREADS=1 python docs/results/raw/ab_decode_layer.py gguf   (or int8 / int4)"""
import os, sys, time, statistics, torch
from slimlm import LLM, SamplingParams
torch.set_num_threads(int(os.environ.get("THREADS", "2")))
weights = sys.argv[1]
new = LLM("smollm2-135m-instruct", dtype="float32", weights=weights, kv_cache_bytes="64M").engine
os.environ["SLIMLM_DECODE_LAYER"] = "0"
old = LLM("smollm2-135m-instruct", dtype="float32", weights=weights, kv_cache_bytes="64M").engine
del os.environ["SLIMLM_DECODE_LAYER"]
assert new.runner.native_layers is not None and old.runner.native_layers is None
def run(eng, n=32):
    eng.add_request(list(range(100, 164)), SamplingParams(temperature=0, max_tokens=n + 4, ignore_eos=True))
    for _ in range(4): eng.step()
    t = time.perf_counter()
    for _ in range(n): eng.step()
    dt = (time.perf_counter() - t) / n
    while eng.has_unfinished(): eng.step()
    return dt * 1000
res = {"before": [], "after": []}
for r in range(int(os.environ.get("ROUNDS", "5"))):
    res["before"].append(run(old))
    res["after"].append(run(new))
b, a = statistics.median(res["before"]), statistics.median(res["after"])
print(f"{weights} threads {torch.get_num_threads()}: per-op {b:.1f} ms/step {[round(x,1) for x in res['before']]}; "
      f"native layers {a:.1f} ms/step {[round(x,1) for x in res['after']]}; speed-up {b/a:.3f}x")
