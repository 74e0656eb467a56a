"""KV bytes one passkey-2k request holds, per KV configuration, as the engine counts them: the
request's ``kv_peak_bytes`` (blocks it holds after each step's compaction x
``KVCacheSpec.bytes_per_block``) and, for token policies, what its prompt's own step holds
before the first compaction (the whole prompt, as kvpress's presses hold it before they press).
The ratios are against the model's dtype (bf16 on this CPU, ``dtype="auto"``) and against fp32.
Block counts depend only on token counts, so one prompt of the graded set is enough; the model
is the real one (bytes per block follow its layers, KV heads and head size).

PYTHONPATH=src python docs/results/raw/kv_bytes_needle.py "{'budget': 0.5, 'window': 64, 'pool': 7}" ...
PYTHONPATH=src python docs/results/raw/kv_bytes_needle.py int3 "int4s:{'budget': 0.75}"  (a codec, alone or + H2O)
"""
import ast
import sys

import torch

from slimlm import LLM, SamplingParams
from slimlm.eval.needle import build_prompt, filler_ids

torch.set_num_threads(1)
MODEL, LENGTH, NEW = "smollm2-135m-instruct", 2048, 8
configs = [("fp32 KV", {"kv_cache_dtype": "float32"}), ("bf16 KV (the model dtype)", {}),
           ("int4", {"kv_cache_dtype": "int4"})]
for a in sys.argv[1:] or ["{'budget': 0.5}"]:  # "{h2o args}" (int4), "CODEC" or "CODEC:{h2o args}"
    codec, _, args = ("int4", "", a) if a.startswith("{") else a.partition(":")
    if not args:
        configs.append((codec, {"kv_cache_dtype": codec}))
        continue
    p = ast.literal_eval(args)
    configs.append((f"{codec} + h2o {p}", {"kv_cache_dtype": codec, "kv_policy": "h2o", "kv_policy_args": p}))
rows = []
for name, kw in configs:
    llm = LLM(MODEL, **kw)
    tok, eng = llm.tokenizer, llm.engine
    ids, _ = build_prompt(tok, filler_ids("essays", tok), LENGTH, 0.5, "12345", 7)
    out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True), use_tqdm=False)[0]
    bs = eng.config.block_size
    prompt_step = -(-len(ids) // bs) * eng.bytes_per_block  # blocks the prompt's own step writes
    rows.append((name, eng.bytes_per_block, out.metrics.kv_peak_bytes, prompt_step))
fp32, bf16 = rows[0][2], rows[1][2]
print(f"passkey prompt of {LENGTH} tokens + {NEW} generated, block size {bs}")
print("| config | bytes per block | kv_peak_bytes (after each step) | vs bf16 | vs fp32 | prompt step holds "
      "| vs bf16 |")
print("|---|---|---|---|---|---|---|")
for name, bpb, peak, step in rows:
    print(f"| {name} | {bpb:,} | {peak:,} | {bf16 / peak:.2f}x | {fp32 / peak:.2f}x | {step:,} | {bf16 / step:.2f}x |")
