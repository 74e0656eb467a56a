"""`slimlm bench SCENARIO`: run a benchmark scenario, print a markdown table, write JSON."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from slimlm.errors import SlimLMError

SCENARIOS = ["throughput", "serve"]


def _throughput(a, engine: dict, dtype: str, threads: int, log) -> tuple[dict, str]:
    from slimlm.bench import throughput

    systems = tuple(s for s in ("slimlm", "transformers") if s not in (a.skip or []))
    report = throughput.run(a.model, dtype=dtype, threads=threads, repeats=a.repeats, num_prompts=a.num_prompts,
                            max_tokens=a.max_tokens, engine=engine, systems=systems, log=log)
    return report, throughput.table(report)


def _serve(a, engine: dict, dtype: str, threads: int, log) -> tuple[dict, str]:
    from slimlm.bench import serve_load

    flags = ["--dtype", dtype, "--max-num-batched-tokens", str(a.max_num_batched_tokens),
             "--block-size", str(a.block_size)]
    if a.kv_policy:
        flags += ["--kv-policy", a.kv_policy]
    report = serve_load.run(a.model, clients=a.clients, seconds=a.seconds, max_tokens=a.max_tokens,
                            threads=threads, engine_args=flags, log=log)
    return report, serve_load.table(report)


def cmd_bench(a: argparse.Namespace) -> int:
    from slimlm.engine.options import engine_config_from_args

    runners = {"throughput": _throughput, "serve": _serve}
    if a.scenario not in runners:
        raise SlimLMError(f"unknown scenario '{a.scenario}'; known: {', '.join(SCENARIOS)}")
    engine = engine_config_from_args(a)
    dtype = engine.pop("dtype")
    engine = {k: v for k, v in engine.items() if v not in (None, {}, [])}
    cores = os.cpu_count() or 1
    threads = a.threads or cores
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    report, text = runners[a.scenario](a, engine, dtype, threads, log)
    print(text)
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
    b.add_argument("--clients", type=int, default=64, help="serve: concurrent streaming clients")
    b.add_argument("--seconds", type=float, default=60, help="serve: how long clients keep sending")
    add_engine_args(b)
    b.set_defaults(func=cmd_bench)
