"""First-decode-step logits of the VNNI kernel on the native decode-layer path and the layer-by-layer
path, each vs the fp32-activation kernel (relative L2), 6 prompts; deterministic.
Usage: python docs/results/raw/vnni_native_vs_layer.py int4   (or gguf / int8)"""
import os, sys, torch
from slimlm import LLM, SamplingParams
torch.set_num_threads(1)
w = sys.argv[1]
prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, there was a little robot who",
           "import numpy as np\n", "The three primary colors are", "Water boils at"]


def _record(llm):
    runner, seen = llm.engine.runner, []
    execute = runner.execute

    def run(out):
        res = execute(out)
        seen.append(res)
        return res

    runner.execute = run
    return seen


res = {}
for nat in ("1", "0"):
    os.environ["SLIMLM_DECODE_LAYER"] = nat
    a = LLM("smollm2-135m-instruct", dtype="float32", weights=w)
    for mode in ("fp32", "vnni"):
        os.environ["SLIMLM_QLINEAR"] = mode
        seen = _record(a)
        out = []
        for p in prompts:
            seen.clear()
            a.generate([p], SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)
            out.append(next(iter(seen[1].logits.values()))[0])
        res[mode, nat] = out
        a.engine.runner.execute = type(a.engine.runner).execute.__get__(a.engine.runner)
def rel(x, y): return [round(float((a - b).norm() / b.norm()), 4) for a, b in zip(res[x], res[y])]
print(w, "vnni per-op vs fp32:", rel(("vnni","0"), ("fp32","0")))
print(w, "vnni native vs fp32:", rel(("vnni","1"), ("fp32","0")))
print(w, "vnni native vs vnni per-op:", rel(("vnni","1"), ("vnni","0")))
