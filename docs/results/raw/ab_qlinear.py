"""Same-process interleaved A/B of the packed decode kernels: fp32 activations (SLIMLM_QLINEAR=fp32)
vs int8 activations + VNNI dot products (SLIMLM_QLINEAR=vnni). Part 1: the kernel alone on
SmolLM2-135M's shapes (N x K), M = 1 / 4 / 16 rows. Part 2: a batch-1 greedy decode step of the
default model with packed weights. Alternating rounds, medians; ratios are what to read on a
loaded machine.  Usage: THREADS=1 python ab_qlinear.py [kernel|decode|all] [ROUNDS]"""
import os, sys, time, statistics, torch
from slimlm.model.quant import quantize_int4, quantize_int8

torch.set_num_threads(int(os.environ.get("THREADS", "2")))
what = sys.argv[1] if len(sys.argv) > 1 else "all"
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 7
SHAPES = {"qkv 576x576": (576, 576), "kv 192x576": (192, 576), "gate_up 3072x576": (3072, 576),
          "down 576x1536": (576, 1536), "head 49152x576": (49152, 576)}


def timeit(fn, reps):
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps * 1e6


def ab(fn, reps):
    res = {"fp32": [], "vnni": []}
    for _ in range(rounds):
        for mode in ("fp32", "vnni"):
            os.environ["SLIMLM_QLINEAR"] = mode
            res[mode].append(timeit(fn, reps))
    return statistics.median(res["fp32"]), statistics.median(res["vnni"])


if what in ("kernel", "all"):
    torch.manual_seed(0)
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k) * 0.02
        for fmt, p in (("int8/channel", quantize_int8(w)), ("int8/g32 (Q8_0)", quantize_int8(w, 32)),
                       ("int4/g32 (Q4_1)", quantize_int4(w, 32))):
            for m in (1, 4, 16):
                x = torch.randn(m, k)
                reps = max(3, int(2e5 / (n * k / 1000 * m)))
                a, b = ab(lambda: p.matmul(x), reps)
                print(f"kernel {name:18s} {fmt:16s} M={m:2d}: fp32-act {a:8.1f} us  vnni {b:8.1f} us  "
                      f"speed-up {a / b:.2f}x", flush=True)

if what in ("decode", "all"):
    from slimlm import LLM, SamplingParams

    for weights in os.environ.get("WEIGHTS", "gguf,int4,int8").split(","):
        eng = LLM("smollm2-135m-instruct", dtype="float32", weights=weights, kv_cache_bytes="64M").engine

        def run(n=48):
            eng.add_request(list(range(100, 164)), SamplingParams(temperature=0, max_tokens=n + 4, ignore_eos=True))
            for _ in range(4):
                eng.step()
            t = time.perf_counter()
            for _ in range(n):
                eng.step()
            dt = (time.perf_counter() - t) / n
            while eng.has_unfinished():
                eng.step()
            return dt * 1000

        res = {"fp32": [], "vnni": []}
        for _ in range(rounds):
            for mode in ("fp32", "vnni"):
                os.environ["SLIMLM_QLINEAR"] = mode
                res[mode].append(run())
        a, b = statistics.median(res["fp32"]), statistics.median(res["vnni"])
        print(f"decode {weights}: fp32-act {a:.2f} ms/step {[round(v, 1) for v in res['fp32']]}; "
              f"vnni {b:.2f} ms/step {[round(v, 1) for v in res['vnni']]}; speed-up {a / b:.3f}x", flush=True)
        del eng
