"""`slimlm batch INPUT.jsonl OUTPUT.jsonl`: an OpenAI batch file through the engine, locally or on Ray Data."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def cmd_batch(a: argparse.Namespace) -> int:
    from slimlm.errors import SlimLMError

    if a.concurrency < 1:
        raise SlimLMError(f"--concurrency must be at least 1, got {a.concurrency}")
    if a.workers < 1:
        raise SlimLMError(f"--workers must be at least 1, got {a.workers}")
    if not a.ray and a.ray_address:
        raise SlimLMError("--ray-address needs --ray")
    inp, out = Path(a.input), Path(a.output)
    if not inp.is_file():
        raise SlimLMError(f"input file {inp} not found")
    if inp.resolve() == out.resolve():
        raise SlimLMError("INPUT and OUTPUT must be different files")
    from slimlm.engine.options import engine_config_from_args

    engine_kw = engine_config_from_args(a)
    name = a.served_model_name or a.model
    if a.ray:
        from slimlm.batch.ray_job import run_ray

        skipped, ok, failed = run_ray(inp, out, a.model, name, engine_kw, workers=a.workers,
                                      concurrency=a.concurrency, rows_per_task=a.rows_per_task,
                                      address=a.ray_address, threads=a.threads, progress=not a.no_progress)
    else:
        import torch

        from slimlm.batch.local import run_local
        from slimlm.engine.config import EngineConfig
        from slimlm.engine.engine import LLMEngine
        from slimlm.model.hub import load

        if a.threads:
            torch.set_num_threads(a.threads)
        cfg = EngineConfig(**engine_kw)
        lm = load(a.model, dtype=cfg.dtype, device=cfg.device)
        if lm.tokenizer is None:
            raise SlimLMError(f"{a.model} has no tokenizer; batch jobs need one")
        skipped, ok, failed = run_local(inp, out, LLMEngine(lm, cfg), name, a.concurrency, not a.no_progress)
    print(f"slimlm: batch {out}: {ok} ok, {failed} failed, {skipped} already done", file=sys.stderr)
    return 0


def register(sub) -> None:
    from slimlm.engine.options import add_engine_args
    from slimlm.model.hub import DEFAULT_MODEL

    s = sub.add_parser("batch", help="an OpenAI batch file (custom_id, body) through the engine; restartable")
    s.add_argument("input", metavar="INPUT.jsonl", help="one request per line (OpenAI batch input format)")
    s.add_argument("output", metavar="OUTPUT.jsonl",
                   help="one record per line; rerunning after a kill skips the lines already answered")
    s.add_argument("--model", default=DEFAULT_MODEL)
    s.add_argument("--served-model-name", default=None, help="model name in the response bodies (default: --model)")
    s.add_argument("--concurrency", type=int, default=256, help="rows in flight per engine")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.add_argument("--ray", action="store_true", help="run on Ray Data, one engine per worker (pip install slimlm[ray])")
    s.add_argument("--ray-address", default=None, help="join this Ray cluster (default: start a local one)")
    s.add_argument("--workers", type=int, default=1, help="with --ray: engine workers (one engine each)")
    s.add_argument("--rows-per-task", type=int, default=256, help="with --ray: rows per Ray Data batch")
    add_engine_args(s)
    s.set_defaults(func=cmd_batch)
