"""Same-process A/B of the native prefill kernel's AMX tiles (kernels/paged_prefill.c, bf16 pools
and queries) against its AVX-512 tiles in the same build (SLIMLM_AMX=0, read at each call), at the
throughput workload's shapes (prefill_shapes_throughput.json: the (T, q_start) of every prefill
chunk of `slimlm bench throughput`'s 64 mixed prompts, one layer; SmolLM2-135M: 9 query heads,
3 KV heads, d = 64, block size 16), on the same random pools, queries and block tables, rounds
interleaved (AMX, AVX-512, AMX, ...). GFLOPS count causal work only: 4 d Hq (q_start + t + 1)
per query row t. Times: CPU time of this thread at 1 thread (time.thread_time), medians. Also the
largest difference of each path from float32 PyTorch attention over the same bf16 inputs.

  python docs/results/raw/ab_amx_prefill.py [--rounds 5] [--shapes FILE.json] [--every K]"""
import argparse, json, os, statistics, time
from pathlib import Path

import torch

from slimlm import kernels
from slimlm.model.attention import attention
import kernel_rev  # docs/results/raw/kernel_rev.py  # noqa: E402

HERE = Path(__file__).resolve()
ap = argparse.ArgumentParser()
ap.add_argument("--rounds", type=int, default=5)
ap.add_argument("--shapes", default=str(HERE.with_name("prefill_shapes_throughput.json")))
ap.add_argument("--every", type=int, default=1, help="use every K-th chunk only (quicker, fewer shapes)")
a = ap.parse_args()
torch.set_num_threads(1)
lib = kernels.load("paged_prefill")
assert lib is not None and lib.slimlm_prefill_supported(64, 1), "needs the native kernel with AVX512-BF16"

shapes = [tuple(s) for s in json.loads(Path(a.shapes).read_text())][:: a.every]
Hq, Hkv, d, bs, scale = 9, 3, 64, 16, 0.125
dtype = torch.bfloat16
cases, flops = kernel_rev.prefill_cases(shapes, dtype, Hq, Hkv, d, bs)


def run() -> float:
    t = time.thread_time()
    for q, kp, vp, table, q0, out in cases:
        rc = lib.slimlm_paged_prefill(q.data_ptr(), q.stride(0), q.stride(1), kp.data_ptr(), vp.data_ptr(), 1,
                                      table.data_ptr(), q0, out.data_ptr(), out.stride(0), out.stride(1),
                                      q.shape[0], Hq, Hkv, d, bs, scale, 1)
        assert rc == 0, rc
    return time.thread_time() - t


def reference(q, kp, vp, table, q0):
    T, n = q.shape[0], q0 + q.shape[0]
    k = kp[table].reshape(-1, Hkv, d)[:n].float().transpose(0, 1)[None]
    v = vp[table].reshape(-1, Hkv, d)[:n].float().transpose(0, 1)[None]
    mask = torch.arange(n)[None, :] <= torch.arange(q0, n)[:, None]
    return attention(q.float().transpose(0, 1)[None], k, v, mask[None, None], scale)[0].transpose(0, 1)


paths = {"AMX": "1", "AVX-512 (SLIMLM_AMX=0)": "0"}
err, outs = {}, {}
for name, env in paths.items():  # warm-up, and each path's largest error against float32 PyTorch
    os.environ["SLIMLM_AMX"] = env
    assert lib.slimlm_prefill_amx() == (env == "1"), "this build or CPU has no AMX tiles"
    run()
    outs[name] = [c[5].float().clone() for c in cases]
    err[name] = max(float((c[5].float() - reference(*c[:5])).abs().max()) for c in cases[:: max(1, len(cases) // 12)])
diff = max(float((x - y).abs().max()) for x, y in zip(*outs.values()))
times = {name: [] for name in paths}
for _ in range(a.rounds):
    for name, env in paths.items():
        os.environ["SLIMLM_AMX"] = env
        times[name].append(run())
print(f"bfloat16: {len(shapes)} chunks, {sum(t for t, _ in shapes)} rows, {flops / 1e9:.1f} GFLOP per round; "
      f"CPU time at 1 thread, median of {a.rounds} interleaved rounds; max |out AMX - out AVX-512| = {diff:.3g}")
med = {name: statistics.median(ts) for name, ts in times.items()}
for name, m in med.items():
    print(f"  {name:>24}: {m * 1e3:8.1f} ms  {flops / m / 1e9:6.1f} GFLOPS  max |out - fp32 ref| {err[name]:.3g}  "
          "(rounds: " + ", ".join(f"{t * 1e3:.0f}" for t in times[name]) + ")")
amx, avx = med.values()
print(f"  speed-up AMX / AVX-512: {avx / amx:.2f}x")
