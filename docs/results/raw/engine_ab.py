"""What the same-process engine A/B scripts share (ab_kv_speed.py, ab_kv_int4_groups.py): the
mixed workload from the environment and the interleaved timing loop; and, for the decode replay
scripts (decode_rows_split.py, ab_decode_steps.py, ab_amx_decode.py), the recording of every
native decode layers call of the throughput workload. Every round runs each
engine once on the same prompts (prefix cache emptied, counters reset); round 0 warms up.

env N (prompts, 16), HI (longest prompt, 1000), MAXTOK (new tokens each, 48); CPU=1 times by
process CPU time instead of wall time (steadier on a loaded machine at one thread).
"""
from __future__ import annotations

import os
import statistics
import time

from slimlm import SamplingParams
from slimlm.bench.workloads import mixed_prompts


def clock():
    """The timer the environment asks for (CPU=1: process CPU time)."""
    return time.process_time if os.environ.get("CPU") == "1" else time.perf_counter


def workload(tokenizer):
    """(prompts, sampling params) of the mixed workload the environment sizes."""
    prompts = mixed_prompts(tokenizer, n=int(os.environ.get("N", "16")), hi=int(os.environ.get("HI", "1000")), seed=0)
    params = SamplingParams(temperature=0, max_tokens=int(os.environ.get("MAXTOK", "48")), ignore_eos=True)
    return prompts, params


def interleaved(llms: dict, rounds: int) -> tuple[dict[str, list[float]], dict[str, dict]]:
    """Generated tok/s per engine per round (after the warm-up round) and, per engine, the last
    round's KV peak (MB), prompt tokens computed and blocks still held."""
    prompts, params = workload(next(iter(llms.values())).engine.tokenizer)
    timer = clock()
    res: dict[str, list[float]] = {n: [] for n in llms}
    info: dict[str, dict] = {}
    for r in range(rounds + 1):
        for n, llm in llms.items():
            eng = llm.engine
            eng.pool.reset_prefix_cache()
            for k in ("computed_prompt_tokens", "generated_tokens", "kv_peak_bytes"):
                eng.stats[k] = 0
            t = timer()
            llm.generate(prompts, params, use_tqdm=False)
            dt = timer() - t
            if r:  # round 0 warms up
                res[n].append(eng.stats["generated_tokens"] / dt)
            info[n] = {"kv_peak_mb": eng.stats["kv_peak_bytes"] / 1e6,
                       "prompt_tokens": eng.stats["computed_prompt_tokens"], "blocks_held": eng.pool.num_used()}
    return res, info


def report(res: dict[str, list[float]], info: dict[str, dict], extra: bool = False) -> None:
    """One line per engine: median tok/s, its ratio to the first engine's, the rounds, KV peak."""
    names = list(res)
    base = statistics.median(res[names[0]])
    for n in names:
        m = statistics.median(res[n])
        more = f"  prompt tokens computed {info[n]['prompt_tokens']}  blocks held after {info[n]['blocks_held']}" \
            if extra else ""
        print(f"{n:12s} {m:7.1f} tok/s  x{m / base:.3f}  rounds {[round(x, 1) for x in res[n]]}  "
              f"KV peak {info[n]['kv_peak_mb']:.1f} MB{more}")


def record_decode_calls(llm, tokenizer, n_prompts: int, max_tokens: int = 128) -> list[tuple]:
    """Run ``n_prompts`` of the mixed workload (``max_tokens`` new tokens each) through ``llm`` and
    return every all-decode step's arguments to ``NativeDecodeLayers.run`` (tensors cloned), to be
    replayed against one build or another."""
    from slimlm.model.quant.native_layers import NativeDecodeLayers

    recorded = []
    run = NativeDecodeLayers.run

    def record(self, h, first, last, cos, sin, slots, table, lens):
        recorded.append((h.clone(), first, last, cos.clone(), sin.clone(), slots.clone(), table.clone(), lens.clone()))
        return run(self, h, first, last, cos, sin, slots, table, lens)

    NativeDecodeLayers.run = record
    try:
        llm.generate(mixed_prompts(tokenizer, n=n_prompts, seed=0),
                     SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True), use_tqdm=False)
    finally:
        NativeDecodeLayers.run = run
    return recorded
