"""The ``throughput`` and ``serve`` scenarios: thin wrappers over throughput.py and serve_load.py,
which keep their own workers and tables."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slimlm.bench.base import SCENARIOS, BenchSettings, Scenario, busy_warning, resolve


@SCENARIOS.register("throughput")
class Throughput(Scenario):
    help = "offline batch: slimlm vs transformers generate (the engine issue's workload)"

    @classmethod
    def add_args(cls, g) -> None:
        g.add_argument("--num-prompts", type=int, default=None, help="throughput: prompts (default 64)")
        g.add_argument("--hf-batch-sizes", default=None,
                       help="throughput: transformers batch sizes, one row each; the best is the ratio's "
                            "baseline (default 8,16,32,64)")

    def run(self, a, s: BenchSettings) -> dict[str, Any]:
        from slimlm.bench import throughput
        from slimlm.bench.base import int_list
        from slimlm.bench.systems import unavailable

        notes = []
        systems = [x for x in ("slimlm", "transformers") if x not in s.skip]
        if "transformers" in systems and (why := unavailable("transformers", s.model)):
            systems.remove("transformers")
            notes.append(why)
        if "llama.cpp" not in s.skip:
            notes.append("llama.cpp not measured in throughput: llama-cpp-python serves one sequence at a time")
        report = throughput.run(s.model, dtype=s.dtype, threads=s.threads, repeats=s.repeats,
                                num_prompts=resolve(a.num_prompts, 64), max_tokens=resolve(a.max_tokens, 128),
                                engine=s.engine, systems=tuple(systems), log=s.log,
                                hf_batches=tuple(int_list(a.hf_batch_sizes, [8, 16, 32, 64])))
        report["notes"] = notes + [f"{k} failed: {r['error']}" for k, runs in report["runs"].items()
                                   for r in runs if "error" in r]
        busy_warning(report, [report.get("cpu_busy_before", 0.0)] +
                     [r.get("cpu_busy_others", 0.0) for runs in report["runs"].values() for r in runs], s.log)
        return report

    def table(self, report: dict[str, Any]) -> str:
        from slimlm.bench import throughput

        return throughput.table(report)

    def plot(self, report: dict[str, Any], out: Path) -> list[Path]:
        from slimlm.bench.plots import bars

        return [bars(report["summary"], "tokens_per_s", "offline throughput (generated tok/s)", out.with_suffix(".png"))]


@SCENARIOS.register("serve")
class Serve(Scenario):
    help = "load test: concurrent streaming clients against `slimlm serve`"

    @classmethod
    def add_args(cls, g) -> None:
        g.add_argument("--clients", type=int, default=64, help="serve: concurrent streaming clients")
        g.add_argument("--seconds", type=float, default=60, help="serve: how long clients keep sending")
        g.add_argument("--abusive-share", type=float, default=0.0,
                       help="serve: share of clients sending malformed / abusive requests (adversarial mix)")

    def run(self, a, s: BenchSettings) -> dict[str, Any]:
        from slimlm.bench import serve_load
        from slimlm.bench.machine import cpu_busy

        flags = ["--dtype", s.dtype, "--max-num-batched-tokens", str(a.max_num_batched_tokens),
                 "--block-size", str(a.block_size)]
        if a.kv_policy:
            flags += ["--kv-policy", a.kv_policy]
        busy = cpu_busy()
        report = serve_load.run(s.model, clients=a.clients, seconds=a.seconds, max_tokens=resolve(a.max_tokens, 128),
                                threads=s.threads, engine_args=flags, log=s.log,
                                abusive_share=getattr(a, "abusive_share", 0.0))
        busy_warning(report, [busy], s.log)
        return report

    def table(self, report: dict[str, Any]) -> str:
        from slimlm.bench import serve_load

        return serve_load.table(report)

