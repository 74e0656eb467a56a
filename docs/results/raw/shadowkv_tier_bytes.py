"""KV bytes held by ShadowKV's second tier (kvcache/key_tier.py) while a long prompt decodes,
against the same blocks holding their keys (no tier): deterministic byte counts. One engine, one
prompt of CPython source, a few decode steps (the prefix is factored at the step after its first
decode), then the engine's counts: value blocks, key blocks held, the factors' float32 bytes.
Usage: python docs/results/raw/shadowkv_tier_bytes.py [--tokens 8128] [--new 4] [--rank 16]
       [--key-share 0.5] [--dtype float32] [--threads 1]"""
import argparse, json, sysconfig
from pathlib import Path

import torch

from slimlm import LLM, SamplingParams

ap = argparse.ArgumentParser()
ap.add_argument("--tokens", type=int, default=8128)
ap.add_argument("--new", type=int, default=4)
ap.add_argument("--rank", type=int, default=16)
ap.add_argument("--key-share", type=float, default=0.5)
ap.add_argument("--dtype", default="float32")
ap.add_argument("--threads", type=int, default=1)
a = ap.parse_args()
torch.set_num_threads(a.threads)
llm = LLM("smollm2-135m-instruct", dtype=a.dtype, kv_policy="shadowkv", max_num_batched_tokens=2048,
          kv_policy_args={"rank": a.rank, "key_share": a.key_share})
text = "".join(p.read_text() for p in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("[a-c]*.py"))[:40])
ids = llm.tokenizer.encode(text)[: a.tokens]
eng = llm.engine
eng.add_request(ids, SamplingParams(temperature=0, max_tokens=a.new, ignore_eos=True))
rows = []
while eng.has_unfinished():
    eng.step()
    pool, tier = eng.pool, eng.pool.tier
    used = pool.num_used()
    full = used * eng.bytes_per_block
    if not used:  # the request finished: its blocks are back
        break
    held = eng.kv_bytes_in_use()
    rows.append({"blocks": used, "key_blocks": pool.key_blocks_in_use(), "factor_bytes": tier.record_bytes,
                 "held_bytes": held, "full_bytes": full, "held_share": round(held / full, 4)})
    print(json.dumps(rows[-1]))
print(json.dumps({"tokens": len(ids), "rank": a.rank, "dtype": a.dtype, "final": rows[-1],
                  "blocks_factored": eng.pool.tier.stats["blocks_factored"]}))
