"""Same-process A/B of int4 KV with and without the keys' static offsets (kvcache/codec/offsets.py):
two engines on the same model, int4 KV, one built with ``int4.OFFSETS = False`` (the codec
before), alternating rounds; a batch of 8 prompts of 256 tokens (prefill ms) then 32 decode
steps (ms/step), medians of ROUNDS rounds. Ratios only on a loaded machine.
Usage: THREADS=1 ROUNDS=5 PYTHONPATH=src python docs/results/raw/ab_kv_offsets.py [dtype]"""
import os, statistics, sys, time

import torch

from slimlm import LLM, SamplingParams
from slimlm.kvcache.codec import int4

torch.set_num_threads(int(os.environ.get("THREADS", "2")))
dtype = sys.argv[1] if len(sys.argv) > 1 else "bfloat16"
kw = dict(dtype=dtype, kv_cache_dtype="int4", kv_cache_bytes="256M", max_num_batched_tokens=2048)
new = LLM("smollm2-135m-instruct", **kw).engine
int4.OFFSETS = False
old = LLM("smollm2-135m-instruct", **kw).engine
int4.OFFSETS = True
assert new.cache.codec.offset(new.cache.k[0]) is not None and old.cache.codec.offset(old.cache.k[0]) is None


def run(eng, n=32, batch=8):
    g = torch.Generator().manual_seed(0)
    for _ in range(batch):
        ids = torch.randint(100, 40000, (256,), generator=g).tolist()
        eng.add_request(ids, SamplingParams(temperature=0, max_tokens=n + 2, ignore_eos=True))
    t = time.perf_counter()
    eng.step()  # the whole batch's prefill (8 x 256 tokens in one step)
    pf = time.perf_counter() - t
    eng.step()
    t = time.perf_counter()
    for _ in range(n):
        eng.step()
    dec = (time.perf_counter() - t) / n
    while eng.has_unfinished():
        eng.step()
    return pf * 1000, dec * 1000


res = {"before": [], "after": []}
for r in range(int(os.environ.get("ROUNDS", "5"))):
    res["before"].append(run(old))
    res["after"].append(run(new))
for i, what in enumerate(("prefill ms", "decode ms/step")):
    b = statistics.median(x[i] for x in res["before"])
    a = statistics.median(x[i] for x in res["after"])
    print(f"{dtype} threads {torch.get_num_threads()} {what}: without offsets {b:.1f}, with {a:.1f}: "
          f"after / before {a / b:.3f}")
