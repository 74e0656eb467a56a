"""Same-process interleaved A/B of KV plug-ins inside continuous batching (issue 11 speed):
full KV vs H2O / int8 / int4 on a smaller mixed workload (the throughput scenario's prompts,
fewer and shorter). Prints per config: generated tok/s (median of rounds), ratio to full,
KV peak MB, prompt tokens computed. Noisy on a loaded machine: read the ratios.

PYTHONPATH=src python docs/results/raw/ab_kv_speed.py [rounds] [configs...]
configs: full h2o int8 int4 h2o-nopc (h2o without prefix caching) ...; a name ending in "-layer0"
builds that config with SLIMLM_DECODE_LAYER=0 (decode steps layer by layer in PyTorch, not the
native decode layers: e.g. int4 vs int4-layer0). env THREADS, N, HI, MAXTOK, DTYPE; CPU=1 times
by process CPU time instead of wall time (steadier on a loaded machine at THREADS=1).
"""
import os, sys

import torch

from engine_ab import interleaved, report
from slimlm import LLM

torch.set_num_threads(int(os.environ.get("THREADS", "1")))
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
names = sys.argv[2:] or ["full", "h2o", "int8", "int4"]
CONFIGS = {
    "full": {},
    "h2o": {"kv_policy": "h2o", "kv_policy_args": {"budget": 0.2}},
    "h2o-nopc": {"kv_policy": "h2o", "kv_policy_args": {"budget": 0.2}, "enable_prefix_caching": False},
    "full-nopc": {"enable_prefix_caching": False},
    "int8": {"kv_cache_dtype": "int8"},
    "int4": {"kv_cache_dtype": "int4"},
}
dtype = os.environ.get("DTYPE", "bfloat16")


def build(n):
    base = n.removesuffix("-layer0")
    if base != n:
        os.environ["SLIMLM_DECODE_LAYER"] = "0"
    try:
        return LLM("smollm2-135m-instruct", dtype=dtype, **CONFIGS[base])
    finally:
        os.environ.pop("SLIMLM_DECODE_LAYER", None)


llms = {n: build(n) for n in names}
report(*interleaved(llms, rounds), extra=True)
