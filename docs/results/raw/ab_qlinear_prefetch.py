"""qlinear.c's VNNI decode loops, modes of ``slimlm_qlinear_fast``: 0 the original loops, 1 the
restructured ones, 2 (default) those with software prefetch. Kernel calls on SmolLM2-135M's layer
shapes (q/k/v 960x576, o 576x576, gate/up 3072x576, down 576x1536) over 30 layers of distinct
weights, so they stream from DRAM as in a decode step (int4 g32, fp16 scales / minimums, 63 MiB), or
int8 (Q8_0: g32 fp16 scales) with the 49152x576 head; 1 x row, thread time, 9 interleaved rounds.
Outputs checked bitwise equal across the modes first.
Usage: THREADS=1 python docs/results/raw/ab_qlinear_prefetch.py int4   (or q80)"""
import os, sys, time, statistics, torch
from slimlm import kernels
from slimlm.model.quant.formats import Int8Weight, quantize_int4, quantize_int8, scale_flags
torch.manual_seed(0)
lib = kernels.load("qlinear")
nt = int(os.environ.get("THREADS", "1"))
kind = sys.argv[1] if len(sys.argv) > 1 else "int4"
shapes = [(960, 576), (576, 576), (3072, 576), (576, 1536)]
if kind == "int4":
    layers = [[quantize_int4(torch.randn(N, K) * 0.05, 32) for N, K in shapes] for _ in range(30)]
else:
    def q80(w):
        p = quantize_int8(w, 32)
        return Int8Weight(p.q, p.scale.half(), 32)
    layers = [[q80(torch.randn(N, K) * 0.05) for N, K in shapes] for _ in range(10)] + [[q80(torch.randn(49152, 576))]]
xs = {K: torch.randn(1, K) for L in layers for p in L for K in [p.shape[1]]}
def call(p, y):
    N, K = p.shape
    t = p.tensors()
    if p.kind == "int4":
        return lib.slimlm_q4_linear_vnni(xs[K].data_ptr(), p.q.data_ptr(), p.scale.data_ptr(), p.min.data_ptr(),
                                         y.data_ptr(), 1, N, K, 32, scale_flags(t), nt)
    return lib.slimlm_q8_linear_vnni(xs[K].data_ptr(), p.q.data_ptr(), p.scale.data_ptr(), y.data_ptr(), 1, N, K,
                                     p.group_size, scale_flags(t), nt)
ys = [[torch.empty(1, p.shape[0]) for p in L] for L in layers]
def step():
    for L, Y in zip(layers, ys):
        for p, y in zip(L, Y):
            assert call(p, y) == 0
outs = {}
for f in (0, 1, 2):
    lib.slimlm_qlinear_fast(f)
    step()
    outs[f] = [y.clone() for Y in ys for y in Y]
assert all(torch.equal(a, b) for f in (1, 2) for a, b in zip(outs[0], outs[f])), "modes differ"
r = {f: [] for f in (0, 1, 2)}
for _ in range(9):
    for f in r:
        lib.slimlm_qlinear_fast(f)
        c = time.thread_time()
        for _ in range(3):
            step()
        r[f].append((time.thread_time() - c) / 3 * 1000)
lib.slimlm_qlinear_fast(2)
nbytes = sum(p.nbytes() for L in layers for p in L)
for f in r:
    c = statistics.median(r[f])
    print(f"{kind} mode {f}: {c:.2f} ms thread time per pass over {nbytes / 2**20:.0f} MiB ({nbytes / c / 1e6:.1f} GB/s); "
          f"vs mode 0 {statistics.median(a / b for a, b in zip(r[0], r[f])):.3f}x (median of paired rounds)")
