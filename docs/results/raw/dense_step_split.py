"""Split of a dense batch-1 decode step: the whole step, the native decode layers, the native LM
head, and the same GEMVs alone (every layer's q/k/v, o, gate/up, down and the head through
``slimlm_dense_linear`` in step order, on the model's own weights: streamed from DRAM as in a step).
layers - their GEMVs = RMSNorm, RoPE, KV writes, attention, SiLU, residuals and the call itself;
step - layers - head = the embedding, sampling, scheduler and the rest of the Python. Rounds
alternate steps and GEMV-only passes; medians. Loaded machine: shares only.

  THREADS=1 python docs/results/raw/dense_step_split.py float32|bfloat16 [rounds]"""
import os, statistics, sys, time, torch
from slimlm import LLM, SamplingParams
from slimlm.model.quant.native_head import NativeHead
from slimlm.model.quant.native_layers import NativeDecodeLayers

torch.set_num_threads(int(os.environ.get("THREADS", "1")))
dtype, rounds = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 5
eng = LLM("smollm2-135m-instruct", dtype=dtype, kv_cache_bytes="64M").engine
nl, head = eng.runner.native_layers, eng.runner.head
assert nl is not None and isinstance(head, NativeHead)
lib, nt = nl.lib, torch.get_num_threads()
spent = [0.0, 0.0]


def timed(fn, i):
    def run(self, *a):
        t = time.perf_counter()
        y = fn(self, *a)
        spent[i] += time.perf_counter() - t
        return y
    return run


NativeDecodeLayers.run = timed(NativeDecodeLayers.run, 0)
NativeHead.__call__ = timed(NativeHead.__call__, 1)
kind = 0 if dtype == "float32" else 2 if lib.slimlm_dense_has_dpbf16() else 1
ws = [m.weight for layer in eng.model.model.layers
      for m in (layer.self_attn.qkv, layer.self_attn.o_proj, layer.mlp.gate_up, layer.mlp.down_proj)]
ws.append(eng.model.lm_head.weight)
x, y = torch.randn(1, 4096), torch.empty(1, 49152 * 2)


def gemvs():
    t = time.perf_counter()
    for w in ws:
        N, K = w.shape
        lib.slimlm_dense_linear(x.data_ptr(), w.data_ptr(), kind, y.data_ptr(), 1, N, K, nt)
    return time.perf_counter() - t


rows = {k: [] for k in ("step", "native layers", "native head", "GEMVs alone (layers)", "GEMV alone (head)")}
eng.add_request(list(range(100, 164)), SamplingParams(temperature=0, max_tokens=40 * rounds + 8, ignore_eos=True))
for _ in range(4):
    eng.step()
hw = ws.pop()
for r in range(rounds):
    n = 8
    spent[:] = [0.0, 0.0]
    t = time.perf_counter()
    for _ in range(n):
        eng.step()
    rows["step"].append((time.perf_counter() - t) / n)
    rows["native layers"].append(spent[0] / n)
    rows["native head"].append(spent[1] / n)
    rows["GEMVs alone (layers)"].append(statistics.median(gemvs() for _ in range(4)))
    ws_, ws[:] = list(ws), [hw]
    rows["GEMV alone (head)"].append(statistics.median(gemvs() for _ in range(4)))
    ws[:] = ws_
med = {k: statistics.median(v) * 1000 for k, v in rows.items()}
med["layers outside their GEMVs"] = med["native layers"] - med["GEMVs alone (layers)"]
med["rest of the step (Python, sampling)"] = med["step"] - med["native layers"] - med["native head"]
for k, v in med.items():
    print(f"{dtype} threads={nt} {k}: {v:.2f} ms ({v / med['step']:.1%} of the step)")
