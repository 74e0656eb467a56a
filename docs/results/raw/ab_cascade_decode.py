"""Decode attention with shared chunks (cascade, kernels/paged_decode.c "Chunked decode and shared
chunks") against the kernel of a git revision, same process (docs/benchmarks.md, "session 14: decode
attention reads a shared prefix once"). SmolLM2-135M's shape (9 query heads, 3 KV heads, head size 64,
blocks of 16), ``rows`` sequences of random lengths around ``ctx`` tokens, ``layers`` separate pools
(one per layer, as a step walks them), tables in random block order; every other row starts with
the same ``prefix`` blocks (the throughput workload: half its prompts share a 400-token system
prompt, 25 blocks, under prefix caching; PREFIX=0: no sharing). Three kernels per round, interleaved:
REV's, this tree's with SLIMLM_DECODE_CASCADE=0 (chunked, every chunk per row) and with the cascade.
CPU time of the calling thread (time.thread_time, THREADS=1); medians over rounds.

  THREADS=1 python docs/results/raw/ab_cascade_decode.py REV float32|bfloat16 [rows] [ctx] [layers] [rounds]
"""
import os, statistics, sys, tempfile, time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernel_rev  # noqa: E402

torch.set_num_threads(int(os.environ.get("THREADS", "1")))
rev, dtype = sys.argv[1], getattr(torch, sys.argv[2])
rows = int(sys.argv[3]) if len(sys.argv) > 3 else 57
ctx = int(sys.argv[4]) if len(sys.argv) > 4 else 1000
layers = int(sys.argv[5]) if len(sys.argv) > 5 else 30
rounds = int(sys.argv[6]) if len(sys.argv) > 6 else 5
prefix = int(os.environ.get("PREFIX", "25"))
Hq, Hkv, d, bs = 9, 3, 64, 16
code = {torch.float32: 0, torch.bfloat16: 1}[dtype]
g = torch.Generator().manual_seed(0)
lens = torch.randint(ctx // 2, 3 * ctx // 2 + 1, (rows,), generator=g).clamp(min=prefix * bs + 1)
nb = int(-(-lens.max() // bs))
n_blocks = rows * nb
pools = [(torch.randn(n_blocks, bs, Hkv, d, generator=g).to(dtype),
          torch.randn(n_blocks, bs, Hkv, d, generator=g).to(dtype)) for _ in range(layers)]
tables = []
for _ in range(layers):
    t = torch.randperm(n_blocks, generator=g).view(rows, nb).contiguous()
    t[::2, :prefix] = t[0, :prefix]  # every other row shares row 0's first blocks
    tables.append(t)
sharing = len(range(0, rows, 2)) if prefix else 0
q = torch.randn(rows, Hq, d, generator=g)
if dtype == torch.bfloat16:
    q = q.bfloat16().float()  # a bf16 model's queries
out = torch.empty(rows, Hq, d)
read = int(lens.sum()) * Hkv * d * pools[0][0].element_size() * 2 * layers  # every row's keys once
once = read - max(sharing - 1, 0) * prefix * bs * Hkv * d * pools[0][0].element_size() * 2 * layers
with tempfile.TemporaryDirectory() as tmp:
    libs = {"old": kernel_rev.build("paged_decode", rev, Path(tmp)), "new": kernel_rev.build("paged_decode", None, Path(tmp))}
    kinds = {"old": ("old", None), "chunked": ("new", "0"), "cascade": ("new", "1")}

    def step(kind):
        lib, env = kinds[kind]
        if env is not None:
            os.environ["SLIMLM_DECODE_CASCADE"] = env
        for (k, v), t in zip(pools, tables):
            rc = libs[lib].slimlm_paged_decode(q.data_ptr(), k.data_ptr(), v.data_ptr(), None, None, None, None, code,
                                               t.data_ptr(), lens.data_ptr(), out.data_ptr(), None, rows, Hq, Hkv, d,
                                               bs, nb, d**-0.5, torch.get_num_threads())
            assert rc == 0, rc
        return out.clone()

    ref = step("old")
    diffs = {k: (step(k) - ref).abs().max().item() for k in ("chunked", "cascade")}
    same = torch.equal(step("chunked"), step("cascade"))
    shared_chunks = int(libs["new"].slimlm_decode_shared_chunks())
    times = {k: [] for k in kinds}
    for r in range(rounds):
        order = list(kinds) if r % 2 == 0 else list(kinds)[::-1]
        for k in order:
            c = time.thread_time()
            step(k)
            times[k].append(time.thread_time() - c)
med = {k: statistics.median(v) for k, v in times.items()}
print(f"{sys.argv[2]} rows={rows} ctx~{ctx} (mean {lens.float().mean():.0f}) layers={layers} threads={torch.get_num_threads()} "
      f"prefix={prefix} blocks shared by {sharing} rows ({shared_chunks} shared chunks a layer): {read / 1e6:.0f} MB of K+V "
      f"per step row by row, {once / 1e6:.0f} MB each block once")
print(f"  max |new - old|: chunked {diffs['chunked']:.2e}, cascade {diffs['cascade']:.2e}; cascade == chunked bitwise: {same}")
for k, v in med.items():
    print(f"  {k:8s} {v * 1e3:8.1f} ms  (rounds: " + ", ".join(f"{x * 1e3:.0f}" for x in times[k]) + ")")
print(f"  old / cascade {med['old'] / med['cascade']:.3f}x;  old / chunked {med['old'] / med['chunked']:.3f}x;  "
      f"chunked / cascade {med['chunked'] / med['cascade']:.3f}x")
