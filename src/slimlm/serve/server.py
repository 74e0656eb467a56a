"""uvicorn, with SIGTERM as a clean stop.

On SIGTERM (or Ctrl-C): new requests get 503, uvicorn stops accepting connections, in-flight
requests get ``shutdown_timeout_s`` to finish; then every remaining stream ends with an
OpenAI-shaped error event and ``[DONE]``, every remaining non-streaming request with a JSON 503,
and the process exits 0.
"""

from __future__ import annotations

import signal
import threading

import uvicorn


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state=None, shutdown_timeout_s: float = 30.0):
        super().__init__(config)
        self.state, self.shutdown_timeout_s = state, shutdown_timeout_s
        self._drain_timer: threading.Timer | None = None

    def handle_exit(self, sig, frame):
        if self.state is not None and self._drain_timer is None:
            self.state.begin_shutdown()
            self._drain_timer = threading.Timer(self.shutdown_timeout_s, self.state.drain)
            self._drain_timer.daemon = True
            self._drain_timer.start()
        super().handle_exit(sig, frame)
        if sig == signal.SIGTERM and sig in self._captured_signals:
            self._captured_signals.remove(sig)  # uvicorn would re-raise it after shutting down


def uvicorn_config(app, host: str, port: int, cfg, log_level: str = "warning") -> uvicorn.Config:
    """uvicorn's own limits from the ServeConfig (connection cap, keep-alive, shutdown backstop)."""
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                          limit_concurrency=cfg.max_connections, timeout_keep_alive=cfg.keep_alive_s,
                          timeout_graceful_shutdown=cfg.shutdown_timeout_s + 5)
