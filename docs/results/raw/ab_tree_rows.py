"""Same-process A/B of batch-1 decode: plain vs Chimera chain vs Chimera top-2 tree (verified as decode
rows under batch_invariant, engine/spec/tree_rows.py). One thread, CPU time of the decoding thread,
rounds interleaved (order rotated each round), medians; also checks the three outputs are identical.
Usage: python docs/results/raw/ab_tree_rows.py [ADAPTER] [K] [DTYPE] [ROUNDS]"""
import statistics
import sys
import time

import torch

from slimlm import LLM, SamplingParams
from slimlm.compress.spec_bench import prompt_texts
from slimlm.model.hub import load

torch.set_num_threads(1)
adapter = sys.argv[1] if len(sys.argv) > 1 else "/tmp/chimera-big"
k = int(sys.argv[2]) if len(sys.argv) > 2 else 4
dtype = sys.argv[3] if len(sys.argv) > 3 else "bfloat16"
rounds = int(sys.argv[4]) if len(sys.argv) > 4 else 3
lm = load("smollm2-135m-instruct", dtype=dtype)
prompts = [t[:128] for t in prompt_texts(lm.tokenizer, "stdlib", 4, 128 + 48)]
p = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
common = dict(dtype=dtype, kv_cache_bytes=64 << 20)
llms = {"plain": LLM(lm, **common)}
for name, tree in (("chain", False), ("tree", True)):
    llms[name] = LLM(lm, speculative="chimera", speculative_args={"adapter": adapter, "k": k, "tree": tree}, **common)
cpu = {n: [] for n in llms}
outs = {}
for llm in llms.values():
    llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)  # warm-up
for r in range(rounds):
    names = list(llms)[r % 3:] + list(llms)[: r % 3]
    for n in names:
        llms[n].engine.pool.reset_prefix_cache()
        toks, t = 0, time.thread_time()
        got = []
        for q in prompts:  # batch 1
            o = llms[n].generate([q], p, use_tqdm=False)[0].outputs[0].token_ids
            got.append(list(o))
            toks += len(o)
        cpu[n].append((time.thread_time() - t) / toks)
        outs.setdefault(n, got)
for n in llms:
    st = llms[n].engine.stats
    tps = (st["accepted_draft_tokens"] + st["verify_steps"]) / max(st["verify_steps"], 1)
    print(f"{n}: CPU ms/token median {1e3 * statistics.median(cpu[n]):.1f} {[round(1e3 * x, 1) for x in cpu[n]]}"
          f" tokens/verify step {tps:.2f} tree_rows {st['tree_rows']} off_chain {st['tree_off_chain']}")
m = {n: statistics.median(v) for n, v in cpu.items()}
print(f"speed-up vs plain: chain {m['plain'] / m['chain']:.3f}x, tree {m['plain'] / m['tree']:.3f}x;"
      f" tree vs chain {m['chain'] / m['tree']:.3f}x")
print("outputs identical (chain, tree vs plain):", outs["chain"] == outs["plain"], outs["tree"] == outs["plain"])
