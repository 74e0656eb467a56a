"""Same-process interleaved A/B of time to first token: plain prefill vs LazyLLM (`hooks=["lazyllm"]`)
on the default model, one prompt per length (the prefill benchmark's text), alternating rounds,
medians; on a loaded machine read the ratio only. Each line also gives the setting's deterministic
work share (LazyLLM.prefill_work: FLOPs of the pruned prefill / full prefill) and the TTFT bound it
sets (1 / share).
Usage: THREADS=1 python ab_lazyllm.py [LENGTHS] [ROUNDS] [hook args as k=v;k=v (JSON values)]
e.g.   THREADS=2 python ab_lazyllm.py 2048,4096,8192 3 'keep=[0.5,0.25]'
       THREADS=2 python ab_lazyllm.py 4096 3 'layers=[8];keep=[0.3];window=16;heads="max";pool=7;sinks=4' """
import json, os, statistics, sys, time

import torch

from slimlm import LLM, SamplingParams
from slimlm.bench.workloads import lengths_prompts
from slimlm.engine.hooks.lazyllm import LazyLLM
from slimlm.model.hub import load

torch.set_num_threads(int(os.environ.get("THREADS", "2")))
lengths = [int(x) for x in (sys.argv[1] if len(sys.argv) > 1 else "4096").split(",")]
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
hook_args = {}
for kv in (sys.argv[3].split(";") if len(sys.argv) > 3 else []):
    k, v = kv.split("=", 1)
    hook_args[k] = json.loads(v)
lm = load("smollm2-135m-instruct")
engines = {"plain": LLM(lm, enable_prefix_caching=False, kv_cache_bytes="1G"),
           "lazyllm": LLM(lm, hooks=["lazyllm"], hook_args={"lazyllm": hook_args}, kv_cache_bytes="1G")}
params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
# a prompt of the model's whole context leaves no room for the token it times: one fewer
lengths = [min(n, lm.model.cfg.max_position_embeddings - 1) for n in lengths]
prompts = lengths_prompts(lm.tokenizer, lengths)
for llm in engines.values():  # warm-up
    llm.generate([prompts[0][:64]], params, use_tqdm=False)
for n, ids in zip(lengths, prompts):
    times = {k: [] for k in engines}
    for _ in range(rounds):
        for name, llm in engines.items():
            t = time.perf_counter()
            llm.generate([ids], params, use_tqdm=False)
            times[name].append(time.perf_counter() - t)
    p, z = statistics.median(times["plain"]), statistics.median(times["lazyllm"])
    share = LazyLLM(**hook_args).prefill_work(lm.model.cfg, len(ids))["share"]
    print(f"{n} tokens: plain {p * 1e3:.0f} ms, lazyllm {z * 1e3:.0f} ms, TTFT ratio {p / z:.2f}x "
          f"(work share {share:.3f}: bound {1 / share:.2f}x)")
