"""The engine loop in a background thread, fed by asyncio request handlers.

Handlers call :meth:`AsyncEngine.submit` and read outputs from an ``asyncio.Queue``; the loop
thread owns the :class:`LLMEngine` (it is not thread-safe), takes new requests and aborts
between steps, and hands every step's outputs back to the event loop. A failure in one step
fails the requests of that step, not the server.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from slimlm.engine.engine import LLMEngine
from slimlm.engine.params import SamplingParams
from slimlm.engine.request import RequestOutput


class QueueFullError(Exception):
    pass


@dataclass
class _Stream:
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    t_submit: float = field(default_factory=time.perf_counter)
    t_last: float | None = None
    n_tokens: int = 0


class AsyncEngine:
    def __init__(self, engine: LLMEngine, max_queue: int = 256, metrics=None):
        self.engine = engine
        self.max_queue = max_queue
        self.metrics = metrics
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._adds: deque[tuple[str, list[int], SamplingParams]] = deque()
        self._aborts: deque[str] = deque()
        self._streams: dict[str, _Stream] = {}
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="slimlm-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ handler side
    def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> asyncio.Queue:
        """Queue a validated request; its outputs (then None) arrive on the returned queue."""
        with self._lock:
            if len(self._streams) >= self.max_queue:
                raise QueueFullError(f"server busy: {len(self._streams)} requests in flight (max {self.max_queue})")
            stream = _Stream(asyncio.Queue(), asyncio.get_running_loop())
            self._streams[request_id] = stream
            self._adds.append((request_id, prompt_ids, params))
        self._wake.set()
        return stream.queue

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._aborts.append(request_id)
        self._wake.set()

    def num_in_flight(self) -> int:
        return len(self._streams)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop taking work, abort what runs, end the loop thread."""
        with self._lock:
            self._stop = True
            self._aborts.extend(self._streams)
        self._wake.set()
        self._thread.join(timeout)

    # ------------------------------------------------------------------ loop thread
    def _deliver(self, rid: str, item) -> None:
        s = self._streams.get(rid)
        if s is not None:
            s.loop.call_soon_threadsafe(s.queue.put_nowait, item)

    def _close(self, rid: str, item=None) -> None:
        if item is not None:
            self._deliver(rid, item)
        self._deliver(rid, None)
        with self._lock:
            self._streams.pop(rid, None)

    def _loop(self) -> None:
        eng = self.engine
        while True:
            with self._lock:
                adds, self._adds = list(self._adds), deque()
                aborts, self._aborts = list(self._aborts), deque()
                stop = self._stop
            for rid, ids, params in adds:
                try:
                    eng.add_request(ids, params, request_id=rid)
                except ValueError as e:
                    self._close(rid, e)
            for rid in aborts:
                if eng.abort(rid) or rid in self._streams:
                    self._close(rid)
            if stop and not eng.has_unfinished():
                return
            if not eng.has_unfinished():
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                outs = eng.step()
            except Exception as e:  # noqa: BLE001 - keep serving; fail only this step's requests
                for rid in list(eng.requests):
                    eng.abort(rid)
                    self._close(rid, RuntimeError(f"engine step failed: {e}"))
                continue
            now = time.perf_counter()
            for out in outs:
                s = self._streams.get(out.request_id)
                if s is None:
                    continue
                n = sum(len(c.token_ids) for c in out.outputs)
                if self.metrics is not None and n > s.n_tokens:
                    if s.t_last is None:
                        self.metrics.ttft.observe(now - s.t_submit)
                    else:
                        self.metrics.itl.observe((now - s.t_last) / (n - s.n_tokens))
                    self.metrics.tokens_out.inc(n - s.n_tokens)
                s.t_last, s.n_tokens = now, n
                if out.finished:
                    self._close(out.request_id, out)
                else:
                    self._deliver(out.request_id, out)
