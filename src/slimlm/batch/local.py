"""The local batch job: one engine behind the server's app, rows streamed from the input file,
each record appended (and flushed) to the output as soon as its row finishes.

Restartable: a killed job leaves whole records (and at most one torn line, cut off on restart);
run again with the same files, it skips the lines already answered. At most ``concurrency`` rows
are in flight, so inputs of any length run in bounded memory; the engine batches them
continuously (it sees up to ``max_num_seqs`` at a time).
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from slimlm.batch.records import Row, count_lines, error_record, parse_line, read_done, run_row
from slimlm.cluster.asgi import AppHost


def batch_app(engine, model_name: str, max_queue: int):
    """The server's app for a batch job: no access log, no stats lines."""
    from slimlm.serve.app import build_app
    from slimlm.serve.config import ServeConfig

    return build_app(engine, model_name, ServeConfig(max_queue=max_queue, stats_interval_s=0, access_log=False))


def pending_rows(path: Path, done: set[int], model_name: str) -> Iterator[Row | dict[str, Any]]:
    """Rows and error records for the lines not answered yet, in file order."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for line, raw in enumerate(f, 1):
            if line in done:
                continue
            item = parse_line(line, raw, model_name)
            if item is not None:
                yield item


class Writer:
    """Appends records, one flushed line each, and ticks the progress bar."""

    def __init__(self, out: TextIO, bar=None):
        self.out, self.bar = out, bar
        self.ok = self.failed = 0

    def __call__(self, record: dict[str, Any]) -> None:
        self.out.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.out.flush()
        resp = record.get("response")
        if resp is not None and resp["status_code"] == 200:
            self.ok += 1
        else:
            self.failed += 1
        if self.bar is not None:
            self.bar.update(1)


async def _guarded(host: AppHost, row: Row) -> dict[str, Any]:
    try:
        return await run_row(host, row)
    except Exception as e:  # noqa: BLE001 - this row fails, the job goes on
        return error_record(row.line, row.custom_id, "internal_error", f"{type(e).__name__}: {e}")


async def run_rows(host: AppHost, items, write, concurrency: int, stop: bool = True) -> None:
    """Run ``items`` (rows and ready error records) with at most ``concurrency`` in flight, writing
    each record as it is done; ``stop`` ends the app's engine afterwards (a worker keeps it)."""
    pending: set[asyncio.Task] = set()
    try:
        for item in items:
            if isinstance(item, dict):
                write(item)
                continue
            while len(pending) >= concurrency:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    write(t.result())
            pending.add(asyncio.create_task(_guarded(host, item)))
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                write(t.result())
    finally:
        for t in pending:
            t.cancel()
        if stop:
            await host.stop()


def open_output(input_path: Path, output: Path, progress: bool) -> tuple[set[int], TextIO, Any]:
    """(lines done, the output opened for appending, a progress bar or None)."""
    if not input_path.is_file():
        from slimlm.errors import SlimLMError

        raise SlimLMError(f"input file {input_path} not found")
    done = read_done(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    out = open(output, "a", encoding="utf-8")
    bar = None
    if progress:
        from tqdm import tqdm

        total = count_lines(input_path)
        bar = tqdm(total=total, initial=min(len(done), total), desc="batch", unit="row", file=sys.stderr)
    return done, out, bar


def run_local(input_path: Path, output: Path, engine, model_name: str, concurrency: int = 256,
              progress: bool = True) -> tuple[int, int, int]:
    """Answer every line of ``input_path`` not yet in ``output``; (skipped, ok, failed)."""
    done, out, bar = open_output(input_path, output, progress)
    write = Writer(out, bar)
    host = AppHost(batch_app(engine, model_name, max_queue=max(concurrency * 8, 256)))
    try:
        asyncio.run(run_rows(host, pending_rows(input_path, done, model_name), write, concurrency))
    finally:
        out.close()
        if bar is not None:
            bar.close()
    return len(done), write.ok, write.failed
