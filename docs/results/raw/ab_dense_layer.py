"""Same-run A/B of dense weights through the native decode layers (kernels/dense_linear.c) and the
native LM head (model/quant/native_head.py), batch-1 greedy decode ms/step after a 64-token prompt,
alternating rounds in one process (at THREADS=1 CPU time of the thread, time.thread_time: time
spent descheduled does not count). Ratios only on a loaded machine.

  THREADS=1 python docs/results/raw/ab_dense_layer.py float32|bfloat16 [rounds]
      native layers + head vs the layer-by-layer PyTorch path and PyTorch's head (two engines);
      for bf16 also the two bf16 kernels (weights widened to fp32 vs vdpbf16ps on bf16-rounded x).
  THREADS=1 python docs/results/raw/ab_dense_layer.py float32|bfloat16 [rounds] --base REF
      this tree's decode_layer kernel vs the one at git ref REF (built from REF's sources with the
      same flags), swapped in one engine (same weights, same KV pool) every round. With --base-4k
      too, the base kernel runs on a second engine whose weights stay on 4 KiB pages (the state
      before huge_pages.py: the whole change of this tree vs REF).
  THREADS=1 python docs/results/raw/ab_dense_layer.py float32|bfloat16|int8|int4|gguf [rounds] --pages
      weights on 2 MiB pages (model/quant/huge_pages.py) vs SLIMLM_HUGE_PAGES=0, two engines."""
import ctypes, os, statistics, subprocess, sys, tempfile, time, torch
from pathlib import Path
from slimlm import LLM, SamplingParams, kernels
torch.set_num_threads(int(os.environ.get("THREADS", "2")))
clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter  # 1 thread: CPU time
args = [a for a in sys.argv[1:] if a not in ("--base", "--pages", "--base-4k")]
base_ref = sys.argv[sys.argv.index("--base") + 1] if "--base" in sys.argv else None
if base_ref:
    args.remove(base_ref)
dtype, rounds = args[0], int(args[1]) if len(args) > 1 else 5



def report(res: dict, base_key: str, base_name: str) -> None:
    """Median ms per step of each configuration and its speed-up over ``base_key``."""
    base = statistics.median(res[base_key])
    for k, v in res.items():
        m = statistics.median(v)
        print(f"{dtype} threads={torch.get_num_threads()} {k}: {m:.1f} ms/step {[round(x, 1) for x in v]}; "
              f"speed-up vs {base_name} {base / m:.2f}x")

def run(eng, n=32):
    eng.add_request(list(range(100, 164)), SamplingParams(temperature=0, max_tokens=n + 4, ignore_eos=True))
    for _ in range(4): eng.step()
    t = clock()
    for _ in range(n): eng.step()
    dt = (clock() - t) / n
    while eng.has_unfinished(): eng.step()
    return dt * 1000


def lib_at(ref):
    """decode_layer built from ``ref``'s kernel sources, with this tree's flags and signatures."""
    tmp = Path(tempfile.mkdtemp())
    root = Path(__file__).resolve().parents[3]
    for f in ["decode_layer.c", *kernels.INCLUDES["decode_layer"]]:
        src = subprocess.run(["git", "show", f"{ref}:src/slimlm/kernels/{f}"], cwd=root, capture_output=True, check=True)
        (tmp / f).write_bytes(src.stdout)
    subprocess.run(["cc", *kernels._flags(), str(tmp / "decode_layer.c"), "-o", str(tmp / "base.so"), "-lm"], check=True)
    lib = ctypes.CDLL(str(tmp / "base.so"))
    for fn, (res, argt) in kernels.SIGNATURES["decode_layer"].items():
        getattr(lib, fn).restype, getattr(lib, fn).argtypes = res, argt
    return lib


if "--pages" in sys.argv:
    kw = dict(dtype=dtype) if dtype in ("float32", "bfloat16") else dict(weights=dtype)
    engs = {"2M pages": LLM("smollm2-135m-instruct", kv_cache_bytes="64M", **kw).engine}
    os.environ["SLIMLM_HUGE_PAGES"] = "0"
    engs["4K pages (SLIMLM_HUGE_PAGES=0)"] = LLM("smollm2-135m-instruct", kv_cache_bytes="64M", **kw).engine
    del os.environ["SLIMLM_HUGE_PAGES"]
    for k, e in engs.items():
        r = e.runner
        print(k, "bytes moved to 2M pages: layers", r.native_layers.huge_bytes, "head", getattr(r.head, "huge_bytes", "-"))
    print("process AnonHugePages:", [x.strip() for x in open("/proc/self/smaps_rollup") if x.startswith("AnonHuge")])
    res = {k: [] for k in engs}
    for r in range(rounds):
        for k, e in engs.items():
            res[k].append(run(e))
    report(res, "4K pages (SLIMLM_HUGE_PAGES=0)", "4K pages")
    sys.exit()

if base_ref:
    eng = LLM("smollm2-135m-instruct", dtype=dtype, kv_cache_bytes="64M").engine
    base_eng = eng
    if "--base-4k" in sys.argv:
        os.environ["SLIMLM_HUGE_PAGES"] = "0"
        base_eng = LLM("smollm2-135m-instruct", dtype=dtype, kv_cache_bytes="64M").engine
        del os.environ["SLIMLM_HUGE_PAGES"]
    libs = {f"base {base_ref}": (base_eng, lib_at(base_ref)), "this tree": (eng, eng.runner.native_layers.lib)}
    res = {k: [] for k in libs}
    for r in range(rounds):
        for k, (e, lib) in libs.items():
            e.runner.native_layers.lib = e.runner.head.lib = lib
            res[k].append(run(e))
    base = statistics.median(res[f"base {base_ref}"])
    for k, v in res.items():
        m = statistics.median(v)
        print(f"{dtype} threads={torch.get_num_threads()} {k}: {m:.1f} ms/step {[round(x, 1) for x in v]}; "
              f"speed-up vs base {base / m:.2f}x")
    sys.exit()

new = LLM("smollm2-135m-instruct", dtype=dtype, kv_cache_bytes="64M").engine
os.environ["SLIMLM_DECODE_LAYER"] = os.environ["SLIMLM_NATIVE_HEAD"] = "0"
old = LLM("smollm2-135m-instruct", dtype=dtype, kv_cache_bytes="64M").engine
del os.environ["SLIMLM_DECODE_LAYER"], os.environ["SLIMLM_NATIVE_HEAD"]
native_head = new.runner.head
assert new.runner.native_layers is not None and old.runner.native_layers is None
arms = {"layer path": (old, "vnni", None), "native layers, torch head": (new, "fp32", new.model.head),
        "native layers + head": (new, "fp32", native_head)}
if dtype == "bfloat16":
    arms = {**arms, "native layers, torch head": (new, "vnni", new.model.head),
            "native layers + head": (new, "vnni", native_head), "native layers + head, bf16 widened": (new, "fp32", native_head)}
res = {k: [] for k in arms}
for r in range(rounds):
    for k, (eng, mode, head) in arms.items():
        os.environ["SLIMLM_QLINEAR"] = mode
        if head is not None:
            eng.runner.head = head
        res[k].append(run(eng))
report(res, "layer path", "layer path")
