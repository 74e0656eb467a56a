"""Where the native decode layers' time goes in multi-row all-decode steps (docs/benchmarks.md,
"session 11: all-decode steps"): the `slimlm bench throughput` workload through one engine (as
throughput_split.py), every all-decode step's arguments to NativeDecodeLayers.run recorded; then
``steps`` of them, evenly spaced, replayed against the engine's own weights and pools:

  whole      slimlm_decode_layers (every layer, one call, as in the step)
  in / out   the two halves per layer (slimlm_decode_layer_in / _out) and, between them,
             slimlm_paged_decode: the sum is the whole call split three ways
  linear     each layer's four projections alone (slimlm_dense_linear, the step's M and kinds)
  attention  slimlm_paged_decode alone (the step's tables and lengths)
  in - qkv linear = RMSNorm, RoPE, KV write; out - o, gate/up, down linear = residuals, RMSNorm,
  SwiGLU (plus the halves' scratch allocation).

CPU time of the calling thread (time.thread_time) at THREADS=1, totals over the replayed steps,
then scaled to all the workload's all-decode steps by their rows (each replayed step's time / its
rows x all rows). Rounds interleave the parts; medians.

  THREADS=1 python docs/results/raw/decode_rows_split.py float32|bfloat16 [steps] [rounds] [num_prompts]
"""
import ctypes, os, statistics, sys, time

import torch

torch.set_num_threads(int(os.environ.get("THREADS", "1")))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import engine_ab  # noqa: E402
from slimlm import LLM  # noqa: E402
from slimlm.kernels import SIGNATURES  # noqa: E402
from slimlm.model.hub import load  # noqa: E402

dtype = sys.argv[1]
n_steps = int(sys.argv[2]) if len(sys.argv) > 2 else 12
rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 3
n_prompts = int(sys.argv[4]) if len(sys.argv) > 4 else 64
lm = load("smollm2-135m-instruct", dtype=dtype)
llm = LLM(lm, dtype=dtype)
eng = llm.engine
nl = eng.runner.native_layers
assert nl is not None, "the native decode layers do not serve this model"
lib, nt = nl.lib, torch.get_num_threads()
res, args = SIGNATURES["paged_decode"]["slimlm_paged_decode"]
lib.slimlm_paged_decode.restype, lib.slimlm_paged_decode.argtypes = res, args  # paged_decode.c, included

recorded = engine_ab.record_decode_calls(llm, lm.tokenizer, n_prompts)
total_rows = sum(r[0].shape[0] for r in recorded)
picked = [recorded[i * len(recorded) // n_steps] for i in range(n_steps)]
print(f"{dtype} threads={nt}: {len(recorded)} native calls, {total_rows} rows; replaying {n_steps} "
      f"(rows {[r[0].shape[0] for r in picked]}, mean context "
      f"{statistics.mean(float(r[7].float().mean()) for r in picked):.0f})")

L, (D, Hq, Hkv, d, I) = nl.num_layers, (nl.dims[0], nl.dims[1], nl.dims[2], nl.dims[3], nl.dims[4])
shapes = [(Hq * d + 2 * Hkv * d, D), (D, Hq * d), (2 * I, D), (D, I)]  # qkv, o, gate_up, down: (N, K)
P = 2 + 4 * 4 + 2 + 5  # NPTR
nl._set_mode()
ptr = lambda j: nl.ptrs[j]  # noqa: E731


def whole(s):
    h, first, last, cos, sin, slots, table, lens = s
    h = h.clone()
    nl.dims[7] = table.shape[1]
    rc = lib.slimlm_decode_layers(h.data_ptr(), h.shape[0], first, last, nl.dims, nl.ptrs, nl.desc, cos.data_ptr(),
                                  sin.data_ptr(), slots.data_ptr(), table.data_ptr(), lens.data_ptr(), nl.eps,
                                  nl.scale, nt)
    assert rc == 0, rc


def halves(s, t):
    """the whole call as in / attention / out per layer; t accumulates the three parts"""
    h, first, last, cos, sin, slots, table, lens = s
    h, M = h.clone(), h.shape[0]
    q, att = torch.empty(M, Hq * d), torch.empty(M, Hq * d)
    nl.dims[7] = table.shape[1]
    for i in range(first, last):
        c = time.thread_time()
        assert not lib.slimlm_decode_layer_in(h.data_ptr(), M, i, nl.dims, nl.ptrs, nl.desc, cos.data_ptr(),
                                              sin.data_ptr(), slots.data_ptr(), q.data_ptr(), nl.eps, nt)
        c1 = time.thread_time()
        p = [ptr(i * P + j) for j in range(18, 24)]
        assert not attend(q, att, table, lens, p)
        c2 = time.thread_time()
        assert not lib.slimlm_decode_layer_out(h.data_ptr(), M, i, nl.dims, nl.ptrs, nl.desc, att.data_ptr(),
                                               nl.eps, nt)
        c3 = time.thread_time()
        t["in"] += c1 - c
        t["attention (in the halves)"] += c2 - c1
        t["out"] += c3 - c2


def attend(q, att, table, lens, p):
    return lib.slimlm_paged_decode(q.data_ptr(), p[0], p[1], p[2], p[3], p[4], p[5], nl.dims[6], table.data_ptr(),
                                   lens.data_ptr(), att.data_ptr(), None, q.shape[0], Hq, Hkv, d, nl.dims[5],
                                   table.shape[1], nl.scale, nt)


def linears(s, t):
    M = s[0].shape[0]
    xs = [torch.randn(M, K) for _, K in shapes]
    y = torch.empty(M, max(N for N, _ in shapes))
    for i in range(s[1], s[2]):
        for j, (N, K) in enumerate(shapes):
            kind = {2: 0, 3: 2 if nl.desc[(i * 4 + j) * 3 + 2] else 1}[nl.desc[(i * 4 + j) * 3]]
            c = time.thread_time()
            assert not lib.slimlm_dense_linear(xs[j].data_ptr(), ptr(i * P + 2 + 4 * j), kind, y.data_ptr(), M, N, K, nt)
            t[("qkv", "o", "gate_up", "down")[j] + " linear"] += time.thread_time() - c


def attention(s, t):
    h, first, last, cos, sin, slots, table, lens = s
    M = h.shape[0]
    q, att = torch.randn(M, Hq * d), torch.empty(M, Hq * d)
    nl.dims[7] = table.shape[1]
    for i in range(first, last):
        c = time.thread_time()
        assert not attend(q, att, table, lens, [ptr(i * P + j) for j in range(18, 24)])
        t["attention alone"] += time.thread_time() - c


per_round = []
for r in range(rounds):
    t = {k: 0.0 for k in ("whole", "in", "attention (in the halves)", "out", "qkv linear", "o linear",
                          "gate_up linear", "down linear", "attention alone")}
    for s in picked:
        c = time.thread_time()
        whole(s)
        t["whole"] += time.thread_time() - c
        halves(s, t)
        linears(s, t)
        attention(s, t)
    per_round.append(t)
med = {k: statistics.median(t[k] for t in per_round) for k in per_round[0]}
picked_rows = sum(s[0].shape[0] for s in picked)
f = total_rows / picked_rows
lin = sum(med[k] for k in med if k.endswith("linear"))
flops = 2.0 * sum(N * K for N, K in shapes) * L * total_rows
print(f"scaled to the workload's {total_rows} rows (x{f:.1f} the replayed {picked_rows}); medians of {rounds} rounds")
for k, v in med.items():
    print(f"  {k:28s} {v * f:6.1f} s")
print(f"  {'linear (4 projections)':28s} {lin * f:6.1f} s  ({flops / (lin * f) / 1e9:.0f} GFLOPS)")
print(f"  {'in - qkv linear':28s} {(med['in'] - med['qkv linear']) * f:6.1f} s  (RMSNorm, RoPE, KV write)")
print(f"  {'out - o, gate_up, down':28s} "
      f"{(med['out'] - med['o linear'] - med['gate_up linear'] - med['down linear']) * f:6.1f} s  "
      f"(residuals, RMSNorm, SwiGLU)")
