"""dense_linear.c's one-row loop with and without its software prefetch (``slimlm_dense_prefetch``:
bytes ahead, 0 off): SmolLM2-135M's layer shapes, LAYERS layers of distinct weights streamed from DRAM
(4 KiB pages), float32 (DT=fp32, kind 0) or bfloat16 widened (DT=bf16, kind 1); 1 x row, thread time,
7 interleaved rounds; outputs checked bitwise equal first.
Usage: THREADS=1 PF=0,2048,4096,8192 python docs/results/raw/ab_dense_prefetch.py"""
import os, time, statistics, torch
from slimlm import kernels
lib = kernels.load("decode_layer")
nt = int(os.environ.get("THREADS", "1"))
dt = torch.bfloat16 if os.environ.get("DT") == "bf16" else torch.float32
kind = 1 if dt == torch.bfloat16 else 0
shapes = [(960, 576), (576, 576), (3072, 576), (576, 1536)]
layers = [[torch.randn(N, K).to(dt) for N, K in shapes] for _ in range(int(os.environ.get("LAYERS", "10")))]
xs = {K: torch.randn(1, K) for _, K in shapes}
ys = {N: torch.empty(1, N) for N, _ in shapes}
def step():
    for L in layers:
        for w in L:
            N, K = w.shape
            assert lib.slimlm_dense_linear(xs[K].data_ptr(), w.data_ptr(), kind, ys[N].data_ptr(), 1, N, K, nt) == 0
PF = [int(v) for v in os.environ.get("PF", "0,4096").split(",")]
outs = {}
for pf in PF:
    lib.slimlm_dense_prefetch(pf)
    step()
    outs[pf] = {N: ys[N].clone() for N in ys}
assert all(torch.equal(outs[PF[0]][N], outs[p][N]) for p in PF for N in ys)
r = {p: [] for p in PF}
for _ in range(7):
    for p in PF:
        lib.slimlm_dense_prefetch(p)
        c = time.thread_time()
        for _ in range(2):
            step()
        r[p].append((time.thread_time() - c) / 2 * 1000)
lib.slimlm_dense_prefetch(4096)
nbytes = sum(w.numel() * w.element_size() for L in layers for w in L)
for p in PF:
    c = statistics.median(r[p])
    print(f"prefetch {p}: {c:.2f} ms thread per {nbytes / 2**20:.0f} MiB ({nbytes / c / 1e6:.1f} GB/s); "
          f"vs {PF[0]}: {statistics.median(a / b for a, b in zip(r[PF[0]], r[p])):.3f}x")
