"""Resident memory of a bf16 prefill (16 of the throughput workload's mixed prompts, 1 generated token)
with the heap trim threshold model/weights.py sets after a load (new: 64 MiB) or glibc's default put
back (old: 128 KiB): RSS before and after the prefill, and the process's peak. One process per run.

  python docs/results/raw/prefill_rss_trim.py old|new"""
import sys, ctypes, resource, torch
torch.set_num_threads(1)
from slimlm import LLM, SamplingParams
from slimlm.bench.workloads import mixed_prompts
from slimlm.model.hub import load
lm = load("smollm2-135m-instruct", dtype="bfloat16")
prompts = mixed_prompts(lm.tokenizer, n=16, seed=0)
llm = LLM(lm, dtype="bfloat16")
if sys.argv[1] == "old":
    ctypes.CDLL(None).mallopt(-1, 128 << 10)
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
r0 = rss()
llm.generate(prompts, SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
print(sys.argv[1], f"RSS before {r0:.0f} MB, after prefill {rss():.0f} MB, peak {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024:.0f} MB")
