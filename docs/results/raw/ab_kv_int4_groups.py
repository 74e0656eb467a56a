"""Same-process interleaved A/B of int4 KV layouts (issue 11): full KV vs int4 with keys / values
in groups of 32 / 32 (the layout before), 16 / 32 (the default) and 16 / 16, on the mixed
workload of ab_kv_speed.py. Prints per config: generated tok/s (median of rounds), ratio to the
first config, KV peak MB. Noisy on a loaded machine: read the ratios.

CPU=1 THREADS=1 N=8 HI=600 MAXTOK=32 PYTHONPATH=src python docs/results/raw/ab_kv_int4_groups.py [rounds] [configs...]
configs: full int8 int4-k32v32 int4-k16v32 int4-k16v16 (default: full int4-k32v32 int4-k16v32); an int4
name ending in -bf16attn builds it with ``int4.FP32_ATTENTION = False`` (prefill in bf16 arithmetic).
env THREADS, N, HI, MAXTOK, DTYPE (bfloat16); CPU=1 times by process CPU time.
"""
import os, sys

import torch

from engine_ab import interleaved, report
from slimlm import LLM
from slimlm.kvcache.codec import int4

torch.set_num_threads(int(os.environ.get("THREADS", "1")))
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
names = sys.argv[2:] or ["full", "int4-k32v32", "int4-k16v32"]
dtype = os.environ.get("DTYPE", "bfloat16")


def build(n):
    if n == "full":
        return LLM("smollm2-135m-instruct", dtype=dtype)
    if n == "int8":
        return LLM("smollm2-135m-instruct", dtype=dtype, kv_cache_dtype="int8")
    k, v = n.removeprefix("int4-k").removesuffix("-bf16attn").split("v")
    saved = int4.GROUPS, getattr(int4, "FP32_ATTENTION", False)
    int4.GROUPS, int4.FP32_ATTENTION = {"k": int(k), "v": int(v)}, not n.endswith("-bf16attn")
    try:  # the codecs read these when the engine builds them
        return LLM("smollm2-135m-instruct", dtype=dtype, kv_cache_dtype="int4")
    finally:
        int4.GROUPS, int4.FP32_ATTENTION = saved


llms = {n: build(n) for n in names}
report(*interleaved(llms, rounds))
