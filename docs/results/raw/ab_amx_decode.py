"""Same-process A/B of the bf16 decode projections on AMX tiles (kernels/dense_linear.c, kind 2)
against the AVX-512 vdpbf16ps loops they replace: ``SLIMLM_AMX=0`` is read at every call, so one
engine serves both, alternating round by round (docs/benchmarks.md, "session 12: AMX decode
projections"). CPU time of the calling thread (time.thread_time) at THREADS=1; medians.

  batch-1  greedy decode ms/step after a 64-token prompt, one engine, SLIMLM_AMX switched step by
           step (ABBA), 200 steps, medians; the weights (SmolLM2-135M bf16, 212 MB of projections)
           streamed from DRAM every step
  replay   the `slimlm bench throughput` workload's all-decode steps (NUM_PROMPTS mixed prompts,
           128 new tokens each, recorded as decode_rows_split.py records them), STEPS of them
           evenly spaced replayed: the whole native call, and the four projections alone
           (slimlm_dense_linear at the step's M), scaled to all the workload's rows

  THREADS=1 python docs/results/raw/ab_amx_decode.py [rounds] [steps] [num_prompts]
"""
import os, statistics, sys, time

import torch

torch.set_num_threads(int(os.environ.get("THREADS", "1")))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import engine_ab  # noqa: E402
from slimlm import LLM, SamplingParams  # noqa: E402
from slimlm.model.hub import load  # noqa: E402

rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
n_steps = int(sys.argv[2]) if len(sys.argv) > 2 else 8
n_prompts = int(sys.argv[3]) if len(sys.argv) > 3 else 24
lm = load("smollm2-135m-instruct", dtype="bfloat16")
eng = LLM(lm, dtype="bfloat16").engine
nl = eng.runner.native_layers
assert nl is not None and nl.lib.slimlm_dense_has_amx(), "native layers with AMX needed"
lib, nt = nl.lib, torch.get_num_threads()
MODES = {"avx512": "0", "amx": "1"}


def batch1(n=200):
    """CPU ms of each batch-1 decode step, SLIMLM_AMX switched per step (ABBA: neighbours share the load)"""
    t = {m: [] for m in MODES}
    eng.add_request(list(range(100, 164)), SamplingParams(temperature=0, max_tokens=n + 4, ignore_eos=True))
    for _ in range(4):
        eng.step()
    for i in range(n):
        m = list(MODES)[(i + i // 2) % 2]
        os.environ["SLIMLM_AMX"] = MODES[m]
        c = time.thread_time()
        eng.step()
        t[m].append((time.thread_time() - c) * 1000)
    while eng.has_unfinished():
        eng.step()
    return t


llm = LLM(lm, dtype="bfloat16")
recorded = engine_ab.record_decode_calls(llm, lm.tokenizer, n_prompts)
nl2 = llm.engine.runner.native_layers
total_rows = sum(r[0].shape[0] for r in recorded)
picked = [recorded[i * len(recorded) // n_steps] for i in range(n_steps)]
f = total_rows / sum(s[0].shape[0] for s in picked)
L, (D, Hq, Hkv, d, I) = nl2.num_layers, (nl2.dims[0], nl2.dims[1], nl2.dims[2], nl2.dims[3], nl2.dims[4])
shapes = [(Hq * d + 2 * Hkv * d, D), (D, Hq * d), (2 * I, D), (D, I)]  # qkv, o, gate_up, down: (N, K)
P = 2 + 4 * 4 + 2 + 5  # NPTR
nl2._set_mode()


def whole(s):
    h, first, last, cos, sin, slots, table, lens = s
    h = h.clone()
    nl2.dims[7] = table.shape[1]
    c = time.thread_time()
    rc = lib.slimlm_decode_layers(h.data_ptr(), h.shape[0], first, last, nl2.dims, nl2.ptrs, nl2.desc,
                                  cos.data_ptr(), sin.data_ptr(), slots.data_ptr(), table.data_ptr(),
                                  lens.data_ptr(), nl2.eps, nl2.scale, nt)
    assert rc == 0, rc
    return time.thread_time() - c


def linears(s):
    M = s[0].shape[0]
    xs = [torch.randn(M, K) for _, K in shapes]
    y = torch.empty(M, max(N for N, _ in shapes))
    t = 0.0
    for i in range(s[1], s[2]):
        for j, (N, K) in enumerate(shapes):
            assert nl2.desc[(i * 4 + j) * 3] == 3 and nl2.desc[(i * 4 + j) * 3 + 2] == 1  # bf16, vdpbf16ps kind
            c = time.thread_time()
            assert not lib.slimlm_dense_linear(xs[j].data_ptr(), nl2.ptrs[i * P + 2 + 4 * j], 2, y.data_ptr(), M, N,
                                               K, nt)
            t += time.thread_time() - c
    return t


res = {(k, m): [] for k in ("batch-1 ms/step", "replay whole s", "replay linear s") for m in MODES}
for m, t in batch1().items():
    res["batch-1 ms/step", m] = t  # medians over the steps (no rounds)
for r in range(rounds):
    for m in (list(MODES) if r % 2 == 0 else list(MODES)[::-1]):
        os.environ["SLIMLM_AMX"] = MODES[m]
        res["replay whole s", m].append(sum(whole(s) for s in picked) * f)
        res["replay linear s", m].append(sum(linears(s) for s in picked) * f)
flops = 2.0 * sum(N * K for N, K in shapes) * L * total_rows
print(f"bf16 threads={nt}: {len(recorded)} all-decode calls, {total_rows} rows ({n_prompts} prompts); replayed "
      f"{n_steps} (rows {[s[0].shape[0] for s in picked]}), scaled x{f:.1f}; medians of {rounds} rounds (CPU s)")
for k in ("batch-1 ms/step", "replay whole s", "replay linear s"):
    a, b = statistics.median(res[k, "avx512"]), statistics.median(res[k, "amx"])
    extra = f"  GFLOPS {flops / a / 1e9:.0f} -> {flops / b / 1e9:.0f}" if k == "replay linear s" else ""
    per = "" if k.startswith("batch-1") else \
        f"   (avx512 {[round(x, 2) for x in res[k, 'avx512']]}, amx {[round(x, 2) for x in res[k, 'amx']]})"
    print(f"  {k:16s} avx512 {a:8.2f}  amx {b:8.2f}  amx/avx512 {b / a:.3f}{extra}{per}")
