"""Same-run A/B of dense weights through the native decode layers (kernels/dense_linear.c) and the
native LM head (model/quant/native_head.py) vs the layer-by-layer PyTorch path and PyTorch's head,
batch-1 greedy decode ms/step after a 64-token prompt, engines in one process, alternating rounds;
for bf16 also the two bf16 kernels (weights widened to fp32 vs vdpbf16ps on bf16-rounded x).
Ratios only on a loaded machine.
  THREADS=1 python docs/results/raw/ab_dense_layer.py float32|bfloat16 [rounds]"""
import os, sys, time, statistics, torch
from slimlm import LLM, SamplingParams
torch.set_num_threads(int(os.environ.get("THREADS", "2")))
dtype, rounds = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 5
new = LLM("smollm2-135m-instruct", dtype=dtype, kv_cache_bytes="64M").engine
os.environ["SLIMLM_DECODE_LAYER"] = os.environ["SLIMLM_NATIVE_HEAD"] = "0"
old = LLM("smollm2-135m-instruct", dtype=dtype, kv_cache_bytes="64M").engine
del os.environ["SLIMLM_DECODE_LAYER"], os.environ["SLIMLM_NATIVE_HEAD"]
native_head = new.runner.head
assert new.runner.native_layers is not None and old.runner.native_layers is None
def run(eng, n=32):
    eng.add_request(list(range(100, 164)), SamplingParams(temperature=0, max_tokens=n + 4, ignore_eos=True))
    for _ in range(4): eng.step()
    t = time.perf_counter()
    for _ in range(n): eng.step()
    dt = (time.perf_counter() - t) / n
    while eng.has_unfinished(): eng.step()
    return dt * 1000
arms = {"layer path": (old, "vnni", None), "native layers, torch head": (new, "fp32", new.model.head),
        "native layers + head": (new, "fp32", native_head)}
if dtype == "bfloat16":
    arms = {**arms, "native layers, torch head": (new, "vnni", new.model.head),
            "native layers + head": (new, "vnni", native_head), "native layers + head, bf16 widened": (new, "fp32", native_head)}
res = {k: [] for k in arms}
for r in range(rounds):
    for k, (eng, mode, head) in arms.items():
        os.environ["SLIMLM_QLINEAR"] = mode
        if head is not None:
            eng.runner.head = head
        res[k].append(run(eng))
base = statistics.median(res["layer path"])
for k, v in res.items():
    m = statistics.median(v)
    print(f"{dtype} threads={torch.get_num_threads()} {k}: {m:.1f} ms/step {[round(x, 1) for x in v]}; "
          f"speed-up vs layer path {base / m:.2f}x")
