"""`slimlm batch --ray`: the same rows over a Ray Dataset, one engine per worker.

The driver reads the input (skipping what the output already answers), writes error records for
bad lines itself, and hands the rows to ``map_batches`` over :class:`EngineWorker` actors (each
loads the model once and runs its batches through the server's app, exactly as the local job).
Records are appended as Ray Data yields finished batches, so a killed job resumes the same way.
The driver holds at most ``CHUNK_ROWS`` pending rows at a time.
"""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from slimlm.batch.local import Writer, batch_app, open_output, pending_rows, run_rows
from slimlm.batch.records import Row
from slimlm.cluster.asgi import AppHost
from slimlm.cluster.ray_env import init_ray

CHUNK_ROWS = 50_000


class EngineWorker:
    """A Ray Data callable class: one engine (and one event loop) per worker, reused across batches."""

    def __init__(self, model: str, name: str, engine_kw: dict[str, Any], concurrency: int, threads: int | None):
        import torch

        from slimlm.engine.config import EngineConfig
        from slimlm.engine.engine import LLMEngine
        from slimlm.model.hub import load

        torch.set_num_threads(threads or 1)
        cfg = EngineConfig(**engine_kw)
        engine = LLMEngine(load(model, dtype=cfg.dtype, device=cfg.device), cfg)
        self.host = AppHost(batch_app(engine, name, max_queue=max(concurrency * 8, 256)))
        self.concurrency = concurrency
        self.loop = asyncio.new_event_loop()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = [Row(int(line), json.loads(cid), url, json.loads(body))
                for line, cid, url, body in zip(batch["line"], batch["custom_id"], batch["url"], batch["body"])]
        records: list[dict] = []

        async def go():
            await run_rows(self.host, rows, records.append, self.concurrency, stop=False)

        self.loop.run_until_complete(go())
        return {"record": np.array([json.dumps(r, ensure_ascii=False) for r in records], dtype=object)}


def _run_chunk(ray, rows: list[dict], write: Writer, ctor: dict[str, Any], workers: int, rows_per_task: int) -> None:
    blocks = max(workers, math.ceil(len(rows) / rows_per_task))
    ds = ray.data.from_items(rows, override_num_blocks=blocks)
    out = ds.map_batches(EngineWorker, fn_constructor_kwargs=ctor, batch_size=rows_per_task, concurrency=workers,
                         num_cpus=1, batch_format="numpy")
    for batch in out.iter_batches(batch_size=None, batch_format="numpy"):
        for rec in batch["record"]:
            write(json.loads(rec))


def run_ray(input_path: Path, output: Path, model: str, name: str, engine_kw: dict[str, Any], workers: int = 1,
            concurrency: int = 256, rows_per_task: int = 256, address: str | None = None,
            threads: int | None = None, progress: bool = True) -> tuple[int, int, int]:
    """As :func:`slimlm.batch.local.run_local`, on Ray Data; (skipped, ok, failed)."""
    ray = init_ray(address, num_cpus=None if address else workers + 1)
    done, out, bar = open_output(input_path, output, progress)
    write = Writer(out, bar)
    ctor = {"model": model, "name": name, "engine_kw": engine_kw, "concurrency": concurrency, "threads": threads}
    try:
        chunk: list[dict] = []
        for item in pending_rows(input_path, done, name):
            if isinstance(item, dict):
                write(item)
                continue
            chunk.append({"line": item.line, "custom_id": json.dumps(item.custom_id), "url": item.url,
                          "body": json.dumps(item.body)})
            if len(chunk) >= CHUNK_ROWS:
                _run_chunk(ray, chunk, write, ctor, workers, rows_per_task)
                chunk = []
        if chunk:
            _run_chunk(ray, chunk, write, ctor, workers, rows_per_task)
    finally:
        out.close()
        if bar is not None:
            bar.close()
    return len(done), write.ok, write.failed
