"""Tried and not kept: the VNNI kernels computing 4 output rows side by side (one x load, 4 chains).
Same-process A/B of two builds of kernels/qlinear.c (old.so: one row at a time; new.so: the 4-row
version: `git show bc277cd:src/slimlm/kernels/qlinear.c`), built with
`cc -O3 -march=native -fopenmp -shared -fPIC -std=c11 X.c -o /tmp/ilp/X.so -lm`; 30 distinct copies of the four SmolLM2 layer
shapes so the weights stream from DRAM as in a real step; the order alternates per round."""
import ctypes, torch, time, statistics, sys
torch.set_num_threads(1)
P, I = ctypes.c_void_p, ctypes.c_int64
libs = {n: ctypes.CDLL(f"/tmp/ilp/{n}.so") for n in ("old", "new")}
for l in libs.values():
    l.slimlm_q8_linear_vnni.argtypes = [P, P, P, P, I, I, I, I, ctypes.c_int]
    l.slimlm_q4_linear_vnni.argtypes = [P, P, P, P, P, I, I, I, I, ctypes.c_int]
def call(lib, kind, x, q, s, mn, y, M, N, K, G, th=1):
    if kind == 8: return lib.slimlm_q8_linear_vnni(x.data_ptr(), q.data_ptr(), s.data_ptr(), y.data_ptr(), M, N, K, G, th)
    return lib.slimlm_q4_linear_vnni(x.data_ptr(), q.data_ptr(), s.data_ptr(), mn.data_ptr(), y.data_ptr(), M, N, K, G, th)
def case(kind, M, N, K, G):
    x = torch.randn(M, K)
    q = torch.randint(-127, 128, (N, K), dtype=torch.int8) if kind == 8 else torch.randint(0, 256, (N, K // 2), dtype=torch.uint8)
    s, mn = torch.rand(N, K // G), torch.randn(N, K // G)
    return x, q, s, mn
shapes = [(960, 576), (576, 576), (3072, 576), (576, 1536)]
for kind, G in [(4, 32), (8, 32), (8, None)]:
    cases = [(case(kind, 1, N, K, G or K), N, K) for _ in range(30) for N, K in shapes]  # 30 layers: DRAM-streamed
    res = {"old": [], "new": []}
    for r in range(7):
        for n, l in (list(libs.items())[::-1] if r % 2 else list(libs.items())):
            t = time.perf_counter()
            for (x, q, s, mn), N, K in cases:
                call(l, kind, x, q, s, mn, torch.empty(1, N), 1, N, K, G or K)
            res[n].append(time.perf_counter() - t)
    o, nw = statistics.median(res["old"]), statistics.median(res["new"])
    print(f"int{kind} G{G} 30 layers: old {o*1e3:.1f} ms new {nw*1e3:.1f} ms speed-up {o/nw:.3f}x")
