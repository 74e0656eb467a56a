"""Same-process A/B of Dual Chunk Attention's prefill (TTFT) at a long prompt, one engine
(rope_extension dca, context --context) whose attention paths are swapped between rounds:
  dca-native         DCA's three key ranges on the native prefill kernel (paged_prefill_range)
  dca-torch          (--torch) the PyTorch path: one flash-attention call per key range
  dca-sparse-native  vertical-slash sparse prefill under DCA on the sparse kernel's key ranges
  dca-sparse-torch   (--sparse-torch) the same pattern on its PyTorch gathers
Prefix caching off, so every run prefills the whole prompt. Times are this process's CPU time
(1 thread: the work done, little disturbed by other processes on a shared machine); --wall for
wall time on a quiet one. Printed beside each: the prompt NLL, whether the next token equals
dca-native's, and for the sparse configurations the share of causal pairs attended.
Usage: python docs/results/raw/ab_dca_prefill.py [--tokens 16384] [--rounds 1] [--threads 1]
       [--torch] [--sparse-torch] [--no-sparse] [--wall] [--context 40000]"""
import argparse, statistics, sysconfig, time
from dataclasses import replace
from pathlib import Path

import torch

from slimlm import LLM, SamplingParams, kernels
from slimlm.engine.sparse_prefill import VerticalSlash

ap = argparse.ArgumentParser()
ap.add_argument("--tokens", type=int, default=16384)
ap.add_argument("--rounds", type=int, default=1)
ap.add_argument("--threads", type=int, default=1)
ap.add_argument("--torch", action="store_true")
ap.add_argument("--sparse-torch", action="store_true")
ap.add_argument("--no-sparse", action="store_true")
ap.add_argument("--wall", action="store_true")
ap.add_argument("--context", type=int, default=40000)
a = ap.parse_args()
clock = time.perf_counter if a.wall else time.process_time
torch.set_num_threads(a.threads)
llm = LLM("smollm2-135m-instruct", enable_prefix_caching=False, rope_extension="dca",
          rope_extension_args={"context": a.context})
text = "".join(p.read_text() for p in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("[a-t]*.py"))[:120])
ids = llm.tokenizer.encode(text)[: a.tokens]
assert len(ids) == a.tokens
eng, native = llm.engine, llm.engine.runner.paths
assert native.dca_native is not None, "the native DCA prefill is not available here"
configs = {"dca-native": native}
if a.torch:
    configs["dca-torch"] = replace(native, dca_native=None)
if not a.no_sparse:
    configs["dca-sparse-native"] = replace(native, sparse_prefill=VerticalSlash(),
                                           sparse_prefill_native=kernels.load("sparse_prefill"))
if a.sparse_torch:
    configs["dca-sparse-torch"] = replace(native, dca_native=None, sparse_prefill=VerticalSlash(),
                                          sparse_prefill_native=None)
print(f"dtype {eng.cache.spec.compute_dtype}, {a.tokens} tokens, {a.threads} thread(s), "
      f"{'wall' if a.wall else 'CPU'} time", flush=True)
sp = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True, prompt_logprobs=0)
res, outs = {k: [] for k in configs}, {}
for r in range(a.rounds):
    for name, paths in configs.items():
        eng.runner.paths = paths
        t = clock()
        outs[name] = llm.generate([ids], sp, use_tqdm=False)[0]
        res[name].append(clock() - t)
        print(f"round {r} {name}: {res[name][-1]:.1f} s", flush=True)
base = statistics.median(res["dca-native"])
lp = {k: torch.tensor([next(iter(d.values())) for d in o.prompt_logprobs[1:]]) for k, o in outs.items()}
for name, s in res.items():
    m = statistics.median(s)
    line = (f"{name:18s} TTFT median {m:7.1f} s  dca-native / this {base / m:.2f}x  prompt NLL {float(-lp[name].mean()):.4f}"
            f"  max |logprob - dca-native| {float((lp[name] - lp['dca-native']).abs().max()):.4f}"
            f"  next token equal: {outs[name].outputs[0].token_ids == outs['dca-native'].outputs[0].token_ids}")
    sp_ = configs[name].sparse_prefill
    if sp_ is not None and sp_.stats:
        st = sp_.stats
        line += f"  attended {st['computed'] / st['causal']:.3f} of the sparse chunks' causal pairs"
    print(line)
