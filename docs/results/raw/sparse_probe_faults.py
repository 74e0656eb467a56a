"""The sparse-prefill probe alone (issue 18, session 12): minor page faults and CPU time per
``VerticalSlash._pattern`` call on fixed random inputs (9 query heads over 3 KV heads, 64 probe
rows, head size 64, 1 thread), with and without DCA's three query rotations, at 16k and 32k keys;
the current code against an older revision's (``--old-rev``, loaded from git), interleaved, 5
calls per measurement after one warm-up call, each measurement twice; also checks both pick the
same pattern.

Usage: PYTHONPATH=src python docs/results/raw/sparse_probe_faults.py [--old-rev 5409c42]
"""
import argparse
import importlib.util
import resource
import subprocess
import sys
import tempfile

import torch

from slimlm.engine.sparse_prefill import VerticalSlash as New
from slimlm.model.rope_extension import DualChunk, dca_queries

ap = argparse.ArgumentParser()
ap.add_argument("--old-rev", default="5409c42")
a = ap.parse_args()
src = subprocess.run(["git", "show", f"{a.old_rev}:src/slimlm/engine/sparse_prefill.py"], check=True,
                     capture_output=True, text=True).stdout
src = src.replace('@SPARSE_PREFILL.register("vertical-slash")\n', "")  # the name is taken by the current class
with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
    f.write(src)
spec = importlib.util.spec_from_file_location("old_sparse_prefill", f.name)
old = importlib.util.module_from_spec(spec)
sys.modules["old_sparse_prefill"] = old
spec.loader.exec_module(old)
torch.set_num_threads(1)


def usage():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime, r.ru_minflt


Hq, Hkv, d = 9, 3, 64
for S in (16384, 32768):
    for use_dca in (False, True):
        torch.manual_seed(0)
        q, k = torch.randn(Hq, 64, d), torch.randn(Hkv, S, d)
        qp, kp = torch.arange(S - 64, S), torch.arange(S)
        rot = None
        if use_dca:
            dc = DualChunk(6144, 512)
            inv = 1.0 / 10000 ** (torch.arange(0, d, 2).float() / d)
            rot = (*(x[0] for x in dca_queries(q[None], qp[None], dc, inv)), dc.chunk_len)
        res = {}
        for name, cls in (("before", old.VerticalSlash), ("after", New)) * 2:
            vs = cls()
            vs._pattern(q, k, qp, kp, kp >= 0, 0.125, rot)  # warm-up (the new code's buffers are allocated here)
            u0, s0, f0 = usage()
            for _ in range(5):
                out = vs._pattern(q, k, qp, kp, kp >= 0, 0.125, rot)
            u1, s1, f1 = usage()
            res.setdefault(name, []).append(((f1 - f0) / 5, (u1 - u0) / 5, (s1 - s0) / 5, out[0], out[1]))
        same = all(torch.equal(x[3], y[3]) and torch.equal(x[4], y[4]) for x, y in zip(res["before"], res["after"]))
        for name in ("before", "after"):
            f, u, s = ([r[i] for r in res[name]] for i in range(3))
            print(f"{S} keys, dca={use_dca}, {name}: minor faults/call {min(f):.0f}-{max(f):.0f}, "
                  f"user {min(u):.3f}-{max(u):.3f} s, sys {min(s):.3f}-{max(s):.3f} s", flush=True)
        print(f"  same pattern: {same}", flush=True)
