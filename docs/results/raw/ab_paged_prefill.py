"""Same-process A/B of the native prefill kernel (kernels/paged_prefill.c) at the throughput
workload's shapes: a baseline build of the kernel from a git revision against this tree's build,
on the same random pools, queries and block tables, rounds interleaved (A, B, A, B, ...).

The shapes are the workload's prefill chunks (T query rows at storage index q_start), the
(T, q_start) of every ``native_prefill`` call that `slimlm bench throughput`'s 64 mixed prompts
make per layer, bf16, prefix caching on (recorded with SmolLM2-135M: 9 query heads, 3 KV heads,
d = 64, block size 16): 85 chunks, 43,617 rows. One round = every chunk once (one layer).
GFLOPS count causal work only: 4 d Hq (q_start + t + 1) per query row t (scores and P V).
Times are CPU time of this thread at 1 thread (time.thread_time), medians over rounds.

  python docs/results/raw/ab_paged_prefill.py [--base REV] [--dtype bfloat16|float32] [--rounds 5]
                                              [--shapes FILE.json]"""
import argparse, ctypes, json, os, statistics, tempfile, time
from pathlib import Path

import torch

from slimlm import kernels
from slimlm.kernels.ops import NATIVE_DTYPES
import kernel_rev  # docs/results/raw/kernel_rev.py

HERE = Path(__file__).resolve()
REPO = HERE.parents[3]
SHAPES = HERE.with_name("prefill_shapes_throughput.json")

ap = argparse.ArgumentParser()
ap.add_argument("--base", default="HEAD", help="git revision of the baseline kernel")
ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
ap.add_argument("--rounds", type=int, default=5)
ap.add_argument("--shapes", default=str(SHAPES))
a = ap.parse_args()
torch.set_num_threads(1)
dtype = getattr(torch, a.dtype)
code = NATIVE_DTYPES[dtype]


def build(rev: str | None, tmp: Path) -> ctypes.CDLL:
    """paged_prefill compiled from revision ``rev`` (None: the working tree), as kernels.load builds it."""
    return kernel_rev.build("paged_prefill", rev, tmp)


shapes = [tuple(s) for s in json.loads(Path(a.shapes).read_text())]
Hq, Hkv, d, bs = 9, 3, 64, 16
cases, flops = kernel_rev.prefill_cases(shapes, dtype, Hq, Hkv, d, bs)


def run(lib) -> float:
    t = time.thread_time()
    for q, kp, vp, table, q0, out in cases:
        rc = lib.slimlm_paged_prefill(q.data_ptr(), q.stride(0), q.stride(1), kp.data_ptr(), vp.data_ptr(), code,
                                      table.data_ptr(), q0, out.data_ptr(), out.stride(0), out.stride(1),
                                      q.shape[0], Hq, Hkv, d, bs, 0.125, 1)
        assert rc == 0, rc
    return time.thread_time() - t


with tempfile.TemporaryDirectory() as tmp:
    libs = {f"base {a.base}": build(a.base, Path(tmp)), "tree": build(None, Path(tmp))}
    outs = {}
    for name, lib in libs.items():  # warm-up, and each build's outputs for the comparison below
        run(lib)
        outs[name] = [c[5].float().clone() for c in cases]
    diff = max(float((x - y).abs().max()) for x, y in zip(*outs.values()))
    times = {name: [] for name in libs}
    for _ in range(a.rounds):
        for name, lib in libs.items():
            times[name].append(run(lib))
print(f"{a.dtype}: {len(shapes)} chunks, {sum(t for t, _ in shapes)} rows, {flops / 1e9:.1f} GFLOP per round; "
      f"CPU time at 1 thread, median of {a.rounds} interleaved rounds; max |out base - out tree| = {diff:.3g}")
med = {name: statistics.median(ts) for name, ts in times.items()}
for name, m in med.items():
    print(f"  {name:>16}: {m * 1e3:8.1f} ms  {flops / m / 1e9:6.1f} GFLOPS  (rounds: "
          + ", ".join(f"{t * 1e3:.0f}" for t in times[name]) + ")")
base, tree = med.values()
print(f"  speed-up tree / base: {base / tree:.2f}x")
