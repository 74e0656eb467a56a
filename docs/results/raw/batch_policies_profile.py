"""The throughput workload (bench/workloads.py's mixed prompts) through the engine with one KV
configuration, bf16, 1 thread: generated tokens per CPU second of the main thread, KV at peak,
optionally the cProfile tables (session 12, issue 16: MiniCache / ShadowKV / Squeezed Attention
inside continuous batching).

    PYTHONPATH=src python docs/results/raw/batch_policies_profile.py CONFIG [PROMPTS] [TOKENS] [--cprofile]

CONFIG: full, mc24 (MiniCache from layer 24), shadowkv, squeezed, int8. Run the configurations one
after the other, in rounds, and compare ratios (a loaded machine's absolute speeds mean nothing).
"""

import cProfile
import io
import pstats
import sys
import time

import torch

from slimlm import LLM, SamplingParams
from slimlm.bench.workloads import mixed_prompts
from slimlm.model.hub import load

CONFIGS = {
    "full": {},
    "mc24": {"kv_policy": "minicache", "kv_policy_args": {"start": 24}},
    "shadowkv": {"kv_policy": "shadowkv"},
    "squeezed": {"kv_policy": "squeezed"},
    "int8": {"kv_cache_dtype": "int8"},
}


def main() -> None:
    torch.set_num_threads(1)
    name = sys.argv[1]
    n = int(sys.argv[2]) if len(sys.argv) > 2 and sys.argv[2].isdigit() else 16
    new = int(sys.argv[3]) if len(sys.argv) > 3 and sys.argv[3].isdigit() else 32
    lm = load("smollm2-135m-instruct", dtype="bfloat16")
    prompts = mixed_prompts(lm.tokenizer, n=n, seed=0)
    llm = LLM(lm, dtype="bfloat16", **CONFIGS[name])
    llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)  # warm-up
    llm.engine.pool.reset_prefix_cache()
    params = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    prof = cProfile.Profile() if "--cprofile" in sys.argv else None
    t0, c0 = time.perf_counter(), time.thread_time()
    if prof:
        prof.enable()
    outs = llm.generate(prompts, params, use_tqdm=False)
    if prof:
        prof.disable()
    wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
    gen = sum(len(o.outputs[0].token_ids) for o in outs)
    print(f"{name}: {gen} tokens wall {wall:.1f}s cpu {cpu:.1f}s  tok/s(cpu) {gen / cpu:.2f} "
          f"steps {llm.engine.stats.get('steps')} kvpeak {llm.engine.stats['kv_peak_bytes'] / 2**20:.1f}MB")
    if prof:
        for key in ("tottime", "cumtime"):
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats(key).print_stats(30)
            print(s.getvalue())


if __name__ == "__main__":
    main()
