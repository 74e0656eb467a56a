"""`slimlm eval TASK` (score a quality task through the engine) and `slimlm report RESULTS_DIR`
(render every result JSON into markdown tables and PNG plots)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from slimlm.errors import SlimLMError

EVAL_SYSTEMS = ("slimlm", "transformers", "kvpress")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def scoring_lm(model: str, system: str, dtype: str, threads: int, engine: dict[str, Any]):
    """The engine (default) or transformers, ready to score."""
    import torch

    torch.set_num_threads(threads)
    if system == "kvpress":  # engine: {"press": NAME, "ratio": R, "keep_last": N} (slimlm.eval.kvpress_lm)
        from slimlm.bench.systems import hf_dir
        from slimlm.eval.kvpress_lm import KVPressLM, unavailable as kvpress_unavailable

        why = kvpress_unavailable() or (None if hf_dir(model) else f"kvpress baseline skipped: {model} is not a "
                                        "Hugging Face directory (`slimlm convert` one)")
        if why:
            raise SlimLMError(why)
        return KVPressLM(hf_dir(model), dtype, engine.get("press", "snapkv"), engine.get("ratio", 0.5),
                         engine.get("keep_last", 0))
    if system == "transformers":
        from slimlm.bench.systems import hf_dir, unavailable
        from slimlm.eval.lm import TransformersLM

        why = unavailable("transformers", model)
        if why:
            raise SlimLMError(why)
        return TransformersLM(hf_dir(model), dtype)
    from slimlm import LLM
    from slimlm.eval.lm import EngineLM
    from slimlm.model.hub import load

    lm = load(model, dtype=dtype, weights=engine.get("weights"), group_size=engine.get("weights_group_size"))
    return EngineLM(LLM(lm, dtype=dtype, **engine))


def evaluate(task, lm, settings: dict[str, Any], log=log) -> dict[str, Any]:
    """Run ``task`` on ``lm``; the report (without kind/command stamps)."""
    from dataclasses import asdict

    from slimlm.bench.base import busy_warning
    from slimlm.bench.machine import cpu_busy, machine_info

    before = cpu_busy()
    t0 = time.perf_counter()
    results = task.run(lm, log)
    report = {"settings": {**settings, **asdict(task)}, "machine": machine_info(settings["threads"]),
              "seconds": time.perf_counter() - t0, "results": results, "notes": list(results.get("notes", []))}
    busy_warning(report, [before, cpu_busy()], log)
    return report


def cmd_eval(a: argparse.Namespace) -> int:
    from slimlm.bench.results import command_line, save, stamp
    from slimlm.engine.options import engine_settings
    from slimlm.eval.registry import TASKS

    task = TASKS.get(a.task).from_args(a)
    if a.system not in EVAL_SYSTEMS:
        raise SlimLMError(f"unknown system '{a.system}'; known: {', '.join(EVAL_SYSTEMS)}")
    dtype, engine = engine_settings(a)
    threads = a.threads or os.cpu_count() or 1
    if a.system == "kvpress":
        engine = {"press": a.press, "ratio": a.press_ratio, "keep_last": a.press_keep_last}
    lm = scoring_lm(a.model, a.system, dtype, threads, engine)
    settings = {"model": a.model, "system": a.system, "dtype": dtype, "threads": threads,
                "engine": engine if a.system in ("slimlm", "kvpress") else {}}
    report = stamp(evaluate(task, lm, settings), "eval", a.task, command_line(a.parser, a, "slimlm eval"))
    pol = getattr(getattr(getattr(lm, "llm", None), "engine", None), "policy", None)
    if getattr(pol, "stats", None):  # query policies count keys and bytes read per decoded (row, layer)
        st = report["kv_policy_stats"] = dict(pol.stats)
        if st.get("bytes_full"):
            report["notes"].append(f"kv_policy {a.kv_policy}: decode attention read {st['bytes_read']:,} of "
                                   f"{st['bytes_full']:,} KV bytes ({st['bytes_read'] / st['bytes_full']:.3f}), "
                                   f"{st['keys_attended']:,} of {st['keys_stored']:,} keys, over "
                                   f"{st['decode_rows']:,} decoded (token, layer) rows; prefix summaries built "
                                   f"{st['summaries_built']}, reused {st['summary_hits']}")
    print(task.table(report))
    for n in report["notes"]:
        print(f"note: {n}")
    if a.json:
        log(f"wrote {save(report, a.json)}")
    return 0


def cmd_report(a: argparse.Namespace) -> int:
    from pathlib import Path

    from slimlm.bench.report import render

    out = Path(a.out)
    notes = render(a.results_dir, out, Path(a.plots) if a.plots else out.parent / out.stem)
    for n in notes:
        print(f"note: {n}", file=sys.stderr)
    log(f"wrote {out}")
    return 0


def register(sub) -> None:
    from slimlm.engine.options import add_engine_args
    from slimlm.eval.registry import TASKS
    from slimlm.model.hub import DEFAULT_MODEL

    e = sub.add_parser("eval", help="score a quality task through the engine",
                       description="Tasks: " + "; ".join(f"{n}: {TASKS.get(n).help}" for n in TASKS.names()))
    e.add_argument("task", help=f"one of: {', '.join(TASKS.names())}")
    e.add_argument("--model", default=DEFAULT_MODEL)
    e.add_argument("--json", default=None, help="write the full report here")
    e.add_argument("--system", default="slimlm",
                   help="slimlm (the engine, default), transformers (reference) or kvpress (optional baseline)")
    e.add_argument("--press", default="snapkv", help="kvpress: the press (streamingllm, snapkv, observed, knorm, ...)")
    e.add_argument("--press-ratio", type=float, default=0.5, help="kvpress: share of the KV the press removes")
    e.add_argument("--press-keep-last", type=int, default=0,
                   help="kvpress: last prompt tokens left out of the compression (default 0: the whole prompt)")
    e.add_argument("--seed", type=int, default=0)
    for name in TASKS.names():
        TASKS.get(name).add_args(e.add_argument_group(name))
    add_engine_args(e)
    e.set_defaults(func=cmd_eval, parser=e)

    r = sub.add_parser("report", help="render result JSON files into markdown tables and PNG plots")
    r.add_argument("results_dir")
    r.add_argument("--out", default="docs/results.md")
    r.add_argument("--plots", default=None, help="folder for the PNGs (default: next to --out, named after it)")
    r.set_defaults(func=cmd_report)
