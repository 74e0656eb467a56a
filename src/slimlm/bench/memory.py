"""``memory``: KV-cache bytes per token and peak resident memory, per context length.

For each length, one prompt of real text then ``--max-tokens`` greedy tokens (default 32). KV
bytes are what the request held at its peak: slimlm counts its KV blocks in use (so a KV policy
that evicts shows here), transformers sums its cache tensors, llama.cpp is computed from the
model shape (F16 cache). Peak RSS is the process's high-water mark during that request (Linux
resets it per request), next to the resident memory after loading.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slimlm.bench.base import SCENARIOS, WorkerScenario, int_list, resolve, standard_systems, summary_table
from slimlm.bench.prefill import clamp_lengths, context_of

DEFAULT_LENGTHS = [1024, 4096]


@SCENARIOS.register("memory")
class Memory(WorkerScenario):
    help = "KV bytes per token and peak RSS per context length"

    def systems(self, a, s):
        from slimlm.kvcache.policy import KV_POLICIES

        notes: list[str] = []
        pol = s.engine.get("kv_policy")
        bounded = bool(pol) and KV_POLICIES.get(pol)(**s.engine.get("kv_policy_args", {})).max_blocks(1, 1) is not None
        new = resolve(a.max_tokens, 32)
        lengths = clamp_lengths(int_list(a.lengths, DEFAULT_LENGTHS), context_of(s.model) - new, bounded, notes)
        extra = {"lengths": lengths, "new_tokens": new}
        systems, more = standard_systems(a, s, {**extra, "n_ctx": max(lengths) + extra["new_tokens"] + 16})
        return systems, {**s.base_args(), **extra}, notes + more

    @staticmethod
    def worker(args: dict[str, Any]) -> dict[str, float]:
        from slimlm.bench.machine import reset_peak_rss, rss_mb, window_peak_rss_mb
        from slimlm.bench.systems import SYSTEMS
        from slimlm.bench.workloads import lengths_prompts, text_prompt

        system = SYSTEMS.get(args["system"])(args)
        system.decode(text_prompt(system.tokenizer, 16, offset=20_000), 2)  # warm-up
        res = {"rss_loaded_mb": rss_mb()}
        for n, ids in zip(args["lengths"], lengths_prompts(system.tokenizer, args["lengths"])):
            reset_peak_rss()
            system.decode(ids, args["new_tokens"])
            kv = system.kv_bytes()
            res[f"peak_rss_mb[{n}]"] = window_peak_rss_mb()
            if kv is not None:
                res[f"kv_mb[{n}]"] = kv / 2**20
                res[f"kv_bytes_per_token[{n}]"] = kv / (n + args["new_tokens"])
        return res

    def table(self, report: dict[str, Any]) -> str:
        lengths = report["settings"]["lengths"]
        cols = [("rss_loaded_mb", "RSS after load MB", ".0f")]
        for n in lengths:
            cols += [(f"kv_bytes_per_token[{n}]", f"KV B/token @{n}", ".0f"), (f"kv_mb[{n}]", f"KV MB @{n}", ".2f"),
                     (f"peak_rss_mb[{n}]", f"peak RSS MB @{n}", ".0f")]
        return summary_table(report["summary"], cols)

    def plot(self, report: dict[str, Any], out: Path) -> list[Path]:
        from slimlm.bench.plots import lines

        lengths = report["settings"]["lengths"]
        kv = {k: [s.get(f"kv_mb[{n}]", {}).get("median") for n in lengths] for k, s in report["summary"].items()}
        rss = {k: [s.get(f"peak_rss_mb[{n}]", {}).get("median") for n in lengths] for k, s in report["summary"].items()}
        return [lines(lengths, kv, "context tokens", "KV cache held (MB)", "KV memory", out.with_name(out.name + "-kv.png")),
                lines(lengths, rss, "context tokens", "peak RSS (MB)", "peak resident memory",
                      out.with_name(out.name + "-rss.png"))]
