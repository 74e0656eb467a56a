"""Low-bit KV (int4s) speed against int4 and full KV, same process, CPU time at 1 thread (loaded
machine: ratios only): one 2,049-token passkey prompt + 16 greedy tokens, prefix caching off,
3 interleaved rounds, medians. int4s has no native reader: the PyTorch paths decode the context.

    PYTHONPATH=src python docs/results/raw/ab_lowbit_speed.py
"""
import time, torch
from slimlm import LLM, SamplingParams
from slimlm.eval.needle import build_prompt, filler_ids
torch.set_num_threads(1)
llms = {c: LLM("smollm2-135m-instruct", kv_cache_dtype=c, enable_prefix_caching=False) for c in ("auto", "int4", "int4s")}
tok = llms["auto"].tokenizer
ids, _ = build_prompt(tok, filler_ids("essays", tok), 2048, 0.5, "12345", 7)
sp = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
res = {c: [] for c in llms}
for r in range(3):
    for c, llm in llms.items():
        t = time.thread_time()
        llm.generate([ids + [r]], sp, use_tqdm=False)
        res[c].append(time.thread_time() - t)
med = {c: sorted(v)[1] for c, v in res.items()}
print({c: [round(x, 2) for x in v] for c, v in res.items()})
print("median CPU s (2,049-token prompt + 16 tokens):", {c: round(m, 2) for c, m in med.items()},
      "int4s / int4:", round(med["int4s"] / med["int4"], 2), "int4s / full:", round(med["int4s"] / med["auto"], 2))
