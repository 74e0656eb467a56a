"""Decode attention alone, old kernel against new, same process (docs/benchmarks.md, "session 12:
decode attention at memory speed"). SmolLM2-135M's shape (9 query heads, 3 KV heads, head size 64,
blocks of 16), ``rows`` sequences of random lengths around ``ctx`` tokens, and ``layers`` separate
pools (one per layer, as a step walks them: together larger than the caches), tables in random
block order (ORDER=seq: consecutive). Each round calls every layer once with each kernel (interleaved), CPU time of the
calling thread (time.thread_time, THREADS=1); medians over rounds. GB/s counts the K and V bytes
each call must read (every attended row once per KV head).

  THREADS=1 python docs/results/raw/ab_paged_decode.py REV float32|bfloat16 [rows] [ctx] [layers] [rounds]

REV: the git revision of the old kernel (kernel_rev.build); the new one is the working tree.
"""
import os, statistics, sys, tempfile, time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernel_rev  # noqa: E402

torch.set_num_threads(int(os.environ.get("THREADS", "1")))
rev, dtype = sys.argv[1], getattr(torch, sys.argv[2])
rows = int(sys.argv[3]) if len(sys.argv) > 3 else 24
ctx = int(sys.argv[4]) if len(sys.argv) > 4 else 1000
layers = int(sys.argv[5]) if len(sys.argv) > 5 else 30
rounds = int(sys.argv[6]) if len(sys.argv) > 6 else 5
Hq, Hkv, d, bs = 9, 3, 64, 16
code = {torch.float32: 0, torch.bfloat16: 1}[dtype]
g = torch.Generator().manual_seed(0)
lens = torch.randint(ctx // 2, 3 * ctx // 2 + 1, (rows,), generator=g)
nb = int(-(-lens.max() // bs))
n_blocks = rows * nb
pools = [(torch.randn(n_blocks, bs, Hkv, d, generator=g).to(dtype),
          torch.randn(n_blocks, bs, Hkv, d, generator=g).to(dtype)) for _ in range(layers)]
order = os.environ.get("ORDER", "random")  # ORDER=seq: each row's blocks consecutive in the pool
tables = [(torch.arange(n_blocks) if order == "seq" else torch.randperm(n_blocks, generator=g)).view(rows, nb).contiguous()
          for _ in range(layers)]
q = torch.randn(rows, Hq, d, generator=g)
if dtype == torch.bfloat16 and not os.environ.get("FP32_QUERIES"):
    q = q.bfloat16().float()  # a bf16 model's queries (FP32_QUERIES=1: not bf16-exact, the hi + lo split)
out = torch.empty(rows, Hq, d)
nbytes = int(lens.sum()) * Hkv * d * pools[0][0].element_size() * 2 * layers
with tempfile.TemporaryDirectory() as tmp:
    libs = {"old": kernel_rev.build("paged_decode", rev, Path(tmp)), "new": kernel_rev.build("paged_decode", None, Path(tmp))}

    def step(lib):
        for (k, v), t in zip(pools, tables):
            rc = lib.slimlm_paged_decode(q.data_ptr(), k.data_ptr(), v.data_ptr(), None, None, None, None, code,
                                         t.data_ptr(), lens.data_ptr(), out.data_ptr(), None, rows, Hq, Hkv, d, bs,
                                         nb, d**-0.5, torch.get_num_threads())
            assert rc == 0, rc
        return out.clone()

    diff = (step(libs["old"]) - step(libs["new"])).abs().max().item()
    times = {k: [] for k in libs}
    for r in range(rounds):
        for k in (("old", "new") if r % 2 == 0 else ("new", "old")):
            c = time.thread_time()
            step(libs[k])
            times[k].append(time.thread_time() - c)
    x = torch.randn(nbytes // 4)  # a plain streaming read of the same bytes (fp32)
    st = []
    for _ in range(rounds):
        c = time.thread_time()
        x.sum()
        st.append(time.thread_time() - c)
med = {k: statistics.median(v) for k, v in times.items()}
print(f"{sys.argv[2]} {order} blocks rows={rows} ctx~{ctx} (mean {lens.float().mean():.0f}) layers={layers} threads={torch.get_num_threads()}: "
      f"{nbytes / 1e6:.0f} MB of K+V a step; max |old - new| {diff:.2e}")
for k, v in med.items():
    print(f"  {k:4s} {v * 1e3:8.1f} ms  {nbytes / v / 1e9:5.1f} GB/s")
print(f"  ratio old/new {med['old'] / med['new']:.2f}x;  torch sum over the same bytes {nbytes / statistics.median(st) / 1e9:.1f} GB/s")
