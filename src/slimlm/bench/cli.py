"""`slimlm bench SCENARIO`: run a benchmark scenario, print a markdown table, write JSON."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from slimlm.errors import SlimLMError

SCENARIOS = ["throughput"]


def cmd_bench(a: argparse.Namespace) -> int:
    from slimlm.engine.options import engine_config_from_args

    if a.scenario not in SCENARIOS:
        raise SlimLMError(f"unknown scenario '{a.scenario}'; known: {', '.join(SCENARIOS)}")
    engine = engine_config_from_args(a)
    dtype = engine.pop("dtype")
    engine = {k: v for k, v in engine.items() if v not in (None, {}, [])}
    threads = a.threads or min(os.cpu_count() or 1, 2 if (os.cpu_count() or 1) <= 2 else os.cpu_count())
    from slimlm.bench import throughput

    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    report = throughput.run(a.model, dtype=dtype, threads=threads, repeats=a.repeats, num_prompts=a.num_prompts,
                            max_tokens=a.max_tokens, engine=engine,
                            systems=tuple(s for s in ("slimlm", "transformers") if s not in (a.skip or [])), log=log)
    print(throughput.table(report))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(report, indent=2))
    return 0


def register(sub) -> None:
    from slimlm.engine.options import add_engine_args
    from slimlm.model.hub import DEFAULT_MODEL

    b = sub.add_parser("bench", help="benchmark a scenario against the baselines")
    b.add_argument("scenario", help=f"one of: {', '.join(SCENARIOS)}")
    b.add_argument("--model", default=DEFAULT_MODEL)
    b.add_argument("--json", default=None, help="write the full report here")
    b.add_argument("--repeats", type=int, default=2)
    b.add_argument("--num-prompts", type=int, default=64)
    b.add_argument("--max-tokens", type=int, default=128)
    b.add_argument("--skip", action="append", help="skip a system (slimlm, transformers)")
    add_engine_args(b)
    b.set_defaults(func=cmd_bench)
