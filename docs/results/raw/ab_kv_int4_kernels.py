"""The native decode and prefill kernels alone, per KV pool format, at the throughput workload's
shapes (issue 11, kv4b): 9 query heads, 3 KV heads, d = 64, blocks of 16; decode: one call for
57 sequences of 600-1,500 keys; prefill: one 256-row chunk (``--chunk``) of a 1,000-token context. Each pool
format (kv code: 0 float32, 1 bfloat16, 3 .. 6 int4, kernels/kv_pool.h) is timed in CPU time of
the calling thread at 1 thread, interleaved round by round, median per format; with ``--base REF``
the kernels of git revision REF are built into a temporary folder and timed beside this tree's in
the same rounds (``name@REF``), so a change is measured against its parent in one process.

PYTHONPATH=src python docs/results/raw/ab_kv_int4_kernels.py [--rounds 15] [--base HEAD] [--codes 1,3,4,5,6] [--chunk 256]
"""
from __future__ import annotations

import argparse
import ctypes
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from slimlm import kernels
from slimlm.kernels.ops import native_decode, native_prefill_ex
from slimlm.kvcache.codec import KV_CODECS
from slimlm.kvcache.codec import int4

HQ, HKV, D, BS = 9, 3, 64, 16
INT4_GROUPS = {3: (32, 32), 4: (16, 32), 5: (32, 16), 6: (16, 16)}  # kv code -> (key, value) group


def pools(code: int, num_blocks: int):
    """Key and value parts of ``code``'s format filled with random rows (keys with a large channel)."""
    g = torch.Generator().manual_seed(code)
    xk = torch.randn(num_blocks * BS, HKV, D, generator=g)
    xk[:, :, 1] += 6.0
    xv = torch.randn(num_blocks * BS, HKV, D, generator=g)
    if code < 3:
        dt = torch.float32 if code == 0 else torch.bfloat16
        return [xk.to(dt).view(num_blocks, BS, HKV, D)], [xv.to(dt).view(num_blocks, BS, HKV, D)]
    kg, vg = INT4_GROUPS[code]
    saved, int4.GROUPS = int4.GROUPS, {"k": kg, "v": vg}
    try:
        kc, vc = KV_CODECS.get("int4")(torch.float32, D, "k"), KV_CODECS.get("int4")(torch.float32, D, "v")
    finally:
        int4.GROUPS = saved
    assert kc.native_code == code
    k, v = kc.allocate(num_blocks, BS, HKV, "cpu"), vc.allocate(num_blocks, BS, HKV, "cpu")
    slots = torch.arange(num_blocks * BS)
    kc.write(k, slots, xk)
    vc.write(v, slots, xv)
    return k, v


def build_base(ref: str) -> dict[str, ctypes.CDLL]:
    """``paged_decode`` and ``paged_prefill`` as revision ``ref`` had them, built with the kernels' flags."""
    tmp = Path(tempfile.mkdtemp(prefix="kvab-"))
    src = Path(kernels.__file__).parent
    rel = src.relative_to(Path(subprocess.check_output(["git", "rev-parse", "--show-toplevel"], cwd=src, text=True).strip()))
    names = {n for n in ("paged_decode", "paged_prefill")} | {f for n in ("paged_decode", "paged_prefill")
                                                              for f in kernels.INCLUDES.get(n, [])}
    for f in names:
        f = f if f.endswith(".h") else f + ".c"
        (tmp / f).write_text(subprocess.check_output(["git", "show", f"{ref}:{rel / f}"], cwd=src, text=True))
    libs = {}
    for n in ("paged_decode", "paged_prefill"):
        subprocess.run(["cc", *kernels._flags(), str(tmp / f"{n}.c"), "-o", str(tmp / f"{n}.so"), "-lm"], check=True)
        lib = ctypes.CDLL(str(tmp / f"{n}.so"))
        for fn, (res, args) in kernels.SIGNATURES[n].items():
            getattr(lib, fn).restype, getattr(lib, fn).argtypes = res, args
        libs[n] = lib
    return libs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--base", default=None, help="a git revision whose kernels are timed beside this tree's")
    ap.add_argument("--codes", default="0,1,3,4,5,6")
    ap.add_argument("--chunk", type=int, default=256, help="prefill rows per call")
    a = ap.parse_args()
    torch.set_num_threads(1)
    codes = [int(c) for c in a.codes.split(",")]
    libs = {"": {n: kernels.load(n) for n in ("paged_decode", "paged_prefill")}}
    if a.base:
        libs[f"@{a.base}"] = build_base(a.base)
    g = torch.Generator().manual_seed(0)
    B = 57
    lens = torch.randint(600, 1501, (B,), generator=g)
    nbs = (lens + BS - 1) // BS
    num_blocks = int(nbs.sum())
    perm = torch.randperm(num_blocks, generator=g)  # blocks scattered over the pool
    table = torch.zeros(B, int(nbs.max()), dtype=torch.int64)
    o = 0
    for b in range(B):
        table[b, : nbs[b]] = perm[o:o + nbs[b]]
        o += int(nbs[b])
    q = torch.randn(B, HQ, D, generator=g)
    ctx, chunk = 1000, a.chunk
    ptable = perm[: (ctx + BS - 1) // BS].contiguous()
    data = {c: pools(c, num_blocks) for c in codes}
    qp = {c: torch.randn(chunk, HQ, D, generator=g).to(torch.float32 if c == 0 else torch.bfloat16) for c in codes}
    times: dict[tuple, list[float]] = {}
    for r in range(a.rounds + 1):
        for c in codes:
            k, v = data[c]
            for tag, lb in libs.items():
                t = time.thread_time()
                native_decode(lb["paged_decode"], q, k, v, c, table, lens, 0.125)
                t1 = time.thread_time()
                out = torch.empty_like(qp[c])
                native_prefill_ex(lb["paged_prefill"], qp[c], k, v, c, ptable, ctx - chunk, out, 0.125)
                t2 = time.thread_time()
                if r:  # round 0 warms up
                    times.setdefault(("decode", c, tag), []).append(t1 - t)
                    times.setdefault(("prefill", c, tag), []).append(t2 - t1)
    for kind in ("decode", "prefill"):
        ref = statistics.median(times[(kind, codes[0], "")])
        for c in codes:
            for tag in libs:
                m = statistics.median(times[(kind, c, tag)])
                print(f"{kind:7s} code {c}{tag:10s} {m * 1e3:8.2f} ms  x{m / ref:.3f} of code {codes[0]}")


if __name__ == "__main__":
    main()
