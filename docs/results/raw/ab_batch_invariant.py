"""Same-process A/B of EngineConfig.batch_invariant (twin lone decode row) on batch-1 bf16 decode.
Usage: python docs/results/raw/ab_batch_invariant.py [auto|gguf]"""
import time, statistics, torch, sys
from slimlm import LLM, SamplingParams
torch.set_num_threads(2)
w = sys.argv[1] if len(sys.argv) > 1 else "auto"
llm = LLM("smollm2-135m-instruct", dtype="bfloat16", weights=w)
p = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
prompt = "Write a short story about a robot who learns to paint."
llm.generate([prompt], p, use_tqdm=False)
res = {True: [], False: []}
for r in range(4):
    for bi in (True, False):
        llm.engine.runner.batch_invariant = bi
        t = time.perf_counter(); llm.generate([prompt], p, use_tqdm=False); res[bi].append(64 / (time.perf_counter() - t))
for bi in (True, False):
    print(w, "batch_invariant", bi, "tok/s median", round(statistics.median(res[bi]), 1), [round(x, 1) for x in res[bi]])
print(w, "ratio on/off", round(statistics.median(res[True]) / statistics.median(res[False]), 3))
