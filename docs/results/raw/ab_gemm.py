"""Same-run A/B of the native GEMM (kernels/gemm.c through slimlm.kernels.gemm.linear) against
PyTorch's F.linear, at SmolLM2-135M's projection shapes (m = rows, k = in, n = out), float32 and
bfloat16, each thread count; rounds alternate the two, medians of GFLOPS. For float32 also oneDNN's
prepacked linear (torch.ops.mkldnn._linear_pointwise on a reordered weight), where it runs.

  python docs/results/raw/ab_gemm.py [rounds] [threads ...] [--cpu] [--shapes | --dense]   (default: 5 rounds, 1 and 2 threads)

On a loaded machine the ratios are what to read."""
import statistics, sys, time
import torch
import torch.nn.functional as F
from slimlm.kernels import gemm

rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
threads = [int(a) for a in sys.argv[2:] if not a.startswith("--")] or [1, 2]
SHAPES = [(2048, 576, 960), (2048, 576, 576), (2048, 576, 3072), (2048, 1536, 576), (2048, 576, 1536),
          (512, 576, 3072), (64, 576, 1536), (64, 576, 3072), (16, 576, 3072), (2, 576, 3072)]


CLOCK = time.thread_time if "--cpu" in sys.argv else time.process_time if "--proc" in sys.argv else time.perf_counter
"""--cpu (1 thread only): the calling thread's CPU time, not wall time; on a loaded machine the time
the kernel was descheduled then does not count (caches and clocks are still shared). --proc: the
process's CPU time / threads (OpenMP threads spinning at a barrier count: a lower bound of the rate)."""


def rate(fn, flops, reps):
    fn()
    t = CLOCK()
    for _ in range(reps):
        fn()
    return flops * reps / (CLOCK() - t) / 1e9 * (torch.get_num_threads() if CLOCK is time.process_time else 1)


def mkldnn_fn(x, w):
    try:
        wp = torch.ops.mkldnn._reorder_linear_weight(w, x.shape[0])
        f = lambda: torch.ops.mkldnn._linear_pointwise(x, wp, None, "none", [], "")
        if (f() - F.linear(x, w)).abs().max() > 1e-2 * w.shape[1] ** 0.5:
            return None
        return f
    except Exception as e:  # noqa: BLE001 (not built / not this dtype)
        print(f"  (oneDNN prepacked linear unavailable: {type(e).__name__}: {str(e)[:80]})")
        return None


if "--shapes" in sys.argv:  # the four prefill shapes only
    SHAPES = SHAPES[:4]
if "--dense" in sys.argv:  # decode-step row counts: against kernels/dense_linear.c
    SHAPES = [(mm, 576, n) for mm in (16, 32, 64) for n in (960, 3072)] + [(64, 1536, 576)]
for nt in threads:
    torch.set_num_threads(nt)
    for dt in (torch.float32, torch.bfloat16):
        if not gemm.supported(dt):
            print(f"{dt}: native GEMM not built here")
            continue
        for m, k, n in SHAPES:
            torch.manual_seed(0)
            x, w = torch.randn(m, k, dtype=dt), torch.randn(n, k, dtype=dt) / k ** 0.5
            flops = 2.0 * m * k * n
            reps = max(1, int(2e9 / flops / nt))
            fns = {"torch": lambda: F.linear(x, w), "native": lambda: gemm.linear(x, w)}
            if "--dense" in sys.argv and m <= 64:  # the native decode layers' GEMV (kernels/dense_linear.c)
                from slimlm import kernels
                lib = kernels.load("decode_layer")
                kind = 0 if dt == torch.float32 else 2 if lib.slimlm_dense_has_dpbf16() else 1
                xf, yf = x.float().contiguous(), torch.empty(m, n)
                fns["dense_linear"] = lambda: lib.slimlm_dense_linear(xf.data_ptr(), w.data_ptr(), kind, yf.data_ptr(),
                                                                      m, n, k, nt)
            if dt == torch.float32 and "--dense" not in sys.argv:
                f = mkldnn_fn(x, w)
                if f is not None:
                    fns["onednn-packed"] = f
            res = {key: [] for key in fns}
            for _ in range(rounds):
                for key, fn in fns.items():
                    res[key].append(rate(fn, flops, reps))
            med = {key: statistics.median(v) for key, v in res.items()}
            err = (gemm.linear(x, w).float() - F.linear(x.float(), w.float())).abs().max().item()
            print(f"threads={nt} {str(dt)[6:]} m={m} k={k} n={n}: " +
                  ", ".join(f"{key} {v:.0f}" for key, v in med.items()) +
                  f" GFLOPS; native/torch {med['native'] / med['torch']:.2f}x; max|err| vs fp32 {err:.2e}", flush=True)
