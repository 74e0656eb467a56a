"""``decode``: batch-1 greedy decoding, tokens/s and per-token latency (p50 / p99).

One prompt of ``--prompt-tokens`` tokens of real text, then exactly ``--max-tokens`` greedy
tokens (EOS ignored) per system, after a short warm-up in the same process. Decode tokens/s
counts tokens after the first (whose time is the prefill's); latency is the gap between
consecutive tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slimlm.bench.base import SCENARIOS, WorkerScenario, resolve, standard_systems


def decode_metrics(t0: float, times: list[float]) -> dict[str, float]:
    from slimlm.bench.runner import percentile

    gaps = [(b - a) * 1000 for a, b in zip(times, times[1:])]
    span = times[-1] - times[0] if len(times) > 1 else float("nan")
    return {"decode_tok_s": (len(times) - 1) / span if len(times) > 1 else float("nan"),
            "latency_p50_ms": percentile(gaps, 0.5), "latency_p99_ms": percentile(gaps, 0.99),
            "ttft_ms": (times[0] - t0) * 1000, "generated": float(len(times))}


@SCENARIOS.register("decode")
class Decode(WorkerScenario):
    help = "batch-1 decode: tokens/s, per-token latency p50/p99"
    columns = [("decode_tok_s", "decode tok/s", ".1f"), ("latency_p50_ms", "latency p50 ms", ".1f"),
               ("latency_p99_ms", "latency p99 ms", ".1f"), ("ttft_ms", "first token ms", ".0f"),
               ("peak_rss_mb", "peak RSS MB", ".0f")]
    headline = ("decode_tok_s", True)

    @classmethod
    def add_args(cls, g) -> None:
        g.add_argument("--prompt-tokens", type=int, default=None, help="decode, frontier: prompt length (default 64)")
        g.add_argument("--precisions", default=None,
                       help="decode, prefill: equal-precision rows of slimlm and llama.cpp (and transformers for "
                            "fp32/bf16), e.g. fp32,bf16,int8,int4,gguf (bench/precision.py)")

    def systems(self, a, s):
        extra = {"prompt_tokens": resolve(a.prompt_tokens, 64), "new_tokens": resolve(a.max_tokens, 128)}
        if a.precisions:
            from slimlm.bench.precision import precision_systems

            systems, notes, self.pairs = precision_systems(a, s, extra)
            return systems, {**s.base_args(), **extra, "precisions": a.precisions, "pairs": self.pairs}, notes
        systems, notes = standard_systems(a, s, extra)
        return systems, {**s.base_args(), **extra}, notes

    def derive(self, report: dict[str, Any]) -> None:
        pairs = report["settings"].get("pairs")
        if not pairs:
            return super().derive(report)
        from slimlm.bench.precision import pair_ratios

        report["speedup"] = pair_ratios(report["summary"], pairs, "decode_tok_s", True)

    @staticmethod
    def worker(args: dict[str, Any]) -> dict[str, float]:
        from slimlm.bench.machine import huge_pages_mb, peak_rss_mb
        from slimlm.bench.systems import SYSTEMS
        from slimlm.bench.workloads import text_prompt

        system = SYSTEMS.get(args["system"])(args)
        system.decode(text_prompt(system.tokenizer, 16, offset=20_000), 4)  # warm-up
        t0, times = system.decode(text_prompt(system.tokenizer, args["prompt_tokens"]), args["new_tokens"])
        kv, huge = system.kv_bytes(), huge_pages_mb()
        return {**decode_metrics(t0, times), "peak_rss_mb": peak_rss_mb(),
                **({"kv_mb": kv / 2**20} if kv is not None else {}),
                **({"huge_pages_mb": huge} if huge is not None else {})}

    def plot(self, report: dict[str, Any], out: Path) -> list[Path]:
        from slimlm.bench.plots import bars

        return [bars(report["summary"], "decode_tok_s", "decode tokens/s (batch 1)", out.with_suffix(".png"))]
