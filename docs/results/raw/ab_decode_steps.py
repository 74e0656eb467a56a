"""The throughput workload's all-decode steps replayed through two builds of the native decode
layers in one process (docs/benchmarks.md, "session 13: decode steps on the AMX machine"): the
`slimlm bench throughput` workload (NUM_PROMPTS mixed prompts, 128 new tokens each) through one
engine, every all-decode step's arguments to NativeDecodeLayers.run recorded (as
decode_rows_split.py records them); then STEPS of them, evenly spaced, replayed against the
engine's own weights and pools with the decode_layer kernel built from git revision REV ("old")
and from the working tree ("new"), rounds interleaved (ABBA), CPU time of the calling thread
(time.thread_time) at THREADS=1, medians, scaled to all the workload's all-decode rows:

  whole      slimlm_decode_layers, every layer in one call (as in the step)
  attention  slimlm_paged_decode inside the per-layer halves (slimlm_decode_layer_in / _out of the
             same build: the step's own queries), timed alone
  rest       whole - attention (projections, norms, RoPE, KV write, SwiGLU, residuals)

Also the two builds' outputs on the first replayed step (max |old - new| of the final hidden states).

  THREADS=1 python docs/results/raw/ab_decode_steps.py REV [dtype] [rounds] [steps] [num_prompts]
"""
import ctypes, os, statistics, sys, tempfile, time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
torch.set_num_threads(int(os.environ.get("THREADS", "1")))
import engine_ab  # noqa: E402
import kernel_rev  # noqa: E402
from slimlm import LLM  # noqa: E402
from slimlm.kernels import SIGNATURES  # noqa: E402
from slimlm.model.hub import load  # noqa: E402

rev = sys.argv[1]
dtype = sys.argv[2] if len(sys.argv) > 2 else "bfloat16"
rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 4
n_steps = int(sys.argv[4]) if len(sys.argv) > 4 else 8
n_prompts = int(sys.argv[5]) if len(sys.argv) > 5 else 24
lm = load("smollm2-135m-instruct", dtype=dtype)
llm = LLM(lm, dtype=dtype)
nl = llm.engine.runner.native_layers
assert nl is not None, "the native decode layers do not serve this model"
nt = torch.get_num_threads()

recorded = engine_ab.record_decode_calls(llm, lm.tokenizer, n_prompts)
total_rows = sum(r[0].shape[0] for r in recorded)
picked = [recorded[i * len(recorded) // n_steps] for i in range(n_steps)]
f = total_rows / sum(s[0].shape[0] for s in picked)
Hq, Hkv, d = nl.dims[1], nl.dims[2], nl.dims[3]
P = 2 + 4 * 4 + 2 + 5  # NPTR
nl._set_mode()


def whole(lib, s):
    h, first, last, cos, sin, slots, table, lens = s
    h = h.clone()
    nl.dims[7] = table.shape[1]
    c = time.thread_time()
    rc = lib.slimlm_decode_layers(h.data_ptr(), h.shape[0], first, last, nl.dims, nl.ptrs, nl.desc, cos.data_ptr(),
                                  sin.data_ptr(), slots.data_ptr(), table.data_ptr(), lens.data_ptr(), nl.eps,
                                  nl.scale, nt)
    assert rc == 0, rc
    return time.thread_time() - c, h


def attention(lib, s):
    """the step as per-layer halves; CPU time of the attention calls alone"""
    h, first, last, cos, sin, slots, table, lens = s
    h, M = h.clone(), h.shape[0]
    q, att = torch.empty(M, Hq * d), torch.empty(M, Hq * d)
    nl.dims[7] = table.shape[1]
    t = 0.0
    for i in range(first, last):
        assert not lib.slimlm_decode_layer_in(h.data_ptr(), M, i, nl.dims, nl.ptrs, nl.desc, cos.data_ptr(),
                                              sin.data_ptr(), slots.data_ptr(), q.data_ptr(), nl.eps, nt)
        p = [nl.ptrs[i * P + j] for j in range(18, 24)]
        c = time.thread_time()
        assert not lib.slimlm_paged_decode(q.data_ptr(), p[0], p[1], p[2], p[3], p[4], p[5], nl.dims[6],
                                           table.data_ptr(), lens.data_ptr(), att.data_ptr(), None, M, Hq, Hkv, d,
                                           nl.dims[5], table.shape[1], nl.scale, nt)
        t += time.thread_time() - c
        assert not lib.slimlm_decode_layer_out(h.data_ptr(), M, i, nl.dims, nl.ptrs, nl.desc, att.data_ptr(),
                                               nl.eps, nt)
    return t


with tempfile.TemporaryDirectory() as tmp:
    libs = {"old": kernel_rev.build("decode_layer", rev, Path(tmp)),
            "new": kernel_rev.build("decode_layer", None, Path(tmp))}
    res, args = SIGNATURES["paged_decode"]["slimlm_paged_decode"]
    for lib in libs.values():
        lib.slimlm_paged_decode.restype, lib.slimlm_paged_decode.argtypes = res, args  # paged_decode.c, included
    diff = (whole(libs["old"], picked[0])[1] - whole(libs["new"], picked[0])[1]).abs().max().item()
    T = {(k, p): [] for k in libs for p in ("whole", "attention")}
    for r in range(rounds):
        for k in (("old", "new") if r % 2 == 0 else ("new", "old")):
            T[k, "whole"].append(sum(whole(libs[k], s)[0] for s in picked) * f)
            T[k, "attention"].append(sum(attention(libs[k], s) for s in picked) * f)
med = {kp: statistics.median(v) for kp, v in T.items()}
print(f"{dtype} threads={nt}: {len(recorded)} all-decode calls, {total_rows} rows ({n_prompts} prompts); replayed "
      f"{n_steps} (rows {[s[0].shape[0] for s in picked]}), scaled x{f:.1f}; medians of {rounds} rounds, CPU s; "
      f"old = {rev}; max |old - new| hidden {diff:.3g}; new AMX decode: {libs['new'].slimlm_decode_amx()}")
for p in ("whole", "attention", "rest"):
    a = med["old", "whole"] - med["old", "attention"] if p == "rest" else med["old", p]
    b = med["new", "whole"] - med["new", "attention"] if p == "rest" else med["new", p]
    per = "" if p == "rest" else f"   (old {[round(x, 2) for x in T['old', p]]}, new {[round(x, 2) for x in T['new', p]]})"
    print(f"  {p:10s} old {a:7.2f}  new {b:7.2f}  old/new {a / b:.2f}x{per}")
