"""The engine loop in a background thread, fed by asyncio request handlers.

Handlers call :meth:`AsyncEngine.submit` and read outputs from an ``asyncio.Queue``; the loop
thread owns the :class:`LLMEngine` (it is not thread-safe), takes new requests and aborts
between steps, and hands every step's outputs back to the event loop.

Isolation: a request whose own processing fails (its sampling, say) comes back from the engine
with ``error`` set and fails alone (:class:`RequestFailed`); only an error the engine cannot
attribute to a request (the model's forward) fails the requests of that step.

Cost: a request with ``n`` samples counts ``n`` sequences against ``max_queue`` (429 past it)
and is handed to the engine only while the engine holds at most ``max_num_seqs`` sequences
(requests wait here, in arrival order, otherwise).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from slimlm.engine.engine import LLMEngine
from slimlm.engine.params import SamplingParams

log = logging.getLogger("slimlm.serve")


class QueueFullError(Exception):
    pass


class RequestFailed(Exception):
    """This request failed on its own; the others go on."""


class ServerShutdown(Exception):
    """The server stopped before this request finished."""


@dataclass
class _Stream:
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    n: int
    t_submit: float = field(default_factory=time.perf_counter)
    t_last: float | None = None
    n_tokens: int = 0


class AsyncEngine:
    def __init__(self, engine: LLMEngine, max_queue: int = 256, metrics=None, stats_interval_s: float = 0.0):
        self.engine = engine
        self.max_queue = max_queue
        self.metrics = metrics
        self.stats_interval_s = stats_interval_s
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._adds: deque[tuple[str, list[int], SamplingParams, object]] = deque()  # not yet in the engine
        self._aborts: deque[str] = deque()
        self._streams: dict[str, _Stream] = {}
        self._seqs = 0  # sequences in flight (sum of n)
        self._engine_seqs: dict[str, int] = {}  # requests in the engine -> their n
        self._stop = False
        self._last_stats = time.monotonic()
        self._gen_since = self._prompt_since = 0
        self._thread = threading.Thread(target=self._loop, name="slimlm-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ handler side
    def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams, layout=None) -> asyncio.Queue:
        """Queue a validated request; its outputs (then None) arrive on the returned queue.
        ``layout``: a set-based prompt's ``PromptLayout`` (``engine/segments.py``)."""
        with self._lock:
            if self._stop:
                raise ServerShutdown("the server is shutting down")
            if self._seqs + params.n > self.max_queue:
                raise QueueFullError(f"server busy: {self._seqs} sequences in flight, this request adds "
                                     f"{params.n} (max {self.max_queue})")
            stream = _Stream(asyncio.Queue(), asyncio.get_running_loop(), params.n)
            self._streams[request_id] = stream
            self._seqs += params.n
            self._adds.append((request_id, prompt_ids, params, layout))
        self._wake.set()
        return stream.queue

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._aborts.append(request_id)
        self._wake.set()

    def num_in_flight(self) -> int:
        return len(self._streams)

    def drain(self) -> None:
        """End every request in flight with :class:`ServerShutdown` (thread-safe)."""
        with self._lock:
            rids = list(self._streams)
            self._aborts.extend(rids)
        for rid in rids:
            self._close(rid, ServerShutdown("the server shut down before this request finished"))
        self._wake.set()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop taking work, abort what runs, end the loop thread."""
        with self._lock:
            self._stop = True
        self.drain()
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
            s = self._streams.pop(rid, None)
            if s is not None:
                self._seqs -= s.n

    def _admit(self) -> None:
        """Hand waiting requests to the engine while it has room for their sequences."""
        eng, cap = self.engine, self.engine.config.max_num_seqs
        while True:
            with self._lock:
                if not self._adds:
                    return
                rid, ids, params, layout = self._adds[0]
                if self._engine_seqs and sum(self._engine_seqs.values()) + params.n > cap:
                    return
                self._adds.popleft()
            if rid not in self._streams:  # aborted while waiting here
                continue
            try:
                eng.add_request(ids, params, request_id=rid, layout=layout)
                self._engine_seqs[rid] = params.n
                self._prompt_since += len(ids)
            except Exception as e:  # noqa: BLE001 - this request only
                self._close(rid, e if isinstance(e, ValueError) else RequestFailed(str(e)))

    def _loop(self) -> None:
        eng = self.engine
        while True:
            with self._lock:
                aborts, self._aborts = list(self._aborts), deque()
                stop = self._stop
            for rid in aborts:
                self._engine_seqs.pop(rid, None)
                if eng.abort(rid) or rid in self._streams:
                    self._close(rid)
            self._admit()
            self._maybe_log_stats()
            if stop and not eng.has_unfinished():
                return
            if not eng.has_unfinished():
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                outs = eng.step()
            except Exception as e:  # noqa: BLE001 - not attributable to one request: fail this step's
                log.exception("engine step failed")
                for rid in list(eng.requests):
                    eng.abort(rid)
                    self._engine_seqs.pop(rid, None)
                    self._close(rid, RequestFailed(f"engine step failed: {type(e).__name__}"))
                continue
            self._publish(outs)

    def _publish(self, outs) -> None:
        now = time.perf_counter()
        for out in outs:
            if out.finished:
                self._engine_seqs.pop(out.request_id, None)
                if self.metrics is not None:
                    self.metrics.tokens_cached.inc(out.num_cached_tokens)
            s = self._streams.get(out.request_id)
            if s is None:
                continue
            n = sum(len(c.token_ids) for c in out.outputs)
            if n > s.n_tokens:
                if self.metrics is not None:
                    if s.t_last is None:
                        self.metrics.ttft.observe(now - s.t_submit)
                    else:
                        self.metrics.itl.observe((now - s.t_last) / (n - s.n_tokens))
                    self.metrics.tokens_out.inc(n - s.n_tokens)
                self._gen_since += n - s.n_tokens
            s.t_last, s.n_tokens = now, n
            if out.error is not None:
                self._close(out.request_id, RequestFailed(out.error))
            elif out.finished:
                self._close(out.request_id, out)
            else:
                self._deliver(out.request_id, out)

    def _maybe_log_stats(self) -> None:
        """vLLM-style periodic line: requests running / waiting, KV use, tokens/s."""
        now = time.monotonic()
        dt = now - self._last_stats
        if not self.stats_interval_s or dt < self.stats_interval_s:
            return
        if self._gen_since or self._prompt_since or self._streams:
            eng, pool = self.engine, self.engine.pool
            log.info("stats: running %d seqs, waiting %d seqs (+%d requests queued), KV %d/%d blocks (%.0f%%), "
                     "prompt %.1f tok/s, generation %.1f tok/s", len(eng.scheduler.running), len(eng.scheduler.waiting),
                     len(self._adds), pool.num_used(), pool.num_blocks, 100 * pool.num_used() / pool.num_blocks,
                     self._prompt_since / dt, self._gen_since / dt)
        self._last_stats, self._gen_since, self._prompt_since = now, 0, 0
