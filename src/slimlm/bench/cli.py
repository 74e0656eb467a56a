"""`slimlm bench SCENARIO`: run a benchmark scenario, print a markdown table, write JSON.

Scenarios are chosen by name from ``SCENARIOS`` (``bench/registry.py``); an unknown name lists
the known ones. Engine options (``engine/options.py``) apply to slimlm in every scenario.
"""

from __future__ import annotations

import argparse
import os
import sys

from slimlm.errors import SlimLMError

SYSTEM_NAMES = ("slimlm", "transformers", "llama.cpp")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cmd_bench(a: argparse.Namespace) -> int:
    from slimlm.bench.base import BenchSettings
    from slimlm.bench.registry import SCENARIOS
    from slimlm.bench.results import command_line, save, stamp
    from slimlm.engine.options import engine_settings

    scenario = SCENARIOS.get(a.scenario)()
    for s in a.skip or []:
        if s not in SYSTEM_NAMES:
            raise SlimLMError(f"unknown system '{s}' for --skip; known: {', '.join(SYSTEM_NAMES)}")
    dtype, engine = engine_settings(a)
    threads = a.threads or os.cpu_count() or 1
    settings = BenchSettings(model=a.model, dtype=dtype, threads=threads, engine=engine, repeats=a.repeats,
                             skip=list(a.skip or []), in_process=a.in_process, log=log)
    report = stamp(scenario.run(a, settings), "bench", a.scenario, command_line(a.parser, a, "slimlm bench"))
    print(scenario.table(report))
    for n in report.get("notes", []):
        print(f"note: {n}")
    if a.json:
        log(f"wrote {save(report, a.json)}")
    return 0


def register(sub) -> None:
    from slimlm.bench.registry import SCENARIOS
    from slimlm.engine.options import add_engine_args
    from slimlm.model.hub import DEFAULT_MODEL

    b = sub.add_parser("bench", help="benchmark a scenario against the baselines",
                       description="Scenarios: " + "; ".join(f"{n}: {SCENARIOS.get(n).help}" for n in SCENARIOS.names()))
    b.add_argument("scenario", help=f"one of: {', '.join(SCENARIOS.names())}")
    b.add_argument("--model", default=DEFAULT_MODEL)
    b.add_argument("--json", default=None, help="write the full report here")
    b.add_argument("--repeats", type=int, default=2, help="interleaved runs per system")
    b.add_argument("--max-tokens", type=int, default=None,
                   help="generated tokens (throughput, serve, decode: 128; memory: 32; frontier: 64)")
    b.add_argument("--skip", action="append", help=f"skip a system ({', '.join(SYSTEM_NAMES)})")
    b.add_argument("--gguf", default=None,
                   help="llama.cpp: a GGUF file, or a type (F32, F16, BF16, Q8_0) to write the same weights as "
                        "(default F32)")
    b.add_argument("--in-process", action="store_true",
                   help="run workers in this process (tests, debugging; no memory isolation)")
    for name in SCENARIOS.names():
        SCENARIOS.get(name).add_args(b.add_argument_group(name))
    add_engine_args(b)
    b.set_defaults(func=cmd_bench, parser=b)
