"""slimlm_dense_linear alone, this tree vs the kernel at a git ref (default 088ae9f: 4 rows side by
side for every x row), on SmolLM2-135M's 30 layers of shapes (random weights, streamed from DRAM as
in a step), M = 1 / 4 / 16 / 64 x rows (or the comma-separated list MS), 1 thread, alternating
rounds, medians of CPU time (time.thread_time). Loaded machine: ratios only.
  python docs/results/raw/ab_dense_rows.py bf16|fp32|bf16w [REF] [MS]   (bf16w: bf16 widened, kind 1)"""
import ctypes, subprocess, tempfile, time, statistics, sys, torch
from pathlib import Path
from slimlm import kernels
torch.set_num_threads(1)
def lib_at(ref):
    tmp = Path(tempfile.mkdtemp())
    for f in ["decode_layer.c", *kernels.INCLUDES["decode_layer"]]:
        src = subprocess.run(["git", "show", f"{ref}:src/slimlm/kernels/{f}"], cwd=Path(__file__).resolve().parents[3],
                             capture_output=True, check=True)
        (tmp / f).write_bytes(src.stdout)
    subprocess.run(["cc", *kernels._flags(), str(tmp / "decode_layer.c"), "-o", str(tmp / "b.so"), "-lm"], check=True)
    lib = ctypes.CDLL(str(tmp / "b.so"))
    for fn, (res, argt) in kernels.SIGNATURES["decode_layer"].items():
        getattr(lib, fn).restype, getattr(lib, fn).argtypes = res, argt
    return lib
libs = {"old": lib_at(sys.argv[2] if len(sys.argv) > 2 else "088ae9f"), "new": kernels.load("decode_layer")}
dt = torch.float32 if sys.argv[1] == "fp32" else torch.bfloat16
kind = {"bf16": 2, "fp32": 0, "bf16w": 1}[sys.argv[1]]
shapes = [(960, 576), (576, 576), (3072, 576), (576, 1536)] * 30
ws = [torch.randn(s, dtype=torch.float32).to(dt) for s in shapes]
for M in (map(int, sys.argv[3].split(",")) if len(sys.argv) > 3 else (1, 4, 16, 64)):
    x = torch.randn(M, 1536); y = torch.empty(M, 3072)
    res = {k: [] for k in libs}
    for r in range(5):
        for k, lib in libs.items():
            t = time.thread_time()
            for w in ws:
                N, K = w.shape
                lib.slimlm_dense_linear(x.data_ptr(), w.data_ptr(), kind, y.data_ptr(), M, N, K, 1)
            res[k].append(time.thread_time() - t)
    o, n = statistics.median(res["old"]) * 1e3, statistics.median(res["new"]) * 1e3
    print(f"{sys.argv[1]} M={M}: old {o:.1f} ms, new {n:.1f} ms, new speed-up {o / n:.2f}x")
